// CUDA paths against the CPU ones (label gpu; run where LibTorch has CUDA and a device is present):
// the model's forward/backward (dense GQA and MoE, with and without activation checkpointing;
// packed rows), the fused LM head + cross-entropy,
// AdamW's fused CUDA kernel against its _foreach path on the CPU, and bf16 against fp32.
// Tolerances: fp32 kernels differ in summation order only, so 1e-4 (logits, absolute) and 1e-4
// (gradients, relative); AdamW after 5 steps 1e-6 relative; a bf16 loss within 2% of fp32.
#include "../catch_torch.h"

#include <libllm/compat.h>
#include <libllm/model.h>
#include <libllm/optim.h>
#include <libllm/recipe.h>

using namespace libllm;

namespace {

ModelConfig config(const std::string& extra) {
  return Recipe::parse("model: {vocab_size: 384, dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 96, "
                       "max_seq_len: 64" + extra + "}\n", "test")
      .model;
}

double rel(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a.to(torch::kCPU, torch::kFloat64) - b.to(torch::kCPU, torch::kFloat64)).norm() /
          b.to(torch::kCPU, torch::kFloat64).norm().clamp_min(1e-30))
      .item<double>();
}

bool have_cuda() {
  if (compat::cuda_available()) return true;
  WARN("no CUDA device: skipped");
  return false;
}

// packed: rows of 27 positions holding documents of 5, 9, 13 and 20, 7 tokens (forward_packed:
// the CPU computes each document alone, CUDA passes one additive mask to SDPA; 27 is not a
// multiple of the mask's 16-element row alignment).
void compare_devices(const ModelConfig& mc, bool checkpointing, bool packed = false) {
  torch::manual_seed(3);
  Transformer cpu(mc), gpu(mc);
  {
    torch::NoGradGuard no_grad;
    auto src = cpu->named_parameters();
    for (auto& kv : gpu->named_parameters()) kv.value().copy_(src[kv.key()]);
  }
  const torch::Device cuda(torch::kCUDA, 0);
  gpu->to(cuda);
  cpu->set_activation_checkpointing(checkpointing);
  gpu->set_activation_checkpointing(checkpointing);
  const int64_t T = packed ? 27 : 32;
  auto ids = torch::randint(0, mc.vocab_size, {2, T + 1});
  torch::Tensor docs;
  if (packed) {
    docs = torch::zeros({2, T}, torch::kInt64);
    docs[0].slice(0, 5, 14).fill_(1);
    docs[0].slice(0, 14).fill_(2);
    docs[1].slice(0, 20).fill_(1);
  }
  auto loss_of = [&](Transformer& m, const torch::Tensor& t) {
    auto x = t.slice(1, 0, T);
    auto out = packed ? m->forward_packed(x, docs.to(x.device())) : m->forward(x);
    return std::make_pair(out.logits, cross_entropy(out.logits, t.slice(1, 1)) + out.aux_loss);
  };
  auto [lc, c] = loss_of(cpu, ids);
  auto [lg, g] = loss_of(gpu, ids.to(cuda));
  c.backward();
  g.backward();
  CHECK((lc - lg.cpu()).abs().max().item<double>() <= 1e-4);
  CHECK(std::abs(c.item<double>() - g.item<double>()) <= 1e-5);
  auto gp = gpu->named_parameters();
  for (auto& kv : cpu->named_parameters()) {
    INFO(kv.key());
    REQUIRE(gp[kv.key()].grad().defined());
    CHECK(rel(gp[kv.key()].grad(), kv.value().grad()) <= 1e-4);
  }
}

}  // namespace

TEST_CASE("CUDA forward and backward equal the CPU's (dense GQA)", "[gpu]") {
  if (!have_cuda()) return;
  compare_devices(config(""), false);
}

TEST_CASE("CUDA forward and backward equal the CPU's (MoE, activation checkpointing)", "[gpu]") {
  if (!have_cuda()) return;
  compare_devices(config(", n_experts: 4, n_experts_per_token: 2"), false);
  compare_devices(config(""), true);
}

TEST_CASE("packed rows on CUDA equal the CPU's (GQA, sliding window, activation checkpointing)", "[gpu]") {
  if (!have_cuda()) return;
  compare_devices(config(""), false, true);
  compare_devices(config(", sliding_window: 6"), true, true);
}

TEST_CASE("AdamW's fused CUDA kernel equals the CPU _foreach path (fp32 and bf16 with fp32 master)", "[gpu]") {
  if (!have_cuda()) return;
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    torch::manual_seed(5);
    std::vector<torch::Tensor> shapes{torch::randn({64, 32}), torch::randn({32}), torch::randn({300, 16})};
    std::vector<std::pair<std::string, torch::Tensor>> on_cpu, on_gpu;
    for (size_t i = 0; i < shapes.size(); ++i) {
      const std::string name = i == 2 ? "model.embed_tokens.weight" : "w" + std::to_string(i);
      on_cpu.emplace_back(name, shapes[i].to(dtype).clone());
      on_gpu.emplace_back(name, shapes[i].to(torch::kCUDA, dtype).clone());
    }
    OptimConfig oc;
    AdamW a(on_cpu, oc), b(on_gpu, oc);
    for (int step = 0; step < 5; ++step) {
      for (size_t i = 0; i < shapes.size(); ++i) {
        auto grad = torch::randn(shapes[i].sizes()).to(dtype);
        on_cpu[i].second.mutable_grad() = grad.clone();
        on_gpu[i].second.mutable_grad() = grad.to(torch::kCUDA);
      }
      a.step(1e-2);
      b.step(1e-2);
    }
    auto sa = a.state(), sb = b.state();
    REQUIRE(sa.size() == sb.size());
    for (size_t i = 0; i < sa.size(); ++i) {
      INFO(sa[i].first << " in " << c10::toString(dtype));
      CHECK(rel(sb[i].second, sa[i].second) <= 1e-6);
    }
    for (size_t i = 0; i < shapes.size(); ++i) CHECK(rel(on_gpu[i].second, on_cpu[i].second) <= (dtype == torch::kFloat32 ? 1e-6 : 1e-2));
  }
}

TEST_CASE("a bf16 model on CUDA gives the fp32 loss within 2%", "[gpu]") {
  if (!have_cuda()) return;
  const ModelConfig mc = config("");
  torch::manual_seed(9);
  Transformer m(mc);
  m->to(torch::Device(torch::kCUDA, 0));
  auto ids = torch::randint(0, mc.vocab_size, {2, 33}, torch::TensorOptions().dtype(torch::kInt64).device(torch::kCUDA));
  torch::NoGradGuard no_grad;
  const double fp32 = cross_entropy(m->forward(ids.slice(1, 0, 32)).logits, ids.slice(1, 1)).item<double>();
  m->to(torch::kBFloat16);
  const double bf16 = cross_entropy(m->forward(ids.slice(1, 0, 32)).logits, ids.slice(1, 1)).item<double>();
  INFO("fp32 " << fp32 << ", bf16 " << bf16);
  CHECK(std::abs(bf16 - fp32) <= 0.02 * fp32);
}

TEST_CASE("the fused LM head + cross-entropy on CUDA equals the CPU's, fp32 and bf16", "[gpu]") {
  // linear_cross_entropy in chunks of 7 rows with ignored targets, (loss / 3).backward(): fp32
  // against the CPU (1e-5 loss, 1e-4 relative gradients); bf16 against CUDA's plain bf16 path
  // (the same roundings but where the factor is applied: 1e-2 relative).
  if (!have_cuda()) return;
  const torch::Device cuda(torch::kCUDA, 0);
  torch::manual_seed(12);
  auto h = torch::randn({45, 64}), w = torch::randn({384, 64}) * 0.2;
  auto t = torch::randint(0, 384, {45});
  t.slice(0, 0, 4).fill_(-100);
  auto grads = [&](const torch::Tensor& h0, const torch::Tensor& w0, const torch::Tensor& t0, bool fused) {
    auto a = h0.detach().clone().requires_grad_(true), b = w0.detach().clone().requires_grad_(true);
    auto loss = fused ? linear_cross_entropy(a, b, t0, -100, 7)
                      : cross_entropy(torch::nn::functional::linear(a, b), t0);
    (loss / 3.0).backward();
    return std::make_tuple(loss.item<double>(), a.grad(), b.grad());
  };
  auto [lc, hc, wc] = grads(h, w, t, false);
  auto [lg, hg, wg] = grads(h.to(cuda), w.to(cuda), t.to(cuda), true);
  CHECK(std::abs(lc - lg) <= 1e-5);
  CHECK(rel(hg, hc) <= 1e-4);
  CHECK(rel(wg, wc) <= 1e-4);
  auto hb = h.to(cuda, torch::kBFloat16), wb = w.to(cuda, torch::kBFloat16);
  auto [lp, hp, wp] = grads(hb, wb, t.to(cuda), false);
  auto [lf, hf, wf] = grads(hb, wb, t.to(cuda), true);
  CHECK(hf.scalar_type() == torch::kBFloat16);
  CHECK(std::abs(lp - lf) <= 1e-3 * std::abs(lp));
  CHECK(rel(hf, hp) <= 1e-2);
  CHECK(rel(wf, wp) <= 1e-2);
}

TEST_CASE("RMSNorm on CUDA computes in fp32 as the CPU's explicit form (bf16, and fp16 activations of hundreds)",
          "[gpu]") {
  // LibTorch's fused at::rms_norm (2.5+) upcasts as Hugging Face does; only its weight multiply
  // may come before the cast back (2.7+): each bf16 element within one unit in the last place
  // (2^-7 relative), fp16 within 2^-10. A row of 300s and 1s overflows x^2 in fp16 (2.4's form).
  if (!have_cuda()) return;
  const torch::Device cuda(torch::kCUDA, 0);
  torch::manual_seed(13);
  for (const auto dtype : {torch::kBFloat16, torch::kHalf}) {
    auto x = (torch::randn({64, 512}) * 3).to(dtype);
    x[0].fill_(1);
    x[0][0] = 300;
    auto w = (1 + 0.1 * torch::randn({512})).to(dtype);
    const auto want = compat::rms_norm(x, w, 1e-5).to(torch::kFloat64);
    const auto got = compat::rms_norm(x.to(cuda), w.to(cuda), 1e-5).to(torch::kCPU, torch::kFloat64);
    CHECK(torch::isfinite(got).all().item<bool>());
    const double ulp = dtype == torch::kBFloat16 ? 1.0 / 128 : 1.0 / 1024;
    const auto excess = ((got - want).abs() - ulp * want.abs() - 1e-6).max().item<double>();
    INFO((dtype == torch::kBFloat16 ? "bf16" : "fp16")
         << ": max excess over one ulp " << excess << "; the 300 normalises to " << got[0][0].item<double>() << " (CPU "
         << want[0][0].item<double>() << ")");
    CHECK(excess <= 0);
  }
}
