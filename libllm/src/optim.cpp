#include "libllm/optim.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "libllm/compat.h"
#include "libllm/config.h"
#include "libllm/error.h"

namespace libllm {
namespace {

void check_below_one(double v, const std::string& where) {
  if (v >= 1.0) throw Error(where, "expected a number in [0, 1), got " + std::to_string(v));
}

std::string shape_text(torch::IntArrayRef sizes) {
  std::ostringstream os;
  os << sizes;
  return os.str();
}

bool is_low_precision(torch::ScalarType t) { return t == torch::kBFloat16 || t == torch::kHalf; }

// The state entry `name`, checked to have `sizes`.
const torch::Tensor& state_entry(const std::map<std::string, torch::Tensor>& state, const std::string& name,
                                 torch::IntArrayRef sizes) {
  const auto it = state.find(name);
  if (it == state.end() || !it->second.defined())
    throw Error(name, "missing from the optimizer state",
                "the checkpoint was saved for other parameters or another optimizer");
  if (it->second.sizes() != sizes)
    throw Error(name,
                "optimizer state has shape " + shape_text(it->second.sizes()) + ", expected " + shape_text(sizes));
  return it->second;
}

int64_t state_count(const std::map<std::string, torch::Tensor>& state, const std::string& name) {
  const torch::Tensor& t = state_entry(state, name, {});
  const int64_t n = t.scalar_type() == torch::kInt64 ? t.item<int64_t>() : -1;
  if (n < 0) throw Error(name, "is not a count of steps (an int64 >= 0)", "the optimizer state is corrupt");
  return n;
}

torch::Tensor count_tensor(int64_t n) { return torch::scalar_tensor(n, torch::kInt64); }

}  // namespace

void OptimConfig::fields(Fields& f) {
  f.add("lr", lr).min(0);
  f.add("beta1", beta1).min(0).max(1);
  f.add("beta2", beta2).min(0).max(1);
  f.add("eps", eps).min(0);
  f.add("weight_decay", weight_decay).min(0);
  f.add("decay_embeddings", decay_embeddings);
  f.add("grad_clip", grad_clip).min(0);
  f.validate_with([this](const std::string& where) {
    check_below_one(beta1, where + ".beta1");
    check_below_one(beta2, where + ".beta2");
  });
}

void ScheduleConfig::fields(Fields& f) {
  f.add("kind", kind).one_of({"cosine", "linear", "constant", "wsd"});
  f.add("warmup_steps", warmup_steps).min(0);
  f.add("min_lr_ratio", min_lr_ratio).min(0).max(1);
  f.add("decay_fraction", decay_fraction).min(0).max(1);
}

// ---- learning-rate schedule ----

namespace {

constexpr double kPi = 3.14159265358979323846;

// wsd after warmup: 1 until the last D steps, then linear to m, reaching it at step T - 1. A
// decay window that would begin inside the warmup begins where it ends (no drop from the peak).
double wsd_factor(const ScheduleConfig& s, int64_t step, int64_t total) {
  const auto planned = static_cast<int64_t>(std::llround(s.decay_fraction * static_cast<double>(total)));
  if (planned <= 0) return 1.0;  // (D = 0 never decays)
  const int64_t start = std::max(total - planned, std::min(s.warmup_steps, total));
  if (step < start) return 1.0;
  if (start >= total) return s.min_lr_ratio;  // (a warmup past the last step: at m after it, as cosine)
  const int64_t decay_steps = total - start;
  const double q = std::min(1.0, static_cast<double>(step - start + 1) / static_cast<double>(decay_steps));
  return 1.0 - (1.0 - s.min_lr_ratio) * q;
}

}  // namespace

double lr_factor(const ScheduleConfig& s, int64_t step, int64_t total_steps) {
  if (step < 0 || total_steps < 1)
    throw Error("schedule", "lr_factor needs step >= 0 and total_steps >= 1, got step " + std::to_string(step) +
                                " of " + std::to_string(total_steps));
  const int64_t W = s.warmup_steps;
  if (step < W) return static_cast<double>(step + 1) / static_cast<double>(W);
  const int64_t span = total_steps - 1 - W;
  const double p = span <= 0 ? 1.0 : std::min(1.0, static_cast<double>(step - W) / static_cast<double>(span));
  const double m = s.min_lr_ratio;
  if (s.kind == "cosine") return m + (1.0 - m) * 0.5 * (1.0 + std::cos(kPi * p));
  if (s.kind == "linear") return m + (1.0 - m) * (1.0 - p);
  if (s.kind == "constant") return 1.0;
  if (s.kind == "wsd") return wsd_factor(s, step, total_steps);
  throw Error("schedule.kind", "unknown schedule '" + s.kind + "'", "one of: cosine, linear, constant, wsd");
}

// ---- AdamW ----

// Parameters updated together: same decay flag, device and compute dtype.
struct AdamW::Group {
  bool decay;
  torch::Device device;
  torch::ScalarType dtype;
  std::vector<Slot*> slots;
  std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs;  // compute dtype (master or param)
  int64_t bytes = 0;  // of the compute-dtype targets
};

// bf16/fp16 gradients are converted to fp32 for the update in chunks of about this many bytes,
// so the step needs 256 MiB of scratch rather than 4 bytes per parameter.
constexpr int64_t kChunkBytes = 256LL << 20;

// Checks one parameter and appends its slot (fresh moments, an fp32 master for bf16/fp16).
void AdamW::add_slot(const std::string& name, const torch::Tensor& p, bool decay) {
  if (!p.defined()) throw Error(name, "parameter tensor is undefined");
  if (!p.is_floating_point())
    throw Error(name, std::string("AdamW needs a floating-point parameter, got ") + c10::toString(p.scalar_type()));
  for (const Slot& s : slots_)
    if (s.name == name) throw Error(name, "parameter name listed twice");
  Slot s;
  s.name = name;
  s.param = p;
  if (is_low_precision(p.scalar_type())) s.master = p.detach().to(torch::kFloat32, false, true);
  s.exp_avg = torch::zeros_like(s.target(), torch::MemoryFormat::Contiguous);
  s.exp_avg_sq = torch::zeros_like(s.target(), torch::MemoryFormat::Contiguous);
  s.decay = decay;
  slots_.push_back(std::move(s));
}

void AdamW::sync_masters() {
  torch::NoGradGuard no_grad;
  for (Slot& s : slots_)
    if (s.master.defined()) s.master.copy_(s.param);
}

AdamW::AdamW(std::vector<std::pair<std::string, torch::Tensor>> named_params, const OptimConfig& cfg) : cfg_(cfg) {
  torch::NoGradGuard no_grad;
  std::vector<bool> embedding;  // per slot: some name of it contains "embed_tokens"
  for (auto& [name, p] : named_params) {
    const bool embed = name.find("embed_tokens") != std::string::npos;
    const auto same = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return p.defined() && s.param.is_same(p); });
    if (same != slots_.end()) {  // a tied tensor: one slot, under its first name
      if (embed) embedding[same - slots_.begin()] = true;
      continue;
    }
    add_slot(name, p, false);
    embedding.push_back(embed);
  }
  for (size_t i = 0; i < slots_.size(); ++i)
    slots_[i].decay = slots_[i].param.dim() >= 2 && (cfg_.decay_embeddings || !embedding[i]);
}

AdamW::AdamW(std::vector<std::pair<std::string, torch::Tensor>> named_params, const std::vector<bool>& decay,
             const OptimConfig& cfg)
    : cfg_(cfg) {
  torch::NoGradGuard no_grad;
  if (decay.size() != named_params.size()) throw Error("AdamW", "one decay flag per parameter expected");
  for (size_t i = 0; i < named_params.size(); ++i) add_slot(named_params[i].first, named_params[i].second, decay[i]);
}


void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  std::vector<Group> groups;
  for (Slot& s : slots_) {
    const torch::Tensor& grad = s.param.grad();
    if (!grad.defined()) continue;
    if (grad.is_sparse()) throw Error(s.name, "AdamW does not support sparse gradients");
    const torch::Tensor& t = s.target();
    // The newest group with this key, unless its converted gradients would pass kChunkBytes.
    auto g = std::find_if(groups.rbegin(), groups.rend(), [&](const Group& x) {
      return x.decay == s.decay && x.device == t.device() && x.dtype == t.scalar_type();
    });
    const int64_t bytes = t.numel() * t.element_size();
    if (g == groups.rend() || (g->bytes > 0 && g->bytes + bytes > kChunkBytes && grad.scalar_type() != t.scalar_type())) {
      groups.push_back(Group{s.decay, t.device(), t.scalar_type(), {}, {}, {}, {}, {}, 0});
      g = groups.rbegin();
    }
    g->slots.push_back(&s);
    g->params.push_back(t);
    g->grads.push_back(grad);  // converted to the compute dtype in update_group, a chunk at a time
    g->exp_avgs.push_back(s.exp_avg);
    g->exp_avg_sqs.push_back(s.exp_avg_sq);
    g->bytes += bytes;
  }
  for (Group& g : groups) {
    update_group(g, lr);
    g.grads.clear();  // frees this chunk's converted gradients
  }
  ++steps_;
}

void AdamW::update_group(Group& g, double lr) {
  for (auto& grad : g.grads) grad = grad.to(g.dtype);  // no copy when the dtypes agree
  for (Slot* s : g.slots) ++s->step;
  if (!fused_update(g, lr)) foreach_update(g, lr);
  for (Slot* s : g.slots)
    if (s->master.defined()) s->param.copy_(s->master);  // round the fp32 master into bf16/fp16
}

// torch.optim.AdamW (foreach=False) as _foreach_* kernels; per-parameter bias corrections as scalar lists.
void AdamW::foreach_update(Group& g, double lr) {
  const double b1 = cfg_.beta1, b2 = cfg_.beta2;
  const double wd = g.decay ? cfg_.weight_decay : 0.0;
  if (wd != 0.0) at::_foreach_mul_(g.params, 1.0 - lr * wd);
  at::_foreach_mul_(g.exp_avgs, b1);
  at::_foreach_add_(g.exp_avgs, g.grads, 1.0 - b1);
  at::_foreach_mul_(g.exp_avg_sqs, b2);
  at::_foreach_addcmul_(g.exp_avg_sqs, g.grads, g.grads, 1.0 - b2);
  std::vector<at::Scalar> neg_step_size, bc2_sqrt;
  for (const Slot* s : g.slots) {
    const auto t = static_cast<double>(s->step);
    neg_step_size.emplace_back(-lr / (1.0 - std::pow(b1, t)));
    bc2_sqrt.emplace_back(std::sqrt(1.0 - std::pow(b2, t)));
  }
  std::vector<torch::Tensor> denom = at::_foreach_sqrt(g.exp_avg_sqs);
  at::_foreach_div_(denom, bc2_sqrt);
  at::_foreach_add_(denom, cfg_.eps);
  at::_foreach_addcdiv_(g.params, g.exp_avgs, denom, neg_step_size);
}

// CUDA with LibTorch >= 2.0: the fused multi-tensor AdamW kernel (the same math in one launch).
// It reads, but does not advance, float32 step tensors on the device: we keep one per parameter
// (created from the host count t, which update_group has already advanced) and advance it here.
// Returns false (nothing done) where the kernel is unavailable.
bool AdamW::fused_update(Group& g, double lr) {
#if LIBLLM_TORCH_AT_LEAST(2, 0)
  if (!g.device.is_cuda()) return false;
  std::vector<torch::Tensor> steps;
  for (Slot* s : g.slots) {
    if (!s->device_step.defined())
      s->device_step = torch::full({}, static_cast<double>(s->step - 1),
                                   torch::TensorOptions().dtype(torch::kFloat32).device(g.device));
    steps.push_back(s->device_step);
  }
  at::_foreach_add_(steps, 1.0);
  const double wd = g.decay ? cfg_.weight_decay : 0.0;
  at::_fused_adamw_(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, /*max_exp_avg_sqs=*/at::TensorList(), steps, lr,
                    cfg_.beta1, cfg_.beta2, wd, cfg_.eps, /*amsgrad=*/false, /*maximize=*/false);
  return true;
#else
  (void)g;
  (void)lr;
  return false;
#endif
}

void AdamW::zero_grad() {
  for (Slot& s : slots_) s.param.mutable_grad().reset();
}

std::vector<std::pair<std::string, torch::Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const Slot& s : slots_) {
    out.emplace_back(s.name + ".exp_avg", s.exp_avg);
    out.emplace_back(s.name + ".exp_avg_sq", s.exp_avg_sq);
    if (s.master.defined()) out.emplace_back(s.name + ".master", s.master);
    out.emplace_back(s.name + ".step", count_tensor(s.step));
  }
  out.emplace_back("step", count_tensor(steps_));
  return out;
}

// Every entry is checked before anything is copied, so a bad state leaves the optimizer as it was.
// A master, when present, is also rounded into its parameter (the master is the authoritative value).
void AdamW::load_state(const std::map<std::string, torch::Tensor>& state) {
  torch::NoGradGuard no_grad;
  const int64_t steps = state_count(state, "step");
  std::vector<int64_t> counts;
  for (const Slot& s : slots_) {
    state_entry(state, s.name + ".exp_avg", s.exp_avg.sizes());
    state_entry(state, s.name + ".exp_avg_sq", s.exp_avg_sq.sizes());
    if (s.master.defined() || state.count(s.name + ".master")) state_entry(state, s.name + ".master", s.param.sizes());
    counts.push_back(state_count(state, s.name + ".step"));
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    s.exp_avg.copy_(state.at(s.name + ".exp_avg"));
    s.exp_avg_sq.copy_(state.at(s.name + ".exp_avg_sq"));
    if (s.master.defined()) {
      s.master.copy_(state.at(s.name + ".master"));
      s.param.copy_(s.master);
    } else if (const auto m = state.find(s.name + ".master"); m != state.end()) {
      s.param.copy_(m->second);  // (a bf16 run's checkpoint resumed in fp32: its master is the exact value)
    }
    s.step = counts[i];
    s.device_step = torch::Tensor();  // the fused path recreates it from the restored count
  }
  steps_ = steps;
}

int64_t AdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const Slot& s : slots_)
    for (const torch::Tensor* t : {&s.master, &s.exp_avg, &s.exp_avg_sq})
      if (t->defined()) bytes += t->numel() * t->element_size();
  return bytes;
}

std::string AdamW::invalid_state() const {
  torch::NoGradGuard no_grad;
  for (const Slot& s : slots_) {
    const std::pair<const char*, const torch::Tensor*> parts[] = {
        {"", &s.param}, {".master", &s.master}, {".exp_avg", &s.exp_avg}, {".exp_avg_sq", &s.exp_avg_sq}};
    for (const auto& [suffix, t] : parts)
      if (t->defined() && t->numel() > 0 && !torch::isfinite(*t).all().item<bool>())
        return "a NaN or an infinity in " + s.name + suffix;
    if (s.exp_avg_sq.defined() && s.exp_avg_sq.numel() > 0 && s.exp_avg_sq.min().item<double>() < 0)
      return "a negative second moment in " + s.name + ".exp_avg_sq";
  }
  return "";
}

std::vector<std::string> AdamW::decayed() const {
  std::vector<std::string> names;
  for (const Slot& s : slots_)
    if (s.decay) names.push_back(s.name);
  return names;
}

// ---- gradient clipping ----

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  torch::NoGradGuard no_grad;
  std::vector<std::vector<torch::Tensor>> groups;  // grads sharing device and dtype, each tensor once
  std::vector<const void*> seen;
  for (const torch::Tensor& p : params) {
    const torch::Tensor& g = p.grad();
    if (!g.defined() || std::find(seen.begin(), seen.end(), g.unsafeGetTensorImpl()) != seen.end()) continue;
    seen.push_back(g.unsafeGetTensorImpl());
    auto it = std::find_if(groups.begin(), groups.end(), [&](const std::vector<torch::Tensor>& x) {
      return x[0].device() == g.device() && x[0].scalar_type() == g.scalar_type();
    });
    if (it == groups.end()) it = groups.insert(groups.end(), std::vector<torch::Tensor>{});
    it->push_back(g);
  }
  double sum_sq = 0.0;
  for (const auto& g : groups) {
    const torch::Tensor norms = torch::stack(at::_foreach_norm(g)).to(torch::kFloat64);  // (n,)
    sum_sq += norms.square().sum().item<double>();
  }
  const double total = std::sqrt(sum_sq);
  if (max_norm > 0 && std::isfinite(total) && total > max_norm)
    for (auto& g : groups) at::_foreach_mul_(g, max_norm / total);
  return total;
}

}  // namespace libllm
