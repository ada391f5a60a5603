#include "libllm/train.h"

#include <fmt/core.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "libllm/checkpoint.h"
#include "libllm/compat.h"
#include "libllm/config.h"
#include "libllm/data.h"
#include "libllm/distributed.h"
#include "libllm/error.h"
#include "libllm/generate.h"
#include "libllm/model.h"
#include "libllm/optim.h"
#include "libllm/plot.h"
#include "libllm/recipe.h"
#include "libllm/tokenizer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace libllm {

void TrainConfig::fields(Fields& f) {
  f.add("run_dir", run_dir);
  f.add("seq_len", seq_len).min(1);
  f.add("micro_batch", micro_batch).min(1);
  f.add("global_batch_tokens", global_batch_tokens).min(0);
  f.add("steps", steps).min(1);
  f.add("dtype", dtype).one_of({"fp32", "bf16"});
  f.add("activation_checkpointing", activation_checkpointing);
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
}

namespace {

std::string human_time(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s);
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, (t % 3600) / 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

// Keeps the lines of a JSONL log whose "step" is <= last_step (resume), or none (fresh start).
void truncate_log(const std::string& path, int64_t last_step) {
  std::vector<std::string> keep;
  {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      try {
        if (json::parse(line).value("step", int64_t{0}) <= last_step) keep.push_back(line);
      } catch (const json::exception&) {
        // A line cut by a kill -9 is dropped.
      }
    }
  }
  std::ofstream out(path, std::ios::trunc);
  for (const auto& l : keep) out << l << "\n";
}

// One micro batch of (B, T+1) tokens -> inputs (B, T) and targets (B, T).
std::pair<torch::Tensor, torch::Tensor> split_batch(std::vector<int64_t>& buf, int64_t B, int64_t T) {
  auto all = torch::from_blob(buf.data(), {B, T + 1}, torch::kInt64).clone();  // (B, T+1)
  return {all.slice(1, 0, T), all.slice(1, 1, T + 1)};
}

struct Run {
  Run(const Recipe& r, const TrainConfig& t) : recipe(r), tc(t) {}
  const Recipe& recipe;
  const TrainConfig& tc;
  Transformer model{nullptr};
  std::unique_ptr<AdamW> optim;
  std::unique_ptr<PackedDataset> data;
  int64_t accum = 1;
  double flops_per_token = 0;

  // Mean loss of the fixed held-out windows.
  double evaluate() {
    DataConfig vc = recipe.data;
    vc.train = {recipe.data.valid};
    vc.weights.clear();
    PackedDataset valid(vc, tc.seq_len, 0, 1);
    torch::NoGradGuard no_grad;
    model->eval();
    double sum = 0;
    std::vector<int64_t> buf;
    std::vector<WindowRef> refs;
    for (int64_t b = 0; b < tc.eval_batches; ++b) {
      valid.next(tc.micro_batch, buf, refs);
      auto [x, y] = split_batch(buf, tc.micro_batch, tc.seq_len);
      sum += cross_entropy(model->forward(x).logits, y).item<double>();
    }
    model->train();
    return sum / tc.eval_batches;
  }
};

}  // namespace

double pretrain(const Recipe& recipe) {
  const TrainConfig& tc = recipe.train;
  const ModelConfig& mc = recipe.model;
  if (tc.seq_len > mc.max_seq_len)
    throw Error("train.seq_len", fmt::format("{} exceeds model.max_seq_len {}", tc.seq_len, mc.max_seq_len));
  if (recipe.data.train.empty()) throw Error("data.train", "no training shard folders", "run llm-data first and list its output");
  if (tc.threads > 0) at::set_num_threads(static_cast<int>(tc.threads));
  else compat::set_default_num_threads();

  Distributed dist = Distributed::from_env();
  const bool main_rank = dist.is_main();
  Run run(recipe, tc);
  const int64_t per_pass = tc.micro_batch * tc.seq_len * dist.world_size();
  const int64_t global = tc.global_batch_tokens > 0 ? tc.global_batch_tokens : per_pass;
  if (global % per_pass != 0)
    throw Error("train.global_batch_tokens",
                fmt::format("{} is not a multiple of micro_batch * seq_len * world_size = {}", global, per_pass));
  run.accum = global / per_pass;

  // Tokenizer and shards must agree; the tokenizer must fit the model.
  const Tokenizer tok = Tokenizer::load(recipe.tokenizer.path);
  tok.check_fits(mc, "model.vocab_size");
  for (const auto& dir : recipe.data.train) check_tokenizer(ShardSet::open(dir), tok);
  if (!recipe.data.valid.empty()) check_tokenizer(ShardSet::open(recipe.data.valid), tok);

  torch::manual_seed(static_cast<uint64_t>(tc.seed));
  run.model = Transformer(mc);
  if (tc.dtype == "bf16") run.model->to(torch::kBFloat16);
  run.model->set_activation_checkpointing(tc.activation_checkpointing);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (auto& p : run.model->named_parameters()) named.emplace_back(p.key(), p.value());
  run.optim = std::make_unique<AdamW>(named, recipe.optim);
  run.data = std::make_unique<PackedDataset>(recipe.data, tc.seq_len, dist.rank(), dist.world_size());

  const ParamCount pc = count_parameters(mc);
  // Training FLOPs per token: 6 N (non-embedding weights, forward + backward) + 12 L H Q T (attention).
  run.flops_per_token = 6.0 * (pc.active - pc.embedding) + 12.0 * mc.n_layers * mc.n_heads * mc.hdim() * tc.seq_len;

  const std::string recipe_yaml = recipe.to_yaml();
  const fs::path run_dir = tc.run_dir;
  const std::string ckpt_root = (run_dir / "checkpoints").string();
  if (main_rank) {
    fs::create_directories(run_dir);
    fmt::print("resolved recipe:\n{}\n", recipe_yaml);
    fmt::print("model: {:.2f} M parameters | {} steps x {} tokens ({} x {} x {} accumulation x {} ranks) | {} threads | {}\n",
               pc.total / 1e6, tc.steps, global, tc.micro_batch, tc.seq_len, run.accum, dist.world_size(),
               at::get_num_threads(), dist.describe());
  }

  // Resume.
  TrainState state;
  std::string resume_from;
  if (recipe.checkpoint.resume == "auto") resume_from = latest_checkpoint(ckpt_root);
  else if (recipe.checkpoint.resume != "none") resume_from = recipe.checkpoint.resume;
  json history = json::array();
  if (!resume_from.empty()) {
    state = load_checkpoint(resume_from, run.model, *run.optim);
    run.data->restore(state.data_cursor);
    if (!state.extra.empty()) history = json::parse(state.extra).value("eval_history", json::array());
    if (main_rank) fmt::print("resumed from {} (step {})\n", resume_from, state.step);
  }
  const std::string metrics_path = (run_dir / "metrics.jsonl").string();
  const std::string sequence_path = (run_dir / "data_sequence.jsonl").string();
  // Only rank 0 writes shared files.
  std::ofstream metrics, sequence;
  if (main_rank) {
    truncate_log(metrics_path, state.step);
    truncate_log(sequence_path, state.step);
    metrics.open(metrics_path, std::ios::app);
    sequence.open(sequence_path, std::ios::app);
    const fs::path tmp = run_dir / ("recipe.yaml.tmp-" + std::to_string(::getpid()));
    std::ofstream(tmp) << recipe_yaml;
    fs::rename(tmp, run_dir / "recipe.yaml");  // never a half-written recipe beside the run
  }

  auto params = run.model->parameters();
  const double peak_lr = recipe.optim.lr;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t tokens_this_run = 0;
  double last_loss = 0;
  std::vector<int64_t> buf;
  std::vector<WindowRef> refs;
  run.model->train();
  for (int64_t step = state.step; step < tc.steps; ++step) {
    const auto ts = std::chrono::steady_clock::now();
    const double lr = peak_lr * lr_factor(recipe.schedule, step, tc.steps);
    double loss_sum = 0, aux_sum = 0;
    // (world, accum * micro_batch, 2): every rank's windows, gathered for the data-sequence log.
    auto step_refs = torch::zeros({dist.world_size(), run.accum * tc.micro_batch, 2}, torch::kInt64);
    for (int64_t m = 0; m < run.accum; ++m) {
      run.data->next(tc.micro_batch, buf, refs);
      auto acc = step_refs.accessor<int64_t, 3>();
      for (int64_t b = 0; b < tc.micro_batch; ++b) {
        acc[dist.rank()][m * tc.micro_batch + b][0] = refs[b].set;
        acc[dist.rank()][m * tc.micro_batch + b][1] = refs[b].window;
      }
      auto [x, y] = split_batch(buf, tc.micro_batch, tc.seq_len);
      auto out = run.model->forward(x);
      auto ce = cross_entropy(out.logits, y);
      ((ce + out.aux_loss) / static_cast<double>(run.accum)).backward();
      loss_sum += ce.item<double>();
      aux_sum += out.aux_loss.item<double>();
    }
    dist.average_gradients(params);
    dist.sum(step_refs);
    const double loss = dist.mean(loss_sum / run.accum);
    aux_sum = dist.mean(aux_sum);
    const double grad_norm = clip_grad_norm(params, recipe.optim.grad_clip);
    run.optim->step(lr);
    run.optim->zero_grad();
    last_loss = loss;

    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count();
    tokens_this_run += global;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tok_s = tokens_this_run / elapsed;
    const double mfu = tc.peak_tflops > 0 ? tok_s * run.flops_per_token / (tc.peak_tflops * 1e12) : 0.0;
    json line = {{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"grad_norm", grad_norm},
                 {"tokens", (step + 1) * global}, {"tokens_per_s", global / dt}, {"step_s", dt}};
    if (mc.n_experts > 0) line["aux_loss"] = aux_sum / run.accum;
    if (tc.peak_tflops > 0) line["mfu"] = mfu;
    if (tc.eval_every > 0 && !recipe.data.valid.empty() && ((step + 1) % tc.eval_every == 0 || step + 1 == tc.steps)) {
      line["eval_loss"] = run.evaluate();
      history.push_back({{"step", step + 1}, {"eval_loss", line["eval_loss"]}});
    }
    if (!main_rank) {
      // Same checkpoint cadence below; nothing else to write.
    } else {
    metrics << line.dump() << "\n" << std::flush;
    json windows = json::array();  // per rank: [[set, window], ...] in the order the rank used them
    auto acc = step_refs.accessor<int64_t, 3>();
    for (int64_t r = 0; r < dist.world_size(); ++r) {
      json mine = json::array();
      for (int64_t i = 0; i < step_refs.size(1); ++i) mine.push_back({acc[r][i][0], acc[r][i][1]});
      windows.push_back(mine);
    }
    sequence << json({{"step", step + 1}, {"windows", windows}}).dump() << "\n" << std::flush;
    if ((step + 1) % tc.log_every == 0 || step == state.step || step + 1 == tc.steps) {
      std::string s = fmt::format("step {:>6}/{} | loss {:.4f} | lr {:.2e} | grad {:.3f} | {:.0f} tok/s", step + 1,
                                  tc.steps, loss, lr, grad_norm, tok_s);
      if (tc.peak_tflops > 0) s += fmt::format(" | mfu {:.1f}%", 100 * mfu);
      if (line.contains("eval_loss")) s += fmt::format(" | eval {:.4f}", line["eval_loss"].get<double>());
      s += " | eta " + human_time((tc.steps - step - 1) * elapsed / (step + 1 - state.step));
      fmt::print("{}\n", s);
      std::fflush(stdout);
    }
    }
    const int64_t done = step + 1;
    const CheckpointConfig& cc = recipe.checkpoint;
    if ((cc.every > 0 && done % cc.every == 0) || (cc.milestone_every > 0 && done % cc.milestone_every == 0) ||
        done == tc.steps) {
      if (!main_rank) continue;
      TrainState st{done, run.data->cursor(), json({{"eval_history", history}}).dump()};
      const std::string path = save_checkpoint(ckpt_root, run.model, *run.optim, st, recipe_yaml, recipe.tokenizer.path);
      prune_checkpoints(ckpt_root, cc);
      fmt::print("saved checkpoint {}\n", path);
    }
  }

  if (!main_rank) return last_loss;
  if (tc.plot) {
    const std::string plot_path = (run_dir / "loss.html").string();
    write_loss_plot(metrics_path, plot_path, "libllm: " + tc.run_dir);
    fmt::print("loss curve: {}\n", plot_path);
  }
  if (!tc.sample_prompts.empty() && tc.sample_tokens > 0) {
    GenerateOptions g;
    g.max_new_tokens = tc.sample_tokens;
    g.temperature = tc.sample_temperature;
    g.seed = static_cast<uint64_t>(tc.seed);
    for (const auto& prompt : tc.sample_prompts)
      fmt::print("sample: {}\n", generate_text(run.model, tok, prompt, g));
  }
  return last_loss;
}

}  // namespace libllm
