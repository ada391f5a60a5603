#include "libllm/loss.h"

#include <algorithm>

#include "libllm/compat.h"
#include "libllm/error.h"

namespace libllm {

torch::Tensor cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets, int64_t ignore_index) {
  auto flat = logits.reshape({-1, logits.size(-1)}).to(compat::compute_dtype(logits));  // (B*T, V)
  return torch::nn::functional::cross_entropy(
      flat, targets.reshape({-1}), torch::nn::functional::CrossEntropyFuncOptions().ignore_index(ignore_index));
}

namespace {

struct ChunkedLoss {
  torch::Tensor loss;            // scalar, fp32 (fp64 for fp64 h)
  torch::Tensor grad_h, grad_w;  // d loss / d h (N, D) and d loss / d weight (V, D); undefined unless asked
};

bool reduced(const torch::Tensor& t) { return t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kHalf; }

// The mean cross-entropy of h (N, D) @ w^T (V, D) against targets (N), `chunk` rows at a time;
// with want_h / want_w, its gradients too; with fp32_w a reduced-precision weight's gradient is
// summed over the chunks in fp32 (and stays fp32). Runs without recording a graph.
ChunkedLoss chunked_loss(const torch::Tensor& h, const torch::Tensor& w, const torch::Tensor& targets,
                         int64_t ignore_index, int64_t chunk, bool want_h, bool want_w, bool fp32_w) {
  torch::NoGradGuard no_grad;
  const int64_t N = h.size(0), D = h.size(1), V = w.size(0);
  const auto cd = compat::compute_dtype(h);
  if (chunk <= 0) chunk = (std::max<int64_t>(N * D, int64_t{1} << 24) + V - 1) / V;
  chunk = std::max<int64_t>(1, std::min(chunk, N));
  auto counted = targets != ignore_index;                                  // (N) bool
  auto valid = counted.to(cd);                                              // (N): 1 = counted
  auto safe = torch::where(counted, targets, torch::zeros_like(targets));  // (N): a valid index everywhere
  auto count = valid.sum();                        // a tensor: no host sync on a GPU
  auto share = valid / count.clamp_min(1);         // (N): each row's weight in the mean (0 if none counts)

  ChunkedLoss out;
  auto total = torch::zeros({}, h.options().dtype(cd));
  const bool grads = want_h || want_w;
  if (want_h) out.grad_h = torch::empty_like(h);                     // (N, D)
  // fp32 sums only where there is something to sum: more than one chunk of a bf16 / fp16 weight.
  const bool sum32 = want_w && fp32_w && reduced(w) && chunk < N;
  if (want_w) out.grad_w = torch::zeros_like(w, sum32 ? w.options().dtype(torch::kFloat32) : w.options());  // (V, D)
  // fp32 sums add each chunk's product (rounded once, in the weight's dtype) a block of vocabulary
  // rows at a time, so the product's temporary is one block, not the whole (V, D).
  const int64_t v_block = std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(D, 1));
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t n = std::min(chunk, N - s);
    auto hc = h.narrow(0, s, n);                             // (n, D)
    auto t = safe.narrow(0, s, n).unsqueeze(1);              // (n, 1)
    auto v = valid.narrow(0, s, n).unsqueeze(1);             // (n, 1)
    auto logp = torch::log_softmax(torch::mm(hc, w.t()).to(cd), 1);  // (n, V); the logits go here
    total.sub_((logp.gather(1, t) * v).sum());
    if (!grads) continue;
    // d loss / d logits = share * (softmax - onehot(target)), in place of the log-probabilities.
    logp.exp_();
    logp.scatter_add_(1, t, -v);
    logp.mul_(share.narrow(0, s, n).unsqueeze(1));
    auto g = logp.to(h.scalar_type());                       // (n, V), the dtype of the products
    if (want_h) {
      auto rows = out.grad_h.narrow(0, s, n);  // (n, D)
      torch::mm_out(rows, g, w);
    }
    if (sum32) {
      for (int64_t v0 = 0; v0 < V; v0 += v_block) {
        const int64_t nv = std::min(v_block, V - v0);
        out.grad_w.narrow(0, v0, nv).add_(torch::mm(g.narrow(1, v0, nv).t(), hc));  // (nv, D)
      }
    } else if (want_w) {
      // In the weight's dtype: for bf16 each chunk's product is added in fp32 inside the GEMM and
      // the running sum rounded once per chunk.
      out.grad_w.addmm_(g.t(), hc);
    }
  }
  out.loss = total / count;  // NaN when nothing counts, as torch's mean cross-entropy
  return out;
}

// g *= s (a 0-dim tensor) in place. A reduced-precision g is scaled in fp32 a block at a time, so
// the factor (1 / accumulation steps, say) is not first rounded to g's dtype.
void scale_(torch::Tensor& g, const torch::Tensor& s) {
  const auto dt = g.scalar_type();
  if (dt == torch::kFloat32 || dt == torch::kFloat64) {
    g.mul_(s.to(dt));
    return;
  }
  auto flat = g.view({-1});
  auto factor = s.to(torch::kFloat32);
  constexpr int64_t block = int64_t{1} << 24;
  for (int64_t i = 0; i < flat.numel(); i += block) {
    auto part = flat.narrow(0, i, std::min(block, flat.numel() - i));
    part.copy_(part.to(torch::kFloat32).mul_(factor));
  }
}

// The loss whose backward hands out the gradients chunked_loss computed in the forward pass,
// scaled by the loss's incoming gradient.
struct LinearCrossEntropyFn : torch::autograd::Function<LinearCrossEntropyFn> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& h, const torch::Tensor& w,
                               const torch::Tensor& targets, int64_t ignore_index, int64_t chunk, bool want_h,
                               bool want_w, bool fp32_w) {
    auto r = chunked_loss(h, w, targets, ignore_index, chunk, want_h, want_w, fp32_w);
    ctx->saved_data["grad_h"] = want_h ? r.grad_h : torch::Tensor();
    ctx->saved_data["grad_w"] = want_w ? r.grad_w : torch::Tensor();
    return r.loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto scaled = [&](const char* key) {
      if (ctx->saved_data.find(key) == ctx->saved_data.end())
        throw Error("linear_cross_entropy", "backward ran twice through one loss",
                    "its gradients are handed out once; call forward again instead of retain_graph");
      auto g = ctx->saved_data[key].toTensor();
      ctx->saved_data.erase(key);  // the gradient buffers go as soon as they are handed out
      if (g.defined()) scale_(g, grad_out[0]);  // in place: nothing else holds g now
      return g;
    };
    // An fp32 weight gradient is scaled in fp32 and rounded to the weight's dtype once, by autograd.
    auto gh = scaled("grad_h"), gw = scaled("grad_w");
    return {
        gh, gw, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor linear_cross_entropy(const torch::Tensor& h, const torch::Tensor& weight, const torch::Tensor& targets,
                                   int64_t ignore_index, int64_t chunk_rows, bool fp32_weight_grad) {
  if (weight.dim() != 2 || h.size(-1) != weight.size(1))
    throw Error("linear_cross_entropy", "hidden states of width " + std::to_string(h.size(-1)) +
                                            " do not fit an LM head weight of shape " + c10::str(weight.sizes()));
  auto h2 = h.reshape({-1, h.size(-1)}).to(weight.scalar_type());  // (N, D), in the head's dtype as Linear
  auto t = targets.reshape({-1});          // (N)
  if (t.size(0) != h2.size(0))
    throw Error("linear_cross_entropy", std::to_string(t.size(0)) + " targets for " + std::to_string(h2.size(0)) +
                                            " positions");
  const bool grad = torch::GradMode::is_enabled();
  const bool want_h = grad && h.requires_grad(), want_w = grad && weight.requires_grad();
  if (!want_h && !want_w) return chunked_loss(h2, weight, t, ignore_index, chunk_rows, false, false, false).loss;
  return LinearCrossEntropyFn::apply(h2, weight, t, ignore_index, chunk_rows, want_h, want_w, fp32_weight_grad);
}

}  // namespace libllm
