// Next-token cross-entropy: on logits, or fused with the LM head so the logits never exist whole.
#pragma once

#include <torch/torch.h>

namespace libllm {

// Mean next-token cross-entropy of logits (B, T, V) against targets (B, T); targets equal to
// `ignore_index` do not count. Computed in fp32 (fp64 for fp64 logits).
torch::Tensor cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                            int64_t ignore_index = -100);

// cross_entropy(h @ weight^T, targets) for hidden states h (.., D), the LM head's weight (V, D)
// and targets (..), without holding the (.., V) logits: rows are taken `chunk_rows` at a time
// (0 = automatic: a chunk's logits hold max(rows * D, 2^24) elements). When h or weight needs a
// gradient (grad mode on), the gradients are computed in this forward pass, chunk by chunk, and
// kept until backward (Liger-Kernel's fused linear cross-entropy): peak memory is one chunk's
// logits plus the gradients of h and weight, instead of the logits, their fp32 copy, the log-
// softmax kept for backward and its gradient. The arithmetic is the unfused path's: the product in
// h's dtype (h is cast to the weight's, as Linear does), the softmax in fp32, its gradient cast
// back for the two products; the weight's gradient is summed over the chunks in its own dtype
// (for bf16: one rounding per chunk, as gradient accumulation over micro batches) or, with
// fp32_weight_grad and a bf16 / fp16 weight in more than one chunk, in fp32 (each chunk's product
// rounded once, the sum never; autograd rounds it to the weight's dtype once, after backward's
// scaling). Backward scales the kept gradients in fp32 (for bf16 one more rounding than the plain
// path, and no bias). Memory besides one chunk's fp32 logits and log-softmax: the gradients of h
// and weight, in their dtypes (fp32 sums: the weight's in fp32), from forward until backward. With
// no target counted the loss is NaN (as cross_entropy) and the gradients are zero. Backward runs
// once (no retain_graph).
torch::Tensor linear_cross_entropy(const torch::Tensor& h, const torch::Tensor& weight, const torch::Tensor& targets,
                                   int64_t ignore_index = -100, int64_t chunk_rows = 0, bool fp32_weight_grad = false);

}  // namespace libllm
