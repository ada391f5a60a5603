// llm-finetune RECIPE [--set section.key=value]...: fine-tunes recipe.finetune.base (a Hugging
// Face or libllm model folder), full or LoRA, on chat examples (section `chat`) or packed
// documents (data.train); resumes like llm-pretrain. Exit codes: 0 done, 1 error, 3 stopped by
// the loss-spike guard.
#include <fmt/core.h>

#include <libllm/cli.h>
#include <libllm/guard.h>
#include <libllm/recipe.h>
#include <libllm/train.h>

using namespace libllm;

int main(int argc, char** argv) {
  return cli::run("llm-finetune", [&] {
    cli::Args args(argc, argv, "llm-finetune RECIPE [--set section.key=value]...", {}, 1, /*recipe_overrides=*/true);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    const Recipe recipe = Recipe::load(args.positional()[0], args.overrides());
    try {
      finetune(recipe);
    } catch (const SpikeStop& e) {
      fmt::print(stderr, "llm-finetune: error: {}\n", e.what());
      return kSpikeStopExit;
    }
    return 0;
  });
}
