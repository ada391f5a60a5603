// AdamW against LibTorch's own optimizer, the decay rule, fp32 master weights, checkpoint state,
// gradient clipping, the LR schedules and the recipe fields.
// LibTorch before Catch: Debian's LibTorch pulls in glog, whose CHECK macro must not replace Catch's.
#include <torch/torch.h>

#include "../catch_torch.h"

#include "../common.h"

#include <cmath>
#include <functional>
#include <limits>

#include "libllm/config.h"
#include "libllm/distributed.h"
#include "libllm/error.h"
#include "libllm/model.h"
#include "libllm/optim.h"
#include "libllm/recipe.h"
#include "libllm/shard.h"

using namespace libllm;
using libllm::test::error_of;

namespace {

using Named = std::vector<std::pair<std::string, torch::Tensor>>;

constexpr double kPi = 3.14159265358979323846;

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

// Deep copies of the tensors (same names), requiring grad like parameters.
Named copy_params(const Named& src, torch::ScalarType dtype) {
  Named out;
  for (const auto& [n, p] : src) out.emplace_back(n, p.detach().to(dtype, false, true).requires_grad_(true));
  return out;
}

// Clones of the tensors (same names and dtypes), requiring grad like parameters.
Named clone_params(const Named& src) {
  Named out;
  for (const auto& [n, p] : src) out.emplace_back(n, p.detach().clone().requires_grad_(true));
  return out;
}

// Per-step gradients for `params`, drawn once so several runs can share them.
std::vector<std::vector<torch::Tensor>> draw_grads(const Named& params, int steps, uint64_t seed) {
  torch::manual_seed(seed);
  std::vector<std::vector<torch::Tensor>> grads(steps);
  for (auto& step : grads)
    for (const auto& np : params) step.push_back(torch::randn(np.second.sizes(), torch::kFloat64));
  return grads;
}

void set_grads(const Named& params, const std::vector<torch::Tensor>& grads) {
  for (size_t i = 0; i < params.size(); ++i)
    params[i].second.mutable_grad() = grads[i].to(params[i].second.scalar_type());
}

std::map<std::string, torch::Tensor> snapshot(const AdamW& opt) {
  std::map<std::string, torch::Tensor> m;
  for (const auto& [n, t] : opt.state()) m[n] = t.clone();
  return m;
}

OptimConfig test_config() {
  OptimConfig c;
  c.lr = 1e-2;
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-8;
  c.weight_decay = 0.1;
  return c;
}

}  // namespace

TEST_CASE("AdamW matches torch::optim::AdamW in float64 over 20 steps", "[optim]") {
  torch::manual_seed(0);
  const Named init = {{"a.weight", torch::randn({4, 5}, torch::kFloat64)},
                      {"b.weight", torch::randn({3, 2, 2}, torch::kFloat64)},
                      {"c.weight", torch::randn({6, 1}, torch::kFloat64)},
                      {"norm.weight", torch::randn({7}, torch::kFloat64)},
                      {"c.bias", torch::randn({6}, torch::kFloat64)}};
  const OptimConfig cfg = test_config();
  const Named ours = copy_params(init, torch::kFloat64), ref = copy_params(init, torch::kFloat64);
  AdamW opt(ours, cfg);

  // LibTorch's AdamW: matrices with weight decay, 1-D tensors without (libllm's rule).
  auto options = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(cfg.lr).betas({cfg.beta1, cfg.beta2}).eps(cfg.eps).weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{ref[0].second, ref[1].second, ref[2].second},
                      options(cfg.weight_decay));
  groups.emplace_back(std::vector<torch::Tensor>{ref[3].second, ref[4].second}, options(0.0));
  torch::optim::AdamW torch_opt(groups, torch::optim::AdamWOptions(cfg.lr));

  const auto grads = draw_grads(init, 20, 1);
  for (int s = 0; s < 20; ++s) {
    const double lr = cfg.lr * (1.0 + 0.1 * std::sin(s));  // a varying (scheduled) LR
    for (auto& g : torch_opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    set_grads(ours, grads[s]);
    set_grads(ref, grads[s]);
    if (s == 7) {  // a parameter without a gradient is skipped by both, its step count frozen
      ours[2].second.mutable_grad().reset();
      ref[2].second.mutable_grad().reset();
    }
    opt.step(lr);
    torch_opt.step();
  }
  CHECK(opt.steps() == 20);
  for (size_t i = 0; i < init.size(); ++i) {
    INFO(init[i].first);
    CHECK(max_diff(ours[i].second, ref[i].second) < 1e-12);
    CHECK(max_diff(ours[i].second, init[i].second) > 1e-3);  // it did move
  }
}

TEST_CASE("norms, biases and embeddings are not decayed unless decay_embeddings", "[optim]") {
  torch::manual_seed(2);
  const Named init = {{"model.embed_tokens.weight", torch::randn({10, 4})},
                      {"model.layers.0.self_attn.q_proj.weight", torch::randn({4, 4})},
                      {"model.layers.0.input_layernorm.weight", torch::randn({4})},
                      {"lm_head.bias", torch::randn({10})},
                      {"lm_head.weight", torch::randn({10, 4})}};
  for (const bool decay_embeddings : {false, true}) {
    OptimConfig cfg = test_config();
    cfg.decay_embeddings = decay_embeddings;
    const Named params = copy_params(init, torch::kFloat32);
    AdamW opt(params, cfg);
    for (const auto& [n, p] : params) p.mutable_grad() = torch::zeros_like(p);
    opt.step(cfg.lr);  // zero gradients: only the decoupled decay moves a parameter

    const std::vector<bool> decays = {decay_embeddings, true, false, false, true};
    std::vector<std::string> expected;
    for (size_t i = 0; i < params.size(); ++i) {
      INFO(params[i].first << " decay_embeddings=" << decay_embeddings);
      const torch::Tensor& before = init[i].second;
      const torch::Tensor want = decays[i] ? before * (1.0 - cfg.lr * cfg.weight_decay) : before;
      CHECK(torch::equal(params[i].second, want));
      if (decays[i]) expected.push_back(params[i].first);
    }
    CHECK(opt.decayed() == expected);
  }
}

TEST_CASE("a head tied to the embedding is one parameter that follows the embedding rule", "[optim]") {
  const torch::Tensor emb = torch::randn({10, 4}).requires_grad_(true);
  const torch::Tensor before = emb.detach().clone();
  const Named params = {{"model.embed_tokens.weight", emb}, {"lm_head.weight", emb}};
  AdamW opt(params, test_config());
  CHECK(opt.decayed().empty());
  CHECK(opt.state().size() == 4);  // exp_avg, exp_avg_sq, .step of the one tensor, and "step"
  emb.mutable_grad() = torch::zeros_like(emb);
  opt.step(1e-2);
  CHECK(torch::equal(emb, before));  // updated once (no decay, zero gradient)

  OptimConfig cfg = test_config();
  cfg.decay_embeddings = true;
  CHECK(AdamW({{"lm_head.weight", emb}, {"model.embed_tokens.weight", emb}}, cfg).decayed() ==
        std::vector<std::string>{"lm_head.weight"});
  CHECK_THAT(error_of([&] {
               AdamW({{"w", torch::randn({2, 2})}, {"w", torch::randn({2, 2})}}, cfg);
             }),
             Catch::Contains("w: parameter name listed twice"));
  CHECK_THAT(error_of([&] {
               AdamW({{"ids", torch::zeros({2, 2}, torch::kInt64)}}, cfg);
             }),
             Catch::Contains("ids: AdamW needs a floating-point parameter"));
}

TEST_CASE("bf16 parameters are updated through an fp32 master copy", "[optim]") {
  torch::manual_seed(3);
  const Named init = {{"w", torch::randn({16, 8}).to(torch::kBFloat16)},
                      {"norm.weight", torch::randn({8}).to(torch::kBFloat16)}};
  const OptimConfig cfg = test_config();
  const Named low = copy_params(init, torch::kBFloat16), full = copy_params(init, torch::kFloat32);
  AdamW opt_low(low, cfg), opt_full(full, cfg);
  const auto grads = draw_grads(init, 10, 4);
  for (int s = 0; s < 10; ++s) {
    std::vector<torch::Tensor> g;  // the same bf16-representable gradients for both runs
    for (const auto& x : grads[s]) g.push_back(x.to(torch::kBFloat16));
    set_grads(low, g);
    set_grads(full, g);
    opt_low.step(cfg.lr);
    opt_full.step(cfg.lr);
  }
  const auto state = snapshot(opt_low);
  for (size_t i = 0; i < init.size(); ++i) {
    const std::string& n = init[i].first;
    INFO(n);
    const torch::Tensor& master = state.at(n + ".master");
    CHECK(master.scalar_type() == torch::kFloat32);
    CHECK(state.at(n + ".exp_avg").scalar_type() == torch::kFloat32);
    CHECK(max_diff(master, full[i].second) < 1e-6);
    CHECK(low[i].second.scalar_type() == torch::kBFloat16);
    CHECK(torch::equal(low[i].second, master.to(torch::kBFloat16)));
    CHECK(max_diff(master, init[i].second) > 1e-2);  // it did move
  }
  CHECK(snapshot(opt_full).count("w.master") == 0);
}

TEST_CASE("state and load_state continue a run bit for bit", "[optim]") {
  torch::manual_seed(5);
  const Named init = {{"w", torch::randn({6, 4})},
                      {"norm.weight", torch::randn({4})},
                      {"half.weight", torch::randn({3, 4}).to(torch::kBFloat16)}};
  const OptimConfig cfg = test_config();
  const auto grads = draw_grads(init, 10, 6);

  const Named a = clone_params(init);
  AdamW opt_a(a, cfg);
  for (int s = 0; s < 5; ++s) {
    set_grads(a, grads[s]);
    if (s == 2) a[1].second.mutable_grad().reset();  // per-parameter step counts differ
    opt_a.step(cfg.lr * (s + 1) / 5.0);
  }
  const auto saved = snapshot(opt_a);
  const Named b = clone_params(a);
  for (int s = 5; s < 10; ++s) {
    set_grads(a, grads[s]);
    opt_a.step(cfg.lr);
  }

  AdamW opt_b(b, cfg);
  opt_b.load_state(saved);
  CHECK(opt_b.steps() == 5);
  for (int s = 5; s < 10; ++s) {
    set_grads(b, grads[s]);
    opt_b.step(cfg.lr);
  }
  CHECK(opt_b.steps() == 10);
  for (size_t i = 0; i < a.size(); ++i) {
    INFO(a[i].first);
    CHECK(torch::equal(a[i].second, b[i].second));
  }
  const auto sa = snapshot(opt_a), sb = snapshot(opt_b);
  CHECK(sa.size() == sb.size());
  for (const auto& [n, t] : sa) {
    INFO(n);
    CHECK(torch::equal(t, sb.at(n)));
  }
  CHECK(sa.at("norm.weight.step").item<int64_t>() == 9);
  CHECK(sa.at("step").item<int64_t>() == 10);

  auto missing = saved;
  missing.erase("w.exp_avg_sq");
  AdamW opt_c(clone_params(init), cfg);
  CHECK_THAT(error_of([&] { opt_c.load_state(missing); }),
             Catch::Contains("w.exp_avg_sq: missing from the optimizer state"));
  auto misshaped = saved;
  misshaped["norm.weight.exp_avg"] = torch::zeros({5});
  CHECK_THAT(error_of([&] { opt_c.load_state(misshaped); }),
             Catch::Contains("norm.weight.exp_avg: optimizer state has shape [5], expected [4]"));
  auto no_master = saved;
  no_master.erase("half.weight.master");
  CHECK_THAT(error_of([&] { opt_b.load_state(no_master); }), Catch::Contains("half.weight.master: missing"));
  CHECK(opt_b.steps() == 10);  // a failed load changes nothing
}

TEST_CASE("zero_grad drops the gradients and step skips parameters without one", "[optim]") {
  const Named p = {{"w", torch::ones({2, 2}).requires_grad_(true)}};
  AdamW opt(p, test_config());
  p[0].second.mutable_grad() = torch::ones({2, 2});
  opt.zero_grad();
  CHECK_FALSE(p[0].second.grad().defined());
  opt.step(1e-2);
  CHECK(torch::equal(p[0].second, torch::ones({2, 2})));
  CHECK(snapshot(opt).at("w.step").item<int64_t>() == 0);
}

TEST_CASE("clip_grad_norm returns the global norm and scales to max_norm", "[optim]") {
  const torch::Tensor a = torch::zeros({2}, torch::requires_grad()), b = torch::zeros({1}, torch::requires_grad());
  const torch::Tensor c = torch::zeros({2, 2}, torch::dtype(torch::kFloat64).requires_grad(true)),
                      no_grad = torch::zeros({3});
  auto reset = [&] {
    a.mutable_grad() = torch::tensor({3.0f, 4.0f});
    b.mutable_grad() = torch::tensor({12.0f});
    c.mutable_grad() = torch::tensor({1.0, 2.0, 2.0, 4.0}, torch::kFloat64).view({2, 2});
  };
  const double total = std::sqrt(9.0 + 16.0 + 144.0 + 1.0 + 4.0 + 4.0 + 16.0);  // sqrt(194), by hand
  const std::vector<torch::Tensor> params = {a, b, c, no_grad, a};              // a listed twice counts once

  reset();
  CHECK(clip_grad_norm(params, 7.0) == Approx(total).epsilon(1e-12));
  const double after = std::sqrt(a.grad().square().sum().item<double>() + b.grad().square().sum().item<double>() +
                                 c.grad().square().sum().item<double>());
  CHECK(std::abs(after - 7.0) < 1e-6);
  CHECK(a.grad()[0].item<double>() == Approx(3.0 * 7.0 / total).epsilon(1e-6));

  reset();
  CHECK(clip_grad_norm(params, 20.0) == Approx(total).epsilon(1e-12));  // below: untouched
  CHECK(torch::equal(a.grad(), torch::tensor({3.0f, 4.0f})));
  CHECK(clip_grad_norm(params, 0.0) == Approx(total).epsilon(1e-12));  // 0 = off
  CHECK(torch::equal(b.grad(), torch::tensor({12.0f})));

  torch::manual_seed(7);  // random fp32 + bf16 grads against a float64 sum of squares
  const torch::Tensor r = torch::zeros({100, 30}, torch::requires_grad()),
                      h = torch::zeros({50}, torch::TensorOptions().dtype(torch::kBFloat16).requires_grad(true));
  r.mutable_grad() = torch::randn({100, 30});
  h.mutable_grad() = torch::randn({50}).to(torch::kBFloat16);
  const double r_sq = r.grad().to(torch::kFloat64).square().sum().item<double>();
  const double h_sq = h.grad().to(torch::kFloat64).square().sum().item<double>();
  CHECK(clip_grad_norm({r}, 0.0) == Approx(std::sqrt(r_sq)).epsilon(1e-6));
  // A bf16 tensor's own norm is rounded to bf16 (8 significant bits) before the fp64 sum.
  CHECK(clip_grad_norm({h}, 0.0) == Approx(std::sqrt(h_sq)).epsilon(1.0 / 256));
  CHECK(clip_grad_norm({r, h}, 0.0) == Approx(std::sqrt(r_sq + h_sq)).epsilon(1.0 / 256));

  reset();
  a.mutable_grad()[0] = std::numeric_limits<float>::infinity();
  CHECK(std::isinf(clip_grad_norm(params, 1.0)));
  CHECK(b.grad().item<float>() == 12.0f);  // not scaled
  a.mutable_grad()[0] = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(clip_grad_norm(params, 1.0)));
  CHECK(b.grad().item<float>() == 12.0f);
}

TEST_CASE("lr_factor: warmup then each schedule, reaching min_lr_ratio at the last step", "[optim]") {
  ScheduleConfig s;
  s.warmup_steps = 10;
  s.min_lr_ratio = 0.1;
  s.decay_fraction = 0.2;
  const int64_t T = 111;  // progress = (step - 10) / (111 - 1 - 10) = (step - 10) / 100
  for (const char* kind : {"cosine", "linear", "constant", "wsd"}) {
    s.kind = kind;
    INFO(kind);
    CHECK(lr_factor(s, 0, T) == Approx(0.1).epsilon(1e-15));  // (0 + 1) / 10
    CHECK(lr_factor(s, 4, T) == Approx(0.5).epsilon(1e-15));
    CHECK(lr_factor(s, 9, T) == 1.0);  // end of warmup
    CHECK(lr_factor(s, 10, T) == 1.0);
  }
  s.kind = "cosine";
  CHECK(lr_factor(s, 60, T) == Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(kPi * 50 / 100))).epsilon(1e-14));  // 0.55
  CHECK(lr_factor(s, 35, T) == Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(kPi * 25 / 100))).epsilon(1e-14));
  CHECK(lr_factor(s, 110, T) == Approx(0.1).epsilon(1e-14));
  CHECK(lr_factor(s, 500, T) == Approx(0.1).epsilon(1e-14));  // past the end: stays at the minimum
  s.kind = "linear";
  CHECK(lr_factor(s, 60, T) == Approx(0.55).epsilon(1e-14));
  CHECK(lr_factor(s, 35, T) == Approx(0.1 + 0.9 * 0.75).epsilon(1e-14));
  CHECK(lr_factor(s, 110, T) == Approx(0.1).epsilon(1e-14));
  s.kind = "constant";
  CHECK(lr_factor(s, 60, T) == 1.0);
  CHECK(lr_factor(s, 110, T) == 1.0);
  s.kind = "wsd";  // D = round(0.2 * 111) = 22 decay steps: 89..110
  CHECK(lr_factor(s, 60, T) == 1.0);
  CHECK(lr_factor(s, 88, T) == 1.0);
  CHECK(lr_factor(s, 89, T) == Approx(1.0 - 0.9 / 22).epsilon(1e-14));
  CHECK(lr_factor(s, 99, T) == Approx(1.0 - 0.9 * 11 / 22).epsilon(1e-14));
  CHECK(lr_factor(s, 110, T) == Approx(0.1).epsilon(1e-14));
  CHECK(lr_factor(s, 200, T) == Approx(0.1).epsilon(1e-14));
  // A decay window that would start inside the warmup starts where it ends: 6 warmup steps of 8
  // with decay_fraction 0.5 ramp to the peak, then decay over the last 2 steps (it fell from the
  // peak at step 5 to 0.325 at step 6).
  ScheduleConfig w = s;
  w.warmup_steps = 6, w.decay_fraction = 0.5;
  std::vector<double> f;
  for (int64_t i = 0; i < 8; ++i) f.push_back(lr_factor(w, i, 8));
  CHECK(f[5] == 1.0);
  CHECK(f[6] == Approx(0.55).epsilon(1e-14));
  CHECK(f[7] == Approx(0.1).epsilon(1e-14));
  w.decay_fraction = 0;  // (never decays)
  CHECK(lr_factor(w, 7, 8) == 1.0);
  w.warmup_steps = 10, w.decay_fraction = 0.5;  // a warmup past the last step: m after it, as cosine
  CHECK(lr_factor(w, 7, 8) == Approx(0.8).epsilon(1e-14));
  CHECK(lr_factor(w, 12, 8) == Approx(0.1).epsilon(1e-14));

  s.kind = "cosine";
  s.warmup_steps = 0;
  CHECK(lr_factor(s, 0, 101) == 1.0);
  CHECK(lr_factor(s, 50, 101) == Approx(0.55).epsilon(1e-14));
  CHECK(lr_factor(s, 100, 101) == Approx(0.1).epsilon(1e-14));
  CHECK_THAT(error_of([&] { lr_factor(s, -1, 10); }), Catch::Contains("step >= 0"));
  CHECK_THAT(error_of([&] { lr_factor(s, 0, 0); }), Catch::Contains("total_steps >= 1"));
}

namespace {
// Loads `yaml` through a Schema with the two sections, into o and s; returns the error or "".
std::string load_recipe(const std::string& yaml, OptimConfig& o, ScheduleConfig& s,
                        const std::vector<std::string>& overrides = {}) {
  Schema schema;
  o.fields(schema.section("optim"));
  s.fields(schema.section("schedule"));
  return error_of([&] {
    schema.load_string(yaml, "r.yaml");
    for (const auto& a : overrides) schema.apply_override(a);
    schema.validate();
  });
}
}  // namespace

TEST_CASE("optim and schedule recipe sections are strict", "[optim]") {
  OptimConfig o;
  ScheduleConfig s;
  CHECK(load_recipe("optim:\n  lr: 6e-4\n  beta2: 0.99\n  weight_decay: 0.05\n  decay_embeddings: true\n"
                    "schedule:\n  kind: wsd\n  warmup_steps: 100\n  decay_fraction: 0.1\n",
                    o, s, {"optim.grad_clip=0.5"}) == "");
  CHECK(o.lr == 6e-4);
  CHECK(o.beta1 == 0.9);  // default kept
  CHECK(o.beta2 == 0.99);
  CHECK(o.weight_decay == 0.05);
  CHECK(o.decay_embeddings);
  CHECK(o.grad_clip == 0.5);
  CHECK(s.kind == "wsd");
  CHECK(s.warmup_steps == 100);
  CHECK(s.decay_fraction == 0.1);
  CHECK(s.min_lr_ratio == 0.1);

  OptimConfig o2;
  ScheduleConfig s2;
  CHECK_THAT(load_recipe("optim:\n  lr: 1e-3\n  learning_rate: 1\n", o2, s2),
             Catch::Contains("r.yaml:3: optim.learning_rate: unknown key"));
  CHECK_THAT(load_recipe("schedule:\n  kind: cosin\n", o2, s2), Catch::Contains("did you mean 'cosine'"));
  CHECK_THAT(load_recipe("optim:\n  beta1: 1.0\n", o2, s2),
             Catch::Contains("optim.beta1: expected a number in [0, 1)"));
  CHECK_THAT(load_recipe("optim:\n  weight_decay: -0.1\n", o2, s2), Catch::Contains("optim.weight_decay"));
  CHECK_THAT(load_recipe("schedule:\n  min_lr_ratio: 1.5\n", o2, s2), Catch::Contains("schedule.min_lr_ratio"));
  CHECK_THAT(load_recipe("schedule:\n  warmup_steps: 1.5\n", o2, s2), Catch::Contains("expected an integer"));
}

TEST_CASE("ZeRO-1 pieces: each element of the concatenated parameters on exactly one rank, in equal chunks", "[optim][shard]") {
  const std::vector<int64_t> numels{7, 1, 10, 3, 0, 5};  // 26 elements
  for (int world : {1, 2, 3, 4, 7}) {
    std::vector<int> owner(26, -1);
    for (int r = 0; r < world; ++r) {
      int64_t mine = 0;
      for (const ShardPiece& pc : shard_pieces(numels, r, world)) {
        int64_t start = 0;
        for (size_t i = 0; i < pc.param; ++i) start += numels[i];
        REQUIRE(pc.length > 0);
        REQUIRE(pc.offset + pc.length <= numels[pc.param]);
        for (int64_t e = 0; e < pc.length; ++e) {
          CHECK(owner[static_cast<size_t>(start + pc.offset + e)] == -1);
          owner[static_cast<size_t>(start + pc.offset + e)] = r;
        }
        mine += pc.length;
      }
      const int64_t chunk = (26 + world - 1) / world;  // ceil: equal chunks for the all-gather
      CHECK(mine == std::max<int64_t>(0, std::min<int64_t>(chunk, 26 - r * chunk)));
    }
    CHECK(std::count(owner.begin(), owner.end(), -1) == 0);
    CHECK(std::is_sorted(owner.begin(), owner.end()));  // contiguous ranges in rank order
  }
  CHECK_THROWS(shard_pieces(numels, 2, 2));
}

TEST_CASE("ZeRO-1 on one rank equals AdamW bit for bit, with slice-named state", "[optim][shard]") {
  Distributed single = Distributed::from_env();
  REQUIRE(single.world_size() == 1);
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    torch::manual_seed(11);
    auto w = torch::randn({6, 5}).to(dtype), b = torch::randn({5}).to(dtype), e = torch::randn({9, 5}).to(dtype);
    std::vector<std::pair<std::string, torch::Tensor>> plain{{"w", w.clone()}, {"b", b.clone()}, {"model.embed_tokens.weight", e.clone()}};
    std::vector<std::pair<std::string, torch::Tensor>> sharded{{"w", w.clone()}, {"b", b.clone()}, {"model.embed_tokens.weight", e.clone()}};
    OptimConfig oc;
    AdamW a(plain, oc);
    ShardedAdamW z(sharded, oc, single);
    for (int step = 0; step < 4; ++step) {
      for (size_t i = 0; i < plain.size(); ++i) {
        auto g = torch::randn(plain[i].second.sizes()).to(dtype);
        plain[i].second.mutable_grad() = g.clone();
        sharded[i].second.mutable_grad() = g.clone();
      }
      a.step(1e-2);
      z.step(1e-2);
      a.zero_grad();
      z.zero_grad();
    }
    for (size_t i = 0; i < plain.size(); ++i) CHECK(torch::equal(plain[i].second, sharded[i].second));
    const auto names = z.local().decayed();
    CHECK(names == std::vector<std::string>{"w@0"});  // the bias and the embedding do not decay
  }
}

// One rank of the next test (hidden: only that test starts it).
TEST_CASE("ZeRO-1 step: one rank", "[.zero1_gather_worker]") {
  Distributed dist = Distributed::from_env(60);
  REQUIRE(dist.world_size() == 3);
  // 35 + 13 + 48 + 1 = 97 elements, which 3 ranks do not divide (the last chunk is padded).
  torch::manual_seed(5);
  const Named init = {{"a.weight", torch::randn({7, 5})},
                      {"norm.weight", torch::randn({13})},
                      {"b.weight", torch::randn({4, 4, 3})},
                      {"c.bias", torch::randn({1})}};
  const OptimConfig cfg = test_config();
  const Named ours = copy_params(init, torch::kFloat32), ref = copy_params(init, torch::kFloat32);
  // 16-byte gathers: one element of each rank's chunk at a time, so every chunk boundary and
  // parameter boundary falls inside the loop.
  ShardedAdamW sharded(ours, cfg, dist, 16);
  AdamW plain(ref, cfg);
  const auto grads = draw_grads(init, 3, 9);
  for (int s = 0; s < 3; ++s) {
    set_grads(ours, grads[s]);
    set_grads(ref, grads[s]);
    sharded.step(cfg.lr);
    plain.step(cfg.lr);
  }
  for (size_t i = 0; i < init.size(); ++i) {
    INFO(init[i].first);
    CHECK(torch::equal(ours[i].second, ref[i].second));  // (elementwise updates: exact)
  }
}

TEST_CASE("ZeRO-1's step gathers the updated chunks in small buckets into exactly the unsharded update (3 processes)",
          "[optim][distributed]") {
  CHECK(test::run_ranks("[.zero1_gather_worker]", 3) == std::vector<int>{0, 0, 0});
}

TEST_CASE("fp32 gradients of bf16 weights: autograd sums the micro batches' gradients in fp32", "[optim]") {
  // What train.fp32_grads relies on: an fp32 .grad set on a bf16 parameter before backward is
  // added into in place, in fp32. Through the model's real backward (embedding, attention, the
  // fused loss's own gradient, activation checkpointing): 32 micro batches, each one's bf16
  // gradient taken alone and summed in float64 as the reference.
  ModelConfig cfg = Recipe::parse(
                        "model: {vocab_size: 61, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
                        "ffn_dim: 48, max_seq_len: 16}",
                        "inline")
                        .model;
  torch::manual_seed(5);
  Transformer model(cfg);
  model->to(torch::kBFloat16);
  model->set_activation_checkpointing(true);
  const int64_t M = 32;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> batches;
  for (int64_t m = 0; m < M; ++m) {
    auto ids = torch::randint(0, cfg.vocab_size, {2, 9}, torch::kInt64);
    batches.emplace_back(ids.slice(1, 0, 8), ids.slice(1, 1, 9));
  }
  auto params = model->parameters();
  std::vector<torch::Tensor> reference;  // float64 sum of each micro batch's own bf16 gradient
  for (auto& p : params) reference.push_back(torch::zeros(p.sizes(), torch::kFloat64));
  for (const auto& [x, y] : batches) {
    for (auto& p : params) p.mutable_grad().reset();
    (model->forward_loss(x, y).loss / static_cast<double>(M)).backward();
    for (size_t i = 0; i < params.size(); ++i) reference[i] += params[i].grad().to(torch::kFloat64);
  }
  auto worst = [&](bool fp32) {  // largest error relative to the reference's largest element, any parameter
    for (auto& p : params) {
      p.mutable_grad().reset();
      if (fp32) p.mutable_grad() = torch::zeros(p.sizes(), p.options().dtype(torch::kFloat32));
    }
    for (const auto& [x, y] : batches) (model->forward_loss(x, y).loss / static_cast<double>(M)).backward();
    double e = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      CHECK(params[i].grad().scalar_type() == (fp32 ? torch::kFloat32 : torch::kBFloat16));
      const double scale = reference[i].abs().max().item<double>();
      e = std::max(e, (params[i].grad().to(torch::kFloat64) - reference[i]).abs().max().item<double>() / scale);
    }
    return e;
  };
  const double in_fp32 = worst(true), in_bf16 = worst(false);
  CHECK(in_fp32 < 1e-6);  // fp32 sums of bf16 values (8 significant bits): near exact
  CHECK(in_bf16 > 1e-3);  // autograd's own bf16 sum rounds at every micro batch
}
