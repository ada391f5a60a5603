// The loss-spike guard: rolling statistics of loss and gradient norm, z-score thresholds, and an
// escalating decision per step: apply the update, skip it, roll back to a healthy checkpoint,
// or stop. Small and deterministic: every rank feeds it the same (averaged) numbers and gets
// the same decisions; its whole state is a JSON string saved in every checkpoint.
//
// Step numbers are 1-based: step n computes its loss with the weights after n - 1 updates.
// A spike at step n therefore implicates the weights after update n - 1 as well as batch n, so
// the rollback target is the newest checkpoint at or before step (first spike step - 2 - margin).
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "libllm/error.h"

namespace libllm {

class Fields;

struct GuardConfig {                  // recipe section `guard`
  bool enabled = false;               // z-score skip / rollback / stop (non-finite steps are always skipped)
  int64_t window = 128;               // applied steps in the rolling mean and std of loss and grad norm
  int64_t min_history = 16;           // no z-score judgement until the window holds this many steps
  double loss_z = 6.0;                // spike when (loss - mean) / std > loss_z (std floored at 0.1% of the mean); 0 = off
  double grad_z = 6.0;                // spike when (grad_norm - mean) / std > grad_z; 0 = off
  int64_t persist_steps = 4;          // roll back when more than this many consecutive steps are spikes
  int64_t max_skips = 8;              // ... or when a spike is the max_skips-th within skip_window steps (the skipped
                                      // ones and itself); 1 = roll back at every spike, never skip
  int64_t skip_window = 100;          // steps over which skips are counted for max_skips
  int64_t rollback_margin = 0;        // extra steps to go back before the spike (PaLM went ~100)
  std::string defer = "end";          // data of the rolled-back steps: end (served as the run's last samples, as K2) | drop
  int64_t rewarm_steps = 20;          // after a rollback the LR rises linearly from 0 to its value over this many steps
  double rollback_lr_factor = 1.0;    // multiplies the LR after each rollback, cumulatively (OPT lowered it); (0, 1]
  int64_t max_rollbacks = 3;          // stop (exit code 3, with a report) instead of rollback number max_rollbacks + 1
  // Spike injection, for tests and demos. It acts only on a step's first attempt: never after a
  // rollback or a supervisor restart (a transient fault).
  std::vector<int64_t> inject_noise_steps;  // steps whose batches are replaced by uniform random tokens (a data spike)
  std::vector<int64_t> inject_lr_steps;     // steps whose LR is multiplied by inject_lr_factor (a divergence)
  double inject_lr_factor = 100.0;          // LR multiplier at inject_lr_steps
  int64_t inject_hang_step = 0;             // the trainer stops making progress at this step (supervisor tests); 0 = never

  void fields(Fields& f);
};

enum class GuardAction { Apply, Skip, Rollback, Stop };
const char* to_string(GuardAction a);

struct GuardDecision {
  GuardAction action = GuardAction::Apply;
  double z_loss = 0, z_grad = 0;  // z-scores of this step (0 while the history is short)
  bool spike = false;             // this step is over a threshold or non-finite
  std::string reason;             // "loss z=7.1 > 6.0", "non-finite grad norm", "5 consecutive spikes > 4", ...
  int64_t spike_start = 0;        // first step of the current run of spikes (0 = none)
};

class Guard {
 public:
  explicit Guard(const GuardConfig& cfg);

  // Judges step `step` from its loss and global gradient norm (before clipping).
  GuardDecision observe(int64_t step, double loss, double grad_norm);

  // LR multiplier for `step`: the cumulative rollback factor times the linear re-warm since the
  // last rollback (1 without rollbacks).
  double lr_multiplier(int64_t step) const;
  // Whether injection may act: no rollback has happened in this run yet (the caller also checks
  // that this is no supervisor restart).
  bool injection_armed() const { return rollbacks_total_ == 0; }
  // How far back a rollback from a later step may reach: its target is the newest checkpoint at
  // or before (step - lookback()) or later, so checkpoint pruning keeps the newest one at or
  // before that step. max(skip_window, persist_steps + 1) + 2 + rollback_margin.
  int64_t lookback() const;

  // After restoring the checkpoint of step `to_step`: the rolling statistics become those saved
  // in that checkpoint (`saved`, a state() string; "" = empty), the LR is re-warmed from
  // to_step and scaled by lr_factor. in_loop counts toward max_rollbacks; a supervisor restart
  // (in_loop = false) starts a fresh budget.
  // The new branch is numbered at least branch_floor (rollbacks_total).
  void rolled_back(const std::string& saved, int64_t to_step, double lr_factor, bool in_loop, int64_t branch_floor = 0);

  int64_t rollbacks() const { return rollbacks_; }
  int64_t rollbacks_total() const { return rollbacks_total_; }
  int64_t skips_total() const { return skips_total_; }
  double lr_scale() const { return lr_scale_; }

  std::string state() const;  // JSON
  void load_state(const std::string& json);

 private:
  static double zscore(const std::deque<double>& xs, double x);

  GuardConfig cfg_;
  std::deque<double> losses_, grads_;  // applied steps only, newest last
  std::deque<int64_t> skipped_;        // steps skipped within skip_window
  int64_t consecutive_ = 0, spike_start_ = 0;
  int64_t rollbacks_ = 0;              // in-loop rollbacks since the start (or the last supervisor restart)
  int64_t rollbacks_total_ = 0;        // rollbacks and restarts of any kind
  int64_t skips_total_ = 0;
  double lr_scale_ = 1.0;
  int64_t rewarm_from_ = -1;           // step of the last rollback target (-1 = none)
};

// llm-pretrain's exit code when the guard stopped the run (llm-spike supervise restarts it with a plan).
constexpr int kSpikeStopExit = 3;

// Thrown by the trainer when the guard stops the run.
class SpikeStop : public Error {
 public:
  using Error::Error;
};

}  // namespace libllm
