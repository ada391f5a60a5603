// Perplexity of a model on documents: each document is scored as BOS + its tokens (no EOS);
// every token after BOS is predicted exactly once with as much preceding context as the
// window allows (stride 1), or with at least window - stride + 1 tokens of context (stride > 1).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "libllm/data.h"  // (read_documents: the documents to score)
#include "libllm/model.h"
#include "libllm/tokenizer.h"

namespace libllm {

struct EvalOptions {
  int64_t batch_size = 8;  // windows scored per forward pass
  int64_t window = 0;      // input tokens per forward; 0 = the model's max_seq_len
  int64_t stride = 1;      // targets scored per window past the first; 1 = full context for every token
  int64_t bos_id = 1;      // prepended to every document
};

struct EvalResult {
  int64_t documents = 0;  // documents with at least one predicted token
  int64_t tokens = 0;     // predicted tokens
  double loss = 0;        // mean negative log-likelihood, nats
  double ppl = 0;         // exp(loss)
  double seconds = 0;     // wall time of the forward passes
};

// Checks `opts` for a model of context `max_seq_len` (what the evaluations check first): an Error
// names the option (--window, --stride, --batch-size).
void check_eval_options(const EvalOptions& opts, int64_t max_seq_len);

// `progress(done_windows, total_windows)` is called after each batch when given.
EvalResult evaluate_perplexity(Transformer& model, const Tokenizer& tokenizer,
                               const std::vector<std::string>& documents, const EvalOptions& opts,
                               const std::function<void(int64_t, int64_t)>& progress = {});
// Forward windows of `window` tokens (0: not allowed here) that a document of `tokens` tokens (without
// BOS) takes at `stride`: 0 when it is empty, else 1 + ceil(max(0, tokens - window) / stride).
int64_t eval_windows(int64_t tokens, int64_t window, int64_t stride);
// Same on already tokenized documents (without BOS).
EvalResult evaluate_tokens(Transformer& model, const std::vector<std::vector<int64_t>>& documents,
                           const EvalOptions& opts, const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace libllm
