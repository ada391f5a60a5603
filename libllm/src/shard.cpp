#include "libllm/shard.h"

#include "libllm/distributed.h"
#include "libllm/error.h"

namespace libllm {

std::vector<ShardPiece> shard_pieces(const std::vector<int64_t>& numels, int rank, int world) {
  if (world < 1 || rank < 0 || rank >= world) throw Error("shard", "rank outside the world");
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  const int64_t begin = total * rank / world, end = total * (rank + 1) / world;
  std::vector<ShardPiece> out;
  int64_t start = 0;  // first element of parameter i in the concatenation
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t lo = std::max(begin, start), hi = std::min(end, start + numels[i]);
    if (lo < hi) out.push_back({i, lo - start, hi - lo});
    start += numels[i];
  }
  return out;
}

ShardedAdamW::ShardedAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named, const OptimConfig& cfg,
                           Distributed& dist)
    : dist_(dist) {
  torch::NoGradGuard no_grad;
  std::vector<std::string> names;
  std::vector<bool> embedding;
  for (const auto& [name, p] : named) {
    const bool embed = name.find("embed_tokens") != std::string::npos;
    auto same = std::find_if(params_.begin(), params_.end(), [&](const torch::Tensor& t) { return t.is_same(p); });
    if (same != params_.end()) {
      if (embed) embedding[static_cast<size_t>(same - params_.begin())] = true;
      continue;
    }
    if (!p.is_contiguous()) throw Error(name, "a sharded optimizer needs contiguous parameters");
    params_.push_back(p);
    names.push_back(name);
    embedding.push_back(embed);
  }
  std::vector<int64_t> numels;
  for (const auto& p : params_) numels.push_back(p.numel());
  mine_ = shard_pieces(numels, dist.rank(), dist.world_size());
  std::vector<std::pair<std::string, torch::Tensor>> slices;
  std::vector<bool> decay;
  for (const ShardPiece& pc : mine_) {
    const torch::Tensor& p = params_[pc.param];
    slices_.push_back(p.detach().view({-1}).narrow(0, pc.offset, pc.length));  // shares the parameter's storage
    slices.emplace_back(names[pc.param] + "@" + std::to_string(pc.offset), slices_.back());
    decay.push_back(p.dim() >= 2 && (cfg.decay_embeddings || !embedding[pc.param]));
    low_precision_ = low_precision_ || p.scalar_type() == torch::kBFloat16 || p.scalar_type() == torch::kHalf;
  }
  local_ = std::make_unique<AdamW>(std::move(slices), decay, cfg);
}

void ShardedAdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < mine_.size(); ++i) {
    const torch::Tensor& g = params_[mine_[i].param].grad();
    if (!g.defined()) continue;
    slices_[i].mutable_grad() = g.reshape({-1}).narrow(0, mine_[i].offset, mine_[i].length);
  }
  local_->step(lr);
  if (dist_.world_size() <= 1) return;
  // Every element keeps its value on its owner and is zero elsewhere: the sum over ranks is the
  // owner's value, exactly. Reduced in separate buffers: a failed exchange leaves the weights.
  std::vector<torch::Tensor> full;
  for (const auto& p : params_) full.push_back(torch::zeros({p.numel()}, p.options()));
  for (size_t i = 0; i < mine_.size(); ++i) full[mine_[i].param].narrow(0, mine_[i].offset, mine_[i].length).copy_(slices_[i]);
  dist_.sum_buckets(full);
  for (size_t i = 0; i < params_.size(); ++i) params_[i].view({-1}).copy_(full[i]);
}

void ShardedAdamW::zero_grad() {
  for (auto& p : params_) p.mutable_grad().reset();
  for (auto& s : slices_) s.mutable_grad().reset();
}

int64_t ShardedAdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const auto& [name, t] : local_->state())
    if (t.dim() > 0) bytes += t.numel() * t.element_size();
  return bytes;
}

int64_t ShardedAdamW::unsharded_state_bytes() const {
  int64_t bytes = 0;
  for (const auto& p : params_) {
    const bool lp = p.scalar_type() == torch::kBFloat16 || p.scalar_type() == torch::kHalf;
    const int64_t moment = lp ? 4 : p.element_size();
    bytes += p.numel() * (2 * moment + (lp ? 4 : 0));
  }
  return bytes;
}

}  // namespace libllm
