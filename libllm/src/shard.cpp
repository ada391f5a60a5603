#include "libllm/shard.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>

#include "libllm/compat.h"
#include "libllm/distributed.h"
#include "libllm/error.h"
#include "libllm/hf.h"

namespace libllm {

std::vector<ShardPiece> shard_pieces(const std::vector<int64_t>& numels, int rank, int world) {
  if (world < 1 || rank < 0 || rank >= world) throw Error("shard", "rank outside the world");
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  const int64_t chunk = (total + world - 1) / world;
  const int64_t begin = std::min(total, chunk * rank), end = std::min(total, chunk * (rank + 1));
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
                           Distributed& dist, int64_t gather_bytes)
    : dist_(dist), gather_bytes_(gather_bytes) {
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
  for (int64_t n : numels) total_ += n;
  chunk_ = (total_ + dist.world_size() - 1) / dist.world_size();
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
  share_weights();
}

void ShardedAdamW::share_weights() {
  torch::NoGradGuard no_grad;
  if (dist_.world_size() <= 1) return;
  const bool one_dtype = std::all_of(params_.begin(), params_.end(), [&](const torch::Tensor& p) {
    return p.scalar_type() == params_[0].scalar_type();
  });
  if (one_dtype) {
    // This rank's chunk of the flat parameters, then every rank's, gathered gather_bytes at a time and
    // written into the parameters as it arrives: the step holds no second copy of the weights
    // (a 7B model's would be 13.5 GB of bf16 on top of its weights and gradients).
    const int64_t world = dist_.world_size();
    auto mine = torch::zeros({chunk_}, params_[0].options());
    int64_t at = 0;
    for (size_t i = 0; i < mine_.size(); ++i) {
      mine.narrow(0, at, mine_[i].length).copy_(slices_[i]);
      at += mine_[i].length;
    }
    std::vector<int64_t> starts;  // each parameter's offset in the flat order
    int64_t start = 0;
    for (const auto& p : params_) starts.push_back(start), start += p.numel();
    // Copies `src` to the flat elements [begin, begin + src.numel()) of the parameters (the last
    // chunk's padding past total_ is dropped).
    auto write_flat = [&](int64_t begin, const torch::Tensor& src) {
      if (begin >= total_) return;
      size_t i = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
      for (int64_t done = 0; done < src.numel() && i < params_.size(); ++i) {
        const int64_t from = begin + done - starts[i], n = std::min(src.numel() - done, params_[i].numel() - from);
        params_[i].view({-1}).narrow(0, from, n).copy_(src.narrow(0, done, n));
        done += n;
      }
    };
    const int64_t per = std::max<int64_t>(1, gather_bytes_ / params_[0].element_size() / world);
    auto gathered = torch::empty({std::min(per, chunk_) * world}, params_[0].options());
    for (int64_t o = 0; o < chunk_; o += per) {
      const int64_t n = std::min(per, chunk_ - o);
      auto piece = gathered.narrow(0, 0, n * world);  // (world, n): rank r's elements o..o+n of its chunk
      dist_.all_gather(mine.narrow(0, o, n), piece).wait();
      for (int64_t r = 0; r < world; ++r) write_flat(r * chunk_ + o, piece.narrow(0, r * n, n));
    }
    return;
  }
  // Mixed dtypes: every element keeps its value on its owner and is zero elsewhere, so the sum
  // over ranks is the owner's value, exactly. Reduced in separate buffers, as above.
  std::vector<torch::Tensor> full;
  for (const auto& p : params_) full.push_back(torch::zeros({p.numel()}, p.options()));
  for (size_t i = 0; i < mine_.size(); ++i)
    full[mine_[i].param].narrow(0, mine_[i].offset, mine_[i].length).copy_(slices_[i]);
  dist_.sum_buckets(full);
  for (size_t i = 0; i < params_.size(); ++i) params_[i].view({-1}).copy_(full[i]);
}

void ShardedAdamW::zero_grad() {
  for (auto& p : params_) p.mutable_grad().reset();
  for (auto& s : slices_) s.mutable_grad().reset();
}

int64_t ShardedAdamW::state_bytes() const { return local_->state_bytes(); }

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

// ---------------------------------------------------------------- ZeRO-2 / ZeRO-3 / hybrid

namespace libllm {

struct FullySharded::Unit {
  std::vector<std::string> names;     // as model->named_parameters() names them
  std::vector<torch::Tensor> params;  // the module's parameter tensors
  std::vector<std::vector<int64_t>> shapes;
  std::vector<int64_t> offsets, numels;      // of each parameter in the flat vector
  int64_t numel = 0, padded = 0, chunk = 0;  // padded = chunk * group size
  torch::TensorOptions options;              // dtype and device of weights and gradients
  torch::Tensor shard;                       // (chunk) this rank's weights: stage 3 its own; stage 2 a view of flat
  torch::Tensor grad;                        // (chunk) this rank's gradient, summed over micro batches and ranks
                                             // (fp32 when fp32_grads, else the weights' dtype)
  torch::Tensor flat;                        // (padded) the whole weights: stage 2 always; stage 3 while gathered
  torch::Tensor flat_grad;                   // (padded) the gradient buffer of a backward (the params' grads view it;
                                             // its dtype is grad_options', as grad's and reduced's)
  torch::Tensor reduced;                     // (chunk) a reduce-scatter's output, added to grad when it completes
  Pending gathering, reducing;
  int64_t element = 0;    // bytes per element
  torch::TensorOptions grad_options;  // of the gradient buffers: fp32 for bf16/fp16 weights with fp32_grads
  int64_t grad_element = 0;           // their bytes per element
  bool trainable = true;  // false: frozen weights (a LoRA base): gathered and released, no gradient or AdamW state
};

FullySharded::~FullySharded() {
  if (model_ && model_->block_hooks() == this) model_->set_block_hooks(nullptr);
}

int FullySharded::shard_rank() const { return shard_->rank(); }
int FullySharded::shard_world() const { return shard_->world_size(); }
bool FullySharded::writes_shards() const { return !replicas_ || replicas_->rank() == 0; }

void FullySharded::track(int64_t delta) {
  held_ += delta;
  peak_ = std::max(peak_, held_);
}

FullySharded::FullySharded(Transformer model, int stage, int64_t group, const OptimConfig& cfg, Distributed& dist,
                           torch::Device device, bool init_deferred, bool fp32_grads)
    : model_(model), stage_(stage), dist_(dist), device_(device) {
  torch::NoGradGuard no_grad;
  if (stage != 2 && stage != 3) throw Error("train.sharding", "FullySharded is ZeRO stage 2 or 3");
  const int world = dist.world_size();
  if (group < 1 || group > world || world % group != 0)
    throw Error("train.shard_group", fmt::format("{} ranks per shard group do not divide the {} ranks", group, world),
                "use a divisor of WORLD_SIZE (the ranks of one node, usually)");
  shard_ = &dist;
  if (group < world) {  // hybrid: shard inside groups of consecutive ranks, replicate across them
    // Every rank first meets every other here: a rank that failed before (a resume check, building
    // the model) ends this collective at once, where making a group waits on the store for it.
    dist.barrier();
    const int g = dist.rank() / static_cast<int>(group), r = dist.rank() % static_cast<int>(group);
    shard_group_ =
        std::make_unique<Distributed>(dist.subgroup("shard-" + std::to_string(g), r, static_cast<int>(group)));
    replicas_ = std::make_unique<Distributed>(
        dist.subgroup("replica-" + std::to_string(r), g, world / static_cast<int>(group)));
    shard_ = shard_group_.get();
  }
  const int G = shard_->world_size(), rank = shard_->rank();

  const bool deferred = model->deferred();  // initialise from init_parameter, not from the parameters
  const bool init = deferred && init_deferred;
  // Units: every block, then the root (embedding, final norm, LM head); each split into its frozen
  // weights (a LoRA fine-tune's base) and its trainable ones, when it has both.
  const int64_t L = model->config().n_layers;
  std::vector<std::unique_ptr<Unit>> slots(static_cast<size_t>(2 * (L + 1)));  // (layer, trainable)
  std::vector<const void*> seen;
  for (auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor p = item.value();
    if (std::find(seen.begin(), seen.end(), p.unsafeGetTensorImpl()) != seen.end()) continue;
    seen.push_back(p.unsafeGetTensorImpl());
    int64_t l = L;
    const std::string prefix = "model.layers.";
    if (name.rfind(prefix, 0) == 0) l = std::stoll(name.substr(prefix.size()));
    auto& slot = slots.at(static_cast<size_t>(2 * l + (p.requires_grad() ? 1 : 0)));
    if (!slot) {
      slot = std::make_unique<Unit>();
      slot->trainable = p.requires_grad();
    }
    Unit& u = *slot;
    if (!u.params.empty() && p.scalar_type() != u.params[0].scalar_type())
      throw Error(name, "a sharded unit needs one dtype for all its " + std::string(u.trainable ? "trainable" : "frozen") +
                            " weights");
    u.names.push_back(name);
    u.params.push_back(p);
    u.shapes.push_back(p.sizes().vec());
    u.offsets.push_back(u.numel);
    u.numels.push_back(p.numel());
    u.numel += p.numel();
  }
  layers_.resize(static_cast<size_t>(L + 1));
  for (size_t i = 0; i < slots.size(); ++i)
    if (slots[i]) {
      layers_[i / 2].push_back(slots[i].get());
      units_.push_back(std::move(slots[i]));
    }

  std::vector<std::pair<std::string, torch::Tensor>> slices;
  std::vector<bool> decay;
  for (auto& up : units_) {
    Unit& u = *up;
    u.chunk = (u.numel + G - 1) / G;
    u.padded = u.chunk * G;
    u.options = u.params.at(0).options().device(device);
    u.element = u.params[0].element_size();
    const bool low = u.params[0].scalar_type() == torch::kBFloat16 || u.params[0].scalar_type() == torch::kHalf;
    u.grad_options = fp32_grads && low ? u.options.dtype(torch::kFloat32) : u.options;
    u.grad_element = fp32_grads && low ? 4 : u.element;
    // Elements [offset, offset + dst.numel()) of parameter i: its values, or (deferred) its initial
    // values, or zero (left for load_weights).
    auto fill = [&](size_t i, torch::Tensor dst, int64_t offset) {
      if (!is_unallocated(u.params[i])) dst.copy_(u.params[i].reshape({-1}).narrow(0, offset, dst.numel()));
      else if (init) model->init_parameter(u.names[i], dst, offset);
    };
    if (deferred && stage == 3) {  // compute this rank's elements only: the unit never exists whole here
      auto mine = torch::zeros({u.chunk}, u.params[0].options());
      for (size_t i = 0; i < u.params.size(); ++i) {
        const int64_t lo = std::max(u.offsets[i], rank * u.chunk);
        const int64_t hi = std::min(u.offsets[i] + u.numels[i], (rank + 1) * u.chunk);
        if (lo < hi) fill(i, mine.narrow(0, lo - rank * u.chunk, hi - lo), lo - u.offsets[i]);
      }
      u.shard = device.is_cpu() ? mine : mine.to(device);
      for (auto& p : u.params) p.set_data(torch::empty({0}, u.options));
      track(u.chunk * u.element);
    } else {
      auto flat = torch::zeros({u.padded}, u.params[0].options());  // where the weights are now (the CPU)
      for (size_t i = 0; i < u.params.size(); ++i) fill(i, flat.narrow(0, u.offsets[i], u.numels[i]), 0);
      if (stage == 2) {
        u.flat = flat.to(device);
        for (size_t i = 0; i < u.params.size(); ++i)
          u.params[i].set_data(u.flat.narrow(0, u.offsets[i], u.numels[i]).view(u.shapes[i]));
        u.shard = u.flat.narrow(0, rank * u.chunk, u.chunk);
        track(u.padded * u.element);
      } else {
        auto mine = flat.narrow(0, rank * u.chunk, u.chunk);
        u.shard = device.is_cpu() ? mine.clone() : mine.to(device);
        for (auto& p : u.params) p.set_data(torch::empty({0}, u.options));
        track(u.chunk * u.element);
      }
    }
    if (!u.trainable) continue;
    u.grad = torch::zeros({u.chunk}, u.grad_options);
    track(u.chunk * u.grad_element);
    // AdamW slices: this rank's part of each parameter, "<param>@<offset in the parameter>".
    for (size_t i = 0; i < u.params.size(); ++i) {
      const int64_t lo = std::max(u.offsets[i], rank * u.chunk);
      const int64_t hi = std::min(u.offsets[i] + u.numels[i], (rank + 1) * u.chunk);
      if (lo >= hi) continue;
      slices_.push_back(u.shard.narrow(0, lo - rank * u.chunk, hi - lo));
      slice_grads_.push_back(u.grad.narrow(0, lo - rank * u.chunk, hi - lo));
      slices.emplace_back(u.names[i] + "@" + std::to_string(lo - u.offsets[i]), slices_.back());
      decay.push_back(u.shapes[i].size() >= 2 &&
                      (cfg.decay_embeddings || u.names[i].find("embed_tokens") == std::string::npos));
    }
  }
  local_ = std::make_unique<AdamW>(std::move(slices), decay, cfg);
  track(local_->state_bytes());
  peak_ = held_;
  model_->set_block_hooks(this);
}

void FullySharded::gather(Unit& u, bool wait) {
  if (!u.flat.defined()) {  // stage 3: start gathering into a fresh buffer; the params view it
    u.flat = torch::empty({u.padded}, u.options);
    track(u.padded * u.element);
    u.gathering = shard_->all_gather(u.shard, u.flat);
    for (size_t i = 0; i < u.params.size(); ++i)
      u.params[i].set_data(u.flat.narrow(0, u.offsets[i], u.numels[i]).view(u.shapes[i]));
  }
  if (wait) u.gathering.wait();
}

void FullySharded::release(Unit& u) {
  if (stage_ != 3 || !u.flat.defined()) return;
  u.gathering.wait();
  for (auto& p : u.params) p.set_data(torch::empty({0}, u.options));
  u.flat = torch::Tensor();
  track(-u.padded * u.element);
}

void FullySharded::reduce(Unit& u) {
  torch::NoGradGuard no_grad;
  bool any = u.flat_grad.defined();
  for (auto& p : u.params) any = any || p.grad().defined();
  if (!any) return;
  // At most two reductions in flight (each holds a unit's whole gradient): finish older ones first.
  while (inflight_.size() >= 2) finish(*inflight_.front());
  if (!u.flat_grad.defined()) {
    u.flat_grad = torch::zeros({u.padded}, u.grad_options);
    track(u.padded * u.grad_element);
  }
  for (size_t i = 0; i < u.params.size(); ++i) {
    torch::Tensor& g = u.params[i].mutable_grad();
    if (!g.defined()) continue;
    auto dst = u.flat_grad.narrow(0, u.offsets[i], u.numels[i]);
    if (g.data_ptr() != dst.data_ptr()) dst.copy_(g.reshape({-1}));  // a gradient autograd made itself
    g.reset();
  }
  u.reduced = torch::empty({u.chunk}, u.grad_options);
  track(u.chunk * u.grad_element);
  u.reducing = shard_->reduce_scatter(u.flat_grad, u.reduced);  // keeps the buffer until done
  inflight_.push_back(&u);
  u.flat_grad = torch::Tensor();
}

void FullySharded::finish(Unit& u) {
  torch::NoGradGuard no_grad;
  u.reducing.wait();
  // NCCL's wait only orders the streams: block the host too, or the caching allocator could not
  // reuse the reduced buffer yet while backward keeps allocating (the two-in-flight cap).
  if (device_.is_cuda()) compat::cuda_synchronize();
  inflight_.erase(std::find(inflight_.begin(), inflight_.end(), &u));
  u.grad.add_(u.reduced);
  u.reduced = torch::Tensor();
  track(-(u.padded + u.chunk) * u.grad_element);
}

void FullySharded::wait_reductions() {
  while (!inflight_.empty()) finish(*inflight_.front());
}

void FullySharded::grad_buffer(Unit& u) {
  if (u.flat_grad.defined()) return;
  // (fp32 with fp32_grads: autograd adds each bf16 gradient into these views in fp32)
  u.flat_grad = torch::zeros({u.padded}, u.grad_options);
  track(u.padded * u.grad_element);
  for (size_t i = 0; i < u.params.size(); ++i)
    u.params[i].mutable_grad() = u.flat_grad.narrow(0, u.offsets[i], u.numels[i]).view(u.shapes[i]);
}

void FullySharded::begin_forward() {
  if (stage_ != 3) return;
  const bool training = torch::GradMode::is_enabled() && model_->is_training();
  for (Unit* u : layers_.back()) {
    gather(*u, true);
    if (training && u->trainable) grad_buffer(*u);
  }
}

void FullySharded::before_block(int64_t layer, bool backward) {
  const auto blocks = static_cast<int64_t>(layers_.size()) - 1;
  for (Unit* u : layers_.at(static_cast<size_t>(layer))) {
    if (stage_ == 3) gather(*u, true);
    if (backward && u->trainable) grad_buffer(*u);
  }
  const int64_t next = backward ? layer - 1 : layer + 1;  // prefetch: overlaps this block's compute
  if (stage_ == 3 && next >= 0 && next < blocks)
    for (Unit* u : layers_[static_cast<size_t>(next)]) gather(*u, false);
}

void FullySharded::after_block(int64_t layer, bool backward) {
  for (Unit* u : layers_.at(static_cast<size_t>(layer))) {
    if (backward && u->trainable) reduce(*u);
    release(*u);
  }
}

void FullySharded::reduce_gradients() {
  // Gradients autograd made itself (no flat buffer) were all alive at the end of backward.
  int64_t own = 0;
  for (auto& up : units_)
    for (size_t i = 0; i < up->params.size(); ++i) {
      const auto& g = up->params[i].grad();
      if (g.defined() && !up->flat_grad.defined()) own += g.numel() * g.element_size();
    }
  peak_ = std::max(peak_, held_ + own);
  for (auto& up : units_)
    if (up->trainable) reduce(*up);
  wait_reductions();
  for (Unit* u : layers_.back()) release(*u);  // stage 3: the root is gathered again by the next forward
}

double FullySharded::clip_grad_norm(double max_norm) {
  torch::NoGradGuard no_grad;
  wait_reductions();
  std::vector<torch::Tensor> grads;
  for (auto& up : units_)
    if (up->trainable) grads.push_back(up->grad);
  if (replicas_) replicas_->sum_buckets(grads);  // hybrid: the same shard's sum over the other groups
  for (auto& g : grads) g.div_(dist_.world_size());
  auto norms = torch::stack(at::_foreach_norm(grads)).to(torch::kFloat64);
  auto sq = norms.square().sum().reshape({1});
  shard_->sum(sq);
  const double total = std::sqrt(sq.item<double>());
  if (max_norm > 0 && std::isfinite(total) && total > max_norm) at::_foreach_mul_(grads, max_norm / total);
  return total;
}

void FullySharded::step(double lr) {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < slices_.size(); ++i) slices_[i].mutable_grad() = slice_grads_[i];
  local_->step(lr);
  for (auto& s : slices_) s.mutable_grad().reset();
  share_weights();
}

void FullySharded::share_weights() {
  torch::NoGradGuard no_grad;
  if (stage_ == 2) {  // every rank gets the others' updated elements
    std::vector<Pending> pending;
    for (auto& up : units_)
      if (up->trainable) pending.push_back(shard_->all_gather(up->shard.clone(), up->flat));
    for (auto& p : pending) p.wait();
  } else {
    for (auto& up : units_) release(*up);  // stale now
  }
}

void FullySharded::zero_grad() {
  torch::NoGradGuard no_grad;
  wait_reductions();
  for (auto& up : units_) {
    if (!up->trainable) continue;
    up->grad.zero_();
    for (auto& p : up->params) p.mutable_grad().reset();
    if (up->flat_grad.defined()) {
      track(-up->padded * up->grad_element);
      up->flat_grad = torch::Tensor();
    }
  }
}

WeightStream FullySharded::weight_stream(bool trainable_only) {
  WeightStream out;
  for (auto& up : units_)
    if (!trainable_only || up->trainable)
      for (size_t i = 0; i < up->params.size(); ++i)
        out.specs.push_back({up->names[i], up->params[i].scalar_type(), up->shapes[i]});
  out.produce = [this, trainable_only](const WeightSink& sink) {
    torch::NoGradGuard no_grad;
    for (auto& up : units_) {
      Unit& u = *up;
      if (trainable_only && !u.trainable) continue;
      torch::Tensor full = u.flat;
      if (stage_ == 3) {  // a fresh gather: a gathered copy may be stale (between step and release)
        full = torch::empty({u.padded}, u.options);
        shard_->all_gather(u.shard, full).wait();
      }
      if (!dist_.is_main()) continue;
      for (size_t i = 0; i < u.params.size(); ++i)
        sink(u.names[i], full.narrow(0, u.offsets[i], u.numels[i]).view(u.shapes[i]));
    }
  };
  return out;
}

void FullySharded::load_weights(const std::string& dir, Which which) {
  Pretrained folder;  // a plain weights folder: read as stored
  folder.dir = dir;
  load_weights(folder, which);
}

void FullySharded::load_weights(const Pretrained& base, Which which) {
  // Every rank fails together: an error one rank alone meets (a damaged file that only its node's
  // first rank checks) would leave the others waiting in their next collective.
  if (dist_.run_agreed([&] { read_weights(base, which); }, base.dir) > 0)
    throw Error(base.dir, "another rank could not read the weights (its error names the file)",
                "see that rank's error");
}

void FullySharded::read_weights(const Pretrained& base, Which which) {
  torch::NoGradGuard no_grad;
  std::vector<std::pair<std::string, std::vector<int64_t>>> params;
  std::map<std::string, std::pair<Unit*, size_t>> where;
  for (auto& up : units_)
    for (size_t i = 0; i < up->params.size() && (which == Which::all || up->trainable == (which == Which::trainable)); ++i) {
      params.emplace_back(up->names[i], up->shapes[i]);
      where[up->names[i]] = {up.get(), i};
    }
  const int64_t rank = shard_->rank();
  // Stores this rank's elements of parameter `name` from `src`, which holds its flattened elements
  // [first, first + src.numel()).
  const auto store = [&](const std::string& name, const torch::Tensor& src, int64_t first = 0) {
    auto [u, i] = where.at(name);
    auto flat = src.reshape({-1});
    if (stage_ == 2) {
      u->flat.narrow(0, u->offsets[i], flat.numel()).copy_(flat);
      return;
    }
    const int64_t lo = std::max(u->offsets[i], rank * u->chunk);
    const int64_t hi = std::min(u->offsets[i] + u->numels[i], (rank + 1) * u->chunk);
    if (lo < hi)
      u->shard.narrow(0, lo - rank * u->chunk, hi - lo).copy_(flat.narrow(0, lo - u->offsets[i] - first, hi - lo));
  };
  // Each node's first rank checks the files' checksums (a node may read a copy of its own); under
  // ZeRO-3 the others read their slices only (130 GB / N of a 65B model). ZeRO-2 reads them whole.
  const bool verify = stage_ == 2 || dist_.local_rank() == 0;
  if (!base.has_lora && base.base.empty()) {
    libllm::load_weights(base.dir, params, !model_->lm_head, store, verify);
  } else {  // adapters to merge: the plain model's weights, merged in fp32 (copy_ rounds to the unit's dtype)
    // Stage 3: only the rows holding this rank's elements are read and merged. Every rank checks
    // every weight's shape and presence (a rank that failed alone would leave the others waiting).
    std::map<std::string, RowRange> ranges;  // the weights of the base, and this rank's rows of each
    const auto rows = [&](const std::string& name, const std::vector<int64_t>& shape) -> RowRange {
      auto it = where.find(name);
      if (it == where.end()) return {0, 0};  // (Which::frozen: a LoRA run's base; its adapters are new)
      const auto [u, i] = it->second;
      if (shape != u->shapes[i])
        throw Error(base.dir + ": tensor '" + name + "'", "does not have the shape this model gives it",
                    "the base does not match the model");
      RowRange& r = ranges[name];
      const int64_t lo = std::max(u->offsets[i], rank * u->chunk) - u->offsets[i];
      const int64_t hi = std::min(u->offsets[i] + u->numels[i], (rank + 1) * u->chunk) - u->offsets[i];
      if (stage_ == 2 || shape.empty())
        r = {0, shape.empty() ? 1 : shape[0]};
      else if (lo >= hi)
        r = {0, 0};
      else {
        const int64_t inner = u->numels[i] / shape[0];  // elements per row (shape[0] > 0: lo < hi)
        r = {lo / inner, (hi + inner - 1) / inner};
      }
      return r;
    };
    for_each_merged_weight(
        base, torch::kFloat32,
        [&](const std::string& name, const torch::Tensor& w) {
          const int64_t first = ranges.at(name).first;
          store(name, w, w.dim() > 0 && w.size(0) > 0 ? first * (w.numel() / w.size(0)) : 0);
        },
        rows, verify);
    for (const auto& [name, shape] : params)
      if (!ranges.count(name))
        throw Error(base.dir + ": tensor '" + name + "'", "is missing from the base",
                    "the base does not match the model");
  }
  for (auto& up : units_) release(*up);
  // The optimizer was built over the shards before they held these weights: its fp32 masters of
  // bf16 slices start from them (else the first step would write the build-time values back).
  if (local_) local_->sync_masters();
}

}  // namespace libllm
