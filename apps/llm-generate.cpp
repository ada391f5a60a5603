// llm-generate --checkpoint DIR (--prompt TEXT | --chat): streams a continuation of a prompt,
// or answers in a chat (one turn with --prompt, else one user message per stdin line), with a KV
// cache, greedy or temperature / top-k / top-p sampling, stopping at EOS.
#include <fmt/core.h>

#include <algorithm>
#include <filesystem>
#include <iostream>

#include <libllm/chat.h>
#include <libllm/cli.h>
#include <libllm/error.h>
#include <libllm/generate.h>
#include <libllm/hf.h>
#include <libllm/recipe.h>
#include <libllm/tokenizer.h>

using namespace libllm;

namespace {

// Streams an answer, holding back text that may be the start of the end-of-turn marker.
struct Printer {
  std::string eot;  // "" = none
  size_t printed = 0;
  bool done = false;
  // Prints what is safe of `text` (the answer so far; `final`: all of it, up to the marker);
  // returns false once the marker appeared.
  bool show(const std::string& text, bool final = false) {
    size_t upto = text.size();
    if (!eot.empty()) {
      const size_t at = text.find(eot);
      if (at != std::string::npos) {
        upto = at;
        done = true;
      } else if (!final) {
        for (size_t k = std::min(eot.size() - 1, text.size()); k > 0; --k)
          if (text.compare(text.size() - k, k, eot, 0, k) == 0) {
            upto = text.size() - k;
            break;
          }
      }
    }
    if (upto > printed) {
      fmt::print("{}", text.substr(printed, upto - printed));
      std::fflush(stdout);
      printed = upto;
    }
    return !done;
  }
};

}  // namespace

int main(int argc, char** argv) {
  return cli::run("llm-generate", [&] {
    cli::Args args(argc, argv, "llm-generate --checkpoint DIR (--prompt TEXT | --chat) [options]",
                   {{"--checkpoint", "model folder: libllm checkpoint (recipe.yaml) or Hugging Face (config.json)"},
                    {"--prompt", "text to continue (or, with --chat, the one user message)"},
                    {"--chat", "chat: apply the chat template; without --prompt, read user messages from stdin", false},
                    {"--template",
                     "chat template: llama2 or chatml (default: the checkpoint recipe's, an HF folder's own "
                     "(chat_template.jinja or tokenizer_config.json), else chatml)"},
                    {"--system", "system message for --chat (default: the checkpoint recipe's chat.system_prompt)"},
                    {"--max-new-tokens", "tokens to generate at most", true, "128"},
                    {"--temperature", "sampling temperature; 0 = greedy", true, "0.7"},
                    {"--top-k", "sample among the k most likely tokens; 0 = all", true, "40"},
                    {"--top-p", "nucleus sampling mass; 1 = off", true, "0.95"},
                    {"--seed", "sampling seed", true, "0"},
                    {"--dtype", "compute dtype: fp32 or bf16 (or fp16 on CUDA)", true, "fp32"},
                    {"--device", "cpu, cuda or auto (cuda when usable)", true, "auto"},
                    {"--no-cache", "recompute the whole context for every token (slow; for comparison)", false},
                    {"--tokenizer", "tokenizer.model (default: the one in the checkpoint folder)"}},
                   0);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    if (!args.has("--checkpoint")) throw Error("--checkpoint", "is required", "see llm-generate --help");
    const bool chat = args.has("--chat");
    if (!chat && !args.has("--prompt"))
      throw Error("--prompt", "is required without --chat", "see llm-generate --help");
    for (const char* only_chat : {"--system", "--template"})
      if (!chat && args.has(only_chat))
        throw Error(only_chat, "applies to --chat only", "add --chat to prompt the model with its chat template");
    const std::string dir = args.get("--checkpoint");

    Pretrained pre = inspect_pretrained(dir);
    const std::string tok_path = tokenizer_for(pre, args.get("--tokenizer"));
    if (tok_path.empty()) throw Error(dir, "no tokenizer.model in the checkpoint folder", "pass --tokenizer PATH");
    const Tokenizer tok = Tokenizer::load(tok_path);
    tok.check_fits(pre.config, dir);
    std::string tmpl = "chatml", system, source = "the default";
    if (pre.format == "libllm") {
      const Recipe r = Recipe::load((std::filesystem::path(dir) / "recipe.yaml").string());
      tmpl = r.chat.chat_template;
      system = r.chat.system_prompt;
      source = "the checkpoint's recipe";
    } else if (chat && !args.has("--template")) {
      // An HF folder: its chat template, when it is one libllm renders.
      const std::string jinja = read_chat_template(dir);
      const bool own_file = std::filesystem::is_regular_file(std::filesystem::path(dir) / "chat_template.jinja") &&
                            std::filesystem::file_size(std::filesystem::path(dir) / "chat_template.jinja") > 0;
      const std::string from = own_file ? "chat_template.jinja" : "tokenizer_config.json";
      if (!jinja.empty()) {
        if (!recognize_chat_template(jinja, tmpl, system))
          throw Error((std::filesystem::path(dir) / from).string() + (own_file ? "" : ": chat_template"),
                      "is not a template libllm renders (llama2 or chatml, as llm-export writes them)",
                      "pass --template llama2|chatml (and --system) to prompt the model in one of those formats");
        source = from;
      }
    }
    if (args.has("--template")) tmpl = args.get("--template"), source = "--template";
    if (tmpl != "llama2" && tmpl != "chatml") throw Error("--template", "'" + tmpl + "' is not llama2 or chatml");
    if (args.has("--system")) system = args.get("--system");
    if (chat)
      fmt::print(stderr, "chat template {} (from {}){}\n", tmpl, source,
                 system.empty() ? "" : ", system prompt '" + system + "'");

    GenerateOptions g;
    g.max_new_tokens = args.get_int("--max-new-tokens");
    g.temperature = args.get_double("--temperature");
    g.top_k = args.get_int("--top-k");
    g.top_p = args.get_double("--top-p");
    g.seed = static_cast<uint64_t>(args.get_int("--seed"));
    g.eos_id = tok.eos_id();
    // The model's own end-of-sequence ids too (a chat model's end-of-turn token, which
    // tokenizer.model may lack: decoding then shows nothing of it).
    g.stop_ids = stop_token_ids(pre.dir);
    if (pre.format == "hf" && pre.eos_id >= 0 &&
        std::find(g.stop_ids.begin(), g.stop_ids.end(), pre.eos_id) == g.stop_ids.end())
      g.stop_ids.push_back(pre.eos_id);
    g.use_cache = !args.has("--no-cache");
    if (g.max_new_tokens < 1) throw Error("--max-new-tokens", "must be >= 1");
    if (g.temperature < 0) throw Error("--temperature", "must be >= 0");
    if (g.top_p <= 0 || g.top_p > 1) throw Error("--top-p", "must be in (0, 1]");
    if (g.top_k < 0) throw Error("--top-k", "must be >= 0 (0 = all tokens)");
    // (the options are checked before minutes of loading a large model)
    const torch::Device device = device_from_name(args.get("--device"), "--device");
    load_pretrained(pre, compute_dtype(args.get("--dtype"), device, "--dtype"));
    pre.model->to(device);  // (generation follows the model's device)

    // One answer to `prompt_ids`, streamed; returns its text.
    auto answer = [&](const std::vector<int64_t>& prompt_ids, const std::string& eot) {
      // Context for decoding: the prompt's own tokens after BOS (plain), none (chat answers).
      std::vector<int64_t> context;
      if (eot.empty() && !chat) context.assign(prompt_ids.begin() + (tok.bos_id() >= 0 ? 1 : 0), prompt_ids.end());
      TextStream stream(tok, context);
      Printer out{eot};
      GenerateOptions o = g;
      o.on_token = [&](int64_t id) {
        if (id == tok.eos_id() || std::find(g.stop_ids.begin(), g.stop_ids.end(), id) != g.stop_ids.end()) return false;
        stream.push(id);
        return out.show(stream.text());
      };
      const int64_t window = pre.model->config().max_seq_len, n = static_cast<int64_t>(prompt_ids.size());
      if (o.max_new_tokens > window - n)  // (not n + max_new_tokens: that overflows for a huge budget)
        fmt::print(stderr,
                   "{}note: the context ({} tokens) and up to {} new ones exceed the model's window ({}): "
                   "past the window the model reads only the last {} tokens, and again each time that fills\n",
                   chat ? "" : "\n", n, o.max_new_tokens, window, std::max<int64_t>(1, window / 2));
      try {
        generate(pre.model, prompt_ids, o);
      } catch (...) {
        fmt::print("\n");  // (the streamed text's line ends before the error)
        throw;
      }
      stream.finish();  // (a partial character at the end)
      if (!out.done) out.show(stream.text(), /*final=*/true);
      const std::string text = stream.text();
      return eot.empty() || text.find(eot) == std::string::npos ? text : text.substr(0, text.find(eot));
    };

    if (!chat) {
      std::vector<int64_t> ids;
      if (tok.bos_id() >= 0) ids.push_back(tok.bos_id());
      const auto p = tok.encode(args.get("--prompt"));
      ids.insert(ids.end(), p.begin(), p.end());
      fmt::print("{}", args.get("--prompt"));
      const std::string cont = answer(ids, "");
      (void)cont;
      fmt::print("\n");
      return 0;
    }
    std::vector<ChatMessage> history;
    if (!system.empty()) history.push_back({"system", system});
    auto turn = [&](const std::string& user) {
      history.push_back({"user", user});
      const std::string reply = answer(render_prompt(history, tok, tmpl), end_of_turn(tmpl));
      fmt::print("\n");
      std::fflush(stdout);
      history.push_back({"assistant", reply});
    };
    if (args.has("--prompt")) {
      turn(args.get("--prompt"));
      return 0;
    }
    std::string line;
    while (true) {
      fmt::print(stderr, "> ");
      if (!std::getline(std::cin, line)) break;
      if (line.empty()) continue;
      turn(line);
    }
    return 0;
  });
}
