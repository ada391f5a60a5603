// llm-pretrain RECIPE [--set section.key=value]...: pretrains (or resumes) the recipe's model.
// Exit codes: 0 done, 1 error, 3 stopped by the loss-spike guard.
#include <fmt/core.h>

#include <libllm/cli.h>
#include <libllm/guard.h>
#include <libllm/recipe.h>
#include <libllm/train.h>

using namespace libllm;

int main(int argc, char** argv) {
  return cli::run("llm-pretrain", [&] {
    cli::Args args(argc, argv, "llm-pretrain RECIPE [--set section.key=value]...", {}, 1, /*recipe_overrides=*/true);
    if (args.help()) return fmt::print("{}", args.usage()), 0;
    const Recipe recipe = Recipe::load(args.positional()[0], args.overrides());
    try {
      pretrain(recipe);
    } catch (const SpikeStop& e) {
      fmt::print(stderr, "llm-pretrain: error: {}\n", e.what());
      return kSpikeStopExit;  // llm-spike supervise restarts with a plan
    }
    return 0;
  });
}
