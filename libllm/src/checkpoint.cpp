#include "libllm/checkpoint.h"

#include <fmt/core.h>
#include <unistd.h>

#include <yaml-cpp/yaml.h>
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <system_error>
#include <thread>

#include "atomic_file.h"
#include "jsonl.h"
#include "libllm/compat.h"
#include "libllm/config.h"
#include "libllm/distributed.h"
#include "libllm/error.h"
#include "libllm/hf.h"
#include "libllm/optim.h"
#include "libllm/safetensors.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace libllm {
namespace {

// torch's CPU generator ("rng.cpu") and, where this process uses CUDA, the current device's
// ("rng.cuda": LoRA dropout on the GPU draws from it), so a resumed run draws the same masks. (A
// CPU run on a GPU machine does not ask: that would make a CUDA context, and take GPU memory.)
void add_rng_state(std::vector<std::pair<std::string, torch::Tensor>>& out) {
  out.emplace_back("rng.cpu", at::detail::getDefaultCPUGenerator().get_state());
  if (compat::cuda_in_use())
    out.emplace_back("rng.cuda", at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, -1)).get_state());
}

void write_tensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  std::vector<torch::Tensor> keep;
  std::vector<safetensors::TensorView> views;
  keep.reserve(named.size());
  for (const auto& [name, t] : named) {
    keep.push_back(t.detach().to(torch::kCPU).contiguous());
    views.push_back({name, st_dtype_of(keep.back().scalar_type()), keep.back().sizes().vec(), keep.back().data_ptr()});
  }
  safetensors::write(path, views);
}

// "step-00000100" -> 100, "step-100000000" -> 100000000 (checkpoint_name's 8 digits grow past
// 99,999,999); -1 for anything else (partial folders end in .tmp-<pid>; a name that
// checkpoint_name would not give, such as step-000000100, is not one of ours either).
int64_t step_of(const std::string& name) {
  if (name.size() < 13 || name.size() > 5 + 18 || name.rfind("step-", 0) != 0) return -1;
  for (size_t i = 5; i < name.size(); ++i)
    if (!isdigit(static_cast<unsigned char>(name[i]))) return -1;
  const int64_t step = std::stoll(name.substr(5));
  return checkpoint_name(step) == name ? step : -1;
}

// trainer.json's contents for `state` (save_checkpoint_sharded adds "optimizer_shards").
json trainer_record(const TrainState& state) {
  json j = {{"step", state.step}, {"data_cursor", state.data_cursor}, {"extra", state.extra},
            {"format", "libllm-checkpoint-v1"}};
  if (!state.lora_base.empty()) {
    j["lora_base"] = state.lora_base;
    j["lora_base_fingerprint"] = state.lora_base_fingerprint;
  }
  return j;
}

// Reads trainer.json's `key`, which must be an integer >= 0 (2.5 or "2" are errors, not truncated).
int64_t trainer_int(const json& j, const std::string& path, const char* key) {
  const json& v = j.at(key);
  if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)))
    throw Error(path + ": " + key, "expected an integer, got " + detail::shown(v), "the checkpoint is corrupt");
  const int64_t n = v.get<int64_t>();
  if (n < 0) throw Error(path + ": " + key, "must be >= 0, got " + std::to_string(n), "the checkpoint is corrupt");
  return n;
}

std::string trainer_string(const json& j, const std::string& path, const char* key) {
  const json& v = j.at(key);
  if (!v.is_string())
    throw Error(path + ": " + key, "expected a string, got " + detail::shown(v), "the checkpoint is corrupt");
  return v.get<std::string>();
}

// The optimizer state of a checkpoint, whole ("<param>.exp_avg" in optimizer.safetensors) or in
// ZeRO-1 shards ("<param>@<offset>.exp_avg" in optimizer-shard-<r>-of-<W>.safetensors), read
// piece by piece into whatever slots the loading optimizer has.
// The stored tensor in place (read-only use: the file is mapped), or a copy of it. A file is
// checked against its checksum when first read from (a rank reads only the shards it needs).
torch::Tensor view(const safetensors::File& f, const safetensors::TensorInfo& t) {
  f.verify();
  return torch::from_blob(const_cast<uint8_t*>(f.data(t)), t.shape, torch_dtype_of(t.dtype));
}
torch::Tensor copy(const safetensors::File& f, const safetensors::TensorInfo& t) { return view(f, t).clone(); }

// Sets generator `gen` to the state stored as tensor `name` of `f`: an error names the file and
// tensor (LibTorch's own says neither).
void set_rng(at::Generator gen, const safetensors::File& f, const std::string& name) {
  const auto* t = f.find(name);
  if (!t) throw Error(f.path() + ": tensor '" + name + "'", "missing", "the checkpoint is corrupt");
  f.verify();  // (its own error: not taken for a bad generator state below)
  try {
    if (t->dtype != safetensors::DType::U8) throw std::runtime_error("not U8 bytes");
    gen.set_state(copy(f, *t));
  } catch (const std::exception& e) {
    const std::string why = e.what();
    throw Error(f.path() + ": tensor '" + name + "'",
                "is no random-number generator state: " + why.substr(0, std::min(why.find('\n'), size_t{200})),
                "the checkpoint is corrupt");
  }
}

class OptimizerFiles {
 public:
  OptimizerFiles(const std::string& dir, int64_t shards) : dir_(dir) {
    main_ = safetensors::File::open((fs::path(dir) / "optimizer.safetensors").string());
    if (shards <= 0) {
      index(main_);
      return;
    }
    for (int64_t r = 0; r < shards; ++r) {
      const std::string path =
          (fs::path(dir) / ("optimizer-shard-" + std::to_string(r) + "-of-" + std::to_string(shards) + ".safetensors")).string();
      if (!fs::exists(path)) throw Error(path, "missing optimizer shard", "the checkpoint is incomplete");
      shards_.push_back(safetensors::File::open(path));
      index(shards_.back());
    }
  }

  // Restores torch's CPU generator and, where the checkpoint has it and this process uses CUDA (its
  // model is there by now), the current device's CUDA generator (dropout on the GPU), from `rank`'s file.
  void restore_rng(int rank) const {
    const auto& f = shards_.empty() ? main_ : shards_[static_cast<size_t>(rank) < shards_.size() ? rank : 0];
    set_rng(at::detail::getDefaultCPUGenerator(), *f, "rng.cpu");  // (a handle: sets the default generator)
    if (f->find("rng.cuda") && compat::cuda_in_use())              // (a CPU resume of a GPU run makes no CUDA context)
      set_rng(at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, -1)), *f, "rng.cuda");
  }

  // Entries for every key `optim.state()` has, assembled from the pieces that cover them. Across a
  // train.dtype change: an fp32 run's checkpoint has no masters, so a bf16 resume takes them from
  // its fp32 weights; a bf16 run's masters come along as "<slot>.master" for an fp32 resume, whose
  // parameters they then set (AdamW::load_state), so that no precision is lost either way.
  std::map<std::string, torch::Tensor> state_for(const AdamW& optim) const {
    std::map<std::string, torch::Tensor> out;
    const auto keys = optim.state();
    std::set<std::string> has;
    for (const auto& kv : keys) has.insert(kv.first);
    for (const auto& [key, like] : keys) {
      if (key == "step") {
        const auto* t = main_->find("step");
        if (t) out[key] = copy(*main_, *t);
        continue;
      }
      const auto [slot, kind] = split_kind(key);
      const auto [param, offset] = split_offset(slot);
      if (kind == "exp_avg" && !has.count(slot + ".master") && pieces_.count(param + ".master"))
        out[slot + ".master"] = assemble(param, "master", offset, like.sizes(), torch::kFloat32);
      auto it = pieces_.find(param + "." + kind);
      if (it == pieces_.end()) {
        if (kind == "master") {  // (an fp32 run's checkpoint: its fp32 weights are the masters)
          const auto* w = weights().find(param);
          if (w && w->dtype == safetensors::DType::F32 && w->numel() >= offset + like.numel())
            out[key] = view(weights(), *w)
                           .reshape({-1})
                           .narrow(0, offset, like.numel())
                           .to(like.scalar_type())
                           .view(like.sizes());
        }
        continue;  // AdamW::load_state names what is missing
      }
      if (kind == "step") {
        out[key] = copy(*it->second.front().file, *it->second.front().info);
        continue;
      }
      out[key] = assemble(param, kind, offset, like.sizes(), like.scalar_type());
    }
    return out;
  }

 private:
  struct Piece {
    const safetensors::File* file;
    const safetensors::TensorInfo* info;
    int64_t offset;
  };

  // Elements [offset, offset + numel(sizes)) of `param`'s flattened `kind` state, from its pieces.
  torch::Tensor assemble(const std::string& param, const std::string& kind, int64_t offset, torch::IntArrayRef sizes,
                         torch::ScalarType dtype) const {
    int64_t numel = 1;
    for (const int64_t d : sizes) numel *= d;
    auto dst = torch::empty({numel}, torch::dtype(dtype));
    int64_t covered = 0;
    for (const Piece& pc : pieces_.at(param + "." + kind)) {
      const auto d = pc.info->dtype;
      if (d != safetensors::DType::F32 && d != safetensors::DType::BF16 && d != safetensors::DType::F16 &&
          d != safetensors::DType::F64)
        throw Error(pc.file->path() + ": tensor '" + pc.info->name + "'", "is not floating-point optimizer state",
                    "the checkpoint is corrupt");
      const int64_t n = pc.info->numel();
      const int64_t lo = std::max(offset, pc.offset), hi = std::min(offset + numel, pc.offset + n);
      if (lo >= hi) continue;
      dst.narrow(0, lo - offset, hi - lo)
          .copy_(view(*pc.file, *pc.info).reshape({-1}).narrow(0, lo - pc.offset, hi - lo));
      covered += hi - lo;
    }
    if (covered != numel)
      throw Error(dir_,
                  "the optimizer state of '" + param + "' does not cover elements " + std::to_string(offset) + ".." +
                      std::to_string(offset + numel),
                  "the checkpoint is of another model");
    return dst.view(sizes);
  }
  // The checkpoint's model.safetensors (opened when first needed).
  const safetensors::File& weights() const {
    if (!weights_) weights_ = safetensors::File::open((fs::path(dir_) / "model.safetensors").string());
    return *weights_;
  }

  static std::pair<std::string, std::string> split_kind(const std::string& key) {
    for (const char* k : {".exp_avg_sq", ".exp_avg", ".master", ".step"}) {
      const std::string suffix = k;
      if (key.size() > suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0)
        return {key.substr(0, key.size() - suffix.size()), suffix.substr(1)};
    }
    return {key, ""};
  }
  // "<param>@<offset>" (ZeRO-1 slices) -> (param, offset); anything else is a whole parameter.
  static std::pair<std::string, int64_t> split_offset(const std::string& slot) {
    const size_t at = slot.rfind('@');
    if (at == std::string::npos || at + 1 == slot.size() ||
        slot.find_first_not_of("0123456789", at + 1) != std::string::npos)
      return {slot, 0};
    return {slot.substr(0, at), std::stoll(slot.substr(at + 1))};
  }
  void index(const std::shared_ptr<safetensors::File>& f) {
    for (const auto& t : f->tensors()) {
      if (t.name == "step" || t.name.rfind("rng.", 0) == 0) continue;  // (rng.cpu, rng.rank1.cuda, ...)
      const auto [slot, kind] = split_kind(t.name);
      if (kind.empty()) continue;
      const auto [param, offset] = f == main_ ? std::pair<std::string, int64_t>{slot, 0} : split_offset(slot);
      pieces_[param + "." + kind].push_back({f.get(), &t, offset});
    }
  }

  std::string dir_;
  std::shared_ptr<safetensors::File> main_;
  std::vector<std::shared_ptr<safetensors::File>> shards_;
  std::map<std::string, std::vector<Piece>> pieces_;  // "<param>.<kind>" -> pieces
  mutable std::shared_ptr<safetensors::File> weights_;
};

}  // namespace

void CheckpointConfig::fields(Fields& f) {
  f.add("every", every).min(0);
  f.add("keep_last", keep_last).min(1);
  f.add("milestone_every", milestone_every).min(0);
  f.add("resume", resume);
}

std::string checkpoint_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step-%08lld", static_cast<long long>(step));
  return buf;
}

std::string save_checkpoint(const std::string& root, Transformer& model, const AdamW& optim, const TrainState& state,
                            const std::string& recipe_yaml, const std::string& tokenizer_path) {
  const fs::path final_dir = fs::path(root) / checkpoint_name(state.step);
  const fs::path tmp = fs::path(root) / (checkpoint_name(state.step) + ".tmp-" + std::to_string(::getpid()));
  std::error_code ec;
  fs::create_directories(root, ec);
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) throw Error(tmp.string(), "cannot create checkpoint folder: " + ec.message());
  try {
    std::vector<std::pair<std::string, torch::Tensor>> params;
    for (auto& p : model->named_parameters())
      if (state.lora_base.empty() || is_adapter_weight(p.key())) params.emplace_back(p.key(), p.value());
    write_tensors((tmp / "model.safetensors").string(), params);
    auto opt_state = optim.state();
    add_rng_state(opt_state);
    opt_state.insert(opt_state.end(), state.rank_rng.begin(), state.rank_rng.end());
    write_tensors((tmp / "optimizer.safetensors").string(), opt_state);
    detail::write_file_atomic((tmp / "recipe.yaml").string(), recipe_yaml);
    if (!tokenizer_path.empty() && fs::exists(tokenizer_path))
      detail::copy_file_atomic(tokenizer_path, (tmp / "tokenizer.model").string());
    detail::write_file_atomic((tmp / "trainer.json").string(), trainer_record(state).dump(1) + "\n");
    move_folder_into_place(tmp.string(), final_dir.string());  // the same step again (rollback): swapped
    detail::fsync_parent_dir(final_dir.string());              // (the rename survives a power loss)
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw Error(final_dir.string(), std::string("saving checkpoint failed: ") + e.what(), "check free disk space");
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  return final_dir.string();
}

namespace {

// error <- what failed (a libllm::Error's place and problem), hint <- its hint, if it has one.
void split_hint(const std::exception& e, std::string& error, std::string& hint) {
  error = e.what();
  if (const auto* le = dynamic_cast<const Error*>(&e)) {
    error = le->where().empty() ? le->problem() : le->where() + ": " + le->problem();
    if (!le->hint().empty()) hint = le->hint();
  }
}

}  // namespace

std::string save_checkpoint_sharded(const std::string& root, const std::vector<std::pair<std::string, torch::Tensor>>& weights,
                                    const AdamW& local, const TrainState& state, const std::string& recipe_yaml,
                                    const std::string& tokenizer_path, Distributed& dist, int shard, int shards,
                                    bool write_shard) {
  WeightStream stream;
  for (const auto& [name, t] : weights) stream.specs.push_back({name, t.scalar_type(), t.sizes().vec()});
  stream.produce = [&](const WeightSink& sink) {
    for (const auto& [name, t] : weights) sink(name, t);
  };
  return save_checkpoint_sharded(root, stream, local, state, recipe_yaml, tokenizer_path, dist, shard, shards,
                                 write_shard);
}

std::string save_checkpoint_sharded(const std::string& root, const WeightStream& weights, const AdamW& local,
                                    const TrainState& state, const std::string& recipe_yaml,
                                    const std::string& tokenizer_path, Distributed& dist, int shard, int shards,
                                    bool write_shard) {
  const int world = shards > 0 ? shards : dist.world_size(), rank = shard >= 0 ? shard : dist.rank();
  const fs::path final_dir = fs::path(root) / checkpoint_name(state.step);
  const fs::path tmp = fs::path(root) / (checkpoint_name(state.step) + ".tmp-sharded");  // one name on every rank
  auto shard_file = [&](int r) {
    return tmp / ("optimizer-shard-" + std::to_string(r) + "-of-" + std::to_string(world) + ".safetensors");
  };
  const std::string shared_hint =
      "every rank must see the same run folder: a shared filesystem, and an absolute train.run_dir (or the same "
      "working directory on every rank)";
  std::error_code ec;
  // Only rank 0 creates the folder. The other ranks must find that one: a folder they made
  // themselves would be rank-local (a filesystem that is not shared, a relative run_dir under
  // another working directory), and their shards would never reach rank 0's checkpoint.
  if (dist.is_main()) {
    fs::create_directories(root, ec);
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp, ec);
  }
  dist.barrier();
  bool visible = fs::is_directory(tmp, ec);
  for (int i = 0; !visible && !dist.is_main() && i < 20; ++i) {
    // A network filesystem may still cache the parent's old listing: look again for a while.
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    }
    visible = fs::is_directory(tmp, ec);
  }
  // All ranks agree before anything depends on it: one rank's failure fails every rank at once.
  auto all_ok = [&](bool ok) { return dist.mean(ok ? 1.0 : 0.0) >= 1.0; };
  if (!all_ok(visible)) {
    if (dist.is_main()) fs::remove_all(tmp, ec);
    throw Error(tmp.string(),
                !visible ? (dist.is_main() ? std::string("rank 0 cannot create the checkpoint folder")
                                           : "rank " + std::to_string(dist.rank()) +
                                                 " does not see the checkpoint folder rank 0 created")
                         : std::string("another rank does not see the checkpoint folder rank 0 created"),
                shared_hint);
  }
  std::string error, hint = "check free disk space";
  if (write_shard) {  // (hybrid sharding: another replica's rank writes the same shard)
    try {
      auto mine = local.state();
      mine.erase(std::remove_if(mine.begin(), mine.end(), [](const auto& kv) { return kv.first == "step"; }), mine.end());
      add_rng_state(mine);
      write_tensors(shard_file(rank).string(), mine);
    } catch (const std::exception& e) {
      split_hint(e, error, hint);
    }
  }
  // Every rank learns whether every shard was written (this is also the barrier before rank 0
  // completes the folder), so a failure on one rank fails all of them at once.
  if (!all_ok(error.empty())) {
    if (dist.is_main()) fs::remove_all(tmp, ec);
    throw Error(final_dir.string(),
                "saving checkpoint failed: " +
                    (error.empty() ? std::string("another rank could not write its optimizer shard") : error),
                hint);
  }
  // Rank 0 checks that every shard arrived in its folder (a rank that wrote into a folder of the
  // same name elsewhere, e.g. a stale one under another working directory, reported success).
  std::string missing;
  if (dist.is_main())
    for (int r = 0; r < world && missing.empty(); ++r) {
      std::error_code fe;
      const auto size = fs::file_size(shard_file(r), fe);
      if (fe || size == 0) missing = shard_file(r).string();
    }
  if (!all_ok(missing.empty())) {
    if (dist.is_main()) fs::remove_all(tmp, ec);
    throw Error(final_dir.string(),
                "saving checkpoint failed: " + (dist.is_main() ? "the optimizer shard " + missing + " is missing or empty"
                                                               : std::string("rank 0 is missing an optimizer shard")),
                shared_hint);
  }
  // The weights: every rank takes part in producing them (a collective gather); rank 0 writes
  // each as it comes. After a failed write rank 0 keeps producing, so the collectives still match.
  {
    const auto kept = [&](const std::string& name) { return state.lora_base.empty() || is_adapter_weight(name); };
    std::unique_ptr<safetensors::StreamWriter> writer;
    if (dist.is_main()) {
      try {
        std::vector<safetensors::StreamWriter::Entry> entries;
        for (const WeightSpec& w : weights.specs)
          if (kept(w.name)) entries.push_back({w.name, st_dtype_of(w.dtype), w.shape});
        writer = std::make_unique<safetensors::StreamWriter>((tmp / "model.safetensors").string(), std::move(entries));
      } catch (const std::exception& e) {
        split_hint(e, error, hint);
      }
    }
    try {  // (a failed gather, e.g. a dead peer: no temporary folder is left behind)
      weights.produce([&](const std::string& name, const torch::Tensor& value) {
        if (!writer || !error.empty() || !kept(name)) return;
        try {
          const auto t = value.detach().to(torch::kCPU).contiguous();
          writer->add(name, t.data_ptr(), static_cast<uint64_t>(t.numel() * t.element_size()));
        } catch (const std::exception& e) {
          split_hint(e, error, hint);
        }
      });
    } catch (...) {
      if (dist.is_main()) fs::remove_all(tmp, ec);
      throw;
    }
    if (writer && error.empty()) {
      try {
        writer->commit();
      } catch (const std::exception& e) {
        split_hint(e, error, hint);
      }
    }
    writer.reset();  // (uncommitted: its temporary file is removed)
  }
  if (dist.is_main() && !error.empty()) fs::remove_all(tmp, ec);
  if (dist.is_main() && error.empty()) {
    try {
      std::vector<std::pair<std::string, torch::Tensor>> common = {
          {"step", torch::scalar_tensor(local.steps(), torch::kInt64)}};
      common.insert(common.end(), state.rank_rng.begin(), state.rank_rng.end());
      write_tensors((tmp / "optimizer.safetensors").string(), common);
      detail::write_file_atomic((tmp / "recipe.yaml").string(), recipe_yaml);
      if (!tokenizer_path.empty() && fs::exists(tokenizer_path))
        detail::copy_file_atomic(tokenizer_path, (tmp / "tokenizer.model").string());
      json trainer = trainer_record(state);
      trainer["optimizer_shards"] = world;
      detail::write_file_atomic((tmp / "trainer.json").string(), trainer.dump(1) + "\n");
      move_folder_into_place(tmp.string(), final_dir.string());  // the same step again (rollback): swapped
      detail::fsync_parent_dir(final_dir.string());              // (the rename survives a power loss)
    } catch (const std::exception& e) {
      fs::remove_all(tmp, ec);
      split_hint(e, error, hint);
    }
  }
  if (!all_ok(error.empty()))
    throw Error(
        final_dir.string(),
        "saving checkpoint failed: " + (error.empty() ? std::string("rank 0 could not complete the folder") : error),
        hint);
  return final_dir.string();
}

std::vector<int64_t> checkpoint_steps(const std::string& root) {
  std::vector<int64_t> steps;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return steps;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const int64_t s = step_of(e.path().filename().string());
    if (s >= 0 && fs::exists(e.path() / "trainer.json")) steps.push_back(s);
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

std::vector<int64_t> recover_checkpoint_swaps(const std::string& root) {
  std::vector<int64_t> recovered;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return recovered;
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(root, ec)) entries.push_back(e.path());
  std::sort(entries.begin(), entries.end());
  for (const fs::path& old : entries) {
    const std::string name = old.filename().string();
    const size_t at = name.find(".old.");
    if (at == std::string::npos) continue;
    const int64_t step = step_of(name.substr(0, at));
    const fs::path final_dir = fs::path(root) / checkpoint_name(step);
    if (step < 0) continue;
    if (fs::exists(fs::symlink_status(final_dir, ec))) {  // swapped: the kill came before its removal
      fs::remove_all(old, ec);
      continue;
    }
    // The new folder, complete (trainer.json is written last) under its temporary name, goes in;
    // else the old one goes back.
    fs::path newer;
    for (const fs::path& p : entries)
      if (p.filename().string().rfind(checkpoint_name(step) + ".tmp-", 0) == 0 && fs::exists(p / "trainer.json"))
        newer = p;
    fs::rename(newer.empty() ? old : newer, final_dir, ec);
    if (ec) throw Error(final_dir.string(), "cannot restore the checkpoint folder: " + ec.message());
    if (!newer.empty()) fs::remove_all(old, ec);
    recovered.push_back(step);
  }
  return recovered;
}

std::string latest_checkpoint(const std::string& root) {
  const auto steps = checkpoint_steps(root);
  return steps.empty() ? "" : (fs::path(root) / checkpoint_name(steps.back())).string();
}

namespace {
LoraBaseRef lora_base_of(const json& j, const std::string& path) {
  LoraBaseRef ref;
  if (j.contains("lora_base")) ref.path = trainer_string(j, path, "lora_base");
  if (j.contains("lora_base_fingerprint")) ref.fingerprint = trainer_string(j, path, "lora_base_fingerprint");
  return ref;
}
}  // namespace

bool is_adapter_weight(const std::string& name) {
  return name.find(".lora_A.") != std::string::npos || name.find(".lora_B.") != std::string::npos;
}

LoraBaseRef checkpoint_lora_base(const std::string& dir) {
  const std::string path = (fs::path(dir) / "trainer.json").string();
  std::ifstream in(path);
  if (!in) return {};
  json j;
  try {
    j = detail::parse_json(in, path);
  } catch (const json::exception& e) {
    throw Error(path, std::string("invalid JSON: ") + e.what(), "the checkpoint is corrupt");
  }
  return j.is_object() ? lora_base_of(j, path) : LoraBaseRef{};
}

std::vector<std::pair<std::string, torch::Tensor>> gather_rank_rng(Distributed& dist) {
  std::vector<std::pair<std::string, torch::Tensor>> mine;
  if (dist.world_size() <= 1) return {};
  add_rng_state(mine);  // rng.cpu [, rng.cuda]: the same sizes on every rank
  std::vector<torch::Tensor> parts;
  for (const auto& [name, t] : mine) parts.push_back(t.reshape({-1}));
  const torch::Tensor flat = torch::cat(parts);  // (L) bytes
  const int64_t L = flat.numel(), world = dist.world_size();
  torch::Tensor all = torch::empty({world * L}, flat.options());
  dist.all_gather(flat, all).wait();
  if (!dist.is_main()) return {};
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (int64_t r = 1; r < world; ++r) {
    int64_t off = r * L;
    for (const auto& [name, t] : mine) {  // "rng.cpu" -> "rng.rank<r>.cpu"
      out.emplace_back("rng.rank" + std::to_string(r) + name.substr(3), all.narrow(0, off, t.numel()).clone());
      off += t.numel();
    }
  }
  return out;
}

bool restore_rank_rng(const std::string& dir, int rank) {
  const fs::path path = fs::path(dir) / "optimizer.safetensors";
  const auto f = safetensors::File::open(path.string());
  const std::string prefix = "rng.rank" + std::to_string(rank);
  if (!f->find(prefix + ".cpu")) return false;
  set_rng(at::detail::getDefaultCPUGenerator(), *f, prefix + ".cpu");
  if (f->find(prefix + ".cuda") && compat::cuda_in_use())
    set_rng(at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, -1)), *f, prefix + ".cuda");
  return true;
}

TrainState load_checkpoint_state(const std::string& dir, AdamW& optim, int rank) {
  Transformer none{nullptr};
  return load_checkpoint(dir, none, optim, rank);
}

TrainState load_checkpoint(const std::string& dir, Transformer& model, AdamW& optim, int rank) {
  const std::string trainer_path = (fs::path(dir) / "trainer.json").string();
  std::ifstream in(trainer_path);
  if (!in) throw Error(dir, "not a libllm checkpoint (no trainer.json)", "point checkpoint.resume at a step-N folder");
  json j;
  try {
    j = detail::parse_json(in, trainer_path);
  } catch (const json::exception& e) {
    throw Error(trainer_path, std::string("invalid JSON: ") + e.what(), "the checkpoint is corrupt");
  }
  if (!j.is_object()) throw Error(trainer_path, "expected a JSON object", "the checkpoint is corrupt");
  for (const char* key : {"step", "data_cursor", "extra"})
    if (!j.contains(key)) throw Error(trainer_path, std::string("missing key '") + key + "'");
  // Every value is checked before anything is loaded.
  TrainState s;
  s.step = trainer_int(j, trainer_path, "step");
  // (a checkpoint folder is named for its step: a record that says another was damaged or edited)
  fs::path folder = fs::path(dir).lexically_normal();
  if (folder.filename().empty()) folder = folder.parent_path();  // ("step-00000010/")
  if (const int64_t named = step_of(folder.filename().string()); named >= 0 && named != s.step)
    throw Error(trainer_path,
                "says step " + std::to_string(s.step) + ", in the folder of step " + std::to_string(named),
                "the checkpoint is corrupt");
  s.data_cursor = trainer_string(j, trainer_path, "data_cursor");
  s.extra = trainer_string(j, trainer_path, "extra");
  const int64_t shards = j.contains("optimizer_shards") && !j["optimizer_shards"].is_null()
                             ? trainer_int(j, trainer_path, "optimizer_shards") : 0;
  const LoraBaseRef lora = lora_base_of(j, trainer_path);
  s.lora_base = lora.path;
  s.lora_base_fingerprint = lora.fingerprint;
  if (model && s.lora_base.empty()) load_weights(model, dir);
  // Adapters only: the frozen base is in place already.
  if (model && !s.lora_base.empty() && load_adapter_weights(model, dir) == 0)
    throw Error(dir, "holds only LoRA adapters, and the model has none",
                "resume it with finetune.method: lora and the same lora section");
  OptimizerFiles files(dir, shards);
  files.restore_rng(rank);
  try {
    optim.load_state(files.state_for(optim));
  } catch (const Error& e) {  // (a state that does not fit: name the checkpoint's optimizer files)
    if (e.where().rfind(dir, 0) == 0) throw;
    throw Error((fs::path(dir) / (shards > 0 ? "optimizer-shard-*-of-" + std::to_string(shards) + ".safetensors"
                                             : std::string("optimizer.safetensors")))
                        .string() +
                    ": " + e.where(),
                e.problem(), e.hint());
  }
  return s;
}

void prune_checkpoints(const std::string& root, const CheckpointConfig& cfg, int64_t keep_at_or_before) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return;
  // A folder that cannot be removed (another user's files in a shared run folder) is named once a
  // process: it keeps its disk space until someone removes it.
  static std::set<std::string> named;
  auto remove = [](const fs::path& dir) {
    std::error_code rm;
    fs::remove_all(dir, rm);
    if (rm && named.insert(dir.string()).second)
      fmt::print(stderr, "note: cannot remove {} ({}): remove it by hand to free its space\n", dir.string(),
                 rm.message());
  };
  for (const auto& e : fs::directory_iterator(root, ec))  // partial folders of dead processes
    if (e.path().filename().string().find(".tmp-") != std::string::npos) remove(e.path());
  const std::vector<int64_t> steps = checkpoint_steps(root);  // ascending
  int64_t needed = -1;
  for (int64_t s : steps)
    if (keep_at_or_before >= 0 && s <= keep_at_or_before) needed = s;
  // A milestone by this run's setting or by the one it was saved with (its recipe.yaml): a resume
  // that drops or changes checkpoint.milestone_every never deletes the milestones kept so far.
  auto milestone = [&](int64_t s) {
    if (cfg.milestone_every > 0 && s % cfg.milestone_every == 0) return true;
    try {
      const YAML::Node saved = YAML::LoadFile((fs::path(root) / checkpoint_name(s) / "recipe.yaml").string());
      const int64_t every = saved["checkpoint"]["milestone_every"].as<int64_t>(0);
      return every > 0 && s % every == 0;
    } catch (const YAML::Exception&) {
      return false;
    }
  };
  std::vector<int64_t> regular;
  for (int64_t s : steps)
    if (!milestone(s)) regular.push_back(s);
  for (size_t i = 0; i + cfg.keep_last < regular.size(); ++i) {
    // A rollback from this step or a later one goes back to `needed` or to a newer checkpoint:
    // those stay (with none at or before keep_at_or_before yet, any may be needed).
    if (keep_at_or_before >= 0 && regular[i] >= needed) continue;
    // Renamed first: a kill part-way leaves a partial folder (removed next time), never a
    // checkpoint folder whose trainer.json outlived its weights.
    const fs::path dir = fs::path(root) / checkpoint_name(regular[i]);
    const fs::path doomed =
        fs::path(root) / ("pruned-" + checkpoint_name(regular[i]) + ".tmp-" + std::to_string(::getpid()));
    fs::rename(dir, doomed, ec);
    remove(ec ? dir : doomed);
  }
}

}  // namespace libllm
