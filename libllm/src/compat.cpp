#include "libllm/compat.h"

#include <optional>
#include <string>
#include <thread>

#include "libllm/config.h"
#include "libllm/error.h"

#ifdef LIBLLM_CUDA
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#endif

namespace libllm::compat {

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const c10::optional<torch::Tensor>& mask) {
  const int64_t H = q.size(1), Hkv = k.size(1), T = q.size(2), S = k.size(2);
  // Keys/values serve H / Hkv consecutive query heads (transformers' repeat_kv).
  auto expand_kv = [&](const torch::Tensor& t) {
    return H == Hkv ? t : t.repeat_interleave(H / Hkv, 1);                   // (B, H, S, D)
  };
  // Bottom-right aligned causal mask for T != S (queries are the last T positions).
  c10::optional<torch::Tensor> m = mask;
  if (m && m->is_floating_point() && m->scalar_type() != q.scalar_type()) m = m->to(q.scalar_type());
  if (!m && T != S) {
    auto i = torch::arange(T, torch::dtype(torch::kInt64).device(q.device())).unsqueeze(1) + (S - T);
    m = torch::arange(S, torch::dtype(torch::kInt64).device(q.device())).unsqueeze(0) <= i;
  }
#if LIBLLM_TORCH_AT_LEAST(2, 5)
  // With a mask, flash attention is out; the memory-efficient kernel takes masks but not
  // enable_gqa (only the math fallback, which materialises (B, H, T, S) scores, takes both).
  if (m && q.is_cuda()) return at::scaled_dot_product_attention(q, expand_kv(k), expand_kv(v), *m, 0.0, false);
  // Flash attention (fp16/bf16 only) is the fused kernel that takes enable_gqa: fp32 on a GPU
  // expands the keys/values for the memory-efficient kernel instead.
  const bool half = q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf;
  if (q.is_cuda() && !half && H != Hkv)
    return at::scaled_dot_product_attention(q, expand_kv(k), expand_kv(v), c10::nullopt, 0.0, true);
  if (m) return at::scaled_dot_product_attention(q, k, v, *m, 0.0, false, c10::nullopt, H != Hkv);
  return at::scaled_dot_product_attention(q, k, v, c10::nullopt, 0.0, true, c10::nullopt, H != Hkv);
#elif LIBLLM_TORCH_AT_LEAST(2, 0)
  if (m) return at::scaled_dot_product_attention(q, expand_kv(k), expand_kv(v), *m, 0.0, false);
  return at::scaled_dot_product_attention(q, expand_kv(k), expand_kv(v), c10::nullopt, 0.0, true);
#else
  // softmax(q k^T / sqrt(D) + mask) v, with the softmax in fp32 (transformers' eager path).
  auto scores = torch::matmul(q, expand_kv(k).transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(-1)));
  if (m && m->is_floating_point()) {
    scores = scores + *m;
  } else {
    auto allowed = m ? *m : torch::ones({T, S}, torch::dtype(torch::kBool).device(q.device())).tril();
    scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  }
  auto probs = torch::softmax(scores, -1, compute_dtype(q)).to(q.scalar_type());   // (B, H, T, S)
  return torch::matmul(probs, expand_kv(v));                                       // (B, H, T, D)
#endif
}

bool fused_masked_attention(const torch::Device& device) {
#if LIBLLM_TORCH_AT_LEAST(2, 2)
  return device.is_cuda();
#else
  (void)device;
  return false;
#endif
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
#if LIBLLM_TORCH_AT_LEAST(2, 5)
  // at::rms_norm on CUDA: one fused kernel with LibTorch >= 2.8. From 2.5 it computes in fp32 as
  // below (2.4's computes in x's dtype: fp16 overflows on activations of a few hundred), and from
  // 2.7 it multiplies by the weight before the cast back: a bf16 result may then differ from the
  // explicit form by one unit in the last place. The CPU keeps the explicit form, so CPU results
  // do not depend on the LibTorch version.
  if (x.is_cuda()) return at::rms_norm(x, {x.size(-1)}, weight, eps);
#endif
  auto xf = x.to(compute_dtype(x));
  auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps);
  return weight * normed.to(x.scalar_type());
}

void set_default_num_threads() {
  if (const char* env = std::getenv("LIBLLM_THREADS"); env && *env && std::string(env) != "0") {  // (0: automatic)
    const std::optional<int64_t> n = parse_int(env);
    if (!n || *n < 1 || *n > 4096)
      throw Error("LIBLLM_THREADS", std::string("expected a thread count (0 = automatic), got '") + env + "'",
                  "unset it for the automatic choice");
    at::set_num_threads(static_cast<int>(*n));
    return;
  }
  // A LibTorch without MKL (Debian's) does its matmuls in OpenBLAS, whose own thread pool
  // already uses every core; LibTorch's OpenMP threads on top of it spin against it (measured
  // on the 2-core demo model: 2,450 tok/s with 2 intra-op threads, 6,550 tok/s with 1).
  if (!at::hasMKL()) {
    at::set_num_threads(1);
    return;
  }
  const unsigned n = std::thread::hardware_concurrency();
  if (n > 0) at::set_num_threads(static_cast<int>(n));
}

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

#ifdef LIBLLM_CUDA
bool cuda_available() { return torch::cuda::is_available(); }
bool cuda_in_use() {
  // (cudaGetDevice creates no context; asking for the device's generator would)
  return cuda_available() && at::detail::getCUDAHooks().hasPrimaryContext(c10::cuda::current_device());
}
void cuda_synchronize() { c10::cuda::device_synchronize(); }
int64_t cuda_peak_allocated_bytes(int device) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  return stats.allocated_bytes[0].peak;  // [0]: StatType::AGGREGATE
}
void cuda_set_device(int device) { c10::cuda::set_device(static_cast<c10::DeviceIndex>(device)); }
std::string cuda_device_name(int device) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return "";
  return prop.name;
}
#else
bool cuda_available() { return false; }
bool cuda_in_use() { return false; }
void cuda_synchronize() {}
int64_t cuda_peak_allocated_bytes(int) { return 0; }
void cuda_set_device(int) {}
std::string cuda_device_name(int) { return ""; }
#endif

int cuda_device_for(int local_rank) {
  const int n = static_cast<int>(torch::cuda::device_count());
  return n > 0 ? local_rank % n : 0;
}

bool nccl_available() {
#ifdef LIBLLM_NCCL
  return true;
#else
  return false;
#endif
}

}  // namespace libllm::compat
