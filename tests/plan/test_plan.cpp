// llm-plan's figures (libllm::plan_training) against values computed by hand from the formulas
// in libllm/src/plan.cpp, for the llama-7b and llama-65b recipes. Ψ: parameters.
#include "../catch_torch.h"

#include <algorithm>

#include "libllm/hf.h"
#include "libllm/plan.h"

using namespace libllm;
using Catch::Detail::Approx;

namespace {

Recipe recipe(const std::string& name, std::vector<std::string> sets) {
  return Recipe::load(std::string(LIBLLM_SOURCE_DIR) + "/recipes/" + name + ".yaml", sets);
}

const MemoryRow& row(const TrainingPlan& p, const std::string& name) {
  for (const auto& r : p.rows)
    if (r.sharding == name) return r;
  FAIL("no row " << name);
  throw;
}

}  // namespace

TEST_CASE("llm-plan: llama-7b on 8 x A100-80GB, hand-computed", "[plan]") {
  // Ψ = 6,738,415,616; embedding 32000 x 4096 = 131,072,000; bf16, 1 x 2048 tokens per GPU.
  // The plain loss (train.fused_loss false): the logits and their gradient whole.
  const Recipe r = recipe("llama-7b", {"train.dtype=bf16", "train.micro_batch=1", "train.seq_len=2048",
                                       "train.global_batch_tokens=0", "train.fused_loss=false"});
  ClusterSpec c;
  c.gpus = 8;
  c.gpu_memory_gib = 80;
  c.peak_tflops = 312;
  c.mfu = 0.4;
  const TrainingPlan p = plan_training(r, c);
  // FLOPs/token = 6 (Ψ - 131,072,000) + 12 L H Q T = 39,644,061,696 + 12*32*32*128*2048 (3,221,225,472)
  CHECK(p.flops_per_token == Approx(42865287168.0).epsilon(1e-12));
  // tokens/s = 8 * 0.4 * 312e12 / 42,865,287,168 = 23,291.56
  CHECK(p.tokens_per_s == Approx(998.4e12 / 42865287168.0).epsilon(1e-12));
  CHECK(p.tokens_per_s == Approx(23291.56).epsilon(1e-6));
  const MemoryRow& none = row(p, "none");
  CHECK(none.weights == Approx(13476831232.0));    // 2 Ψ
  CHECK(none.grads == Approx(26953662464.0));      // 4 Ψ: summed in fp32 (train.fp32_grads)
  CHECK(none.optimizer == Approx(80860987392.0));  // 12 Ψ: fp32 master + two fp32 moments
  // Activations per token and layer: 2 bytes x (6*4096 + 2*4096 + 4*11008) = 153,600; outside the
  // blocks 2*2*4096 + 10*32000 = 336,384; one micro batch: 2048 x (32*153,600 + 336,384).
  CHECK(none.activations == Approx(10755244032.0));
  // Checkpointing: 2048 x (32 * 2*4096 + 153,600 + 336,384) = 2048 x 752,128.
  CHECK(none.activations_ckpt == Approx(1540358144.0));
  // Buffers: 2^30 + 2 * 25 MiB + 2048 x 4 x 32000 (the logits' fp32 gradient); no chunk of bf16
  // gradients converted for AdamW (they are fp32).
  CHECK(none.buffers == Approx(1388314624.0));
  CHECK(row(p, "zero1").optimizer == Approx(80860987392.0 / 8));
  CHECK(row(p, "zero2").grads == Approx(26953662464.0 / 8));
  CHECK(row(p, "zero3").weights == Approx(13476831232.0 / 8));
  // ZeRO-3 also holds two gathered blocks, 2 x 2 bytes x 202,383,360, and for the whole step the
  // gathered root unit (embedding, final norm, head: 2 bytes x 262,148,096) and its fp32 gradient
  // buffer (4 bytes each; the plain loss counts no head gradient of its own).
  CHECK(row(p, "zero3").buffers == Approx(1388314624.0 + 809533440.0 + 524296192.0 + 1048592384.0));
  // none: 12.55 + 25.10 + 75.31 + 10.02 + 1.29 = 124.27 GiB (no fit even with checkpointing);
  // zero1: 2Ψ + 4Ψ + 1.5Ψ = 47.07 GiB + 10.02 + 1.29 = 58.38 GiB: the least sharding that fits.
  CHECK(none.total(false) / (1 << 30) == Approx(124.27).margin(0.005));
  CHECK(row(p, "zero1").total(false) / (1 << 30) == Approx(58.38).margin(0.005));
  CHECK(p.recommendation == "zero1 (58.4 of 80 GiB per GPU)");
  CHECK(p.usable_bytes == Approx(0.9 * 80 * (1 << 30)));  // ("fits": at most 90% of the card)
  CHECK(p.rows.size() == 4);  // no hybrid row on a single node
}

TEST_CASE("llm-plan: llama-65b on 64 x A100-80GB at 50% MFU, hand-computed, and its published speed", "[plan]") {
  // Ψ = 65,285,660,672; per block 4*8192^2 + 3*8192*22016 + 2*8192 = 809,517,056.
  const Recipe r = recipe("llama-65b", {"train.dtype=bf16", "train.micro_batch=1", "train.seq_len=2048",
                                        "train.global_batch_tokens=4194304", "train.steps=333786",
                                        "train.fused_loss=false"});
  ClusterSpec c;
  c.gpus = 64;
  c.gpus_per_node = 8;
  c.peak_tflops = 312;
  c.mfu = 0.5;
  const TrainingPlan p = plan_training(r, c);
  // 6 (Ψ - 262,144,000) + 12*80*64*128*2048 = 390,141,100,032 + 16,106,127,360
  CHECK(p.flops_per_token == Approx(406247227392.0).epsilon(1e-12));
  // 64 * 0.5 * 312e12 / 406,247,227,392 = 24,576.2 tokens/s (384 per GPU)
  CHECK(p.tokens_per_s == Approx(24576.17).epsilon(1e-6));
  // 4,194,304 / (1 * 2048 * 64) = 32 micro batches per step, exact.
  CHECK(p.accumulation == 32);
  CHECK(p.batch_divides);
  // 333,786 steps x 4,194,304 tokens = 1.40e12 tokens -> 1.4e12 / 24,576.17 / 86400 = 659.3 days.
  CHECK(p.days == Approx(333786.0 * 4194304.0 / 24576.17 / 86400.0).epsilon(1e-6));
  const MemoryRow& z3 = row(p, "zero3");
  // (2 + 4 + 12) Ψ / 64 = 18,361,592,064 bytes of states (fp32 gradients).
  CHECK(z3.weights + z3.grads + z3.optimizer == Approx(18361592064.0));
  // Per token: 80 layers x 2 x (6*8192 + 2*8192 + 4*22016) = 24,576,000 + outside 352,768.
  CHECK(z3.activations == Approx(2048.0 * 24928768.0));
  CHECK(z3.activations_ckpt == Approx(2048.0 * (80.0 * 2 * 8192 + 307200 + 352768)));
  // 2^30 + 50 MiB + 2048*4*32000 + two gathered blocks 2 * 2 * 809,517,056 + the root unit
  // (2 x 8192*32000 + 8192 = 524,296,192 weights, 2 bytes each) gathered and its fp32 gradient.
  CHECK(z3.buffers == Approx(1388314624.0 + 3238068224.0 + 2 * 524296192.0 + 4 * 524296192.0));
  // 65B does not fit replicated, nor ZeRO-1/2 (2Ψ weights alone are 121.6 GiB); ZeRO-3 without
  // recomputation would need 17.10 + 47.55 (the activations, above the staged gradients) + 7.24
  // = 71.89 GiB.
  CHECK(row(p, "zero2").total(true) > 80.0 * (1 << 30));
  CHECK(z3.total(false) / (1 << 30) == Approx(71.89).margin(0.005));
  // libllm's ZeRO-3 recomputes every block (it needs activation checkpointing), and its backward
  // holds, beside the gradient shards, 4 blocks' gradients: the recomputed block's new ones (bf16,
  // as autograd makes them), the fp32 buffer they are added into, two fp32 reductions in flight:
  // (2 + 3 x 4) x 809,517,056 bytes.
  CHECK(z3.grad_staging == Approx(14.0 * 809517056.0));
  // So what it can train needs 17.10 (states) + 3.76 (2048 x 1,970,688 bytes of checkpointed
  // activations) + 7.24 (buffers) + 10.55 (gradient staging) = 38.65 GiB.
  CHECK(z3.total(true) / (1 << 30) == Approx(38.65).margin(0.005));
  CHECK(p.recommendation == "zero3 with activation checkpointing (38.7 of 80 GiB per GPU)");
  // With bf16 gradients (train.fp32_grads: false): 16 Ψ / 64 states, 2-byte gradient buffers and
  // staging, AdamW's 2^28 chunk of them in fp32: 15.20 + 3.76 + 6.51 + 6.03 = 31.50 GiB.
  const TrainingPlan lean = plan_training(
      recipe("llama-65b", {"train.dtype=bf16", "train.micro_batch=1", "train.seq_len=2048",
                           "train.global_batch_tokens=4194304", "train.fused_loss=false", "train.fp32_grads=false"}),
      c);
  CHECK(row(lean, "zero3").grad_staging == Approx(4.0 * 2 * 809517056.0));
  CHECK(row(lean, "zero3").total(true) / (1 << 30) == Approx(31.50).margin(0.005));
  // Hybrid: shard inside a node of 8, replicate across the 8 nodes: 16 Ψ / 8 = 121.6 GiB: no fit.
  CHECK(row(p, "hybrid").weights == Approx(2.0 * 65285660672.0 / 8));
  CHECK(row(p, "hybrid").total(true) > 80.0 * (1 << 30));
  // LLaMA's paper: ~380 tokens/s/GPU on 2048 A100-80GB for 65B = 380 * 406.2e9 / 312e12 = 49.5% MFU.
  CHECK(380.0 * p.flops_per_token / 312e12 == Approx(0.4948).margin(1e-4));
}

TEST_CASE("llm-plan: llama-7b with the fused loss (the default), hand-computed", "[plan]") {
  const Recipe r = recipe("llama-7b", {"train.dtype=bf16", "train.micro_batch=1", "train.seq_len=2048",
                                       "train.global_batch_tokens=0"});
  ClusterSpec c;
  c.gpus = 8;
  c.gpu_memory_gib = 80;
  const TrainingPlan p = plan_training(r, c);
  const MemoryRow& none = row(p, "none");
  // Outside the blocks: 2*2*4096 + the hidden states' gradient 2*4096 = 24,576 bytes per token
  // (not 336,384): 2048 x (32*153,600 + 24,576) and, checkpointed, 2048 x (32*2*4096 + 153,600 + 24,576).
  CHECK(none.activations == Approx(2048.0 * 4939776.0));
  CHECK(none.activations_ckpt == Approx(2048.0 * 440320.0));
  // Buffers: 2^30 + 50 MiB + the loss's peak: the head's gradient, summed in fp32 over 4 chunks of
  // 525 rows (train.fp32_grads; any bf16 run with more than one chunk), 4 x 32000*4096, with a
  // 2^24-element block of bf16 products and one chunk of 2^24 logits (2048*4096 < 2^24) and their
  // log-softmax at 8 bytes, in forward (0.645 GiB), or in backward that gradient and its bf16 cast,
  // 6 x 32000*4096 (0.732 GiB): the larger.
  CHECK(none.buffers == Approx(1073741824.0 + 52428800.0 + 6.0 * 131072000.0));
  // Without recomputation: 12.55 + 25.10 + 75.31 (states) + 9.42 + 1.77 GiB = 124.16.
  CHECK(none.total(false) / (1 << 30) == Approx(124.16).margin(0.005));
  // Summed in bf16 (train.fp32_grads false) the head's gradient is 2 bytes a weight, no block.
  const Recipe r16 = recipe("llama-7b", {"train.dtype=bf16", "train.micro_batch=1", "train.seq_len=2048",
                                         "train.global_batch_tokens=0", "train.fp32_grads=false"});
  CHECK(row(plan_training(r16, c), "none").buffers ==
        Approx(1073741824.0 + 52428800.0 + 2.0 * 131072000.0 + 10.0 * 16777216.0 + 268435456.0));
}

TEST_CASE("llm-plan: a LoRA fine-tune of a 7B base on one GPU, hand-computed", "[plan]") {
  // recipes/amber-7b-lora.yaml: rank 16 on all seven projections, dropout 0.05, bf16 base, 4 x 2048.
  const Recipe r = recipe("amber-7b-lora", {});
  ClusterSpec c;
  c.gpus = 8;
  c.gpu_memory_gib = 24;
  const TrainingPlan p = plan_training(r, c);
  REQUIRE(p.lora);
  // Ψa = 32 blocks x 16 x (q, k, v, o: 4096 + 4096 each; gate, up, down: 4096 + 11008 each)
  //    = 512 x (4 x 8192 + 3 x 15104) = 39,976,960.
  CHECK(p.trainable == 39976960);
  CHECK(p.params == 6738415616);
  REQUIRE(p.rows.size() == 4);  // none, zero1, zero2, zero3 (8 GPUs, one node: no hybrid)
  const MemoryRow& none = row(p, "none");
  const MemoryRow& z1 = row(p, "zero1");
  const MemoryRow& z2 = row(p, "zero2");
  const MemoryRow& z3 = row(p, "zero3");
  CHECK(none.weights == Approx(2.0 * 6738415616.0 + 4.0 * 39976960.0));
  CHECK(none.grads == Approx(4.0 * 39976960.0));
  CHECK(none.optimizer == Approx(8.0 * 39976960.0));
  CHECK(z1.optimizer == Approx(8.0 * 39976960.0 / 8));
  CHECK(z1.weights == none.weights);
  CHECK(z2.weights == none.weights);
  CHECK(z2.grads == Approx(4.0 * 39976960.0 / 8));
  // ZeRO-3 shards the frozen base with the adapters, and gathers two blocks: each 202,383,360 bf16
  // base weights (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) and 39,976,960 / 32 = 1,249,280 fp32
  // adapter weights.
  CHECK(z3.weights == Approx(none.weights / 8));
  CHECK(z3.grads == Approx(4.0 * 39976960.0 / 8));
  CHECK(z3.optimizer == Approx(8.0 * 39976960.0 / 8));
  // The frozen root (2 x 32000*4096 + 4096 bf16 weights) is gathered for the whole step, with no gradient.
  CHECK(z3.buffers == Approx(none.buffers + 2 * (2.0 * 202383360 + 4.0 * 1249280) + 2.0 * 262148096));
  // Per block and token: the base's 2 x 76,800 bytes + the adapters' dropout masks (1 byte per
  // input element: six of 4096, down's 11008) + A's outputs (7 x 4 x 16):
  // 153,600 + 24,576 + 11,008 + 448 = 189,632. Outside: 2 x 2 x 4096 + the fused loss's 2 x 4096.
  CHECK(none.activations == Approx(8192.0 * (32 * 189632.0 + 24576.0)));
  CHECK(none.activations_ckpt == Approx(8192.0 * (32 * 2 * 4096.0 + 189632.0 + 24576.0)));
  // Buffers: runtime + buckets + one fused-loss chunk (10 x 8192 x 4096 bytes: the bf16 product, its
  // fp32 copy, the log-softmax); the frozen head keeps no gradient and the fp32 adapters need no
  // bf16 AdamW chunk.
  CHECK(none.buffers == Approx(1073741824.0 + 52428800.0 + 10.0 * 8192 * 4096));
  CHECK(none.total(true) / (1 << 30) == Approx(18.14).margin(0.005));
  CHECK(p.recommendation == "none with activation checkpointing (18.1 of 24 GiB per GPU)");
  // No weight gradients of the base: 4 N + 12 L H Q T.
  CHECK(p.flops_per_token == Approx(4.0 * (6738415616.0 - 131072000.0) + 12.0 * 32 * 32 * 128 * 2048));
  // Without dropout an adapter keeps only A's output, in bf16 as in fp32.
  const TrainingPlan nd = plan_training(recipe("amber-7b-lora", {"lora.dropout=0"}), c);
  CHECK(row(nd, "none").activations == Approx(8192.0 * (32 * (153600.0 + 448) + 24576.0)));
  const TrainingPlan f32 = plan_training(recipe("amber-7b-lora", {"lora.dropout=0", "train.dtype=fp32"}), c);
  CHECK(row(f32, "none").activations == Approx(8192.0 * (32 * (307200.0 + 448) + 4 * (2 * 4096.0 + 4096.0))));
  // An adapter on lm_head: the plain loss (its logits), the head's dropout mask and its bf16 input.
  const TrainingPlan head = plan_training(
      recipe("amber-7b-lora", {"lora.targets=[q_proj,lm_head]"}), c);
  CHECK(head.trainable == 32 * 16 * 8192 + 16 * (4096 + 32000));
  CHECK(row(head, "none").activations ==
        Approx(8192.0 * (32 * (153600.0 + 4096 + 64) + 2 * 2 * 4096.0 + 10.0 * 32000 + 4096 + 64 + 2 * 4096)));
}

TEST_CASE("llm-plan: bad cluster figures are errors naming the option", "[plan]") {
  const Recipe r = recipe("llama-7b", {});
  ClusterSpec c;
  c.mfu = 1.5;
  CHECK_THROWS_WITH(plan_training(r, c), Catch::Matchers::Contains("--mfu"));
  c = ClusterSpec{};
  c.gpus = 0;
  CHECK_THROWS_WITH(plan_training(r, c), Catch::Matchers::Contains("--gpus"));
  // A LoRA target that names no projection: llm-finetune's error, not a plan with 0 adapters.
  c = ClusterSpec{};
  CHECK_THROWS_WITH(plan_training(recipe("amber-7b-lora", {"lora.targets=[q_proj,q_prj]"}), c),
                    Catch::Matchers::Contains("lora.targets: 'q_prj' names no projection of this model") &&
                        Catch::Matchers::Contains("its projections: down_proj, gate_proj, k_proj, lm_head"));
  CHECK_THROWS_WITH(plan_training(recipe("amber-7b-lora", {"lora.targets=[embed_tokens]"}), c),
                    Catch::Matchers::Contains("'embed_tokens' names no projection"));
}

TEST_CASE("llm-plan: a fine-tune is planned on its base, at the recipe's peak", "[plan]") {
  // The peak: the recipe's train.peak_tflops (amber-7b-lora: 989, an H100), 312 when it is 0,
  // or the cluster's own figure.
  const TrainingPlan h100 = plan_training(recipe("amber-7b-lora", {}), ClusterSpec{});
  CHECK(h100.cluster.peak_tflops == 989);
  CHECK(h100.tokens_per_s == Approx(8 * 0.4 * 989e12 / h100.flops_per_token));
  CHECK(plan_training(recipe("amber-7b-lora", {"train.peak_tflops=0"}), ClusterSpec{}).cluster.peak_tflops == 312);
  ClusterSpec given;
  given.peak_tflops = 500;
  CHECK(plan_training(recipe("amber-7b-lora", {}), given).cluster.peak_tflops == 500);
  given.peak_tflops = -1;
  CHECK_THROWS_WITH(plan_training(recipe("amber-7b-lora", {}), given), Catch::Matchers::Contains("--peak-tflops"));
  // finetune.base at hand: its config (tiny-jargon has no model section).
  const std::string base = std::string(LIBLLM_SOURCE_DIR) + "/tests/fixtures/tiny-llama";
  const Pretrained tiny_base = inspect_pretrained(base);
  const std::string fits = "train.seq_len=" + std::to_string(tiny_base.config.max_seq_len);
  const Recipe tiny = recipe("tiny-jargon", {"finetune.base=" + base, fits});
  bool from_base = false;
  const ModelConfig m = planned_model(tiny, &from_base);
  CHECK(from_base);
  CHECK(m.dim == tiny_base.config.dim);
  CHECK(plan_training(tiny, ClusterSpec{}).params == count_parameters(m).total);
  // A model section that disagrees with the base at hand: llm-finetune's error (Amber's 7B shape).
  CHECK_THROWS_WITH(planned_model(recipe("amber-7b-lora", {"finetune.base=" + base, fits})),
                    Catch::Matchers::Contains("model.vocab_size: is 32000, but the base"));
  // Not downloaded yet: the model section; none to plan: an error naming finetune.base.
  CHECK(planned_model(recipe("amber-7b-lora", {}), &from_base).dim == 4096);
  CHECK_FALSE(from_base);
  CHECK_THROWS_WITH(planned_model(recipe("tiny-jargon", {"finetune.base=/nonexistent/base"})),
                    Catch::Matchers::Contains("finetune.base: /nonexistent/base is not here, and the recipe has no "
                                              "model section"));
  // A sequence longer than the model's context: llm-pretrain's error.
  CHECK_THROWS_WITH(plan_training(recipe("llama-7b", {"train.seq_len=8192"}), ClusterSpec{}),
                    Catch::Matchers::Contains("train.seq_len: 8192 exceeds model.max_seq_len 2048"));
}

TEST_CASE(
    "plan: a global batch the GPUs do not divide is flagged with GPU counts that do, and hybrid needs whole nodes",
    "[plan]") {
  ClusterSpec c;
  c.gpus = 480;  // K2's 2040 sequences of 2048 tokens, 1 per micro batch
  const TrainingPlan k2 = plan_training(recipe("k2-65b", {}), c);
  CHECK_FALSE(k2.batch_divides);
  CHECK(k2.dividing_gpus == std::vector<int64_t>{408, 510});
  c.gpus = 510;
  CHECK(plan_training(recipe("k2-65b", {}), c).batch_divides);
  c.gpus = 2048;  // llama-7b: 2 x 2048 tokens a GPU is already twice its 4M-token batch
  const TrainingPlan big = plan_training(recipe("llama-7b", {}), c);
  CHECK_FALSE(big.batch_divides);
  CHECK(big.dividing_gpus == std::vector<int64_t>{1024});
  const auto has_hybrid = [](const TrainingPlan& p) {
    return std::any_of(p.rows.begin(), p.rows.end(), [](const MemoryRow& r) { return r.sharding == "hybrid"; });
  };
  c.gpus = 16;
  CHECK(has_hybrid(plan_training(recipe("llama-7b", {}), c)));
  c.gpus = 12;  // 8 a node: no whole groups
  CHECK_FALSE(has_hybrid(plan_training(recipe("llama-7b", {}), c)));
}
