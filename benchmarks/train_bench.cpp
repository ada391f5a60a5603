// Training-step throughput of libllm: tokens/s, MFU (when --peak-tflops is given) and peak
// memory (resident on CPU; the caching allocator's peak on CUDA), for the tiny, the ~100M or the
// ~1B configuration, on random tokens, in fp32 or bf16 (bf16 weights, fp32 master in AdamW).
// The same model and optimizer in plain PyTorch: train_bench.py (CPU, run.sh) and
// gpu/hf_bench.py (transformers on a GPU, gpu/run.sh).
#include <fmt/core.h>
#include <sys/resource.h>

#include <chrono>

#include <libllm/cli.h>
#include <libllm/compat.h>
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
  if (name == "1b")  // the GPU issue's ~1B LLaMA (1.24 B parameters with the untied head)
    return "model: {vocab_size: 32000, dim: 2048, n_layers: 16, n_heads: 32, n_kv_heads: 8, ffn_dim: 8192, max_seq_len: 2048}\n"
           "train: {seq_len: 2048, micro_batch: 4}\n";
  throw Error("--config", "unknown configuration '" + name + "'", "use tiny, 100m or 1b");
}

int main(int argc, char** argv) {
  return cli::run("train-bench", [&] {
    cli::Args args(
        argc, argv,
        "train-bench [--config tiny|100m|1b] [--device cpu|cuda] [--dtype fp32|bf16] [--micro-batch N] "
        "[--steps N] [--warmup N] [--peak-tflops X] [--checkpointing] [--seq-len N] [--packed L] "
        "[--packed-attention auto|bias|segments] [--plain-loss] [--fp32-head-grad]",
        {{"--config", "model shape", true, "tiny"},
         {"--device", "cpu or cuda", true, "cpu"},
         {"--dtype", "fp32 or bf16", true, "fp32"},
         {"--micro-batch", "sequences per step (0 = the configuration's)", true, "0"},
         {"--steps", "timed optimizer steps", true, "20"},
         {"--warmup", "untimed steps first", true, "3"},
         {"--peak-tflops", "device peak for MFU (0 = skip)", true, "0"},
         {"--checkpointing", "recompute each block in backward", false, ""},
         {"--seq-len", "positions per row (0 = the configuration's)", true, "0"},
         {"--packed", "rows packed with documents of 1..2L-1 tokens (forward_packed; 0 = one sequence a row)", true,
          "0"},
         {"--packed-attention", "auto, bias or segments (Transformer::set_packed_attention)", true, "auto"},
         {"--plain-loss", "project all logits, then the cross-entropy (not train.fused_loss)", false, ""},
         {"--fp32-head-grad", "the fused loss sums a bf16 LM head's gradient in fp32 (train.fp32_grads)", false, ""}},
        0);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    Recipe r = Recipe::parse(config_yaml(args.get("--config")), args.get("--config"));
    if (args.get_int("--seq-len") > 0) r.train.seq_len = args.get_int("--seq-len");
    r.model.max_seq_len = std::max(r.model.max_seq_len, r.train.seq_len);
    const int64_t B = args.get_int("--micro-batch") > 0 ? args.get_int("--micro-batch") : r.train.micro_batch;
    const int64_t T = r.train.seq_len, steps = args.get_int("--steps"), warmup = args.get_int("--warmup");
    const int64_t packed = args.get_int("--packed");
    const std::string how = args.get("--packed-attention");
    if (how != "auto" && how != "bias" && how != "segments")
      throw Error("--packed-attention", "expected auto, bias or segments");
    const bool cuda = args.get("--device") == "cuda";
    if (!cuda && args.get("--device") != "cpu") throw Error("--device", "expected cpu or cuda");
    if (cuda && !compat::cuda_available()) throw Error("--device", "no usable CUDA device in this LibTorch");
    const torch::Device device = cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
    const torch::Dtype dtype = args.get("--dtype") == "bf16" ? torch::kBFloat16 : torch::kFloat32;
    torch::manual_seed(0);
    auto t_init = std::chrono::steady_clock::now();
    Transformer model(r.model);
    const double init_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_init).count();
    {  // the same number of normals from torch's own CPU generator, for scale
      torch::NoGradGuard no_grad;
      t_init = std::chrono::steady_clock::now();
      for (auto& p : model->parameters()) torch::empty_like(p).normal_(0.0, 0.02);
    }
    const double torch_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_init).count();
    int64_t n_params = 0;
    for (const auto& p : model->parameters()) n_params += p.numel();
    fmt::print("init: {:.1f} M parameters in {:.2f} s ({:.0f} M/s; torch's normal_ over the same shapes: {:.0f} M/s), "
               "{} threads\n", n_params / 1e6, init_s, n_params / 1e6 / init_s, n_params / 1e6 / torch_s,
               at::get_num_threads());
    model->to(device, dtype);
    model->set_activation_checkpointing(args.has("--checkpointing"));
    model->set_fused_loss(!args.has("--plain-loss"), 0, args.has("--fp32-head-grad"));
    model->set_packed_attention(how == "bias" ? PackedAttention::kBias
                                : how == "segments" ? PackedAttention::kSegments : PackedAttention::kAuto);
    // Packed rows: documents of 1..2L-1 tokens (uniform, mean L) until the row is full.
    torch::Tensor documents;
    int64_t n_documents = 0;
    double attended = static_cast<double>(T);  // mean positions a token's attention spans, for MFU's 12·L·H·Q·T
    if (packed > 0) {
      documents = torch::empty({B, T}, torch::kInt64);  // (B, T)
      auto lengths = torch::randint(1, 2 * packed, {B * T}, torch::kInt64);
      auto d = documents.accessor<int64_t, 2>();
      auto len = lengths.accessor<int64_t, 1>();
      for (int64_t b = 0, k = 0; b < B; ++b)
        for (int64_t t = 0, doc = 0, left = len[k++]; t < T; ++t, --left) {
          if (left == 0) ++doc, left = len[k++];
          d[b][t] = doc;
        }
      auto segments = document_segments(documents);  // (N, 3): row, start, length
      n_documents = segments.size(0);
      auto lengths_of = segments.select(1, 2).to(torch::kFloat64);
      attended = (lengths_of * lengths_of).sum().item<double>() / static_cast<double>(B * T);  // sum L^2 / tokens
    }
    auto loss_of = [&](const torch::Tensor& tokens) {  // tokens (B, T + 1)
      return model->forward_loss(tokens.slice(1, 0, T), tokens.slice(1, 1), documents).loss;
    };
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (auto& p : model->named_parameters()) named.emplace_back(p.key(), p.value());
    OptimConfig oc;
    AdamW opt(named, oc);
    auto params = model->parameters();
    auto step = [&] {
      auto tokens = torch::randint(0, r.model.vocab_size, {B, T + 1}).to(device);
      loss_of(tokens).backward();
      clip_grad_norm(params, 1.0);
      opt.step(1e-4);
      opt.zero_grad();
    };
    // Where a step's time goes (separate synchronised passes after the timed ones): forward,
    // backward, clipping + AdamW.
    double split_ms[3] = {0, 0, 0};
    auto split = [&](int64_t n) {
      for (int64_t i = 0; i < n; ++i) {
        auto tokens = torch::randint(0, r.model.vocab_size, {B, T + 1}).to(device);
        compat::cuda_synchronize();
        auto t0 = std::chrono::steady_clock::now();
        auto loss = loss_of(tokens);
        compat::cuda_synchronize();
        auto t1 = std::chrono::steady_clock::now();
        loss.backward();
        compat::cuda_synchronize();
        auto t2 = std::chrono::steady_clock::now();
        clip_grad_norm(params, 1.0);
        opt.step(1e-4);
        opt.zero_grad();
        compat::cuda_synchronize();
        auto t3 = std::chrono::steady_clock::now();
        split_ms[0] += std::chrono::duration<double, std::milli>(t1 - t0).count() / n;
        split_ms[1] += std::chrono::duration<double, std::milli>(t2 - t1).count() / n;
        split_ms[2] += std::chrono::duration<double, std::milli>(t3 - t2).count() / n;
      }
    };
    for (int64_t i = 0; i < warmup; ++i) step();
    compat::cuda_synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < steps; ++i) step();
    compat::cuda_synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    split(std::max<int64_t>(1, std::min<int64_t>(steps, 5)));
    const ParamCount pc = count_parameters(r.model);
    const double tok_s = static_cast<double>(steps * B * T) / s;
    const double flops = 6.0 * (pc.total - pc.embedding) + 12.0 * r.model.n_layers * r.model.n_heads * r.model.hdim() * attended;
    const double peak = std::stod(args.get("--peak-tflops"));
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    fmt::print(
        "{{\"impl\": \"{}\", \"config\": \"{}\", \"device\": \"{}\", \"dtype\": \"{}\", \"micro_batch\": {}, "
        "\"params\": {}, \"tokens_per_s\": {:.1f}, \"mfu\": {:.4f}, \"peak_rss_mib\": {:.1f}, "
        "\"gpu_peak_gib\": {:.2f}, \"threads\": {}, \"forward_ms\": {:.1f}, \"backward_ms\": {:.1f}, \"optimizer_ms\": "
        "{:.1f}, "
        "\"seq_len\": {}, \"packed_documents\": {}, \"packed_attention\": \"{}\", \"fused_loss\": {}, "
        "\"fp32_head_grad\": {}}}\n",
        args.has("--plain-loss") ? "libllm-plain-loss" : "libllm", args.get("--config"), args.get("--device"),
        args.get("--dtype"), B, pc.total, tok_s, peak > 0 ? tok_s * flops / (peak * 1e12) : 0.0, ru.ru_maxrss / 1024.0,
        cuda ? compat::cuda_peak_allocated_bytes(0) / double(1 << 30) : 0.0, at::get_num_threads(), split_ms[0],
        split_ms[1], split_ms[2], T, n_documents, packed == 0 ? "none" : how,
        args.has("--plain-loss") ? "false" : "true", args.has("--fp32-head-grad") ? "true" : "false");
    return 0;
  });
}
