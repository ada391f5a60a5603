// Checkpoint folders: step names past 8 digits, replacing a step's folder, trainer.json's types,
// and a sharded save that refuses to complete a folder without every optimizer shard.
#include "../catch_torch.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "../common.h"
#include "libllm/checkpoint.h"
#include "libllm/distributed.h"
#include "libllm/error.h"
#include "libllm/model.h"
#include "libllm/optim.h"

using namespace libllm;
using libllm::test::listing;
using libllm::test::read_file;
using libllm::test::write_file;
using libllm::test::error_of;
namespace fs = std::filesystem;

namespace {

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 16;
  c.dim = 8;
  c.n_layers = 1;
  c.n_heads = 2;
  c.ffn_dim = 16;
  c.max_seq_len = 8;
  return c;
}

std::vector<std::pair<std::string, torch::Tensor>> named(Transformer& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& p : model->named_parameters()) out.emplace_back(p.key(), p.value());
  return out;
}


}  // namespace

TEST_CASE("checkpoint folders past step 99,999,999 are found, resumed from and pruned", "[io][checkpoint]") {
  CHECK(checkpoint_name(100) == "step-00000100");
  CHECK(checkpoint_name(100000000) == "step-100000000");
  test::TempDir tmp;
  const std::string root = tmp.path.string();
  for (const char* name : {"step-00000100", "step-99999999", "step-100000000", "step-1000000000",
                           "step-000000100",       // 9 digits, but not a name checkpoint_name gives: not ours
                           "step-0000100",         // 7 digits
                           "step-0000010x", "step-00000200.tmp-7", "step-00000300.tmp-sharded"}) {
    fs::create_directories(tmp / name);
    write_file(tmp / (std::string(name) + "/trainer.json"), "{}");
  }
  fs::create_directories(tmp / "step-00000400");  // no trainer.json: incomplete
  CHECK(checkpoint_steps(root) == std::vector<int64_t>{100, 99999999, 100000000, 1000000000});
  CHECK(latest_checkpoint(root) == tmp / "step-1000000000");
  CheckpointConfig cc;
  cc.keep_last = 2;
  prune_checkpoints(root, cc);
  CHECK(checkpoint_steps(root) == std::vector<int64_t>{100000000, 1000000000});
  CHECK(!fs::exists(tmp / "step-00000200.tmp-7"));        // partial folders go
  CHECK(!fs::exists(tmp / "step-00000300.tmp-sharded"));
  CHECK(fs::exists(tmp / "step-000000100"));             // folders that are not checkpoints stay
  CHECK(fs::exists(tmp / "step-0000100"));
  CHECK(fs::exists(tmp / "step-00000400"));
}

TEST_CASE("pruning keeps every checkpoint a loss-spike rollback may still need", "[io][checkpoint]") {
  test::TempDir tmp;
  for (int s = 0; s <= 90; s += 10) {
    fs::create_directories(tmp / checkpoint_name(s));
    write_file(tmp / (checkpoint_name(s) + "/trainer.json"), "{}");
  }
  CheckpointConfig cc;
  cc.keep_last = 2;
  // Step 90 with a lookback of 65: a rollback now may go back to 20; one at step 100 to 30, ...:
  // 20 and everything after it stays.
  prune_checkpoints(tmp.path.string(), cc, 25);
  CHECK(checkpoint_steps(tmp.path.string()) == std::vector<int64_t>{20, 30, 40, 50, 60, 70, 80, 90});
  prune_checkpoints(tmp.path.string(), cc, 85);  // the needed one is among the newest 2: no third kept
  CHECK(checkpoint_steps(tmp.path.string()) == std::vector<int64_t>{80, 90});
  prune_checkpoints(tmp.path.string(), cc, 0);
  CHECK(checkpoint_steps(tmp.path.string()) == std::vector<int64_t>{80, 90});  // none at or before 0 is left

  // A whole run (every 20, keep_last 3, lookback 102, as tiny-fortunes-spikes): after each save,
  // the newest checkpoint at or before (step - lookback) is there for a rollback at any later step.
  test::TempDir run;
  const int64_t every = 20, lookback = 102;
  cc.keep_last = 3;
  for (int64_t n = every; n <= 400; n += every) {
    fs::create_directories(run / checkpoint_name(n));
    write_file(run / (checkpoint_name(n) + "/trainer.json"), "{}");
    prune_checkpoints(run.path.string(), cc, std::max<int64_t>(n - lookback, 0));
    for (int64_t later = n; later < n + every; ++later) {                    // a rollback before the next save
      const int64_t limit = later - lookback, want = limit / every * every;  // newest saved <= limit
      if (want < every) continue;
      INFO("rollback at step " << later << " after the save at " << n);
      const auto steps = checkpoint_steps(run.path.string());
      CHECK(std::count(steps.begin(), steps.end(), want) == 1);
    }
  }
  // What is kept: the newest 3 and those a rollback may reach, not every checkpoint.
  CHECK(checkpoint_steps(run.path.string()) == std::vector<int64_t>{280, 300, 320, 340, 360, 380, 400});
}

TEST_CASE("saving a step again replaces its folder, and trainer.json values are type-checked", "[io][checkpoint]") {
  test::TempDir tmp;
  torch::manual_seed(5);
  Transformer model(tiny_config());
  AdamW optim(named(model), OptimConfig{});
  const std::string root = tmp / "checkpoints";
  const std::string dir = save_checkpoint(root, model, optim, TrainState{3, "{\"pos\": 1}", "{}"}, "model: {}\n", "");
  CHECK(dir == tmp / "checkpoints/step-00000003");
  // The same step again (after a rollback): the new folder takes the name, nothing is left beside it.
  CHECK(save_checkpoint(root, model, optim, TrainState{3, "{\"pos\": 2}", "{}"}, "model: {}\n", "") == dir);
  CHECK(listing(root) == std::vector<std::string>{"step-00000003"});
  TrainState s = load_checkpoint_state(dir, optim);
  CHECK(s.step == 3);
  CHECK(s.data_cursor == "{\"pos\": 2}");

  const std::string trainer = dir + "/trainer.json";
  const auto good = nlohmann::json::parse(read_file(trainer));
  auto error_with = [&](const std::string& key, const nlohmann::json& value) {
    auto j = good;
    j[key] = value;
    write_file(trainer, j.dump());
    return error_of([&] { load_checkpoint_state(dir, optim); });
  };
  const std::string where = trainer + ": ";
  CHECK_THAT(error_with("step", 2.5), Catch::Contains(where + "step: expected an integer, got 2.5"));
  CHECK_THAT(error_with("step", "3"), Catch::Contains(where + "step: expected an integer, got \"3\""));
  CHECK_THAT(error_with("step", -1), Catch::Contains(where + "step: must be >= 0, got -1"));
  CHECK_THAT(error_with("data_cursor", 5), Catch::Contains(where + "data_cursor: expected a string, got 5"));
  CHECK_THAT(error_with("extra", nlohmann::json::object()), Catch::Contains(where + "extra: expected a string, got {}"));
  CHECK_THAT(error_with("optimizer_shards", 2.5), Catch::Contains(where + "optimizer_shards: expected an integer, got 2.5"));
  CHECK_THAT(error_with("optimizer_shards", "2"), Catch::Contains(where + "optimizer_shards: expected an integer"));
  write_file(trainer, "[1, 2]");
  CHECK_THAT(error_of([&] { load_checkpoint_state(dir, optim); }), Catch::Contains("trainer.json: expected a JSON object"));
  write_file(trainer, good.dump());
  CHECK(load_checkpoint_state(dir, optim).step == 3);
}

TEST_CASE("a sharded save completes no folder without every optimizer shard", "[io][checkpoint]") {
  Distributed single = Distributed::from_env();
  REQUIRE(single.world_size() == 1);
  test::TempDir tmp;
  torch::manual_seed(5);
  Transformer model(tiny_config());
  AdamW optim(named(model), OptimConfig{});
  const std::string root = tmp / "checkpoints";
  // Shard 0 of 2: shard 1's file never arrives in this folder (its rank wrote elsewhere).
  const std::string err = error_of([&] {
    save_checkpoint_sharded(root, named(model), optim, TrainState{2, "{}", "{}"}, "model: {}\n", "", single, 0, 2);
  });
  CHECK_THAT(err, Catch::Contains("step-00000002: saving checkpoint failed: the optimizer shard") &&
                      Catch::Contains("optimizer-shard-1-of-2.safetensors is missing or empty") &&
                      Catch::Contains("every rank must see the same run folder"));
  CHECK(listing(root).empty());  // no folder completed, the partial one removed
  CHECK(checkpoint_steps(root).empty());
  // With every shard: complete, and it loads.
  const std::string dir =
      save_checkpoint_sharded(root, named(model), optim, TrainState{2, "{}", "{}"}, "model: {}\n", "", single, 0, 1);
  CHECK(listing(root) == std::vector<std::string>{"step-00000002"});
  CHECK(fs::exists(dir + "/optimizer-shard-0-of-1.safetensors"));
  CHECK(nlohmann::json::parse(read_file(dir + "/trainer.json"))["optimizer_shards"] == 1);
  CHECK(load_checkpoint_state(dir, optim).step == 2);
}

TEST_CASE("the other ranks' generators are saved beside rank 0's and each rank restores its own", "[io][checkpoint]") {
  test::TempDir tmp;
  Transformer model(tiny_config());
  AdamW optim(named(model), OptimConfig{});
  torch::manual_seed(7);
  auto rank1 = at::detail::getDefaultCPUGenerator().get_state();  // as rank 1's generator stood
  const auto expected = torch::rand({6});                         // what rank 1 draws next
  TrainState st{3, "{}", "{}"};
  st.rank_rng = {{"rng.rank1.cpu", rank1}};
  torch::manual_seed(0);
  const std::string dir = save_checkpoint(tmp.path.string(), model, optim, st, "model: {}\n", "");
  const auto rank0_next = torch::rand({6});
  Distributed one = Distributed::from_env();
  CHECK(gather_rank_rng(one).empty());    // one process: nothing to gather
  load_checkpoint(dir, model, optim, 0);  // rank 0's generator; the other ranks' entries are no optimizer state
  CHECK(torch::equal(torch::rand({6}), rank0_next));
  CHECK(restore_rank_rng(dir, 1));
  CHECK(torch::equal(torch::rand({6}), expected));
  CHECK_FALSE(restore_rank_rng(dir, 2));  // saved by 2 ranks: rank 2 keeps what load_checkpoint restored
}

// One rank of the next test, in a process of its own (hidden: only that test starts it). Each
// rank's generator is in its own state when rank 0 saves; each resumes its own draws.
TEST_CASE("rank generators: one rank", "[.rank_rng_worker]") {
  const char* root = std::getenv("LIBLLM_TEST_ROOT");
  REQUIRE(root);
  Distributed dist = Distributed::from_env(60);
  REQUIRE(dist.world_size() == 2);
  Transformer model(tiny_config());
  AdamW optim(named(model), OptimConfig{});
  torch::manual_seed(100 + static_cast<uint64_t>(dist.rank()));
  torch::rand({3 + dist.rank()});                            // ranks draw different amounts
  at::Generator gen = at::detail::getDefaultCPUGenerator();  // (a handle on the default generator)
  const auto state = gen.get_state();
  const auto expected = torch::rand({6});  // what this rank draws next
  gen.set_state(state);
  TrainState st{3, "{}", "{}"};
  st.rank_rng = gather_rank_rng(dist);  // (collective)
  CHECK(st.rank_rng.size() == (dist.is_main() ? 1u : 0u));
  if (dist.is_main()) save_checkpoint(root, model, optim, st, "model: {}\n", "");
  dist.barrier();
  torch::manual_seed(7);
  load_checkpoint(std::string(root) + "/step-00000003", model, optim, 0);  // rank 0's generator
  CHECK(restore_rank_rng(std::string(root) + "/step-00000003", dist.rank()) == (dist.rank() > 0));
  CHECK(torch::equal(torch::rand({6}), expected));
}

TEST_CASE("every rank's generator is saved by rank 0 and restored on its own rank (2 processes)", "[io][checkpoint]") {
  test::TempDir tmp;
  CHECK(test::run_ranks("[.rank_rng_worker]", 2, {"LIBLLM_TEST_ROOT=" + tmp.path.string()}) ==
        std::vector<int>{0, 0});  // (the workers' checks passed)
  CHECK(fs::exists(tmp / "step-00000003/optimizer.safetensors"));
}

TEST_CASE("a re-save interrupted between its two renames (no atomic exchange) is completed or undone",
          "[io][checkpoint]") {
  test::TempDir tmp;
  Transformer model(tiny_config());
  AdamW optim(named(model), OptimConfig{});
  const std::string root = tmp / "checkpoints";
  const fs::path dir = save_checkpoint(root, model, optim, TrainState{3, "{\"pos\": 1}", "{}"}, "model: {}\n", "");
  const fs::path newer =
      save_checkpoint(tmp / "other", model, optim, TrainState{3, "{\"pos\": 2}", "{}"}, "model: {}\n", "");
  auto pos = [&] { return load_checkpoint_state(dir.string(), optim).data_cursor; };
  // Killed after the old folder stepped aside, the new one complete under its temporary name.
  fs::rename(dir, root + "/step-00000003.old.42");
  fs::rename(newer, root + "/step-00000003.tmp-42");
  CHECK(checkpoint_steps(root).empty());
  CHECK(recover_checkpoint_swaps(root) == std::vector<int64_t>{3});
  CHECK(pos() == "{\"pos\": 2}");
  CHECK(listing(root) == std::vector<std::string>{"step-00000003"});
  // Killed before the new folder was complete: the old one goes back.
  fs::rename(dir, root + "/step-00000003.old.43");
  fs::create_directories(root + "/step-00000003.tmp-43");
  CHECK(recover_checkpoint_swaps(root) == std::vector<int64_t>{3});
  CHECK(pos() == "{\"pos\": 2}");
  CHECK(recover_checkpoint_swaps(root).empty());  // nothing to do
  // Killed after the swap, before the old folder was removed: it is removed now.
  fs::copy(dir, root + "/step-00000003.old.44", fs::copy_options::recursive);
  CHECK(recover_checkpoint_swaps(root).empty());
  CHECK(pos() == "{\"pos\": 2}");
  CHECK_FALSE(fs::exists(root + "/step-00000003.old.44"));
}
