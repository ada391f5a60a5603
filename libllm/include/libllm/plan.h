// The cluster planner behind `llm-plan --gpus N`: per-GPU memory of a recipe's training under
// each data-parallel sharding choice, whether it fits, and tokens/s and days for the recipe's
// token budget at a given MFU. Estimates from counted bytes (see plan.cpp for every term).
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "libllm/recipe.h"

namespace libllm {

struct ClusterSpec {
  int64_t gpus = 8;              // data-parallel ranks (one per GPU)
  int64_t gpus_per_node = 8;     // GPUs sharing a node (hybrid sharding shards inside a node)
  double gpu_memory_gib = 80;    // memory of one GPU, GiB
  double peak_tflops = 0;        // the GPU's dense bf16 peak, TFLOP/s (A100: 312, H100 SXM: 989); 0 = the
                                 // recipe's train.peak_tflops, or 312 when that is 0 too
  double mfu = 0.4;              // model FLOPs utilisation assumed for the throughput estimate, (0, 1]
};

// Bytes one GPU holds under one sharding choice.
struct MemoryRow {
  std::string sharding;          // none | zero1 | zero2 | zero3 | hybrid
  int64_t shard_ranks = 1;       // ranks the sharded states are divided over
  double weights = 0;            // the training-dtype weights (ZeRO-3: this rank's shard)
  double grads = 0;              // gradients in the weights' dtype
  double optimizer = 0;          // AdamW moments (+ fp32 master weights with bf16)
  double activations = 0;        // saved for backward, one micro batch, no recomputation
  double activations_ckpt = 0;   // the same with activation checkpointing per block
  double buffers = 0;            // runtime, communication buckets, ZeRO-3 gathered blocks and root unit, logits' gradient
  double grad_staging = 0;       // ZeRO-2/3 with checkpointing: gradients beside the shards in backward (a block's
                                 // new gradients and their buffer, two reductions in flight)
  double grad_unreduced = 0;     // ZeRO-2 without checkpointing: every gradient whole at the end of backward
                                 // (the activations freed by then) and a block's reduction buffer
  double total(bool checkpointing) const {
    return weights + grads + optimizer + buffers +
           (checkpointing ? activations_ckpt + grad_staging : std::max(activations, grad_unreduced));
  }
};

struct TrainingPlan {
  ClusterSpec cluster;
  int64_t params = 0;             // total parameters
  int64_t trainable = 0;          // parameters that train: all, or with finetune.method lora the adapters'
  bool lora = false;              // finetune.method lora: frozen base (sharded by zero3 / hybrid), fp32 adapters
  double flops_per_token = 0;     // 6 N (non-embedding, active; 4 N with LoRA) + 12 L H Q T
  int64_t micro_batch = 0;        // sequences per GPU per forward/backward (train.micro_batch)
  int64_t seq_len = 0;
  int64_t global_batch_tokens = 0;
  int64_t accumulation = 0;       // micro batches per step on each GPU (rounded up when not exact)
  bool batch_divides = true;      // global batch = micro_batch * seq_len * gpus * accumulation exactly
                                  // (else llm-pretrain refuses train.global_batch_tokens)
  std::vector<int64_t> dividing_gpus;  // when it does not: the nearest GPU counts below and above for
                                       // which it does (none when not even micro_batch * seq_len divides)
  int64_t total_tokens = 0;       // train.steps * global_batch_tokens
  double tokens_per_s = 0;        // gpus * mfu * peak / flops_per_token
  double days = 0;                // total_tokens / tokens_per_s
  std::vector<MemoryRow> rows;    // none, zero1, zero2, hybrid (when gpus_per_node divides gpus, fewer), zero3
  std::string recommendation;     // the least sharding that fits, preferring no recomputation
  double usable_bytes = 0;        // what "fits" means: at most 90% of a GPU's memory (the rest: the
                                  // caching allocator's fragmentation, NCCL's and cuBLAS's workspaces)
};

// The model a recipe trains: its finetune.base's config when that folder is at hand (a fine-tune
// trains its base's model, as llm-finetune does, which refuses model keys that disagree with it:
// finetune_model), else its model section (a base not downloaded yet; an Error when the recipe
// has none). `from_base`, when given, says which.
ModelConfig planned_model(const Recipe& recipe, bool* from_base = nullptr);

// The plan of `recipe`'s training (of planned_model(recipe)) on `cluster`; p.cluster holds the
// peak it assumed.
TrainingPlan plan_training(const Recipe& recipe, const ClusterSpec& cluster);

}  // namespace libllm
