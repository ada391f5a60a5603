#include "libllm/eval.h"

#include <fmt/core.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "libllm/error.h"

namespace libllm {
namespace {

// One forward pass: inputs tokens[begin, end) of a document; the last `scored` positions'
// next-token predictions count.
struct Window {
  const std::vector<int64_t>* tokens;
  int64_t begin, end, scored;
};

std::vector<Window> plan_windows(const std::vector<int64_t>& t, int64_t W, int64_t stride) {
  std::vector<Window> out;
  const int64_t n = static_cast<int64_t>(t.size());  // BOS + document tokens
  if (n < 2) return out;
  // First window: inputs [0, c) predict targets 1..c, each with all preceding tokens.
  const int64_t c = std::min(n - 1, W);
  out.push_back({&t, 0, c, c});
  // Then windows ending right before the last target they score.
  for (int64_t last = c; last < n - 1;) {
    const int64_t next = std::min(last + stride, n - 1);
    out.push_back({&t, next - W, next, next - last});
    last = next;
  }
  return out;
}

}  // namespace

int64_t eval_windows(int64_t tokens, int64_t window, int64_t stride) {
  if (tokens < 1) return 0;  // (BOS + tokens: n = tokens + 1, targets 1..n-1; plan_windows' count)
  const int64_t past = std::max<int64_t>(0, tokens - window);
  return 1 + (past + stride - 1) / stride;
}

EvalResult evaluate_perplexity(Transformer& model, const Tokenizer& tokenizer,
                               const std::vector<std::string>& documents, const EvalOptions& opts,
                               const std::function<void(int64_t, int64_t)>& progress) {
  std::vector<std::vector<int64_t>> tokens;
  tokens.reserve(documents.size());
  for (const auto& d : documents) tokens.push_back(tokenizer.encode(d));
  return evaluate_tokens(model, tokens, opts, progress);
}

void check_eval_options(const EvalOptions& opts, int64_t max_len) {
  if (opts.window < 0 || opts.window > max_len)
    throw Error(
        "--window",
        fmt::format("must be in [0, {}] (0 = the model's max_position_embeddings), got {}", max_len, opts.window),
        "positions past the model's window were never trained");
  const int64_t W = opts.window > 0 ? opts.window : max_len;
  if (opts.stride < 1 || opts.stride > W) throw Error("--stride", "must be in [1, window=" + std::to_string(W) + "]");
  if (opts.batch_size < 1) throw Error("--batch-size", "must be >= 1");
}

EvalResult evaluate_tokens(Transformer& model, const std::vector<std::vector<int64_t>>& documents,
                           const EvalOptions& opts, const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t max_len = model->config().max_seq_len;
  check_eval_options(opts, max_len);
  const int64_t W = opts.window > 0 ? opts.window : max_len;
  std::vector<std::vector<int64_t>> seqs;
  seqs.reserve(documents.size());
  for (const auto& d : documents) {
    seqs.push_back({opts.bos_id});
    seqs.back().insert(seqs.back().end(), d.begin(), d.end());
  }
  std::vector<Window> windows;
  EvalResult r;
  for (const auto& s : seqs) {
    auto w = plan_windows(s, W, opts.stride);
    r.documents += !w.empty();
    windows.insert(windows.end(), w.begin(), w.end());
  }
  // Similar lengths together: less padding.
  std::stable_sort(windows.begin(), windows.end(),
                   [](const Window& a, const Window& b) { return a.end - a.begin > b.end - b.begin; });

  torch::NoGradGuard no_grad;
  // Evaluated in eval mode (no dropout); the caller's mode is restored however this ends (a
  // training loop's activation checkpointing and LoRA dropout depend on it).
  struct Mode {
    Transformer& m;
    bool was;
    ~Mode() { m->train(was); }
  } mode{model, model->is_training()};
  model->eval();
  const auto device = model->parameters().front().device();
  const auto start = std::chrono::steady_clock::now();
  double nll = 0;
  for (size_t b = 0; b < windows.size(); b += opts.batch_size) {
    const size_t e = std::min(windows.size(), b + static_cast<size_t>(opts.batch_size));
    const int64_t B = static_cast<int64_t>(e - b), T = windows[b].end - windows[b].begin;
    // Right-padded inputs: causal attention keeps padding out of every scored position.
    auto inputs = torch::zeros({B, T}, torch::kInt64);
    auto targets = torch::full({B, T}, int64_t{-100}, torch::kInt64);
    auto in_a = inputs.accessor<int64_t, 2>();
    auto tg_a = targets.accessor<int64_t, 2>();
    for (int64_t i = 0; i < B; ++i) {
      const Window& w = windows[b + i];
      const auto& t = *w.tokens;
      const int64_t len = w.end - w.begin;
      for (int64_t j = 0; j < len; ++j) in_a[i][j] = t[w.begin + j];
      for (int64_t j = len - w.scored; j < len; ++j) tg_a[i][j] = t[w.begin + j + 1];
    }
    // The LM head fused with the cross-entropy (forward_loss): no (B, T, V) logits are held.
    const int64_t counted = targets.ne(-100).sum().item<int64_t>();
    if (counted > 0) {
      const double mean = model->forward_loss(inputs.to(device), targets.to(device)).loss.item<double>();
      nll += mean * static_cast<double>(counted);
      r.tokens += counted;
    }
    if (progress) progress(static_cast<int64_t>(e), static_cast<int64_t>(windows.size()));
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.loss = r.tokens > 0 ? nll / r.tokens : 0.0;
  r.ppl = std::exp(r.loss);
  return r;
}

}  // namespace libllm
