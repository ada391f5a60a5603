#include "libllm/checkpoint.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "libllm/config.h"
#include "libllm/error.h"
#include "libllm/hf.h"
#include "libllm/optim.h"
#include "libllm/safetensors.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace libllm {
namespace {

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

std::map<std::string, torch::Tensor> read_tensors(const std::string& path) {
  auto f = safetensors::File::open(path);
  std::map<std::string, torch::Tensor> out;
  for (const auto& t : f->tensors())
    out[t.name] = torch::from_blob(const_cast<uint8_t*>(f->data(t)), t.shape, torch_dtype_of(t.dtype)).clone();
  return out;
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.flush();
  if (!out) throw Error(path, "cannot write file", "check free disk space");
}

// "step-00000100" -> 100; -1 for anything else (partial folders end in .tmp-<pid>).
int64_t step_of(const std::string& name) {
  if (name.size() != 13 || name.rfind("step-", 0) != 0) return -1;
  for (size_t i = 5; i < name.size(); ++i)
    if (!isdigit(static_cast<unsigned char>(name[i]))) return -1;
  return std::stoll(name.substr(5));
}

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
    for (auto& p : model->named_parameters()) params.emplace_back(p.key(), p.value());
    write_tensors((tmp / "model.safetensors").string(), params);
    auto opt_state = optim.state();
    opt_state.emplace_back("rng.cpu", at::detail::getDefaultCPUGenerator().get_state());
    write_tensors((tmp / "optimizer.safetensors").string(), opt_state);
    write_text((tmp / "recipe.yaml").string(), recipe_yaml);
    if (!tokenizer_path.empty() && fs::exists(tokenizer_path)) fs::copy_file(tokenizer_path, tmp / "tokenizer.model");
    json trainer = {{"step", state.step}, {"data_cursor", state.data_cursor}, {"extra", state.extra},
                    {"format", "libllm-checkpoint-v1"}};
    write_text((tmp / "trainer.json").string(), trainer.dump(1) + "\n");
    if (fs::exists(final_dir)) {
      // The same step saved again (after a rollback): swap atomically, so a kill at any moment
      // leaves one complete folder under the name; the old one is then under the partial name.
      if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
        fs::remove_all(tmp, ec);
        return final_dir.string();
      }
      fs::remove_all(final_dir);  // a filesystem without RENAME_EXCHANGE
    }
    fs::rename(tmp, final_dir);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw Error(final_dir.string(), std::string("saving checkpoint failed: ") + e.what(), "check free disk space");
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
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

std::string latest_checkpoint(const std::string& root) {
  const auto steps = checkpoint_steps(root);
  return steps.empty() ? "" : (fs::path(root) / checkpoint_name(steps.back())).string();
}

TrainState load_checkpoint(const std::string& dir, Transformer& model, AdamW& optim) {
  const std::string trainer_path = (fs::path(dir) / "trainer.json").string();
  std::ifstream in(trainer_path);
  if (!in) throw Error(dir, "not a libllm checkpoint (no trainer.json)", "point checkpoint.resume at a step-N folder");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw Error(trainer_path, std::string("invalid JSON: ") + e.what());
  }
  for (const char* key : {"step", "data_cursor", "extra"})
    if (!j.contains(key)) throw Error(trainer_path, std::string("missing key '") + key + "'");
  load_weights(model, dir);
  auto opt = read_tensors((fs::path(dir) / "optimizer.safetensors").string());
  auto rng = opt.find("rng.cpu");
  if (rng == opt.end()) throw Error(dir + "/optimizer.safetensors", "missing tensor 'rng.cpu'");
  at::Generator gen = at::detail::getDefaultCPUGenerator();  // shares the default generator
  gen.set_state(rng->second);
  opt.erase(rng);
  optim.load_state(opt);
  TrainState s;
  s.step = j["step"].get<int64_t>();
  s.data_cursor = j["data_cursor"].get<std::string>();
  s.extra = j["extra"].get<std::string>();
  return s;
}

void prune_checkpoints(const std::string& root, const CheckpointConfig& cfg) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return;
  for (const auto& e : fs::directory_iterator(root, ec))  // partial folders of dead processes
    if (e.path().filename().string().find(".tmp-") != std::string::npos) fs::remove_all(e.path(), ec);
  std::vector<int64_t> regular;
  for (int64_t s : checkpoint_steps(root))
    if (cfg.milestone_every <= 0 || s % cfg.milestone_every != 0) regular.push_back(s);
  for (size_t i = 0; i + cfg.keep_last < regular.size(); ++i)
    fs::remove_all(fs::path(root) / checkpoint_name(regular[i]), ec);
}

}  // namespace libllm
