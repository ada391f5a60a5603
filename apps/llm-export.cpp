// llm-export --checkpoint DIR --out DIR [--adapter DIR]: writes a model folder (libllm checkpoint
// or HF folder) as a Hugging Face folder (sharded safetensors, config.json, tokenizer) with any
// LoRA adapters merged; --adapter also writes the adapters alone in PEFT's layout. A model
// fine-tuned on chat data gets its chat template in tokenizer_config.json.
#include <fmt/core.h>

#include <algorithm>
#include <filesystem>

#include <libllm/chat.h>
#include <libllm/cli.h>
#include <libllm/error.h>
#include <libllm/finetune.h>
#include <libllm/hf.h>
#include <libllm/recipe.h>
#include <libllm/tokenizer.h>

using namespace libllm;
namespace fs = std::filesystem;

namespace {

// The folder `p` names, absolute, through symlinks where it exists, without trailing separators.
fs::path folder_of(const std::string& p) {
  fs::path a = fs::weakly_canonical(fs::absolute(p)).lexically_normal();
  while (!a.has_filename() && a.has_relative_path()) a = a.parent_path();
  return a;
}

// Whether folder `a` is folder `b` or inside it.
bool within(const fs::path& a, const fs::path& b) {
  auto ai = a.begin();
  for (auto bi = b.begin(); bi != b.end(); ++bi, ++ai)
    if (ai == a.end() || *ai != *bi) return false;
  return true;
}

// An output folder must be apart from the checkpoint and from the other output: writing one
// replaces the whole folder.
void check_apart(const std::string& flag, const std::string& out, const std::string& other_flag,
                 const std::string& other) {
  if (out.empty()) throw Error(flag, "is empty", "give a folder name");
  if (other.empty()) return;  // (an empty --checkpoint is inspect_pretrained's error)
  const fs::path a = folder_of(out), b = folder_of(other);
  const char* hint = "write the export to a folder of its own";
  if (a == b) throw Error(flag, out + " is also the " + other_flag + " folder", hint);
  if (within(a, b)) throw Error(flag, out + " is inside the " + other_flag + " folder " + other, hint);
  if (within(b, a)) throw Error(flag, out + " contains the " + other_flag + " folder " + other, hint);
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run("llm-export", [&] {
    cli::Args args(argc, argv, "llm-export --checkpoint DIR --out DIR [options]",
                   {{"--checkpoint", "model folder: libllm checkpoint (recipe.yaml) or Hugging Face (config.json)"},
                    {"--out", "the Hugging Face folder to write (LoRA adapters merged)"},
                    {"--adapter", "also write the LoRA adapters alone here, in PEFT's layout"},
                    {"--dtype", "weights dtype: float32, bfloat16 or float16", true, "bfloat16"},
                    {"--max-shard-mb", "start a new safetensors shard past this size (MB)", true, "5000"},
                    {"--tokenizer", "tokenizer.model to include (default: the one in the checkpoint folder)"},
                    {"--chat-template", "chat template for tokenizer_config.json: llama2, chatml or none (default: the "
                                        "checkpoint's chat.chat_template if it was fine-tuned on chat data, else the "
                                        "base's own)"},
                    {"--system", "default system text of --chat-template (default: the recipe's chat.system_prompt)"}},
                   0);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    for (const char* required : {"--checkpoint", "--out"})
      if (!args.has(required)) throw Error(required, "is required", "see llm-export --help");
    const std::string dir = args.get("--checkpoint");
    // Before anything is read or written: an output folder is replaced as a whole.
    check_apart("--out", args.get("--out"), "--checkpoint", dir);
    if (args.has("--adapter")) {
      check_apart("--adapter", args.get("--adapter"), "--checkpoint", dir);
      check_apart("--adapter", args.get("--adapter"), "--out", args.get("--out"));
      check_replaceable(args.get("--adapter"), FolderKind::peft_adapter);
    }
    check_replaceable(args.get("--out"), FolderKind::hf_model);
    Pretrained pre = inspect_pretrained(dir);
    // A fine-tune's base: where an adapters-only checkpoint's loader finds it, else as its recipe
    // names it.
    std::string base;
    if (pre.format == "libllm")
      base = !pre.base.empty() ? pre.base : Recipe::load((fs::path(dir) / "recipe.yaml").string()).finetune.base;
    // Nor any base the export reads (an adapters-only checkpoint's chain of bases).
    int level = 0;
    for (std::string b = base; !b.empty() && fs::is_directory(b) && ++level <= 64;) {
      check_apart("--out", args.get("--out"), "finetune.base", b);
      if (args.has("--adapter")) check_apart("--adapter", args.get("--adapter"), "finetune.base", b);
      const Pretrained next = inspect_pretrained(b);
      b = next.base;  // (a cycle ends at 64 levels; load_pretrained reports it)
    }
    if (args.has("--adapter") && !pre.has_lora)
      throw Error("--adapter", dir + " is not a LoRA fine-tuning checkpoint", "export the merged model with --out only");
    const std::string tok_path = tokenizer_for(pre, args.get("--tokenizer"));
    // bos/eos: an HF source's own (a chat model may end turns with an added token); a libllm
    // checkpoint's tokenizer's, the ids it was trained with.
    int64_t bos = pre.bos_id, eos = pre.eos_id;
    if (!tok_path.empty()) {
      const Tokenizer tok = Tokenizer::load(tok_path);
      tok.check_fits(pre.config, dir);
      if (tok.bos_id() >= 0 && pre.format == "libllm") bos = tok.bos_id();
      if (tok.eos_id() >= 0 && pre.format == "libllm") eos = tok.eos_id();
    } else {
      fmt::print(stderr, "note: {} holds no tokenizer.model: the export has no tokenizer (--tokenizer PATH adds one)\n",
                 dir);
    }
    const int64_t shard_mb = args.get_int("--max-shard-mb");
    if (shard_mb < 1) throw Error("--max-shard-mb", "must be >= 1");
    dtype_from_name(args.get("--dtype"), "--dtype");  // (before any folder is written)
    std::string adapter_base;  // the adapter's base_model_name_or_path, checked before anything is written
    if (args.has("--adapter")) {
      adapter_base = pre.format != "libllm" ? dir : base;
      if (std::filesystem::is_directory(adapter_base)) {
        const Pretrained b = inspect_pretrained(adapter_base);
        if (b.has_lora)
          throw Error(
              "--adapter",
              "the base " + adapter_base + " is itself a LoRA fine-tune, merged before this adapter was trained",
              "export the merged model (--out) and use that");
        if (b.format != "hf")
          fmt::print(
              "note: the adapter's base_model_name_or_path {} is a libllm folder; peft needs it in Hugging Face "
              "form: llm-export --checkpoint {} --out DIR\n",
              adapter_base, adapter_base);
      }
    }
    // The chat template that serving tools (transformers' apply_chat_template) should use: the one
    // the checkpoint was fine-tuned with, else the one its base or source folder came with.
    std::string ours, system, chat_template, template_from;  // ours: a libllm template name
    std::string tuned;  // the template the checkpoint was fine-tuned on chat data with
    if (pre.format == "libllm") {
      const Recipe r = Recipe::load((std::filesystem::path(dir) / "recipe.yaml").string());
      system = r.chat.system_prompt;
      if (!r.chat.files.empty()) {
        ours = tuned = r.chat.chat_template;
        template_from = "chat template " + ours + " (as fine-tuned)";
      } else if (!args.has("--chat-template") && !base.empty() && std::filesystem::is_directory(base)) {
        chat_template = read_chat_template(base);
        template_from = "the base's chat template";
      }
    } else if (!args.has("--chat-template")) {
      chat_template = read_chat_template(dir);
      template_from = "the source folder's chat template";
    }
    if (args.has("--chat-template")) {
      ours = args.get("--chat-template");
      if (ours != "none" && ours != "llama2" && ours != "chatml")
        throw Error("--chat-template", "'" + ours + "' is not llama2, chatml or none");
      template_from = "chat template " + ours;
      if (!tuned.empty() && ours != tuned)
        fmt::print(
            "note: {} was fine-tuned on chat data in chat template {}; the export's tokenizer_config.json "
            "gets {}, a format the fine-tune never saw\n",
            dir, tuned, ours == "none" ? "none" : ours);
      if (ours == "none") ours.clear(), chat_template.clear();
    }
    if (args.has("--system")) {
      if (ours.empty())
        throw Error("--system", "sets the default system text of a libllm chat template, and none is exported",
                    "add --chat-template llama2|chatml");
      system = args.get("--system");
    }
    if (!ours.empty()) chat_template = chat_template_jinja(ours, system);
    if (!chat_template.empty() && tok_path.empty())
      throw Error(dir, "no tokenizer.model to export with the chat template", "pass --tokenizer PATH or --chat-template none");

    ExportOptions opts;
    opts.dtype = args.get("--dtype");
    opts.max_shard_bytes = shard_mb * 1000 * 1000;
    opts.tokenizer_path = tok_path;
    opts.bos_id = bos;
    opts.eos_id = eos;
    opts.chat_template = chat_template;
    // The source's generation settings: of the first folder in the chain (this one, its base, ...)
    // that has them; its pad token likewise.
    int hops = 0;
    for (std::string b = dir; !b.empty() && std::filesystem::is_directory(b) && ++hops <= 64;) {
      // (and the stop ids of its config.json, a list there being what transformers stops at too)
      for (int64_t id : stop_token_ids(b))
        if (std::find(opts.stop_ids.begin(), opts.stop_ids.end(), id) == opts.stop_ids.end())
          opts.stop_ids.push_back(id);
      if (opts.pad_token.empty()) opts.pad_token = pad_token_of(b);  // (a base's, which fine-tunes keep)
      if (std::filesystem::exists(std::filesystem::path(b) / "generation_config.json")) {
        opts.generation_config = (std::filesystem::path(b) / "generation_config.json").string();
        break;
      }
      // A libllm checkpoint's base: an adapters-only one's, else its recipe's finetune.base.
      const Pretrained p = inspect_pretrained(b);
      if (p.format != "libllm") break;
      const fs::path recipe = fs::path(b) / "recipe.yaml";
      b = !p.base.empty() ? p.base : fs::exists(recipe) ? Recipe::load(recipe.string()).finetune.base : "";
    }
    export_hf(pre, args.get("--out"), opts);  // one weight at a time: the model is never in memory whole
    fmt::print("wrote {} ({}, {}{}{})\n", args.get("--out"), pre.config.hf_architecture(), opts.dtype,
               pre.has_lora ? ", LoRA merged" : "", chat_template.empty() ? "" : ", " + template_from);
    // (after the merged export: a failure there, a non-finite weight say, leaves the adapter folder as it was)
    if (args.has("--adapter")) {
      export_peft_adapter(pre, args.get("--adapter"), adapter_base, &opts);  // (with the tokenizer files, if any)
      std::string targets;
      for (const auto& t : pre.lora.targets) targets += (targets.empty() ? "" : ",") + t;
      fmt::print("wrote PEFT adapter {} (r={}, alpha={}, targets {})\n", args.get("--adapter"), pre.lora.rank,
                 pre.lora.alpha, targets);
      if (opts.tokenizer_path.empty())
        fmt::print("note: the adapter folder holds no tokenizer: serve it with its base's\n");
    }
    return 0;
  });
}
