#include "libllm/train.h"

#include <fmt/core.h>
#include <fmt/format.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <unistd.h>

#include <sys/stat.h>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "atomic_file.h"
#include "xxh64.h"
#include "heartbeat.h"
#include "jsonl.h"
#include "libllm/chat.h"
#include "libllm/checkpoint.h"
#include "libllm/compat.h"
#include "libllm/config.h"
#include "libllm/data.h"
#include "libllm/distributed.h"
#include "libllm/error.h"
#include "libllm/finetune.h"
#include "libllm/generate.h"
#include "libllm/guard.h"
#include "libllm/hf.h"
#include "libllm/model.h"
#include "libllm/optim.h"
#include "libllm/plot.h"
#include "libllm/recipe.h"
#include "libllm/shard.h"
#include "libllm/tokenizer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace libllm {

void TrainConfig::fields(Fields& f) {
  f.add("run_dir", run_dir);
  f.add("seq_len", seq_len).min(1).max(1 << 24);  // (bounds keep token counts far from int64 overflow)
  f.add("micro_batch", micro_batch).min(1).max(1 << 20);
  f.add("global_batch_tokens", global_batch_tokens).min(0);
  f.add("steps", steps).min(1);
  f.add("dtype", dtype).one_of({"fp32", "bf16"});
  f.add("device", device).one_of({"cpu", "cuda", "auto"});
  f.add("activation_checkpointing", activation_checkpointing);
  f.add("document_mask", document_mask);
  f.add("fused_loss", fused_loss);
  f.add("fp32_grads", fp32_grads);
  f.add("sharding", sharding).one_of({"none", "zero1", "zero2", "zero3", "hybrid"});
  f.add("shard_group", shard_group).min(0);
  f.add("dist_timeout_s", dist_timeout_s).min(1).max(7 * 86400);
  f.add("seed", seed).min(0);
  f.add("threads", threads).min(0);
  f.add("log_every", log_every).min(1);
  f.add("eval_every", eval_every).min(0);
  f.add("eval_batches", eval_batches).min(1);
  f.add("peak_tflops", peak_tflops).min(0);
  f.add("sample_prompts", sample_prompts);
  f.add("sample_tokens", sample_tokens).min(0);
  f.add("sample_temperature", sample_temperature).min(0);
  f.add("plot", plot);
  f.add("save_on_signal", save_on_signal);
}

namespace {

std::string human_time(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s);
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, (t % 3600) / 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

// Keeps the lines of a JSONL log whose "step" is <= last_step (resume), or none (fresh start), and
// those whose "branch" is below `branch` (the steps an earlier rollback discarded: the metrics
// keep them for llm-spike analyze, whatever is resumed later). With `archive`, the lines dropped
// (an abandoned run's or branch's) are written there first, in order (its folder made then):
// nothing logged is lost. Returns the number of lines archived.
int64_t truncate_log(const std::string& path, int64_t last_step, int64_t branch = 0, const std::string& archive = "") {
  // Streamed (the data sequence of a long 7B run holds gigabytes). Lines are appended in step
  // order, so usually all lines from the first one dropped go: the file is cut there, in place.
  // Otherwise (older branches' lines kept after it) the kept lines are written anew.
  const auto keep = [&](const std::string& line) {
    return !line.empty() && line.back() == '}' &&
           (detail::int_field(line, "step", 0) <= last_step || detail::int_field(line, "branch", 0) < branch);
  };
  int64_t offset = 0, cut = -1, dropped = 0;
  bool kept_after_cut = false;
  const bool exists = detail::for_each_line(path, [&](const std::string& line) {
    if (keep(line))
      kept_after_cut = kept_after_cut || cut >= 0;
    else if (cut < 0)
      cut = offset;
    if (!keep(line) && !line.empty()) ++dropped;
    offset += static_cast<int64_t>(line.size()) + 1;
  });
  if (!exists) return detail::write_file_atomic(path, ""), 0;
  if (archive.empty() || dropped == 0) dropped = 0;
  if (dropped > 0) {
    fs::create_directories(fs::path(archive).parent_path());
    if (cut == 0 && !kept_after_cut) {  // every line goes (a new run): the file itself moves
      fs::rename(path, archive);
      return detail::write_file_atomic(path, ""), dropped;
    }
    std::ofstream out(archive + ".tmp", std::ios::binary);
    detail::for_each_line(path, [&](const std::string& line) {
      if (!keep(line) && !line.empty()) out << line << "\n";
    });
    out.close();
    if (!out) throw Error(archive, "cannot write the dropped log lines", "check the disk");
    fs::rename(archive + ".tmp", archive);
  }
  if (kept_after_cut) {  // (a kill meanwhile leaves the old log whole)
    std::string kept;
    detail::for_each_line(path, [&](const std::string& line) {
      if (keep(line)) kept += line + "\n";
    });
    return detail::write_file_atomic(path, kept), dropped;
  }
  if (cut < 0) cut = offset;  // (a last line without its newline goes)
  if (cut < static_cast<int64_t>(fs::file_size(path)) && ::truncate(path.c_str(), cut) != 0)
    throw Error(path, std::string("cannot truncate: ") + std::strerror(errno));
  return dropped;
}

// SIGTERM / SIGINT while training (train.save_on_signal): the number of the signal, read at the
// end of each step. Launchers pass a signal on to their workers (torchrun; a terminal's Ctrl-C
// reaches both), so one more within 2 s is the same request; a later one ends the process (a hung
// job). Lock-free atomics: safe in a handler, and on whichever thread takes the signal.
std::atomic<int> g_stop_signal{0};
std::atomic<int64_t> g_stop_at_ns{0};

int64_t monotonic_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);  // (async-signal-safe)
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

extern "C" void on_stop_signal(int sig) {
  const int64_t now = monotonic_ns();
  if (g_stop_signal.load() == 0) {
    g_stop_at_ns.store(now);
    g_stop_signal.store(sig);
  } else if (now - g_stop_at_ns.load() > 2000000000) {
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(sig, &dfl, nullptr);
    ::raise(sig);
  }
}

// Installs that handler for SIGTERM and SIGINT for its lifetime (the training loop), and restores
// what was there; the flag is cleared at both ends, so that no later run in the process sees it.
class StopSignals {
 public:
  explicit StopSignals(bool on) : on_(on) {
    g_stop_signal = 0;
    if (!on_) return;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    ::sigaction(SIGTERM, &sa, &old_term_);
    ::sigaction(SIGINT, &sa, &old_int_);
  }
  ~StopSignals() {
    if (on_) {
      ::sigaction(SIGTERM, &old_term_, nullptr);
      ::sigaction(SIGINT, &old_int_, nullptr);
    }
    g_stop_signal = 0;
  }
  // The signal that asked to stop, 0 = none.
  int signal() const { return on_ ? g_stop_signal.load() : 0; }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  bool on_;
  struct sigaction old_term_ {
  }, old_int_{};
};

// Whether the metrics lines truncate_log(path, last_step, branch) drops include a loss-spike
// guard's action other than "apply" (a skip, rollback or stop: steps a resume does not simply redo).
bool drops_guard_action(const std::string& path, int64_t last_step, int64_t branch) {
  bool found = false;
  detail::for_each_line(path, [&](const std::string& line) {
    if (detail::int_field(line, "step", 0) <= last_step || detail::int_field(line, "branch", 0) < branch) return;
    const size_t at = line.find("\"action\":\"");
    found = found || (at != std::string::npos && line.compare(at + 10, 6, "apply\"") != 0);
  });
  return found;
}

// One micro batch of (B, T+1) tokens -> inputs (B, T) and targets (B, T).
std::pair<torch::Tensor, torch::Tensor> split_batch(std::vector<int64_t>& buf, int64_t B, int64_t T) {
  auto all = torch::from_blob(buf.data(), {B, T + 1}, torch::kInt64).clone();  // (B, T+1)
  return {all.slice(1, 0, T), all.slice(1, 1, T + 1)};
}

// Moves checkpoints newer than `step` into root/`folder`/ (rolled-back: kept for study, as LLM360
// published K2's spike checkpoints), so that `resume: auto` and pruning never see them. Each gets
// set-aside.json: `why` ({"reason", and "logs": where its log lines went, if they did}) and the
// time, which tells the step-N-k folders of one step apart.
void set_aside_checkpoints(const std::string& root, int64_t step, const json& why, const char* folder = "rolled-back") {
  for (int64_t s : checkpoint_steps(root)) {
    if (s <= step) continue;
    const fs::path aside = fs::path(root) / folder;
    fs::create_directories(aside);
    fs::path dst = aside / checkpoint_name(s);
    for (int k = 1; fs::exists(dst); ++k) dst = aside / (checkpoint_name(s) + "-" + std::to_string(k));
    fs::rename(fs::path(root) / checkpoint_name(s), dst);
    json record = why;
    record["time"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    detail::write_file_atomic((dst / "set-aside.json").string(), record.dump(1) + "\n");
  }
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  if (const std::optional<int64_t> x = parse_int(v)) return *x;
  throw Error(name, std::string("expected an integer, got '") + v + "'");
}

// train.device resolved: does this run train on CUDA?
bool wants_cuda(const TrainConfig& tc) {
  if (tc.device == "cuda" && !compat::cuda_available())
    throw Error("train.device", "is 'cuda' but no CUDA device is usable (LibTorch " + compat::torch_version() + ")",
                "set train.device: cpu (or auto), or build libllm against a LibTorch with CUDA");
  return tc.device == "cuda" || (tc.device == "auto" && compat::cuda_available());
}

json parse_extra(const std::string& extra) {
  if (extra.empty()) return json::object();
  json x;
  try {
    x = detail::parse_json(extra, "extra");
  } catch (const json::exception& e) {
    throw Error("extra", std::string("invalid JSON: ") + e.what(), "the checkpoint is corrupt");
  }
  if (!x.is_object())
    throw Error("extra", "is " + detail::shown(x) + ", not a JSON object", "the checkpoint is corrupt");
  return x;
}

// extra's `key` (`fallback` where absent or null), which must be of JSON type `type` (an Error naming
// the key otherwise, not nlohmann's type message).
json extra_value(const json& x, const char* key, json::value_t type, json fallback) {
  if (!x.contains(key) || x[key].is_null()) return fallback;
  const json& v = x[key];
  const bool ok = type == json::value_t::number_integer ? v.is_number_integer() : v.type() == type;
  if (!ok)
    throw Error(std::string("extra: ") + key,
                "is " + detail::shown(v) + ", expected " +
                    (type == json::value_t::number_integer ? "an integer"
                     : type == json::value_t::array        ? "a list"
                                                           : "an object"),
                "the checkpoint is corrupt");
  return v;
}

// The run's logs (metrics.jsonl, data_sequence.jsonl, events.jsonl): opened for appending, and
// each line written through, with a failure (a full disk, a file another user owns) an Error
// naming the file, not the rest of the run's lines lost in silence.
constexpr const char* kLogHint =
    "free disk space (or make the file writable), then resume: the run's checkpoints are whole";
void open_log(std::ofstream& out, const std::string& path) {
  std::error_code ec;
  try {
    if (fs::exists(path, ec) && detail::end_at_line(path) > 0)  // (a line a failed write left unfinished)
      fmt::print(stderr, "note: {} ended in an unfinished line (a write that failed or was killed): cut\n", path);
  } catch (const fs::filesystem_error& e) {
    throw Error(path, std::string("cannot cut its unfinished last line: ") + e.code().message(), kLogHint);
  }
  out.open(path, std::ios::app);
  if (!out) throw Error(path, std::string("cannot open the log for appending: ") + std::strerror(errno), kLogHint);
}
void append_log(std::ofstream& out, const std::string& path, const std::string& line) {
  errno = 0;
  out << line << "\n" << std::flush;
  if (!out)
    throw Error(path, std::string("cannot write to the log: ") + (errno ? std::strerror(errno) : "write failed"),
                kLogHint);
}

struct Run {
  Run(const Recipe& r, const TrainConfig& t, const TrainHooks& h)
      : recipe(r),
        tc(t),
        hooks(h),
        cuda(wants_cuda(t)),
        dist(Distributed::from_env(t.dist_timeout_s, cuda && compat::nccl_available() ? "nccl" : "gloo")),
        guard(r.guard) {
    if (cuda) {
      device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(compat::cuda_device_for(dist.local_rank())));
      compat::cuda_set_device(device.index());
    }
  }
  Run(const Run&) = delete;
  Run& operator=(const Run&) = delete;
  ~Run() {
    if (lock_fd >= 0) ::close(lock_fd);  // (the lock goes with it; also when the process dies)
  }
  // Takes the run folder for this job (rank 0, for the job's life): an flock on
  // run_dir/.llm-run.lock holding the pid. "" when taken, else why not.
  std::string lock_run_dir() {
    std::error_code ec;
    if (fs::exists(fs::path(tc.run_dir) / "meta.json")) return "holds a shard set (meta.json), not a run";
    if (fs::exists(fs::path(tc.run_dir) / "config.json")) return "holds a model (config.json), not a run";
    fs::create_directories(tc.run_dir, ec);
    if (ec) return "cannot create the folder: " + ec.message();
    const std::string path = (fs::path(tc.run_dir) / ".llm-run.lock").string();
    lock_fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd < 0) return std::string("cannot write in it: ") + std::strerror(errno);
    if (::flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
      char held[32] = {};
      const ssize_t n = ::pread(lock_fd, held, sizeof(held) - 1, 0);
      ::close(lock_fd);
      lock_fd = -1;
      std::string pid = n > 0 ? std::string(held, static_cast<size_t>(n)) : "";
      while (!pid.empty() && std::isspace(static_cast<unsigned char>(pid.back()))) pid.pop_back();
      return "another job" + (pid.empty() ? std::string() : " (pid " + pid + ")") + " is training in it";
    }
    const std::string me = std::to_string(::getpid()) + "\n";
    if (::ftruncate(lock_fd, 0) != 0 || ::pwrite(lock_fd, me.data(), me.size(), 0) != static_cast<ssize_t>(me.size()))
      return std::string("cannot write in it: ") + std::strerror(errno);
    return "";
  }
  int lock_fd = -1;
  const Recipe& recipe;
  const TrainConfig& tc;
  const TrainHooks& hooks;
  const bool cuda;                      // train.device resolved
  Distributed dist;
  torch::Device device = torch::kCPU;   // cuda:LOCAL_RANK on GPUs
  int64_t eos_id = -1;                  // train.document_mask on pretraining data: documents end here
  Transformer model{nullptr};
  std::unique_ptr<AdamW> optim;          // replicated: every rank updates everything
  std::unique_ptr<ShardedAdamW> sharded;  // or ZeRO-1: each rank its slice
  std::unique_ptr<FullySharded> fsdp;     // or ZeRO-2 / ZeRO-3 / hybrid
  AdamW& adamw() { return fsdp ? fsdp->local() : sharded ? sharded->local() : *optim; }
  const AdamW& adamw() const { return fsdp ? fsdp->local() : sharded ? sharded->local() : *optim; }
  void step(double lr) { fsdp ? fsdp->step(lr) : sharded ? sharded->step(lr) : optim->step(lr); }
  void zero_grad() { fsdp ? fsdp->zero_grad() : sharded ? sharded->zero_grad() : optim->zero_grad(); }
  std::vector<torch::Tensor> params;      // the trainable parameters (unsharded and ZeRO-1)
  // train.fp32_grads: each bf16 parameter's gradient starts the step as fp32 zeros, and autograd
  // adds every micro batch's gradient into it in place (in fp32): summed in fp32, averaged over
  // the ranks in fp32, and used by AdamW (which computes in fp32) without a rounding.
  void fp32_gradients() {
    torch::NoGradGuard no_grad;
    for (auto& p : params)
      if (p.is_floating_point() && p.scalar_type() != torch::kFloat32 && !p.grad().defined())
        p.mutable_grad() = torch::zeros(p.sizes(), p.options().dtype(torch::kFloat32));
  }
  // Gradients of a step averaged over the ranks, then clipped: the global norm before clipping.
  double finish_gradients(double max_norm) {
    if (fsdp) return fsdp->clip_grad_norm(max_norm);
    // A trainable weight without a gradient this step (an expert no token was routed to) takes a
    // zero one, as it does when ranks reduce gradients and in ZeRO-2/3's flat buffers: one
    // process and any number of ranks update alike (Megatron-LM's convention; AdamW would skip it).
    {
      torch::NoGradGuard no_grad;
      for (auto& p : params)
        if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    }
    dist.average_gradients(params);
    return clip_grad_norm(params, max_norm);
  }
  // Bytes of parameters + gradients + optimizer state this rank holds now (unsharded and ZeRO-1).
  int64_t state_bytes() {
    int64_t bytes = 0;
    for (const auto& p : model->parameters()) {
      bytes += p.numel() * p.element_size();
      if (p.grad().defined()) bytes += p.grad().numel() * p.grad().element_size();
    }
    return bytes + adamw().state_bytes();
  }
  std::unique_ptr<PackedDataset> data;  // packed documents (pretraining, continued pretraining)
  std::unique_ptr<ChatDataset> chat;    // or chat / instruction examples (fine-tuning)
  std::vector<int64_t> buf;
  Guard guard;
  json history = json::array();  // held-out evaluations so far
  // Tokens the steps so far drew (metrics' "tokens"); -1: step x this run's batch (older checkpoints).
  int64_t tokens = -1;
  json applied_plan;             // the restart plan (LIBLLM_RESTART_PLAN's JSON) this branch applied (null: none)
  json applied_rollback;         // the last in-loop rollback's record (pending_path's JSON) it applied (null: none)
  int64_t accum = 1, global = 0, planned = 0;
  bool fp32_sums = false;  // bf16 gradients summed in fp32 (train.fp32_grads, when anything is summed)
  double flops_per_token = 0;
  std::string recipe_yaml, ckpt_root, sequence_path, events_path;
  std::string verified_data;  // data.verify's report, printed with the run's summary (rank 0)
  // An in-loop rollback's record, written before anything moves and removed once the checkpoint
  // it re-saves is whole: a job that dies in between resumes at its target and applies it.
  std::string pending_path;
  // A LoRA fine-tune: its base folder (absolute) and model_fingerprint(); checkpoints then hold
  // only the adapters.
  std::string lora_base, lora_base_fingerprint;
  std::ofstream sequence, events;

  bool main() const { return dist.is_main(); }

  void event(json e) {
    if (!main()) return;
    // A step's event carries its branch, as its metrics line does: a resume from an older
    // checkpoint moves an abandoned branch's events aside with its lines (truncate_log).
    if (e.contains("step") && !e.contains("branch")) e["branch"] = guard.rollbacks_total();
    e["time"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    append_log(events, events_path, e.dump());
  }

  std::string extra() const {
    json x = {{"eval_history", history}, {"guard", guard.state()}, {"tokens", tokens}};
    if (!applied_plan.is_null()) x["applied_plan"] = applied_plan;
    if (!applied_rollback.is_null()) x["applied_rollback"] = applied_rollback;
    return x.dump();
  }

  std::string cursor() const { return chat ? chat->cursor() : data->cursor(); }

  // The next micro batch of this rank: inputs (B, T), targets (B, T) (-100 = not a target),
  // documents (B, T) for packed chat rows (else undefined), padding (B, T) for padded chat rows
  // (ChatBatch::padding, else undefined), and the windows / examples used.
  void next_batch(int64_t B, torch::Tensor& x, torch::Tensor& y, torch::Tensor& docs, torch::Tensor& padding,
                  std::vector<WindowRef>& refs) {
    docs = torch::Tensor();
    padding = torch::Tensor();
    if (chat) {
      ChatBatch batch;
      chat->next(B, batch);
      x = batch.inputs;
      y = batch.targets;
      if (batch.documents.defined()) docs = batch.documents.to(device);
      if (batch.padding.defined()) padding = batch.padding.to(device);
      refs = std::move(batch.refs);
    } else {
      data->next(B, buf, refs);
      std::tie(x, y) = split_batch(buf, B, tc.seq_len);
      if (eos_id >= 0) docs = documents_after(x, eos_id).to(device);  // train.document_mask
    }
    x = x.to(device);
    y = y.to(device);
  }

  bool has_valid() const { return chat ? !chat->valid_examples().empty() : !recipe.data.valid.empty(); }

  std::string save(int64_t step) {
    TrainState st{step, cursor(), extra(), lora_base, lora_base_fingerprint};
    st.rank_rng = gather_rank_rng(dist);  // (collective) rank 0 writes every rank's generators
    // Every rank calls this; replicated, only rank 0 writes.
    if (fsdp) {
      // Collective: gathered and written one unit at a time (rank 0 never holds the whole model).
      return save_checkpoint_sharded(ckpt_root, fsdp->weight_stream(!lora_base.empty()), adamw(), st, recipe_yaml,
                                     recipe.tokenizer.path, dist,
                                     fsdp->shard_rank(), fsdp->shard_world(), fsdp->writes_shards());
    }
    if (sharded) {
      std::vector<std::pair<std::string, torch::Tensor>> weights;
      if (main())
        for (auto& p : model->named_parameters())
          weights.emplace_back(p.key(), p.value());  // (adapters only: kept there)
      return save_checkpoint_sharded(ckpt_root, weights, adamw(), st, recipe_yaml, recipe.tokenizer.path, dist);
    }
    if (!main()) return "";
    return save_checkpoint(ckpt_root, model, *optim, st, recipe_yaml, recipe.tokenizer.path);
  }

  // Checks, from trainer.json alone, that checkpoint `dir` can continue this run: called before
  // the model is built, so that a wrong base fails before minutes of loading it. Returns its base.
  LoraBaseRef check_resume(const std::string& dir) const {
    if (!fs::exists(dir)) {
      const auto steps = checkpoint_steps((fs::path(dir).parent_path()).string());
      std::string have;
      for (size_t i = steps.size() > 6 ? steps.size() - 6 : 0; i < steps.size(); ++i)
        have += (have.empty() ? "" : ", ") + checkpoint_name(steps[i]);
      throw Error(dir, "does not exist",
                  have.empty() ? "point checkpoint.resume at a step-N folder"
                               : "the newest checkpoints in " + fs::path(dir).parent_path().string() + " are " + have);
    }
    if (!fs::is_regular_file(fs::path(dir) / "trainer.json"))
      throw Error(dir, "not a libllm checkpoint (no trainer.json)", "point checkpoint.resume at a step-N folder");
    // Adapters only: they must belong to this run's base.
    LoraBaseRef ref;
    try {
      ref = checkpoint_lora_base(dir);
    } catch (const Error& e) {  // (a trainer.json that does not parse)
      throw damaged(dir, e);
    }
    if (!ref.path.empty() && lora_base.empty())
      throw Error(dir, "holds only LoRA adapters, and this run trains every weight",
                  "resume it with finetune.method: lora, or fine-tune it as finetune.base");
    if (!ref.path.empty() && !ref.fingerprint.empty() && ref.fingerprint != lora_base_fingerprint) {
      if (ref.path == lora_base) verify_model_files(lora_base);  // (damage is said as such)
      throw Error(dir, "its adapters were trained on the base " + ref.path + ", and this run's finetune.base " +
                           lora_base + " is " + (ref.path == lora_base ? "another model or revision now" : "another model"),
                  "set finetune.base to the base it was trained on");
    }
    return ref;
  }

  // `e`, an error reading checkpoint `dir`, with the hint to resume the checkpoint before it (the
  // damage may be this folder's alone), when dir is one of this run's and an earlier one exists.
  Error damaged(const std::string& dir, const Error& e) const {
    const fs::path from(dir);
    std::error_code ec;
    if (!fs::equivalent(from.parent_path(), ckpt_root, ec)) return e;
    int64_t before = -1;  // (names are zero-padded: their order is the steps')
    for (int64_t s : checkpoint_steps(ckpt_root))
      if (checkpoint_name(s) < from.filename().string()) before = s;
    if (before < 0) return e;
    return Error(e.where(), e.problem(),
                 e.hint() + (e.hint().empty() ? "" : "; or ") + "resume the checkpoint before it: checkpoint.resume=" +
                     (fs::path(ckpt_root) / checkpoint_name(before)).string());
  }

  // An error resuming that an earlier checkpoint of the run would give too (this run's data or
  // settings against the checkpoint's, another rank's failure): no hint to resume the one before it.
  struct Mismatch : Error {
    using Error::Error;
  };

  // Loads a checkpoint: model, optimizer, RNG, data cursor, guard state, eval history.
  TrainState load(const std::string& dir) {
    TrainState st;
    const LoraBaseRef ref = check_resume(dir);
    if (fsdp)  // (a collective: a rank's failure is every rank's)
      fsdp->load_weights(dir, ref.path.empty() ? FullySharded::Which::all : FullySharded::Which::trainable);
    // What each rank reads alone (a file damaged on one node's copy, say): every rank learns of a
    // failure here, before the collectives below would leave the others waiting.
    std::optional<Error> failed;
    try {
      st = fsdp ? load_checkpoint_state(dir, adamw(), fsdp->shard_rank())
                : load_checkpoint(dir, model, adamw(), dist.rank());
      if (dist.rank() > 0) restore_rank_rng(dir, dist.rank());  // (a checkpoint of fewer ranks: rank 0's)
    } catch (const Error& e) {
      failed = e;
    } catch (const std::exception& e) {
      failed = Error(dir, e.what(), "the checkpoint is corrupt");
    }
    double failures = 0;
    try {
      failures = dist.mean(failed ? 1.0 : 0.0);
    } catch (const Error& e) {  // (a peer died)
      if (failed) throw *failed;
      throw Mismatch(e.where(), e.problem(), e.hint());
    }
    if (failed) throw *failed;
    if (failures > 0) throw Mismatch(dir, "another rank could not read the checkpoint (its error names the file)");
    // (a bf16 run's masters resumed in fp32 set each rank's own elements only)
    if (fsdp) fsdp->share_weights();
    if (sharded) sharded->share_weights();
    // A weight, fp32 master or AdamW moment that is NaN or infinite, or a negative second moment (a
    // file damaged in place: its size and names intact) would only show as skipped steps or NaN
    // weights, while saves prune the good checkpoints. Every rank checks its own and all agree.
    const std::string bad = adamw().invalid_state();
    double all_valid = 0;
    try {
      all_valid = dist.mean(bad.empty() ? 1.0 : 0.0);
    } catch (const Error& e) {  // (a peer died while the weights were shared: its own error says why)
      throw Mismatch(e.where(), e.problem(), e.hint());
    }
    if (all_valid < 1.0)
      throw Error(dir,
                  bad.empty() ? std::string("another rank's share of the weights or optimizer state is invalid")
                              : "holds " + bad,
                  "the checkpoint is damaged");
    try {  // trainer.json's data cursor and extras: an error names that file
      if (chat) {
        chat->restore(st.data_cursor);
      } else {
        data->restore(st.data_cursor);
        // The plan ends where this run's remaining steps end: the cursor's global index plus
        // what they draw. (A resume on another world size without train.global_batch_tokens
        // changes the samples a step draws: steps * samples per step would put the end of the
        // plan, where deferred windows are served, before or after the run's last step.)
        const int64_t per_step = accum * recipe.train.micro_batch * dist.world_size();
        data->set_planned_samples(data->global_index() + std::max<int64_t>(0, recipe.train.steps - st.step) * per_step);
      }
      const json x = parse_extra(st.extra);
      history = extra_value(x, "eval_history", json::value_t::array, json::array());
      tokens = extra_value(x, "tokens", json::value_t::number_integer, int64_t{-1}).get<int64_t>();
      applied_plan = extra_value(x, "applied_plan", json::value_t::object, json());
      applied_rollback = extra_value(x, "applied_rollback", json::value_t::object, json());
      guard = Guard(recipe.guard);
      if (x.contains("guard")) {
        if (!x["guard"].is_string()) throw Error("guard state", "is not a string");
        guard.load_state(x["guard"].get<std::string>());
      }
    } catch (const Error& e) {
      // A cursor that does not fit this run's data or world (its hint says what to change; a
      // corrupt one's says so, or says nothing) fits no earlier checkpoint of the run either.
      const std::string where = (fs::path(dir) / "trainer.json").string() + ": " + e.where();
      if (!e.hint().empty() && e.hint().find("corrupt") == std::string::npos)
        throw Mismatch(where, e.problem(), e.hint());
      throw Error(where, e.problem(), e.hint());
    } catch (const std::exception& e) {  // (a value of the wrong JSON type)
      throw Error((fs::path(dir) / "trainer.json").string(), e.what(), "the checkpoint is corrupt");
    }
    return st;
  }

  // Continues from the loaded checkpoint of step `to` as if the steps (to, through] had not
  // happened: their data windows are moved to the end of the run (or dropped), the LR re-warms.
  // `live` is the data cursor when the rollback was decided (read_live()): the stream goes on from
  // there, so what an earlier rollback deferred or dropped stays so. The result is saved again as
  // the checkpoint of `to`, so a crash after this keeps the plan.
  // `saved` is the guard state stored in that checkpoint; the new branch is numbered at least
  // `branch_floor` (a restart plan's: above every branch the metrics hold). `resumed`: an in-loop
  // rollback that a dead process began, completed by its successor.
  void replan(int64_t to, int64_t through, double lr_factor, bool in_loop, const std::string& dir,
              const std::string& saved, const std::string& live, int64_t branch_floor = 0, bool resumed = false) {
    int64_t examples = 0;  // chat data is dropped (guard.defer: drop is required)
    try {
      if (chat) {
        chat->restore(live);
        examples = logged_examples(to, through);
      } else {
        data->roll_back(live, recipe.guard.defer == "end" ? rolled_back_windows(to, through)
                                                          : std::vector<std::vector<WindowRef>>{});
      }
    } catch (const Error& e) {
      if (e.where() != "data cursor") throw;
      throw Error(live_path() + ": " + e.where(), e.problem(), e.hint());
    }
    guard.rolled_back(saved, to, lr_factor, in_loop, branch_floor);
    save(to);
    dist.barrier();
    // The data sequence lists what the final model saw; the rolled-back steps' lines (the data
    // that spiked) move to rolled-back-logs/. Cut after the save: a job killed during it applies
    // this rollback again, and reads the rolled-back steps' windows again.
    json e = rollback_event(to, through, in_loop, dir);
    if (main()) {
      sequence.close();
      const std::string kept = archive_rolled_back(to, through, e["branch"].get<int64_t>());
      if (!kept.empty()) e["data_sequence"] = kept;
      truncate_log(sequence_path, to);
      open_log(sequence, sequence_path);
    }
    if (chat) e["examples"] = examples;  // "windows" counts rows (samples); packed rows hold several
    if (resumed) e["resumed"] = true;
    if (!in_loop) e["plan_attempt"] = applied_plan.value("attempt", int64_t{-1});  // (which plan)
    event(e);                            // (logged with the checkpoint that records it)
    if (main()) fs::remove(live_path());  // (the re-saved checkpoint has it)
    if (hooks.after_rollback) hooks.after_rollback(to, dir, model, adamw());
  }

  // Where the data cursor at a rollback or a guard stop is kept until a rollback applies it:
  // {"from_step": N, "data_cursor": ...}, written by rank 0 before anything moves.
  std::string live_path() const { return (fs::path(tc.run_dir) / "rollback-data.json").string(); }
  void write_live(int64_t from_step) const {
    if (main())
      detail::write_file_atomic(live_path(), json{{"from_step", from_step}, {"data_cursor", cursor()}}.dump() + "\n");
  }
  // The data cursor recorded at step `through` (rank 0 reads it; every rank learns it).
  std::string read_live(int64_t through) {
    std::string text;
    std::optional<Error> failure;
    if (main()) {
      try {
        text = read_live_file(through);
      } catch (const Error& e) {
        failure = e;
      }
    }
    const bool read = dist.from_main(failure ? 0 : 1) == 1;
    if (failure) throw *failure;
    if (!read) throw Error(live_path(), "rank 0 cannot read it", "see rank 0's error");
    return dist.from_main(text);
  }
  std::string read_live_file(int64_t through) const {
    const std::string path = live_path();
    std::ifstream in(path);
    if (!in)
      throw Error(path,
                  "missing: the data position of the stopped or interrupted job at step " + std::to_string(through) +
                      " is unknown",
                  "resume without the rollback: remove " + pending_path + " or the restart plan");
    json j;
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      throw Error(path, std::string("invalid JSON: ") + e.what(), "remove it, and the rollback record or restart plan");
    }
    if (!j.is_object() || !j.contains("data_cursor") || !j["data_cursor"].is_string() ||
        j.value("from_step", int64_t{-1}) != through)
      throw Error(path, "is not the data position at step " + std::to_string(through),
                  "remove it, and the rollback record or restart plan");
    return j["data_cursor"].get<std::string>();
  }

  // The windows every rank used in this branch's steps (to, through], from data_sequence.jsonl
  // (rank 0 reads it; every rank learns it): what a deferring rollback queues. Steps run with
  // another number of ranks are dealt out in their sample order (sample i to rank i % world); a
  // remainder that does not divide among the ranks is dropped, with a note.
  std::vector<std::vector<WindowRef>> rolled_back_windows(int64_t to, int64_t through) {
    const int64_t W = dist.world_size();
    std::vector<std::vector<WindowRef>> used(static_cast<size_t>(W));
    std::string problem;
    if (main()) {
      try {
        int64_t next = to + 1;
        std::vector<WindowRef> slots;  // in sample order
        const bool exists = detail::for_each_line(sequence_path, [&](const std::string& text) {
          const int64_t s = detail::int_field(text, "step", -1);
          if (s <= to || s > through) return;  // (parsed only in the span: the log may hold gigabytes)
          if (s != next) throw std::runtime_error(fmt::format("step {} follows step {}", s, next - 1));
          const json line = json::parse(text);
          const json& w = line.at("windows");  // per rank: [[set, window], ...]
          if (!w.is_array() || w.empty()) throw std::runtime_error(fmt::format("step {} lists no ranks", s));
          for (const auto& mine : w)
            if (!mine.is_array() || mine.size() != w[0].size())
              throw std::runtime_error(fmt::format("the ranks of step {} list different numbers of windows", s));
          for (size_t i = 0; i < w[0].size(); ++i)
            for (const auto& mine : w) slots.push_back({mine[i].at(0).get<int32_t>(), mine[i].at(1).get<int64_t>()});
          ++next;
        });
        if (!exists) throw std::runtime_error("cannot open it");
        if (next != through + 1) throw std::runtime_error(fmt::format("step {} is missing", next));
        const size_t dealt = slots.size() - slots.size() % static_cast<size_t>(W);
        for (size_t i = 0; i < dealt; ++i) used[i % static_cast<size_t>(W)].push_back(slots[i]);
        if (dealt < slots.size())
          fmt::print(
              "note: the rolled-back steps ran on another number of ranks: {} of their {} windows do not divide "
              "among {} ranks and are dropped, not deferred\n",
              slots.size() - dealt, slots.size(), W);
      } catch (const std::exception& e) {
        problem = e.what();
      }
    }
    const int64_t count = dist.from_main(problem.empty() ? static_cast<int64_t>(used[0].size()) : -1);
    if (count < 0)
      throw Error(sequence_path,
                  main() ? "cannot list the windows of the rolled-back steps " + std::to_string(to + 1) + ".." +
                               std::to_string(through) + ": " + problem
                         : "rank 0 cannot list the windows of the rolled-back steps",
                  "restore the file, or set guard.defer: drop");
    auto t = torch::zeros({W, count, 2}, torch::kInt64);  // (world, windows, [set, window])
    if (main()) {
      auto acc = t.accessor<int64_t, 3>();
      for (int64_t k = 0; k < W; ++k)
        for (int64_t i = 0; i < count; ++i) {
          const WindowRef& r = used[static_cast<size_t>(k)][static_cast<size_t>(i)];
          acc[k][i][0] = r.set;
          acc[k][i][1] = r.window;
        }
    }
    dist.sum(t);
    auto acc = t.accessor<int64_t, 3>();
    for (int64_t k = 0; k < W; ++k) {
      auto& mine = used[static_cast<size_t>(k)];
      mine.resize(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i)
        mine[static_cast<size_t>(i)] = {static_cast<int32_t>(acc[k][i][0]), acc[k][i][1]};
    }
    return used;
  }

  // Chat examples in this branch's steps (to, through], over all ranks (rank 0, for its event).
  int64_t logged_examples(int64_t to, int64_t through) const {
    int64_t n = 0;
    if (main())
      detail::for_each_line(sequence_path, [&](const std::string& text) {
        const int64_t s = detail::int_field(text, "step", -1);
        if (s <= to || s > through) return;
        try {
          const json line = json::parse(text);
          for (const auto& mine : line.at("windows")) n += static_cast<int64_t>(mine.size());
        } catch (const json::exception&) {  // (a count for the event only)
        }
      });
    return n;
  }

  // Copies the data_sequence lines of the rolled-back steps (to, through] (the data that spiked) to
  // rolled-back-logs/guard-data_sequence.jsonl, each with {"rollback": {"branch" (the one it
  // ended), "from_step", "to_step"}}; a line it holds already (a rollback that a resumed job
  // completes) is not added again. Returns that file's path when it holds this rollback's lines.
  // Rank 0, before the data sequence is cut.
  std::string archive_rolled_back(int64_t to, int64_t through, int64_t branch) const {
    const fs::path path = fs::path(tc.run_dir) / "rolled-back-logs" / "guard-data_sequence.jsonl";
    const json tag = {{"branch", branch}, {"from_step", through}, {"to_step", to}};
    const std::string marker = "\"rollback\":" + tag.dump();
    bool have = false;  // (a rollback's lines are written together: one of them means all)
    detail::for_each_line(path.string(),
                          [&](const std::string& line) { have = have || line.find(marker) != std::string::npos; });
    if (have) return path.string();
    // Streamed into a copy that replaces the file whole (a kill leaves the old one).
    fs::create_directories(path.parent_path());
    const std::string tmp = path.string() + ".tmp";
    bool any = false;
    {
      std::ofstream out(tmp, std::ios::binary);
      std::error_code ec;
      if (fs::file_size(path, ec) > 0 && !ec) out << std::ifstream(path, std::ios::binary).rdbuf();
      detail::for_each_line(sequence_path, [&](const std::string& text) {
        const int64_t s = detail::int_field(text, "step", -1);
        if (s <= to || s > through) return;
        json line = json::parse(text, nullptr, /*allow_exceptions=*/false);
        if (!line.is_object()) return;
        line["rollback"] = tag;
        out << line.dump() << "\n";
        any = true;
      });
      out.close();
      if (!out) throw Error(tmp, "cannot write the rolled-back steps' data sequence", "check the disk");
    }
    if (!any) return fs::remove(tmp), "";
    fs::rename(tmp, path);
    return path.string();
  }

  // Logs the rollback (in_loop) or restart plan from step `through` to `to` that a job which died
  // before logging it completed, unless events.jsonl has it (`plan_attempt`: the plan's "attempt";
  // -1 for a rollback; `data`: archive_rolled_back's file). Rank 0.
  void log_completed(int64_t to, int64_t through, bool in_loop, const std::string& dir, int64_t plan_attempt,
                     const std::string& data) {
    const std::string kind = in_loop ? "rollback" : "restart_plan";
    for (const auto& e : detail::read_jsonl((fs::path(tc.run_dir) / "events.jsonl").string(), false))
      if (e.value("event", "") == kind && e.value("step", int64_t{-1}) == through &&
          e.value("to_step", int64_t{-1}) == to && e.value("plan_attempt", int64_t{-1}) == plan_attempt)
        return;
    json e = rollback_event(to, through, in_loop, dir);  // (the resumed checkpoint's guard is the rolled-back one)
    if (!in_loop) e["plan_attempt"] = plan_attempt;
    if (!data.empty()) e["data_sequence"] = data;
    e["resumed"] = true;
    event(e);
  }

  // The event of a rollback (or a restart plan) from step `through` to checkpoint `dir` of step `to`.
  json rollback_event(int64_t to, int64_t through, bool in_loop, const std::string& dir) const {
    return {{"event", in_loop ? "rollback" : "restart_plan"},
            {"step", through},
            {"to_step", to},
            {"branch", guard.rollbacks_total() - 1},  // (the branch it ended: the guard has rolled back)
            {"windows", (through - to) * accum * tc.micro_batch * dist.world_size()},
            {"data", recipe.guard.defer == "end" ? "deferred" : "dropped"},
            {"lr_scale", guard.lr_scale()},
            {"checkpoint", dir}};
  }

  // The record of a rollback that a dead job began (pending_path), or null; an Error for a
  // damaged one.
  json read_pending() const {
    if (!fs::exists(pending_path)) return json();
    try {
      json p = json::parse(std::ifstream(pending_path));
      p.at("to_step").get<int64_t>(), p.at("from_step").get<int64_t>(), p.at("lr_factor").get<double>();
      p.at("guard").get<std::string>();  // (every value of the right type, before any is used)
      return p;
    } catch (const json::exception& e) {
      throw Error(pending_path, std::string("invalid rollback record: ") + e.what(),
                  "remove it to resume without completing the interrupted rollback");
    }
  }

  // The checkpoint of an interrupted rollback's target ("" if none applies): there, and not yet
  // saved again by the rollback, with every checkpoint after it from the rolled-back steps (the
  // job died while setting them aside, oldest first). Rank 0 decides; every rank learns it.
  std::string interrupted_rollback_target() {
    int64_t to = -1;
    if (main()) {
      json p;
      try {
        p = read_pending();
      } catch (const Error&) {
        // (a damaged record: every rank reports it when the checkpoint is loaded; none waits here)
      }
      const int64_t t = p.is_null() ? -1 : p.value("to_step", int64_t{-1});
      const auto steps = checkpoint_steps(ckpt_root);
      if (t >= 0 && std::find(steps.begin(), steps.end(), t) != steps.end() && steps.back() > t &&
          steps.back() <= p.value("from_step", int64_t{-1})) {
        const fs::path dir = fs::path(ckpt_root) / checkpoint_name(t);
        json x;
        try {
          x = parse_extra(json::parse(std::ifstream(dir / "trainer.json")).value("extra", "{}"));
        } catch (const std::exception&) {
          // (an unreadable checkpoint: resumed as usual, and reported there)
        }
        if (x.is_object() && x.value("applied_rollback", json()) != p) to = t;
      }
    }
    to = dist.from_main(to);
    return to < 0 ? "" : (fs::path(ckpt_root) / checkpoint_name(to)).string();
  }

  // The newest checkpoint at or before step `limit` ("" if none), and its step, as rank 0 sees
  // the folder (every rank then loads the same one).
  std::pair<std::string, int64_t> target_before(int64_t limit) {
    int64_t best = -1;
    for (int64_t s : checkpoint_steps(ckpt_root))
      if (s <= limit) best = s;
    best = dist.from_main(best);
    if (best < 0) return {"", -1};
    return {(fs::path(ckpt_root) / checkpoint_name(best)).string(), best};
  }

  // Mean loss of the fixed held-out windows (chat: per target token of the first held-out examples).
  // The batches are dealt out over the ranks (batch b to rank b % world) and the sums all-reduced;
  // every rank runs the same number of forwards (a rank left without a batch in the last round
  // runs the first one again, unweighted), since a ZeRO-3 forward gathers with all of them.
  double evaluate() {
    if (chat) return chat->evaluate(model, tc.micro_batch, tc.eval_batches * tc.micro_batch, &dist);
    DataConfig vc = recipe.data;
    vc.train = {recipe.data.valid};
    vc.weights.clear();
    PackedDataset valid(vc, tc.seq_len, 0, 1);  // (every rank reads every batch: the same windows at any world size)
    torch::NoGradGuard no_grad;
    model->eval();
    const int64_t world = dist.world_size(), rounds = (tc.eval_batches + world - 1) / world;
    double sum = 0;
    std::vector<int64_t> buf, first;
    std::vector<WindowRef> refs;
    for (int64_t b = 0; b < rounds * world; ++b) {
      const bool real = b < tc.eval_batches;
      if (real) valid.next(tc.micro_batch, buf, refs);
      if (b == 0) first = buf;
      if (b % world != dist.rank()) continue;
      detail::heartbeat("evaluating");
      auto [x, y] = split_batch(real ? buf : first, tc.micro_batch, tc.seq_len);
      auto docs = eos_id >= 0 ? documents_after(x, eos_id).to(device) : torch::Tensor();
      const double loss = model->forward_loss(x.to(device), y.to(device), docs).loss.item<double>();
      if (real) sum += loss;
    }
    model->train();
    auto total = torch::tensor({sum}, torch::kFloat64);
    dist.sum(total);
    return total.item<double>() / static_cast<double>(tc.eval_batches);
  }
};

bool contains(const std::vector<int64_t>& v, int64_t x) { return std::find(v.begin(), v.end(), x) != v.end(); }

// The ranks that read one copy of the shard sets: this rank's index among them, their number, and
// the number of such groups. A group is one machine (host name and boot id) and one copy (the
// device and inode of each set's meta.json): containers of one host with copies of their own are
// groups of their own. No launcher's variables are needed. Collective.
struct CopyGroup {
  int64_t index = 0, size = 1, groups = 1;
  std::string layout;  // every rank's group, in rank order (for the marker: another machine or copy differs)
};
CopyGroup copy_group(const std::vector<std::pair<std::string, ShardSet>>& sets, Distributed& dist) {
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  std::string id = host;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  id += "\n" + std::string(std::istreambuf_iterator<char>(boot), std::istreambuf_iterator<char>());
  for (const auto& [key, set] : sets) {
    struct stat st {};
    ::stat((fs::path(set.info().dir) / "meta.json").c_str(), &st);
    id += fmt::format("\n{} {}", static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino));
  }
  const int64_t mine = static_cast<int64_t>(detail::Xxh64().update(id.data(), id.size()).digest() >> 1);
  auto all = torch::zeros({dist.world_size()}, torch::kInt64);
  all[dist.rank()] = mine;
  dist.sum(all);  // (each rank fills its own slot)
  const std::vector<int64_t> ids(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + dist.world_size());
  CopyGroup g;
  g.index = std::count(ids.begin(), ids.begin() + dist.rank(), mine);
  g.size = std::count(ids.begin(), ids.end(), mine);
  g.groups = static_cast<int64_t>(std::set<int64_t>(ids.begin(), ids.end()).size());
  for (int64_t id : ids) g.layout += std::to_string(id) + " ";
  return g;
}

// What data.verify checked: the mode, the ranks' machines and copies, and each set's folder and
// meta.json (its checksums), for the marker a supervisor's restart compares with.
std::string verified_identity(const std::vector<std::pair<std::string, ShardSet>>& sets, const std::string& mode,
                              const std::string& layout) {
  std::string text = mode + "\n" + layout;
  for (const auto& [key, set] : sets) {
    std::error_code ec;
    text += "\n" + fs::weakly_canonical(set.info().dir, ec).string() + "\n";
    std::ifstream meta(fs::path(set.info().dir) / "meta.json", std::ios::binary);
    text += std::string(std::istreambuf_iterator<char>(meta), std::istreambuf_iterator<char>());
  }
  return sha256_hex(text);
}

// data.verify: every shard file against the checksum llm-data recorded (damage since, by a disk or
// a copy to the machines, would train on wrong tokens in silence), the files divided over the ranks
// that read one copy ("node") or over all ranks ("shared"); a damaged file stops every rank. A
// supervisor's restart skips it where the marker in the run folder says the job's earlier attempt
// checked these sets on these machines and copies (a first attempt removes an earlier job's marker,
// and one killed while checking left none). Returns the lines to print on rank 0 ("" elsewhere).
std::string verify_shards(const std::vector<std::pair<std::string, ShardSet>>& sets, const std::string& mode,
                          const std::string& run_dir, bool restart, Distributed& dist) {
  if (sets.empty()) return "";
  const fs::path marker = fs::path(run_dir) / ".data-verified";
  const CopyGroup copies = copy_group(sets, dist);
  const std::string identity = dist.is_main() ? verified_identity(sets, mode, copies.layout) : "";
  if (restart) {
    std::string was;
    if (dist.is_main()) std::getline(std::ifstream(marker), was);
    if (dist.from_main(static_cast<int64_t>(dist.is_main() && was == identity)) == 1)
      return dist.is_main() ? "data: checked by this job's earlier attempt (data.verify)\n" : "";
  }
  const auto start = std::chrono::steady_clock::now();
  const CopyGroup g = mode == "shared" ? CopyGroup{dist.rank(), dist.world_size(), 1, ""} : copies;
  int64_t bytes = 0;
  const int64_t failures = dist.run_agreed(
      [&] {
        int64_t offset = 0;  // (shards numbered across the sets, so that one-shard sets spread too)
        for (const auto& [key, set] : sets) {
          try {
            bytes += set.verify(g.index, g.size, offset);
          } catch (const Error& e) {
            throw Error(key + ": " + e.where(), e.problem(), e.hint());
          }
          offset += set.n_shards();
        }
      },
      "data.verify");
  if (failures > 0)
    throw Error("data.verify",
                fmt::format("{} other rank(s) found a damaged shard file (their errors name it)", failures),
                "see those ranks' errors");
  const double total = dist.mean(static_cast<double>(bytes)) * dist.world_size() / g.groups;  // (one copy's)
  if (!dist.is_main()) return "";
  detail::write_file_atomic(marker.string(), identity + "\n");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::string out;
  if (total > 0)
    out = fmt::format(
        "data: {} of shards match the checksums llm-data recorded{} ({:.2f} s; data.verify: {}, {})\n",
        total >= 1e9 ? fmt::format("{:.2f} GB", total / 1e9) : fmt::format("{:.2f} MB", total / 1e6),
        g.groups > 1 ? fmt::format(" in each of {} copies", g.groups) : "", seconds, mode,
        mode == "shared" ? fmt::format("{} ranks", dist.world_size()) : fmt::format("{} rank(s) a copy", g.size));
  for (const auto& [key, set] : sets)
    if (!set.has_checksums())
      out += fmt::format("note: {} {} records no checksums (made by an older llm-data): not verified\n", key,
                         set.info().dir);
  return out;
}

// The loop behind pretrain() and finetune(); `base` is the model to start from (fine-tuning) or null.
double run_training(const Recipe& recipe, const TrainHooks& hooks, Pretrained* base) {
  detail::heartbeat("starting");  // (building, reading and resuming beat as they go)
  const TrainConfig& tc = recipe.train;
  const ModelConfig& mc = recipe.model;
  const GuardConfig& gc = recipe.guard;
  if (tc.seq_len > mc.max_seq_len)
    throw Error("train.seq_len", fmt::format("{} exceeds model.max_seq_len {}", tc.seq_len, mc.max_seq_len),
                "lower train.seq_len (rotary positions past max_seq_len were never trained)");
  const bool chat_data = !recipe.chat.files.empty();
  if (chat_data && !recipe.data.train.empty())
    throw Error("chat.files", "and data.train are both set", "train on chat examples or on packed documents, not both");
  if (!chat_data && recipe.data.train.empty())
    throw Error("data.train", "no training shard folders",
                base ? "list llm-data's output, or chat JSONL files in chat.files" : "run llm-data first and list its output");
  if (chat_data && gc.enabled && gc.defer == "end")
    throw Error("guard.defer", "'end' needs packed data; chat examples cannot be deferred", "set guard.defer: drop");
  if (gc.enabled && recipe.checkpoint.keep_last < 2)
    throw Error("checkpoint.keep_last", "must be >= 2 with guard.enabled",
                "the newest checkpoint may already hold a spike's weights; the guard rolls back past it");
  if (tc.threads > 0) at::set_num_threads(static_cast<int>(tc.threads));
  else compat::set_default_num_threads();

  Run run(recipe, tc, hooks);
  Distributed& dist = run.dist;
  const bool main_rank = dist.is_main();
  const int64_t per_pass = tc.micro_batch * tc.seq_len * dist.world_size();
  const int64_t global = tc.global_batch_tokens > 0 ? tc.global_batch_tokens : per_pass;
  if (global % per_pass != 0)
    throw Error("train.global_batch_tokens",
                fmt::format("{} is not a multiple of micro_batch * seq_len * world_size = {}", global, per_pass));
  run.accum = global / per_pass;
  // train.fp32_grads where something is summed: one micro batch on one process has a single bf16
  // gradient (replicated and ZeRO-1: fp32_gradients(); ZeRO-2/3: fp32 buffers and shards).
  run.fp32_sums = tc.fp32_grads && (run.accum > 1 || dist.world_size() > 1);
  run.global = global;
  run.planned = tc.steps * run.accum * tc.micro_batch * dist.world_size();

  // Tokenizer and shards must agree; the tokenizer must fit the model.
  const Tokenizer tok = Tokenizer::load(recipe.tokenizer.path);
  tok.check_fits(mc, "model.vocab_size");
  if (base && base->format == "hf" && main_rank) {  // (a chat model's <|im_start|>, say)
    for (const auto& setting : read_hf_config(base->dir).ignored)
      fmt::print("note: the base's config.json sets {}, which libllm does not apply: fine-tuning runs without it\n",
                 setting);
    const auto added = added_tokens(base->dir, tok);
    if (!added.empty()) {
      std::string list;
      for (size_t i = 0; i < added.size() && i < 8; ++i)
        list += fmt::format("{}{} = {}", i ? ", " : "", added[i].second, added[i].first);
      fmt::print(
          "note: the base's tokenizer adds {} token(s) that {} lacks ({}{}); libllm tokenizes with {} alone, "
          "so text holding them trains as ordinary pieces (the export's tokenizer reads them the same way)\n",
          added.size(), recipe.tokenizer.path, list, added.size() > 8 ? ", ..." : "", recipe.tokenizer.path);
    }
  }
  // (a shard set's error names the recipe key too: `data.train: shards/x: ... not found`)
  const auto open = [](const char* key, const std::string& dir) {
    try {
      return ShardSet::open(dir);
    } catch (const Error& e) {
      throw Error(std::string(key) + ": " + e.where(), e.problem(), e.hint());
    }
  };
  std::optional<ShardSetInfo> first_train;  // (data.train[0]'s, for the held-out set's check)
  std::vector<std::pair<std::string, ShardSet>> shard_sets;  // (recipe key, set): for data.verify
  const auto add_set = [&](const char* key, const ShardSet& set) {  // (a set named twice is read once)
    std::error_code ec;
    for (const auto& [k, s] : shard_sets)
      if (fs::equivalent(s.info().dir, set.info().dir, ec)) return;
    shard_sets.emplace_back(key, set);
  };
  for (const auto& dir : recipe.data.train) {
    const ShardSet set = open("data.train", dir);
    check_tokenizer(set, tok);
    if (!first_train) first_train = set.info();
    add_set("data.train", set);
  }
  if (!recipe.data.valid.empty()) {
    const ShardSet valid = open("data.valid", recipe.data.valid);
    check_tokenizer(valid, tok);
    add_set("data.valid", valid);
    if (first_train) {  // held-out windows like the training ones
      if (valid.info().bos_id != first_train->bos_id)
        throw Error("data.valid", recipe.data.valid + " " + bos_mismatch(valid.info(), *first_train),
                    "re-run llm-data for one of them with the other's data_prep.bos");
    }
    // (found now, not at the first evaluation, after the first eval_every steps)
    if (tc.eval_every > 0 && valid.n_tokens() < tc.seq_len + 1)
      throw Error("data.valid",
                  recipe.data.valid + " holds " + std::to_string(valid.n_tokens()) +
                      " tokens, less than one window of train.seq_len + 1 = " + std::to_string(tc.seq_len + 1),
                  "hold out more documents (a lower data_prep.valid_every), or set train.eval_every: 0");
  }
  if (tc.document_mask && !chat_data) {
    if (tok.eos_id() < 0)
      throw Error("train.document_mask", "the tokenizer " + recipe.tokenizer.path + " has no EOS token to end documents",
                  "set train.document_mask: false");
    run.eos_id = tok.eos_id();
  }

  // The checkpoint to resume from is chosen, and checked, before the model is built (a 65B base
  // takes minutes to read). A supervisor's restart (LIBLLM_RESTART > 0) always continues from
  // the newest checkpoint.
  if (base && recipe.finetune.method == "lora") {
    run.lora_base = fs::canonical(base->dir).string();
    run.lora_base_fingerprint = model_fingerprint(base->dir);
  }
  run.ckpt_root = (fs::path(tc.run_dir) / "checkpoints").string();
  run.pending_path = (fs::path(tc.run_dir) / "rollback-pending.json").string();
  if (base) {  // a base among this run's checkpoints would be pruned or moved aside under it
    const fs::path rel = fs::weakly_canonical(base->dir).lexically_relative(fs::weakly_canonical(run.ckpt_root));
    if (!rel.empty() && *rel.begin() != "..")
      throw Error("finetune.base",
                  base->dir + " lies in this run's checkpoints folder " + run.ckpt_root +
                      ", where its checkpoints are pruned and set aside",
                  "give the fine-tune its own train.run_dir");
  }
  {
    // The run writes checkpoints and logs into its folder: never inside the base model's folder or
    // a folder of the documents (whose next llm-data would read the logs as text).
    const fs::path run_dir = fs::weakly_canonical(tc.run_dir);
    auto inside = [&](const std::string& folder) {
      std::error_code ec;
      if (!fs::is_directory(folder, ec)) return false;
      const fs::path rel = run_dir.lexically_relative(fs::weakly_canonical(folder));
      return !rel.empty() && *rel.begin() != "..";
    };
    const std::string own = "give the run a folder of its own (train.run_dir)";
    if (base && inside(base->dir))
      throw Error("train.run_dir", tc.run_dir + " lies in the base model's folder " + base->dir + " (finetune.base)",
                  own);
    for (const auto& [key, folders] :
         {std::pair{"data_prep.inputs", &recipe.data_prep.inputs}, std::pair{"chat.files", &recipe.chat.files}})
      for (const std::string& folder : *folders)
        if (inside(folder))
          throw Error("train.run_dir", tc.run_dir + " lies in the documents folder " + folder + " (" + key + ")", own);
  }
  {
    // One job per run folder: a second one would resume the first's checkpoints and interleave
    // their logs. And every rank on one resolved recipe (a recipe edited between launching the
    // ranks trained each rank with its own).
    std::string problem;
    if (main_rank) problem = run.lock_run_dir();
    if (!(problem = run.dist.from_main(problem)).empty())
      throw Error("train.run_dir", tc.run_dir + ": " + problem,
                  "give this run a folder of its own that it can write, or wait for the other job to end");
    const std::string mine = recipe.to_yaml();
    auto differs = torch::full({1}, run.dist.from_main(mine) == mine ? 0 : 1, torch::kInt64);
    run.dist.sum(differs);
    if (const int64_t n = differs.item<int64_t>(); n > 0)
      throw Error("recipe",
                  fmt::format("{} of the {} ranks resolved another recipe than rank 0", n, run.dist.world_size()),
                  "launch every rank with the same recipe file and --set options");
  }
  if (main_rank)  // a kill during a re-save on a filesystem without an atomic exchange
    for (int64_t s : recover_checkpoint_swaps(run.ckpt_root))
      fmt::print("note: restored {} (its re-save was interrupted)\n",
                 (fs::path(run.ckpt_root) / checkpoint_name(s)).string());
  dist.barrier();
  // (rank 0's: ranks of a replaced machine, or under a supervisor each, could disagree)
  const int64_t restart = dist.from_main(env_int("LIBLLM_RESTART", 0));
  if (restart == 0 && main_rank) {  // (a marker of an earlier job in this folder vouches for nothing now)
    std::error_code ec;
    fs::remove(fs::path(tc.run_dir) / ".data-verified", ec);
  }
  if (recipe.data.verify != "none")  // (before the model is built)
    run.verified_data = verify_shards(shard_sets, recipe.data.verify, tc.run_dir, restart > 0, dist);
  shard_sets.clear();                                                // (their mappings)
  const bool supervised = std::getenv("LIBLLM_RESTART") != nullptr;  // under llm-spike supervise
  std::string resume_from;
  if (recipe.checkpoint.resume == "auto" || restart > 0) {
    // Rank 0 picks the newest, and every rank takes its pick: ranks that list the folder a moment
    // apart (a save landing between) or through a lagging view of a shared filesystem must not
    // resume different steps.
    int64_t newest = -1;  // none
    if (main_rank)
      if (const auto steps = checkpoint_steps(run.ckpt_root); !steps.empty()) newest = steps.back();
    if (const int64_t step = dist.from_main(newest); step >= 0)
      resume_from = (fs::path(run.ckpt_root) / checkpoint_name(step)).string();
    // A rollback that a dead job began resumes at its target, also when the job died before
    // every checkpoint after it was set aside.
    if (const std::string target = run.interrupted_rollback_target(); !target.empty()) resume_from = target;
  } else if (recipe.checkpoint.resume != "none")
    resume_from = recipe.checkpoint.resume;
  if (!resume_from.empty()) run.check_resume(resume_from);

  torch::manual_seed(static_cast<uint64_t>(tc.seed));
  const torch::Dtype dtype = tc.dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  const bool fully_sharded = tc.sharding == "zero2" || tc.sharding == "zero3" || tc.sharding == "hybrid";
  // ZeRO-2/3 build the model deferred: the engine computes (stage 3: only this rank's part of)
  // the initial weights, or reads them from the base's file, so no rank holds the whole model.
  // With LoRA, the frozen base is sharded the same way and the adapters (added to the deferred
  // model, from the same seed as below) train as shards of their own. A LoRA checkpoint as the
  // base has its adapters merged into each weight as it is read.
  const bool base_sharded = base && fully_sharded;
  if (base_sharded) {
    run.model = Transformer(base->config, TransformerImpl::Deferred{dtype});
    torch::manual_seed(static_cast<uint64_t>(tc.seed));
    if (recipe.finetune.method == "lora") apply_lora(run.model, recipe.lora);
  } else if (base) {
    load_pretrained_merged(*base, dtype);  // (a LoRA base: its adapters folded in, in fp32)
    run.model = base->model;
    torch::manual_seed(static_cast<uint64_t>(tc.seed));
    if (recipe.finetune.method == "lora") apply_lora(run.model, recipe.lora);
  } else if (fully_sharded) {
    run.model = Transformer(mc, TransformerImpl::Deferred{dtype});
  } else {
    run.model = Transformer(mc);
    if (tc.dtype == "bf16") run.model->to(torch::kBFloat16);
  }
  if ((tc.sharding == "zero3" || tc.sharding == "hybrid") && !tc.activation_checkpointing)
    throw Error("train.activation_checkpointing", "must be true with train.sharding " + tc.sharding,
                "ZeRO-3 gathers a block's weights again for its backward, which recomputes the block");
  run.model->set_activation_checkpointing(tc.activation_checkpointing);
  run.model->set_fused_loss(tc.fused_loss, 0, tc.fp32_grads);  // the head's gradient summed over chunks
  const ParamSummary ps = summarize_parameters(run.model);  // before sharding empties the parameters
  if (fully_sharded) {
    int64_t group = dist.world_size();
    if (tc.sharding == "hybrid" && tc.shard_group > 0) {
      group = tc.shard_group;
    } else if (tc.sharding == "hybrid") {  // one node: torchrun's LOCAL_WORLD_SIZE, else Slurm's tasks per node
      // (Slurm's only when Slurm made the world: ranks started with WORLD_SIZE inside an
      // allocation are not its tasks. The step's tasks per node, "8" or "8(x4)" for 4 nodes of 8;
      // a mix of sizes, "8,4", is no group.)
      const char* slurm = std::getenv("WORLD_SIZE") ? nullptr : std::getenv("SLURM_STEP_TASKS_PER_NODE");
      if (!slurm && !std::getenv("WORLD_SIZE")) slurm = std::getenv("SLURM_TASKS_PER_NODE");
      char* rest = nullptr;
      const int64_t per_node = slurm ? std::strtoll(slurm, &rest, 10) : 0;
      const bool uniform = rest && (*rest == '\0' || (*rest == '(' && !std::strchr(rest, ',')));
      group = env_int("LOCAL_WORLD_SIZE", per_node > 0 && uniform ? per_node : group);
    } else if (tc.shard_group > 0 && tc.shard_group != group)
      throw Error("train.shard_group", "is for train.sharding hybrid", "set train.sharding: hybrid, or remove shard_group");
    // Moves the weights to the device, sharded; a base's weights are read, not initialised first.
    run.fsdp = std::make_unique<FullySharded>(run.model, tc.sharding == "zero2" ? 2 : 3, group, recipe.optim, dist,
                                              run.device, /*init_deferred=*/!base_sharded, run.fp32_sums);
    if (base_sharded)  // each rank reads its own elements
      run.fsdp->load_weights(*base,
                             recipe.finetune.method == "lora" ? FullySharded::Which::frozen : FullySharded::Which::all);
  } else {
    run.model->to(run.device);
    if (tc.sharding == "zero1") run.sharded = std::make_unique<ShardedAdamW>(trainable_parameters(run.model), recipe.optim, dist);
    else run.optim = std::make_unique<AdamW>(trainable_parameters(run.model), recipe.optim);
    for (auto& [name, p] : trainable_parameters(run.model)) run.params.push_back(p);
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double built_rss_mib = usage.ru_maxrss / 1024.0;  // host memory to build (and shard) the model
  if (chat_data) {
    run.chat = std::make_unique<ChatDataset>(recipe.chat, tok, tc.seq_len, static_cast<uint64_t>(recipe.data.seed),
                                             dist.rank(), dist.world_size());
  } else {
    run.data = std::make_unique<PackedDataset>(recipe.data, tc.seq_len, dist.rank(), dist.world_size());
    run.data->set_planned_samples(run.planned);
  }

  const ParamCount pc = count_parameters(mc);
  // Training FLOPs per token: 6 N (non-embedding weights, forward + backward) + 12 L H Q T (attention);
  // with frozen weights (LoRA) their weight gradients are not computed: 4 N.
  const double per_weight = ps.trainable < ps.total ? 4.0 : 6.0;
  run.flops_per_token = per_weight * (pc.active - pc.embedding) + 12.0 * mc.n_layers * mc.n_heads * mc.hdim() * tc.seq_len;

  run.recipe_yaml = recipe.to_yaml();
  const fs::path run_dir = tc.run_dir;
  if (main_rank) {
    fs::create_directories(run_dir);
    fmt::print("resolved recipe:\n{}\n", run.recipe_yaml);
    fmt::print("model: {:.2f} M parameters | {} steps x {} tokens ({} x {} x {} accumulation x {} ranks) | {} | {}\n",
               pc.total / 1e6, tc.steps, global, tc.micro_batch, tc.seq_len, run.accum, dist.world_size(),
               run.cuda ? fmt::format("{} ({})", run.device.str(), compat::cuda_device_name(run.device.index()))
                        : fmt::format("cpu, {} threads", at::get_num_threads()),
               dist.describe());
    fmt::print("host memory: peak {:.0f} MiB on rank 0 once the model was built{}\n", built_rss_mib,
               !fully_sharded ? "" : tc.sharding == "zero2" ? " (ZeRO-2: built one unit at a time)"
                                                             : " (ZeRO-3: each rank initialised or read only its own shards)");
    fmt::print("{}", run.verified_data);
    if (run.sharded)
      fmt::print("sharding zero1: rank 0 holds {:.1f} MiB of AdamW state, {:.1f}% of the unsharded {:.1f} MiB\n",
                 run.sharded->state_bytes() / 1048576.0, 100.0 * run.sharded->state_bytes() / run.sharded->unsharded_state_bytes(),
                 run.sharded->unsharded_state_bytes() / 1048576.0);
    if (run.fsdp)
      fmt::print("sharding {}: weights{} divided over shard groups of {} ranks{}\n", tc.sharding,
                 run.fsdp->stage() == 3 ? ", gradients and AdamW state" : " replicated; gradients and AdamW state",
                 run.fsdp->shard_world(),
                 run.fsdp->shard_world() < dist.world_size()
                     ? fmt::format(", {} replicas", dist.world_size() / run.fsdp->shard_world()) : "");
    if (base)
      fmt::print("fine-tuning {} ({}), method {}: {} of {} parameters train ({:.3f}%)\n", base->dir, base->format,
                 recipe.finetune.method, ps.trainable, ps.total, 100.0 * ps.trainable / ps.total);
    if (run.chat) {
      const ChatStats& c = run.chat->stats();
      fmt::print("chat data: {} lines, {} examples: {} train, {} held out | {} truncated, {} dropped as too long, {} "
                 "dropped without answer tokens, {} malformed lines skipped | {} tokens, {} targets ({:.1f}%)\n",
                 c.lines, c.examples, c.train, c.valid, c.truncated, c.dropped_long, c.dropped_empty, c.malformed,
                 c.tokens, c.target_tokens, 100.0 * c.target_tokens / std::max<int64_t>(1, c.tokens));
      for (const auto& m : c.malformed_samples) fmt::print("  skipped: {}\n", m);
      if (c.packed_rows > 0)
        fmt::print("chat.packed: an epoch's {} examples fill {} rows of {} positions ({:.1f}% tokens, the rest padding; {})\n",
                   c.train, c.packed_rows, tc.seq_len, 100.0 * c.packed_fill,
                   recipe.chat.packing == "best_fit" ? fmt::format("best_fit over windows of {} examples", recipe.chat.pack_window)
                                                : "greedy");
    }
    // Settings under which a run does not do what its recipe seems to say (pretraining defaults
    // left in a short fine-tune, most often).
    if (recipe.schedule.warmup_steps > tc.steps)
      fmt::print(
          "note: schedule.warmup_steps ({}) > train.steps ({}): the learning rate is still warming up at the "
          "last step ({:.1f}% of optim.lr)\n",
          recipe.schedule.warmup_steps, tc.steps, 100 * lr_factor(recipe.schedule, tc.steps - 1, tc.steps));
    if (tc.eval_every > 0 && !run.has_valid())
      fmt::print("note: train.eval_every is {}, but there is no held-out data ({}): nothing is evaluated\n",
                 tc.eval_every, run.chat ? "chat.valid_every" : "data.valid");
    if (tc.eval_every == 0 && run.has_valid())
      fmt::print("note: train.eval_every is 0: {}\n",
                 run.chat ? fmt::format("the {} examples chat.valid_every holds out are neither trained on nor "
                                        "evaluated (set train.eval_every, or chat.valid_every: 0 to train on them)",
                                        run.chat->stats().valid)
                          : "data.valid is never evaluated (set train.eval_every)");
    // Loss-spike guard settings that cannot act as they read.
    const GuardConfig& g = recipe.guard;
    std::vector<int64_t> injected = g.inject_noise_steps;
    injected.insert(injected.end(), g.inject_lr_steps.begin(), g.inject_lr_steps.end());
    if (!injected.empty() && !g.enabled)
      fmt::print(
          "warning: guard.inject_noise_steps / inject_lr_steps corrupt steps {} on purpose, and guard.enabled is "
          "false: nothing undoes them (a demo of the guard with it switched off)\n",
          fmt::join(injected, ", "));
    for (const int64_t s : injected)
      if (s > tc.steps) {
        fmt::print("note: guard injection step {} is past train.steps ({}): it never happens\n", s, tc.steps);
        break;
      }
    if (g.enabled && g.loss_z == 0 && g.grad_z == 0)
      fmt::print("note: guard.loss_z and guard.grad_z are both 0: the guard only skips non-finite steps\n");
    if (g.enabled && recipe.checkpoint.every > 0 &&
        run.guard.lookback() / recipe.checkpoint.every + 1 > recipe.checkpoint.keep_last)
      fmt::print(
          "note: with the loss-spike guard on, the checkpoints of the last {} steps (the furthest a rollback "
          "goes back) are kept, about {} at checkpoint.every {}, more than checkpoint.keep_last ({})\n",
          run.guard.lookback(), run.guard.lookback() / recipe.checkpoint.every + 1, recipe.checkpoint.every,
          recipe.checkpoint.keep_last);
    if (g.enabled && g.max_skips > g.skip_window)
      fmt::print("note: guard.max_skips ({}) > guard.skip_window ({}): skips never add up to a rollback\n", g.max_skips,
                 g.skip_window);
  }

  // Resume (from the checkpoint chosen above).
  TrainState state;
  std::vector<std::string> resume_changes;  // recipe keys changed since the resumed checkpoint
  std::string heldout_note;                 // the held-out set changed with them
  std::optional<Recipe> resumed_recipe;     // the checkpoint's recipe (when it parses)
  if (!resume_from.empty()) {
    // Recipe keys changed since the checkpoint was written, loudly: a new train.steps stretches
    // the schedule, a new data mixture changes the data order from here on. What the saved
    // adapters mean (their scale alpha / rank, their layers, the method) cannot change.
    if (const fs::path saved = fs::path(resume_from) / "recipe.yaml"; fs::exists(saved)) {
      std::ifstream in(saved);
      std::stringstream text;
      text << in.rdbuf();
      std::vector<std::string> changed;
      try {
        for (const auto& d : recipe_differences(text.str(), run.recipe_yaml))
          if (d.rfind("checkpoint.resume:", 0) != 0 && d.rfind("data.verify:", 0) != 0) changed.push_back(d);
      } catch (const std::exception& e) {
        changed.push_back(std::string("(the checkpoint's recipe.yaml does not parse: ") + e.what() + ")");
      }
      // The saved recipe's adapter settings, compared as values (targets as a set).
      std::optional<Recipe> before;
      try {
        before = Recipe::parse(text.str(), saved.string());
      } catch (const std::exception&) {  // (listed as a change above)
      }
      if (before && recipe.finetune.method == "lora" && before->finetune.method == "lora") {
        auto set_of = [](std::vector<std::string> v) {
          std::sort(v.begin(), v.end());
          return v;
        };
        const LoraConfig& was = before->lora;
        const LoraConfig& now = recipe.lora;
        std::string what;
        if (was.alpha != now.alpha) what = fmt::format("lora.alpha {} (now {})", was.alpha, now.alpha);
        if (was.rank != now.rank) what = fmt::format("lora.rank {} (now {})", was.rank, now.rank);
        if (set_of(was.targets) != set_of(now.targets))
          what =
              fmt::format("lora.targets [{}] (now [{}])", fmt::join(was.targets, ", "), fmt::join(now.targets, ", "));
        if (!what.empty())
          throw Error(saved.string(), "the resumed run trained its adapters with " + what,
                      "keep the checkpoint's value, or start a new run (another train.run_dir, or "
                      "checkpoint.resume: none)");
      }
      if (before && before->finetune.method != recipe.finetune.method)
        throw Error(saved.string(),
                    "the resumed run trained with finetune.method " + before->finetune.method + " (now " +
                        recipe.finetune.method + ")",
                    "keep the checkpoint's method, or start a new run (checkpoint.resume: none)");
      if (main_rank && !changed.empty()) {
        fmt::print("note: the recipe differs from the one {} was trained with:\n", resume_from);
        for (const auto& d : changed) fmt::print("  {}\n", d);
      }
      // The held-out loss is over eval_batches x micro_batch windows (chat: examples, as many as
      // the held-out split has) of seq_len: another count is another held-out set, and the
      // earlier evaluations (printed after the load, if there were any) do not compare.
      if (main_rank && before && tc.eval_every > 0 && run.has_valid()) {
        const TrainConfig& was = before->train;
        int64_t then = was.eval_batches * was.micro_batch, now = tc.eval_batches * tc.micro_batch;
        bool other = false;
        if (run.chat) {
          const int64_t held = static_cast<int64_t>(run.chat->valid_examples().size());
          then = std::min(then, held), now = std::min(now, held);
          other = before->chat.files != recipe.chat.files || before->chat.valid_every != recipe.chat.valid_every;
        } else {
          other = was.seq_len != tc.seq_len || before->data.valid != recipe.data.valid;
        }
        if (other || then != now)
          heldout_note += fmt::format(
              "note: the held-out loss is now the mean over {} {}{} (eval_batches x micro_batch), and was over {}{}{}: "
              "the evaluations before this resume are of other held-out data\n",
              now, run.chat ? "examples" : "windows", run.chat ? "" : fmt::format(" of {} tokens", tc.seq_len), then,
              run.chat ? "" : fmt::format(" of {}", was.seq_len), other ? " of another held-out set" : "");
      }
      resume_changes = changed;
      if (before) resumed_recipe = *before;
    }
    try {
      state = run.load(resume_from);
    } catch (const Run::Mismatch& e) {
      throw Error(e.where(), e.problem(), e.hint());
    } catch (const Error& e) {  // (a damaged checkpoint: the one before it may be whole)
      throw run.damaged(resume_from, e);
    }
    if (main_rank) fmt::print("resumed from {} (step {})\n", resume_from, state.step);
    if (main_rank && !run.history.empty()) fmt::print("{}", heldout_note);
    // A schedule stretched or cut (train.steps), or another LR or schedule: the next step's LR
    // against the last one's, when they differ by more than 1.5x (a jump that can spike the loss).
    if (main_rank && resumed_recipe && state.step > 0 && state.step < tc.steps) {
      const Recipe& was = *resumed_recipe;
      const int64_t last = state.step - 1;
      const double then = was.optim.lr * lr_factor(was.schedule, last, std::max(was.train.steps, state.step));
      const double next = recipe.optim.lr * lr_factor(recipe.schedule, state.step, tc.steps);
      if (then > 0 && (next > 1.5 * then || next < then / 1.5))
        fmt::print(
            "note: the learning rate goes from {:.3g} at step {} (the checkpoint's recipe) to {:.3g} at step {}: "
            "the changed {} move{} the schedule (schedule.warmup_steps cannot re-warm a resumed run)\n",
            then, state.step, next, state.step + 1,
            was.train.steps != tc.steps ? "train.steps" : "optimizer or schedule settings",
            was.train.steps != tc.steps ? "s" : "");
    }
    if (main_rank && state.step >= tc.steps)
      fmt::print("note: the checkpoint is at step {}, and train.steps is {}: there is nothing to train\n", state.step,
                 tc.steps);
  }
  // Checkpoints in the run folder newer than the starting point (a fresh start, checkpoint.resume:
  // none, beside an earlier run's; or a resume from an older checkpoint than the newest) belong to
  // an abandoned run or branch. Left in place, pruning would delete this run's checkpoints in
  // their favour and a restart would resume them; moved aside (never deleted), they are kept.
  // (Done below, with the log lines, by rank 0: their log lines (and a new run's predecessor's
  // recipe.yaml, loss.html and events.jsonl) move to run_dir/<superseded|rolled-back>-logs/N/ first, so that a
  // failure in between never leaves the lines of checkpoints already moved unarchived.)
  dist.barrier();  // every rank has read its checkpoint
  // An in-loop rollback that the previous process began and did not finish (it died before the
  // checkpoint of the rollback's target was saved again): completed here when this resumes at
  // that target, else its data would spike again. A record that does not apply is removed.
  // Rank 0 decides (every rank learns it), so that all ranks replan or none does.
  json pending = run.read_pending();
  Guard interrupted(recipe.guard);  // the guard as the rollback found it
  if (!pending.is_null()) interrupted.load_state(pending.at("guard").get<std::string>());
  bool pending_applies = false, pending_done = false;  // done: completed, and maybe not logged
  {
    auto t = torch::zeros({2}, torch::kInt64);
    if (main_rank && !pending.is_null()) {
      const bool applied = run.applied_rollback == pending;
      t[0] = !resume_from.empty() && state.step == pending.value("to_step", int64_t{-1}) &&
             pending.value("from_step", int64_t{-1}) > state.step && !applied;
      t[1] = applied;
    }
    dist.sum(t);
    pending_applies = t[0].item<int64_t>() > 0;
    pending_done = t[1].item<int64_t>() > 0;
  }
  if (pending_applies && pending.is_null())
    throw Error(run.pending_path,
                "rank " + std::to_string(dist.rank()) + " cannot read the rollback record rank 0 read",
                "every rank must see the same run folder (a shared filesystem)");
  if (main_rank && !pending.is_null() && !pending_applies)
    fmt::print("note: {} (a rollback to step {}) {}; removed\n", run.pending_path,
               pending.value("to_step", int64_t{-1}),
               pending_done ? "was completed" : "does not apply at step " + std::to_string(state.step));
  dist.barrier();  // every rank has read it
  // (a record that does not apply is removed below, once what it completed is logged)
  // A supervisor's plan after a guard stop (llm-spike supervise): applies when the resumed
  // checkpoint is its to_step (the steps after it are then a discarded branch, kept in the metrics).
  json plan;
  bool plan_applies = false;
  bool plan_was_applied = false;  // by a job that died after re-saving its checkpoint
  const std::string plan_path = std::getenv("LIBLLM_RESTART_PLAN") ? std::getenv("LIBLLM_RESTART_PLAN") : "";
  if (!plan_path.empty() && fs::exists(plan_path)) {
    try {
      plan = json::parse(std::ifstream(plan_path));
    } catch (const json::exception& e) {
      throw Error(plan_path, std::string("invalid restart plan: ") + e.what());
    }
    // A plan is applied once: the checkpoint it re-saves records it (each plan the supervisor
    // writes is another: its "attempt" differs), so a job that dies before its next checkpoint
    // resumes there without applying it again.
    const bool applied = run.applied_plan == plan;
    plan_was_applied = applied;
    plan_applies = !resume_from.empty() && state.step == plan.value("to_step", int64_t{-1}) &&
                   plan.value("from_step", int64_t{-1}) > state.step && !applied && !pending_applies;
    if (!plan_applies && main_rank)
      fmt::print("restart plan {} does not apply (resumed at step {}{}, the plan is for step {})\n", plan_path,
                 state.step, applied ? ", where it was applied already" : "", plan.value("to_step", int64_t{-1}));
  }
  const std::string metrics_path = (run_dir / "metrics.jsonl").string();
  run.sequence_path = (run_dir / "data_sequence.jsonl").string();
  // Only rank 0 writes shared files.
  std::ofstream metrics;
  // A restart plan's branch is numbered above every branch the metrics hold (it may resume an
  // older checkpoint than an earlier plan did), and the metrics keep every line of those
  // (the stopped branch ends at the plan's from_step). Rank 0 reads them; every rank learns it.
  int64_t branch_floor = 0;
  if (plan_applies) {
    int64_t top = -1;
    if (main_rank)
      for (const auto& line : detail::read_jsonl(metrics_path, false))
        top = std::max(top, line.value("branch", int64_t{0}));
    branch_floor = dist.from_main(top + 1);
  }
  if (main_rank) {
    const auto steps = checkpoint_steps(run.ckpt_root);
    const int64_t from = resume_from.empty() ? -1 : state.step;
    const char* aside = resume_from.empty() ? "superseded" : "rolled-back";
    const bool set_aside = !steps.empty() && steps.back() > from;
    // A resume after a guard stop (which set its checkpoints aside already) does not redo the steps
    // after its checkpoint as they were: their events go too (a crash's redone steps keep theirs).
    const bool guard_tail = !resume_from.empty() && !plan_applies && !pending_applies &&
                            drops_guard_action(metrics_path, state.step, run.guard.rollbacks_total());
    // Where the dropped lines go (made when there are any): also those of the steps after the
    // checkpoint that a crashed or killed job logged, which this one redoes.
    // A folder whose marker says an earlier start was killed while filling it is filled again
    // (its lines are the same), not followed by another with them twice.
    const fs::path log_archive = [&] {
      const fs::path logs = run_dir / (std::string(aside) + "-logs");
      int k = 1;
      while (fs::exists(logs / std::to_string(k))) ++k;
      if (k > 1 && fs::exists(logs / std::to_string(k - 1) / ".incomplete")) --k;
      return logs / std::to_string(k);
    }();
    fs::create_directories(log_archive);
    detail::write_file_atomic((log_archive / ".incomplete").string(), "");
    auto archive = [&](const char* name) { return log_archive.empty() ? "" : (log_archive / name).string(); };
    // The data of a rollback or restart plan that a job which died before logging it completed:
    // kept before the data sequence is cut below.
    std::string completed_data;
    if (pending_done)
      completed_data =
          run.archive_rolled_back(state.step, pending.value("from_step", int64_t{-1}), run.guard.rollbacks_total() - 1);
    else if (plan_was_applied && state.step == plan.value("to_step", int64_t{-1}))
      completed_data =
          run.archive_rolled_back(state.step, plan.value("from_step", int64_t{-1}), run.guard.rollbacks_total() - 1);
    // (an interrupted rollback's steps stay, as its uninterrupted run keeps them)
    int64_t archived = 0;
    if (pending_applies)
      truncate_log(metrics_path, pending.value("from_step", state.step), interrupted.rollbacks_total() + 1);
    else
      archived += truncate_log(metrics_path, plan_applies ? plan.value("from_step", state.step) : state.step,
                               plan_applies ? branch_floor : run.guard.rollbacks_total(), archive("metrics.jsonl"));
    if (!plan_applies && !pending_applies) {  // (else the rollback reads its steps first)
      // (a completed rollback's steps are in the guard's file already: not "redone")
      archived +=
          truncate_log(run.sequence_path, state.step, 0, completed_data.empty() ? archive("data_sequence.jsonl") : "");
      // The events of an abandoned branch's steps go with their metrics lines; lines without a
      // step (a supervisor's) stay. (A crash's redone steps keep theirs: events are the history.)
      if (!resume_from.empty() && (set_aside || guard_tail))
        archived += truncate_log((run_dir / "events.jsonl").string(), state.step, run.guard.rollbacks_total(),
                                 archive("events.jsonl"));
    }
    if (resume_from.empty() && (archived > 0 || set_aside))  // (the recipe, events and plot of those lines)
      for (const char* name : {"recipe.yaml", "loss.html", "events.jsonl", "rolled-back-logs"})
        if (fs::exists(run_dir / name)) {
          fs::create_directories(log_archive);
          fs::rename(run_dir / name, log_archive / name);
        }
    const std::string logs_went = archived > 0 ? ", their log lines to " + log_archive.string() + "/" : "";
    if (set_aside) {
      json why = {{"reason", resume_from.empty() ? "a new run (checkpoint.resume: none) began in this folder"
                                                 : "the run resumed from the older step " + std::to_string(from)}};
      if (archived > 0) why["logs"] = log_archive.string();
      set_aside_checkpoints(run.ckpt_root, from, why, aside);
      fmt::print("{}: {}/ holds checkpoints up to step {} of {}; they moved to {}/{}/{}\n",
                 resume_from.empty() ? "starting a new run (checkpoint.resume: none)"
                                     : "resuming from step " + std::to_string(from),
                 run.ckpt_root, steps.back(), resume_from.empty() ? "an earlier run" : "an abandoned branch",
                 run.ckpt_root, aside, logs_went);
    } else if (archived > 0 && resume_from.empty()) {
      fmt::print("starting a new run: the earlier run's logs in {} moved to {}/\n", run_dir.string(),
                 log_archive.string());
    } else if (archived > 0) {
      fmt::print("resuming from step {}: the log lines of the steps after it{} moved to {}/\n", from,
                 guard_tail ? ", in which the loss-spike guard acted," : " (which this run redoes)",
                 log_archive.string());
    }
    fs::remove(log_archive / ".incomplete");
    if (fs::is_empty(log_archive)) {  // (nothing was archived: no folder is left, nor an empty parent)
      fs::remove(log_archive);
      std::error_code ec;
      fs::remove(log_archive.parent_path(), ec);  // (fails, and stays, when it holds earlier archives)
    }
    open_log(metrics, metrics_path);
    open_log(run.sequence, run.sequence_path);
    run.events_path = (run_dir / "events.jsonl").string();
    open_log(run.events, run.events_path);
    // A rollback or restart plan completed by a job that died before logging it: logged now.
    if (pending_done)
      run.log_completed(pending.value("to_step", int64_t{-1}), pending.value("from_step", int64_t{-1}),
                        /*in_loop=*/true, resume_from, -1, completed_data);
    if (plan_was_applied && state.step == plan.value("to_step", int64_t{-1}))
      run.log_completed(state.step, plan.value("from_step", int64_t{-1}), /*in_loop=*/false, resume_from,
                        plan.value("attempt", int64_t{-1}), completed_data);
    if (!pending_applies) fs::remove(run.pending_path);
    detail::write_file_atomic((run_dir / "recipe.yaml").string(),
                              run.recipe_yaml);  // never a half-written recipe beside the run
  }
  if (plan_applies) {
    const int64_t to = state.step, through = plan.value("from_step", to);
    double f = plan.value("lr_factor", 1.0);
    // At least the cut of every plan so far together (the supervisor's cumulative factor): the
    // checkpoint resumed may predate an earlier plan, whose cut its LR scale then lacks.
    if (plan.contains("cumulative_lr_factor") && run.guard.lr_scale() > 0)
      f = std::min(f, plan.value("cumulative_lr_factor", 1.0) / run.guard.lr_scale());
    if (main_rank)
      fmt::print("restart plan: continuing from step {} without the data of steps {}..{} ({}), LR x{:.3g}\n", to, to + 1,
                 through, gc.defer == "end" ? "deferred to the end" : "dropped", f);
    run.applied_plan = plan;  // recorded in the checkpoint replan saves
    run.replan(to, through, f, /*in_loop=*/false, resume_from, run.guard.state(), run.read_live(through), branch_floor);
  }
  if (pending_applies) {
    const int64_t to = state.step, through = pending.value("from_step", to);
    if (main_rank)
      fmt::print(
          "completing the rollback from step {} to step {} that the previous process began: {} the data of steps "
          "{}..{}, LR x{:.3g}\n",
          through, to, gc.defer == "end" ? "deferring" : "dropping", to + 1, through,
          interrupted.lr_scale() * pending.value("lr_factor", 1.0));
    const std::string saved = run.guard.state();  // the checkpoint's statistics
    run.guard = interrupted;
    run.applied_rollback = pending;
    run.replan(to, through, pending.value("lr_factor", 1.0), /*in_loop=*/true, resume_from, saved,
               run.read_live(through), 0, /*resumed=*/true);
    if (main_rank) fs::remove(run.pending_path);  // (replan ends with every rank past the save)
  }
  // An applied plan is used up: renamed to <plan>.applied, so that no later restart applies it
  // again (after a rollback past its step, a resume could land on its step once more).
  if (plan_applies || plan_was_applied) {
    dist.barrier();  // (every rank has read it)
    std::error_code ec;
    if (main_rank) fs::rename(plan_path, plan_path + ".applied", ec);
  }
  // The data position a guard stop left for a plan that did not apply here: of no further use.
  if (main_rank) {
    std::error_code ec;
    fs::remove(run.live_path(), ec);
  }
  json start = {{"event", resume_from.empty() ? "start" : "resume"},
                {"step", state.step},
                {"restart", restart},
                {"pid", ::getpid()},
                {"built_rss_mib", built_rss_mib}};
  if (!resume_changes.empty()) start["recipe_changes"] = resume_changes;
  run.event(start);
  // A fine-tune's starting point on the held-out data, to compare the later evaluations with.
  if (base && resume_from.empty() && tc.eval_every > 0 && run.has_valid()) {
    const double e = run.evaluate();
    run.history.push_back({{"step", 0}, {"eval_loss", e}});
    run.event({{"event", "eval"}, {"step", 0}, {"eval_loss", e}});
    if (main_rank) fmt::print("eval before fine-tuning: {:.4f}\n", e);
  }
  // The guard can always roll back to the start.
  if (gc.enabled && resume_from.empty()) run.save(0);

  const double peak_lr = recipe.optim.lr;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t tokens_this_run = 0, steps_this_run = 0;
  double last_loss = 0;
  std::vector<WindowRef> refs;
  run.model->train();
  std::optional<StopSignals> signals;  // (the loop's only: later phases end at a signal as before)
  signals.emplace(tc.save_on_signal);
  bool stop_agreed = false;  // the last step's ranks saw a signal
  for (int64_t step = state.step; step < tc.steps; ++step) {
    const int64_t n = step + 1;  // 1-based number of this step
    const auto ts = std::chrono::steady_clock::now();
    const bool armed = run.guard.injection_armed() && restart == 0;
    if (gc.inject_hang_step == n && restart == 0) {
      if (main_rank) fmt::print("step {}: injected hang (guard.inject_hang_step)\n", n), std::fflush(stdout);
      for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
    }
    double lr = peak_lr * lr_factor(recipe.schedule, step, tc.steps) * run.guard.lr_multiplier(n);
    if (armed && contains(gc.inject_lr_steps, n)) lr *= gc.inject_lr_factor;
    const bool noise = armed && contains(gc.inject_noise_steps, n);
    double loss_sum = 0, aux_sum = 0;
    int64_t step_tokens = 0, step_targets = 0;  // input positions (padding included), target tokens
    if (run.fsdp) run.fsdp->reset_peak();  // input positions computed on this rank
    std::vector<WindowRef> used;  // this rank's windows (chat: examples) in this step, in order
    struct Micro {
      torch::Tensor x, y, docs, padding;
    };
    std::vector<Micro> micros;  // this step's micro batches, fetched first (chat: to count targets)
    for (int64_t m = 0; m < run.accum; ++m) {
      torch::Tensor x, y, docs, padding;
      run.next_batch(tc.micro_batch, x, y, docs, padding, refs);
      used.insert(used.end(), refs.begin(), refs.end());
      if (noise) {  // injected data spike: uniform random tokens, the same on every attempt
        std::mt19937_64 rng(static_cast<uint64_t>(tc.seed) * 1000003u + static_cast<uint64_t>(n) * 7919u +
                            static_cast<uint64_t>(m * dist.world_size() + dist.rank()));
        std::vector<int64_t> noisy(static_cast<size_t>(tc.micro_batch * (x.size(1) + 1)));
        for (auto& t : noisy) t = static_cast<int64_t>(rng() % static_cast<uint64_t>(mc.vocab_size));
        std::tie(x, y) = split_batch(noisy, tc.micro_batch, x.size(1));
        x = x.to(run.device);
        y = y.to(run.device);
        padding = torch::Tensor();
      }
      step_tokens += x.numel();
      micros.push_back({x, y, docs, padding});
    }
    // Chat: the step's loss is the mean over its target tokens on every rank (micro batches hold
    // varying numbers of them), as torchtune and transformers (num_items_in_batch) weigh them:
    // micro batch m's mean is weighted by its targets x world / the step's targets (the gradient
    // all-reduce averages over ranks). Pretraining windows all have B x T targets: 1 / accum.
    std::vector<int64_t> counted(static_cast<size_t>(run.accum), 0);
    if (run.chat) {
      auto total = torch::zeros({1}, torch::kInt64);
      for (int64_t m = 0; m < run.accum; ++m) {
        counted[static_cast<size_t>(m)] = (micros[static_cast<size_t>(m)].y != -100).sum().item<int64_t>();
        step_targets += counted[static_cast<size_t>(m)];
      }
      total[0] = step_targets;
      dist.sum(total);
      step_targets = total[0].item<int64_t>();
    }
    if (run.fp32_sums && !run.fsdp) run.fp32_gradients();
    for (int64_t m = 0; m < run.accum; ++m) {
      const Micro& mb = micros[static_cast<size_t>(m)];
      auto out = run.model->forward_loss(mb.x, mb.y, mb.docs, mb.padding);
      const auto& ce = out.loss;
      const int64_t k = counted[static_cast<size_t>(m)];
      torch::Tensor weighted;
      if (!run.chat)
        weighted = ce / static_cast<double>(run.accum);
      else if (k > 0)
        weighted = ce * (static_cast<double>(k) * dist.world_size() / static_cast<double>(step_targets));
      else
        weighted = torch::nan_to_num(ce) * 0.0;  // (no targets: a NaN mean, and no gradient)
      (weighted + out.aux_loss / static_cast<double>(run.accum)).backward();
      if (run.fsdp) run.fsdp->reduce_gradients();
      if (!run.chat)
        loss_sum += ce.item<double>();
      else if (k > 0)
        loss_sum += ce.item<double>() * static_cast<double>(k);
      aux_sum += out.aux_loss.item<double>();
    }
    const double held = static_cast<double>(run.fsdp ? run.fsdp->peak_bytes() : run.state_bytes());
    // (world, most used, 2): every rank's windows, gathered for the data-sequence log (packed
    // chat rows hold varying numbers of examples, so ranks may differ in count).
    // (world + 1): the last, the ranks a signal asked to stop (train.save_on_signal).
    auto counts = torch::zeros({dist.world_size() + 1}, torch::kInt64);
    counts[dist.rank()] = static_cast<int64_t>(used.size());
    counts[dist.world_size()] = signals->signal() != 0 ? 1 : 0;
    dist.sum(counts);
    const bool stop_requested = counts[dist.world_size()].item<int64_t>() > 0;
    stop_agreed = stop_requested;
    counts = counts.narrow(0, 0, dist.world_size());
    auto step_refs = torch::zeros({dist.world_size(), counts.max().item<int64_t>(), 2}, torch::kInt64);
    {
      auto acc = step_refs.accessor<int64_t, 3>();
      for (size_t i = 0; i < used.size(); ++i) {
        acc[dist.rank()][static_cast<int64_t>(i)][0] = used[i].set;
        acc[dist.rank()][static_cast<int64_t>(i)][1] = used[i].window;
      }
    }
    dist.sum(step_refs);
    double loss = 0;
    if (run.chat) {  // (sum over ranks of each rank's target-weighted sum) / the step's targets
      auto t = torch::full({1}, loss_sum, torch::kFloat64);
      dist.sum(t);
      loss = step_targets > 0 ? t[0].item<double>() / static_cast<double>(step_targets) : std::nan("");
    } else {
      loss = dist.mean(loss_sum / run.accum);
    }
    aux_sum = dist.mean(aux_sum);
    const double grad_norm = run.finish_gradients(recipe.optim.grad_clip);
    GuardDecision d = run.guard.observe(n, loss, grad_norm);
    if (hooks.decide) hooks.decide(n, d);
    // Where a rollback (or, after a stop, the supervisor) would continue from; without one, stop.
    std::string target_dir;
    int64_t target = -1;
    if (d.action == GuardAction::Rollback || d.action == GuardAction::Stop) {
      const int64_t limit = d.spike_start - 2 - gc.rollback_margin;
      std::tie(target_dir, target) = run.target_before(limit);
      if (target_dir.empty()) {
        d.action = GuardAction::Stop;
        d.reason += fmt::format("; no checkpoint at or before step {} to roll back to", limit);
      }
    }
    if (d.action == GuardAction::Apply) run.step(lr);
    run.zero_grad();
    if (d.action == GuardAction::Apply) last_loss = loss;
    ++steps_this_run;

    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count();
    const double computed = run.chat ? step_tokens * static_cast<double>(dist.world_size()) : static_cast<double>(global);
    tokens_this_run += static_cast<int64_t>(computed);
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tok_s = tokens_this_run / elapsed;
    const double mfu = tc.peak_tflops > 0 ? tok_s * run.flops_per_token / (tc.peak_tflops * 1e12) : 0.0;
    if (run.tokens < 0) run.tokens = step * global;  // (a checkpoint from before the count was kept)
    run.tokens += global;                            // (this step's batch: a resume may have changed it)
    json line = {{"step", n},
                 {"loss", loss},
                 {"lr", lr},
                 {"grad_norm", grad_norm},
                 {"tokens", run.tokens},
                 {"tokens_per_s", computed / dt},
                 {"step_s", dt}};
    if (run.chat) {  // chat rows are padded: the tokens that train, and their rate
      line["target_tokens"] = step_targets;
      line["target_tokens_per_s"] = static_cast<double>(step_targets) / dt;
    }
    if (mc.n_experts > 0) line["aux_loss"] = aux_sum / run.accum;
    if (tc.peak_tflops > 0) line["mfu"] = mfu;
    if (run.cuda) line["gpu_peak_gib"] = compat::cuda_peak_allocated_bytes(run.device.index()) / double(1 << 30);
    line["state_mib"] = held / 1048576.0;  // rank 0's parameters + gradients + optimizer state, at most, this step
    if (supervised) line["attempt"] = restart;  // which of the supervisor's jobs ran it
    if (main_rank && steps_this_run == 1)
      fmt::print("memory: rank 0 holds at most {:.3f} MiB of parameters + gradients + optimizer state in a step\n",
                 held / 1048576.0);
    if (gc.enabled || d.action != GuardAction::Apply) {
      line["action"] = to_string(d.action);
      line["z_loss"] = d.z_loss;
      line["z_grad"] = d.z_grad;
      line["branch"] = run.guard.rollbacks_total();
    }
    const bool eval_now = tc.eval_every > 0 && run.has_valid() && (n % tc.eval_every == 0 || n == tc.steps);
    if (eval_now && d.action == GuardAction::Apply) {
      line["eval_loss"] = run.evaluate();
      run.history.push_back({{"step", n}, {"eval_loss", line["eval_loss"]}});
    }
    if (main_rank) {
      append_log(metrics, metrics_path, line.dump());
      json windows = json::array();  // per rank: [[set, window], ...] in the order the rank used them
      auto acc = step_refs.accessor<int64_t, 3>();
      for (int64_t r = 0; r < dist.world_size(); ++r) {
        json mine = json::array();
        for (int64_t i = 0; i < counts[r].item<int64_t>(); ++i) mine.push_back({acc[r][i][0], acc[r][i][1]});
        windows.push_back(mine);
      }
      json seq = {{"step", n}, {"windows", windows}};
      if (d.action != GuardAction::Apply) seq["skipped"] = true;
      append_log(run.sequence, run.sequence_path, seq.dump());
      if (n % tc.log_every == 0 || step == state.step || n == tc.steps || line.contains("eval_loss")) {
        std::string s = fmt::format("step {:>6}/{} | loss {:.4f} | lr {:.2e} | grad {:.3f} | {:.0f} tok/s", n,
                                    tc.steps, loss, lr, grad_norm, tok_s);
        if (tc.peak_tflops > 0) s += fmt::format(" | mfu {:.1f}%", 100 * mfu);
        if (run.cuda) s += fmt::format(" | mem {:.1f} GiB", line["gpu_peak_gib"].get<double>());
        if (line.contains("eval_loss")) s += fmt::format(" | eval {:.4f}", line["eval_loss"].get<double>());
        s += " | eta " + human_time((tc.steps - n) * elapsed / static_cast<double>(steps_this_run));
        fmt::print("{}\n", s);
        std::fflush(stdout);
      }
    }

    // The guard's decision, loudly.
    if (d.action == GuardAction::Skip) {
      if (main_rank) fmt::print("step {}: skipping update: {} (loss {:.4f}, grad norm {:.3f})\n", n, d.reason, loss, grad_norm);
      run.event({{"event", "skip"}, {"step", n}, {"reason", d.reason}, {"loss", loss}, {"grad_norm", grad_norm},
                 {"z_loss", d.z_loss}, {"z_grad", d.z_grad}});
    } else if (d.action == GuardAction::Stop) {
      if (target >= 0) run.write_live(n);  // for the supervisor's restart plan
      dist.barrier();
      if (main_rank && target >= 0)
        set_aside_checkpoints(run.ckpt_root, target,
                              {{"reason", fmt::format("the loss-spike guard stopped at step {}: {}", n, d.reason)}});
      run.event({{"event", "stop"},
                 {"step", n},
                 {"reason", d.reason},
                 {"spike_start", d.spike_start},
                 {"from_step", n},
                 {"to_step", target},
                 {"checkpoint", target_dir},
                 {"rollbacks", run.guard.rollbacks()},
                 {"skips", run.guard.skips_total()},
                 {"data", gc.defer}});
      if (main_rank)
        fmt::print("step {}: stopping: {}\nguard report: {} rollbacks and {} skipped updates in this run; spike from "
                   "step {}; {}; events in {}, analysis: llm-spike analyze {}\n",
                   n, d.reason, run.guard.rollbacks(), run.guard.skips_total(), d.spike_start,
                   target < 0 ? "no healthy checkpoint" : fmt::format("newest healthy checkpoint: step {}", target),
                   (run_dir / "events.jsonl").string(), tc.run_dir);
      std::fflush(stdout);  // (the report above comes before the error in a log of both streams)
      throw SpikeStop(tc.run_dir, fmt::format("stopped by the loss-spike guard at step {}: {}", n, d.reason),
                      "llm-spike supervise restarts such a run with a lowered LR");
    } else if (d.action == GuardAction::Rollback) {
      const std::string& dir = target_dir;
      const int64_t to = target;
      if (main_rank)
        fmt::print("step {}: rolling back to step {}: {} | {} the data of steps {}..{} | LR x{:.3g}, re-warmed over {} steps\n",
                   n, to, d.reason, gc.defer == "end" ? "deferring to the end of the run" : "dropping", to + 1, n,
                   run.guard.lr_scale() * gc.rollback_lr_factor, gc.rewarm_steps);
      // Recorded before anything moves (Run::pending_path): a job that dies before the
      // checkpoint of `to` is saved again completes this rollback when it resumes there.
      const json pending = {
          {"to_step", to}, {"from_step", n}, {"lr_factor", gc.rollback_lr_factor}, {"guard", run.guard.state()}};
      const std::string live = run.cursor();
      run.write_live(n);  // (first: the record relies on it)
      if (main_rank) detail::write_file_atomic(run.pending_path, pending.dump() + "\n");
      dist.barrier();
      if (main_rank)
        set_aside_checkpoints(
            run.ckpt_root, to,
            {{"reason", fmt::format("the loss-spike guard rolled back from step {} to step {}: {}", n, to, d.reason)},
             {"logs", (run_dir / "rolled-back-logs" / "guard-data_sequence.jsonl").string()}});
      dist.barrier();
      if (hooks.before_rollback) hooks.before_rollback(n, to);
      const Guard before = run.guard;
      run.load(dir);
      const std::string saved = run.guard.state();  // the checkpoint's statistics
      run.guard = before;                            // this run's counters
      run.applied_rollback = pending;                // recorded in the checkpoint replan saves
      run.replan(to, n, gc.rollback_lr_factor, /*in_loop=*/true, dir, saved, live);
      if (main_rank) fs::remove(run.pending_path);
      step = to - 1;  // the loop's ++step continues at step `to` (0-based)
      continue;
    }

    const CheckpointConfig& cc = recipe.checkpoint;
    const bool interrupted_here = stop_requested && n < tc.steps;
    if ((cc.every > 0 && n % cc.every == 0) || (cc.milestone_every > 0 && n % cc.milestone_every == 0) ||
        n == tc.steps || interrupted_here) {
      const std::string path = run.save(n);
      if (main_rank) {
        prune_checkpoints(run.ckpt_root, cc, gc.enabled ? std::max<int64_t>(n - run.guard.lookback(), 0) : -1);
        fmt::print("saved checkpoint {}\n", path);
        std::fflush(stdout);  // (a kill right after still leaves the line)
      }
    }
    if (interrupted_here) {  // (every rank: the signal's sum says so on all of them)
      const int sig = signals->signal() != 0 ? signals->signal() : SIGTERM;
      run.event({{"event", "interrupted"}, {"step", n}, {"signal", sig}});
      throw Interrupted(sig, tc.run_dir,
                        fmt::format("stopped by {} after step {}, whose checkpoint is saved", ::strsignal(sig), n),
                        "run the same command to resume");
    }
  }
  // A signal in the last step: its checkpoint is saved; no samples or plot. One after the ranks'
  // agreement in it ends this process as it would without the handler.
  const int late = signals->signal();
  signals.reset();
  if (stop_agreed) {
    const int sig = late != 0 ? late : SIGTERM;
    run.event({{"event", "interrupted"}, {"step", tc.steps}, {"signal", sig}});
    throw Interrupted(
        sig, tc.run_dir,
        fmt::format("stopped by {} in the last step ({}), whose checkpoint is saved", ::strsignal(sig), tc.steps),
        "the run is complete; the samples and loss plot were not made");
  }
  if (late != 0) ::raise(late);

  const bool sampling = !tc.sample_prompts.empty() && tc.sample_tokens > 0;
  if (run.fsdp && sampling) {
    // Sharded weights: rank 0 samples from a whole copy on its host (never all of it on a GPU).
    Transformer whole(mc, TransformerImpl::Deferred{dtype});     // no init: the gathered weights fill it
    if (!run.lora_base.empty()) apply_lora(whole, recipe.lora);  // (their values: gathered too)
    std::map<std::string, torch::Tensor> params;
    for (auto& p : whole->named_parameters()) params[p.key()] = p.value();
    torch::NoGradGuard no_grad;
    run.fsdp->weight_stream().produce([&](const std::string& name, const torch::Tensor& t) {  // collective
      if (main_rank) params.at(name).set_data(t.to(torch::kCPU).clone());
    });
    if (main_rank) {
      whole->eval();
      run.model = whole;
    }
  }
  if (!main_rank) return last_loss;
  if (tc.plot) {
    const std::string plot_path = (run_dir / "loss.html").string();
    write_loss_plot(metrics_path, plot_path, "libllm: " + tc.run_dir);
    fmt::print("loss curve: {}\n", plot_path);
  }
  if (sampling) {
    GenerateOptions g;
    g.max_new_tokens = tc.sample_tokens;
    g.temperature = tc.sample_temperature;
    g.seed = static_cast<uint64_t>(tc.seed);
    for (const auto& prompt : tc.sample_prompts) {
      if (!run.chat) {
        fmt::print("sample: {}\n", generate_text(run.model, tok, prompt, g));
        continue;
      }
      g.eos_id = tok.eos_id();
      auto ids = generate(run.model, render_prompt({{"user", prompt}}, tok, recipe.chat.chat_template,
                                                   recipe.chat.system_prompt), g);
      if (!ids.empty() && ids.back() == tok.eos_id()) ids.pop_back();
      std::string answer = tok.decode(ids);
      const std::string eot = end_of_turn(recipe.chat.chat_template);
      if (!eot.empty() && answer.find(eot) != std::string::npos) answer.resize(answer.find(eot));
      fmt::print("sample: {}\n  -> {}\n", prompt, answer);
    }
  }
  return last_loss;
}

}  // namespace

double pretrain(const Recipe& recipe, const TrainHooks& hooks) {
  if (!recipe.finetune.base.empty())
    throw Error("finetune.base", "is set in a pretraining run", "fine-tune with llm-finetune (libllm::finetune)");
  if (recipe.finetune.method != "full")
    throw Error("finetune.method", "'" + recipe.finetune.method + "' needs a base model", "set finetune.base and use llm-finetune");
  if (!recipe.chat.files.empty())
    throw Error("chat.files", "chat data is for fine-tuning", "set finetune.base and use llm-finetune");
  return run_training(recipe, hooks, nullptr);
}

ModelConfig finetune_model(const Recipe& recipe, const Pretrained& base) {
  // The base decides the model. A recipe's model section may set the MoE loss coefficients (they
  // shape training, not the weights); any other key it gives must agree with the base (a model
  // section kept for llm-plan), else the recipe was written for another model.
  ModelConfig model = base.config;
  ModelConfig asked = recipe.model, has = base.config;
  Fields asked_fields, base_fields;
  asked.fields(asked_fields);
  has.fields(base_fields);
  for (const auto& key : recipe.given) {
    if (key.rfind("model.", 0) != 0) continue;
    const std::string name = key.substr(6);
    if (name == "init_std" || name == "init_depth_scaled") {
      continue;  // (initialisation only: a fine-tune's weights come from the base)
    } else if (name == "moe_aux_loss_coef") {
      model.moe_aux_loss_coef = recipe.model.moe_aux_loss_coef;
    } else if (name == "moe_z_loss_coef") {
      model.moe_z_loss_coef = recipe.model.moe_z_loss_coef;
    } else if (const Field* a = asked_fields.find(name), *b = base_fields.find(name);
               a && b && a->to_text() != b->to_text()) {
      throw Error(key, "is " + a->to_text() + ", but the base " + base.dir + " has " + b->to_text(),
                  "the base decides the model: remove " + key +
                      " (a fine-tune's model section may differ from the base only in moe_aux_loss_coef and "
                      "moe_z_loss_coef, and init_std / init_depth_scaled, which it ignores)");
    }
  }
  return model;
}

double finetune(const Recipe& recipe, const TrainHooks& hooks) {
  if (recipe.finetune.base.empty())
    throw Error("finetune.base", "is required for fine-tuning",
                "a Hugging Face model folder (config.json) or a libllm checkpoint (recipe.yaml)");
  Recipe r = recipe;
  Pretrained base = inspect_pretrained(r.finetune.base);
  r.model = finetune_model(recipe, base);
  if (r.tokenizer.path.empty()) {
    if (base.tokenizer_path.empty())
      throw Error("tokenizer.path", "is empty and the base folder " + base.dir + " has no tokenizer.model",
                  "set tokenizer.path");
    r.tokenizer.path = base.tokenizer_path;
  } else if (!base.tokenizer_path.empty()) {
    // The base learned its ids from its own tokenizer: training on another's ids teaches noise.
    const std::string how =
        tokenizer_difference(r.tokenizer.path, base.tokenizer_path, "tokenizer.path " + r.tokenizer.path,
                             /*warn=*/Distributed::launch_rank() == 0);
    if (!how.empty())
      throw Error("tokenizer.path",
                  r.tokenizer.path + " is not the tokenizer of finetune.base " + base.dir + " (" + how + ")",
                  "leave tokenizer.path empty to use the base's own (and make the data with that one)");
  }
  return run_training(r, hooks, &base);
}

}  // namespace libllm
