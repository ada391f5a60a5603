// Loss spikes after the fact and around the process: analysis of a run's metrics and events
// (llm-spike analyze) and a supervisor that restarts a training job that crashed, hung or was
// stopped by the guard (llm-spike supervise). No LibTorch here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace libllm {

// One spike: a run of consecutive anomalous steps (in the order they ran).
struct Spike {
  int64_t first_step = 0, last_step = 0;  // 1-based step range
  int64_t branch = 0;                     // rollbacks before it (which attempt of these steps)
  std::string kind;                       // "benign" (recovered by itself) or "malignant" (persisted: rollback/stop)
  double peak_loss = 0, peak_z_loss = 0, peak_z_grad = 0, max_grad_norm = 0;
  int64_t skipped = 0;                    // updates the guard skipped in it
  std::string outcome;                    // what happened: "recovered", "rolled back to step 38 ...", "stopped"
};

struct RunAnalysis {
  std::string run_dir;
  bool guarded = false;        // the run logged guard decisions (else spikes are found here with the recipe's thresholds)
  int64_t steps_run = 0;       // metric lines (steps run, rolled-back ones included)
  int64_t last_step = 0;
  int64_t rollbacks = 0, restarts = 0, skips = 0;
  std::vector<Spike> spikes;
};

// Reads run_dir/metrics.jsonl and run_dir/events.jsonl (and the `guard` section of
// run_dir/recipe.yaml for thresholds when the run was not guarded). Errors name the file.
RunAnalysis analyze_run(const std::string& run_dir);
// The table llm-spike analyze prints.
std::string format_spikes(const RunAnalysis& a);
// Loss and grad-norm panels with spikes shaded (benign orange, malignant red), skipped steps
// crossed and rollbacks marked; a self-contained HTML file, written atomically.
void write_spike_plot(const RunAnalysis& a, const std::string& html_path);

struct SuperviseOptions {
  std::vector<std::string> command;  // the training job (argv; a launcher such as torchrun or srun works)
  std::string run_dir;               // the recipe's train.run_dir (metrics, events, checkpoints)
  int64_t max_restarts = 5;          // give up after this many restarts
  double hang_seconds =
      900;  // no new metrics line or heartbeat (run_dir/heartbeat) for this long = hung: kill and restart
  double lr_factor = 0.5;            // after a guard stop, restart with the LR times this (cumulative)
  double poll_seconds = 0.5;         // how often the child and its metrics are checked
};

// Runs the job as a child (own process group) and restarts it when it crashes (killed or
// non-zero exit after making progress; not after 3 crashes in a row alike, each the same exit
// code or signal after the same first and last steps: a failure that repeats, such as a full
// disk), hangs, or is stopped by the guard (exit code
// 3, then with a restart plan: the newest healthy checkpoint, the data after it deferred, the LR lowered). Sets
// LIBLLM_RESTART, LIBLLM_RESTART_PLAN and LIBLLM_HEARTBEAT (run_dir/heartbeat: rank 0 beats it while it writes or reads
// checkpoints and evaluates) for the child. Every restart and its reason goes to run_dir/events.jsonl and the console.
// Returns the exit code to use: 0 when the job finished, else non-zero.
int supervise(const SuperviseOptions& opt);

}  // namespace libllm
