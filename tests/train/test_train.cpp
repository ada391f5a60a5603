// The pretraining loop: exact resume (also after a kill in the middle of a save), checkpoint
// retention, and a loss that falls.
#include "../catch_torch.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "../common.h"
#include "libllm/checkpoint.h"
#include "libllm/data.h"
#include "libllm/error.h"
#include "libllm/guard.h"
#include "libllm/hf.h"
#include "libllm/optim.h"
#include "libllm/recipe.h"
#include "libllm/safetensors.h"
#include "libllm/tokenizer.h"
#include "libllm/train.h"

using namespace libllm;
using libllm::test::jsonl;
using libllm::test::read_file;
namespace fs = std::filesystem;

namespace {

// Shards of the fixture documents (336 tokens) made with the fixture tokenizer.
std::string make_shards(const test::TempDir& tmp) {
  DataPrepConfig prep;
  prep.inputs = {test::fixture("eval.txt")};
  prep.output = tmp / "shards";
  prep.threads = 1;
  write_shards(prep, Tokenizer::load(test::fixture("tokenizer.model")));
  return prep.output;
}

Recipe tiny_recipe(const std::string& shards, const std::string& run_dir, const std::vector<std::string>& extra = {}) {
  const std::string yaml = R"(
model: {vocab_size: 384, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 64, max_seq_len: 32}
tokenizer: {path: )" + test::fixture("tokenizer.model") + R"(}
data: {train: [)" + shards + R"(], seed: 7}
optim: {lr: 0.01, weight_decay: 0.1, grad_clip: 1.0}
schedule: {kind: cosine, warmup_steps: 2}
train: {run_dir: )" + run_dir + R"(, seq_len: 16, micro_batch: 2, global_batch_tokens: 64, steps: 8, log_every: 100, plot: false, threads: 1}
checkpoint: {every: 3, keep_last: 5}
)";
  return Recipe::parse(yaml, "test-recipe", extra);
}

std::vector<double> losses(const std::string& run_dir) {
  std::vector<double> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return out;
}


}  // namespace

TEST_CASE("k steps + kill + resume + N-k steps == N steps straight, bit for bit", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const std::string a = tmp / "a", b = tmp / "b";
  pretrain(tiny_recipe(shards, a));
  pretrain(tiny_recipe(shards, b));
  // Run b is "killed" after its step-3 checkpoint: later checkpoints are gone and a save of
  // step 6 was cut off by kill -9 half-way (a partial folder with a truncated file).
  fs::remove_all(b + "/checkpoints/step-00000006");
  fs::remove_all(b + "/checkpoints/step-00000008");
  fs::create_directories(b + "/checkpoints/step-00000006.tmp-424242");
  std::ofstream(b + "/checkpoints/step-00000006.tmp-424242/model.safetensors") << "\x10\x00\x00";
  CHECK(latest_checkpoint(b + "/checkpoints") == b + "/checkpoints/step-00000003");
  for (const char* log : {"/data_sequence.jsonl", "/metrics.jsonl"})  // a line cut by the kill
    std::ofstream(b + log, std::ios::app) << R"({"step":9,"windo)";
  const double final_loss = pretrain(tiny_recipe(shards, b));  // resume: auto

  const auto la = losses(a), lb = losses(b);
  REQUIRE(la.size() == 8);
  REQUIRE(lb.size() == 8);
  for (size_t i = 0; i < la.size(); ++i) CHECK(la[i] == lb[i]);  // exact
  CHECK(final_loss == la.back());
  auto wa = read_weights(a + "/checkpoints/step-00000008"), wb = read_weights(b + "/checkpoints/step-00000008");
  REQUIRE(wa.size() == wb.size());
  for (auto& [name, t] : wa) CHECK(torch::equal(t, wb[name]));
  CHECK(read_file(a + "/checkpoints/step-00000008/optimizer.safetensors") ==
        read_file(b + "/checkpoints/step-00000008/optimizer.safetensors"));
  CHECK(read_file(a + "/data_sequence.jsonl") == read_file(b + "/data_sequence.jsonl"));
  CHECK(!fs::exists(b + "/checkpoints/step-00000006.tmp-424242"));  // cleaned up
  // The loss falls on this tiny corpus.
  CHECK(la.back() < la.front() - 0.2);
  // A checkpoint is a libllm model folder: it loads for evaluation.
  Pretrained p = load_pretrained(a + "/checkpoints/step-00000008");
  CHECK(p.format == "libllm");
}

TEST_CASE("SIGINT / SIGTERM finish the step, save its checkpoint and stop: the resume is exact", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  pretrain(tiny_recipe(shards, tmp / "a"));
  TrainHooks hooks;
  hooks.decide = [](int64_t n, GuardDecision&) {
    if (n == 4) {  // (as Ctrl-C, or a preemption's SIGTERM, late in step 4: past its ranks'
                   // agreement, so step 5 is the one that stops; a launcher passes it on again)
      std::raise(SIGINT);
      std::raise(SIGTERM);
    }
  };
  int sig = 0;
  try {
    pretrain(tiny_recipe(shards, tmp / "b"), hooks);
  } catch (const Interrupted& e) {
    sig = e.signal();
    CHECK_THAT(e.what(), Catch::Contains("after step 5, whose checkpoint is saved"));
  }
  CHECK(sig == SIGINT);
  CHECK(checkpoint_steps(tmp / "b/checkpoints") == std::vector<int64_t>{3, 5});
  CHECK(jsonl(tmp / "b/events.jsonl").back()["event"] == "interrupted");
  pretrain(tiny_recipe(shards, tmp / "b"));
  CHECK(losses(tmp / "a") == losses(tmp / "b"));
  // train.save_on_signal: false leaves the signal to its handler (here the test's, which counts it).
  static volatile std::sig_atomic_t seen = 0;
  auto* previous = std::signal(SIGINT, [](int) { ++seen; });
  TrainHooks once;
  once.decide = [](int64_t n, GuardDecision&) {
    if (n == 4) std::raise(SIGINT);
  };
  pretrain(tiny_recipe(shards, tmp / "c", {"train.save_on_signal=false"}), once);
  CHECK(seen == 1);
  CHECK(losses(tmp / "c") == losses(tmp / "a"));
  // In the last step (8): its checkpoint is saved, and the samples and plot are not made.
  TrainHooks last;
  last.decide = [](int64_t n, GuardDecision&) {
    if (n == 7) std::raise(SIGINT);
  };
  CHECK_THAT(test::error_of([&] { pretrain(tiny_recipe(shards, tmp / "d"), last); }),
             Catch::Contains("in the last step (8), whose checkpoint is saved"));
  CHECK(checkpoint_steps(tmp / "d/checkpoints").back() == 8);
  // After the ranks' agreement in the last step: the handler that was there before gets it, as
  // without train.save_on_signal; and it is that handler that is in place again.
  last.decide = [](int64_t n, GuardDecision&) {
    if (n == 8) std::raise(SIGINT);
  };
  pretrain(tiny_recipe(shards, tmp / "e"), last);
  CHECK(seen == 2);
  std::raise(SIGINT);
  CHECK(seen == 3);
  std::signal(SIGINT, previous);
}

TEST_CASE("a log line that cannot be written stops the run with an error naming the file", "[train]") {
  // The disk fills in step 3: the log's open descriptor is pointed at /dev/full (every write fails
  // with ENOSPC), as a full disk does to it. The run's checkpoints stay whole, and it resumes.
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const std::string run = tmp / "r";
  pretrain(tiny_recipe(shards, run, {"train.steps=2", "checkpoint.every=2"}));
  for (const char* log : {"metrics.jsonl", "data_sequence.jsonl"}) {
    INFO(log);
    const std::string path = run + "/" + log;
    TrainHooks fill;
    fill.decide = [&](int64_t n, GuardDecision&) {
      if (n != 3) return;
      const int full = ::open("/dev/full", O_WRONLY | O_CLOEXEC);
      for (const auto& fd : fs::directory_iterator("/proc/self/fd")) {
        std::error_code ec;
        if (fs::read_symlink(fd.path(), ec) == fs::path(path)) ::dup2(full, std::stoi(fd.path().filename().string()));
      }
      ::close(full);
    };
    CHECK_THAT(test::error_of([&] {
                 pretrain(tiny_recipe(shards, run, {"train.steps=4", "checkpoint.every=2"}), fill);
               }),
               Catch::Contains(path + ": cannot write to the log: No space left on device") &&
                   Catch::Contains("free disk space"));
    CHECK(checkpoint_steps(run + "/checkpoints").back() == 2);
  }
  pretrain(tiny_recipe(shards, run, {"train.steps=4", "checkpoint.every=2"}));
  CHECK(checkpoint_steps(run + "/checkpoints").back() == 4);
  CHECK(test::jsonl(run + "/metrics.jsonl").size() == 4);
  // An unfinished last line (a write that failed part-way) is cut when the log is opened: the next
  // line is not glued to it.
  std::ofstream(run + "/events.jsonl", std::ios::app) << R"({"branch":0,"event":"resume","p)";
  // (and one longer than the 64 KiB chunks it is looked for in: NUL blocks after a power loss)
  std::ofstream(run + "/events.jsonl", std::ios::app) << std::string(100000, '\0');
  pretrain(tiny_recipe(shards, run, {"train.steps=5", "checkpoint.every=2"}));
  std::ifstream events(run + "/events.jsonl");
  int lines = 0;
  for (std::string line; std::getline(events, line); ++lines) CHECK_NOTHROW(nlohmann::json::parse(line));
  CHECK(lines >= 3);
}

TEST_CASE("a damaged checkpoint's errors name its file", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const std::string run = tmp / "r", ck = run + "/checkpoints/step-00000003";
  pretrain(tiny_recipe(shards, run, {"train.steps=3"}));
  const std::string good = read_file(ck + "/trainer.json");
  auto resume_with = [&](const std::string& key, const nlohmann::json& value) {
    auto j = nlohmann::json::parse(good);
    j[key] = value;
    std::ofstream(ck + "/trainer.json") << j.dump();
    return test::error_of([&] { pretrain(tiny_recipe(shards, run, {"train.steps=5"})); });
  };
  CHECK_THAT(resume_with("data_cursor", "{}"), Catch::Contains(ck + "/trainer.json: data cursor"));
  auto extra = nlohmann::json::parse(nlohmann::json::parse(good)["extra"].get<std::string>());
  extra["guard"] = "{\"losses\": 1}";
  CHECK_THAT(resume_with("extra", extra.dump()), Catch::Contains(ck + "/trainer.json: guard state"));
  CHECK_THAT(resume_with("extra", "{not json"), Catch::Contains(ck + "/trainer.json: extra: invalid JSON"));
  // A value of the wrong JSON type: its key is named, not nlohmann's type message.
  CHECK_THAT(resume_with("extra", "[1]"), Catch::Contains(ck + "/trainer.json: extra: is [1], not a JSON object"));
  extra = nlohmann::json::parse(nlohmann::json::parse(good)["extra"].get<std::string>());
  extra["tokens"] = "many";
  CHECK_THAT(resume_with("extra", extra.dump()),
             Catch::Contains(ck + "/trainer.json: extra: tokens: is \"many\", expected an integer") &&
                 Catch::Contains("the checkpoint is corrupt"));
  extra.erase("tokens");
  extra["eval_history"] = 3;
  CHECK_THAT(resume_with("extra", extra.dump()),
             Catch::Contains(ck + "/trainer.json: extra: eval_history: is 3, expected a list"));
  extra["eval_history"] = nlohmann::json::array();
  extra["tokens"] = 2.5;
  CHECK_THAT(resume_with("extra", extra.dump()),
             Catch::Contains(ck + "/trainer.json: extra: tokens: is 2.5, expected an integer"));
  // An optimizer state of other parameters: the optimizer file is named.
  std::ofstream(ck + "/trainer.json") << good;
  {
    auto state = safetensors::File::open(ck + "/optimizer.safetensors");
    std::vector<safetensors::TensorView> kept;
    for (const auto& t : state->tensors())
      if (t.name.find("lm_head") == std::string::npos) kept.push_back({t.name, t.dtype, t.shape, state->data(t)});
    safetensors::write(ck + "/optimizer.safetensors.new", kept, state->metadata());
  }
  fs::rename(ck + "/optimizer.safetensors.new", ck + "/optimizer.safetensors");
  CHECK_THAT(test::error_of([&] { pretrain(tiny_recipe(shards, run, {"train.steps=5"})); }),
             Catch::Contains(ck + "/optimizer.safetensors: lm_head.weight.") &&
                 Catch::Contains("missing from the optimizer state"));
}

TEST_CASE("the same seed gives the same data sequence and losses: another seed does not", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  pretrain(tiny_recipe(shards, tmp / "x", {"train.steps=3"}));
  pretrain(tiny_recipe(shards, tmp / "y", {"train.steps=3", "checkpoint.resume=none"}));
  pretrain(tiny_recipe(shards, tmp / "z", {"train.steps=3", "data.seed=8"}));
  CHECK(read_file(tmp / "x/data_sequence.jsonl") == read_file(tmp / "y/data_sequence.jsonl"));
  CHECK(losses(tmp / "x") == losses(tmp / "y"));
  CHECK(read_file(tmp / "x/data_sequence.jsonl") != read_file(tmp / "z/data_sequence.jsonl"));
}

TEST_CASE("train.document_mask: the first step's loss is the mean over each window's documents alone", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const Recipe masked =
      tiny_recipe(shards, tmp / "m", {"train.steps=1", "train.global_batch_tokens=32", "train.document_mask=true"});
  pretrain(masked);
  pretrain(tiny_recipe(shards, tmp / "c", {"train.steps=1", "train.global_batch_tokens=32"}));
  const double loss = losses(tmp / "m")[0];
  CHECK(loss != losses(tmp / "c")[0]);
  // Independently: the same initial model (train.seed) on the windows of step 1 (data.seed),
  // each document cut out and run alone, every target of the window counted once.
  torch::manual_seed(static_cast<uint64_t>(masked.train.seed));
  Transformer model(masked.model);
  model->init_weights();
  PackedDataset data(masked.data, masked.train.seq_len, 0, 1);
  std::vector<int64_t> buf;
  std::vector<WindowRef> refs;
  data.next(masked.train.micro_batch, buf, refs);
  const int64_t B = masked.train.micro_batch, T = masked.train.seq_len, eos = Tokenizer::load(masked.tokenizer.path).eos_id();
  auto window = torch::tensor(buf, torch::kInt64).view({B, T + 1});
  torch::NoGradGuard no_grad;
  double sum = 0;
  int64_t documents = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t start = 0, t = 0; t < T; ++t)
      if (t + 1 == T || window[b][t].item<int64_t>() == eos) {  // a document is [start, t]
        auto ids = window[b].slice(0, start, t + 1).unsqueeze(0);                 // (1, L)
        auto logp = torch::log_softmax(model->forward(ids).logits.to(torch::kFloat64), -1);  // (1, L, V)
        auto next = window[b].slice(0, start + 1, t + 2).view({1, -1, 1});         // targets
        sum -= logp.gather(-1, next).sum().item<double>();
        start = t + 1, ++documents;
      }
  INFO(documents << " documents in " << B << " windows");
  CHECK(documents > B);
  CHECK(loss == Approx(sum / static_cast<double>(B * T)).epsilon(1e-5));
}

TEST_CASE("three steps equal an independent loop: accumulation, clipping, the schedule and torch's AdamW", "[train]") {
  // The trainer (fused LM head + cross-entropy, its own AdamW and clipping) against plain LibTorch:
  // the same initial model (train.seed) and windows (data.seed), 2 micro batches of 2 x 16 per
  // step (global 64 tokens), the mean of their cross-entropies, the global norm clipped to 0.05
  // (active: the norm is ~1), torch::optim::AdamW with decay on matrices but the embedding, and
  // the LR by hand: warmup 2 then cosine over 3 steps = 0.01 x {1/2, 1, min_lr_ratio 0.1}.
  // fp32 both; tolerances: loss and norm 1e-5 relative, weights 1e-4 relative (L2).
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const Recipe r = tiny_recipe(shards, tmp / "t", {"train.steps=3", "optim.grad_clip=0.05", "checkpoint.every=3"});
  pretrain(r);
  const auto metrics = jsonl(tmp / "t/metrics.jsonl");
  REQUIRE(metrics.size() == 3);

  torch::manual_seed(static_cast<uint64_t>(r.train.seed));
  Transformer model(r.model);
  PackedDataset data(r.data, r.train.seq_len, 0, 1);
  std::vector<torch::Tensor> decayed, plain;
  for (auto& p : model->named_parameters())
    (p.value().dim() >= 2 && p.key().find("embed_tokens") == std::string::npos ? decayed : plain).push_back(p.value());
  REQUIRE(plain.size() == 2 * 2 + 2);  // 2 norms per block, the final norm, the embedding
  auto options = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(r.optim.lr).betas({r.optim.beta1, r.optim.beta2}).eps(r.optim.eps).weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decayed, options(r.optim.weight_decay));
  groups.emplace_back(plain, options(0.0));
  torch::optim::AdamW adamw(groups, torch::optim::AdamWOptions(r.optim.lr));
  const double lrs[3] = {0.005, 0.01, 0.001};
  const int64_t B = r.train.micro_batch, T = r.train.seq_len;
  for (int s = 0; s < 3; ++s) {
    INFO("step " << s + 1);
    std::vector<int64_t> buf;
    std::vector<WindowRef> refs;
    double loss = 0;
    for (int micro = 0; micro < 2; ++micro) {
      data.next(B, buf, refs);
      auto w = torch::tensor(buf, torch::kInt64).view({B, T + 1});  // (B, T + 1)
      auto logits = model->forward(w.slice(1, 0, T)).logits;        // (B, T, V)
      auto ce = torch::nn::functional::cross_entropy(logits.reshape({B * T, -1}), w.slice(1, 1).reshape({-1}));
      (ce / 2.0).backward();
      loss += ce.item<double>() / 2;
    }
    double sq = 0;
    for (auto& p : model->parameters()) sq += p.grad().to(torch::kFloat64).pow(2).sum().item<double>();
    const double norm = std::sqrt(sq);
    {
      torch::NoGradGuard no_grad;
      if (norm > 0.05)
        for (auto& p : model->parameters()) p.grad().mul_(0.05 / norm);
    }
    for (auto& g : adamw.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lrs[s]);
    adamw.step();
    adamw.zero_grad();
    CHECK(metrics[s]["lr"].get<double>() == Approx(lrs[s]).epsilon(1e-12));
    CHECK(metrics[s]["loss"].get<double>() == Approx(loss).epsilon(1e-5));
    CHECK(metrics[s]["grad_norm"].get<double>() == Approx(norm).epsilon(1e-5));
    CHECK(norm > 0.5);  // (so the clipping acted)
  }
  auto saved = read_weights(tmp / "t/checkpoints/step-00000003");
  for (auto& p : model->named_parameters()) {
    INFO(p.key());
    REQUIRE(saved.count(p.key()) == 1);
    const auto ref = p.value().detach().to(torch::kFloat64), got = saved[p.key()].to(torch::kFloat64);
    CHECK(((got - ref).norm() / ref.norm()).item<double>() < 1e-4);
  }
}

TEST_CASE("keep_last deletes old regular checkpoints, milestones stay", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  pretrain(tiny_recipe(shards, tmp / "r", {"checkpoint.every=2", "checkpoint.keep_last=1", "checkpoint.milestone_every=4",
                                           "train.steps=7"}));
  CHECK(checkpoint_steps(tmp / "r/checkpoints") == std::vector<int64_t>{4, 7});
  // Resumed without checkpoint.milestone_every: step 4 was saved as a milestone, and stays.
  pretrain(tiny_recipe(shards, tmp / "r", {"checkpoint.every=2", "checkpoint.keep_last=1", "train.steps=11"}));
  CHECK(checkpoint_steps(tmp / "r/checkpoints") == std::vector<int64_t>{4, 11});
}

TEST_CASE("a resume may change train.dtype: masters come from fp32 weights, and set fp32 weights", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const std::string run = tmp / "r", ck3 = run + "/checkpoints/step-00000003";
  pretrain(tiny_recipe(shards, run, {"train.steps=5"}));  // fp32: no masters
  const auto fp32_losses = losses(run);
  const auto fp32_weights = read_weights(ck3);
  // fp32 -> bf16: the masters are the checkpoint's fp32 weights exactly (not the bf16-rounded ones).
  const Recipe bf16 = tiny_recipe(shards, run, {"train.steps=5", "train.dtype=bf16", "checkpoint.resume=" + ck3});
  Transformer model(bf16.model);
  model->to(torch::kBFloat16);
  AdamW optim(model->named_parameters().pairs(), bf16.optim);
  load_checkpoint(ck3, model, optim, 0);
  int64_t masters = 0;
  for (const auto& [name, t] : optim.state())
    if (name.size() > 7 && name.substr(name.size() - 7) == ".master") {
      CHECK(torch::equal(t, fp32_weights.at(name.substr(0, name.size() - 7))));
      ++masters;
    }
  CHECK(masters == static_cast<int64_t>(fp32_weights.size()));
  // Trained on in bf16 from step 3, its losses go on where fp32's went (within bf16 rounding:
  // a bf16 run from scratch is 0.001 from fp32's here).
  pretrain(bf16);
  const auto mixed = losses(run);
  REQUIRE(mixed.size() == 5);
  for (size_t i = 3; i < 5; ++i) CHECK(mixed[i] == Approx(fp32_losses[i]).margin(0.01));
  // bf16 -> fp32: the fp32 parameters are the bf16 run's masters exactly.
  auto opt_file = safetensors::File::open(run + "/checkpoints/step-00000005/optimizer.safetensors");
  const Recipe fp32 = tiny_recipe(shards, run, {"train.steps=6"});
  Transformer back(fp32.model);
  AdamW optim32(back->named_parameters().pairs(), fp32.optim);
  load_checkpoint(run + "/checkpoints/step-00000005", back, optim32, 0);
  for (const auto& p : back->named_parameters()) {
    const auto& info = opt_file->at(p.key() + ".master");
    auto master = torch::from_blob(const_cast<uint8_t*>(opt_file->data(info)), info.shape, torch::kFloat32);
    CHECK(torch::equal(p.value(), master));
  }
  pretrain(fp32);
  CHECK(losses(run).size() == 6);
}

TEST_CASE("a resume that changes the held-out set (micro_batch x eval_batches) says so", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const std::vector<std::string> eval = {"data.valid=" + shards, "train.eval_every=3"};
  auto with = [&](std::vector<std::string> o) { return o.insert(o.end(), eval.begin(), eval.end()), o; };
  pretrain(tiny_recipe(shards, tmp / "r", with({"train.steps=3"})));
  const std::string note =
      "the held-out loss is now the mean over 16 windows of 16 tokens (eval_batches x "
      "micro_batch), and was over 8 of 16";
  CHECK_THAT(test::stdout_of([&] {
               pretrain(tiny_recipe(shards, tmp / "r", with({"train.steps=4", "train.micro_batch=4"})));
             }),
             Catch::Contains(note));
  // The same held-out set with another split of it: no note.
  CHECK_THAT(test::stdout_of([&] {
               pretrain(tiny_recipe(shards, tmp / "r",
                                    with({"train.steps=5", "train.micro_batch=2", "train.eval_batches=8"})));
             }),
             !Catch::Contains("held-out loss is now"));
}

TEST_CASE(
    "a resume says when the LR jumps, a missing checkpoint lists those there are, guard settings that cannot act are "
    "noted",
    "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=3"}));  // cosine to 10% at its last step
  CHECK_THAT(test::stdout_of([&] { pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=30"})); }),
             Catch::Contains("note: the learning rate goes from 0.001 at step 3 (the checkpoint's recipe) to") &&
                 Catch::Contains("the changed train.steps moves the schedule"));
  CHECK_THAT(test::stdout_of([&] { pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=31"})); }),
             !Catch::Contains("the learning rate goes from"));  // (30 -> 31: a small change)
  CHECK_THAT(test::error_of([&] {
               pretrain(tiny_recipe(shards, tmp / "r", {"checkpoint.resume=" + (tmp / "r/checkpoints/step-00000999")}));
             }),
             Catch::Contains("step-00000999: does not exist") &&
                 Catch::Contains("the newest checkpoints in " + (tmp / "r/checkpoints") +
                                 " are step-00000021, step-00000024, step-00000027, step-00000030, step-00000031"));
  const std::string notes = test::stdout_of([&] {
    pretrain(
        tiny_recipe(shards, tmp / "g",
                    {"train.steps=2", "guard.inject_lr_steps=[2, 9]", "guard.max_skips=20", "guard.skip_window=10"}));
  });
  CHECK_THAT(notes,
             Catch::Contains("warning: guard.inject_noise_steps / inject_lr_steps corrupt steps 2, 9 on purpose, "
                             "and guard.enabled is false"));
  CHECK_THAT(notes, Catch::Contains("note: guard injection step 9 is past train.steps (2)"));
  CHECK_THAT(test::stdout_of([&] {
               pretrain(tiny_recipe(shards, tmp / "h",
                                    {"train.steps=2", "guard.enabled=true", "guard.max_skips=20",
                                     "guard.skip_window=10", "guard.loss_z=0", "guard.grad_z=0"}));
             }),
             Catch::Contains("guard.max_skips (20) > guard.skip_window (10)") &&
                 Catch::Contains("guard.loss_z and guard.grad_z are both 0"));
  CHECK_THAT(test::stdout_of([&] {
               pretrain(tiny_recipe(shards, tmp / "k", {"train.steps=2", "guard.enabled=true"}));
             }),
             Catch::Contains("the checkpoints of the last 102 steps (the furthest a rollback goes back) are kept, "
                             "about 35 at checkpoint.every 3, more than checkpoint.keep_last (5)"));
}

TEST_CASE("metrics count the tokens each step drew, also after a resume with another batch", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=2"}));
  const int64_t global = jsonl(tmp / "r/metrics.jsonl").at(0)["tokens"];
  pretrain(
      tiny_recipe(shards, tmp / "r", {"train.steps=3", "train.global_batch_tokens=" + std::to_string(2 * global)}));
  std::vector<int64_t> tokens;
  for (const auto& line : jsonl(tmp / "r/metrics.jsonl")) tokens.push_back(line["tokens"]);
  CHECK(tokens == std::vector<int64_t>{global, 2 * global, 4 * global});  // (it said 6 x global: step x batch)
}

TEST_CASE("a new run or an older resume point sets the run folder's later checkpoints aside", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  // An earlier run's checkpoints 3, 6, 9 beside a new one (checkpoint.resume: none) with keep_last 2:
  // they would have been pruned first (and resumed by a restart); they move to superseded/.
  pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=9"}));
  CHECK_FALSE(fs::exists(tmp / "r/superseded-logs"));  // (a first run archives nothing, and leaves no folder)
  const std::string first_metrics = test::read_file(tmp / "r/metrics.jsonl"),
                    first_sequence = test::read_file(tmp / "r/data_sequence.jsonl"),
                    first_recipe = test::read_file(tmp / "r/recipe.yaml");
  fs::create_directories(tmp / "r/rolled-back-logs");  // (as a rollback of the earlier run leaves)
  test::write_file(tmp / "r/rolled-back-logs/guard-data_sequence.jsonl", "{\"step\":2}\n");
  pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=6", "checkpoint.resume=none", "checkpoint.keep_last=2"}));
  CHECK(fs::exists(tmp / "r/superseded-logs/1/rolled-back-logs/guard-data_sequence.jsonl"));
  CHECK(checkpoint_steps(tmp / "r/checkpoints") == std::vector<int64_t>{3, 6});
  CHECK(checkpoint_steps(tmp / "r/checkpoints/superseded") == std::vector<int64_t>{3, 6, 9});
  const auto why = nlohmann::json::parse(read_file(tmp / "r/checkpoints/superseded/step-00000009/set-aside.json"));
  CHECK_THAT(why["reason"].get<std::string>(), Catch::Contains("a new run (checkpoint.resume: none)"));
  CHECK(why["logs"] == tmp / "r/superseded-logs/1");
  // The earlier run's logs moved beside them, whole; the new run's are its own.
  CHECK(test::read_file(tmp / "r/superseded-logs/1/metrics.jsonl") == first_metrics);
  CHECK(test::read_file(tmp / "r/superseded-logs/1/data_sequence.jsonl") == first_sequence);
  CHECK(test::read_file(tmp / "r/superseded-logs/1/recipe.yaml") == first_recipe);
  CHECK(jsonl(tmp / "r/metrics.jsonl").size() == 6);
  CHECK(jsonl(tmp / "r/superseded-logs/1/metrics.jsonl").size() == 9);
  CHECK_THAT(test::read_file(tmp / "r/recipe.yaml"), Catch::Contains("steps: 6"));
  // Back to step 3 and on to 8: step 6 of the abandoned branch is kept aside, not pruned later
  // in favour of it, and the run equals one that went 3 -> 8 itself.
  std::ofstream(tmp / "r/events.jsonl", std::ios::app) << R"({"event":"skip","step":5,"branch":0})"
                                                       << "\n"
                                                       << R"({"event":"supervise","command":"x"})"
                                                       << "\n";
  // (as an earlier start, killed while archiving, left it: filled again, not followed by another)
  fs::create_directories(tmp / "r/rolled-back-logs/1");
  test::write_file(tmp / "r/rolled-back-logs/1/.incomplete", "");
  test::write_file(tmp / "r/rolled-back-logs/1/metrics.jsonl", "{\"step\":99}\n");
  pretrain(tiny_recipe(shards, tmp / "r", {"checkpoint.resume=" + std::string(tmp / "r/checkpoints/step-00000003")}));
  CHECK(checkpoint_steps(tmp / "r/checkpoints") == std::vector<int64_t>{3, 6, 8});
  CHECK(checkpoint_steps(tmp / "r/checkpoints/rolled-back") == std::vector<int64_t>{6});
  // The abandoned branch's steps 4..6 keep their log lines there.
  std::vector<int64_t> abandoned;
  for (const auto& line : jsonl(tmp / "r/rolled-back-logs/1/metrics.jsonl")) abandoned.push_back(line["step"]);
  CHECK(abandoned == std::vector<int64_t>{4, 5, 6});
  CHECK_FALSE(fs::exists(tmp / "r/rolled-back-logs/1/.incomplete"));
  CHECK_FALSE(fs::exists(tmp / "r/rolled-back-logs/2"));
  CHECK(jsonl(tmp / "r/rolled-back-logs/1/data_sequence.jsonl").size() == 3);
  // So does its step 5's event; an event of no step (a supervisor's) stays.
  const auto moved = jsonl(tmp / "r/rolled-back-logs/1/events.jsonl");
  REQUIRE(moved.size() == 1);
  CHECK(moved[0]["event"] == "skip");
  std::vector<std::string> kinds;
  for (const auto& e : jsonl(tmp / "r/events.jsonl")) kinds.push_back(e["event"]);
  CHECK(kinds == std::vector<std::string>{"start", "supervise", "resume"});
  // The recipe keys changed since step 3's checkpoint are reported and logged.
  nlohmann::json resumed;
  for (const auto& e : jsonl(tmp / "r/events.jsonl"))
    if (e["event"] == "resume") resumed = e;
  REQUIRE(resumed.is_object());
  CHECK(resumed.value("recipe_changes", nlohmann::json()) ==
        nlohmann::json({"train.steps: 6 -> 8", "checkpoint.keep_last: 2 -> 5"}));
  pretrain(tiny_recipe(shards, tmp / "s"));
  CHECK(losses(tmp / "r") == losses(tmp / "s"));
}

TEST_CASE("training refuses shards made with another tokenizer and a sequence longer than the model's", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  fs::copy_file(test::fixture("tokenizer-control.model"), tmp / "other.model");  // (a valid, other tokenizer)
  auto err = [&](const std::vector<std::string>& o) {
    return test::error_of([&] { pretrain(tiny_recipe(shards, tmp / "e", o)); });
  };
  CHECK_THAT(err({"tokenizer.path=" + (tmp / "other.model")}),
             Catch::Contains("other.model") && Catch::Contains("the shard set was made with tokenizer"));
  CHECK_THAT(err({"train.seq_len=64"}), Catch::Contains("train.seq_len: 64 exceeds model.max_seq_len 32"));
  CHECK_THAT(err({"train.global_batch_tokens=50"}), Catch::Contains("not a multiple of micro_batch * seq_len"));
  // A held-out set shorter than one window is found before the first step, not at the first evaluation.
  test::write_file(tmp / "short.txt", "hi\n");
  DataPrepConfig prep;
  prep.inputs = {tmp / "short.txt"};
  prep.output = tmp / "short-set";
  write_shards(prep, Tokenizer::load(test::fixture("tokenizer.model")));
  CHECK_THAT(err({"data.valid=" + (tmp / "short-set"), "train.eval_every=4"}),
             Catch::Contains("data.valid: ") && Catch::Contains("less than one window of train.seq_len + 1 = 17"));
  CHECK_FALSE(fs::exists(tmp / "e/metrics.jsonl"));
}

// ---- the loss-spike guard in the loop (injected spikes) ----

namespace {

// kSteps steps with the guard on, evaluated at the end on 8 fixed batches.
constexpr int kSteps = 60;

std::vector<std::string> guarded(const std::string& shards, std::vector<std::string> extra) {
  std::vector<std::string> o = {"train.steps=" + std::to_string(kSteps), "checkpoint.every=5", "checkpoint.keep_last=4", "guard.enabled=true",
                                "guard.window=16", "guard.min_history=8", "guard.grad_z=0", "guard.persist_steps=3",
                                "guard.rewarm_steps=5", "train.eval_every=" + std::to_string(kSteps), "train.eval_batches=8",
                                "data.valid=" + shards, "optim.lr=0.004"};
  o.insert(o.end(), extra.begin(), extra.end());
  return o;
}


double final_eval(const std::string& run_dir) { return jsonl(run_dir + "/metrics.jsonl").back()["eval_loss"].get<double>(); }

}  // namespace

TEST_CASE("guard: a one-step injected spike is skipped and the run ends within 2% of a clean one", "[train][guard]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const std::string clean = tmp / "clean", spiked = tmp / "spiked";
  pretrain(tiny_recipe(shards, clean, guarded(shards, {})));
  pretrain(tiny_recipe(shards, spiked, guarded(shards, {"guard.inject_noise_steps=[25]"})));
  const auto m = jsonl(spiked + "/metrics.jsonl");
  REQUIRE(m.size() == kSteps);
  for (const auto& line : m) CHECK(line["action"] == (line["step"] == 25 ? "skip" : "apply"));
  CHECK(m[24]["z_loss"].get<double>() > 6.0);
  const auto events = jsonl(spiked + "/events.jsonl");
  int skips = 0;
  for (const auto& e : events) skips += e["event"] == "skip" && e["step"] == 25;
  CHECK(skips == 1);
  // The update was not applied: one optimizer step fewer.
  auto opt = safetensors::File::open(spiked + "/checkpoints/" + checkpoint_name(kSteps) + "/optimizer.safetensors");
  const auto* step_t = opt->find("step");
  REQUIRE(step_t != nullptr);
  CHECK(*reinterpret_cast<const int64_t*>(opt->data(*step_t)) == kSteps - 1);
  // The skipped step's data is logged as such.
  CHECK(jsonl(spiked + "/data_sequence.jsonl")[24].value("skipped", false));
  const double a = final_eval(clean), b = final_eval(spiked);
  INFO("final held-out loss: clean " << a << ", guarded " << b);
  CHECK(std::fabs(b - a) / a < 0.02);
}

TEST_CASE("guard: a persistent spike rolls back to an exact checkpoint, defers its data, and ends within 2%",
          "[train][guard]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const std::string clean = tmp / "clean", spiked = tmp / "spiked";
  pretrain(tiny_recipe(shards, clean, guarded(shards, {})));
  int rollbacks = 0;
  TrainHooks hooks;
  hooks.after_rollback = [&](int64_t to, const std::string& dir, Transformer& model, const AdamW& optim) {
    ++rollbacks;
    CHECK(to == 25);  // the LR blow-up is update 30: the loss spikes from step 31, the last healthy checkpoint is 25
    auto saved = read_weights(dir);
    for (auto& p : model->named_parameters()) CHECK(torch::equal(p.value(), saved.at(p.key())));
    auto f = safetensors::File::open(dir + "/optimizer.safetensors");
    std::map<std::string, const safetensors::TensorInfo*> by_name;
    for (const auto& t : f->tensors()) by_name[t.name] = &t;
    for (const auto& [name, t] : optim.state()) {
      REQUIRE(by_name.count(name));
      const auto& info = *by_name[name];
      auto file_t = torch::from_blob(const_cast<uint8_t*>(f->data(info)), info.shape, torch_dtype_of(info.dtype));
      CHECK(torch::equal(t, file_t));
    }
  };
  pretrain(tiny_recipe(shards, spiked,
                       guarded(shards, {"guard.inject_lr_steps=[30]", "guard.inject_lr_factor=1000",
                                        "checkpoint.keep_last=20"})),  // (for the resume below)
           hooks);
  CHECK(rollbacks == 1);
  const auto m = jsonl(spiked + "/metrics.jsonl");
  // Steps 1..30 applied, 31..33 skipped, 34 rolled back, then steps 26..60 again.
  REQUIRE(m.size() == kSteps + 34 - 25);
  CHECK(m[30]["action"] == "skip");
  CHECK(m[33]["action"] == "rollback");
  CHECK(m[34]["step"] == 26);
  CHECK(m[34]["branch"] == 1);
  CHECK(m[34]["lr"].get<double>() < m[24]["lr"].get<double>() / 4);  // re-warming
  // The windows of steps 26..34 (the same as the clean run's) are the last ones of the run.
  const auto seq_clean = jsonl(clean + "/data_sequence.jsonl"), seq = jsonl(spiked + "/data_sequence.jsonl");
  REQUIRE(seq.size() == kSteps);
  nlohmann::json deferred = nlohmann::json::array(), tail = nlohmann::json::array();
  for (int s = 26; s <= 34; ++s)
    for (const auto& w : seq_clean[s - 1]["windows"][0]) deferred.push_back(w);
  for (int s = kSteps - 8; s <= kSteps; ++s)
    for (const auto& w : seq[s - 1]["windows"][0]) tail.push_back(w);
  CHECK(tail == deferred);
  CHECK(seq[25]["windows"] != seq_clean[25]["windows"]);  // step 26 got fresh data
  // The spiked checkpoint is kept aside; resume would never pick it.
  CHECK(fs::exists(spiked + "/checkpoints/rolled-back/step-00000030"));
  CHECK_THAT(read_file(spiked + "/checkpoints/rolled-back/step-00000030/set-aside.json"),
             Catch::Contains("the loss-spike guard rolled back from step 34 to step 25"));
  // The metrics keep a rollback's lines, as branches; the rolled-back steps' data (what spiked)
  // moved aside, and the rollback's event names it.
  const std::string aside = spiked + "/rolled-back-logs/guard-data_sequence.jsonl";
  const auto spiked_data = jsonl(aside);
  REQUIRE(spiked_data.size() == 9);
  for (int s = 26; s <= 34; ++s) {
    CHECK(spiked_data[s - 26]["windows"] == seq_clean[s - 1]["windows"]);
    CHECK(spiked_data[s - 26]["rollback"]["to_step"] == 25);
  }
  auto rollback_events = [&] {
    std::vector<nlohmann::json> out;
    for (const auto& e : jsonl(spiked + "/events.jsonl"))
      if (e["event"] == "rollback") out.push_back(e);
    return out;
  };
  REQUIRE(rollback_events().size() == 1);
  CHECK(rollback_events()[0]["data_sequence"] == aside);
  const double a = final_eval(clean), b = final_eval(spiked);
  INFO("final held-out loss: clean " << a << ", guarded " << b);
  CHECK(std::fabs(b - a) / a < 0.02);
  // Resumed from step 30 of branch 1: the metrics keep the discarded steps 31..34 of branch 0
  // (what llm-spike analyze reads), and the run ends as before.
  pretrain(tiny_recipe(
      shards, spiked,
      guarded(shards, {"guard.inject_lr_steps=[30]", "guard.inject_lr_factor=1000", "checkpoint.keep_last=20",
                       "checkpoint.resume=" + spiked + "/checkpoints/step-00000030"})));
  const auto again = jsonl(spiked + "/metrics.jsonl");
  REQUIRE(again.size() == m.size());
  CHECK(again[33]["action"] == "rollback");
  CHECK(again[33]["branch"] == 0);
  CHECK(again.back()["step"] == kSteps);
  CHECK(again.back()["loss"] == m.back()["loss"]);
  CHECK(rollback_events().size() == 1);  // (branch 0's event stays with its lines)
  // Resumed from there with twice the global batch (8 windows a step, as on twice the ranks): the
  // deferred windows are still the run's last 36, not left past its end.
  const std::string wider = tmp / "wider";
  pretrain(tiny_recipe(shards, wider,
                       guarded(shards, {"train.global_batch_tokens=128",
                                        "checkpoint.resume=" + spiked + "/checkpoints/step-00000030"})));
  nlohmann::json served = nlohmann::json::array();
  for (const auto& line : jsonl(wider + "/data_sequence.jsonl"))
    for (const auto& w : line["windows"][0]) served.push_back(w);
  REQUIRE(served.size() == 8 * (kSteps - 30));
  CHECK(nlohmann::json(std::vector<nlohmann::json>(served.end() - 36, served.end())) == deferred);
}

TEST_CASE("a rollback interrupted by the job's death is completed when the job resumes", "[train][guard]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const auto recipe = [&](const std::string& dir) {
    return tiny_recipe(
        shards, dir,
        guarded(shards, {"guard.inject_lr_steps=[30]", "guard.inject_lr_factor=1000", "checkpoint.keep_last=20"}));
  };
  pretrain(recipe(tmp / "whole"));
  // Dies after the checkpoints after step 25 were set aside, before step 25 is saved again.
  TrainHooks dies;
  dies.before_rollback = [](int64_t from, int64_t to) {
    CHECK(from == 34);
    CHECK(to == 25);
    throw std::runtime_error("killed during the rollback");
  };
  CHECK_THROWS_WITH(pretrain(recipe(tmp / "cut"), dies), Catch::Contains("killed during the rollback"));
  CHECK(fs::exists(tmp / "cut/rollback-pending.json"));
  CHECK(checkpoint_steps(tmp / "cut/checkpoints").back() == 25);
  // As if it died while setting the checkpoints aside (oldest first): step 30 is still there.
  fs::rename(tmp / "cut/checkpoints/rolled-back/step-00000030", tmp / "cut/checkpoints/step-00000030");
  // Resumes at 25 and completes the rollback (its data deferred), without steps 26..34 again.
  int again = 0;
  TrainHooks count;
  count.before_rollback = [&](int64_t, int64_t) { ++again; };
  pretrain(recipe(tmp / "cut"), count);
  CHECK(again == 0);
  CHECK(!fs::exists(tmp / "cut/rollback-pending.json"));
  CHECK(read_file(tmp / "whole/data_sequence.jsonl") == read_file(tmp / "cut/data_sequence.jsonl"));
  CHECK(losses(tmp / "whole") == losses(tmp / "cut"));
  const auto m = jsonl(tmp / "cut/metrics.jsonl");
  REQUIRE(m.size() == kSteps + 34 - 25);  // the interrupted branch's steps 26..34 are kept
  CHECK(m[33]["action"] == "rollback");
  CHECK(m[34]["branch"] == 1);
  int rollbacks = 0;
  for (const auto& e : jsonl(tmp / "cut/events.jsonl"))
    if (e["event"] == "rollback") {
      ++rollbacks;
      CHECK(e.value("resumed", false));
    }
  CHECK(rollbacks == 1);
  // A rollback whose re-saved checkpoint is whole is not applied again: dies right after.
  TrainHooks after;
  after.after_rollback = [](int64_t, const std::string&, Transformer&, const AdamW&) {
    throw std::runtime_error("killed after the rollback");
  };
  CHECK_THROWS_WITH(pretrain(recipe(tmp / "late"), after), Catch::Contains("killed after the rollback"));
  CHECK(fs::exists(tmp / "late/rollback-pending.json"));
  // As if it died before keeping the rolled-back steps' data aside, cutting it, and logging the
  // rollback: the resumed job does all three.
  std::string kept;
  for (const auto& e : jsonl(tmp / "late/events.jsonl"))
    if (e["event"] != "rollback") kept += e.dump() + "\n";
  test::write_file(tmp / "late/events.jsonl", kept);
  const std::string aside = tmp / "late/rolled-back-logs/guard-data_sequence.jsonl";
  const std::string archived = read_file(aside);
  std::string uncut;
  for (auto line : jsonl(aside)) {
    CHECK(line["rollback"] == nlohmann::json({{"branch", 0}, {"from_step", 34}, {"to_step", 25}}));
    line.erase("rollback");
    uncut += line.dump() + "\n";
  }
  CHECK(jsonl(aside).size() == 9);
  fs::remove(aside);
  std::ofstream(tmp / "late/data_sequence.jsonl", std::ios::app) << uncut;
  pretrain(recipe(tmp / "late"));
  CHECK(read_file(aside) == archived);
  CHECK_FALSE(fs::exists(tmp / "late/rolled-back-logs/1"));  // (not archived a second time as "redone")
  CHECK(!fs::exists(tmp / "late/rollback-pending.json"));
  CHECK(read_file(tmp / "whole/data_sequence.jsonl") == read_file(tmp / "late/data_sequence.jsonl"));
  CHECK(losses(tmp / "whole") == losses(tmp / "late"));
  std::vector<nlohmann::json> logged;
  for (const auto& e : jsonl(tmp / "late/events.jsonl"))
    if (e["event"] == "rollback") logged.push_back(e);
  REQUIRE(logged.size() == 1);
  CHECK(logged[0]["step"] == 34);
  CHECK(logged[0]["to_step"] == 25);
  CHECK(logged[0].value("resumed", false));
  CHECK(logged[0]["data_sequence"] == aside);
  int whole = 0;
  for (const auto& e : jsonl(tmp / "whole/events.jsonl"))  // the uninterrupted run's figures
    if (e["event"] == "rollback") {
      ++whole;
      CHECK(logged[0]["windows"] == e["windows"]);
      CHECK(logged[0]["lr_scale"] == e["lr_scale"]);
    }
  CHECK(whole == 1);
}

TEST_CASE("a rollback past an earlier rollback's target keeps that one's deferral and serves no window twice",
          "[train][guard]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const std::vector<std::string> opts = {"guard.rollback_margin=1", "checkpoint.keep_last=20"};
  pretrain(tiny_recipe(shards, tmp / "clean", guarded(shards, opts)));
  // An injected divergence at update 30 rolls back from step 34 to 25 (steps 26..34 deferred);
  // then an outside signal rolls back from the repeated step 27 to 20 (27 - 2 - margin 1 = 24).
  std::vector<std::pair<int64_t, int64_t>> rollbacks;
  TrainHooks hooks;
  hooks.before_rollback = [&](int64_t from, int64_t to) { rollbacks.emplace_back(from, to); };
  hooks.decide = [&](int64_t step, GuardDecision& d) {
    if (step == 27 && rollbacks.size() == 1) {
      d.action = GuardAction::Rollback;
      d.spike_start = 27;
      d.reason = "test signal";
    }
  };
  auto with = opts;
  with.insert(with.end(), {"guard.inject_lr_steps=[30]", "guard.inject_lr_factor=1000"});
  pretrain(tiny_recipe(shards, tmp / "twice", guarded(shards, with)), hooks);
  REQUIRE(rollbacks == std::vector<std::pair<int64_t, int64_t>>{{34, 25}, {27, 20}});
  // One set: the stream is the clean run's windows in order. Steps 1..20 as there; the stream goes
  // on after what step 27 of branch 1 used (clean 36); the plan's last 16 steps serve the first
  // rollback's windows (clean 26..34), then the second's (clean 21..25, then 35..36).
  const auto clean = jsonl(tmp / "clean/data_sequence.jsonl"), seq = jsonl(tmp / "twice/data_sequence.jsonl");
  REQUIRE(seq.size() == kSteps);
  std::vector<int> want;  // the clean step whose windows each step used
  for (int s = 1; s <= 20; ++s) want.push_back(s);
  for (int s = 37; s <= 60; ++s) want.push_back(s);
  for (int s : {26, 27, 28, 29, 30, 31, 32, 33, 34, 21, 22, 23, 24, 25, 35, 36}) want.push_back(s);
  for (int s = 1; s <= kSteps; ++s) {
    INFO("step " << s);
    CHECK(seq[s - 1]["windows"] == clean[want[s - 1] - 1]["windows"]);
  }
  CHECK(!fs::exists(tmp / "twice/rollback-data.json"));
  CHECK(!fs::exists(tmp / "twice/rollback-pending.json"));
}

TEST_CASE("a restart plan is applied once, also when the job dies right after applying it", "[train][guard]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  const std::string first = tmp / "first";
  const std::vector<std::string> spike = {"checkpoint.keep_last=20", "guard.inject_lr_steps=[30]",
                                          "guard.inject_lr_factor=1000"};
  const auto recipe = [&](const std::string& dir, std::vector<std::string> extra = {}) {
    extra.insert(extra.end(), spike.begin(), spike.end());
    return tiny_recipe(shards, dir, guarded(shards, extra));
  };
  // The guard stops where it would roll back (steps 31..34 spiked; checkpoints after 25 set aside),
  // and llm-spike supervise writes its plan.
  CHECK_THROWS_AS(pretrain(recipe(first, {"guard.max_rollbacks=0"})), SpikeStop);
  CHECK(checkpoint_steps(first + "/checkpoints").back() == 25);
  CHECK(fs::exists(first + "/rollback-data.json"));
  pretrain(recipe(tmp / "in-loop"));  // the same rollback, made in the loop
  const std::string plan = R"({"to_step": 25, "from_step": 34, "lr_factor": 0.5})";
  test::write_file(tmp / "plan.json", plan);
  for (const char* copy : {"once", "twice", "unknown", "two"}) fs::copy(first, tmp / copy, fs::copy_options::recursive);
  fs::remove(tmp / "unknown/rollback-data.json");
  // Resumed without the plan (by hand), the stop's data position is of no further use.
  fs::copy(first, tmp / "by-hand", fs::copy_options::recursive);
  pretrain(recipe(tmp / "by-hand", {"train.steps=26"}));
  CHECK(!fs::exists(tmp / "by-hand/rollback-data.json"));
  // The stopped steps 26..34 (where the guard acted) keep their log lines and the stop's event aside.
  CHECK(jsonl(tmp / "by-hand/rolled-back-logs/1/metrics.jsonl").size() == 9);
  CHECK(jsonl(tmp / "by-hand/rolled-back-logs/1/metrics.jsonl").back()["action"] == "stop");
  CHECK(jsonl(tmp / "by-hand/rolled-back-logs/1/events.jsonl").back()["event"] == "stop");
  CHECK(jsonl(tmp / "by-hand/metrics.jsonl").size() == 26);
  struct Env {  // what llm-spike supervise sets for a restart with a plan
    Env(const std::string& plan) {
      ::setenv("LIBLLM_RESTART", "1", 1), ::setenv("LIBLLM_RESTART_PLAN", plan.c_str(), 1);
    }
    ~Env() { ::unsetenv("LIBLLM_RESTART"), ::unsetenv("LIBLLM_RESTART_PLAN"); }
  } env(tmp / "plan.json");
  CHECK_THAT(test::error_of([&] { pretrain(recipe(tmp / "unknown")); }),
             Catch::Contains("rollback-data.json: missing") && Catch::Contains("at step 34"));
  pretrain(recipe(tmp / "once"));
  // Applied, the plan is used up (renamed): no later restart applies it again.
  CHECK(!fs::exists(tmp / "plan.json"));
  CHECK(fs::exists(tmp / "plan.json.applied"));
  // Dies right after the plan's checkpoint is saved again; the restart must not apply it twice.
  test::write_file(tmp / "plan.json", plan);
  TrainHooks dies;
  dies.after_rollback = [](int64_t, const std::string&, Transformer&, const AdamW&) {
    throw std::runtime_error("killed after the plan was applied");
  };
  CHECK_THROWS_WITH(pretrain(recipe(tmp / "twice"), dies), Catch::Contains("killed after the plan"));
  CHECK(fs::exists(tmp / "plan.json"));
  std::string kept;  // as if it died before logging the plan: the restart logs it
  for (const auto& e : jsonl(tmp / "twice/events.jsonl"))
    if (e["event"] != "restart_plan") kept += e.dump() + "\n";
  test::write_file(tmp / "twice/events.jsonl", kept);
  pretrain(recipe(tmp / "twice"));
  CHECK(!fs::exists(tmp / "plan.json"));
  CHECK(read_file(tmp / "once/data_sequence.jsonl") == read_file(tmp / "twice/data_sequence.jsonl"));
  CHECK(read_file(tmp / "once/data_sequence.jsonl") == read_file(tmp / "in-loop/data_sequence.jsonl"));
  CHECK(losses(tmp / "once") == losses(tmp / "twice"));
  CHECK(!fs::exists(tmp / "once/rollback-data.json"));
  int plans = 0;
  for (const auto& e : jsonl(tmp / "twice/events.jsonl"))
    if (e["event"] == "restart_plan") {
      ++plans;
      CHECK(e.value("resumed", false));
      CHECK(e["step"] == 34);
    }
  CHECK(plans == 1);
  // A second plan resuming a checkpoint older than the first plan's cut: the LR is lowered to the
  // plans' cumulative factor, not by this plan's factor alone from the older checkpoint's scale.
  fs::copy(first, tmp / "cumulative", fs::copy_options::recursive);
  test::write_file(tmp / "plan.json",
                   R"({"to_step": 25, "from_step": 34, "lr_factor": 0.5, "cumulative_lr_factor": 0.25})");
  pretrain(recipe(tmp / "cumulative"));
  int cumulative = 0;
  for (const auto& e : jsonl(tmp / "cumulative/events.jsonl"))
    if (e["event"] == "restart_plan") {
      ++cumulative;
      CHECK(e["lr_scale"].get<double>() == Approx(0.25));
    }
  CHECK(cumulative == 1);
  // Applied by 2 ranks, while the stopped steps ran on 1: their windows, dealt out in sample order,
  // are the 2-rank run's last 9 steps (18 windows a rank), in the same order.
  test::write_file(tmp / "plan.json", plan);
  CHECK(test::run_ranks("[.plan_two_ranks_worker]", 2,
                        {"LIBLLM_TEST_ROOT=" + tmp.path.string(), "LIBLLM_RESTART=1",
                         "LIBLLM_RESTART_PLAN=" + (tmp / "plan.json")}) == std::vector<int>{0, 0});
  const auto slots = [](const std::vector<nlohmann::json>& seq, size_t from, size_t to) {  // steps [from, to]
    nlohmann::json out = nlohmann::json::array();
    for (size_t s = from; s <= to; ++s) {
      const auto& w = seq[s - 1]["windows"];
      for (size_t i = 0; i < w[0].size(); ++i)
        for (const auto& mine : w) out.push_back(mine[i]);
    }
    return out;
  };
  const auto stopped = jsonl(first + "/data_sequence.jsonl"), two = jsonl(tmp / "two/data_sequence.jsonl");
  REQUIRE(two.size() == kSteps);
  CHECK(two.back()["windows"].size() == 2);
  CHECK(slots(two, kSteps - 8, kSteps) == slots(stopped, 26, 34));
}

// One rank of the test above, in a process of its own (hidden: only that test starts it).
TEST_CASE("a restart plan: one of two ranks", "[.plan_two_ranks_worker]") {
  const char* root = std::getenv("LIBLLM_TEST_ROOT");
  REQUIRE(root);
  const std::string shards = std::string(root) + "/shards";
  pretrain(tiny_recipe(
      shards, std::string(root) + "/two",
      guarded(shards, {"checkpoint.keep_last=20", "guard.inject_lr_steps=[30]", "guard.inject_lr_factor=1000"})));
}

TEST_CASE("one job per run folder, every rank on one recipe, never a shard set's folder", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  // Another job holds the folder (its lock taken here, as that job's rank 0 would).
  fs::create_directories(tmp / "r");
  const int fd = ::open((tmp / "r/.llm-run.lock").c_str(), O_RDWR | O_CREAT, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);
  REQUIRE(::write(fd, "4242\n", 5) == 5);
  CHECK_THAT(test::error_of([&] { pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=1"})); }),
             Catch::Contains("train.run_dir: " + tmp / "r" + ": another job (pid 4242) is training in it"));
  CHECK(test::listing(tmp / "r") == std::vector<std::string>{".llm-run.lock"});  // (nothing else touched)
  ::close(fd);                                                                   // (that job ended)
  pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=1"}));
  CHECK(test::read_file(tmp / "r/.llm-run.lock") == std::to_string(::getpid()) + "\n");
  // A shard set's folder is no run folder.
  CHECK_THAT(test::error_of([&] { pretrain(tiny_recipe(shards, shards, {"train.steps=1"})); }),
             Catch::Contains("holds a shard set (meta.json), not a run"));
  // Nor a model's folder, nor one inside the documents the recipe prepares (their next llm-data
  // would read the run's logs as text).
  fs::create_directories(tmp / "model");
  test::write_file(tmp / "model/config.json", "{}");
  CHECK_THAT(test::error_of([&] { pretrain(tiny_recipe(shards, tmp / "model", {"train.steps=1"})); }),
             Catch::Contains("holds a model (config.json), not a run"));
  fs::create_directories(tmp / "docs");
  CHECK_THAT(
      test::error_of([&] {
        pretrain(tiny_recipe(shards, tmp / "docs/run", {"train.steps=1", "data_prep.inputs=[" + tmp / "docs" + "]"}));
      }),
      Catch::Contains("lies in the documents folder " + tmp / "docs" + " (data_prep.inputs)"));
  CHECK_FALSE(fs::exists(tmp / "docs/run"));
  // Two ranks launched with different LRs (a recipe edited in between): both refuse.
  CHECK(test::run_ranks("[.recipe_mismatch_worker]", 2, {"LIBLLM_TEST_ROOT=" + tmp.path.string()}) ==
        std::vector<int>{0, 0});
}

// One rank of the test above (hidden): rank 1 resolves another optim.lr.
TEST_CASE("recipe mismatch: one of two ranks", "[.recipe_mismatch_worker]") {
  const std::string root = std::getenv("LIBLLM_TEST_ROOT");
  const bool second = std::string(std::getenv("RANK")) == "1";
  const std::string e = test::error_of([&] {
    pretrain(tiny_recipe(root + "/shards", root + "/two", {"train.steps=1", second ? "optim.lr=0.5" : "optim.lr=0.1"}));
  });
  CHECK_THAT(e, Catch::Contains("recipe: 1 of the 2 ranks resolved another recipe than rank 0"));
}

namespace {

// Writes `value` over the first element of F32 tensor `name` in the safetensors file at `path`,
// in place (a file damaged without changing its size or names).
void poke_f32(const std::string& path, const std::string& name, float value) {
  uint64_t header = 0, begin = 0;
  {
    const auto f = safetensors::File::open(path);
    const auto& t = f->at(name);
    REQUIRE(t.dtype == safetensors::DType::F32);
    begin = t.begin;
  }
  std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
  io.read(reinterpret_cast<char*>(&header), 8);
  io.seekp(static_cast<std::streamoff>(8 + header + begin));
  io.write(reinterpret_cast<const char*>(&value), sizeof value);
}

// Writes the file at `path` again with its tensors and metadata as they are now, so that its
// checksum is theirs (damage done before the file was written, as by an older libllm).
void rewrite(const std::string& path) {
  {
    const auto f = safetensors::File::open(path);
    std::vector<safetensors::TensorView> views;
    for (const auto& t : f->tensors()) views.push_back({t.name, t.dtype, t.shape, f->data(t)});
    safetensors::write(path + ".new", views, f->metadata());
  }
  fs::rename(path + ".new", path);
}

}  // namespace

TEST_CASE("a checkpoint damaged in place is refused, and a data mismatch gets no hint of the one before", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=6", "checkpoint.every=3"}));
  const fs::path newest = tmp / "r/checkpoints/step-00000006", keep = tmp / "keep";
  fs::copy(newest, keep);
  const std::string before =
      "or resume the checkpoint before it: checkpoint.resume=" + tmp / "r/checkpoints/step-00000003";
  auto resume_error = [&](const std::vector<std::string>& extra = {}) {
    std::vector<std::string> set = {"train.steps=9", "checkpoint.every=3"};
    set.insert(set.end(), extra.begin(), extra.end());
    return test::error_of([&] { pretrain(tiny_recipe(shards, tmp / "r", set)); });
  };
  auto restore = [&] {
    fs::remove_all(newest);
    fs::copy(keep, newest);
  };
  // A value changed in place, in either file: found by the file's checksum.
  poke_f32(newest / "model.safetensors", "model.norm.weight", 1.5f);
  std::string e = resume_error();
  CHECK_THAT(e, Catch::Contains("step-00000006/model.safetensors: the data does not match the checksum") &&
                    Catch::Contains("the file was damaged after it was written") && Catch::Contains(before));
  restore();
  poke_f32(newest / "optimizer.safetensors", "model.norm.weight.exp_avg", 0.5f);
  CHECK_THAT(resume_error(),
             Catch::Contains("step-00000006/optimizer.safetensors: the data does not match the checksum") &&
                 Catch::Contains(before));
  restore();
  // A NaN weight in a file whose checksum agrees (fp32 run: the weights are AdamW's parameters).
  poke_f32(newest / "model.safetensors", "model.norm.weight", std::nanf(""));
  rewrite(newest / "model.safetensors");
  e = resume_error();
  CHECK_THAT(e, Catch::Contains("step-00000006: holds a NaN or an infinity in model.norm.weight") &&
                    Catch::Contains("the checkpoint is damaged") && Catch::Contains(before));
  restore();
  // A negative second moment.
  poke_f32(newest / "optimizer.safetensors", "model.norm.weight.exp_avg_sq", -1.0f);
  rewrite(newest / "optimizer.safetensors");
  e = resume_error();
  CHECK_THAT(
      e, Catch::Contains("holds a negative second moment in model.norm.weight.exp_avg_sq") && Catch::Contains(before));
  restore();
  // A record of another step than its folder's.
  {
    auto j = nlohmann::json::parse(read_file(newest / "trainer.json"));
    j["step"] = 4;
    std::ofstream(newest / "trainer.json") << j.dump();
  }
  CHECK_THAT(resume_error(),
             Catch::Contains("trainer.json: says step 4, in the folder of step 6") && Catch::Contains(before));
  restore();
  // trainer.json cut short: read before the model is built, with the same hint.
  fs::resize_file(newest / "trainer.json", 20);
  CHECK_THAT(resume_error(), Catch::Contains("invalid JSON") && Catch::Contains(before));
  restore();
  // Another data order than the run's: the checkpoint before it has the same, so no such hint.
  e = resume_error({"data.seed=8"});
  CHECK_THAT(e, Catch::Contains("data.seed"));
  CHECK_THAT(e, !Catch::Contains("resume the checkpoint before it"));
  // Whole again: the run continues.
  pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=9", "checkpoint.every=3"}));
  CHECK(fs::exists(tmp / "r/checkpoints/step-00000009"));
}

TEST_CASE("a damaged newest checkpoint names the one before it", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=6", "checkpoint.every=3"}));
  const std::string newest = tmp / "r/checkpoints/step-00000006/model.safetensors";
  fs::resize_file(newest, fs::file_size(newest) / 2);
  const std::string e = test::error_of([&] {
    pretrain(tiny_recipe(shards, tmp / "r", {"train.steps=9", "checkpoint.every=3"}));
  });
  INFO(e);
  CHECK_THAT(e, Catch::Contains("model.safetensors") &&
                    Catch::Contains("or resume the checkpoint before it: checkpoint.resume=" +
                                    tmp / "r/checkpoints/step-00000003"));
}
