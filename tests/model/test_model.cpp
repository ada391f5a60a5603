// The decoder against the independent float64 reference (tests/fixtures/make_fixtures.py,
// transformers' LLaMA/Mistral/Mixtral semantics), plus properties and gradient checks.
#include "../catch_torch.h"

#include "../common.h"
#include "libllm/hf.h"
#include "libllm/model.h"
#include "libllm/recipe.h"
#include "libllm/safetensors.h"

using namespace libllm;
using libllm::test::expected;
using libllm::test::fixture;

namespace {

torch::Tensor reference_logits(const std::string& name) {
  auto f = safetensors::File::open(fixture(name + "/ref_logits.safetensors"));
  const auto& info = f->at("logits");
  return torch::from_blob(const_cast<uint8_t*>(f->data(info)), info.shape, torch::kFloat32).clone();
}

ModelConfig small_config(const std::string& extra = "") {
  return Recipe::parse("model: {vocab_size: 37, dim: 16, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 24, "
                       "max_seq_len: 32" + extra + "}",
                       "inline")
      .model;
}

}  // namespace

TEST_CASE("fp32 logits and losses match the float64 reference", "[model]") {
  for (const std::string name : {"tiny-llama", "tiny-mistral", "tiny-mixtral"}) {
    INFO(name);
    const auto& e = expected()[name];
    Pretrained p = load_pretrained(fixture(name), torch::kFloat32);
    auto ids = test::tokens_from_json(e["input_ids"]);
    torch::NoGradGuard no_grad;
    auto out = p.model->forward(ids);
    auto ref = reference_logits(name);
    REQUIRE(out.logits.sizes() == ref.sizes());
    // fp32 against float64: logits are O(1); 1e-4 absolute is ~100x the observed error.
    CHECK(test::max_abs_diff(out.logits, ref) < 1e-4);
    for (const auto& s : e["logits_sample"])
      CHECK(out.logits[s[0].get<int64_t>()][s[1].get<int64_t>()][s[2].get<int64_t>()].item<double>() ==
            Approx(s[3].get<double>()).margin(1e-4));
    auto loss = cross_entropy(out.logits.slice(1, 0, -1), ids.slice(1, 1));
    CHECK(loss.item<double>() == Approx(e["loss"].get<double>()).margin(1e-5));
    if (e.contains("aux_loss")) {
      CHECK(out.balance_loss.item<double>() == Approx(e["aux_loss"].get<double>()).margin(1e-5));
      CHECK(out.z_loss.item<double>() == Approx(e["z_loss"].get<double>()).margin(1e-4));
      CHECK(out.aux_loss.item<double>() ==
            Approx(0.02 * e["aux_loss"].get<double>()).margin(1e-6));  // router_aux_loss_coef from config.json
    }
  }
}

TEST_CASE("bf16 logits stay within bf16 rounding of the reference", "[model]") {
  for (const std::string name : {"tiny-llama", "tiny-mixtral"}) {
    INFO(name);
    Pretrained p = load_pretrained(fixture(name), torch::kBFloat16);
    torch::NoGradGuard no_grad;
    auto logits = p.model->forward(test::tokens_from_json(expected()[name]["input_ids"])).logits;
    CHECK(logits.scalar_type() == torch::kBFloat16);
    auto ref = reference_logits(name);
    // bf16 keeps 8 significant bits (relative step 2^-8 = 0.0039); errors compound over 2 blocks.
    CHECK(test::max_abs_diff(logits, ref) < 0.04 * ref.abs().max().item<double>() + 0.02);
    // As a whole: relative L2 error and the loss (observed: llama 1.23e-2 and 4.2e-4 nats,
    // mixtral 8.1e-3 and 1e-4 nats; the bounds are about 3x the larger).
    const auto d = logits.to(torch::kFloat64) - ref.to(torch::kFloat64);
    const double rel = (d.norm() / ref.to(torch::kFloat64).norm()).item<double>();
    const auto ids = test::tokens_from_json(expected()[name]["input_ids"]);
    const double loss = cross_entropy(logits.slice(1, 0, -1).to(torch::kFloat32), ids.slice(1, 1)).item<double>();
    INFO("relative L2 " << rel << ", loss " << loss << " vs " << expected()[name]["loss"].get<double>());
    CHECK(rel < 4e-2);
    CHECK(std::abs(loss - expected()[name]["loss"].get<double>()) < 1.5e-3);
  }
}

TEST_CASE("attention is causal, and a sliding window hides tokens further back", "[model]") {
  torch::manual_seed(0);
  ModelConfig one = small_config(), one_windowed = small_config(", sliding_window: 4");
  one.n_layers = one_windowed.n_layers = 1;
  Transformer full(one);
  Transformer windowed(one_windowed);
  torch::NoGradGuard no_grad;
  auto a = torch::randint(0, 37, {1, 12});
  auto b = a.clone();
  b[0][0] = (a[0][0].item<int64_t>() + 1) % 37;  // change only the first token
  auto fa = full->forward(a).logits, fb = full->forward(b).logits;
  CHECK(test::max_abs_diff(fa.slice(1, 0, 1), fb.slice(1, 0, 1)) > 1e-4);  // position 0 sees it
  CHECK(test::max_abs_diff(fa.slice(1, 11), fb.slice(1, 11)) > 1e-6);       // so does the last, with full attention
  auto c = a.clone();
  c[0][11] = (a[0][11].item<int64_t>() + 1) % 37;  // change only the last token
  CHECK(test::max_abs_diff(full->forward(c).logits.slice(1, 0, 11), fa.slice(1, 0, 11)) == 0.0);
  auto wa = windowed->forward(a).logits, wb = windowed->forward(b).logits;
  // Window 4: positions 0..3 see token 0, positions >= 4 do not.
  CHECK(test::max_abs_diff(wa.slice(1, 3, 4), wb.slice(1, 3, 4)) > 1e-6);
  CHECK(test::max_abs_diff(wa.slice(1, 4), wb.slice(1, 4)) == 0.0);
}

TEST_CASE("rotary embeddings make attention scores depend only on relative position", "[model]") {
  torch::manual_seed(1);
  Rotary rope(8, 10000.0);
  auto q = torch::randn({1, 1, 1, 8}, torch::kFloat64), k = torch::randn({1, 1, 1, 8}, torch::kFloat64);
  auto score = [&](int64_t qpos, int64_t kpos) {
    auto [cq, sq] = rope.table(qpos, 1, torch::kCPU, torch::kFloat64);
    auto [ck, sk] = rope.table(kpos, 1, torch::kCPU, torch::kFloat64);
    return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item<double>();
  };
  CHECK(score(7, 3) == Approx(score(107, 103)).epsilon(1e-5));
  CHECK(score(7, 3) != Approx(score(7, 4)).epsilon(1e-3));
  // Position 0 is the identity.
  auto [c0, s0] = rope.table(0, 1, torch::kCPU, torch::kFloat64);
  CHECK(test::max_abs_diff(apply_rotary(q, c0, s0), q) == 0.0);
}

TEST_CASE("dropless MoE equals the dense sum over each token's top-k experts", "[model]") {
  torch::manual_seed(2);
  ModelConfig cfg = small_config(", n_experts: 4, n_experts_per_token: 2, init_std: 0.3");
  cfg.resolve();
  MoE moe(cfg);
  {
    torch::NoGradGuard no_grad;  // a module's weights are zeros until a model initialises them
    for (auto& p : moe->parameters()) p.normal_(0.0, cfg.init_std);
  }
  auto x = torch::randn({2, 5, 16});
  std::vector<torch::Tensor> logits;
  auto y = moe->forward(x, logits);
  auto xf = x.view({10, 16});
  auto probs = torch::softmax(moe->gate(xf), -1);
  auto expected_y = torch::zeros_like(xf);
  for (int64_t n = 0; n < 10; ++n) {
    auto [w, idx] = probs[n].topk(2);
    w = w / w.sum();
    for (int64_t j = 0; j < 2; ++j)
      expected_y[n] += w[j] * moe->experts[idx[j].item<int64_t>()]->as<MLPImpl>()->forward(xf[n].unsqueeze(0))[0];
  }
  CHECK(test::max_abs_diff(y.view({10, 16}), expected_y) < 1e-5);
  REQUIRE(logits.size() == 1);
  CHECK(logits[0].sizes() == torch::IntArrayRef({10, 4}));
}

TEST_CASE("forward_loss: the MoE losses of a padded batch are those of its real positions alone", "[model]") {
  // Right padding: causal attention keeps the real positions' router logits those of each row on
  // its own, so the reference runs every row unpadded and averages over exactly those positions
  // (transformers' load_balancing_loss_func with an attention_mask).
  torch::manual_seed(5);
  ModelConfig cfg = small_config(", n_experts: 4, n_experts_per_token: 2, init_std: 0.3, moe_z_loss_coef: 0.01");
  Transformer m(cfg);
  m->to(torch::kFloat64);
  const std::vector<int64_t> lengths{7, 3, 5};
  auto ids = torch::randint(0, 37, {3, 7});
  auto padding = torch::zeros({3, 7}, torch::kBool);  // (B, T)
  for (int64_t b = 0; b < 3; ++b) padding[b].slice(0, lengths[static_cast<size_t>(b)]).fill_(true);
  auto targets = torch::randint(0, 37, {3, 7}).masked_fill(padding, -100);
  std::vector<std::vector<torch::Tensor>> per_layer;  // rows' router logits of each layer
  for (int64_t b = 0; b < 3; ++b) {
    std::vector<torch::Tensor> logits;
    m->hidden(ids[b].slice(0, 0, lengths[static_cast<size_t>(b)]).unsqueeze(0), 0, &logits);
    per_layer.resize(logits.size());
    for (size_t l = 0; l < logits.size(); ++l) per_layer[l].push_back(logits[l]);
  }
  std::vector<torch::Tensor> layers;
  for (auto& rows : per_layer) layers.push_back(torch::cat(rows, 0));  // (15, E)
  const auto all = torch::cat(layers, 0);                              // (L * 15, E)
  const double balance = load_balancing_loss(all, 2).item<double>(), z = router_z_loss(all).item<double>();
  for (bool fused : {true, false}) {
    m->set_fused_loss(fused);
    auto out = m->forward_loss(ids, targets, {}, padding);
    CHECK(out.balance_loss.item<double>() == Approx(balance).epsilon(1e-12));
    CHECK(out.z_loss.item<double>() == Approx(z).epsilon(1e-12));
    CHECK(out.aux_loss.item<double>() ==
          Approx(cfg.moe_aux_loss_coef * balance + cfg.moe_z_loss_coef * z).epsilon(1e-12));
    // Counting the padding changes them: the reference is not the unmasked mean.
    auto unmasked = m->forward_loss(ids, targets);
    CHECK(std::abs(unmasked.z_loss.item<double>() - z) > 1e-6);
    // The cross-entropy is unchanged (padding has no targets).
    CHECK(out.loss.item<double>() == Approx(unmasked.loss.item<double>()).epsilon(1e-12));
  }
  CHECK_THAT(test::error_of([&] { m->forward_loss(ids, targets, {}, padding.slice(1, 0, 5)); }),
             Catch::Contains("padding has 15 positions"));
}

TEST_CASE("gradients match central finite differences in float64", "[model]") {
  // Covers what libllm writes itself: RMSNorm, rotary, GQA with a sliding window, MoE routing
  // and its auxiliary losses, tied embeddings.
  torch::manual_seed(3);
  ModelConfig cfg = small_config(", sliding_window: 3, n_experts: 3, n_experts_per_token: 2, moe_z_loss_coef: 0.01, "
                                 "tie_embeddings: true, init_std: 0.2");
  Transformer m(cfg);
  m->to(torch::kFloat64);
  auto ids = torch::randint(0, 37, {2, 7});
  auto loss_fn = [&] {
    auto out = m->forward(ids);
    return cross_entropy(out.logits.slice(1, 0, -1), ids.slice(1, 1)) + out.aux_loss;
  };
  m->zero_grad();
  loss_fn().backward();
  torch::NoGradGuard no_grad;
  std::mt19937 rng(0);
  int checked = 0;
  for (auto& p : m->named_parameters()) {
    auto flat = p.value().view({-1});
    auto grad = p.value().grad().view({-1});
    for (int rep = 0; rep < 2; ++rep) {
      const int64_t i = static_cast<int64_t>(rng() % flat.numel());
      const double h = 1e-6, old = flat[i].item<double>();
      flat[i] = old + h;
      const double up = loss_fn().item<double>();
      flat[i] = old - h;
      const double down = loss_fn().item<double>();
      flat[i] = old;
      const double numeric = (up - down) / (2 * h);
      INFO(p.key() << "[" << i << "]");
      CHECK(grad[i].item<double>() == Approx(numeric).margin(1e-7).epsilon(1e-5));
      ++checked;
    }
  }
  CHECK(checked > 20);
}

TEST_CASE("initialisation: normal(init_std), depth-scaled output projections, unit norms", "[model]") {
  torch::manual_seed(4);
  ModelConfig cfg = Recipe::parse("model: {vocab_size: 300, dim: 256, n_layers: 8, n_heads: 4, ffn_dim: 512, "
                                  "init_std: 0.02, init_depth_scaled: true}",
                                  "inline")
                        .model;
  Transformer m(cfg);
  auto params = m->named_parameters();
  const double scaled = 0.02 / std::sqrt(16.0);
  CHECK(params["model.layers.3.self_attn.q_proj.weight"].std().item<double>() == Approx(0.02).epsilon(0.03));
  CHECK(params["model.layers.3.self_attn.o_proj.weight"].std().item<double>() == Approx(scaled).epsilon(0.03));
  CHECK(params["model.layers.3.mlp.down_proj.weight"].std().item<double>() == Approx(scaled).epsilon(0.03));
  CHECK(params["model.embed_tokens.weight"].std().item<double>() == Approx(0.02).epsilon(0.03));
  CHECK(params["model.layers.3.input_layernorm.weight"].eq(1).all().item<bool>());
  CHECK(params["model.layers.3.mlp.up_proj.weight"].mean().abs().item<double>() < 1e-3);
}

TEST_CASE("the initial normals have the normal distribution's moments and tails", "[model]") {
  torch::manual_seed(7);
  // 2,000,000 values: the sample mean's standard error is 0.02 / 1414 = 1.4e-5, the sample std's
  // 0.05%, a tail fraction's at most 3.5e-4; each bound below is at least 6 of those.
  ModelConfig cfg = Recipe::parse("model: {vocab_size: 31250, dim: 64, n_layers: 1, n_heads: 4, ffn_dim: 128}", "inline").model;
  Transformer m(cfg);
  auto params = m->named_parameters();
  auto z = params["model.embed_tokens.weight"].to(torch::kFloat64).reshape({-1}) / cfg.init_std;
  REQUIRE(z.numel() == 2000000);
  CHECK(std::abs(z.mean().item<double>()) < 6 * 7e-4);
  CHECK(z.std().item<double>() == Approx(1.0).epsilon(0.003));
  auto frac = [&](double k) { return z.abs().lt(k).to(torch::kFloat64).mean().item<double>(); };
  CHECK(frac(1.0) == Approx(0.682689).margin(0.002));
  CHECK(frac(2.0) == Approx(0.954500).margin(0.0012));
  CHECK(frac(3.0) == Approx(0.997300).margin(0.0003));
  CHECK(z.pow(4).mean().item<double>() == Approx(3.0).epsilon(0.02));  // kurtosis
  // Neighbours (the cosine and sine of one Box-Muller pair) and other parameters are uncorrelated.
  auto even = z.slice(0, 0, z.numel(), 2), odd = z.slice(0, 1, z.numel(), 2);
  CHECK(std::abs((even * odd).mean().item<double>()) < 0.005);
  auto a = params["model.layers.0.mlp.gate_proj.weight"].reshape({-1}), b = params["model.layers.0.mlp.up_proj.weight"].reshape({-1});
  CHECK(std::abs(torch::corrcoef(torch::stack({a, b})).index({0, 1}).item<double>()) < 0.02);
}

TEST_CASE("the initial weights are a function of the seed, the name and the index alone", "[model]") {
  ModelConfig cfg = small_config(", init_std: 0.1");
  torch::manual_seed(8);
  Transformer a(cfg);
  torch::manual_seed(8);
  torch::randn({1000});  // other draws after the seed do not matter
  Transformer b(cfg, TransformerImpl::Deferred{torch::kBFloat16});
  CHECK(b->init_seed() != a->init_seed());
  torch::manual_seed(8);
  Transformer c(cfg, TransformerImpl::Deferred{torch::kBFloat16});
  REQUIRE(c->init_seed() == a->init_seed());
  // Deferred: shapes and dtype, no values.
  CHECK(c->deferred());
  int64_t bytes = 0;
  for (const auto& p : c->named_parameters()) {
    CHECK(p.value().sizes() == a->named_parameters()[p.key()].sizes());
    CHECK(p.value().scalar_type() == torch::kBFloat16);
    bytes += static_cast<int64_t>(p.value().storage().nbytes());
  }
  CHECK(bytes <= 2 * static_cast<int64_t>(c->named_parameters().size()));
  // Any slice of any parameter, in any dtype, without the rest.
  auto aw = a->named_parameters()["model.layers.1.self_attn.k_proj.weight"].reshape({-1});
  for (int64_t offset : {0, 1, 7, 100}) {
    auto part = torch::empty({17});
    a->init_parameter("model.layers.1.self_attn.k_proj.weight", part, offset);
    CHECK(torch::equal(part, aw.narrow(0, offset, 17)));
    auto half = torch::empty({17}, torch::kBFloat16);
    c->init_parameter("model.layers.1.self_attn.k_proj.weight", half, offset);
    CHECK(torch::equal(half, aw.narrow(0, offset, 17).to(torch::kBFloat16)));
  }
  // Moving or casting it now would allocate every weight filled with one value: refused.
  CHECK_THAT(test::error_of([&] { c->to(torch::kFloat32); }), Catch::Contains("cannot move or cast a deferred model"));
  CHECK_THAT(test::error_of([&] { c->to(torch::kCPU); }), Catch::Contains("materialize()"));
  CHECK_THAT(test::error_of([&] { c->to(torch::kCPU, torch::kFloat32); }), Catch::Contains("deferred"));
  c->materialize();
  CHECK(!c->deferred());
  for (const auto& p : c->named_parameters())
    CHECK(torch::equal(p.value(), a->named_parameters()[p.key()].to(torch::kBFloat16)));
  c->to(torch::kFloat32);  // allowed once materialised
  CHECK(c->parameters().front().scalar_type() == torch::kFloat32);
}

TEST_CASE("a deferred LLaMA-65B is built without memory for its weights", "[model]") {
  const Recipe r = Recipe::load(test::source("recipes/llama-65b.yaml"));
  torch::manual_seed(9);
  Transformer m(r.model, TransformerImpl::Deferred{torch::kBFloat16});
  int64_t numel = 0, bytes = 0;
  for (const auto& p : m->parameters()) {
    numel += p.numel();
    bytes += static_cast<int64_t>(p.storage().nbytes());
  }
  CHECK(numel > 65e9);
  CHECK(bytes < 4096);
  // A slice of the last block's up projection, as the rank that owns it computes it.
  auto part = torch::empty({4}, torch::kBFloat16);
  m->init_parameter("model.layers.79.mlp.up_proj.weight", part, 123456789);
  CHECK(part.to(torch::kFloat32).abs().max().item<double>() > 0);
  CHECK(part.to(torch::kFloat32).abs().max().item<double>() < 6 * r.model.init_std);
}

TEST_CASE("tied embeddings: one matrix serves as embedding and LM head", "[model]") {
  torch::manual_seed(5);
  Transformer m(small_config(", tie_embeddings: true"));
  CHECK(!m->lm_head);
  CHECK(!m->named_parameters().contains("lm_head.weight"));
  torch::NoGradGuard no_grad;
  auto ids = torch::randint(0, 37, {1, 5});
  auto h = m->hidden(ids, 0, nullptr);
  CHECK(test::max_abs_diff(m->forward(ids).logits, torch::matmul(h, m->model->embed_tokens->weight.t())) < 1e-6);
}

TEST_CASE("activation checkpointing gives the same loss and gradients", "[model]") {
  // Dense, and mixture-of-experts with both router losses (their gradients reach the router
  // through the checkpointed block's router logits).
  for (const std::string extra : {", sliding_window: 5, init_std: 0.2",
                                  ", init_std: 0.2, n_experts: 4, n_experts_per_token: 2, moe_aux_loss_coef: 0.5, "
                                  "moe_z_loss_coef: 0.1"}) {
    INFO(extra);
    torch::manual_seed(6);
    Transformer m(small_config(extra));
    m->to(torch::kFloat64);
    auto ids = torch::randint(0, 37, {2, 9});
    auto grads = [&](bool on) {
      m->set_activation_checkpointing(on);
      m->zero_grad();
      auto out = m->forward(ids);
      auto loss = cross_entropy(out.logits.slice(1, 0, -1), ids.slice(1, 1)) + out.aux_loss;
      loss.backward();
      std::vector<torch::Tensor> g;
      for (auto& p : m->parameters()) g.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
      return std::make_pair(loss.item<double>(), g);
    };
    auto [plain_loss, plain] = grads(false);
    auto [ckpt_loss, ckpt] = grads(true);
    CHECK(plain_loss == ckpt_loss);
    REQUIRE(plain.size() == ckpt.size());
    double router = 0;
    for (size_t i = 0; i < plain.size(); ++i) CHECK(test::max_abs_diff(plain[i], ckpt[i]) < 1e-12);
    for (auto& p : m->named_parameters())
      if (p.key().find(".gate.weight") != std::string::npos) router += p.value().grad().abs().sum().item<double>();
    if (extra.find("n_experts") != std::string::npos) CHECK(router > 0);
  }
}

TEST_CASE("document positions restart with each document, the mask stays inside one", "[model]") {
  auto docs = torch::tensor({0, 0, 0, 1, 1, 2}, torch::kInt64).view({1, 6});
  CHECK(document_positions(docs).view({6}).equal(torch::tensor({0, 1, 2, 0, 1, 0}, torch::kInt64)));
  auto mask = document_mask(docs);  // (1, 1, 6, 6)
  REQUIRE(mask.sizes() == torch::IntArrayRef({1, 1, 6, 6}));
  auto expect = torch::tensor({1, 0, 0, 0, 0, 0,  //
                               1, 1, 0, 0, 0, 0,  //
                               1, 1, 1, 0, 0, 0,  //
                               0, 0, 0, 1, 0, 0,  //
                               0, 0, 0, 1, 1, 0,  //
                               0, 0, 0, 0, 0, 1},
                              torch::kBool)
                    .view({1, 1, 6, 6});
  CHECK(mask.equal(expect));
  // A document is a run of equal ids: an id that comes back starts another document.
  auto again = torch::tensor({0, 0, 1, 0}, torch::kInt64).view({1, 4});
  CHECK(document_mask(again)[0][0][3].equal(torch::tensor({0, 0, 0, 1}, torch::kBool)));
  CHECK(document_positions(again).view({4}).equal(torch::tensor({0, 1, 0, 0}, torch::kInt64)));
  // Windows of EOS-terminated documents (EOS = 2): a document starts after each EOS.
  auto window = torch::tensor({5, 2, 7, 8, 2, 2, 9, 4, 3, 2, 6, 6}, torch::kInt64).view({2, 6});
  CHECK(documents_after(window, 2).equal(torch::tensor({0, 0, 1, 1, 1, 2, 0, 0, 0, 0, 1, 1}, torch::kInt64).view({2, 6})));
  // Segments: (row, start, length) of each document, row by row.
  auto two_rows = torch::tensor({0, 0, 1, 1, 1, 2, 5, 5, 5, 5, 5, 5}, torch::kInt64).view({2, 6});
  CHECK(document_segments(two_rows).equal(torch::tensor({0, 0, 2, 0, 2, 3, 0, 5, 1, 1, 0, 6}, torch::kInt64).view({4, 3})));
  // Per-token rotary tables equal the (start, T) table at the same positions.
  Rotary rope(8, 10000.0);
  auto [c, s] = rope.table(torch::tensor({3, 4, 5}, torch::kInt64).view({1, 3}), torch::kFloat32);  // (1, 1, 3, 8)
  auto [c3, s3] = rope.table(3, 3, torch::kCPU, torch::kFloat32);                                     // (3, 8)
  CHECK(c.squeeze(0).squeeze(0).equal(c3));
  CHECK(s.squeeze(0).squeeze(0).equal(s3));
}

TEST_CASE("packed rows: every document's logits and gradients are those it has alone", "[model]") {
  // Row 0 packs documents of 5, 9 and 3 tokens and 3 positions of padding; row 1 is one document.
  const std::vector<std::vector<int64_t>> lengths = {{5, 9, 3}, {20}};
  const int64_t T = 20;
  for (const std::string extra : {"", ", sliding_window: 4", ", n_experts: 4, n_experts_per_token: 2"}) {
    for (auto [checkpointing, how] : {std::pair{false, PackedAttention::kSegments}, std::pair{true, PackedAttention::kSegments},
                                      std::pair{false, PackedAttention::kBias}, std::pair{true, PackedAttention::kBias}}) {
      INFO(extra << (checkpointing ? " with activation checkpointing" : "")
                 << (how == PackedAttention::kBias ? ", bias mask" : ", segments"));
      torch::manual_seed(11);
      Transformer m(small_config(extra + ", init_std: 0.2"));
      m->to(torch::kFloat64);
      m->set_activation_checkpointing(checkpointing);
      m->set_packed_attention(how);
      auto tokens = torch::randint(0, 37, {2, T});
      auto docs = torch::empty({2, T}, torch::kInt64);
      auto targets = torch::full({2, T}, -100, torch::kInt64);
      std::vector<std::tuple<int64_t, int64_t, int64_t>> spans;  // (row, start, length)
      for (int64_t b = 0; b < 2; ++b) {
        int64_t p = 0, k = 0;
        for (int64_t L : lengths[static_cast<size_t>(b)]) {
          spans.emplace_back(b, p, L);
          for (int64_t t = 0; t < L; ++t) {
            docs[b][p + t] = k;
            if (t + 1 < L) targets[b][p + t] = tokens[b][p + t + 1];
          }
          p += L, ++k;
        }
        for (; p < T; ++p) docs[b][p] = k;  // padding: a document of its own
      }
      // Packed: mean loss over the targets of both rows.
      m->zero_grad();
      auto packed = m->forward_packed(tokens, docs).logits;  // (2, T, V)
      cross_entropy(packed, targets).backward();
      std::vector<torch::Tensor> packed_grads;
      for (auto& p : m->parameters()) packed_grads.push_back(p.grad().clone());
      // Alone: each document by itself, the same loss as a sum over documents.
      m->zero_grad();
      int64_t count = 0;
      for (auto [b, start, L] : spans) count += L - 1;
      for (auto [b, start, L] : spans) {
        auto ids = tokens.slice(1, start, start + L).slice(0, b, b + 1);  // (1, L)
        auto alone = m->forward(ids).logits;                              // (1, L, V)
        {
          torch::NoGradGuard no_grad;
          CHECK(test::max_abs_diff(alone, packed.slice(0, b, b + 1).slice(1, start, start + L)) < 1e-12);
        }
        auto logp = torch::log_softmax(alone.slice(1, 0, L - 1), -1);
        auto picked = logp.gather(-1, ids.slice(1, 1).unsqueeze(-1));
        (-picked.sum() / static_cast<double>(count)).backward();
      }
      size_t i = 0;
      for (auto& p : m->parameters()) CHECK(test::max_abs_diff(p.grad(), packed_grads[i++]) < 1e-12);
    }
  }
  // In fp32 too (the dtype fine-tuning runs in), to float rounding.
  torch::manual_seed(12);
  Transformer m(small_config());
  auto tokens = torch::randint(0, 37, {1, 12});
  auto docs = torch::tensor({0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1}, torch::kInt64).view({1, 12});
  torch::NoGradGuard no_grad;
  for (auto how : {PackedAttention::kSegments, PackedAttention::kBias}) {
    m->set_packed_attention(how);
    auto packed = m->forward_packed(tokens, docs).logits;
    CHECK(test::max_abs_diff(m->forward(tokens.slice(1, 7)).logits, packed.slice(1, 7)) < 1e-5);
    CHECK(test::max_abs_diff(m->forward(tokens.slice(1, 0, 7)).logits, packed.slice(1, 0, 7)) < 1e-5);
  }
  CHECK_THAT(test::error_of([&] { m->forward_packed(tokens, docs.slice(1, 1)); }), Catch::Contains("do not match"));
}

TEST_CASE("token ids outside the vocabulary are a libllm::Error naming the range", "[model]") {
  Transformer m(small_config());  // vocab 37
  torch::NoGradGuard ng;
  CHECK_THAT(test::error_of([&] {
               m->forward(torch::tensor({{1, 37, 2}}, torch::kInt64));
             }),
             Catch::Contains("model input: token ids must be in [0, 37), got 1..37"));
  CHECK_THAT(test::error_of([&] {
               m->forward(torch::tensor({{-1, 3}}, torch::kInt64));
             }),
             Catch::Contains("got -1..3"));
  CHECK(m->forward(torch::tensor({{0, 36}}, torch::kInt64)).logits.size(2) == 37);
}
