#include "libllm/finetune.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <nlohmann/json.hpp>

#include "atomic_file.h"
#include "libllm/checkpoint.h"
#include "libllm/config.h"
#include "libllm/error.h"
#include "libllm/hf.h"
#include "libllm/safetensors.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace libllm {

void FinetuneConfig::fields(Fields& f) {
  f.add("base", base);
  f.add("method", method).one_of({"full", "lora"});
}

void LoraConfig::fields(Fields& f) {
  f.add("rank", rank).min(1);
  f.add("alpha", alpha).min(1e-12);
  f.add("dropout", dropout).min(0).max(0.999);
  f.add("targets", targets);
  f.validate_with([this](const std::string& where) {
    if (targets.empty()) throw Error(where + ".targets", "is empty", "e.g. [q_proj, k_proj, v_proj, o_proj]");
  });
}

namespace {

// The module name's last component ("model.layers.0.self_attn.q_proj" -> "q_proj").
std::string leaf(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

std::vector<std::pair<std::string, LinearImpl*>> linears(Transformer& model) {
  std::vector<std::pair<std::string, LinearImpl*>> out;
  for (auto& m : model->named_modules("", /*include_self=*/false))
    if (auto* lin = m.value()->as<LinearImpl>()) out.emplace_back(m.key(), lin);
  return out;
}

}  // namespace

std::vector<std::pair<std::string, LinearImpl*>> lora_target_layers(Transformer& model, const LoraConfig& cfg) {
  std::set<std::string> wanted(cfg.targets.begin(), cfg.targets.end()), found;
  std::vector<std::pair<std::string, LinearImpl*>> out;
  for (auto& [name, lin] : linears(model)) {
    if (!wanted.count(leaf(name))) continue;
    out.emplace_back(name, lin);
    found.insert(leaf(name));
  }
  for (const auto& t : wanted) {
    if (found.count(t)) continue;
    std::set<std::string> names;
    for (auto& [name, lin] : linears(model)) names.insert(leaf(name));
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
    throw Error("lora.targets", "'" + t + "' names no projection of this model", "its projections: " + list);
  }
  return out;
}

void apply_lora(Transformer& model, const LoraConfig& cfg) {
  const auto targets = lora_target_layers(model, cfg);
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  for (auto& [name, lin] : targets) lin->add_lora(cfg.rank, cfg.alpha, cfg.dropout);
}

void merge_lora(Transformer& model) {
  for (auto& [name, lin] : linears(model)) lin->merge_lora();
}

bool has_lora(Transformer& model) {
  for (auto& [name, lin] : linears(model))
    if (lin->has_lora()) return true;
  return false;
}

ParamSummary summarize_parameters(Transformer& model) {
  ParamSummary s;
  for (auto& p : model->parameters()) {
    s.total += p.numel();
    if (p.requires_grad()) s.trainable += p.numel();
  }
  return s;
}

std::vector<std::pair<std::string, torch::Tensor>> trainable_parameters(Transformer& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& p : model->named_parameters())
    if (p.value().requires_grad()) out.emplace_back(p.key(), p.value());
  return out;
}

std::vector<LazyWeight> merged_weights_lazy(Transformer& model) {
  std::map<std::string, LinearImpl*> adapted;  // "<module>.weight" -> its layer
  for (auto& [name, lin] : linears(model))
    if (lin->has_lora()) adapted[name + ".weight"] = lin;
  std::vector<LazyWeight> out;
  for (auto& p : model->named_parameters()) {
    const std::string& name = p.key();
    if (is_adapter_weight(name)) continue;
    auto it = adapted.find(name);
    torch::Tensor w = p.value();
    if (it == adapted.end())
      out.push_back({name, w.sizes().vec(), [w] { return w.detach(); }});
    else
      out.push_back({name, w.sizes().vec(), [lin = it->second] { return lin->merged_weight(); }});
  }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> merged_weights(Transformer& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& w : merged_weights_lazy(model)) out.emplace_back(w.name, w.value());
  return out;
}

void export_peft_adapter(Transformer& model, const LoraConfig& cfg, const std::string& dir,
                         const std::string& base_model_name_or_path,
                         const std::function<void(const std::string&)>& more_files) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::set<std::string> targets;
  for (auto& [name, lin] : linears(model)) {
    if (!lin->has_lora()) continue;
    targets.insert(leaf(name));
    // PEFT's saved names drop the adapter name: base_model.model.<module>.lora_A.weight
    tensors.emplace_back("base_model.model." + name + ".lora_A.weight",
                         lin->lora_A->weight.detach().to(torch::kCPU, torch::kFloat32).contiguous());
    tensors.emplace_back("base_model.model." + name + ".lora_B.weight",
                         lin->lora_B->weight.detach().to(torch::kCPU, torch::kFloat32).contiguous());
  }
  if (tensors.empty()) throw Error(dir, "the model has no LoRA adapters to export", "export the merged model instead");

  write_folder_atomically(dir, FolderKind::peft_adapter, [&](const std::string& tmp_dir) {
    const fs::path tmp = tmp_dir;
    std::vector<safetensors::TensorView> views;
    for (auto& [name, t] : tensors) views.push_back({name, safetensors::DType::F32, t.sizes().vec(), t.data_ptr()});
    safetensors::write((tmp / "adapter_model.safetensors").string(), views, export_metadata());
    json c = {{"peft_type", "LORA"},
              {"task_type", "CAUSAL_LM"},
              {"base_model_name_or_path", base_model_name_or_path},
              {"r", cfg.rank},
              {"lora_alpha", cfg.alpha},
              {"lora_dropout", cfg.dropout},
              {"target_modules", std::vector<std::string>(targets.begin(), targets.end())},
              {"bias", "none"},
              {"fan_in_fan_out", false},
              {"inference_mode", true},
              {"init_lora_weights", true},
              {"modules_to_save", nullptr},
              {"layers_to_transform", nullptr},
              {"layers_pattern", nullptr},
              {"revision", nullptr}};
    // (rank_pattern, alpha_pattern, use_rslora and use_dora are left at their defaults by leaving
    // them out: PEFT before 0.6 / 0.7 / 0.9 refuses a config key it does not know.)
    detail::write_file_atomic((tmp / "adapter_config.json").string(), c.dump(2) + "\n");
    if (more_files) more_files(tmp_dir);
  });
}

}  // namespace libllm
