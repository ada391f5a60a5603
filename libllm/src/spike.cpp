#include "libllm/spike.h"

#include <fmt/core.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "atomic_file.h"
#include "heartbeat.h"
#include "jsonl.h"
#include "libllm/config.h"
#include "libllm/error.h"
#include "libllm/guard.h"
#include "libllm/plot.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace libllm {
namespace {

using detail::read_jsonl;

double num(const json& j, const char* key) {
  if (!j.contains(key) || !j[key].is_number()) return j.contains(key) && j[key].is_null() ? INFINITY : 0.0;
  return j[key].get<double>();
}

// The run's guard settings (its recipe.yaml's `guard` section), enabled for analysis; `was_on`
// (optional) gets whether the run had the guard on (no recipe.yaml: unknown, -1).
GuardConfig guard_config_of(const std::string& run_dir, int* was_on = nullptr) {
  if (was_on) *was_on = -1;
  GuardConfig g;
  const std::string path = (fs::path(run_dir) / "recipe.yaml").string();
  if (fs::exists(path)) {
    YAML::Node root;
    try {
      root = YAML::LoadFile(path);
    } catch (const YAML::Exception& e) {
      throw Error(path, std::string("invalid YAML: ") + e.what());
    }
    if (root["guard"]) {
      YAML::Node only;
      only["guard"] = root["guard"];
      Schema s;
      g.fields(s.section("guard"));
      s.load_string(YAML::Dump(only), path);
    }
    if (was_on) *was_on = g.enabled ? 1 : 0;
  }
  g.enabled = true;
  return g;
}

}  // namespace

RunAnalysis analyze_run(const std::string& run_dir) {
  RunAnalysis a;
  a.run_dir = run_dir;
  const auto metrics = read_jsonl((fs::path(run_dir) / "metrics.jsonl").string(), true);
  const auto events = read_jsonl((fs::path(run_dir) / "events.jsonl").string(), false);
  for (const auto& e : events) {
    const std::string ev = e.value("event", "");
    a.rollbacks += ev == "rollback" || ev == "restart_plan";
    a.restarts += ev == "restart";
  }
  // Guarded: as the recipe says (a run without the guard logs an action only for a non-finite
  // step it skipped, and its finite spikes must still be found); without a recipe, by its lines.
  int was_on = -1;
  const GuardConfig cfg = guard_config_of(run_dir, &was_on);
  a.guarded = was_on >= 0
                  ? was_on == 1
                  : std::all_of(metrics.begin(), metrics.end(), [](const json& m) { return m.contains("action"); }) &&
                        !metrics.empty();
  Guard detector(cfg);

  Spike cur;
  bool open = false;
  std::string last_action;
  auto close = [&] {
    if (!open) return;
    open = false;
    if (last_action == "stop") {
      cur.kind = "malignant";
      cur.outcome = "the guard stopped the run (for a supervisor restart)";
      for (const auto& e : events)  // the supervisor's restart plan, applied by the next job
        if (e.value("event", "") == "restart_plan" && e.value("step", int64_t{-1}) == cur.last_step)
          cur.outcome =
              fmt::format("the guard stopped the run; restarted from step {} by plan, {} windows {}, LR x{:.3g}",
                          e.value("to_step", int64_t{0}), e.value("windows", int64_t{0}),
                          e.value("data", std::string("deferred")), e.value("lr_scale", 1.0));
    } else if (last_action == "rollback") {
      cur.kind = "malignant";
      cur.outcome = "rolled back";
      for (const auto& e : events)
        if (e.value("event", "") == "rollback" && e.value("step", int64_t{-1}) == cur.last_step)
          cur.outcome = fmt::format("rolled back to step {}, {} windows {}, LR x{:.3g}", e.value("to_step", int64_t{0}),
                                    e.value("windows", int64_t{0}), e.value("data", std::string("deferred")),
                                    e.value("lr_scale", 1.0));
    } else if (!a.guarded && cur.last_step - cur.first_step + 1 > cfg.persist_steps) {
      cur.kind = "malignant";
      cur.outcome = fmt::format("persisted {} steps (no guard)", cur.last_step - cur.first_step + 1);
    } else {
      cur.kind = "benign";
      cur.outcome = cur.skipped > 0 ? fmt::format("recovered; {} update{} skipped", cur.skipped, cur.skipped > 1 ? "s" : "")
                                    : "recovered by itself (no guard)";
    }
    a.spikes.push_back(cur);
  };
  for (const auto& m : metrics) {
    const int64_t step = m.value("step", int64_t{0});
    const double loss = num(m, "loss"), grad = num(m, "grad_norm");
    ++a.steps_run;
    a.last_step = step;
    bool spike = false;
    double zl = 0, zg = 0;
    std::string action = "apply";
    if (a.guarded) {
      action = m.value("action", std::string("apply"));
      spike = action != "apply";
      zl = num(m, "z_loss"), zg = num(m, "z_grad");
      a.skips += action == "skip";
    } else {
      const GuardDecision d = detector.observe(step, loss, grad);
      spike = d.spike;
      zl = d.z_loss, zg = d.z_grad;
      action = m.value("action", std::string("apply"));  // (a non-finite step, skipped without the guard too)
      a.skips += action == "skip";
    }
    if (!spike) {
      close();
      continue;
    }
    if (!open) {
      cur = Spike{};
      cur.first_step = step;
      cur.branch = m.value("branch", int64_t{0});
      open = true;
    }
    cur.last_step = step;
    cur.peak_loss = std::max(cur.peak_loss, loss);
    cur.peak_z_loss = std::max(cur.peak_z_loss, zl);
    cur.peak_z_grad = std::max(cur.peak_z_grad, zg);
    cur.max_grad_norm = std::max(cur.max_grad_norm, grad);
    cur.skipped += action == "skip";
    last_action = action;
    if (action == "rollback" || action == "stop") close();
  }
  close();
  return a;
}

std::string format_spikes(const RunAnalysis& a) {
  int64_t benign = 0;
  for (const auto& s : a.spikes) benign += s.kind == "benign";
  std::string out = fmt::format("run {}: {} steps run (last step {}), {} spike{} ({} benign, {} malignant), {} rollback{}, "
                                "{} restart{}, {} skipped update{}{}\n",
                                a.run_dir, a.steps_run, a.last_step, a.spikes.size(), a.spikes.size() == 1 ? "" : "s",
                                benign, a.spikes.size() - benign, a.rollbacks, a.rollbacks == 1 ? "" : "s", a.restarts,
                                a.restarts == 1 ? "" : "s", a.skips, a.skips == 1 ? "" : "s",
                                a.guarded ? "" : " (run without the guard: spikes found with its thresholds)");
  if (a.spikes.empty()) return out;
  out += fmt::format("{:>5}  {:<11}  {:<9}  {:>9}  {:>11}  {:>11}  {:>13}  {}\n", "spike", "steps", "kind", "peak loss",
                     "peak loss z", "peak grad z", "max grad norm", "outcome");
  for (size_t i = 0; i < a.spikes.size(); ++i) {
    const Spike& s = a.spikes[i];
    const std::string range = s.first_step == s.last_step ? std::to_string(s.first_step)
                                                          : fmt::format("{}-{}", s.first_step, s.last_step);
    out += fmt::format("{:>5}  {:<11}  {:<9}  {:>9.4f}  {:>11.1f}  {:>11.1f}  {:>13.3f}  {}\n", i + 1, range, s.kind,
                       s.peak_loss, s.peak_z_loss, s.peak_z_grad, s.max_grad_norm, s.outcome);
  }
  return out;
}

void write_spike_plot(const RunAnalysis& a, const std::string& html_path) {
  const auto metrics = read_jsonl((fs::path(a.run_dir) / "metrics.jsonl").string(), true);
  // The last attempt at each step is the run's curve; earlier attempts were rolled back.
  std::map<int64_t, size_t> final_line;
  for (size_t i = 0; i < metrics.size(); ++i) final_line[metrics[i].value("step", int64_t{0})] = i;
  PlotSeries loss{"training loss", "#1f77b4"}, grad{"grad norm (before clipping)", "#2ca02c"};
  PlotSeries loss_rb{"rolled-back steps", "#aaaaaa"}, grad_rb{"rolled-back steps", "#aaaaaa"};
  PlotSeries loss_skip{"skipped updates", "#d62728"}, grad_skip{"skipped updates", "#d62728"};
  loss_rb.line = grad_rb.line = loss_skip.line = grad_skip.line = false;
  loss_skip.marker = grad_skip.marker = "cross";
  for (size_t i = 0; i < metrics.size(); ++i) {
    const auto& m = metrics[i];
    const double step = static_cast<double>(m.value("step", int64_t{0}));
    const double l = num(m, "loss"), g = num(m, "grad_norm");
    const bool kept = final_line[m.value("step", int64_t{0})] == i;
    if (m.value("action", std::string("apply")) == "skip") loss_skip.points.emplace_back(step, l), grad_skip.points.emplace_back(step, g);
    if (kept) loss.points.emplace_back(step, l), grad.points.emplace_back(step, g);
    else loss_rb.points.emplace_back(step, l), grad_rb.points.emplace_back(step, g);
  }
  std::vector<PlotBand> bands;
  for (const auto& s : a.spikes)
    bands.push_back({static_cast<double>(s.first_step), static_cast<double>(s.last_step), s.kind == "benign" ? "#ff9900" : "#d62728"});
  std::vector<PlotMark> marks;
  for (const auto& e : read_jsonl((fs::path(a.run_dir) / "events.jsonl").string(), false)) {
    const std::string ev = e.value("event", "");
    if (ev == "rollback" || ev == "restart_plan")
      marks.push_back({static_cast<double>(e.value("step", int64_t{0})),
                       fmt::format("{} to {}", ev == "rollback" ? "rollback" : "restart", e.value("to_step", int64_t{0})), "#9467bd"});
  }
  std::string body = "<pre>" + format_spikes(a) + "</pre>\n";
  body += svg_chart("loss (nats)", {loss, loss_rb, loss_skip}, bands, marks);
  body += svg_chart("grad norm", {grad, grad_rb, grad_skip}, bands, marks);
  body += "<p>Shaded: spikes (orange benign, red malignant). Dashed: rollbacks and restarts.</p>";
  write_html(html_path, "libllm spikes: " + a.run_dir, body);
}

// ---------------------------------------------------------------------------------------------
// supervise

namespace {

volatile std::sig_atomic_t g_signal = 0;
void on_signal(int sig) { g_signal = sig; }

// The supervisor's own events: a failed write (a full disk) is a warning, not the end of the
// supervision. The log is never shrunk here (a remote rank 0 may still be appending): after an
// unfinished last line, the event starts a line of its own.
void append_event(const std::string& run_dir, json e) {
  e["time"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  const std::string path = (fs::path(run_dir) / "events.jsonl").string();
  bool unfinished = false;
  if (std::ifstream in{path, std::ios::binary | std::ios::ate}; in && in.tellg() > 0) {
    in.seekg(-1, std::ios::end);
    char last = '\n';
    unfinished = in.get(last) && last != '\n';
  }
  std::ofstream out(path, std::ios::app);
  errno = 0;
  out << (unfinished ? "\n" : "") << e.dump() << "\n" << std::flush;
  if (!out)
    fmt::print(stderr, "llm-spike: warning: cannot write the {} event to {}: {}\n", e.value("event", "?"), path,
               errno ? std::strerror(errno) : "write failed");
}

// (size, mtime) of the metrics log or the heartbeat file: any change is progress.
std::pair<int64_t, int64_t> progress_mark(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return {-1, 0};
  return {static_cast<int64_t>(st.st_size), static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

pid_t launch(const std::vector<std::string>& cmd, int64_t attempt, const std::string& plan,
             const std::string& heartbeat) {
  const pid_t pid = ::fork();
  if (pid < 0) throw Error("llm-spike", "fork failed");
  if (pid == 0) {
    ::setpgid(0, 0);
    ::setenv("LIBLLM_RESTART", std::to_string(attempt).c_str(), 1);
    ::setenv(detail::kHeartbeatEnv, heartbeat.c_str(), 1);
    if (!plan.empty()) ::setenv("LIBLLM_RESTART_PLAN", plan.c_str(), 1);
    else ::unsetenv("LIBLLM_RESTART_PLAN");
    std::vector<char*> argv;
    for (const auto& a : cmd) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "llm-spike: cannot run '%s': %s\n", argv[0], std::strerror(errno));
    std::_Exit(127);
  }
  ::setpgid(pid, pid);
  return pid;
}

// Ends the job's process group (SIGTERM, SIGKILL after 10 s) if the supervisor dies while the job
// runs (a kill -9, also of its whole process group, the OOM killer), so that no orphaned job, a
// launcher's ranks included, trains on beside the next supervisor's: a process in a session of
// its own waits on a socket that only the supervisor holds open. Destroyed (the job over), it is
// told so and exits.
class Watchdog {
 public:
  explicit Watchdog(pid_t group) {
    int p[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, p) != 0)
      throw Error("llm-spike", std::string("socketpair failed: ") + std::strerror(errno));
    pid_ = ::fork();
    if (pid_ < 0) {
      ::close(p[0]), ::close(p[1]);
      throw Error("llm-spike", std::string("fork failed: ") + std::strerror(errno));
    }
    if (pid_ == 0) {
      ::close(p[1]);
      ::setsid();  // (out of the supervisor's process group: a signal to that group spares it)
      for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) std::signal(sig, SIG_IGN);
      char c = 0;
      ssize_t n;
      while ((n = ::recv(p[0], &c, 1, 0)) < 0 && errno == EINTR) {
      }
      if (n == 0) {  // end of file: the supervisor is gone
        ::kill(-group, SIGTERM);
        for (int i = 0; i < 100 && ::kill(-group, 0) == 0; ++i) ::usleep(100000);
        ::kill(-group, SIGKILL);
      }
      std::_Exit(0);
    }
    ::close(p[0]);
    fd_ = p[1];
  }
  ~Watchdog() {
    const char done = 1;
    while (::send(fd_, &done, 1, MSG_NOSIGNAL) < 0 && errno == EINTR) {  // (a watchdog gone: no SIGPIPE)
    }
    ::close(fd_);
    ::waitpid(pid_, nullptr, 0);
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
};

// SIGTERM to the job's process group, SIGKILL after `grace_s`; returns the wait status.
int terminate_group(pid_t pid, int grace_s = 10) {
  ::kill(-pid, SIGTERM);
  int status = 0;
  for (int i = 0; i < 10 * grace_s; ++i) {
    if (::waitpid(pid, &status, WNOHANG) == pid) return status;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ::kill(-pid, SIGKILL);
  ::waitpid(pid, &status, 0);
  return status;
}

}  // namespace

namespace detail {

void heartbeat(std::string_view what, std::string_view object) {
  const char* path = std::getenv(kHeartbeatEnv);
  if (path == nullptr || *path == '\0') return;
  // The rank as Distributed::from_env reads it: $RANK, else Slurm's $SLURM_PROCID (srun).
  const char* rank = std::getenv("RANK");
  if (rank == nullptr || *rank == '\0') rank = std::getenv("SLURM_PROCID");
  if (rank != nullptr && *rank != '\0' && std::strcmp(rank, "0") != 0) return;
  static std::mutex mutex;
  static std::chrono::steady_clock::time_point last;
  static bool beaten = false;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto now = std::chrono::steady_clock::now();
  if (beaten && now - last < std::chrono::seconds(1)) return;
  beaten = true, last = now;
  try {
    const double t = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    std::ofstream(path, std::ios::trunc) << fmt::format("{:.3f} {}{}{}\n", t, what, object.empty() ? "" : " ", object);
  } catch (...) {  // (a missing heartbeat is the supervisor's to judge)
  }
}

}  // namespace detail

int supervise(const SuperviseOptions& opt) {
  if (opt.command.empty()) throw Error("llm-spike supervise", "no command to run");
  const std::string metrics = (fs::path(opt.run_dir) / "metrics.jsonl").string();
  const std::string plan_path = (fs::path(opt.run_dir) / "restart_plan.json").string();
  // (absolute: a launcher or script may change directory before the job starts)
  const std::string heartbeat_path = fs::absolute(fs::path(opt.run_dir) / "heartbeat").string();
  fs::create_directories(opt.run_dir);
  fs::remove(plan_path);
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::string cmdline;
  for (const auto& c : opt.command) cmdline += (cmdline.empty() ? "" : " ") + c;
  append_event(opt.run_dir, {{"event", "supervise"}, {"command", cmdline}, {"max_restarts", opt.max_restarts},
                             {"hang_seconds", opt.hang_seconds}});
  double lr_factor = 1.0;
  // The attempts' crashes in a row that were the same: how, and the first and last steps each ran.
  // Three alike (a full disk at the same checkpoint save, a damaged file read at the same step) are
  // no chance failures: another restart would fail the same way. (Two could be: "exit code 1" is
  // any error, and a save is where passing storage and network faults strike.)
  std::string last_how;
  int64_t last_first = -1, last_last = -1, alike = 0;
  const auto wall = [] {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  };
  for (int64_t attempt = 0;; ++attempt) {
    if (g_signal) return 128 + g_signal;  // (asked to stop between attempts)
    fmt::print("llm-spike: starting (attempt {}): {}\n", attempt, cmdline);
    std::fflush(stdout);
    const double launched_at = wall();
    fs::remove(heartbeat_path);  // (what it says is about this attempt)
    const pid_t pid = launch(opt.command, attempt, fs::exists(plan_path) ? plan_path : "", heartbeat_path);
    std::optional<Watchdog> watchdog;
    try {
      watchdog.emplace(pid);
    } catch (...) {
      terminate_group(pid);  // (never a job without one)
      throw;
    }
    auto mark = progress_mark(metrics), beat = progress_mark(heartbeat_path);
    auto last = std::chrono::steady_clock::now();
    // The newest change was a heartbeat (a long phase), not a metrics line. (The file was removed
    // before the launch: one already here is this attempt's, written before the first look.)
    bool beat_last = beat.first >= 0 && beat.second > mark.second;
    int status = 0;
    bool hung = false;
    for (;;) {
      const pid_t r = ::waitpid(pid, &status, WNOHANG);
      if (r == pid) break;
      if (g_signal) {
        fmt::print("llm-spike: signal {}: stopping the job (it saves a checkpoint first; SIGKILL after 120 s)\n",
                   static_cast<int>(g_signal));
        std::fflush(stdout);
        terminate_group(pid, 120);  // (train.save_on_signal: the trainer ends its step and saves)
        append_event(opt.run_dir, {{"event", "interrupted"}, {"signal", static_cast<int>(g_signal)}});
        return 128 + g_signal;
      }
      std::this_thread::sleep_for(std::chrono::duration<double>(opt.poll_seconds));
      const auto now_mark = progress_mark(metrics), now_beat = progress_mark(heartbeat_path);
      if (now_mark != mark || now_beat != beat) {
        mark = now_mark, beat = now_beat, last = std::chrono::steady_clock::now();
        beat_last = beat.second > mark.second;  // (by modification time: both may change between polls)
      }
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - last).count() > opt.hang_seconds) {
        hung = true;
        status = terminate_group(pid);
        break;
      }
    }
    ::kill(-pid, SIGKILL);  // whatever the leader left behind in its group (a launcher's ranks)
    if (g_signal) {         // a shutdown (scancel, Ctrl-C) that reached the job first is no crash to restart
      fmt::print("llm-spike: signal {}: stopping\n", static_cast<int>(g_signal));
      append_event(opt.run_dir, {{"event", "interrupted"}, {"signal", static_cast<int>(g_signal)}});
      return 128 + g_signal;
    }
    // Progress: a step this attempt ran (its metrics lines say which attempt ran them; the file
    // itself changes at every start, when the trainer rewrites it for the resumed step).
    bool progressed = false;
    int64_t first_step = -1, last_step = -1;
    for (const auto& m : read_jsonl(metrics, false))
      if (m.value("attempt", int64_t{-1}) == attempt) {
        progressed = true;
        last_step = m.value("step", int64_t{-1});  // (the step it died after)
        if (first_step < 0) first_step = last_step;
      }
    std::string how;  // a crash's exit code or signal (empty: no crash)
    // A guard stop of this attempt: its "stop" event, whatever exit code the launcher passed on
    // (torchrun exits 1 when a worker exits 3).
    json stop;
    for (const auto& e : read_jsonl((fs::path(opt.run_dir) / "events.jsonl").string(), false))
      if (e.value("event", "") == "stop" && e.value("time", 0.0) >= launched_at) stop = e;
    const bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    std::string reason;
    bool with_plan = false;
    if (hung) {
      reason = fmt::format("hang: no new metrics line or heartbeat for {:.0f} s", opt.hang_seconds);
      if (beat_last) {  // stuck inside a long phase: say which ("<time> <what>")
        std::string text;
        std::getline(std::ifstream(heartbeat_path), text);
        if (const size_t sp = text.find(' '); sp != std::string::npos)
          reason += " (last heartbeat: " + text.substr(sp + 1) + ")";
      }
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      fmt::print("llm-spike: the job finished (attempt {})\n", attempt);
      append_event(opt.run_dir, {{"event", "finished"}, {"attempt", attempt}});
      return 0;
    } else if (failed && (!stop.is_null() || (WIFEXITED(status) && WEXITSTATUS(status) == kSpikeStopExit))) {
      // The guard gave up in-loop: restart from its healthy checkpoint with a plan.
      const int64_t to = stop.is_null() ? -1 : stop.value("to_step", int64_t{-1});
      if (to < 0) {
        fmt::print(stderr, "llm-spike: the guard stopped the job and there is no healthy checkpoint to restart from\n");
        append_event(opt.run_dir, {{"event", "give_up"}, {"reason", "guard stop without a healthy checkpoint"}});
        return kSpikeStopExit;
      }
      lr_factor *= opt.lr_factor;
      const json plan = {{"to_step", to},
                         {"from_step", stop.value("from_step", to)},
                         {"lr_factor", opt.lr_factor},
                         {"cumulative_lr_factor", lr_factor},
                         {"reason", stop.value("reason", "")},
                         {"attempt", attempt + 1}};  // (each plan is another, even with the same steps)
      detail::write_file_atomic(plan_path, plan.dump(1) + "\n");
      with_plan = true;
      reason = fmt::format("unresolved spike ({}); restart from step {} with the data of steps {}..{} {}, LR x{:.3g}",
                           stop.value("reason", "?"), to, to + 1, stop.value("from_step", to),
                           stop.value("data", std::string("end")) == "end" ? "deferred to the end" : "dropped",
                           opt.lr_factor);
    } else if (WIFSIGNALED(status)) {
      how = fmt::format("killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
      reason = "crash: " + how;
    } else {
      const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
      if (!progressed) {
        fmt::print(stderr, "llm-spike: the job failed with exit code {} before making progress: not restarting\n", code);
        append_event(opt.run_dir, {{"event", "give_up"}, {"reason", fmt::format("exit code {} without progress", code)}});
        return code;
      }
      how = fmt::format("exit code {}", code);
      reason = "crash: " + how;
    }
    // (an attempt that ran no step, killed while loading say, is never one of them)
    const bool same =
        !how.empty() && first_step >= 0 && how == last_how && first_step == last_first && last_step == last_last;
    alike = same ? alike + 1 : (!how.empty() && first_step >= 0 ? 1 : 0);
    last_how = how, last_first = first_step, last_last = last_step;
    if (alike >= 3) {
      const std::string what = fmt::format("{} after steps {}..{}", how, first_step, last_step);
      fmt::print(stderr,
                 "llm-spike: the job failed the same way 3 times in a row ({}): not restarting (a failure that "
                 "repeats, such as a full disk or a damaged file: its error is above)\n",
                 what);
      append_event(opt.run_dir, {{"event", "give_up"}, {"reason", "the same failure 3 times: " + what}});
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    // A plan stays until the trainer has applied it (it then renames it <plan>.applied), so a job
    // that dies while applying it gets it again; one that dies after its checkpoint's re-save
    // does not apply it twice (the checkpoint records it).
    if (attempt + 1 > opt.max_restarts) {
      fmt::print(stderr, "llm-spike: {}; giving up after {} restarts\n", reason, opt.max_restarts);
      append_event(opt.run_dir, {{"event", "give_up"}, {"reason", reason}, {"restarts", attempt}});
      return 1;
    }
    fmt::print("llm-spike: {}; restarting ({}/{})\n", reason, attempt + 1, opt.max_restarts);
    std::fflush(stdout);
    append_event(opt.run_dir, {{"event", "restart"}, {"attempt", attempt + 1}, {"reason", reason}, {"plan", with_plan}});
  }
}

}  // namespace libllm
