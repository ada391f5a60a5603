// linear_cross_entropy (the LM head fused with the loss) against torch's own cross-entropy on the
// whole logits, and Transformer::forward_loss fused against plain.
#include "../catch_torch.h"

#include <cmath>

#include "../common.h"
#include "libllm/finetune.h"
#include "libllm/loss.h"
#include "libllm/model.h"
#include "libllm/recipe.h"

using namespace libllm;

namespace {

// torch's log-softmax + NLL over the whole logits: the reference.
torch::Tensor reference(const torch::Tensor& h, const torch::Tensor& w, const torch::Tensor& t, int64_t ignore) {
  auto logits = torch::matmul(h, w.t());  // (.., V)
  return torch::nn::functional::cross_entropy(logits.reshape({-1, w.size(0)}).to(torch::kFloat64), t.reshape({-1}),
                                              torch::nn::functional::CrossEntropyFuncOptions().ignore_index(ignore));
}

struct LossAndGrads {
  double loss;
  torch::Tensor gh, gw;
};

template <class F>
LossAndGrads run(F f, const torch::Tensor& h0, const torch::Tensor& w0, double scale) {
  auto h = h0.detach().clone().requires_grad_(true), w = w0.detach().clone().requires_grad_(true);
  auto loss = f(h, w);
  (loss * scale).backward();
  return {loss.template item<double>(), h.grad(), w.grad()};
}

}  // namespace

TEST_CASE("linear_cross_entropy: loss and gradients of the unfused cross-entropy, any chunking", "[model]") {
  // float64: agreement to 1e-12 with ignored targets, a chunk of one row, chunks that do not divide
  // the rows, all rows at once, the automatic size; the loss scaled before backward (accumulation).
  torch::manual_seed(3);
  auto h = torch::randn({3, 7, 16}, torch::kFloat64);  // (B, T, D)
  auto w = torch::randn({50, 16}, torch::kFloat64);    // (V, D)
  auto t = torch::randint(0, 50, {3, 7});
  t.index_put_({0, 2}, -100);
  t.index_put_({2, torch::indexing::Slice(4, 7)}, -100);
  auto ref = run([&](auto& a, auto& b) { return reference(a, b, t, -100); }, h, w, 0.25);
  for (int64_t chunk : {1, 4, 21, 100, 0}) {
    INFO("chunk " << chunk);
    auto got = run([&](auto& a, auto& b) { return linear_cross_entropy(a, b, t, -100, chunk); }, h, w, 0.25);
    CHECK(std::abs(got.loss - ref.loss) < 1e-12);
    CHECK(test::max_abs_diff(got.gh, ref.gh) < 1e-12);
    CHECK(test::max_abs_diff(got.gw, ref.gw) < 1e-12);
    CHECK(got.gh.sizes() == h.sizes());
  }
  // Only the weight (the input frozen), only the input (a frozen head): the other gets none.
  auto hw = w.detach().clone().requires_grad_(true);
  linear_cross_entropy(h, hw, t, -100, 5).backward();
  CHECK(test::max_abs_diff(hw.grad(), ref.gw / 0.25) < 1e-12);
  auto hh = h.detach().clone().requires_grad_(true);
  linear_cross_entropy(hh, w, t, -100, 5).backward();
  CHECK(test::max_abs_diff(hh.grad(), ref.gh / 0.25) < 1e-12);
  // No grad mode: the loss alone.
  torch::NoGradGuard no_grad;
  CHECK(std::abs(linear_cross_entropy(h, w, t, -100, 4).item<double>() - ref.loss) < 1e-12);
}

TEST_CASE("linear_cross_entropy in bf16 stays within bf16 rounding of the fp32 reference", "[model]") {
  torch::manual_seed(4);
  auto h = torch::randn({64, 32}).to(torch::kBFloat16);
  auto w = (torch::randn({300, 32}) * 0.3).to(torch::kBFloat16);
  auto t = torch::randint(0, 300, {64});
  auto ref = run([&](auto& a, auto& b) { return reference(a.to(torch::kFloat32), b.to(torch::kFloat32), t, -100); },
                 h, w, 1.0);
  auto got = run([&](auto& a, auto& b) { return linear_cross_entropy(a, b, t, -100, 24); }, h, w, 1.0);
  CHECK(got.gh.scalar_type() == torch::kBFloat16);
  CHECK(got.gw.scalar_type() == torch::kBFloat16);
  // The logits carry bf16's 2^-8 relative rounding of values of size ~3, the loss ~6.
  CHECK(std::abs(got.loss - ref.loss) < 0.02);
  CHECK(test::max_abs_diff(got.gh.to(torch::kFloat32), ref.gh.to(torch::kFloat32)) <
        0.02 * ref.gh.abs().max().item<double>());
  CHECK(test::max_abs_diff(got.gw.to(torch::kFloat32), ref.gw.to(torch::kFloat32)) <
        0.02 * ref.gw.abs().max().item<double>());
}

TEST_CASE("linear_cross_entropy: fp32_weight_grad sums a bf16 head gradient over the chunks in fp32", "[model]") {
  // 64 chunks of 8 rows. The reference is the fp64 gradient of the same bf16 inputs. Summed in bf16
  // the running sum rounds at every chunk; in fp32 only each chunk's product rounds (once), and the
  // total once more when autograd casts it to bf16.
  torch::manual_seed(5);
  auto h = torch::randn({512, 32}).to(torch::kBFloat16);
  auto w = (torch::randn({400, 32}) * 0.3).to(torch::kBFloat16);
  auto t = torch::randint(0, 400, {512});
  auto ref = run([&](auto& a, auto& b) { return reference(a.to(torch::kFloat64), b.to(torch::kFloat64), t, -100); }, h,
                 w, 0.25);
  auto err = [&](bool fp32) {
    auto got = run([&](auto& a, auto& b) { return linear_cross_entropy(a, b, t, -100, 8, fp32); }, h, w, 0.25);
    CHECK(got.gw.scalar_type() == torch::kBFloat16);
    return ((got.gw.to(torch::kFloat64) - ref.gw).norm() / ref.gw.norm()).item<double>();
  };
  const double bf16 = err(false), fp32 = err(true);
  // Measured 9.1e-3 and 3.0e-3 of the gradient's norm.
  CHECK(fp32 < 5e-3);
  CHECK(bf16 > 2 * fp32);
  // No effect on fp32 weights, nor with a single chunk.
  auto h32 = h.to(torch::kFloat32), w32 = w.to(torch::kFloat32);
  auto a = run([&](auto& x, auto& y) { return linear_cross_entropy(x, y, t, -100, 8, true); }, h32, w32, 0.25);
  auto b = run([&](auto& x, auto& y) { return linear_cross_entropy(x, y, t, -100, 8, false); }, h32, w32, 0.25);
  CHECK(torch::equal(a.gw, b.gw));
  auto c = run([&](auto& x, auto& y) { return linear_cross_entropy(x, y, t, -100, 512, true); }, h, w, 0.25);
  auto d = run([&](auto& x, auto& y) { return linear_cross_entropy(x, y, t, -100, 512, false); }, h, w, 0.25);
  CHECK(torch::equal(c.gw, d.gw));
}

TEST_CASE("linear_cross_entropy: no counted target is NaN with zero gradients, and shapes are checked", "[model]") {
  auto h = torch::randn({4, 8}, torch::kFloat64), w = torch::randn({10, 8}, torch::kFloat64);
  auto t = torch::full({4}, -100, torch::kInt64);
  auto got = run([&](auto& a, auto& b) { return linear_cross_entropy(a, b, t); }, h, w, 1.0);
  CHECK(std::isnan(got.loss));
  CHECK(got.gh.abs().max().item<double>() == 0);
  CHECK(got.gw.abs().max().item<double>() == 0);
  CHECK_THROWS_WITH(linear_cross_entropy(h, torch::randn({10, 9}), t),
                    Catch::Contains("do not fit an LM head weight of shape [10, 9]"));
  CHECK_THROWS_WITH(linear_cross_entropy(h, w, torch::zeros({5}, torch::kInt64)),
                    Catch::Contains("5 targets for 4 positions"));
}

TEST_CASE("forward_loss: the fused loss gives the plain path's loss and every gradient", "[model]") {
  // Untied and tied heads, packed rows, a mixture of experts, and a LoRA head (which always takes
  // the plain path), in float64.
  for (const std::string extra : {"", ", tie_embeddings: true", ", n_experts: 3, n_experts_per_token: 2, moe_aux_loss_coef: 0.1"}) {
    for (bool lora : {false, true}) {
      INFO(extra << (lora ? " lora" : ""));
      const bool tied = extra.find("tie") != std::string::npos;
      torch::manual_seed(8);
      Transformer m(Recipe::parse("model: {vocab_size: 61, dim: 16, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
                                  "ffn_dim: 24, max_seq_len: 32, init_std: 0.2" + extra + "}",
                                  "inline")
                        .model);
      if (lora) {
        LoraConfig lc;
        lc.dropout = 0;
        lc.targets = {"q_proj", tied ? "v_proj" : "lm_head"};
        apply_lora(m, lc);
        for (auto& p : m->named_parameters())  // B != 0, so the adapter changes the logits
          if (p.key().find("lora_B") != std::string::npos) p.value().detach().normal_(0, 0.1);
      }
      m->to(torch::kFloat64);
      auto ids = torch::randint(0, 61, {2, 11});
      auto targets = torch::randint(0, 61, {2, 11});
      targets.index_put_({1, torch::indexing::Slice(0, 3)}, -100);
      auto docs = torch::tensor({0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1}).view({2, 11});
      for (bool packed : {false, true}) {
        auto grads = [&](bool fused) {
          m->set_fused_loss(fused);
          m->zero_grad();
          auto out = m->forward_loss(ids, targets, packed ? docs : torch::Tensor());
          CHECK(out.logits.defined() == (!fused || (lora && !tied)));
          (out.loss + out.aux_loss).backward();
          std::vector<torch::Tensor> g;
          for (auto& p : m->parameters())
            if (p.requires_grad()) g.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
          return std::make_pair(out.loss.item<double>(), g);
        };
        auto [plain_loss, plain] = grads(false);
        auto [fused_loss, fused] = grads(true);
        CHECK(std::abs(plain_loss - fused_loss) < 1e-12);
        REQUIRE(plain.size() == fused.size());
        for (size_t i = 0; i < plain.size(); ++i) CHECK(test::max_abs_diff(plain[i], fused[i]) < 1e-12);
        // The plain path is cross_entropy on forward's logits.
        auto out = packed ? m->forward_packed(ids, docs) : m->forward(ids);
        CHECK(std::abs(cross_entropy(out.logits, targets).item<double>() - plain_loss) < 1e-12);
      }
    }
  }
}

TEST_CASE("linear_cross_entropy in bf16 scales by the incoming gradient without bias", "[model]") {
  // (loss / 3).backward(), as with 3 accumulation steps, against loss.backward() / 3 in float64:
  // the factor applied in fp32 leaves only each element's final rounding (unbiased, so the
  // projection <g, ref> / <ref, ref> is 1 within 1e-4), where 1/3 rounded to bf16 would scale
  // every gradient by 1.002.
  torch::manual_seed(5);
  auto h = torch::randn({96, 64}).to(torch::kBFloat16);
  auto w = (torch::randn({500, 64}) * 0.2).to(torch::kBFloat16);
  auto t = torch::randint(0, 500, {96});
  auto third = run([&](auto& a, auto& b) { return linear_cross_entropy(a, b, t, -100, 40); }, h, w, 1.0 / 3.0);
  auto whole = run([&](auto& a, auto& b) { return linear_cross_entropy(a, b, t, -100, 40); }, h, w, 1.0);
  auto ratio = [](const torch::Tensor& g, const torch::Tensor& whole) {
    auto g64 = g.to(torch::kFloat64), r = whole.to(torch::kFloat64) / 3.0;
    return ((g64 * r).sum() / (r * r).sum()).item<double>();
  };
  CHECK(std::abs(ratio(third.gh, whole.gh) - 1) < 1e-4);
  CHECK(std::abs(ratio(third.gw, whole.gw) - 1) < 1e-4);
  CHECK(third.gh.scalar_type() == torch::kBFloat16);
}

TEST_CASE("forward_loss: fused over several chunks with checkpointing and accumulation equals plain", "[model]") {
  // Two micro batches accumulated into .grad (loss / 2 each), activation checkpointing, chunks of 5
  // rows over 22 positions, float64; a second backward through one fused loss is a clear error.
  torch::manual_seed(9);
  Transformer m(Recipe::parse("model: {vocab_size: 61, dim: 16, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
                              "ffn_dim: 24, max_seq_len: 32, init_std: 0.2}",
                              "inline")
                    .model);
  m->to(torch::kFloat64);
  m->set_activation_checkpointing(true);
  std::vector<std::pair<torch::Tensor, torch::Tensor>> batches;
  for (int i = 0; i < 2; ++i) batches.emplace_back(torch::randint(0, 61, {2, 11}), torch::randint(0, 61, {2, 11}));
  auto grads = [&](bool fused) {
    m->set_fused_loss(fused, 5);
    m->zero_grad();
    double loss = 0;
    for (auto& [x, y] : batches) {
      auto out = m->forward_loss(x, y);
      (out.loss / 2.0).backward();
      loss += out.loss.item<double>() / 2;
    }
    std::vector<torch::Tensor> g;
    for (auto& p : m->parameters()) g.push_back(p.grad().clone());
    return std::make_pair(loss, g);
  };
  auto [plain_loss, plain] = grads(false);
  auto [fused_loss, fused] = grads(true);
  CHECK(std::abs(plain_loss - fused_loss) < 1e-12);
  REQUIRE(plain.size() == fused.size());
  for (size_t i = 0; i < plain.size(); ++i) CHECK(test::max_abs_diff(plain[i], fused[i]) < 1e-12);
  auto loss = m->forward_loss(batches[0].first, batches[0].second).loss;
  loss.backward({}, /*retain_graph=*/true);
  CHECK_THROWS_WITH(loss.backward(), Catch::Contains("backward ran twice through one loss"));
}
