#include "libllm/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <fmt/core.h>

#include <algorithm>
#include <cmath>

#include "libllm/error.h"

namespace libllm {
namespace {

int64_t choose(const torch::Tensor& logits_in, const GenerateOptions& opts, at::Generator& gen) {
  auto logits = logits_in.to(torch::kCPU, torch::kFloat32);  // (V)
  if (!torch::isfinite(logits).all().item<bool>())           // (argmax would pick a NaN, multinomial fail)
    throw Error("generation", "the model's next-token logits are not finite (NaN or infinite)",
                "its weights hold NaN or infinite values, or overflow in this dtype (try fp32)");
  if (opts.temperature <= 0) return logits.argmax().item<int64_t>();
  // (less the maximum first: a tiny temperature makes logits / T overflow to inf and NaN)
  auto probs = torch::softmax((logits - logits.max()) / opts.temperature, -1);
  auto [sorted, idx] = probs.sort(-1, /*descending=*/true);
  auto keep = torch::ones_like(sorted, torch::kBool);
  if (opts.top_k > 0 && opts.top_k < sorted.size(0)) keep.slice(0, opts.top_k).fill_(false);
  if (opts.top_p < 1.0) {  // over the top k renormalised, as transformers' and vLLM's warpers do
    const auto kept = sorted * keep / (sorted * keep).sum();
    keep &= (kept.cumsum(0) - kept) < opts.top_p;  // always keeps the top token
  }
  sorted = sorted * keep;
  return idx[torch::multinomial(sorted, 1, false, gen).item<int64_t>()].item<int64_t>();
}

torch::Tensor as_batch(const std::vector<int64_t>& ids, size_t from, torch::Device device) {
  return torch::tensor(std::vector<int64_t>(ids.begin() + static_cast<std::ptrdiff_t>(from), ids.end()), torch::kInt64)
      .unsqueeze(0)
      .to(device);  // (1, T)
}

}  // namespace

std::vector<int64_t> generate(Transformer& model, const std::vector<int64_t>& prompt, const GenerateOptions& opts) {
  if (!(opts.temperature >= 0) || std::isinf(opts.temperature))
    throw Error("GenerateOptions.temperature", fmt::format("must be finite and >= 0, got {}", opts.temperature));
  if (!(opts.top_p > 0 && opts.top_p <= 1))
    throw Error("GenerateOptions.top_p", fmt::format("must be in (0, 1], got {}", opts.top_p));
  if (opts.top_k < 0) throw Error("GenerateOptions.top_k", fmt::format("must be >= 0 (0 = all), got {}", opts.top_k));
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(opts.seed);
  const auto device = model->parameters().front().device();
  const int64_t window = model->config().max_seq_len;
  std::vector<int64_t> seq = prompt, out;
  KVCache cache;
  // The model reads seq from `start`. When that is more than its window, the start moves to the
  // last half window (llama.cpp's context shift; the cache is then rebuilt from there): the same
  // context with the cache and without it, whatever max_new_tokens is.
  size_t start = 0;
  // The cache holds what this call needs, at most the model's window (Mistral's 32k positions
  // would be 4 GiB of bf16 cache for a short answer).
  if (opts.use_cache)
    cache = model->new_cache(1, opts.max_new_tokens > window - static_cast<int64_t>(prompt.size())
                                    ? window  // (compared so, a huge max_new_tokens does not overflow)
                                    : static_cast<int64_t>(prompt.size()) + opts.max_new_tokens);
  for (int64_t i = 0; i < opts.max_new_tokens && !seq.empty(); ++i) {
    const int64_t n = static_cast<int64_t>(seq.size());
    if (n - static_cast<int64_t>(start) > window) {
      start = static_cast<size_t>(n - std::max<int64_t>(1, window / 2));
      cache.length = 0;
    }
    torch::Tensor logits;
    if (opts.use_cache) {
      // Only the last position's logits: a long prompt's prefill holds no (T, V) logits.
      logits = model
                   ->forward_cached(as_batch(seq, start + static_cast<size_t>(cache.length), device), cache,
                                    /*last_only=*/true)
                   .logits;
    } else {
      auto h = model->hidden(as_batch(seq, start, device), 0, nullptr);  // (1, T, D)
      logits = model->project(h.narrow(1, h.size(1) - 1, 1));            // (1, 1, V)
    }
    const int64_t next = choose(logits[0][-1], opts, gen);
    seq.push_back(next);
    out.push_back(next);
    if (opts.on_token && !opts.on_token(next)) break;
    if (next == opts.eos_id || std::find(opts.stop_ids.begin(), opts.stop_ids.end(), next) != opts.stop_ids.end())
      break;
  }
  if (was_training) model->train();
  return out;
}

std::string generate_text(Transformer& model, const Tokenizer& tok, const std::string& prompt, GenerateOptions opts) {
  std::vector<int64_t> ids;
  if (tok.bos_id() >= 0) ids.push_back(tok.bos_id());
  auto p = tok.encode(prompt);
  ids.insert(ids.end(), p.begin(), p.end());
  opts.eos_id = tok.eos_id();
  auto out = generate(model, ids, opts);
  if (!out.empty() && out.back() == tok.eos_id()) out.pop_back();
  std::vector<int64_t> all(p);
  all.insert(all.end(), out.begin(), out.end());
  return tok.decode(all);
}

TextStream::TextStream(const Tokenizer& tok, std::vector<int64_t> context) : tok_(tok), ids_(std::move(context)) {
  text_ = ids_.empty() ? "" : tok_.decode(ids_);
  context_chars_ = text_.size();
}

std::string TextStream::finish() {
  const std::string full = tok_.decode(ids_);
  std::string rest =
      full.size() > text_.size() && full.compare(0, text_.size(), text_) == 0 ? full.substr(text_.size()) : "";
  text_ = full;
  return rest;
}

std::string TextStream::push(int64_t id) {
  ids_.push_back(id);
  std::string full = tok_.decode(ids_);
  // A partial UTF-8 character decodes to U+FFFD until its last byte arrives: hold it back.
  size_t keep = full.size();
  if (keep >= 3 && full.compare(keep - 3, 3, "\xEF\xBF\xBD") == 0) return "";
  if (full.size() < text_.size() || full.compare(0, text_.size(), text_) != 0) {
    // The decoded prefix changed (rare; e.g. a leading space dropped): emit nothing old again.
    text_ = full;
    return "";
  }
  std::string delta = full.substr(text_.size());
  text_ = full;
  return delta;
}

}  // namespace libllm
