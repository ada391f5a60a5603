// The one place where LibTorch versions differ (1.13 on Debian, 2.x with CUDA from pip).
// Everything else in libllm calls these helpers and never tests TORCH_VERSION_* itself.
#pragma once

#include <torch/torch.h>
#include <torch/version.h>

#define LIBLLM_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||         \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace libllm::compat {

// The dtype reductions (norms, softmax, losses) run in: fp32 for fp32/bf16/fp16 tensors,
// float64 for float64 ones (so double-precision gradient checks stay double).
inline torch::ScalarType compute_dtype(const torch::Tensor& x) {
  return x.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
}

// Causal scaled-dot-product attention. q: (B, H, T, D); k, v: (B, Hkv, S, D) with H % Hkv == 0.
// mask: optional, broadcastable to (B, H, T, S): bool, true = attend (sliding windows), or an
// additive mask (packed rows: 0, or the dtype's lowest finite value; cast to q's dtype when it
// differs); every query must see at least one key.
// When absent the attention is causal with query i seeing keys <= i + (S - T).
// Uses at::scaled_dot_product_attention (flash / memory-efficient / cuDNN kernels) on 2.x;
// on 1.13 a plain matmul-softmax-matmul that autograd differentiates.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const c10::optional<torch::Tensor>& mask);

// Whether SDPA runs an additive mask in a fused kernel on `device` (CUDA with LibTorch >= 2.2:
// the memory-efficient kernel, which takes the mask without a copy when its rows are 16-element
// aligned). Elsewhere a mask means (B, H, T, S) scores in memory.
bool fused_masked_attention(const torch::Device& device);

// RMSNorm y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (compute_dtype) and cast back
// to x's dtype before the weight multiply (the Hugging Face LLaMA convention). On CUDA with
// LibTorch >= 2.5, LibTorch's fused at::rms_norm (also fp32 inside; with 2.7+ the weight multiply
// precedes the cast: bf16 results within one unit in the last place of the explicit form).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// Sets LibTorch's intra-op threads: $LIBLLM_THREADS if set; 1 when LibTorch has no MKL (its
// BLAS, OpenBLAS, then runs its own pool on every core); else the machine's core count.
void set_default_num_threads();

// Human-readable LibTorch version, e.g. "1.13.1".
std::string torch_version();

// CUDA helpers; on a LibTorch without CUDA (Debian's) cuda_available() is false and the others
// do nothing / return 0.
bool cuda_available();                           // a CUDA device can be used
bool cuda_in_use();  // this process has a context on the current device (a CPU run has none)
bool nccl_available();                           // libllm was built with c10d's NCCL process group
void cuda_synchronize();                         // waits for the current device's queued work
int64_t cuda_peak_allocated_bytes(int device);   // the caching allocator's peak since the last reset
void cuda_set_device(int device);                // the device NCCL collectives and new tensors use
int cuda_device_for(int local_rank);             // local_rank modulo the visible devices (one per task under Slurm)
std::string cuda_device_name(int device);        // e.g. "NVIDIA H100 80GB HBM3" ("" without CUDA)

}  // namespace libllm::compat
