// llm-eval --checkpoint DIR --data FILE: perplexity of a checkpoint (HF or libllm folder) on a
// text file. The last line of stdout is one JSON object: documents, tokens, loss, ppl.
#include <fmt/core.h>

#include <chrono>
#include <cmath>

#include <libllm/cli.h>
#include <libllm/error.h>
#include <libllm/eval.h>
#include <libllm/hf.h>

using namespace libllm;

int main(int argc, char** argv) {
  return cli::run("llm-eval", [&] {
    cli::Args args(argc, argv, "llm-eval --checkpoint DIR --data FILE [options]",
                   {{"--checkpoint", "model folder: Hugging Face (config.json) or libllm (recipe.yaml)"},
                    {"--data", ".txt (one document per non-empty line) or .jsonl (field \"text\")"},
                    {"--dtype", "compute dtype: fp32 or bf16 (or fp16 on CUDA)", true, "fp32"},
                    {"--device", "cpu, cuda or auto (cuda when usable)", true, "auto"},
                    {"--batch-size", "windows per forward pass", true, "8"},
                    {"--window", "tokens of context per forward; 0 = the model's max_position_embeddings", true, "0"},
                    {"--stride", "targets per window after the first; 1 = full context for every token", true, "1"},
                    {"--tokenizer", "tokenizer.model (default: the one in the checkpoint folder)"}},
                   0);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    for (const char* required : {"--checkpoint", "--data"})
      if (!args.has(required)) throw Error(required, "is required", "see llm-eval --help");

    const torch::Device device = device_from_name(args.get("--device"), "--device");
    const torch::Dtype dtype = compute_dtype(args.get("--dtype"), device, "--dtype");
    const auto docs = read_documents(args.get("--data"));
    if (docs.empty())
      throw Error(args.get("--data"), "no documents (every line is empty)",
                  "give a file with text: one document a line");
    Pretrained pre = inspect_pretrained(args.get("--checkpoint"));
    const std::string tok_path = tokenizer_for(pre, args.get("--tokenizer"));
    if (tok_path.empty())
      throw Error(args.get("--checkpoint"), "no tokenizer.model in the checkpoint folder", "pass --tokenizer PATH");
    const Tokenizer tokenizer = Tokenizer::load(tok_path);
    tokenizer.check_fits(pre.config, args.get("--checkpoint"));
    EvalOptions opts;
    opts.batch_size = args.get_int("--batch-size");
    opts.window = args.get_int("--window");
    opts.stride = args.get_int("--stride");
    opts.bos_id = tokenizer.bos_id() >= 0 ? tokenizer.bos_id() : pre.bos_id;
    check_eval_options(opts, pre.config.max_seq_len);  // (before minutes of loading a large model)
    load_pretrained(pre, dtype);
    pre.model->to(device);  // (the evaluation follows the model's device)
    const ModelConfig& m = pre.model->config();
    fmt::print("checkpoint: {} ({}, {}, {:.1f} M parameters, {}, {})\n", args.get("--checkpoint"), pre.format,
               m.hf_architecture(), count_parameters(m).total / 1e6, dtype_name(dtype), device.str());
    fmt::print("data: {} ({} documents), tokenizer: {} ({} tokens)\n", args.get("--data"), docs.size(), tok_path,
               tokenizer.vocab_size());
    std::vector<std::vector<int64_t>> tokens;
    tokens.reserve(docs.size());
    for (const auto& d : docs) tokens.push_back(tokenizer.encode(d));
    // Progress on stderr every 10 s: a small stride over long documents is many windows. Where a
    // stride of half the window would need at most half as many, the first line says so.
    const int64_t window = opts.window > 0 ? opts.window : m.max_seq_len, wider = window / 2;
    int64_t now_windows = 0, wider_windows = 0;
    if (wider > opts.stride)
      for (const auto& t : tokens) {
        now_windows += eval_windows(static_cast<int64_t>(t.size()), window, opts.stride);
        wider_windows += eval_windows(static_cast<int64_t>(t.size()), window, wider);
      }
    const auto started = std::chrono::steady_clock::now();
    auto last = started;
    bool hinted = false;
    const auto progress = [&](int64_t done, int64_t total) {
      const auto now = std::chrono::steady_clock::now();
      if (done == total || now - last < std::chrono::seconds(10)) return;
      last = now;
      const double s = std::chrono::duration<double>(now - started).count();
      fmt::print(stderr, "evaluating: {} of {} windows ({:.1f}%), {:.0f} s to go\n", done, total, 100.0 * done / total,
                 s / done * (total - done));
      if (!hinted && wider_windows > 0 && now_windows >= 2 * wider_windows)
        fmt::print(stderr,
                   "hint: --stride {} scores {} tokens a window after the first: {} windows instead of {} ({:.1f}x "
                   "fewer), each token still seeing at least {} tokens of context\n",
                   wider, wider, wider_windows, now_windows, static_cast<double>(now_windows) / wider_windows,
                   window - wider + 1);
      hinted = true;
    };
    const EvalResult r = evaluate_tokens(pre.model, tokens, opts, progress);
    if (!std::isfinite(r.loss))
      throw Error(args.get("--checkpoint"), fmt::format("the loss over {} tokens is {}", r.tokens, r.loss),
                  "the model's outputs are not finite: its weights hold NaN or infinite values, or overflow in " +
                      dtype_name(dtype) + (dtype == torch::kFloat32 ? "" : " (try --dtype fp32)"));
    fmt::print("scored {} tokens of {} documents in {:.2f} s ({:.1f} ms per 1k tokens)\n", r.tokens, r.documents,
               r.seconds, r.tokens ? 1e6 * r.seconds / r.tokens : 0.0);
    fmt::print("mean NLL {:.6f} nats, perplexity {:.4f}\n", r.loss, r.ppl);
    fmt::print("{{\"documents\": {}, \"tokens\": {}, \"loss\": {:.10g}, \"ppl\": {:.10g}}}\n", r.documents, r.tokens,
               r.loss, r.ppl);
    return 0;
  });
}
