// The loss-spike guard's rules, one by one, on hand-made loss / grad-norm series.
#include "../catch_torch.h"

#include <cmath>

#include "../common.h"
#include "libllm/guard.h"
#include "libllm/spike.h"

using namespace libllm;

namespace {

GuardConfig small() {
  GuardConfig c;
  c.enabled = true;
  c.window = 8;
  c.min_history = 4;
  c.loss_z = 6.0;
  c.grad_z = 6.0;
  c.persist_steps = 2;
  c.max_skips = 4;
  c.skip_window = 20;
  c.max_rollbacks = 1;
  c.rewarm_steps = 4;
  return c;
}

// Feeds steps 1..n of a healthy series: loss 3 +- 0.1, grad norm 1 +- 0.1 (alternating).
void warm(Guard& g, int64_t n) {
  for (int64_t s = 1; s <= n; ++s) {
    const double e = s % 2 ? 0.1 : -0.1;
    REQUIRE(g.observe(s, 3.0 + e, 1.0 + e).action == GuardAction::Apply);
  }
}

}  // namespace

TEST_CASE("guard: no judgement before min_history, then a loss z-score over the threshold is skipped", "[guard]") {
  Guard g(small());
  // Three wild values: too little history to judge.
  CHECK(g.observe(1, 3.0, 1.0).action == GuardAction::Apply);
  CHECK(g.observe(2, 30.0, 1.0).action == GuardAction::Apply);
  CHECK(g.observe(3, 3.0, 1.0).action == GuardAction::Apply);
  Guard h(small());
  warm(h, 8);
  // mean 3, sample std 0.1069 (8 values +-0.1): loss 3.7 has z = 6.55 > 6; 3.6 has z = 5.6.
  const GuardDecision ok = h.observe(9, 3.6, 1.0);
  CHECK(ok.action == GuardAction::Apply);
  CHECK(ok.z_loss == Approx(0.6 / std::sqrt(0.08 / 7)).epsilon(1e-9));
  Guard k(small());
  warm(k, 8);
  const GuardDecision d = k.observe(9, 3.7, 1.0);
  CHECK(d.action == GuardAction::Skip);
  CHECK(d.spike);
  CHECK(d.z_loss == Approx(0.7 / std::sqrt(0.08 / 7)).epsilon(1e-9));
  CHECK(d.reason == "loss z=6.5 > 6.0");
  CHECK(d.spike_start == 9);
  CHECK(k.skips_total() == 1);
  // A skipped step does not enter the statistics: the same value is judged the same way again later.
  CHECK(k.observe(10, 3.0, 1.0).action == GuardAction::Apply);
}

TEST_CASE("guard: the statistics cover the last `window` steps, and the deviation has a floor", "[guard]") {
  // Eight steps at loss 100, then eight at 3 +- 0.1: with window 8 only the latter count (mean 3,
  // sample std 0.1069), so 3.7 (z = 6.55) is skipped; had the 100s stayed, it would be far below.
  Guard g(small());
  for (int64_t s = 1; s <= 8; ++s) REQUIRE(g.observe(s, 100.0, 1.0).action == GuardAction::Apply);
  for (int64_t s = 9; s <= 16; ++s) REQUIRE(g.observe(s, s % 2 ? 3.1 : 2.9, 1.0).action == GuardAction::Apply);
  const GuardDecision d = g.observe(17, 3.7, 1.0);
  CHECK(d.z_loss == Approx(0.7 / std::sqrt(0.08 / 7)).epsilon(1e-9));
  CHECK(d.action == GuardAction::Skip);
  // A flat history (eight steps at exactly 3.0) has no spread: the floor is 1e-3 x |mean| = 0.003,
  // so 3.02 has z = 6.67 (a spike) and 3.017 has z = 5.67 (not); the grad norm 1.0 alike (0.001).
  for (const auto& [loss, action] : {std::pair{3.02, GuardAction::Skip}, std::pair{3.017, GuardAction::Apply}}) {
    Guard flat(small());
    for (int64_t s = 1; s <= 8; ++s) REQUIRE(flat.observe(s, 3.0, 1.0).action == GuardAction::Apply);
    const GuardDecision f = flat.observe(9, loss, 1.0);
    CHECK(f.z_loss == Approx((loss - 3.0) / 0.003).epsilon(1e-9));
    CHECK(f.z_grad == Approx(0.0).margin(1e-9));
    CHECK(f.action == action);
  }
  Guard grad(small());
  for (int64_t s = 1; s <= 8; ++s) REQUIRE(grad.observe(s, 3.0, 1.0).action == GuardAction::Apply);
  CHECK(grad.observe(9, 3.0, 1.0065).z_grad == Approx(6.5).epsilon(1e-9));
}

TEST_CASE("guard: a grad-norm z-score is a spike too, and either test can be switched off", "[guard]") {
  Guard g(small());
  warm(g, 8);
  const GuardDecision d = g.observe(9, 3.0, 5.0);
  CHECK(d.action == GuardAction::Skip);
  CHECK_THAT(d.reason, Catch::StartsWith("grad norm z="));
  GuardConfig c = small();
  c.grad_z = 0;
  Guard off(c);
  warm(off, 8);
  CHECK(off.observe(9, 3.0, 5.0).action == GuardAction::Apply);
}

TEST_CASE("guard: non-finite loss or grad norm never reaches the weights, even with the guard off", "[guard]") {
  GuardConfig c = small();
  c.enabled = false;
  Guard g(c);
  CHECK(g.observe(1, NAN, 1.0).action == GuardAction::Skip);
  CHECK(g.observe(2, 3.0, INFINITY).reason == "non-finite grad norm");
  for (int64_t s = 3; s < 50; ++s) CHECK(g.observe(s, NAN, 1.0).action == GuardAction::Skip);  // never escalates
  Guard on(small());
  CHECK(on.observe(1, NAN, 1.0).reason == "non-finite loss");
}

TEST_CASE("guard: more than persist_steps consecutive spikes roll back, then stop after max_rollbacks", "[guard]") {
  Guard g(small());
  warm(g, 8);
  CHECK(g.observe(9, 9.0, 1.0).action == GuardAction::Skip);
  CHECK(g.observe(10, 9.0, 1.0).action == GuardAction::Skip);
  const GuardDecision d = g.observe(11, 9.0, 1.0);  // 3 consecutive > persist_steps 2
  CHECK(d.action == GuardAction::Rollback);
  CHECK(d.spike_start == 9);
  CHECK_THAT(d.reason, Catch::EndsWith("3 consecutive spikes > 2"));
  const std::string at_checkpoint = [] {
    Guard c(small());
    warm(c, 5);
    return c.state();
  }();
  CHECK(g.injection_armed());
  g.rolled_back(at_checkpoint, 5, 0.5, /*in_loop=*/true);
  CHECK(g.rollbacks() == 1);
  CHECK_FALSE(g.injection_armed());
  // LR: halved, re-warmed linearly over 4 steps from step 5.
  CHECK(g.lr_multiplier(6) == Approx(0.5 * 1 / 4.0));
  CHECK(g.lr_multiplier(8) == Approx(0.5 * 3 / 4.0));
  CHECK(g.lr_multiplier(9) == Approx(0.5));
  CHECK(g.lr_multiplier(100) == Approx(0.5));
  // The statistics are the checkpoint's (5 values: judging starts again at once, min_history 4).
  for (int64_t s = 6; s <= 8; ++s) CHECK(g.observe(s, 3.0, 1.0).action == GuardAction::Apply);
  g.observe(9, 9.0, 1.0);
  g.observe(10, 9.0, 1.0);
  const GuardDecision stop = g.observe(11, 9.0, 1.0);  // max_rollbacks 1 used up
  CHECK(stop.action == GuardAction::Stop);
  CHECK_THAT(stop.reason, Catch::Contains("1 rollbacks already (max_rollbacks 1)"));
  // A supervisor restart starts a fresh budget but keeps lowering the LR.
  g.rolled_back(at_checkpoint, 5, 0.5, /*in_loop=*/false);
  CHECK(g.rollbacks() == 0);
  CHECK(g.rollbacks_total() == 2);
  CHECK(g.lr_multiplier(20) == Approx(0.25));
}

TEST_CASE("guard: max_skips spikes within skip_window roll back to before the first of them", "[guard]") {
  Guard g(small());
  warm(g, 8);
  int64_t s = 9;
  for (int i = 0; i < 3; ++i) {
    CHECK(g.observe(s++, 9.0, 1.0).action == GuardAction::Skip);
    CHECK(g.observe(s++, 3.0, 1.0).action == GuardAction::Apply);
  }
  const GuardDecision d = g.observe(s, 9.0, 1.0);  // the 4th within 20 steps
  CHECK(d.action == GuardAction::Rollback);
  CHECK(d.spike_start == 9);
  CHECK_THAT(d.reason, Catch::EndsWith("4 spikes within 20 steps"));
  // Spread out beyond skip_window they are only skipped.
  Guard h(small());
  warm(h, 8);
  for (int64_t t = 9; t < 200; t += 10) {
    CHECK(h.observe(t, 9.0, 1.0).action == GuardAction::Skip);
    for (int64_t u = t + 1; u < t + 10; ++u) h.observe(u, 3.0 + (u % 2 ? 0.1 : -0.1), 1.0);
  }
}

TEST_CASE("guard: max_skips 1 rolls back at the first spike, and lookback covers the oldest target", "[guard]") {
  GuardConfig c = small();
  c.max_skips = 1;
  Guard g(c);
  warm(g, 8);
  const GuardDecision d = g.observe(9, 9.0, 1.0);
  CHECK(d.action == GuardAction::Rollback);
  CHECK(d.spike_start == 9);
  CHECK_THAT(d.reason, Catch::EndsWith("1 spikes within 20 steps"));
  // max(skip_window 20, persist_steps 2 + 1) + 2 + rollback_margin.
  CHECK(g.lookback() == 22);
  c.rollback_margin = 5;
  c.persist_steps = 30;
  CHECK(Guard(c).lookback() == 38);
  // The oldest target max_skips can reach: skips at 9, 11, 13 and a 4th spike at 28, within 20
  // steps of 9: the target is at or before 9 - 2 = 7 = 28 - 21, inside the lookback of 22.
  Guard h(small());
  warm(h, 8);
  for (int64_t s : {9, 11, 13}) {
    REQUIRE(h.observe(s, 9.0, 1.0).action == GuardAction::Skip);
    h.observe(s + 1, 3.0, 1.0);
  }
  for (int64_t s = 15; s < 28; ++s) h.observe(s, 3.0 + (s % 2 ? 0.1 : -0.1), 1.0);
  const GuardDecision e = h.observe(28, 9.0, 1.0);
  REQUIRE(e.action == GuardAction::Rollback);
  CHECK(e.spike_start - 2 >= 28 - h.lookback());
}

TEST_CASE("guard: the state round-trips exactly, so a resumed run decides the same", "[guard]") {
  Guard a(small());
  warm(a, 8);
  a.observe(9, 9.0, 1.0);
  Guard b(small());
  b.load_state(a.state());
  CHECK(b.state() == a.state());
  for (int64_t s = 10; s < 30; ++s) {
    const double loss = 3.0 + 0.37 * std::sin(static_cast<double>(s)) + (s == 20 ? 5 : 0);
    const GuardDecision x = a.observe(s, loss, 1.0), y = b.observe(s, loss, 1.0);
    CHECK(x.action == y.action);
    CHECK(x.z_loss == y.z_loss);
  }
  CHECK_THAT(test::error_of([&] { b.load_state("{\"losses\": 1}"); }), Catch::Contains("guard state"));
}

TEST_CASE("guard: a restart plan's branch is numbered above every earlier one", "[guard]") {
  Guard g(small());
  warm(g, 8);
  g.rolled_back("", 4, 0.5, /*in_loop=*/false);
  CHECK(g.rollbacks_total() == 1);
  g.rolled_back("", 4, 0.5, /*in_loop=*/false, /*branch_floor=*/3);  // the metrics hold branches 0..2
  CHECK(g.rollbacks_total() == 3);
  g.rolled_back("", 4, 0.5, /*in_loop=*/true);
  CHECK(g.rollbacks_total() == 4);
}

TEST_CASE("analyze: a run without the guard that skipped a non-finite step still has its spikes found",
          "[train][guard]") {
  test::TempDir tmp;
  test::write_file(tmp / "recipe.yaml", "guard: {enabled: false, window: 16, min_history: 8, grad_z: 0}\n");
  std::string lines;
  for (int s = 1; s <= 40; ++s) {
    if (s == 10) {  // a non-finite loss: skipped even without the guard, and logged as such
      lines += R"({"step": 10, "loss": null, "grad_norm": null, "action": "skip"})"
               "\n";
      continue;
    }
    const double loss = s == 30 ? 9.0 : 3.0 + 0.01 * std::sin(s);
    lines += "{\"step\": " + std::to_string(s) + ", \"loss\": " + std::to_string(loss) +
             ", \"grad_norm\": " + std::to_string(1.0 + 0.01 * std::cos(s)) + "}\n";
  }
  test::write_file(tmp / "metrics.jsonl", lines);
  const RunAnalysis a = analyze_run(tmp.path.string());
  CHECK_FALSE(a.guarded);
  // Exactly two: the skipped non-finite step 10 and the loss of step 30 (z far above 6 over the
  // recipe's window of 16), each one step long, each recovered by itself.
  REQUIRE(a.spikes.size() == 2);
  CHECK(a.spikes[0].first_step == 10);
  CHECK(a.spikes[0].last_step == 10);
  CHECK(a.spikes[0].skipped == 1);
  CHECK(a.spikes[1].first_step == 30);
  CHECK(a.spikes[1].last_step == 30);
  CHECK(a.spikes[1].kind == "benign");
  CHECK(a.skips == 1);
  CHECK(a.steps_run == 40);
}
