// The pretraining loop: exact resume (also after a kill in the middle of a save), checkpoint
// retention, and a loss that falls.
#include "../catch_torch.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "../common.h"
#include "libllm/checkpoint.h"
#include "libllm/error.h"
#include "libllm/data.h"
#include "libllm/hf.h"
#include "libllm/recipe.h"
#include "libllm/tokenizer.h"
#include "libllm/train.h"

using namespace libllm;
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

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
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

TEST_CASE("keep_last deletes old regular checkpoints, milestones stay", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  pretrain(tiny_recipe(shards, tmp / "r", {"checkpoint.every=2", "checkpoint.keep_last=1", "checkpoint.milestone_every=4",
                                           "train.steps=7"}));
  CHECK(checkpoint_steps(tmp / "r/checkpoints") == std::vector<int64_t>{4, 7});
}

TEST_CASE("training refuses shards made with another tokenizer and a sequence longer than the model's", "[train]") {
  test::TempDir tmp;
  const std::string shards = make_shards(tmp);
  fs::copy_file(test::fixture("tokenizer.model"), tmp / "other.model");
  {
    std::fstream f(tmp / "other.model", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    f.put('\x7f');
  }
  auto err = [&](const std::vector<std::string>& o) {
    return test::error_of([&] { pretrain(tiny_recipe(shards, tmp / "e", o)); });
  };
  CHECK_THAT(err({"tokenizer.path=" + (tmp / "other.model")}), Catch::Contains("other.model"));
  CHECK_THAT(err({"train.seq_len=64"}), Catch::Contains("train.seq_len: 64 exceeds model.max_seq_len 32"));
  CHECK_THAT(err({"train.global_batch_tokens=50"}), Catch::Contains("not a multiple of micro_batch * seq_len"));
}
