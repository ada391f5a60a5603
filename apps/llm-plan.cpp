// llm-plan RECIPE: the model a recipe describes: exact parameter counts and layer shapes.
#include <fmt/core.h>

#include <libllm/cli.h>
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
    cli::Args args(argc, argv, "llm-plan RECIPE [--set section.key=value]...", {}, 1);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    const Recipe recipe = Recipe::load(args.positional()[0], args.overrides());
    const ModelConfig& m = recipe.model;
    const ParamCount c = count_parameters(m);

    fmt::print("recipe: {}\n", args.positional()[0]);
    fmt::print("model: {} | vocab {} | dim {} | layers {} | heads {} (kv {}, head_dim {}) | ffn {}", m.hf_architecture(),
               m.vocab_size, m.dim, m.n_layers, m.n_heads, m.kv_heads(), m.hdim(), m.ffn_dim);
    if (m.n_experts > 0) fmt::print(" | experts {} (top {})", m.n_experts, m.n_experts_per_token);
    if (m.sliding_window > 0) fmt::print(" | sliding window {}", m.sliding_window);
    fmt::print(" | context {} | {} embeddings\n\n", m.max_seq_len, m.tie_embeddings ? "tied" : "untied");

    fmt::print("parameters\n");
    fmt::print("  {:<12} {:>18}  ({:.2f} B)\n", "total", commas(c.total), c.total / 1e9);
    if (c.active != c.total) fmt::print("  {:<12} {:>18}  ({:.2f} B per token)\n", "active", commas(c.active), c.active / 1e9);
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
    return 0;
  });
}
