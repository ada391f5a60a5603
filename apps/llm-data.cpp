// llm-data RECIPE [--set section.key=value]...: trains the recipe's tokenizer (when
// tokenizer.path does not exist yet and tokenizer.vocab_size > 0), then tokenizes
// data_prep.inputs into memory-mappable token shards (and a held-out set when asked).
// llm-data verify SHARD_SET...: checks every file of the shard sets against the checksums
// recorded when they were written (after copying them to another machine, say).
#include <fmt/core.h>

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <libllm/cli.h>
#include <libllm/data.h>
#include <libllm/error.h>
#include <libllm/hf.h>
#include <libllm/recipe.h>
#include <libllm/tokenizer.h>

using namespace libllm;
namespace fs = std::filesystem;

// Trains a sentencepiece model with LLaMA's conventions (unk 0, BOS 1, EOS 2, byte fallback,
// whitespace kept, digits split) into cfg.path (written whole or not at all). The same corpus and
// settings give the same file on any machine: the sample is seeded and the trainer's thread
// count fixed (its unigram sums depend on it).
static void train_tokenizer(const Recipe& r) {
  const TokenizerConfig& t = r.tokenizer;
  const fs::path out = t.path;
  if (out.extension() != ".model") throw Error("tokenizer.path", "must end in .model, got '" + t.path + "'");
  // (its folder is made once the tokenizer is trained: here, that it can be)
  fs::path existing = fs::absolute(out).parent_path();
  while (!fs::exists(existing) && existing.has_relative_path()) existing = existing.parent_path();
  if (!fs::is_directory(existing) || ::access(existing.c_str(), W_OK) != 0)
    throw Error("tokenizer.path", t.path + ": " + existing.string() + " is not a folder this user can write",
                "name a tokenizer.path under a writable folder");
  // A sample of the lines (sentencepiece's sentences) of the whole corpus, not its first ones
  // (one source's, when the inputs are folders of sources); sentencepiece then takes them all.
  constexpr int64_t kMaxLineBytes = 4192;  // sentencepiece's max_sentence_length
  int64_t seen = 0;
  std::vector<std::string> lines = sample_lines(r.data_prep, t.input_sentence_size, kMaxLineBytes, &seen);
  if (lines.empty())
    throw Error("data_prep.inputs",
                "hold no text to train a tokenizer on (every line is blank, or longer than " +
                    std::to_string(kMaxLineBytes) + " bytes)",
                "check the input files");
  fmt::print("training a {} tokenizer of {} pieces on {} of the corpus's {} lines\n", t.model_type, t.vocab_size,
             lines.size(), seen);
  std::fflush(stdout);
  const std::string args = fmt::format(
      "--vocab_size={} --model_type={} --character_coverage={} --byte_fallback=true "
      "--unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --normalization_rule_name=identity "
      "--remove_extra_whitespaces=false --split_digits=true --allow_whitespace_only_pieces=true "
      "--input_sentence_size={} --max_sentence_length={} --shuffle_input_sentence=false --num_threads=16 "
      "--minloglevel=2",
      t.vocab_size, t.model_type, t.character_coverage, t.input_sentence_size, kMaxLineBytes);
  try {
    train_sentencepiece(std::move(lines), args, t.path);
  } catch (const Error& e) {
    // (sentencepiece's own words name its flag; the recipe key is what to change)
    const size_t too_high = e.problem().find("Vocabulary size too high");
    if (too_high == std::string::npos) throw;
    throw Error("tokenizer.vocab_size", e.problem().substr(too_high),
                "lower it, or train on more text (data_prep.inputs, tokenizer.input_sentence_size)");
  }
  fmt::print("tokenizer: {}\n", t.path);
}

// Checks each shard set's files against their checksums: a line for each set, the error of a
// damaged one (its first damaged file) on stderr, and exit code 1 if any is.
static int verify(int argc, char** argv) {
  cli::Args args(argc, argv, "llm-data verify SHARD_SET...", {}, -1);
  if (args.help()) return fmt::print("{}", args.usage()), 0;
  int failed = 0;
  for (const std::string& dir : args.positional()) {
    try {
      const auto start = std::chrono::steady_clock::now();
      const ShardSet set = ShardSet::open(dir);
      if (!set.has_checksums())
        throw Error(dir, "records no checksums (made by an older llm-data)",
                    "re-run llm-data into it to record them, or compare it with its source by other means");
      const int64_t bytes = set.verify();
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      fmt::print("{}: {} shard(s), {} tokens, {:.1f} MB: the checksums match ({:.2f} s)\n", dir, set.n_shards(),
                 set.n_tokens(), bytes / 1e6, seconds);
    } catch (const Error& e) {
      if (args.positional().size() == 1) throw;
      fmt::print(stderr, "llm-data: error: {}\n", e.what());
      ++failed;
    }
  }
  if (failed > 0)
    throw Error("", fmt::format("{} of the {} shard sets failed (named above)", failed, args.positional().size()));
  return 0;
}

// Ctrl-C or SIGTERM while tokenizing: the next progress report ends the run with an error (exit
// 128 + the signal), so that what it staged is removed and earlier shard sets stay as they were; a
// second signal ends the process at once. Once tokenizing is done (the sets are being completed
// and moved in, which a kill could leave half done) signals are only noted.
std::atomic<int> g_signal{0};
std::atomic<bool> g_finishing{false};
extern "C" void on_signal(int sig) {
  if (g_signal.exchange(sig) != 0 && !g_finishing.load()) {
    ::signal(sig, SIG_DFL);
    ::raise(sig);
  }
}

int main(int argc, char** argv) {
  return cli::run("llm-data", [&] {
    if (argc > 1 && std::string(argv[1]) == "verify") return verify(argc - 1, argv + 1);
    cli::Args args(argc, argv, "llm-data RECIPE [--set section.key=value]...\n       llm-data verify SHARD_SET...", {},
                   1, /*recipe_overrides=*/true);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    Recipe recipe = Recipe::load(args.positional()[0], args.overrides());
    const bool from_base = recipe.tokenizer.path.empty() && !recipe.finetune.base.empty();
    if (from_base) {
      // A fine-tune's data in its base's ids, as llm-finetune takes that tokenizer.
      const Pretrained base = inspect_pretrained(recipe.finetune.base);
      if (base.tokenizer_path.empty())
        throw Error("tokenizer.path", "is empty and the base folder " + base.dir + " has no tokenizer.model",
                    "set tokenizer.path");
      recipe.tokenizer.path = base.tokenizer_path;
      recipe.model = base.config;
      fmt::print("tokenizer: finetune.base's {}\n", base.tokenizer_path);
    }
    if (recipe.tokenizer.path.empty())
      throw Error("tokenizer.path", "is empty", "name the tokenizer.model to use or train");
    if (!fs::exists(recipe.tokenizer.path)) {
      if (recipe.tokenizer.vocab_size <= 0)
        throw Error(recipe.tokenizer.path, "tokenizer not found",
                    "give an existing tokenizer.model, or set tokenizer.vocab_size to train one");
      train_tokenizer(recipe);
    } else if (!from_base) {
      fmt::print("tokenizer: {} (exists; not retrained)\n", recipe.tokenizer.path);
    }
    const Tokenizer tok = Tokenizer::load(recipe.tokenizer.path);
    if (recipe.tokenizer.vocab_size > 0 && tok.vocab_size() != recipe.tokenizer.vocab_size)
      fmt::print(
          "note: {} has {} pieces, not tokenizer.vocab_size {}: the existing file is used "
          "(remove it to train a new one)\n",
          recipe.tokenizer.path, tok.vocab_size(), recipe.tokenizer.vocab_size);
    tok.check_fits(recipe.model, "model.vocab_size");
    int last = -1;
    std::fflush(stdout);  // (the lines above before the progress on stderr)
    for (int sig : {SIGINT, SIGTERM}) {  // (not where the signal is ignored: a background job of a script)
      struct sigaction was {};
      if (::sigaction(sig, nullptr, &was) == 0 && was.sa_handler != SIG_IGN) ::signal(sig, on_signal);
    }
    const auto progress = [&](int64_t done, int64_t total) {
      if (const int sig = g_signal.load())
        throw Interrupted(
            sig, "", std::string("interrupted (") + ::strsignal(sig) + ")",
            "nothing was written: earlier shard sets in data_prep.output and valid_output are as they were");
      if (done >= total) g_finishing = true;
      const int pct = total > 0 ? static_cast<int>(100 * done / total) : 100;
      if (pct != last) fmt::print(stderr, "\rtokenizing: {:3d}% of {:.1f} MB", pct, total / 1e6), last = pct;
    };
    ShardSetInfo info;
    try {
      info = write_shards(recipe.data_prep, tok, progress);
    } catch (...) {
      if (last >= 0) fmt::print(stderr, "\n");  // (the error on a line of its own)
      throw;
    }
    fmt::print(stderr, "\n");
    if (const int sig = g_signal.load())
      fmt::print("note: {} came when the shard sets were whole but for moving them in: they were completed\n",
                 ::strsignal(sig));
    for (const std::string& note : info.notes) fmt::print("note: {}\n", note);
    fmt::print("shards: {} ({} documents, {} tokens)\n", info.dir, info.total_documents, info.total_tokens);
    if (recipe.data_prep.valid_every > 0) {
      const ShardSet v = ShardSet::open(recipe.data_prep.valid_output);
      fmt::print("held-out: {} ({} documents, {} tokens)\n", recipe.data_prep.valid_output, v.info().total_documents,
                 v.n_tokens());
    } else if (!recipe.data_prep.valid_output.empty()) {
      fmt::print("note: data_prep.valid_every is 0: no held-out set was written ({} is as it was)\n",
                 recipe.data_prep.valid_output);
    }
    return 0;
  });
}
