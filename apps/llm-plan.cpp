// llm-plan RECIPE [--gpus N --gpu-memory 80GiB --mfu 0.4 --peak-tflops 312]: the model a recipe
// trains (exact parameter counts and layer shapes; a fine-tune's base when it is at hand) and,
// with --gpus, per-GPU memory under each sharding choice, what fits, and tokens/s and days for
// the recipe's token budget.
#include <fmt/core.h>
#include <fmt/ranges.h>

#include <cmath>

#include <libllm/cli.h>
#include <libllm/config.h>
#include <libllm/error.h>
#include <libllm/plan.h>
#include <libllm/recipe.h>

using namespace libllm;

static std::string commas(int64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > (v < 0 ? 1 : 0); i -= 3) s.insert(i, ",");
  return s;
}

static std::string shape(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

int main(int argc, char** argv) {
  return cli::run("llm-plan", [&] {
    cli::Args args(argc, argv,
                   "llm-plan RECIPE [--gpus N] [--gpu-memory 80GiB] [--mfu 0.4] [--peak-tflops T] "
                   "[--gpus-per-node 8] [--set section.key=value]...",
                   {{"--gpus", "plan training on this many GPUs (data parallel)", true, "0"},
                    {"--gpu-memory", "memory of one GPU, e.g. 80GiB or 40", true, "80GiB"},
                    {"--mfu", "model FLOPs utilisation assumed for tokens/s", true, "0.4"},
                    {"--peak-tflops",
                     "the GPU's dense bf16 peak (A100 312, H100 989; default: the recipe's "
                     "train.peak_tflops, else 312)",
                     true, "0"},
                    {"--gpus-per-node", "GPUs per node (hybrid sharding)", true, "8"}},
                   1, /*recipe_overrides=*/true);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    const Recipe recipe = Recipe::load(args.positional()[0], args.overrides());
    fmt::print("recipe: {}\n", args.positional()[0]);
    bool from_base = false;
    const ModelConfig m = planned_model(recipe, &from_base);
    if (!recipe.finetune.base.empty())
      fmt::print(from_base ? "model: from finetune.base {}\n"
                           : "model: the recipe's model section (finetune.base {} is not here)\n",
                 recipe.finetune.base);
    const ParamCount c = count_parameters(m);

    fmt::print("model: {} | vocab {} | dim {} | layers {} | heads {} (kv {}, head_dim {}) | ffn {}", m.hf_architecture(),
               m.vocab_size, m.dim, m.n_layers, m.n_heads, m.kv_heads(), m.hdim(), m.ffn_dim);
    if (m.n_experts > 0) fmt::print(" | experts {} (top {})", m.n_experts, m.n_experts_per_token);
    if (m.sliding_window > 0) fmt::print(" | sliding window {}", m.sliding_window);
    fmt::print(" | context {} | {} embeddings\n\n", m.max_seq_len, m.tie_embeddings ? "tied" : "untied");

    fmt::print("parameters\n");
    fmt::print("  {:<12} {:>18}  ({:.2f} B)\n", "total", commas(c.total), c.total / 1e9);
    if (c.active != c.total)
      fmt::print("  {:<12} {:>18}  ({:.2f} B per token)\n", "active", commas(c.active), c.active / 1e9);
    fmt::print("  {:<12} {:>18}\n", "embedding", commas(c.embedding));
    fmt::print("  {:<12} {:>18}  x {} blocks = {}\n", "per block", commas(c.per_block), m.n_layers,
               commas(c.per_block * m.n_layers));
    fmt::print("  {:<12} {:>18}\n", "  attention", commas(c.attention));
    fmt::print("  {:<12} {:>18}\n", m.n_experts > 0 ? "  moe" : "  mlp", commas(c.mlp));
    fmt::print("  {:<12} {:>18}\n", "  norms", commas(c.norms));
    fmt::print("  {:<12} {:>18}\n", "final norm", commas(c.final_norm));
    fmt::print("  {:<12} {:>18}\n\n", "lm head", c.lm_head ? commas(c.lm_head) : "tied");

    fmt::print("layer shapes (block 0; every block is the same)\n");
    for (const auto& w : weight_shapes(m)) {
      const bool later_block = w.name.rfind("model.layers.", 0) == 0 && w.name.rfind("model.layers.0.", 0) != 0;
      const bool later_expert = w.name.find(".experts.") != std::string::npos && w.name.find(".experts.0.") == std::string::npos;
      if (later_block || later_expert) continue;
      fmt::print("  {:<52} {}\n", w.name, shape(w.shape));
    }
    fmt::print("{{\"total\": {}, \"embedding\": {}, \"per_block\": {}, \"lm_head\": {}, \"active\": {}}}\n", c.total,
               c.embedding, c.per_block, c.lm_head, c.active);
    const int64_t gpus = args.get_int("--gpus");
    if (gpus < 0 || gpus > 10000000) throw Error("--gpus", "must be in [0, 10000000], got " + std::to_string(gpus));
    if (gpus == 0) return 0;

    ClusterSpec cs;
    cs.gpus = args.get_int("--gpus");
    cs.gpus_per_node = args.get_int("--gpus-per-node");
    cs.mfu = args.get_double("--mfu");
    cs.peak_tflops = args.get_double("--peak-tflops");
    // 80GiB (or a bare 80) is GiB; 80GB is 80e9 bytes (74.5 GiB).
    std::string mem = args.get("--gpu-memory");
    double scale = 1.0;
    for (const auto& [unit, factor] : {std::pair<std::string, double>{"GiB", 1.0}, {"GB", 1e9 / (1 << 30)}})
      if (mem.size() > unit.size() && mem.compare(mem.size() - unit.size(), std::string::npos, unit) == 0) {
        mem.resize(mem.size() - unit.size());
        scale = factor;
        break;
      }
    const std::optional<double> size = parse_number(mem);
    if (!size)
      throw Error("--gpu-memory", "expected a size like 80GiB or 80GB, got '" + args.get("--gpu-memory") + "'");
    cs.gpu_memory_gib = *size * scale;
    const TrainingPlan p = plan_training(recipe, cs);
    cs = p.cluster;  // (the peak it assumed)
    const double gib = 1024.0 * 1024 * 1024;
    fmt::print("\ntraining on {} GPUs ({} per node, {:.0f} GiB, peak {:.0f} TFLOP/s, MFU {:.0f}%), {}\n", cs.gpus,
               cs.gpus_per_node, cs.gpu_memory_gib, cs.peak_tflops, 100 * cs.mfu, recipe.train.dtype);
    if (p.batch_divides) {
      fmt::print("  batch: {} tokens/step = {} seq x {} tokens x {} GPUs x {} accumulation\n", p.global_batch_tokens,
                 p.micro_batch, p.seq_len, cs.gpus, p.accumulation);
    } else {
      const int64_t pass = p.micro_batch * p.seq_len * cs.gpus;
      fmt::print(
          "  batch: {} tokens/step is not a multiple of {} seq x {} tokens x {} GPUs = {}: llm-pretrain "
          "refuses this train.global_batch_tokens\n         ({})\n",
          p.global_batch_tokens, p.micro_batch, p.seq_len, cs.gpus, pass,
          p.dividing_gpus.empty()
              ? "set it to a multiple of micro_batch * seq_len * GPUs"
              : fmt::format("GPU counts it divides among: {}; or change train.global_batch_tokens or "
                            "train.micro_batch",
                            fmt::join(p.dividing_gpus, " or ")));
    }
    if (p.lora)
      fmt::print("  LoRA (rank {}, targets {}): {} adapter parameters train ({:.3f}% of the base's {}), the base is frozen in {}\n",
                 recipe.lora.rank, fmt::join(recipe.lora.targets, ","), commas(p.trainable),
                 100.0 * static_cast<double>(p.trainable) / static_cast<double>(p.params), commas(p.params),
                 recipe.train.dtype);
    fmt::print("  per-GPU memory, GiB (activations for one micro batch of {} x {}):\n", p.micro_batch, p.seq_len);
    fmt::print("  {:<8} {:>8} {:>9} {:>9} {:>10} {:>12} {:>9} {:>10} {:>9} {:>11}\n", "sharding", "weights", "grads",
               "optimizer", "activation", "act (ckpt)", "buffers", "grad stage", "total", "total ckpt");
    for (const MemoryRow& x : p.rows)
      fmt::print("  {:<8} {:>8.1f} {:>9.1f} {:>9.1f} {:>10.1f} {:>12.1f} {:>9.1f} {:>10.1f} {:>9.1f}{} {:>10.1f}{}\n",
                 x.sharding, x.weights / gib, x.grads / gib, x.optimizer / gib, x.activations / gib,
                 x.activations_ckpt / gib, x.buffers / gib, x.grad_staging / gib, x.total(false) / gib,
                 x.total(false) <= p.usable_bytes ? " " : "!", x.total(true) / gib,
                 x.total(true) <= p.usable_bytes ? " " : "!");
    fmt::print("  (! = over 90% of the GPU's memory: does not fit)  fits: {}\n", p.recommendation);
    fmt::print(
        "  grad stage: ZeRO-2/3 gradients beside the shards in a recomputing backward; zero2 without it\n"
        "  holds every gradient whole at the end of backward (total: the larger of that and the activations)\n");
    fmt::print("  each row is a train.sharding value; {}\n",
               p.lora ? "zero3 and hybrid need train.activation_checkpointing: true, and shard the frozen base too"
                      : "zero3 and hybrid need train.activation_checkpointing: true");
    fmt::print("  compute: {:.1f} GFLOP/token -> {} tokens/s ({} per GPU); {} steps x {} tokens = {:.3g} tokens "
               "-> {:.1f} days\n",
               p.flops_per_token / 1e9, commas(std::llround(p.tokens_per_s)), commas(std::llround(p.tokens_per_s / cs.gpus)),
               recipe.train.steps,
               p.global_batch_tokens, static_cast<double>(p.total_tokens), p.days);
    fmt::print(
        "{{\"gpus\": {}, \"flops_per_token\": {:.6e}, \"tokens_per_s\": {:.1f}, \"days\": {:.3f}, \"fits\": \"{}\", "
        "\"batch_divides\": {}}}\n",
        cs.gpus, p.flops_per_token, p.tokens_per_s, p.days, p.recommendation, p.batch_divides);
    return 0;
  });
}
