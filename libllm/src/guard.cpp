#include "libllm/guard.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "libllm/config.h"

using json = nlohmann::json;

namespace libllm {

void GuardConfig::fields(Fields& f) {
  f.add("enabled", enabled);
  f.add("window", window).min(2);
  f.add("min_history", min_history).min(2);
  f.add("loss_z", loss_z).min(0);
  f.add("grad_z", grad_z).min(0);
  f.add("persist_steps", persist_steps).min(0);
  f.add("max_skips", max_skips).min(1);
  f.add("skip_window", skip_window).min(1);
  f.add("rollback_margin", rollback_margin).min(0);
  f.add("defer", defer).one_of({"end", "drop"});
  f.add("rewarm_steps", rewarm_steps).min(0);
  f.add("rollback_lr_factor", rollback_lr_factor).min(1e-6).max(1);
  f.add("max_rollbacks", max_rollbacks).min(0);
  f.add("inject_noise_steps", inject_noise_steps).min(1);
  f.add("inject_lr_steps", inject_lr_steps).min(1);
  f.add("inject_lr_factor", inject_lr_factor).min(0);
  f.add("inject_hang_step", inject_hang_step).min(0);
  f.validate_with([this](const std::string& where) {
    if (min_history > window)
      throw Error(where + ".min_history", fmt::format("{} exceeds window {}", min_history, window));
  });
}

const char* to_string(GuardAction a) {
  switch (a) {
    case GuardAction::Apply: return "apply";
    case GuardAction::Skip: return "skip";
    case GuardAction::Rollback: return "rollback";
    case GuardAction::Stop: return "stop";
  }
  return "?";
}

Guard::Guard(const GuardConfig& cfg) : cfg_(cfg) {}

double Guard::zscore(const std::deque<double>& xs, double x) {
  const double n = static_cast<double>(xs.size());
  double mean = 0;
  for (double v : xs) mean += v;
  mean /= n;
  double var = 0;
  for (double v : xs) var += (v - mean) * (v - mean);
  const double sd = std::max({std::sqrt(var / (n - 1)), 1e-3 * std::fabs(mean), 1e-12});
  return (x - mean) / sd;
}

GuardDecision Guard::observe(int64_t step, double loss, double grad_norm) {
  GuardDecision d;
  if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
    d.spike = true;
    d.z_loss = std::isfinite(loss) ? 0.0 : INFINITY;
    d.z_grad = std::isfinite(grad_norm) ? 0.0 : INFINITY;
    d.reason = !std::isfinite(loss) ? "non-finite loss" : "non-finite grad norm";
  } else if (cfg_.enabled && static_cast<int64_t>(losses_.size()) >= cfg_.min_history) {
    d.z_loss = zscore(losses_, loss);
    d.z_grad = zscore(grads_, grad_norm);
    if (cfg_.loss_z > 0 && d.z_loss > cfg_.loss_z) {
      d.spike = true;
      d.reason = fmt::format("loss z={:.1f} > {:.1f}", d.z_loss, cfg_.loss_z);
    } else if (cfg_.grad_z > 0 && d.z_grad > cfg_.grad_z) {
      d.spike = true;
      d.reason = fmt::format("grad norm z={:.1f} > {:.1f}", d.z_grad, cfg_.grad_z);
    }
  }
  while (!skipped_.empty() && skipped_.front() <= step - cfg_.skip_window) skipped_.pop_front();

  if (!d.spike) {
    consecutive_ = 0;
    spike_start_ = 0;
    if (cfg_.enabled) {
      losses_.push_back(loss);
      grads_.push_back(grad_norm);
      while (static_cast<int64_t>(losses_.size()) > cfg_.window) losses_.pop_front(), grads_.pop_front();
    }
    return d;
  }
  ++consecutive_;
  if (spike_start_ == 0) spike_start_ = step;
  d.spike_start = spike_start_;
  if (cfg_.enabled) {
    std::string why;
    if (consecutive_ > cfg_.persist_steps) {
      why = fmt::format("{} consecutive spikes > {}", consecutive_, cfg_.persist_steps);
    } else if (static_cast<int64_t>(skipped_.size()) + 1 >= cfg_.max_skips) {
      why = fmt::format("{} spikes within {} steps", skipped_.size() + 1, cfg_.skip_window);
      if (!skipped_.empty()) d.spike_start = std::min(d.spike_start, skipped_.front());  // before the first of them
    }
    if (!why.empty()) {
      d.action = rollbacks_ < cfg_.max_rollbacks ? GuardAction::Rollback : GuardAction::Stop;
      d.reason += "; " + why;
      if (d.action == GuardAction::Stop)
        d.reason += fmt::format("; {} rollbacks already (max_rollbacks {})", rollbacks_, cfg_.max_rollbacks);
      return d;
    }
  }
  skipped_.push_back(step);
  ++skips_total_;
  d.action = GuardAction::Skip;
  return d;
}

int64_t Guard::lookback() const {
  // A rollback at step s starts from a spike at or after s - skip_window + 1 (older skips have left
  // the window) or s - persist_steps (consecutive spikes); its target is at most 2 + margin before.
  return std::max(cfg_.skip_window, cfg_.persist_steps + 1) + 2 + cfg_.rollback_margin;
}

double Guard::lr_multiplier(int64_t step) const {
  double m = lr_scale_;
  if (rewarm_from_ >= 0 && cfg_.rewarm_steps > 0 && step - rewarm_from_ < cfg_.rewarm_steps)
    m *= static_cast<double>(std::max<int64_t>(step - rewarm_from_, 0)) / static_cast<double>(cfg_.rewarm_steps);
  return m;
}

void Guard::rolled_back(const std::string& saved, int64_t to_step, double lr_factor, bool in_loop,
                        int64_t branch_floor) {
  const Guard now = *this;
  if (saved.empty()) *this = Guard(cfg_);
  else load_state(saved);
  rollbacks_ = in_loop ? now.rollbacks_ + 1 : 0;
  rollbacks_total_ = std::max(now.rollbacks_total_ + 1, branch_floor);
  skips_total_ = now.skips_total_;
  lr_scale_ = now.lr_scale_ * lr_factor;
  rewarm_from_ = to_step;
  consecutive_ = 0;
  spike_start_ = 0;
  skipped_.clear();
}

std::string Guard::state() const {
  json j = {{"losses", losses_},         {"grads", grads_},
            {"skipped", skipped_},       {"consecutive", consecutive_},
            {"spike_start", spike_start_}, {"rollbacks", rollbacks_},
            {"rollbacks_total", rollbacks_total_}, {"skips_total", skips_total_},
            {"lr_scale", lr_scale_},     {"rewarm_from", rewarm_from_}};
  return j.dump();
}

void Guard::load_state(const std::string& text) {
  try {
    const json j = json::parse(text);
    losses_ = j.at("losses").get<std::deque<double>>();
    grads_ = j.at("grads").get<std::deque<double>>();
    skipped_ = j.at("skipped").get<std::deque<int64_t>>();
    consecutive_ = j.at("consecutive").get<int64_t>();
    spike_start_ = j.at("spike_start").get<int64_t>();
    rollbacks_ = j.at("rollbacks").get<int64_t>();
    rollbacks_total_ = j.at("rollbacks_total").get<int64_t>();
    skips_total_ = j.at("skips_total").get<int64_t>();
    lr_scale_ = j.at("lr_scale").get<double>();
    rewarm_from_ = j.at("rewarm_from").get<int64_t>();
  } catch (const json::exception& e) {
    throw Error("guard state", std::string("invalid: ") + e.what(), "the checkpoint's trainer.json is corrupt");
  }
  if (losses_.size() != grads_.size()) throw Error("guard state", "loss and grad histories differ in length");
}

}  // namespace libllm
