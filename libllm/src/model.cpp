#include "libllm/model.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <fmt/core.h>

#include <cmath>
#include <limits>
#include <map>
#include <thread>

#include "libllm/compat.h"
#include "libllm/error.h"

namespace libllm {
namespace {

Linear linear(int64_t in, int64_t out) { return Linear(in, out); }

// Shape and dtype without values: zero strides over a one-element storage.
torch::Tensor unallocated(c10::IntArrayRef shape, torch::Dtype dtype) {
  return torch::empty({1}, dtype).as_strided(shape, std::vector<int64_t>(shape.size(), 0));
}

// While a deferred model is being built on this thread, its modules register unallocated weights.
thread_local const torch::Dtype* deferred_dtype = nullptr;

struct DeferredScope {
  explicit DeferredScope(const torch::Dtype& dtype) { deferred_dtype = &dtype; }
  ~DeferredScope() { deferred_dtype = nullptr; }
};

// A new module weight: unallocated in a deferred model, else `value`'s result.
template <typename F>
torch::Tensor new_weight(c10::IntArrayRef shape, F value) {
  return deferred_dtype ? unallocated(shape, *deferred_dtype) : value();
}

uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Which elements LoRA's dropout keeps: a bool tensor of x's shape, each element kept with
// probability 1 - p. On the CPU, element i of the flattened tensor is dropped when
// SplitMix64(seed + i) < p * 2^64, the seed one draw of torch's CPU generator (so torch::manual_seed
// and a restored generator state give the same mask; drawing every element from the generator, as
// torch::dropout's CPU path does, took 14% more CPU time over 20 steps of the demo's LoRA
// fine-tuning). Elsewhere a uniform draw per element from the device's generator, kept when >= p.
torch::Tensor dropout_keep(const torch::Tensor& x, double p) {
  if (!x.is_cpu()) return torch::rand(x.sizes(), x.options().dtype(torch::kFloat32)) >= p;
  const auto seed = static_cast<uint64_t>(
      torch::randint(std::numeric_limits<int64_t>::max(), {1}, torch::kInt64).item<int64_t>());
  const auto threshold = static_cast<uint64_t>(std::ldexp(p, 64));
  auto keep = torch::empty(x.sizes(), torch::kBool);
  bool* k = keep.data_ptr<bool>();
  at::parallel_for(0, keep.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) k[i] = splitmix64(seed + static_cast<uint64_t>(i)) >= threshold;
  });
  return keep;
}

// x in `dtype` with the elements `keep` drops zeroed and the others times `scale`:
// x.to(dtype) * (keep * scale), each factor 0 or exactly `scale`. Into fp32 on the CPU in one
// pass (the torch ops took four).
torch::Tensor masked_scaled(const torch::Tensor& x, const torch::Tensor& keep, double scale, torch::Dtype dtype) {
  if (!x.is_cpu() || dtype != torch::kFloat32 || !at::isFloatingType(x.scalar_type()))
    return x.to(dtype) * (keep.to(dtype) * scale);
  const torch::Tensor xc = x.contiguous(), kc = keep.contiguous();
  auto out = torch::empty(x.sizes(), torch::kFloat32);
  float* o = out.data_ptr<float>();
  const bool* k = kc.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "masked_scaled", [&] {
    const scalar_t* in = xc.data_ptr<scalar_t>();
    const auto s = static_cast<float>(scale);
    at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = static_cast<float>(in[i]) * (k[i] ? s : 0.0f);
    });
  });
  return out;
}

// LoRA's input to A in A's `dtype` (fp32, or what a test moved the model to): x, or with dropout
// (`keep` defined) the kept elements scaled by 1 / (1 - p) and zeros.
torch::Tensor lora_input(const torch::Tensor& x, const torch::Tensor& keep, double p, torch::Dtype dtype) {
  if (!keep.defined()) return x.to(dtype);
  return masked_scaled(x, keep, static_cast<float>(1.0 / (1.0 - p)), dtype);
}

// The adapter's term (alpha / r) B A dropout(x) in A's dtype (fp32), as one autograd node that
// keeps x (the same tensor for the adapters that share an input, like q, k and v, and kept by the
// block anyway), A's small output and the dropout's bool mask. Autograd through the plain ops kept
// each adapter's own fp32 copy of its (dropped) input for A's gradient, and the mask: 4 to 8 bytes
// an input element, now 1 with dropout and 0 without. Backward recomputes the copy from x.
struct LoraTerm : torch::autograd::Function<LoraTerm> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& A,
                               const torch::Tensor& B, double scale, double p) {
    const torch::Tensor keep = p > 0 ? dropout_keep(x, p) : torch::Tensor();
    auto a = torch::nn::functional::linear(lora_input(x, keep, p, A.scalar_type()), A);  // (..., r)
    auto z = torch::nn::functional::linear(a, B) * scale;                                // (..., out)
    ctx->save_for_backward({x, A, B, a, keep.defined() ? keep : torch::empty({0}, torch::kBool)});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["p"] = p;
    return z;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &A = saved[1], &B = saved[2], &a = saved[3];
    const torch::Tensor keep = saved[4].numel() > 0 ? saved[4] : torch::Tensor();
    const double scale = ctx->saved_data["scale"].toDouble(), p = ctx->saved_data["p"].toDouble();
    const int64_t r = A.size(0), in = A.size(1), out = B.size(0);
    const auto gz = (grad_out[0] * scale).reshape({-1, out});  // (N, out)
    const auto a2 = a.reshape({-1, r});                        // (N, r)
    torch::Tensor gx, gA, gB;
    if (ctx->needs_input_grad(2)) gB = gz.t().mm(a2);  // (out, r)
    const auto ga = gz.mm(B);                          // (N, r)
    if (ctx->needs_input_grad(1)) {
      const auto h = lora_input(x, keep, p, A.scalar_type()).reshape({-1, in});  // (N, in), as forward made it
      gA = ga.t().mm(h);                                                         // (r, in)
    }
    if (ctx->needs_input_grad(0)) {
      gx = ga.mm(A).view(x.sizes());  // (..., in)
      if (keep.defined()) gx = masked_scaled(gx, keep, static_cast<float>(1.0 / (1.0 - p)), gx.scalar_type());
      gx = gx.to(x.scalar_type());
    }
    return {gx, gA, gB, torch::Tensor(), torch::Tensor()};
  }
};

// Which keys each of the last T of S positions may see: (T, S) bool, true = attend. Causal, and
// within `window` tokens (itself included) when window > 0.
torch::Tensor sliding_window_mask(int64_t T, int64_t S, int64_t window, torch::Device device) {
  auto i = torch::arange(T, torch::dtype(torch::kInt64).device(device)).unsqueeze(1) + (S - T);
  auto j = torch::arange(S, torch::dtype(torch::kInt64).device(device)).unsqueeze(0);
  return (j <= i).logical_and(i - j < window);
}

// Causal attention of each packed document on its own. q: (B, H, T, D); k, v: (B, Hkv, T, D);
// segments: (N, 3) (row, start, length) covering every row in order (Packing::segments).
torch::Tensor segment_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& segments, int64_t window) {
  const auto s = segments.accessor<int64_t, 2>();
  std::vector<torch::Tensor> rows, pieces;
  std::map<int64_t, torch::Tensor> windows;  // sliding-window masks by document length
  for (int64_t i = 0; i < segments.size(0); ++i) {
    const int64_t b = s[i][0], start = s[i][1], L = s[i][2];
    auto part = [&](const torch::Tensor& t) { return t.narrow(0, b, 1).narrow(2, start, L); };  // (1, H, L, D)
    c10::optional<torch::Tensor> allowed;
    if (window > 0 && window < L) {
      auto& w = windows[L];
      if (!w.defined()) w = sliding_window_mask(L, L, window, q.device());                       // (L, L)
      allowed = w;
    }
    pieces.push_back(compat::attention(part(q), part(k), part(v), allowed));
    if (i + 1 == segments.size(0) || s[i + 1][0] != b) {
      rows.push_back(pieces.size() == 1 ? pieces[0] : torch::cat(pieces, 2));  // (1, H, T, D)
      pieces.clear();
    }
  }
  if (static_cast<int64_t>(rows.size()) != q.size(0) || rows.back().size(2) != q.size(2))
    throw Error("attention", "packed segments " + c10::str(segments.sizes()) + " do not cover rows of " + c10::str(q.sizes()));
  return rows.size() == 1 ? rows[0] : torch::cat(rows, 0);                // (B, H, T, D)
}

}  // namespace

// ---------------------------------------------------------------- RMSNorm
RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", new_weight({dim}, [&] { return torch::ones({dim}); }));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) { return compat::rms_norm(x, weight, eps_); }

// ---------------------------------------------------------------- Rotary
Rotary::Rotary(int64_t head_dim, double theta) : head_dim_(head_dim), theta_(theta) {}

std::pair<torch::Tensor, torch::Tensor> Rotary::table(int64_t start, int64_t T, torch::Device device,
                                                      torch::Dtype dtype) {
  // Same fp32 arithmetic as transformers' LlamaRotaryEmbedding, so logits match bit-for-bit
  // in the rotary part: inv_freq = 1 / theta^(2i/d), angle = pos * inv_freq.
  auto f32 = torch::dtype(torch::kFloat32).device(device);
  auto exponent = torch::arange(0, head_dim_, 2, torch::dtype(torch::kInt64).device(device)).to(torch::kFloat32) /
                  static_cast<double>(head_dim_);
  auto inv_freq = 1.0 / torch::pow(theta_, exponent);                       // (D/2)
  auto pos = torch::arange(start, start + T, f32);                           // (T)
  auto freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);                     // (T, D/2)
  auto emb = torch::cat({freqs, freqs}, -1);                                 // (T, D)
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

std::pair<torch::Tensor, torch::Tensor> Rotary::table(const torch::Tensor& positions, torch::Dtype dtype) {
  const auto device = positions.device();
  auto exponent = torch::arange(0, head_dim_, 2, torch::dtype(torch::kInt64).device(device)).to(torch::kFloat32) /
                  static_cast<double>(head_dim_);
  auto inv_freq = 1.0 / torch::pow(theta_, exponent);                       // (D/2)
  auto freqs = positions.to(torch::kFloat32).unsqueeze(-1) * inv_freq;       // (B, T, D/2)
  auto emb = torch::cat({freqs, freqs}, -1).unsqueeze(1);                    // (B, 1, T, D)
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  auto rotated = torch::cat({-x2, x1}, -1);  // rotate_half
  return x * cos + rotated * sin;
}

// ---------------------------------------------------------------- Linear (+ LoRA)
LinearImpl::LinearImpl(int64_t in, int64_t out) : in_(in), out_(out) {
  weight = register_parameter("weight", new_weight({out, in}, [&] { return torch::zeros({out, in}); }));
}

void LinearImpl::add_lora(int64_t rank, double alpha, double dropout) {
  if (has_lora()) throw Error("lora", "a layer got a second LoRA adapter");
  auto opts = torch::nn::LinearOptions(in_, rank).bias(false);
  const auto saved = c10::get_default_dtype();
  c10::set_default_dtype(caffe2::TypeMeta::Make<float>());  // adapters are fp32 whatever the base
  lora_A = register_module("lora_A", torch::nn::Linear(opts));  // kaiming-uniform(a = sqrt(5)), as PEFT
  lora_B = register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(rank, out_).bias(false)));
  c10::set_default_dtype(saved);
  torch::NoGradGuard no_grad;
  lora_A->weight.set_data(lora_A->weight.to(weight.device()));
  lora_B->weight.set_data(torch::zeros({out_, rank}, torch::dtype(torch::kFloat32).device(weight.device())));
  lora_scale_ = alpha / static_cast<double>(rank);
  lora_dropout_ = dropout;
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  auto y = torch::nn::functional::linear(x.scalar_type() == weight.scalar_type() ? x : x.to(weight.scalar_type()), weight);
  if (!has_lora()) return y;
  const double p = is_training() ? lora_dropout_ : 0.0;
  return y + LoraTerm::apply(x, lora_A->weight, lora_B->weight, lora_scale_, p).to(y.scalar_type());
}

torch::Tensor lora_merged_rows(const torch::Tensor& w, const torch::Tensor& B, const torch::Tensor& A, double scale,
                               int64_t first) {
  torch::NoGradGuard no_grad;
  if (w.dim() != 2 || B.dim() != 2 || A.dim() != 2 || first < 0 || first + w.size(0) > B.size(0) ||
      w.size(1) != A.size(1) || B.size(1) != A.size(0))
    throw Error("lora_merged_rows", "rows or shapes do not match", "w: rows of W (out, in); B: (out, r); A: (r, in)");
  const int64_t last = first + w.size(0);
  torch::Tensor out = w.to(torch::kFloat32, /*non_blocking=*/false, /*copy=*/true);  // (rows, in)
  const torch::Tensor a = A.to(torch::kFloat32), b = B.to(torch::kFloat32);
  for (int64_t begin = first / kLoraMergeRows * kLoraMergeRows; begin < last; begin += kLoraMergeRows) {
    const int64_t end = std::min(begin + kLoraMergeRows, b.size(0));
    const torch::Tensor delta = torch::matmul(b.narrow(0, begin, end - begin), a) * scale;  // (block, in)
    const int64_t lo = std::max(begin, first), hi = std::min(end, last);
    out.narrow(0, lo - first, hi - lo).add_(delta.narrow(0, lo - begin, hi - lo));
  }
  return out;
}

torch::Tensor LinearImpl::merged_weight() const {
  if (!has_lora()) return weight;
  return lora_merged_rows(weight, lora_B->weight, lora_A->weight, lora_scale_).to(weight.scalar_type());  // (out, in)
}

void LinearImpl::merge_lora() {
  if (!has_lora()) return;
  torch::NoGradGuard no_grad;
  weight.set_data(merged_weight());
  unregister_module("lora_A");
  unregister_module("lora_B");
  lora_A = nullptr;
  lora_B = nullptr;
  lora_scale_ = 0;
}

// ---------------------------------------------------------------- Attention
AttentionImpl::AttentionImpl(const ModelConfig& cfg)
    : n_heads_(cfg.n_heads), n_kv_heads_(cfg.kv_heads()), head_dim_(cfg.hdim()), window_(cfg.sliding_window) {
  q_proj = register_module("q_proj", linear(cfg.dim, n_heads_ * head_dim_));
  k_proj = register_module("k_proj", linear(cfg.dim, n_kv_heads_ * head_dim_));
  v_proj = register_module("v_proj", linear(cfg.dim, n_kv_heads_ * head_dim_));
  o_proj = register_module("o_proj", linear(n_heads_ * head_dim_, cfg.dim));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                     KVCache* cache, int64_t layer, const Packing& packing) {
  const int64_t B = x.size(0), T = x.size(1);
  auto q = q_proj(x).view({B, T, n_heads_, head_dim_}).transpose(1, 2);     // (B, H, T, D)
  auto k = k_proj(x).view({B, T, n_kv_heads_, head_dim_}).transpose(1, 2);  // (B, Hkv, T, D)
  auto v = v_proj(x).view({B, T, n_kv_heads_, head_dim_}).transpose(1, 2);  // (B, Hkv, T, D)
  q = apply_rotary(q, cos, sin);
  k = apply_rotary(k, cos, sin);
  if (cache) {  // append this step's keys/values; attend to all S = length + T positions
    const int64_t S = cache->length + T;
    if (S > cache->capacity)
      throw Error("kv cache", "holds " + std::to_string(cache->capacity) + " positions, " + std::to_string(S) + " needed");
    cache->k[layer].narrow(2, cache->length, T).copy_(k);
    cache->v[layer].narrow(2, cache->length, T).copy_(v);
    k = cache->k[layer].narrow(2, 0, S);                                     // (B, Hkv, S, D)
    v = cache->v[layer].narrow(2, 0, S);                                     // (B, Hkv, S, D)
  }
  const int64_t S = k.size(2);
  if (!packing.empty() && cache) throw Error("attention", "packed rows cannot be combined with a kv cache");
  torch::Tensor y;
  if (packing.segments.defined()) {
    y = segment_attention(q, k, v, packing.segments, window_);               // (B, H, T, D)
  } else if (packing.bias.defined()) {
    y = compat::attention(q, k, v, packing.bias);                            // window folded in
  } else {
    c10::optional<torch::Tensor> allowed;
    if (window_ > 0 && window_ < S) allowed = sliding_window_mask(T, S, window_, x.device());  // (T, S)
    y = compat::attention(q, k, v, allowed);                                 // (B, H, T, D)
  }
  y = y.transpose(1, 2).reshape({B, T, n_heads_ * head_dim_});               // (B, T, H*D)
  return o_proj(y);
}

// ---------------------------------------------------------------- MLP
MLPImpl::MLPImpl(int64_t dim, int64_t hidden, const char* g, const char* u, const char* d) {
  gate = register_module(g, linear(dim, hidden));
  up = register_module(u, linear(dim, hidden));
  down = register_module(d, linear(hidden, dim));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) { return down(torch::silu(gate(x)) * up(x)); }

// ---------------------------------------------------------------- MoE
MoEImpl::MoEImpl(const ModelConfig& cfg) : n_experts_(cfg.n_experts), top_k_(cfg.n_experts_per_token) {
  gate = register_module("gate", linear(cfg.dim, n_experts_));
  experts = register_module("experts", torch::nn::ModuleList());
  for (int64_t e = 0; e < n_experts_; ++e) experts->push_back(MLP(cfg.dim, cfg.ffn_dim, "w1", "w3", "w2"));
}

torch::Tensor MoEImpl::forward(const torch::Tensor& x, std::vector<torch::Tensor>& router_logits) {
  const auto shape = x.sizes().vec();
  auto xf = x.reshape({-1, shape.back()});                            // (N, D)
  auto logits = gate(xf);                                             // (N, E)
  router_logits.push_back(logits);
  auto probs = torch::softmax(logits, -1, compat::compute_dtype(logits));
  auto [weights, chosen] = probs.topk(top_k_, -1);                    // (N, k)
  weights = (weights / weights.sum(-1, true)).to(x.scalar_type());
  // Group the N*k (token, expert) assignments by expert; every assignment is computed (dropless).
  auto flat_expert = chosen.reshape({-1});                            // (N*k)
  auto order = std::get<1>(flat_expert.sort(/*stable=*/true, 0, false));
  auto token = torch::div(order, top_k_, "floor");
  auto slot_weight = weights.reshape({-1}).index_select(0, order).unsqueeze(1);  // (N*k, 1)
  auto counts = torch::bincount(flat_expert, {}, n_experts_).cpu();
  const int64_t* count = counts.data_ptr<int64_t>();
  auto out = torch::zeros_like(xf);
  int64_t offset = 0;
  for (int64_t e = 0; e < n_experts_; ++e) {
    if (count[e] == 0) continue;
    auto tok = token.narrow(0, offset, count[e]);
    auto y = experts[e]->as<MLPImpl>()->forward(xf.index_select(0, tok)) * slot_weight.narrow(0, offset, count[e]);
    out = out.index_add(0, tok, y);
    offset += count[e];
  }
  return out.view(shape);
}

torch::Tensor load_balancing_loss(const torch::Tensor& router_logits, int64_t top_k) {
  const int64_t E = router_logits.size(-1);
  auto probs = torch::softmax(router_logits.to(compat::compute_dtype(router_logits)), -1);  // (N, E)
  auto chosen = std::get<1>(probs.topk(top_k, -1));                             // (N, k)
  auto mask = torch::one_hot(chosen, E).to(probs.scalar_type());                // (N, k, E)
  auto tokens_per_expert = mask.mean(0);                                        // (k, E)
  auto prob_per_expert = probs.mean(0);                                         // (E)
  return (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum() * static_cast<double>(E);
}

torch::Tensor router_z_loss(const torch::Tensor& router_logits) {
  return torch::logsumexp(router_logits.to(compat::compute_dtype(router_logits)), -1).pow(2).mean();
}

// ---------------------------------------------------------------- Block
BlockImpl::BlockImpl(const ModelConfig& cfg) {
  input_layernorm = register_module("input_layernorm", RMSNorm(cfg.dim, cfg.norm_eps));
  self_attn = register_module("self_attn", Attention(cfg));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(cfg.dim, cfg.norm_eps));
  if (cfg.n_experts > 0)
    block_sparse_moe = register_module("block_sparse_moe", MoE(cfg));
  else
    mlp = register_module("mlp", MLP(cfg.dim, cfg.ffn_dim));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                 std::vector<torch::Tensor>& router_logits, KVCache* cache, int64_t layer,
                                 const Packing& packing) {
  auto h = x + self_attn(input_layernorm(x), cos, sin, cache, layer, packing);
  auto n = post_attention_layernorm(h);
  return h + (mlp ? mlp(n) : block_sparse_moe(n, router_logits));
}

// ---------------------------------------------------------------- activation checkpointing
namespace {

// A block whose forward runs without recording a graph and whose backward recomputes it
// (reentrant checkpointing). The block's parameter gradients are accumulated into .grad here;
// the block input's gradient flows back through the graph. The input must require grad (true
// whenever the embedding or an earlier block is trained). Outputs: the block's output and, for a
// mixture-of-experts block, its router logits (the load-balancing and z losses' gradients reach
// the router through them).
struct BlockRecompute : torch::autograd::Function<BlockRecompute> {
  // A custom function's tensor arguments must be defined: an absent Packing member travels as an
  // empty tensor.
  static torch::Tensor or_empty(const torch::Tensor& t) { return t.defined() ? t : torch::empty({0}); }
  static Packing packing_of(const torch::Tensor& bias, const torch::Tensor& segments) {
    Packing p;
    if (bias.numel() > 0) p.bias = bias;
    if (segments.numel() > 0) p.segments = segments;
    return p;
  }

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, int64_t block_ptr,
                                                int64_t hooks_ptr, int64_t layer, const torch::Tensor& x,
                                                const torch::Tensor& cos, const torch::Tensor& sin,
                                                const torch::Tensor& bias, const torch::Tensor& segments) {
    ctx->saved_data["block"] = block_ptr;
    ctx->saved_data["hooks"] = hooks_ptr;
    ctx->saved_data["layer"] = layer;
    ctx->save_for_backward({x, cos, sin, bias, segments});  // Packing's members, or empty
    // The recompute must draw the same dropout masks (LoRA dropout): keep the RNG state of the
    // device the block runs on.
    ctx->saved_data["rng"] = at::globalContext().defaultGenerator(x.device()).get_state();
    std::vector<torch::Tensor> router_logits;
    auto* hooks = reinterpret_cast<BlockHooks*>(hooks_ptr);
    if (hooks) hooks->before_block(layer, false);
    auto y = reinterpret_cast<BlockImpl*>(block_ptr)->forward(x, cos, sin, router_logits, nullptr, layer,
                                                              packing_of(bias, segments));
    if (hooks) hooks->after_block(layer, false);
    router_logits.insert(router_logits.begin(), y);
    return router_logits;  // {y} or {y, (B*T, E)}
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto* block = reinterpret_cast<BlockImpl*>(ctx->saved_data["block"].toInt());
    auto* hooks = reinterpret_cast<BlockHooks*>(ctx->saved_data["hooks"].toInt());
    const int64_t layer = ctx->saved_data["layer"].toInt();
    if (hooks) hooks->before_block(layer, true);
    const auto saved = ctx->get_saved_variables();
    auto x = saved[0].detach().requires_grad_(true);
    std::vector<torch::Tensor> outputs;
    {
      torch::AutoGradMode enable(true);
      auto gen = at::globalContext().defaultGenerator(x.device());
      const auto now = gen.get_state();
      gen.set_state(ctx->saved_data["rng"].toTensor());
      std::vector<torch::Tensor> router_logits;
      outputs.push_back(
          block->forward(x, saved[1], saved[2], router_logits, nullptr, layer, packing_of(saved[3], saved[4])));
      outputs.insert(outputs.end(), router_logits.begin(), router_logits.end());
      gen.set_state(now);
    }
    std::vector<torch::Tensor> inputs{x};
    for (auto& p : block->parameters())
      if (p.requires_grad()) inputs.push_back(p);  // a frozen (LoRA base) weight gets no gradient
    std::vector<torch::Tensor> ys, gys;  // outputs that received a gradient
    for (size_t i = 0; i < outputs.size(); ++i)
      if (grad_out[i].defined()) {
        ys.push_back(outputs[i]);
        gys.push_back(grad_out[i]);
      }
    auto grads = torch::autograd::grad(ys, inputs, gys, /*retain_graph=*/false, /*create_graph=*/false,
                                       /*allow_unused=*/true);
    for (size_t i = 1; i < inputs.size(); ++i) {
      if (!grads[i].defined()) continue;
      auto& g = inputs[i].mutable_grad();
      if (g.defined()) g.add_(grads[i]);  // in place: a sharding engine may have made it a view of its buffer
      else g = grads[i];
    }
    if (hooks) hooks->after_block(layer, true);
    return {torch::Tensor(), torch::Tensor(), torch::Tensor(), grads[0],
            torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

// ---------------------------------------------------------------- Transformer
bool is_unallocated(const torch::Tensor& p) {
  return p.defined() && p.numel() > 1 && p.storage().nbytes() < static_cast<size_t>(p.numel() * p.element_size());
}

DecoderImpl::DecoderImpl(const ModelConfig& cfg) {
  // Zeros until the model initialises it (not torch::nn::Embedding's own normal_).
  auto table = new_weight({cfg.vocab_size, cfg.dim}, [&] { return torch::zeros({cfg.vocab_size, cfg.dim}); });
  embed_tokens = register_module("embed_tokens",
                                 torch::nn::Embedding(torch::nn::EmbeddingOptions(cfg.vocab_size, cfg.dim)._weight(table)));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t l = 0; l < cfg.n_layers; ++l) layers->push_back(Block(cfg));
  norm = register_module("norm", RMSNorm(cfg.dim, cfg.norm_eps));
}

static ModelConfig resolved(ModelConfig cfg) {
  cfg.resolve();
  cfg.validate("model");
  return cfg;
}

static uint64_t draw_seed() {
  return static_cast<uint64_t>(torch::randint(std::numeric_limits<int64_t>::max(), {1}, torch::kLong).item<int64_t>());
}

TransformerImpl::TransformerImpl(const ModelConfig& cfg)
    : cfg_(resolved(cfg)), rotary_(cfg_.hdim(), cfg_.rope_theta), init_seed_(draw_seed()) {
  model = register_module("model", Decoder(cfg_));
  if (!cfg_.tie_embeddings) lm_head = register_module("lm_head", linear(cfg_.dim, cfg_.vocab_size));
  init_weights();
}

TransformerImpl::TransformerImpl(const ModelConfig& cfg, Deferred deferred)
    : cfg_(resolved(cfg)), rotary_(cfg_.hdim(), cfg_.rope_theta), init_seed_(draw_seed()) {
  DeferredScope scope(deferred.dtype);  // every weight is registered unallocated
  model = register_module("model", Decoder(cfg_));
  if (!cfg_.tie_embeddings) lm_head = register_module("lm_head", linear(cfg_.dim, cfg_.vocab_size));
}

bool TransformerImpl::deferred() const {
  for (const auto& p : parameters())
    if (is_unallocated(p)) return true;
  return false;
}

namespace {
void refuse_if_deferred(const TransformerImpl& m) {
  if (m.deferred())
    throw Error("model", "cannot move or cast a deferred model: every weight would be allocated in full, filled with "
                         "one uninitialised value",
                "call materialize() or load its weights (load_weights) first, or let FullySharded place it");
}
}  // namespace

void TransformerImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  refuse_if_deferred(*this);
  torch::nn::Module::to(device, dtype, non_blocking);
}
void TransformerImpl::to(torch::Dtype dtype, bool non_blocking) {
  refuse_if_deferred(*this);
  torch::nn::Module::to(dtype, non_blocking);
}
void TransformerImpl::to(torch::Device device, bool non_blocking) {
  refuse_if_deferred(*this);
  torch::nn::Module::to(device, non_blocking);
}

void TransformerImpl::materialize() {
  torch::NoGradGuard no_grad;
  for (auto& p : named_parameters()) {
    if (!is_unallocated(p.value())) continue;
    auto t = torch::empty(p.value().sizes(), p.value().scalar_type());
    init_parameter(p.key(), t);
    p.value().set_data(t);
  }
}

namespace {

// Where a new document starts, (B, T) int64 0/1: position 0, and wherever `flag` (B, T - 1) holds
// for the position before. A document is a run, so an id that comes back after another one
// starts a new document (document_mask, document_positions and document_segments agree).
torch::Tensor run_starts(const torch::Tensor& like, const torch::Tensor& flag) {
  auto starts = torch::ones_like(like, torch::kInt64);                                  // (B, T)
  if (like.size(1) > 1) starts.narrow(1, 1, like.size(1) - 1).copy_(flag);
  return starts;
}

torch::Tensor document_starts(const torch::Tensor& documents) {
  const int64_t T = documents.size(1);
  return run_starts(documents, documents.narrow(1, 1, std::max<int64_t>(T - 1, 0)) !=
                                   documents.narrow(1, 0, std::max<int64_t>(T - 1, 0)));
}

}  // namespace

torch::Tensor document_mask(const torch::Tensor& documents) {
  const int64_t T = documents.size(1);
  const auto runs = document_starts(documents).cumsum(1);                              // (B, T)
  auto same = runs.unsqueeze(2) == runs.unsqueeze(1);                                  // (B, T, T)
  auto causal = torch::ones({T, T}, torch::dtype(torch::kBool).device(documents.device())).tril();
  return same.logical_and(causal).unsqueeze(1);                                       // (B, 1, T, T)
}

torch::Tensor document_positions(const torch::Tensor& documents) {
  const int64_t T = documents.size(1);
  auto index = torch::arange(T, documents.options()).unsqueeze(0).expand_as(documents);  // (B, T)
  auto starts = document_starts(documents).to(torch::kBool);                            // (B, T)
  auto first = std::get<0>(torch::where(starts, index, torch::zeros_like(index)).cummax(1));  // (B, T)
  return index - first;
}

torch::Tensor documents_after(const torch::Tensor& tokens, int64_t separator) {
  const int64_t T = tokens.size(1);
  return run_starts(tokens, tokens.narrow(1, 0, std::max<int64_t>(T - 1, 0)) == separator).cumsum(1) - 1;  // (B, T)
}

torch::Tensor document_segments(const torch::Tensor& documents) {
  const auto docs = documents.to(torch::kCPU, torch::kInt64).contiguous();
  const auto d = docs.accessor<int64_t, 2>();
  std::vector<int64_t> out;  // (row, start, length) triples
  for (int64_t b = 0; b < docs.size(0); ++b)
    for (int64_t t = 0, start = 0; t < docs.size(1); ++t)
      if (t + 1 == docs.size(1) || d[b][t + 1] != d[b][t]) {
        out.insert(out.end(), {b, start, t + 1 - start});
        start = t + 1;
      }
  return torch::tensor(out, torch::kInt64).view({-1, 3});                  // (N, 3)
}

namespace {

// The most negative finite value of a floating dtype (torch.finfo(dtype).min): what an additive
// mask adds where attention is not allowed. Finite like transformers' masks, because some SDPA
// kernels (cuDNN) mishandle -inf; exp(min - max) is still exactly 0.
double lowest(torch::Dtype dtype) {
  switch (dtype) {
    case torch::kFloat16: return -65504.0;
    case torch::kBFloat16: return -3.3895313892515355e38;
    case torch::kFloat32: return std::numeric_limits<float>::lowest();
    default: return std::numeric_limits<double>::lowest();
  }
}

// Packing::bias for `documents` (B, T): the document mask and the sliding window as an additive
// mask of `dtype`, stored in rows of a multiple of 16 elements (SDPA's alignment for its bias).
torch::Tensor document_bias(const torch::Tensor& documents, int64_t window, torch::Dtype dtype) {
  const int64_t B = documents.size(0), T = documents.size(1), padded = (T + 15) / 16 * 16;
  auto allowed = document_mask(documents);                                   // (B, 1, T, T)
  if (window > 0 && window < T) allowed = allowed.logical_and(sliding_window_mask(T, T, window, documents.device()));
  auto bias = torch::zeros({B, 1, T, padded}, torch::dtype(dtype).device(documents.device())).narrow(3, 0, T);
  return bias.masked_fill_(allowed.logical_not(), lowest(dtype));           // (B, 1, T, T)
}

// Whether per-document attention beats one masked attention over whole rows (unfused, on the
// CPU): segments compute sum L² scores in one call per document, the mask B T². A call costs
// about as much as 640,000 / dim scores (the 2-core CPU, benchmarks/README.md: at dim 128,
// documents of ~150 tokens in rows of 512 favour segments 1.9x; of ~60 in rows of 128, the mask 1.3x).
bool segments_pay(const torch::Tensor& segments, int64_t B, int64_t T, int64_t dim) {
  const auto s = segments.accessor<int64_t, 2>();
  double scores = 0;
  for (int64_t i = 0; i < segments.size(0); ++i) scores += static_cast<double>(s[i][2]) * static_cast<double>(s[i][2]);
  const double saved = static_cast<double>(B) * static_cast<double>(T) * static_cast<double>(T) - scores;
  return saved > static_cast<double>(segments.size(0)) * 640000.0 / static_cast<double>(dim);
}

}  // namespace

torch::Tensor TransformerImpl::hidden(const torch::Tensor& tokens, int64_t start_pos,
                                      std::vector<torch::Tensor>* router_logits, KVCache* cache,
                                      const torch::Tensor& documents) {
  std::vector<torch::Tensor> local;
  auto& rl = router_logits ? *router_logits : local;
  // Token ids outside the vocabulary: a libllm::Error (on the CPU, where the check is one cheap
  // reduction; on a GPU it would wait for the device each forward, and the kernel asserts). The
  // apps' ids are checked before they reach a GPU: shard tokens as they are read, against the
  // tokenizer's vocabulary (check_tokenizer), which Tokenizer::check_fits holds to the model's.
  if (tokens.device().is_cpu() && tokens.numel() > 0) {
    const auto [lo, hi] = torch::aminmax(tokens);
    if (lo.item<int64_t>() < 0 || hi.item<int64_t>() >= cfg_.vocab_size)
      throw Error("model input",
                  fmt::format("token ids must be in [0, {}), got {}..{}", cfg_.vocab_size, lo.item<int64_t>(),
                              hi.item<int64_t>()),
                  "the ids come from another tokenizer, or from a model with a larger vocabulary");
  }
  if (hooks_) hooks_->begin_forward();
  auto x = model->embed_tokens(tokens);                                      // (B, T, D)
  torch::Tensor cos, sin;
  Packing packing;
  if (documents.defined()) {
    if (cache || start_pos != 0) throw Error("model", "packed rows start at position 0 and take no kv cache");
    if (documents.sizes() != tokens.sizes())
      throw Error("model", "documents " + c10::str(documents.sizes()) + " do not match tokens " + c10::str(tokens.sizes()));
    const auto docs = documents.to(x.device(), torch::kInt64);
    std::tie(cos, sin) = rotary_.table(document_positions(docs), x.scalar_type());  // (B, 1, T, D)
    const bool automatic = packed_attention_ == PackedAttention::kAuto;
    if (packed_attention_ == PackedAttention::kSegments || (automatic && !compat::fused_masked_attention(x.device())))
      packing.segments = document_segments(documents);                              // (N, 3)
    if (automatic && packing.segments.defined() &&
        !segments_pay(packing.segments, tokens.size(0), tokens.size(1), cfg_.dim))
      packing.segments = torch::Tensor();
    if (!packing.segments.defined())
      packing.bias = document_bias(docs, cfg_.sliding_window, x.scalar_type());     // (B, 1, T, T)
  } else {
    std::tie(cos, sin) = rotary_.table(start_pos, tokens.size(1), x.device(), x.scalar_type());  // (T, D)
  }
  const bool recompute = checkpointing_ && is_training() && torch::GradMode::is_enabled() && !cache;
  // A frozen embedding (LoRA) gives an input that needs no gradient; the recomputing function
  // then needs one to be called in backward at all.
  if (recompute && !x.requires_grad()) x = x.detach().requires_grad_(true);
  int64_t l = 0;
  for (auto& layer : *model->layers) {
    auto* block = layer->as<BlockImpl>();
    if (recompute) {
      auto outs =
          BlockRecompute::apply(reinterpret_cast<int64_t>(block), reinterpret_cast<int64_t>(hooks_), l, x, cos, sin,
                                BlockRecompute::or_empty(packing.bias), BlockRecompute::or_empty(packing.segments));
      x = outs[0];
      rl.insert(rl.end(), outs.begin() + 1, outs.end());  // an MoE block's router logits
    } else {
      if (hooks_) hooks_->before_block(l, false);
      x = block->forward(x, cos, sin, rl, cache, l, packing);
      if (hooks_) hooks_->after_block(l, false);
    }
    ++l;
  }
  return model->norm(x);
}

KVCache TransformerImpl::new_cache(int64_t batch, int64_t capacity) {
  KVCache c;
  c.capacity = capacity > 0 ? capacity : cfg_.max_seq_len;
  auto w = model->embed_tokens->weight;
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    c.k.push_back(torch::zeros({batch, cfg_.kv_heads(), c.capacity, cfg_.hdim()}, w.options()));  // (B, Hkv, S, D)
    c.v.push_back(torch::zeros({batch, cfg_.kv_heads(), c.capacity, cfg_.hdim()}, w.options()));  // (B, Hkv, S, D)
  }
  return c;
}

TransformerImpl::Output TransformerImpl::forward_cached(const torch::Tensor& tokens, KVCache& cache, bool last_only) {
  torch::NoGradGuard no_grad;
  Output out;
  auto h = hidden(tokens, cache.length, nullptr, &cache);  // (B, T, D)
  out.logits = project(last_only ? h.narrow(1, h.size(1) - 1, 1) : h);
  cache.length += tokens.size(1);
  return out;
}

torch::Tensor TransformerImpl::project(const torch::Tensor& h) {
  return lm_head ? lm_head(h) : torch::nn::functional::linear(h, model->embed_tokens->weight);
}

TransformerImpl::Output TransformerImpl::forward(const torch::Tensor& tokens, int64_t start_pos) {
  std::vector<torch::Tensor> router_logits;
  auto h = hidden(tokens, start_pos, &router_logits);
  return finish(h, router_logits);
}

TransformerImpl::Output TransformerImpl::forward_packed(const torch::Tensor& tokens, const torch::Tensor& documents) {
  if (!documents.defined()) throw Error("model", "forward_packed needs the documents of every position");
  std::vector<torch::Tensor> router_logits;
  auto h = hidden(tokens, 0, &router_logits, nullptr, documents);
  return finish(h, router_logits);
}

TransformerImpl::Output TransformerImpl::forward_loss(const torch::Tensor& tokens, const torch::Tensor& targets,
                                                      const torch::Tensor& documents, const torch::Tensor& padding) {
  std::vector<torch::Tensor> router_logits;
  auto h = hidden(tokens, 0, &router_logits, nullptr, documents);
  const bool plain = !fused_loss_ || (lm_head && lm_head->has_lora());
  if (plain) {
    auto out = finish(h, router_logits, /*project_logits=*/true, padding);
    out.loss = cross_entropy(out.logits, targets);
    return out;
  }
  auto out = finish(h, router_logits, /*project_logits=*/false, padding);
  out.loss = linear_cross_entropy(h, lm_head ? lm_head->weight : model->embed_tokens->weight, targets, -100,
                                  loss_chunk_rows_, loss_fp32_weight_grad_);
  return out;
}

TransformerImpl::Output TransformerImpl::finish(torch::Tensor h, std::vector<torch::Tensor>& router_logits,
                                                bool project_logits, const torch::Tensor& padding) {
  Output out;
  if (project_logits) out.logits = project(h);
  if (router_logits.empty()) {
    out.aux_loss = torch::zeros({}, h.options().dtype(compat::compute_dtype(h)));
  } else {
    if (padding.defined()) {  // the router logits of real positions only
      if (padding.numel() != router_logits.front().size(0))
        throw Error("model", "padding has " + std::to_string(padding.numel()) + " positions, the batch " +
                                 std::to_string(router_logits.front().size(0)));
      const auto keep = (~padding.to(h.device())).reshape({-1}).nonzero().squeeze(1);  // (N')
      for (auto& l : router_logits) l = l.index_select(0, keep);                       // (N', E)
    }
    auto all = torch::cat(router_logits, 0);                                 // (L*N, E)
    out.balance_loss = load_balancing_loss(all, cfg_.n_experts_per_token);
    out.z_loss = router_z_loss(all);
    out.aux_loss = cfg_.moe_aux_loss_coef * out.balance_loss + cfg_.moe_z_loss_coef * out.z_loss;
  }
  return out;
}

void TransformerImpl::set_activation_checkpointing(bool on) { checkpointing_ = on; }

namespace {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

// out[i] = std * z(first + i), where z(2k) and z(2k + 1) are the Box-Muller pair (cosine, sine)
// of the k-th SplitMix64 output after `key`: u1 from its high 32 bits (so |z| < 6.8), the angle
// from its low 32 bits. Float libm (glibc's logf and sincosf are within 1 ulp).
void fill_normal(float* out, int64_t n, int64_t first, uint64_t key, double std) {
  constexpr double inv32 = 1.0 / 4294967296.0;
  const float two_pi = 6.2831853f, scale = static_cast<float>(std);
  auto pair = [&](int64_t k, float& c, float& s) {
    const uint64_t h = splitmix64(key + static_cast<uint64_t>(k) * 0x9e3779b97f4a7c15ULL);
    const float u1 = static_cast<float>((static_cast<double>(h >> 32) + 0.5) * inv32);  // (0, 1)
    const float u2 = static_cast<float>(static_cast<double>(h & 0xffffffffULL) * inv32);
    const float r = scale * std::sqrt(-2.0f * std::log(u1));
    ::sincosf(two_pi * u2, &s, &c);
    c *= r;
    s *= r;
  };
  // Pairs k covering elements [first, first + n), split over the machine's cores (plain threads:
  // at::parallel_for runs serially in code built without -fopenmp, and a LibTorch without MKL
  // runs with one intra-op thread here). Every value depends on its index alone, so the split
  // does not change the result.
  const int64_t k0 = first / 2, k1 = (first + n + 1) / 2;
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float c, s;
      pair(k, c, s);
      const int64_t i = 2 * k - first;  // out index of element 2k
      if (i >= 0) out[i] = c;
      if (i + 1 < n) out[i + 1] = s;
    }
  };
  const int64_t pairs = k1 - k0;
  const int64_t cores = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(cores, pairs >> 16));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run, k0 + pairs * t / threads, k0 + pairs * (t + 1) / threads);
  run(k0, k0 + pairs / threads);
  for (auto& th : pool) th.join();
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

void TransformerImpl::init_parameter(const std::string& name, torch::Tensor out, int64_t offset) const {
  torch::NoGradGuard no_grad;
  if (ends_with(name, "norm.weight")) {
    out.fill_(1.0);
    return;
  }
  const bool scaled = cfg_.init_depth_scaled && (ends_with(name, "o_proj.weight") || ends_with(name, "down_proj.weight") ||
                                                 ends_with(name, "w2.weight"));
  const double std = scaled ? cfg_.init_std / std::sqrt(2.0 * cfg_.n_layers) : cfg_.init_std;
  const bool direct = out.device().is_cpu() && out.scalar_type() == torch::kFloat32 && out.is_contiguous();
  torch::Tensor values = direct ? out : torch::empty({out.numel()}, torch::kFloat32);
  fill_normal(values.data_ptr<float>(), out.numel(), offset, splitmix64(init_seed_ ^ fnv1a(name)), std);
  if (!direct) out.copy_(values.view(out.sizes()));
}

void TransformerImpl::init_weights() {
  for (auto& p : named_parameters()) init_parameter(p.key(), p.value());
}

}  // namespace libllm
