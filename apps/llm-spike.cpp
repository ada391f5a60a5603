// llm-spike analyze RUN_DIR | llm-spike supervise RECIPE [--set k=v]... [-- LAUNCH COMMAND...]
// Loss spikes after the fact (a table and a plot) and around the process (restart a training
// job that crashed, hung or was stopped by the guard).
#include <fmt/core.h>
#include <unistd.h>

#include <libllm/cli.h>
#include <libllm/config.h>
#include <libllm/error.h>
#include <libllm/recipe.h>
#include <libllm/spike.h>
#include <cmath>
#include <filesystem>

using namespace libllm;
namespace fs = std::filesystem;

namespace {

const char* kUsage =
    "llm-spike analyze RUN_DIR [--plot FILE]\n"
    "llm-spike supervise RECIPE [--set section.key=value]... [--max-restarts N] [--hang-seconds S]\n"
    "                    [--lr-factor F] [-- LAUNCH COMMAND...]\n"
    "  supervise runs `llm-pretrain RECIPE --set...` (next to this program) unless a launch command\n"
    "  (e.g. torchrun --nproc-per-node 8 llm-pretrain RECIPE) follows `--`; the launch command must\n"
    "  carry the same --set options. A run is hung when neither its metrics log nor its heartbeat\n"
    "  (beaten while it writes or reads checkpoints and evaluates) changed for --hang-seconds.";

int analyze(int argc, char** argv) {
  cli::Args args(argc, argv, kUsage, {{"--plot", "plot file (default RUN_DIR/spikes.html)"}}, 1);
  if (args.help()) return fmt::print("{}\n", args.usage()), 0;
  const std::string run_dir = args.positional()[0];
  if (!fs::is_directory(run_dir)) throw Error(run_dir, "run folder not found", "pass a recipe's train.run_dir");
  const RunAnalysis a = analyze_run(run_dir);
  fmt::print("{}", format_spikes(a));
  const std::string plot = args.has("--plot") ? args.get("--plot") : (fs::path(run_dir) / "spikes.html").string();
  write_spike_plot(a, plot);
  fmt::print("plot: {}\n", plot);
  return 0;
}

int supervise(int argc, char** argv) {
  // Everything after the first "--" is the launch command (which may hold "--" of its own).
  int split = argc;
  for (int i = 1; i < argc && split == argc; ++i)
    if (std::string(argv[i]) == "--") split = i;
  cli::Args args(split, argv, kUsage,
                 {{"--max-restarts", "restarts before giving up", true, "5"},
                  {"--hang-seconds", "no new metrics line or heartbeat for this long = hung", true, "900"},
                  {"--lr-factor", "LR multiplier for a restart after a guard stop", true, "0.5"}},
                 1, /*recipe_overrides=*/true);
  if (args.help()) return fmt::print("{}\n", args.usage()), 0;
  const std::string recipe_path = args.positional()[0];
  const Recipe recipe = Recipe::load(recipe_path, args.overrides());
  SuperviseOptions opt;
  opt.run_dir = recipe.train.run_dir;
  opt.max_restarts = args.get_int("--max-restarts");
  if (opt.max_restarts < 0) throw Error("--max-restarts", "must be >= 0, got " + std::to_string(opt.max_restarts));
  auto number = [&](const std::string& name, double lo, double hi) {
    const std::string v = args.get(name);
    const double x = parse_number(v).value_or(std::nan(""));
    if (!(x > lo && x <= hi)) throw Error(name, fmt::format("expected a number in ({}, {}], got '{}'", lo, hi, v));
    return x;
  };
  opt.hang_seconds = number("--hang-seconds", 0, 1e9);
  opt.lr_factor = number("--lr-factor", 0, 1);
  if (split < argc) {
    for (int i = split + 1; i < argc; ++i) opt.command.emplace_back(argv[i]);
    if (opt.command.empty()) throw Error("llm-spike supervise", "nothing after '--'", "give the launch command");
    // The supervisor watches the run that the recipe and its --set describe: the job must be that run.
    for (const auto& o : args.overrides()) {
      bool given = false;
      for (size_t i = 0; i < opt.command.size() && !given; ++i)
        given = opt.command[i] == "--set=" + o ||
                (opt.command[i] == "--set" && i + 1 < opt.command.size() && opt.command[i + 1] == o);
      if (!given)
        throw Error("--set " + o, "given to llm-spike supervise but not to the launch command",
                    "the supervisor must watch the run the job writes: give the launch command the same --set "
                    "(or put the setting in the recipe)");
    }
    // Nor may the job write another run folder than the one watched (the last --set of it wins).
    std::string job_run_dir;
    for (size_t i = 0; i < opt.command.size(); ++i) {
      const std::string o = opt.command[i].rfind("--set=", 0) == 0                    ? opt.command[i].substr(6)
                            : opt.command[i] == "--set" && i + 1 < opt.command.size() ? opt.command[i + 1]
                                                                                      : "";
      if (o.rfind("train.run_dir=", 0) == 0) job_run_dir = o;
    }
    if (!job_run_dir.empty() && fs::path(job_run_dir.substr(14)) != fs::path(opt.run_dir))
      throw Error("--set " + job_run_dir,
                  "in the launch command, but llm-spike supervise watches train.run_dir " + opt.run_dir,
                  "give supervise the same --set train.run_dir");
  } else {
    const fs::path self = fs::read_symlink("/proc/self/exe");
    opt.command = {(self.parent_path() / "llm-pretrain").string(), recipe_path};
    for (const auto& o : args.overrides()) opt.command.insert(opt.command.end(), {"--set", o});
  }
  return libllm::supervise(opt);
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run("llm-spike", [&] {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "analyze") return analyze(argc - 1, argv + 1);
    if (cmd == "supervise") return supervise(argc - 1, argv + 1);
    if (cmd == "--help" || cmd == "-h") return fmt::print("{}\n", kUsage), 0;
    throw Error("llm-spike", cmd.empty() ? "missing command" : "unknown command '" + cmd + "'",
                "use `llm-spike analyze RUN_DIR` or `llm-spike supervise RECIPE`");
  });
}
