// Training-step throughput of libllm: tokens/s, MFU (when --peak-tflops is given) and peak
// resident memory, for the tiny or the ~100M-parameter configuration, on random tokens.
// The same model and optimizer in plain PyTorch: train_bench.py. Both: run.sh.
#include <fmt/core.h>
#include <sys/resource.h>

#include <chrono>

#include <libllm/cli.h>
#include <libllm/error.h>
#include <libllm/model.h>
#include <libllm/optim.h>
#include <libllm/recipe.h>

using namespace libllm;

// The two benchmark shapes (train_bench.py has the same table).
static const char* config_yaml(const std::string& name) {
  if (name == "tiny")
    return "model: {vocab_size: 2048, dim: 128, n_layers: 4, n_heads: 4, n_kv_heads: 2, ffn_dim: 384, max_seq_len: 128}\n"
           "train: {seq_len: 128, micro_batch: 16}\n";
  if (name == "100m")
    return "model: {vocab_size: 32000, dim: 768, n_layers: 12, n_heads: 12, n_kv_heads: 4, ffn_dim: 2048, max_seq_len: 256}\n"
           "train: {seq_len: 256, micro_batch: 4}\n";
  throw Error("--config", "unknown configuration '" + name + "'", "use tiny or 100m");
}

int main(int argc, char** argv) {
  return cli::run("train-bench", [&] {
    cli::Args args(argc, argv, "train-bench [--config tiny|100m] [--steps N] [--warmup N] [--peak-tflops X]",
                   {{"--config", "model shape", true, "tiny"},
                    {"--steps", "timed optimizer steps", true, "20"},
                    {"--warmup", "untimed steps first", true, "3"},
                    {"--peak-tflops", "device peak for MFU (0 = skip)", true, "0"}},
                   0);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    const Recipe r = Recipe::parse(config_yaml(args.get("--config")), args.get("--config"));
    const int64_t B = r.train.micro_batch, T = r.train.seq_len, steps = args.get_int("--steps"),
                  warmup = args.get_int("--warmup");
    torch::manual_seed(0);
    Transformer model(r.model);
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (auto& p : model->named_parameters()) named.emplace_back(p.key(), p.value());
    OptimConfig oc;
    AdamW opt(named, oc);
    auto params = model->parameters();
    auto step = [&] {
      auto tokens = torch::randint(0, r.model.vocab_size, {B, T + 1});
      auto out = model->forward(tokens.slice(1, 0, T));
      cross_entropy(out.logits, tokens.slice(1, 1)).backward();
      clip_grad_norm(params, 1.0);
      opt.step(1e-4);
      opt.zero_grad();
    };
    for (int64_t i = 0; i < warmup; ++i) step();
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < steps; ++i) step();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const ParamCount pc = count_parameters(r.model);
    const double tok_s = static_cast<double>(steps * B * T) / s;
    const double flops = 6.0 * (pc.total - pc.embedding) + 12.0 * r.model.n_layers * r.model.n_heads * r.model.hdim() * T;
    const double peak = std::stod(args.get("--peak-tflops"));
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    fmt::print("{{\"impl\": \"libllm\", \"config\": \"{}\", \"params\": {}, \"tokens_per_s\": {:.1f}, \"mfu\": {:.4f}, "
               "\"peak_rss_mib\": {:.1f}, \"threads\": {}}}\n",
               args.get("--config"), pc.total, tok_s, peak > 0 ? tok_s * flops / (peak * 1e12) : 0.0,
               ru.ru_maxrss / 1024.0, at::get_num_threads());
    return 0;
  });
}
