#include "libllm/generate.h"

#include <ATen/CPUGeneratorImpl.h>

namespace libllm {

std::vector<int64_t> generate(Transformer& model, const std::vector<int64_t>& prompt, const GenerateOptions& opts) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(opts.seed);
  const auto device = model->parameters().front().device();
  const int64_t window = model->config().max_seq_len;
  std::vector<int64_t> seq = prompt, out;
  for (int64_t i = 0; i < opts.max_new_tokens; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(seq.size()) - window);
    auto ctx = torch::tensor(std::vector<int64_t>(seq.begin() + start, seq.end()), torch::kInt64).unsqueeze(0);
    auto logits = model->forward(ctx.to(device)).logits[0][-1].to(torch::kCPU, torch::kFloat32);  // (V)
    int64_t next;
    if (opts.temperature <= 0) {
      next = logits.argmax().item<int64_t>();
    } else {
      auto probs = torch::softmax(logits / opts.temperature, -1);
      auto [sorted, idx] = probs.sort(-1, /*descending=*/true);
      auto keep = torch::ones_like(sorted, torch::kBool);
      if (opts.top_k > 0 && opts.top_k < sorted.size(0)) keep.slice(0, opts.top_k).fill_(false);
      if (opts.top_p < 1.0) keep &= (sorted.cumsum(0) - sorted) < opts.top_p;  // always keeps the top token
      sorted = sorted * keep;
      next = idx[torch::multinomial(sorted, 1, false, gen).item<int64_t>()].item<int64_t>();
    }
    seq.push_back(next);
    out.push_back(next);
    if (next == opts.eos_id) break;
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

}  // namespace libllm
