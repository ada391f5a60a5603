#include "libllm/plan.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include "libllm/error.h"
#include "libllm/hf.h"
#include "libllm/train.h"

namespace libllm {

ModelConfig planned_model(const Recipe& recipe, bool* from_base) {
  const bool base = !recipe.finetune.base.empty() && std::filesystem::exists(recipe.finetune.base);
  if (from_base) *from_base = base;
  if (base) return finetune_model(recipe, inspect_pretrained(recipe.finetune.base));
  const bool has_model = std::any_of(recipe.given.begin(), recipe.given.end(),
                                     [](const std::string& k) { return k.rfind("model.", 0) == 0; });
  if (!recipe.finetune.base.empty() && !has_model)
    throw Error("finetune.base",
                recipe.finetune.base + " is not here, and the recipe has no model section to plan instead",
                "make or download the base first, or give the recipe the base's model section");
  return recipe.model;
}

// Every term, per GPU, with Ψ parameters, w bytes per weight (2 for bf16, 4 for fp32):
//   weights w·Ψ, gradients g·Ψ (g = 4 with train.fp32_grads, the default, else w: bf16 weights'
//   gradients are summed in fp32), AdamW 8Ψ for the two fp32 moments plus 4Ψ for the fp32 master
//   copy when the weights are bf16.
//   none: all three whole; zero1: optimizer / N; zero2: gradients and optimizer / N; zero3: all
//   three / N; hybrid: all three / gpus_per_node (sharded inside a node, replicated across).
// Activations kept for backward (libllm's eager block, flash attention so no T x T scores), per
// token and layer, in elements of the training dtype: block input and the attention norm's output
// (2h), q (h), k and v (2 kv), the attention output (h), the residual (h), the MLP norm's output
// (h), and per routed expert gate, up, silu(gate) and their product (4 f): 6h + 2kv + 4fk.
// Outside the blocks: the embedding output and the final norm's input (2h elements) and the
// logits: bf16 logits + their fp32 copy + fp32 log-softmax (10 bytes per vocabulary entry; fp32
// training 8), or with train.fused_loss (the default) none of them but the final hidden states'
// gradient, computed in forward and kept until backward (h elements). With checkpointing each
// block keeps only its input (h) and one block at a time is recomputed (its full 6h + 2kv + 4fk).
// LoRA (finetune.method: lora): the base is frozen in the training dtype (w·Ψ); the adapters,
// Ψa = Σ r·(in + out) over the targeted projections, are fp32 with fp32 gradients and AdamW
// moments (4Ψa weights + 4Ψa gradients + 8Ψa optimizer), divided as above: under zero3 / hybrid
// the frozen base is sharded with the adapters (what makes a 65B base fit on one node), and the
// two gathered blocks include their adapters (4 bytes each). Activations: those of full training
// (an upper bound: a frozen projection's input need not be kept, but its adapter keeps it) plus,
// per adapter and token, its dropout mask (in bytes, when lora.dropout > 0) and A's output (4r);
// the adapter's fp32 (dropped) input is recomputed in backward (LinearImpl). A frozen LM head
// keeps no gradient with the fused loss, and an adapter on lm_head takes the plain loss.
// Compute: no weight gradients of the base, so 4 N + 12 L H Q T per token.
// Buffers: 1 GiB of runtime (CUDA context, cuBLAS workspaces, NCCL channels), 2 gradient buckets
// of 25 MiB, the fp32 gradient of the logits (4 bytes per vocabulary entry per token) or, fused,
// the LM head's gradient from forward until backward (w bytes per head weight; 4 when fp32_grads
// sums a bf16 one over its row chunks, with 2 more while autograd casts it at backward's start,
// when the chunk buffers are gone) and one chunk of
// max(tokens x h, 2^24) fp32 logits and their fp32 log-softmax (8 bytes per element), with bf16
// gradients AdamW's 256 MiB chunk of them in fp32, and for ZeRO-3 / hybrid two gathered blocks (the one in
// use and the prefetched next) in the weights' dtype, plus the root unit (embedding, final norm,
// LM head), gathered from the first block's forward to the end of backward, and its gradient.
TrainingPlan plan_training(const Recipe& r, const ClusterSpec& cluster) {
  ClusterSpec c = cluster;
  if (c.gpus < 1) throw Error("--gpus", "must be >= 1");
  if (c.gpus_per_node < 1) throw Error("--gpus-per-node", "must be >= 1");
  if (!(c.mfu > 0 && c.mfu <= 1)) throw Error("--mfu", "must be in (0, 1]");
  if (!(c.peak_tflops >= 0)) throw Error("--peak-tflops", "must be > 0 (0: the recipe's train.peak_tflops)");
  if (c.peak_tflops == 0) c.peak_tflops = r.train.peak_tflops > 0 ? r.train.peak_tflops : 312;
  if (!(c.gpu_memory_gib > 0)) throw Error("--gpu-memory", "must be > 0");
  const ModelConfig m = planned_model(r);
  if (r.train.seq_len > m.max_seq_len)  // (llm-pretrain's and llm-finetune's error)
    throw Error("train.seq_len", fmt::format("{} exceeds model.max_seq_len {}", r.train.seq_len, m.max_seq_len),
                "lower train.seq_len (rotary positions past max_seq_len were never trained)");
  const TrainConfig& t = r.train;
  const ParamCount pc = count_parameters(m);
  const bool lora = r.finetune.method == "lora";
  // The adapters: (elements, per-token activation bytes) per block and outside the blocks.
  double psi_a = 0, psi_a_block = 0, psi_a_outside = 0, lora_block = 0, lora_outside = 0;
  bool lora_head = false;
  if (lora) {
    const double rank = static_cast<double>(r.lora.rank);
    // The dropout's bool mask; the input itself is the block's tensor, counted above.
    const double per_input = r.lora.dropout > 0 ? 1.0 : 0.0;
    std::set<std::string> projections, matched;  // (as apply_lora matches them: by the module's last name)
    for (const WeightShape& ws : weight_shapes(m)) {
      if (ws.shape.size() != 2 || ws.name == "model.embed_tokens.weight") continue;  // (not a projection)
      std::string leaf = ws.name.substr(0, ws.name.size() - 7);  // drop ".weight"
      leaf = leaf.substr(leaf.rfind('.') + 1);
      projections.insert(leaf);
      if (std::find(r.lora.targets.begin(), r.lora.targets.end(), leaf) == r.lora.targets.end()) continue;
      matched.insert(leaf);
      const double out = static_cast<double>(ws.shape[0]), in = static_cast<double>(ws.shape[1]);
      const bool in_block = ws.name.rfind("model.layers.", 0) == 0;
      psi_a += rank * (in + out);
      // Routed experts see a token only when chosen: k of n_experts of them per token.
      const double share = ws.name.find(".experts.") != std::string::npos
                               ? static_cast<double>(m.n_experts_per_token) / static_cast<double>(m.n_experts)
                               : 1.0;
      // An adapter keeps its input; a block's projection inputs are counted with the block, the
      // LM head's (the final norm's output, w bytes an element) is not.
      const double kept_input = leaf == "lm_head" ? (t.dtype == "bf16" ? 2.0 : 4.0) * in : 0.0;
      const double bytes = share * (per_input * in + 4.0 * rank) + kept_input;
      if (in_block) {  // summed over blocks: per block
        lora_block += bytes / static_cast<double>(m.n_layers);
        psi_a_block += rank * (in + out) / static_cast<double>(m.n_layers);
      } else {
        lora_outside += bytes;
        psi_a_outside += rank * (in + out);
      }
      lora_head = lora_head || leaf == "lm_head";
    }
    for (const std::string& target : r.lora.targets)
      if (!matched.count(target)) {  // llm-finetune's error (apply_lora), before it is reached
        std::string list;
        for (const auto& n : projections) list += (list.empty() ? "" : ", ") + n;
        throw Error("lora.targets", "'" + target + "' names no projection of this model", "its projections: " + list);
      }
  }
  TrainingPlan p;
  p.cluster = c;
  p.params = pc.total;
  p.trainable = lora ? static_cast<int64_t>(psi_a) : pc.total;
  p.lora = lora;
  p.micro_batch = t.micro_batch;
  p.seq_len = t.seq_len;
  p.flops_per_token = (lora ? 4.0 : 6.0) * static_cast<double>(pc.active - pc.embedding) +
                      12.0 * m.n_layers * m.n_heads * m.hdim() * static_cast<double>(t.seq_len);
  const int64_t per_pass = t.micro_batch * t.seq_len * c.gpus;
  p.global_batch_tokens = t.global_batch_tokens > 0 ? t.global_batch_tokens : per_pass;
  p.accumulation = (p.global_batch_tokens + per_pass - 1) / per_pass;
  p.batch_divides = p.global_batch_tokens % per_pass == 0;
  if (!p.batch_divides && p.global_batch_tokens % (t.micro_batch * t.seq_len) == 0) {
    // GPU counts g that divide the step's micro batches: the nearest below and above c.gpus.
    const int64_t micro = p.global_batch_tokens / (t.micro_batch * t.seq_len);
    int64_t below = 0, above = 0;
    for (int64_t d = 1; d * d <= micro; ++d)
      if (micro % d == 0)
        for (const int64_t g : {d, micro / d}) {
          if (g < c.gpus) below = std::max(below, g);
          if (g > c.gpus && (above == 0 || g < above)) above = g;
        }
    for (const int64_t g : {below, above})
      if (g > 0) p.dividing_gpus.push_back(g);
  }
  p.total_tokens = t.steps * p.global_batch_tokens;
  p.tokens_per_s = c.gpus * c.mfu * c.peak_tflops * 1e12 / p.flops_per_token;
  p.days = static_cast<double>(p.total_tokens) / p.tokens_per_s / 86400.0;

  const double psi = static_cast<double>(pc.total);
  const bool bf16 = t.dtype == "bf16";
  const double w = bf16 ? 2.0 : 4.0;
  const double weights = lora ? w * psi + 4.0 * psi_a : w * psi;
  // bytes per gradient element (ZeRO-2/3 buffers too); one micro batch on one GPU sums nothing
  const double g = bf16 && t.fp32_grads && (p.accumulation > 1 || c.gpus > 1) ? 4.0 : w;
  const double grads = lora ? 4.0 * psi_a : g * psi;
  const double optim = lora ? 8.0 * psi_a : (bf16 ? 12.0 : 8.0) * psi;
  const double h = static_cast<double>(m.dim), kv = static_cast<double>(m.kv_heads() * m.hdim());
  const double f = static_cast<double>(m.ffn_dim), k = m.n_experts > 0 ? static_cast<double>(m.n_experts_per_token) : 1.0;
  const double V = static_cast<double>(m.vocab_size), L = static_cast<double>(m.n_layers);
  const double tokens = static_cast<double>(t.micro_batch * t.seq_len);
  const double block = w * (6 * h + 2 * kv + 4 * f * k) + lora_block;  // bytes per token, one block
  const bool fused = t.fused_loss && !lora_head;
  const double outside = w * 2 * h + (fused ? w * h : (bf16 ? 10.0 : 8.0) * V) + lora_outside;  // bytes per token
  const double chunk = std::max(tokens * h, std::pow(2.0, 24));  // elements of one chunk's logits
  // The head's gradient: fp32 when fp32_grads sums a bf16 one over more than one chunk of rows
  // (with a block of the vocabulary's bf16 products, 2^24 elements), else in the weights' dtype.
  // Summed in fp32 it is handed to autograd in fp32 and cast to bf16 there: both for a moment
  // (6 bytes a head weight) at the start of backward, when the forward's chunk buffers are gone.
  const bool head32 = bf16 && t.fp32_grads && !lora && tokens > std::ceil(chunk / V);
  const double head_grad = lora ? 0.0 : w * V * h;  // a frozen head has none
  // One chunk's logits: in bf16 the product (2 bytes), its fp32 copy and the log-softmax (4 + 4),
  // then the log-softmax and its bf16 gradient (6) with, summing in fp32, a 2^24-element block of
  // products; in fp32 the product and the log-softmax (8).
  const double chunk_bytes =
      bf16 ? std::max(10.0 * chunk, 6.0 * chunk + (head32 ? 2.0 * std::pow(2.0, 24) : 0.0)) : 8.0 * chunk;
  const double loss = !fused   ? tokens * 4 * V
                      : head32 ? std::max(4.0 * V * h + chunk_bytes, 6.0 * V * h)
                               : head_grad + chunk_bytes;
  const double act = tokens * (L * block + outside);
  const double act_ckpt = tokens * (L * w * h + block + outside);
  // AdamW's fp32 chunk of bf16 gradients (LoRA's adapters are fp32, and fp32_grads' too: none).
  const double runtime =
      std::pow(2.0, 30) + 2 * 25 * std::pow(2.0, 20) + loss + (g == 2.0 && !lora ? std::pow(2.0, 28) : 0.0);
  // ZeRO-3 / hybrid: two gathered blocks, and the root unit (embedding, final norm, LM head),
  // gathered for the whole step with, when it trains, its whole gradient buffer (which holds the
  // head's gradient the fused loss counts above; LoRA: only adapters on the head train, fp32).
  const double root = static_cast<double>(pc.embedding + pc.final_norm + pc.lm_head);
  // (the fused loss's head gradient, counted above, is a tensor of its own beside this buffer)
  const double root_grad = lora ? 8.0 * psi_a_outside : g * root;
  const double gathered = 2 * (w * static_cast<double>(pc.per_block) + 4.0 * psi_a_block) + w * root + root_grad;
  // ZeRO-2/3 gradients beside their shards: with checkpointing, per block: the recomputed block's
  // new gradients (autograd's, in the weights' dtype), the buffer they are added into, and two
  // reductions in flight (each a block's gradient, g bytes). ZeRO-2 without it reduces only after
  // backward: every gradient whole as autograd made it (w bytes), then (the activations gone by
  // then) plus one block's buffer.
  const double block_grad = lora ? 4.0 * psi_a_block : g * static_cast<double>(pc.per_block);
  const double block_new = lora ? 4.0 * psi_a_block : w * static_cast<double>(pc.per_block);
  const double staging = block_new + 3 * block_grad, unreduced = (lora ? grads : w * psi) + block_grad;

  auto row = [&](const std::string& name, int64_t n, double wd, double gd, double od, bool gather) {
    MemoryRow x;
    x.sharding = name;
    x.shard_ranks = n;
    x.weights = weights / wd;
    x.grads = grads / gd;
    x.optimizer = optim / od;
    x.activations = act;
    x.activations_ckpt = act_ckpt;
    x.buffers = runtime + (gather ? gathered : 0.0);
    if (gd > 1) {  // gradients sharded: staged before their reduction
      x.grad_staging = staging;
      x.grad_unreduced = gather ? staging : unreduced;  // (ZeRO-3 and hybrid recompute in libllm: informative)
    }
    p.rows.push_back(x);
  };
  const double N = static_cast<double>(c.gpus);
  row("none", 1, 1, 1, 1, false);
  row("zero1", c.gpus, 1, 1, N, false);
  row("zero2", c.gpus, 1, N, N, false);
  // (libllm's hybrid needs whole groups: the node size must divide the ranks)
  if (c.gpus > c.gpus_per_node && c.gpus % c.gpus_per_node == 0) {  // shards less than zero3: preferred when both fit
    const double g = static_cast<double>(c.gpus_per_node);
    row("hybrid", c.gpus_per_node, g, g, g, true);
  }
  row("zero3", c.gpus, N, N, N, true);
  const double capacity = 0.9 * c.gpu_memory_gib * std::pow(2.0, 30);
  p.usable_bytes = capacity;
  for (bool ckpt : {false, true}) {
    for (const MemoryRow& x : p.rows) {
      // libllm's ZeRO-3 (and hybrid) recompute every block: they need activation checkpointing.
      const bool needs_ckpt = x.sharding == "zero3" || x.sharding == "hybrid";
      if (x.total(ckpt) <= capacity && (ckpt || !needs_ckpt)) {
        p.recommendation = fmt::format("{}{} ({:.1f} of {:.0f} GiB per GPU)", x.sharding,
                                       ckpt ? " with activation checkpointing" : "",
                                       x.total(ckpt) / std::pow(2.0, 30), c.gpu_memory_gib);
        return p;
      }
    }
  }
  p.recommendation = "nothing fits: lower train.micro_batch, add GPUs, or shard further (tensor/pipeline "
                     "parallelism is not in libllm)";
  return p;
}

}  // namespace libllm
