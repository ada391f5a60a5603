// Autoregressive generation: greedy, temperature, top-k and top-p sampling, with a KV cache
// (each new token costs one forward of one position), chat templates and streaming.
#pragma once

#include <cstdint>
#include <functional>
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
  std::vector<int64_t> stop_ids;  // and after any of these (a model's own end-of-sequence ids: stop_token_ids, hf.h)
  bool use_cache = true;        // KV cache; false re-runs the model over the whole context per token
  // Called with each new token as it is chosen (streaming); return false to stop early.
  std::function<bool(int64_t)> on_token;
};

// The generated token ids (prompt excluded; the EOS that stopped it included). The context is at
// most the model's max_seq_len tokens: without the cache, the last max_seq_len tokens at
// positions 0..; with it, a prompt longer than the window, or a full cache, is cut to its last
// tokens that leave room for the rest of the answer (keeping at least half the window), from
// position 0. Options out of range (temperature < 0, top_p outside (0, 1], top_k < 0) throw.
std::vector<int64_t> generate(Transformer& model, const std::vector<int64_t>& prompt, const GenerateOptions& opts);
// BOS + prompt tokens in, prompt + continuation text out.
std::string generate_text(Transformer& model, const Tokenizer& tok, const std::string& prompt, GenerateOptions opts);

// Streams decoded text: feed token ids one at a time; returns the text they add (sentencepiece
// joins pieces, so a token's text is known only from the decoded whole).
class TextStream {
 public:
  // `context`: tokens before the stream (e.g. the prompt), so the first piece's space is kept.
  explicit TextStream(const Tokenizer& tok, std::vector<int64_t> context = {});
  std::string push(int64_t id);
  // At the end of the stream: the text held back (a partial UTF-8 character, as U+FFFD).
  std::string finish();
  // The streamed text so far (the context's text excluded).
  std::string text() const { return text_.substr(std::min(text_.size(), context_chars_)); }

 private:
  const Tokenizer& tok_;
  std::vector<int64_t> ids_;
  std::string text_;
  size_t context_chars_ = 0;
};

}  // namespace libllm
