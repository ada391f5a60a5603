// Autoregressive sampling from a model: greedy, temperature, top-k and top-p.
// (This version re-runs the model over the whole context at each token; a KV cache comes with
// the fine-tuning issue's llm-generate.)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "libllm/model.h"
#include "libllm/tokenizer.h"

namespace libllm {

struct GenerateOptions {
  int64_t max_new_tokens = 64;  // tokens to generate at most
  double temperature = 0.8;     // 0 = greedy (argmax)
  int64_t top_k = 40;           // sample among the k most likely tokens; 0 = all
  double top_p = 1.0;           // nucleus: smallest set of tokens with this much probability; 1 = off
  uint64_t seed = 0;            // sampling RNG seed (results repeat for the same seed)
  int64_t eos_id = 2;           // generation stops after this token; -1 = never
};

// The generated token ids (prompt excluded).
std::vector<int64_t> generate(Transformer& model, const std::vector<int64_t>& prompt, const GenerateOptions& opts);
// BOS + prompt tokens in, prompt + continuation text out.
std::string generate_text(Transformer& model, const Tokenizer& tok, const std::string& prompt, GenerateOptions opts);

}  // namespace libllm
