// The optimizer side of pretraining: AdamW with multi-tensor (_foreach_*) updates and fp32
// master weights for bf16/fp16 parameters, the learning-rate schedules, and global-norm
// gradient clipping.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace libllm {

class Fields;

// Recipe section `optim`.
struct OptimConfig {
  double lr = 3e-4;               // peak learning rate (the schedule multiplies it); >= 0; default 3e-4
  double beta1 = 0.9;             // Adam first-moment decay, in [0, 1); default 0.9
  double beta2 = 0.95;            // Adam second-moment decay, in [0, 1); default 0.95
  double eps = 1e-8;              // added to sqrt(v_hat) in the denominator; >= 0; default 1e-8
  double weight_decay = 0.1;      // decoupled (AdamW) decay, applied as p -= lr * weight_decay * p; >= 0; default 0.1
  bool decay_embeddings = false;  // also decay the token embedding (and a head tied to it); norms and biases
                                  // (every 1-D tensor) are never decayed; default false
  double grad_clip = 1.0;         // clip gradients to this global L2 norm; 0 = off; >= 0; default 1.0

  // Binds the fields above to recipe keys (section `optim`).
  void fields(Fields& f);
};

// Recipe section `schedule`.
struct ScheduleConfig {
  std::string kind = "cosine";  // cosine | linear | constant | wsd (warmup-stable-decay); default cosine
  int64_t warmup_steps = 2000;  // optimizer steps of linear warmup from 0 to the peak; >= 0; default 2000
  double min_lr_ratio = 0.1;    // final LR as a fraction of the peak, in [0, 1]; default 0.1 (unused by constant)
  double decay_fraction = 0.2;  // wsd only: the last fraction of total steps, decaying linearly to the
                                // minimum, in [0, 1]; default 0.2

  // Binds the fields above to recipe keys (section `schedule`).
  void fields(Fields& f);
};

// The LR multiplier in [0, 1] at optimizer step `step` (0-based) of a run of `total_steps`.
// With W = warmup_steps, T = total_steps, m = min_lr_ratio:
//   warmup (step < W):  (step + 1) / W
//   afterwards, progress p = (step - W) / (T - 1 - W), clamped to [0, 1] (p = 1 when T - 1 - W <= 0):
//     cosine:    m + (1 - m) * 0.5 * (1 + cos(pi * p))
//     linear:    m + (1 - m) * (1 - p)
//     constant:  1
//     wsd:       with D = round(decay_fraction * T) decay steps starting at S = T - D (or, when
//                that is inside the warmup, at S = W with D = T - W: no drop from the peak):
//                1 for step < S, else 1 - (1 - m) * min(1, (step - S + 1) / D)
//                (so the last step T - 1 is at m; D = 0 never decays)
// cosine, linear and wsd reach m exactly at step T - 1 and stay there after it.
// Throws libllm::Error for step < 0, total_steps < 1 or an unknown kind.
double lr_factor(const ScheduleConfig& s, int64_t step, int64_t total_steps);

// AdamW over named parameters, with the update of torch.optim.AdamW (foreach=False):
//   p *= 1 - lr * wd                     (wd = weight_decay for decayed params, else 0)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g^2
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// where t counts the updates of that parameter (a parameter whose grad is undefined is skipped and
// its t does not advance, as in PyTorch). The math runs as _foreach_* kernels over groups of
// parameters sharing (decayed?, device, compute dtype); on CUDA with LibTorch >= 2.0 a group goes
// through the fused at::_fused_adamw_ kernel instead.
// Decay rule: a parameter decays iff it has >= 2 dims and, unless decay_embeddings, no name of it
// contains "embed_tokens". A tensor listed twice (a head tied to the embedding) is updated once,
// under its first name, and counts as an embedding if any of its names does.
// bf16/fp16 parameters keep an fp32 master copy (and fp32 moments) in the optimizer; the update
// runs on the master, which is then rounded back into the parameter. fp32/fp64 parameters are
// updated in place, with moments in their own dtype.
class AdamW {
 public:
  // Throws libllm::Error for an undefined, non-floating or duplicate-named parameter.
  AdamW(std::vector<std::pair<std::string, torch::Tensor>> named_params, const OptimConfig& cfg);
  // With the decay decided by the caller, one flag per entry (a sharded optimizer's slices of
  // parameters: a 1-D slice of a matrix still decays). Tied tensors are not merged here.
  AdamW(std::vector<std::pair<std::string, torch::Tensor>> named_params, const std::vector<bool>& decay,
        const OptimConfig& cfg);

  // Applies one update with learning rate `lr` (already scheduled); skips params whose grad is
  // undefined. Does not clip: call clip_grad_norm first.
  void step(double lr);
  // Sets every parameter's grad to undefined (frees the memory; step() then skips them).
  void zero_grad();
  // Number of step() calls so far.
  int64_t steps() const { return steps_; }

  // The full state for checkpoints: for each parameter (in the constructor's order)
  // "<param>.exp_avg", "<param>.exp_avg_sq", "<param>.master" (bf16/fp16 params only) and
  // "<param>.step" (int64 scalar: that parameter's update count t), plus "step" (int64 scalar:
  // steps()). The tensors are the live state: clone them to keep a snapshot.
  std::vector<std::pair<std::string, torch::Tensor>> state() const;
  // Copies a state() into this optimizer (any device/dtype; converted to the state's own).
  // Throws libllm::Error naming a missing entry or one of the wrong shape.
  void load_state(const std::map<std::string, torch::Tensor>& state);

  // Copies each bf16/fp16 parameter into its fp32 master, for parameters written from outside
  // after this optimizer was built (a sharded model's weights read from a base afterwards);
  // otherwise the next step would continue from the masters they were built with.
  void sync_masters();

  // The names of the parameters that decay, in order (for printing).
  std::vector<std::string> decayed() const;
  // Bytes of the state this optimizer holds (moments and fp32 masters).
  int64_t state_bytes() const;
  // What is wrong with the first parameter, fp32 master or moment holding a NaN or an infinity,
  // or a second moment holding a negative value, named as state() names it: "a NaN or an
  // infinity in <param>.exp_avg"; "" when all is well. One reduction and host sync per tensor:
  // for checking a loaded checkpoint, not every step.
  std::string invalid_state() const;

 private:
  struct Slot {
    std::string name;
    torch::Tensor param;        // the model's tensor (updated in place)
    torch::Tensor master;       // fp32 copy for bf16/fp16 params; undefined otherwise
    torch::Tensor exp_avg;      // m, same shape, compute dtype
    torch::Tensor exp_avg_sq;   // v, same shape, compute dtype
    torch::Tensor device_step;  // fused CUDA path only: float32 scalar t on the param's device
    int64_t step = 0;           // t: updates applied to this parameter
    bool decay = false;
    // The tensor the update runs on: master if any, else the parameter.
    const torch::Tensor& target() const { return master.defined() ? master : param; }
  };
  struct Group;

  void add_slot(const std::string& name, const torch::Tensor& p, bool decay);
  void update_group(Group& g, double lr);
  void foreach_update(Group& g, double lr);
  bool fused_update(Group& g, double lr);

  std::vector<Slot> slots_;
  OptimConfig cfg_;
  int64_t steps_ = 0;
};

// Scales the gradients of `params` in place so that their global L2 norm is at most max_norm
// (when max_norm > 0), with _foreach_norm / _foreach_mul_ per (device, dtype) group. Params
// without a grad are ignored. Returns the global norm before clipping, summed in fp64 from the
// per-tensor norms (each computed in the grad's dtype with fp32 accumulation, so bf16 grads give a
// norm within ~0.4%). A non-finite norm is returned as is and nothing is scaled.
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

}  // namespace libllm
