#include "libllm/hf.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "atomic_file.h"
#include "jsonl.h"
#include "libllm/checkpoint.h"
#include "libllm/compat.h"
#include "libllm/config.h"
#include "libllm/data.h"
#include "libllm/error.h"
#include "libllm/recipe.h"
#include "libllm/safetensors.h"
#include "libllm/tokenizer.h"
#include "libllm/torch_file.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace libllm {
namespace {

json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(path, "cannot open file");
  try {
    return detail::parse_json(in, path);
  } catch (const json::exception& e) {
    throw Error(path, std::string("invalid JSON: ") + e.what());
  }
}

// A JSON integer as int64 (2.5 or "2" are errors, not truncated or converted).
int64_t integer_value(const json& v, const std::string& where) {
  if (!v.is_number_integer()) throw Error(where, "expected an integer, got " + detail::shown(v));
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    throw Error(where, "is out of range: " + detail::shown(v));
  return v.get<int64_t>();
}

// Typed access to config.json keys with errors that name the key.
struct ConfigReader {
  const json& j;
  std::string file;

  const json* get(const char* key) const {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  }
  int64_t integer(const char* key, c10::optional<int64_t> fallback = c10::nullopt) const {
    const json* v = get(key);
    if (!v) {
      if (fallback) return *fallback;
      throw Error(file + ": " + key, "missing key", "a transformers config.json for LLaMA has it");
    }
    return integer_value(*v, file + ": " + key);
  }
  double number(const char* key, double fallback) const {
    const json* v = get(key);
    if (!v) return fallback;
    if (!v->is_number()) throw Error(file + ": " + key, "expected a number, got " + detail::shown(*v));
    return v->get<double>();
  }
  // The same with the lower limit ModelConfig sets for the recipe key it maps to (a present key
  // below it is an error; the fallback is not checked).
  int64_t integer_at_least(const char* key, int64_t min, c10::optional<int64_t> fallback = c10::nullopt) const {
    const int64_t v = integer(key, fallback);
    if (get(key) && v < min)
      throw Error(file + ": " + key, "must be >= " + std::to_string(min) + ", got " + std::to_string(v));
    return v;
  }
  double number_at_least(const char* key, double min, double fallback) const {
    const double v = number(key, fallback);
    if (get(key) && !(v >= min)) {
      std::ostringstream m;
      m << min;
      throw Error(file + ": " + key, "must be >= " + m.str() + ", got " + detail::shown(*get(key)));
    }
    return v;
  }
  bool boolean(const char* key, bool fallback) const {
    const json* v = get(key);
    if (!v) return fallback;
    if (!v->is_boolean()) throw Error(file + ": " + key, "expected true or false, got " + detail::shown(*v));
    return v->get<bool>();
  }
  std::string string(const char* key, const std::string& fallback) const {
    const json* v = get(key);
    if (!v) return fallback;
    if (!v->is_string()) throw Error(file + ": " + key, "expected a string, got " + detail::shown(*v));
    return v->get<std::string>();
  }
};

// The tensors of a weights folder: name -> (file, entry). Files stay open while this lives.
// safetensors (model.safetensors, or shards listed in model.safetensors.index.json) are preferred,
// as transformers prefers them; else torch.save files (pytorch_model.bin, or shards listed in
// pytorch_model.bin.index.json).
struct WeightIndex {
  struct Entry {
    const safetensors::File* st = nullptr;  // a safetensors tensor, or
    const safetensors::TensorInfo* st_info = nullptr;
    const torchfile::File* pt = nullptr;    // a torch.save tensor
    const torchfile::TensorInfo* pt_info = nullptr;
  };
  std::vector<std::shared_ptr<safetensors::File>> files;
  std::vector<std::shared_ptr<torchfile::File>> torch_files;
  std::map<std::string, Entry> tensors;
  std::string dir;

  // A stored tensor on the CPU: a zero-copy view of a file's mapping (valid while this index
  // lives; a torch.save tensor may be strided).
  torch::Tensor view(const std::string& name) const {
    const Entry& e = tensors.at(name);
    if (e.pt) return e.pt->read(*e.pt_info);
    return torch::from_blob(const_cast<uint8_t*>(e.st->data(*e.st_info)), e.st_info->shape,
                            torch::dtype(torch_dtype_of(e.st_info->dtype)));
  }

  // Its stored shape (from the header: nothing is read).
  std::vector<int64_t> shape(const std::string& name) const {
    const Entry& e = tensors.at(name);
    return e.pt ? e.pt_info->shape : e.st_info->shape;
  }
  // Its stored dtype (from the header: nothing is read).
  torch::Dtype dtype(const std::string& name) const {
    const Entry& e = tensors.at(name);
    return e.pt ? e.pt_info->dtype : torch_dtype_of(e.st_info->dtype);
  }
  // Checks each safetensors file against the checksum libllm's writer recorded (files of other
  // tools have none; .bin files neither): after the headers, before the data is used.
  void verify() const {
    for (const auto& f : files) f->verify();
  }

  // Done with a tensor: its mapped pages leave this process's memory.
  void release(const std::string& name) const {
    const Entry& e = tensors.at(name);
    if (e.st) e.st->release(*e.st_info);
    else
      e.pt->release(*e.pt_info);
  }

  void add(const safetensors::File& f, const safetensors::TensorInfo& t) {
    tensors[t.name] = {&f, &t, nullptr, nullptr};
  }
  void add(const torchfile::File& f, const torchfile::TensorInfo& t) { tensors[t.name] = {nullptr, nullptr, &f, &t}; }
  template <class F>
  void add_all(const F& f) {
    for (const auto& t : f.tensors()) add(f, t);
  }
};

// Reads an index's weight_map: for each (name, shard file) calls add_from_shard(path, name), which
// adds that tensor from the shard (opened once) and returns false if the shard lacks it.
void read_index(const fs::path& index, const std::string& dir,
                const std::function<bool(const fs::path&, const std::string&)>& add_from_shard) {
  json j = read_json(index.string());
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw Error(index.string(), "missing object 'weight_map'");
  for (auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string()) throw Error(index.string() + ": weight_map." + name, "expected a file name");
    const std::string fname = file.get<std::string>();
    if (fname.empty() || fname == "." || fname.find('/') != std::string::npos || fname.find("..") != std::string::npos)
      throw Error(index.string() + ": weight_map." + name, "file name '" + fname + "' is no file of the folder",
                  "the index is corrupt");
    const fs::path p = fs::path(dir) / fname;
    if (!add_from_shard(p, name))
      throw Error(p.string() + ": tensor '" + name + "'", "listed in the index but not in the shard");
  }
}

// Adds the tensors an index lists, opening each shard (a safetensors::File or torchfile::File)
// once and keeping it in `files`.
template <class F>
void add_shards(WeightIndex& idx, const fs::path& index, std::vector<std::shared_ptr<F>>& files) {
  std::map<std::string, std::shared_ptr<F>> by_file;
  read_index(index, idx.dir, [&](const fs::path& p, const std::string& name) {
    auto& f = by_file[p.string()];
    if (!f) {
      if (!fs::exists(p)) throw Error(p.string(), "shard listed in the index is missing");
      files.push_back(f = F::open(p.string()));
    }
    const auto* t = f->find(name);
    if (!t) return false;
    idx.add(*f, *t);
    return true;
  });
}

WeightIndex open_weights(const std::string& dir) {
  WeightIndex idx;
  idx.dir = dir;
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  const fs::path bin = fs::path(dir) / "pytorch_model.bin";
  const fs::path bin_index = fs::path(dir) / "pytorch_model.bin.index.json";
  if (fs::exists(index)) {
    add_shards(idx, index, idx.files);
  } else if (fs::exists(single)) {
    idx.files.push_back(safetensors::File::open(single.string()));
    idx.add_all(*idx.files.back());
  } else if (fs::exists(bin_index)) {
    add_shards(idx, bin_index, idx.torch_files);
  } else if (fs::exists(bin)) {
    idx.torch_files.push_back(torchfile::File::open(bin.string()));
    idx.add_all(*idx.torch_files.back());
  } else {
    throw Error(dir, "no weights: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)",
                "a Hugging Face model folder as save_pretrained writes it");
  }
  return idx;
}

std::string model_type_of(const std::string& arch) {
  if (arch == "MixtralForCausalLM") return "mixtral";
  if (arch == "MistralForCausalLM") return "mistral";
  return "llama";
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

}  // namespace

torch::Dtype torch_dtype_of(safetensors::DType d) {
  using D = safetensors::DType;
  switch (d) {
    case D::F32: return torch::kFloat32;
    case D::F16: return torch::kFloat16;
    case D::BF16: return torch::kBFloat16;
    case D::F64: return torch::kFloat64;
    case D::I64: return torch::kInt64;
    case D::I32: return torch::kInt32;
    case D::I16: return torch::kInt16;
    case D::I8: return torch::kInt8;
    case D::U8: return torch::kUInt8;
    case D::BOOL: return torch::kBool;
  }
  return torch::kFloat32;
}

safetensors::DType st_dtype_of(torch::Dtype d) {
  using D = safetensors::DType;
  switch (d) {
    case torch::kFloat32: return D::F32;
    case torch::kFloat16: return D::F16;
    case torch::kBFloat16: return D::BF16;
    case torch::kFloat64: return D::F64;
    case torch::kInt64: return D::I64;
    case torch::kInt32: return D::I32;
    case torch::kUInt8: return D::U8;
    default: throw Error("", std::string("cannot store dtype ") + c10::toString(d) + " in safetensors");
  }
}

torch::Dtype dtype_from_name(const std::string& name, const std::string& where) {
  if (name == "float32" || name == "fp32") return torch::kFloat32;
  if (name == "bfloat16" || name == "bf16") return torch::kBFloat16;
  if (name == "float16" || name == "fp16") return torch::kFloat16;
  throw Error(where, "unknown dtype '" + name + "'", "use float32, bfloat16 or float16");
}

torch::Dtype compute_dtype(const std::string& name, const torch::Device& device, const std::string& where) {
  const std::string cuda_too = device.is_cuda() ? ", or fp16" : "";
  if (name != "fp32" && name != "float32" && name != "bf16" && name != "bfloat16" && name != "fp16" &&
      name != "float16")
    throw Error(where, "unknown dtype '" + name + "'", "use fp32 or bf16" + cuda_too);
  const torch::Dtype dtype = dtype_from_name(name, where);
  if (dtype == torch::kFloat16 && !device.is_cuda())
    throw Error(where, "is " + name + ", which LibTorch cannot compute on the CPU", "use bf16 (or fp32) on the CPU");
  return dtype;
}

torch::Device device_from_name(const std::string& name, const std::string& where) {
  if (name == "cpu") return torch::kCPU;
  if (name != "cuda" && name != "auto") throw Error(where, "unknown device '" + name + "'", "use cpu, cuda or auto");
  if (compat::cuda_available()) {
    compat::cuda_set_device(0);
    return torch::Device(torch::kCUDA, 0);
  }
  if (name == "auto") return torch::kCPU;
  throw Error(where, "is cuda, but no CUDA device is usable (LibTorch " + compat::torch_version() + ")",
              "use cpu, or build libllm against a LibTorch with CUDA");
}

std::string dtype_name(torch::Dtype dtype) {
  switch (dtype) {
    case torch::kFloat32: return "float32";
    case torch::kBFloat16: return "bfloat16";
    case torch::kFloat16: return "float16";
    default: return c10::toString(dtype);
  }
}

HfConfig read_hf_config(const std::string& dir) {
  const std::string file = (fs::path(dir) / "config.json").string();
  const json j = read_json(file);
  if (!j.is_object()) throw Error(file, "expected a JSON object");
  ConfigReader r{j, file};
  HfConfig out;
  const json* archs = r.get("architectures");
  if (archs && (!archs->is_array() || (!archs->empty() && !(*archs)[0].is_string())))
    throw Error(file + ": architectures", "expected a list of class names, got " + detail::shown(*archs),
                "e.g. [\"LlamaForCausalLM\"]");
  if (archs && !archs->empty())
    out.architecture = (*archs)[0].get<std::string>();
  else {
    const std::string mt = r.string("model_type", "");
    out.architecture = mt == "llama" ? "LlamaForCausalLM" : mt == "mistral" ? "MistralForCausalLM"
                     : mt == "mixtral" ? "MixtralForCausalLM" : "";
  }
  static const std::set<std::string> known = {"LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"};
  if (!known.count(out.architecture))
    throw Error(file + ": architectures", "unsupported architecture '" + out.architecture + "'",
                "libllm reads LlamaForCausalLM, MistralForCausalLM and MixtralForCausalLM");
  // rope_scaling: null, or transformers' unscaled {"rope_type" (or "type"): "default"}.
  const json* scaling = r.get("rope_scaling");
  if (scaling) {
    const std::string where = file + ": rope_scaling";
    bool plain = scaling->is_object();
    if (plain)
      for (const auto& [key, v] : scaling->items()) {
        if (key == "rope_type" || key == "type")
          plain = plain && v == "default";
        else
          plain = plain && v.is_null();
      }
    if (!plain)
      throw Error(where, "rope scaling is not supported, got " + detail::shown(*scaling),
                  "use a checkpoint without rope_scaling (or with {\"rope_type\": \"default\"})");
  }
  if (r.boolean("attention_bias", false)) throw Error(file + ": attention_bias", "attention biases are not supported");
  if (r.boolean("mlp_bias", false)) throw Error(file + ": mlp_bias", "MLP biases are not supported");
  // Training-time regularisers libllm does not have (inference is the same without them).
  for (const char* key : {"attention_dropout", "router_jitter_noise"})
    if (const double v = r.number_at_least(key, 0, 0.0); v > 0)
      out.ignored.push_back(std::string(key) + " " + detail::shown(json(v)));
  const std::string act = r.string("hidden_act", "silu");
  if (act != "silu") throw Error(file + ": hidden_act", "only 'silu' (SwiGLU) is supported, got '" + act + "'");

  ModelConfig& m = out.model;
  // An absent key takes the default of the architecture's transformers config class (LlamaConfig,
  // MistralConfig, MixtralConfig); null is absent, except for Mistral's sliding_window.
  const bool llama = out.architecture == "LlamaForCausalLM", mixtral = out.architecture == "MixtralForCausalLM";
  m.vocab_size = r.integer("vocab_size");
  m.dim = r.integer("hidden_size");
  m.ffn_dim = r.integer("intermediate_size");
  m.n_layers = r.integer("num_hidden_layers");
  m.n_heads = r.integer("num_attention_heads");
  m.n_kv_heads = r.integer("num_key_value_heads", llama ? m.n_heads : 8);
  // The limits of the recipe keys these map to (ModelConfig::fields); head_dim 0 is libllm's
  // "derived", which a present HF head_dim never means.
  m.head_dim = r.integer_at_least("head_dim", 1, 0);
  m.norm_eps = r.number_at_least("rms_norm_eps", 0, mixtral ? 1e-5 : 1e-6);
  m.rope_theta = r.number_at_least("rope_theta", 1, mixtral ? 1e6 : 10000.0);
  // transformers >= 5 writes the RoPE settings as rope_parameters {rope_type, rope_theta}.
  if (const json* rp = r.get("rope_parameters")) {
    const std::string where = file + ": rope_parameters";
    if (!rp->is_object()) throw Error(where, "expected an object, got " + detail::shown(*rp));
    const ConfigReader p{*rp, where};
    const std::string type = p.string("rope_type", "default");
    if (type != "default")
      throw Error(where + ": rope_type", "rope scaling ('" + type + "') is not supported",
                  "use a checkpoint without rope scaling");
    for (const auto& [key, v] : rp->items())
      if (key != "rope_type" && key != "rope_theta" && !v.is_null())
        throw Error(where + ": " + key, "is not supported (libllm's RoPE is unscaled and covers whole heads)",
                    "use a checkpoint whose rope_parameters hold only rope_type \"default\" and rope_theta");
    m.rope_theta = p.number_at_least("rope_theta", 1, m.rope_theta);
  }
  m.max_seq_len = r.integer("max_position_embeddings", llama ? 2048 : 4096 * 32);
  m.tie_embeddings = r.boolean("tie_word_embeddings", false);
  m.init_std = r.number_at_least("initializer_range", 0, 0.02);
  if (out.architecture == "MistralForCausalLM")
    m.sliding_window = j.contains("sliding_window") ? r.integer_at_least("sliding_window", 0, 0) : 4096;
  else if (mixtral)
    m.sliding_window = r.integer_at_least("sliding_window", 0, 0);
  if (mixtral) {
    m.n_experts = r.integer_at_least("num_local_experts", 1, 8);
    m.n_experts_per_token = r.integer_at_least("num_experts_per_tok", 1, 2);
    m.moe_aux_loss_coef = r.number_at_least("router_aux_loss_coef", 0, 0.001);
  }
  out.torch_dtype = r.get("torch_dtype") ? r.string("torch_dtype", "") : r.string("dtype", "float32");  // (v5: dtype)
  out.bos_id = r.integer("bos_token_id", 1);
  // eos_token_id: one id, or a list of them (the first is the one libllm stops at and exports).
  const json* eos = r.get("eos_token_id");
  if (eos && eos->is_array()) {
    for (const auto& e : *eos)
      if (!e.is_number_integer())
        throw Error(file + ": eos_token_id", "expected an integer or a list of integers, got " + detail::shown(*eos));
    if (eos->empty()) throw Error(file + ": eos_token_id", "is an empty list", "give at least one token id");
    out.eos_id = integer_value((*eos)[0], file + ": eos_token_id");
  } else {
    out.eos_id = r.integer("eos_token_id", 2);
  }
  for (const json& e : eos && eos->is_array() ? *eos : json::array({out.eos_id}))
    if (e.get<int64_t>() < 0 || e.get<int64_t>() >= m.vocab_size)
      throw Error(
          file + ": eos_token_id",
          std::to_string(e.get<int64_t>()) + " is outside the vocabulary [0, " + std::to_string(m.vocab_size) + ")",
          "the file is damaged, or its vocab_size is wrong");
  for (auto [key, v] : {std::pair{"vocab_size", m.vocab_size}, {"hidden_size", m.dim},
                        {"intermediate_size", m.ffn_dim}, {"num_hidden_layers", m.n_layers},
                        {"num_attention_heads", m.n_heads}, {"num_key_value_heads", m.n_kv_heads},
                        {"max_position_embeddings", m.max_seq_len}})
    if (v <= 0) throw Error(file + ": " + key, "must be positive, got " + std::to_string(v));
  // (ids outside the embedding would seed an evaluation, or stop nothing; on a GPU, an index assert)
  if (out.bos_id < 0 || out.bos_id >= m.vocab_size)
    throw Error(file + ": bos_token_id",
                std::to_string(out.bos_id) + " is outside the vocabulary [0, " + std::to_string(m.vocab_size) + ")",
                "the file is damaged, or its vocab_size is wrong");
  m.validate(file);
  m.resolve();
  return out;
}

std::string hf_config_json(const ModelConfig& cfg, const std::string& torch_dtype, int64_t bos_id, int64_t eos_id) {
  const std::string arch = cfg.hf_architecture();
  json j;
  j["architectures"] = {arch};
  j["model_type"] = model_type_of(arch);
  j["vocab_size"] = cfg.vocab_size;
  j["hidden_size"] = cfg.dim;
  j["intermediate_size"] = cfg.ffn_dim;
  j["num_hidden_layers"] = cfg.n_layers;
  j["num_attention_heads"] = cfg.n_heads;
  j["num_key_value_heads"] = cfg.kv_heads();
  j["head_dim"] = cfg.hdim();
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = cfg.max_seq_len;
  j["rms_norm_eps"] = cfg.norm_eps;
  j["rope_theta"] = cfg.rope_theta;
  j["rope_scaling"] = nullptr;
  j["tie_word_embeddings"] = cfg.tie_embeddings;
  j["attention_dropout"] = 0.0;
  j["initializer_range"] = cfg.init_std;
  j["bos_token_id"] = bos_id;
  j["eos_token_id"] = eos_id;
  j["torch_dtype"] = torch_dtype;
  j["use_cache"] = true;
  if (arch == "LlamaForCausalLM") {
    j["attention_bias"] = false;
    j["mlp_bias"] = false;
  } else {
    j["sliding_window"] = cfg.sliding_window > 0 ? json(cfg.sliding_window) : json(nullptr);
  }
  if (arch == "MixtralForCausalLM") {
    j["num_local_experts"] = cfg.n_experts;
    j["num_experts_per_tok"] = cfg.n_experts_per_token;
    j["router_aux_loss_coef"] = cfg.moe_aux_loss_coef;
    j["output_router_logits"] = false;
  }
  return j.dump(2) + "\n";
}

std::map<std::string, torch::Tensor> read_weights(const std::string& dir) {
  WeightIndex idx = open_weights(dir);
  idx.verify();
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, entry] : idx.tensors) out[name] = idx.view(name).clone();
  return out;
}

namespace {

using ParamShapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;

// Every parameter of `params` is in the folder with its exact shape, and nothing else is (stale
// rotary inv_freq buffers aside, and a stored lm_head when `tied`): checked from the headers.
void check_weights(const WeightIndex& idx, const ParamShapes& params, bool tied) {
  std::set<std::string> expected;
  for (const auto& [name, shape] : params) {
    if (!idx.tensors.count(name))
      throw Error(idx.dir + ": tensor '" + name + "'", "missing from the checkpoint",
                  "the checkpoint does not match its config (layers, experts or tied embeddings)");
    const std::vector<int64_t> stored = idx.shape(name);
    if (stored != shape)
      throw Error(idx.dir + ": tensor '" + name + "'",
                  "has shape " + shape_str(stored) + " but the config implies " + shape_str(shape));
    if (const torch::Dtype d = idx.dtype(name); !c10::isFloatingType(d))
      throw Error(idx.dir + ": tensor '" + name + "'",
                  std::string("is stored as ") + c10::toString(d) + ", not as floating-point weights",
                  "the file is corrupt, or its weights are quantized (libllm reads float32, bfloat16 and float16)");
    expected.insert(name);
  }
  for (const auto& [name, entry] : idx.tensors) {
    if (expected.count(name) || ends_with(name, "rotary_emb.inv_freq") || (tied && name == "lm_head.weight")) continue;
    throw Error(idx.dir + ": tensor '" + name + "'", "is not a parameter of this model",
                "the checkpoint does not match its config");
  }
}

}  // namespace

void load_weights(const std::string& dir, const ParamShapes& params, bool tied,
                  const std::function<void(const std::string&, const torch::Tensor&)>& store, bool verify) {
  WeightIndex idx = open_weights(dir);
  check_weights(idx, params, tied);
  if (verify) idx.verify();
  torch::NoGradGuard no_grad;
  for (const auto& [name, shape] : params) {
    store(name, idx.view(name));
    idx.release(name);  // copied: its pages need not stay in this process's resident memory
  }
}

void load_weights(Transformer& model, const std::string& dir) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> params;
  std::map<std::string, torch::Tensor> by_name;
  for (auto& p : model->named_parameters()) {
    params.emplace_back(p.key(), p.value().sizes().vec());
    by_name[p.key()] = p.value();
  }
  load_weights(dir, params, !model->lm_head, [&](const std::string& name, const torch::Tensor& src) {
    torch::Tensor& p = by_name.at(name);
    if (!is_unallocated(p)) {
      p.copy_(src);
      return;
    }
    auto t = torch::empty(p.sizes(), p.options());  // a deferred model's weight, allocated as it is read
    t.copy_(src);
    p.set_data(t);
  });
}

size_t load_adapter_weights(Transformer& model, const std::string& dir) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> params;
  std::map<std::string, torch::Tensor> by_name;
  for (auto& p : model->named_parameters())
    if (is_adapter_weight(p.key())) {
      params.emplace_back(p.key(), p.value().sizes().vec());
      by_name[p.key()] = p.value();
    }
  if (params.empty()) return 0;
  torch::NoGradGuard no_grad;
  load_weights(dir, params, !model->lm_head,
               [&](const std::string& name, const torch::Tensor& src) { by_name.at(name).copy_(src); });
  return params.size();
}

const std::map<std::string, std::string>& export_metadata() {
  static const std::map<std::string, std::string> meta = {{"format", "pt"}, {"written_by", "libllm"}};
  return meta;
}

namespace {

// Throws, naming the tensor, when `converted` (`source` cast to the export's dtype) holds NaN or
// infinities: the source's own (a broken checkpoint), or values beyond the dtype's range (fp16).
void check_finite(const std::string& where, const torch::Tensor& source, const torch::Tensor& converted,
                  const std::string& dtype) {
  if (!converted.is_floating_point() || torch::isfinite(converted).all().item<bool>()) return;
  const torch::Tensor finite = torch::isfinite(source);
  if (!finite.all().item<bool>())
    throw Error(where, "holds " + std::to_string((~finite).sum().item<int64_t>()) + " NaN or infinite values",
                "the checkpoint is broken (a diverged run?): export an earlier one");
  throw Error(
      where,
      fmt::format("has values beyond {}'s range (largest magnitude {:.4g})", dtype, source.abs().max().item<double>()),
      "export with --dtype bfloat16 or float32");
}

// "model-00001-of-00003.safetensors": a shard export_hf writes.
bool is_weight_shard(const std::string& name) {
  const std::string a = "model-", b = "-of-", c = ".safetensors";
  if (name.size() != a.size() + 5 + b.size() + 5 + c.size()) return false;
  if (name.compare(0, a.size(), a) != 0 || name.compare(a.size() + 5, b.size(), b) != 0 ||
      name.compare(name.size() - c.size(), c.size(), c) != 0)
    return false;
  for (size_t i : {a.size(), a.size() + 5 + b.size()})
    for (size_t k = i; k < i + 5; ++k)
      if (!isdigit(static_cast<unsigned char>(name[k]))) return false;
  return true;
}

const char* kind_name(FolderKind kind) {
  return kind == FolderKind::peft_adapter ? "PEFT adapter folder" : "Hugging Face export";
}

// The marker an export's temporary folder holds while it is written, and the folders it replaces
// while they move: "<host> <pid>".
constexpr const char* kPartialMarker = ".libllm-export-in-progress";

// Why an existing `dir` must not be replaced by a folder of `kind`; "" when it may be: it is
// empty, or it holds only what such a folder holds (an earlier export). Anything else (a run
// folder, a checkpoint, the other kind of export, a file of the user's) is never deleted.
std::string not_replaceable(const fs::path& dir, FolderKind kind) {
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(dir, ec);
  if (fs::is_symlink(st)) return "is a symbolic link";
  if (!fs::is_directory(st)) return "exists and is not a folder";
  static const std::set<std::string> hf_files = {
      "config.json",     "generation_config.json", "model.safetensors", "model.safetensors.index.json",
      "tokenizer.model", "tokenizer_config.json",  "tokenizer.json",    "special_tokens_map.json"};
  static const std::set<std::string> peft_files = {"adapter_config.json", "adapter_model.safetensors",
                                                   "tokenizer.model",     "tokenizer_config.json",
                                                   "tokenizer.json",      "special_tokens_map.json"};
  const std::string not_ours = std::string("is not empty and not an earlier ") + kind_name(kind);
  std::set<std::string> names;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code ec2;
    if (it->is_directory(ec2)) return not_ours + " (it holds the folder '" + name + "')";
    if (name == kPartialMarker) continue;  // (an export killed while it moved in)
    const bool known = kind == FolderKind::peft_adapter ? peft_files.count(name) > 0
                                                        : hf_files.count(name) > 0 || is_weight_shard(name);
    if (!known) return not_ours + " (it holds '" + name + "')";
    names.insert(name);
  }
  if (ec) return "cannot be listed: " + ec.message();
  if (names.empty()) return "";
  if (kind == FolderKind::peft_adapter) {
    if (!names.count("adapter_config.json") || !names.count("adapter_model.safetensors"))
      return not_ours + " (no adapter_config.json with adapter_model.safetensors)";
  } else {
    bool weights = names.count("model.safetensors") > 0;
    for (const auto& n : names) weights = weights || is_weight_shard(n);
    if (!names.count("config.json") || !weights) return not_ours + " (no config.json with model*.safetensors)";
  }
  // Its weights were written by libllm (not a model saved by transformers: a downloaded base).
  // Unmarked ones of an earlier libllm: an HF folder whose config.json lacks the
  // transformers_version that save_pretrained always writes, or a PEFT adapter folder.
  bool unmarked_ours = kind == FolderKind::peft_adapter;
  if (!unmarked_ours) try {
      const json config = read_json((dir / "config.json").string());
      unmarked_ours = config.is_object() && !config.contains("transformers_version");
    } catch (const Error&) {
    }
  for (const auto& n : names) {
    if (n != "model.safetensors" && n != "adapter_model.safetensors" && !is_weight_shard(n)) continue;
    bool ours = false;
    try {
      const auto file = safetensors::File::open((dir / n).string());  // (alive while its metadata is read)
      const auto it = file->metadata().find("written_by");
      ours = it != file->metadata().end() ? it->second == "libllm" : unmarked_ours;
    } catch (const Error&) {  // (unreadable: not known to be ours)
    }
    if (!ours)
      return not_ours + " (its " + n +
             " was not written by libllm's export: a model of its own, such as a downloaded base, is never replaced)";
  }
  return "";
}

// The output folder `dir` names: absolute and without trailing separators ("out/", "out/."), so
// that it has a name to build the temporary folder beside.
fs::path output_folder(const std::string& dir) {
  if (dir.empty()) throw Error("output folder", "is empty", "give a folder name");
  std::error_code ec;
  fs::path final_dir = fs::absolute(fs::path(dir), ec).lexically_normal();
  if (ec) throw Error(dir, "cannot resolve the folder: " + ec.message());
  while (!final_dir.has_filename() && final_dir.has_relative_path()) final_dir = final_dir.parent_path();
  if (!final_dir.has_filename() || final_dir.filename() == "." || final_dir.filename() == "..")
    throw Error(dir, "is not a folder that can be written", "give a folder name");
  return final_dir;
}

std::string host_name() {
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  return host;
}

// Removes `<name>.partial.<pid>` folders beside `final_dir` that an export of this machine left
// (their marker names this host and that pid) and whose process is gone (killed part-way, by
// Ctrl-C or worse): they would otherwise stay, as large as the model. Another machine's (a shared
// filesystem), a live process's and folders without the marker (but for an empty `.partial.<pid>`,
// killed before its marker was written) are left alone. The same for
// `<name>.old.<pid>`, the earlier export a filesystem without RENAME_EXCHANGE (NFS) steps aside
// while the new one moves in (move_folder_into_place): put back where `final_dir` is missing.
void remove_dead_partials(const fs::path& final_dir) {
  const std::string name = final_dir.filename().string();
  std::error_code ec;
  std::vector<std::pair<fs::path, bool>> found;  // (folder, is an .old one)
  for (fs::directory_iterator it(final_dir.parent_path(), ec), end; !ec && it != end; it.increment(ec)) {
    const std::string entry = it->path().filename().string();
    for (const std::string suffix : {".partial.", ".old."}) {
      const std::string prefix = name + suffix;
      if (entry.compare(0, prefix.size(), prefix) != 0) continue;
      const std::string digits = entry.substr(prefix.size());
      const std::optional<int64_t> pid = parse_int(digits);
      if (digits.find_first_not_of("0123456789") != std::string::npos || !pid || *pid <= 0 || *pid > INT_MAX) continue;
      std::ifstream marker(it->path() / kPartialMarker);
      std::string owner;
      std::getline(marker, owner);
      std::error_code empty_ec;  // (a .partial folder killed before its marker was written is empty)
      const bool empty = suffix == ".partial." && fs::is_directory(it->path(), empty_ec) &&
                         fs::is_empty(it->path(), empty_ec) && !empty_ec;
      if (owner != host_name() + " " + digits && !empty) continue;
      if (::kill(static_cast<pid_t>(*pid), 0) == 0 || errno != ESRCH) continue;  // (alive, or not ours to know)
      found.emplace_back(it->path(), suffix == ".old.");
    }
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  for (const auto& [path, old] : found) {  // (the .old ones first: one may go back into place)
    std::error_code rm;
    if (old && !fs::exists(fs::symlink_status(final_dir, rm))) {
      fs::rename(path, final_dir, rm);
      if (!rm) {
        fs::remove(final_dir / kPartialMarker, rm);
        fmt::print(stderr, "note: put {} back as {}: an interrupted export had moved it aside\n", path.string(),
                   final_dir.string());
        continue;
      }
    }
    rm.clear();
    fs::remove_all(path, rm);
    if (!rm) fmt::print(stderr, "note: removed {}, left by an interrupted export\n", path.string());
  }
}

}  // namespace

void move_folder_into_place(const std::string& tmp_dir, const std::string& final_path) {
  const fs::path tmp(tmp_dir), final_dir(final_path);
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(final_dir, ec))) return fs::rename(tmp, final_dir);
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(tmp, ec);  // now the old folder
    return;
  }
  const int err = errno;
  if (err != EINVAL && err != ENOSYS)
    throw fs::filesystem_error("cannot swap the new folder into place", tmp, final_dir,
                               std::error_code(err, std::generic_category()));
  // A filesystem without RENAME_EXCHANGE: the old folder steps aside, and back if need be.
  const fs::path aside = final_dir.string() + ".old." + std::to_string(::getpid());
  fs::rename(final_dir, aside);
  fs::rename(tmp, final_dir, ec);
  if (ec) {
    std::error_code back;
    fs::rename(aside, final_dir, back);
    throw fs::filesystem_error("cannot move the new folder into place", tmp, final_dir, ec);
  }
  fs::remove_all(aside, ec);
}

void check_replaceable(const std::string& dir, FolderKind kind) {
  const fs::path final_dir = output_folder(dir);
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(final_dir, ec))) return;
  const std::string why = not_replaceable(final_dir, kind);
  if (!why.empty()) throw Error(dir, why + ", so it is not replaced", "write to another folder, or remove this one first");
}

void write_folder_atomically(const std::string& dir, FolderKind kind,
                             const std::function<void(const std::string& tmp)>& fill) {
  const fs::path final_dir = output_folder(dir);
  const fs::path parent = final_dir.parent_path();
  const std::string name = final_dir.filename().string();
  remove_dead_partials(final_dir);  // (first: an earlier export it puts back is checked too)
  check_replaceable(dir, kind);     // an Error before anything is written
  std::error_code ec;
  const std::string suffix = "." + std::to_string(::getpid());
  const fs::path tmp = parent / (name + ".partial" + suffix);
  fs::create_directories(parent, ec);
  fs::remove_all(tmp, ec);
  ec.clear();
  if (!fs::create_directories(tmp, ec) || ec) throw Error(tmp.string(), "cannot create folder: " + ec.message());
  try {
    const std::string owner = host_name() + " " + std::to_string(::getpid()) + "\n";
    if (!(std::ofstream(tmp / kPartialMarker) << owner))
      throw Error((tmp / kPartialMarker).string(), std::string("cannot write: ") + std::strerror(errno),
                  "check free disk space and permissions");
    fill(tmp.string());
    // Swap into place: the old folder (if any) is removed only after the new one is complete. Both
    // hold the marker while they move, so that whatever a kill leaves beside final_dir (the new
    // folder not yet in, or the old one stepped aside) is known as ours to the next export.
    if (fs::is_directory(fs::symlink_status(final_dir, ec))) std::ofstream(final_dir / kPartialMarker) << owner;
    move_folder_into_place(tmp.string(), final_dir.string());
    fs::remove(final_dir / kPartialMarker);
    detail::fsync_parent_dir(final_dir.string());  // (the rename survives a power loss, as every file in it)
  } catch (const fs::filesystem_error& e) {
    fs::remove(final_dir / kPartialMarker, ec);  // (the old folder's, if it stayed)
    fs::remove_all(tmp, ec);
    throw Error(dir, std::string("writing failed: ") + e.what(), "check free disk space and permissions");
  } catch (...) {
    if (fs::exists(tmp / kPartialMarker, ec)) fs::remove(final_dir / kPartialMarker, ec);  // (not yet moved)
    fs::remove_all(tmp, ec);
    throw;
  }
}

namespace {

// The tokenizer files of an export (or of a PEFT adapter folder) in folder `tmp`: tokenizer.model,
// tokenizer.json where it can be written, and tokenizer_config.json with the chat template.
void write_tokenizer_files(const fs::path& tmp, int64_t max_seq_len, const ExportOptions& opts, bool quiet = false) {
  const Tokenizer tok = Tokenizer::load(opts.tokenizer_path);
  detail::copy_file_atomic(opts.tokenizer_path, (tmp / "tokenizer.model").string());
  // tokenizer.json too: what fast tokenizers and servers (TGI's router) load without sentencepiece.
  std::string why_not;
  const std::string fast = tok.hf_tokenizer_json(&why_not);
  if (!fast.empty())
    detail::write_file_atomic((tmp / "tokenizer.json").string(), fast);
  else if (!quiet)
    fmt::print(stderr, "note: no tokenizer.json for {}: {}; transformers converts tokenizer.model itself\n",
               opts.tokenizer_path, why_not);
  // LlamaTokenizer in legacy mode: Tokenizer::encode_with_specials tokenizes as it does.
  json tc = {{"tokenizer_class", "LlamaTokenizer"},
             {"add_bos_token", true},
             {"add_eos_token", false},
             {"model_max_length", max_seq_len},
             {"legacy", true}};
  // The pieces of the exported ids (a chat model's end-of-turn eos), so that a server that
  // stops at tokenizer.eos_token stops where config.json says; tokenizer.model's own where
  // the id is not one of its pieces.
  auto piece_of = [&](int64_t id, int64_t fallback) -> std::optional<std::string> {
    if (id >= 0 && id < tok.vocab_size()) return tok.piece(id);
    if (fallback >= 0) return tok.piece(fallback);
    return std::nullopt;
  };
  if (auto bos = piece_of(opts.bos_id, tok.bos_id())) tc["bos_token"] = *bos;
  if (auto eos = piece_of(opts.eos_id, tok.eos_id())) tc["eos_token"] = *eos;
  if (tok.unk_id() >= 0) tc["unk_token"] = tok.piece(tok.unk_id());
  if (!opts.pad_token.empty()) {  // only one of tokenizer.model's pieces: another would add a token
    bool found = false;
    for (int64_t id = 0; id < tok.vocab_size() && !found; ++id) found = tok.piece(id) == opts.pad_token;
    if (found)
      tc["pad_token"] = opts.pad_token;
    else if (!quiet)
      fmt::print(stderr, "note: the pad token {} is not a piece of {}: the export names no pad token\n",
                 json(opts.pad_token).dump(), opts.tokenizer_path);
  }
  // special_tokens_map.json: the same tokens, for tools that read it rather than tokenizer_config.json.
  json special = json::object();
  for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"})
    if (tc.contains(key)) special[key] = tc[key];
  if (!opts.chat_template.empty()) tc["chat_template"] = opts.chat_template;
  detail::write_file_atomic((tmp / "tokenizer_config.json").string(), tc.dump(2) + "\n");
  detail::write_file_atomic((tmp / "special_tokens_map.json").string(), special.dump(2) + "\n");
}

// export_hf's work; `checked`: the weights come converted to the export dtype and checked for
// non-finite values already (a folder chain's, which knows their source values).
void write_hf_folder(const ModelConfig& config, const std::vector<LazyWeight>& weights, const std::string& dir,
                     const ExportOptions& opts, bool checked) {
  const torch::Dtype dtype = dtype_from_name(opts.dtype, "export dtype");
  if (!opts.chat_template.empty() && opts.tokenizer_path.empty())
    throw Error(dir, "a chat template is written into tokenizer_config.json, but no tokenizer is exported",
                "export with the tokenizer.model (--tokenizer)");
  json gen = json::object();  // (read first: a bad file fails the export before any weight is written)
  if (!opts.generation_config.empty()) {
    gen = read_json(opts.generation_config);
    if (!gen.is_object()) throw Error(opts.generation_config, "expected a JSON object");
  }
  for (auto [name, id] : {std::pair{"bos", opts.bos_id}, {"eos", opts.eos_id}})
    if (id < 0 || id >= config.vocab_size)
      throw Error(dir,
                  fmt::format("the {} id {} is outside the model's vocabulary [0, {})", name, id, config.vocab_size),
                  "export with a tokenizer whose ids fit the model");
  write_folder_atomically(dir, FolderKind::hf_model, [&](const std::string& tmp_dir) {
    const fs::path tmp = tmp_dir;
    std::error_code ec;
    // Group tensors into shards of at most max_shard_bytes (a larger tensor gets its own shard),
    // from their shapes alone: each shard's header is written before its first tensor is made.
    const safetensors::DType st = st_dtype_of(dtype);
    std::vector<std::vector<size_t>> shards(1);  // indices into weights
    int64_t shard_bytes = 0, total_bytes = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      int64_t numel = 1;
      for (int64_t d : weights[i].shape) numel *= d;
      const int64_t bytes = numel * static_cast<int64_t>(safetensors::dtype_size(st));
      if (shard_bytes > 0 && shard_bytes + bytes > opts.max_shard_bytes) {
        shards.emplace_back();
        shard_bytes = 0;
      }
      shards.back().push_back(i);
      shard_bytes += bytes;
      total_bytes += bytes;
    }
    json weight_map = json::object();
    const size_t n = shards.size();
    for (size_t s = 0; s < n; ++s) {
      char name[64];
      std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", s + 1, n);
      const std::string fname = n == 1 ? "model.safetensors" : name;
      std::vector<safetensors::StreamWriter::Entry> entries;
      for (size_t i : shards[s]) {
        entries.push_back({weights[i].name, st, weights[i].shape});
        weight_map[weights[i].name] = fname;
      }
      safetensors::StreamWriter out((tmp / fname).string(), entries, export_metadata());
      for (size_t i : shards[s]) {  // one tensor made, converted and written at a time
        const torch::Tensor source = weights[i].value().detach();
        const torch::Tensor t = source.to(torch::kCPU, dtype).contiguous();
        if (t.sizes() != c10::IntArrayRef(weights[i].shape))
          throw Error(dir + ": tensor '" + weights[i].name + "'",
                      "is " + shape_str(t.sizes()) + ", not the announced " + shape_str(weights[i].shape));
        if (!checked) check_finite(dir + ": tensor '" + weights[i].name + "'", source, t, opts.dtype);
        out.add(weights[i].name, t.data_ptr(), static_cast<uint64_t>(t.numel()) * t.element_size());
      }
      out.commit();
    }
    if (n > 1) {
      json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
      detail::write_file_atomic((tmp / "model.safetensors.index.json").string(), index.dump(2) + "\n");
    }
    gen["bos_token_id"] = opts.bos_id;
    // eos_id first, then the source's own stop ids (a chat base's end-of-turn token, which a
    // fine-tune of it still ends its turns with): what transformers and vLLM stop at.
    // (A list that holds eos_id already stays as it is.)
    const json eos = gen.value("eos_token_id", json());
    std::vector<int64_t> stops;
    auto add = [&](int64_t id) {
      if (std::find(stops.begin(), stops.end(), id) == stops.end()) stops.push_back(id);
    };
    const bool listed = eos.is_array() && std::find(eos.begin(), eos.end(), json(opts.eos_id)) != eos.end();
    if (!listed) add(opts.eos_id);
    std::vector<int64_t> outside;  // (a source's stop id past this model's vocabulary: never generated)
    auto add_in_range = [&](int64_t id) {
      if (id >= 0 && id < config.vocab_size)
        add(id);
      else if (std::find(outside.begin(), outside.end(), id) == outside.end())
        outside.push_back(id);
    };
    for (const json& e : eos.is_array() ? eos : json::array({eos}))
      if (e.is_number_integer()) add_in_range(e.get<int64_t>());
    for (int64_t id : opts.stop_ids) add_in_range(id);
    if (!outside.empty())
      fmt::print(stderr, "note: stop id(s) {} of the source are outside the model's vocabulary of {}: not exported\n",
                 json(outside).dump(), config.vocab_size);
    gen["eos_token_id"] = stops.size() == 1 ? json(stops[0]) : json(stops);
    // config.json lists the same ids (as Llama 3's does): tools that read only config.json (and
    // transformers without a generation_config.json) stop at each too.
    json cj = json::parse(hf_config_json(config, dtype_name(dtype), opts.bos_id, opts.eos_id));
    cj["eos_token_id"] = gen["eos_token_id"];
    detail::write_file_atomic((tmp / "config.json").string(), cj.dump(2) + "\n");
    detail::write_file_atomic((tmp / "generation_config.json").string(), gen.dump(2) + "\n");
    if (!opts.tokenizer_path.empty()) write_tokenizer_files(tmp, config.max_seq_len, opts);
  });
}

}  // namespace

void export_hf(const ModelConfig& config, const std::vector<LazyWeight>& weights, const std::string& dir,
               const ExportOptions& opts) {
  write_hf_folder(config, weights, dir, opts, /*checked=*/false);
}

void export_hf(Transformer& model, const std::string& dir, const ExportOptions& opts) {
  torch::NoGradGuard no_grad;
  export_hf(model->config(), merged_weights_lazy(model), dir, opts);
}

std::string read_chat_template(const std::string& dir) {
  if (const fs::path jinja = fs::path(dir) / "chat_template.jinja"; fs::is_regular_file(jinja)) {
    std::ifstream in(jinja, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    if (!in) throw Error(jinja.string(), "cannot read the chat template");
    if (!text.str().empty()) return text.str();
  }
  const fs::path path = fs::path(dir) / "tokenizer_config.json";
  if (!fs::exists(path)) return "";
  std::ifstream in(path);
  json j;
  try {
    j = detail::parse_json(in, path.string());
  } catch (const json::exception& e) {
    throw Error(path.string(), std::string("invalid JSON: ") + e.what());
  }
  if (!j.is_object() || !j.contains("chat_template") || j["chat_template"].is_null()) return "";
  const json& t = j["chat_template"];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_array())
    for (const auto& e : t)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
        return e["template"].get<std::string>();
  throw Error(path.string() + ": chat_template",
              t.is_array() ? "is a list of templates with none named 'default'"
                           : "is " + std::string(t.type_name()) + ", expected the template's text",
              "fix it, or name the template to use (llm-generate --template, llm-export --chat-template)");
}

std::vector<int64_t> stop_token_ids(const std::string& dir) {
  std::vector<int64_t> out;
  for (const char* name : {"config.json", "generation_config.json"}) {
    const std::string path = (fs::path(dir) / name).string();
    std::ifstream in(path);
    if (!in) continue;
    json j;
    try {
      j = detail::parse_json(in, path);
    } catch (const json::exception&) {
      j = json(json::value_t::discarded);
    }
    if (j.is_discarded() || !j.is_object())
      throw Error(path, "is not a JSON object", "fix or remove it (its eos_token_id says where generation stops)");
    if (!j.contains("eos_token_id") || j["eos_token_id"].is_null()) continue;
    const json& e = j["eos_token_id"];
    const json ids = e.is_array() ? e : json::array({e});
    for (const json& id : ids)
      if (!id.is_number_integer() || id.get<int64_t>() < 0)
        throw Error(path + ": eos_token_id", "is " + detail::shown(e) + ", expected a token id or a list of them");
    for (const json& id : ids)
      if (std::find(out.begin(), out.end(), id.get<int64_t>()) == out.end()) out.push_back(id.get<int64_t>());
  }
  return out;
}

std::string pad_token_of(const std::string& dir) {
  auto parse = [&](const char* name) {
    std::ifstream in(fs::path(dir) / name);
    try {
      const json j = in ? detail::parse_json(in, (fs::path(dir) / name).string()) : json();
      return j.is_object() ? j : json::object();
    } catch (const json::exception&) {
      return json::object();
    }
  };
  auto pad_of = [](const json& j) -> std::optional<std::string> {
    if (!j.contains("pad_token")) return std::nullopt;
    const json& pad = j["pad_token"];
    if (pad.is_string()) return pad.get<std::string>();
    if (pad.is_object() && pad.contains("content") && pad["content"].is_string())
      return pad["content"].get<std::string>();
    return std::nullopt;
  };
  // transformers (>= 4.34) takes tokenizer_config.json's tokens; special_tokens_map.json's
  // override them only in a legacy folder, whose tokenizer_config.json has no added_tokens_decoder.
  const json config = parse("tokenizer_config.json"), map = parse("special_tokens_map.json");
  const bool legacy = !config.contains("added_tokens_decoder");
  for (const json* j : legacy ? std::vector<const json*>{&map, &config} : std::vector<const json*>{&config, &map})
    if (auto pad = pad_of(*j)) return *pad;
  return "";
}

std::vector<std::pair<int64_t, std::string>> added_tokens(const std::string& dir, const Tokenizer& tok) {
  std::map<int64_t, std::string> found;
  auto parse = [](const fs::path& p) {
    std::ifstream in(p);
    try {
      return in ? detail::parse_json(in, p.string()) : json();
    } catch (const json::exception&) {
      return json();
    }
  };
  const json config = parse(fs::path(dir) / "tokenizer_config.json");
  if (config.is_object() && config.contains("added_tokens_decoder") && config["added_tokens_decoder"].is_object())
    for (const auto& [key, v] : config["added_tokens_decoder"].items()) {
      char* end = nullptr;
      const long long id = std::strtoll(key.c_str(), &end, 10);
      if (end && *end == '\0' && id >= 0 && v.is_object() && v.contains("content") && v["content"].is_string())
        found[id] = v["content"].get<std::string>();
    }
  const json extra = parse(fs::path(dir) / "added_tokens.json");
  if (extra.is_object())
    for (const auto& [text, v] : extra.items())
      if (v.is_number_integer() && v.get<int64_t>() >= 0) found[v.get<int64_t>()] = text;
  std::vector<std::pair<int64_t, std::string>> out;
  for (const auto& [id, text] : found)
    if (id >= tok.vocab_size() || tok.piece(id) != text) out.emplace_back(id, text);
  return out;
}

std::string tokenizer_difference(const std::string& given, const std::string& own, const std::string& label,
                                 bool warn) {
  std::error_code ec;
  if (fs::equivalent(given, own, ec)) return "";
  const Tokenizer mine = Tokenizer::load(given);
  try {
    return mine.difference(Tokenizer::load(own));
  } catch (const Error& e) {  // (what a given tokenizer works around)
    if (warn)
      fmt::print(stderr, "warning: {} is used; the model folder's own cannot be compared with it: {}\n", label,
                 e.what());
    return "";
  }
}

std::string tokenizer_for(const Pretrained& pre, const std::string& given, const std::string& flag) {
  if (given.empty() || pre.tokenizer_path.empty()) return given.empty() ? pre.tokenizer_path : given;
  const std::string how = tokenizer_difference(given, pre.tokenizer_path, flag + " " + given);
  if (!how.empty())
    fmt::print(stderr,
               "warning: {} {} is not the tokenizer in {} ({}): the model reads ids as its own tokenizer made "
               "them\n",
               flag, given, pre.dir, how);
  return given;
}

Pretrained inspect_pretrained(const std::string& dir) {
  if (!fs::is_directory(dir))
    throw Error(dir, "checkpoint folder not found", "give an HF folder (config.json) or a libllm one (recipe.yaml)");
  Pretrained out;
  out.dir = dir;
  if (fs::exists(fs::path(dir) / "config.json")) {
    HfConfig hf = read_hf_config(dir);
    out.config = hf.model;
    out.format = "hf";
    out.bos_id = hf.bos_id;
    out.eos_id = hf.eos_id;
  } else if (fs::exists(fs::path(dir) / "recipe.yaml")) {
    const fs::path runs = fs::path(dir) / "checkpoints";
    if (!fs::exists(fs::path(dir) / "trainer.json") && fs::is_directory(runs)) {  // (a run's folder)
      const std::vector<int64_t> steps = checkpoint_steps(runs.string());
      throw Error(dir, "is a training run's folder, not one of its checkpoints",
                  steps.empty()
                      ? "it has no complete checkpoint yet"
                      : "give a checkpoint, e.g. the newest: " + (runs / checkpoint_name(steps.back())).string());
    }
    const Recipe r = Recipe::load((fs::path(dir) / "recipe.yaml").string());
    out.config = r.model;
    out.format = "libllm";
    if (r.finetune.method == "lora") {  // a LoRA fine-tuning checkpoint: adapters (and base)
      out.lora = r.lora;
      out.has_lora = true;
      // Adapters only: the base is the folder trained on (its absolute path), or the recipe's
      // finetune.base from here (a run folder moved along with its base).
      const LoraBaseRef recorded = checkpoint_lora_base(dir);
      if (!recorded.path.empty()) {
        out.base_fingerprint = recorded.fingerprint;
        for (const std::string& b : {recorded.path, r.finetune.base})
          if (!b.empty() && fs::is_directory(b)) {
            out.base = b;
            break;
          }
        if (out.base.empty()) {  // an error when loading (the config alone is still known)
          out.base = recorded.path;
          out.base_missing = "holds only LoRA adapters, and their base " + recorded.path + " is gone" +
                             (r.finetune.base.empty() || r.finetune.base == recorded.path
                                  ? std::string()
                                  : " (nor is " + r.finetune.base + " here)");
        }
        std::error_code ec;
        if (fs::equivalent(out.base, dir, ec))
          throw Error(dir, "names itself as its LoRA base", "the checkpoint's trainer.json is corrupt");
      }
    }
  } else if (fs::exists(fs::path(dir) / "adapter_config.json")) {
    throw Error(dir, "is a PEFT adapter folder (adapter_config.json), not a model",
                "give the merged model (llm-export --out) or the libllm checkpoint the adapter was exported from");
  } else {
    throw Error(dir, "neither config.json (Hugging Face) nor recipe.yaml (libllm) found",
                "give a model folder: Hugging Face (save_pretrained) or a libllm checkpoint");
  }
  const fs::path tok = fs::path(dir) / "tokenizer.model";
  if (fs::exists(tok)) out.tokenizer_path = tok.string();
  return out;
}

std::string model_fingerprint(const std::string& dir) {
  std::string text;
  for (const char* name : {"config.json", "recipe.yaml"}) {
    std::ifstream in(fs::path(dir) / name, std::ios::binary);
    if (in) text += std::string(name) + "\n" + std::string(std::istreambuf_iterator<char>(in), {}) + "\n";
  }
  std::vector<fs::path> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string ext = e.path().extension().string();
    if (e.is_regular_file(ec) && (ext == ".safetensors" || ext == ".bin")) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    const uint64_t size = fs::file_size(f, ec);
    std::ifstream in(f, std::ios::binary);
    std::string sample(static_cast<size_t>(std::min<uint64_t>(size, 65536)), '\0');
    in.seekg(static_cast<std::streamoff>((size - sample.size()) / 2));
    in.read(sample.data(), static_cast<std::streamsize>(sample.size()));
    text += f.filename().string() + " " + std::to_string(size) + "\n" + sample + "\n";
  }
  return sha256_hex(text);
}

void verify_model_files(const std::string& dir) {
  WeightIndex idx;
  try {  // the weight files a load reads (not a checkpoint's optimizer files, nor stray ones)
    idx = open_weights(dir);
  } catch (const std::exception&) {  // (unreadable headers: the caller's "changed" says enough)
    return;
  }
  idx.verify();
}

namespace {

// The base of adapters-only checkpoint `info`, inspected, once it is found to be the one the
// adapters were trained on. `depth`: how many adapters-only folders lie above it (a cycle's cap).
Pretrained checked_base(const Pretrained& info, int depth) {
  if (!info.base_missing.empty())
    throw Error(info.dir, info.base_missing,
                "put the base model folder back there, or a symbolic link to its new place (ln -s NEW " + info.base +
                    "): the base is checked to be the one the adapters were trained on");
  if (depth > 32)
    throw Error(info.dir, "its chain of LoRA bases is over 32 deep (a cycle?)",
                "export a merged model and fine-tune that");
  if (!info.base_fingerprint.empty() && model_fingerprint(info.base) != info.base_fingerprint) {
    verify_model_files(info.base);  // (a damaged file is said as such)
    throw Error(info.dir,
                "its LoRA base " + info.base +
                    " has changed since the adapters were trained (another "
                    "model or revision at that path)",
                "restore the base the adapters were trained on");
  }
  Pretrained b = inspect_pretrained(info.base);
  if (count_parameters(b.config).total != count_parameters(info.config).total ||
      b.config.hf_architecture() != info.config.hf_architecture())
    throw Error(info.dir,
                "its LoRA base " + info.base + " is another model (" + b.config.hf_architecture() + ", " +
                    std::to_string(count_parameters(b.config).total) + " parameters)",
                "the adapters were trained on a different base; restore the original one");
  return b;
}

}  // namespace

namespace {

// A model folder and the chain of bases under it (adapters-only LoRA checkpoints), read one weight
// at a time: what load_pretrained + merged_weights_lazy compute, without the model in memory. Each
// folder is checked as load_pretrained checks it (its base's fingerprint, every tensor's name and
// shape from the headers) before anything is read.
class FolderChain {
  // Building a model draws its init seed from torch's CPU generator (apply_lora draws too): a
  // reader must leave the generator as it found it (a run's dropout masks come next).
  struct KeepRng {
    const torch::Tensor state = at::detail::getDefaultCPUGenerator().get_state();
    ~KeepRng() {
      at::Generator cpu = at::detail::getDefaultCPUGenerator();  // a handle on the default generator
      cpu.set_state(state);
    }
  };

 public:
  // `merge_top` false: weight() leaves out the top folder's own adapters (a model that keeps them
  // as adapters reads its base this way).
  // `verify`: each folder's files are checked against their checksums (load_weights).
  explicit FolderChain(const Pretrained& top, bool merge_top = true, bool verify = true) : merge_top_(merge_top) {
    KeepRng keep;
    std::vector<Pretrained> infos{top};  // top first; infos.size() - 1 adapters-only folders above the last
    while (!infos.back().base.empty()) infos.push_back(checked_base(infos.back(), static_cast<int>(infos.size())));
    for (size_t k = infos.size(); k-- > 0;) add_level(infos[k], k + 1 == infos.size(), verify);
  }

  // The weights an HF export holds (no adapters), in the model's order.
  const ParamShapes& weights() const { return weights_; }
  // The model's config, as the root folder gives it (what loading the chain builds).
  const ModelConfig& config() const { return levels_.front().info.config; }

  // Weight `name` with every adapter of the chain merged in fp32, root first (as loading a chain
  // and merging it does, bit for bit), then cast to `dtype`: a fresh tensor. Only its rows
  // [first, last) when given (-1: to the end); only those rows of the root are read. The folder's
  // pages it was read from leave this process's memory. `checked`: NaN or infinities in the result
  // are an Error naming the tensor (check_finite: a broken checkpoint, or an fp16 overflow).
  torch::Tensor weight(const std::string& name, torch::Dtype dtype, int64_t first = 0, int64_t last = -1,
                       bool checked = false) const {
    torch::NoGradGuard no_grad;
    const WeightIndex& root = levels_.front().idx;
    torch::Tensor stored = root.view(name);
    if (first != 0 || (last >= 0 && last != stored.size(0)))
      stored = stored.narrow(0, first, (last < 0 ? stored.size(0) : last) - first);
    torch::Tensor w = stored.to(torch::kFloat32);
    for (size_t k = 0; k < levels_.size() - (merge_top_ ? 0 : 1); ++k) {
      const Level& l = levels_[k];
      const auto it = l.adapted.find(name);
      if (it == l.adapted.end()) continue;
      const Adapter& a = it->second;
      // Fresh, aligned copies (a BLAS may round differently on the mapping's 8-byte alignment).
      const auto A = l.idx.view(a.a).to(torch::kFloat32, false, /*copy=*/true);
      const auto B = l.idx.view(a.b).to(torch::kFloat32, false, /*copy=*/true);
      w = lora_merged_rows(w, B, A, a.scale, first);
      l.idx.release(a.a);
      l.idx.release(a.b);
    }
    torch::Tensor out = w.to(dtype).contiguous();
    if (checked) check_finite(levels_.front().info.dir + ": tensor '" + name + "'", w, out, dtype_name(dtype));
    if (out.is_alias_of(stored)) out = out.clone();  // stored in `dtype`, no adapter: a tensor of its own
    root.release(name);
    return out;
  }

  // A deferred model (no base weights) carrying the top folder's LoRA adapters, as stored.
  Transformer adapters() const {
    KeepRng keep;
    const Level& top = levels_.back();
    Transformer m(top.info.config, TransformerImpl::Deferred{torch::kFloat32});
    if (!top.info.has_lora) return m;
    apply_lora(m, top.info.lora);
    torch::NoGradGuard no_grad;
    for (auto& p : m->named_parameters())
      if (is_adapter_weight(p.key())) p.value().copy_(top.idx.view(p.key()));
    return m;
  }

 private:
  struct Adapter {
    std::string a, b;  // lora_A (r, in) and lora_B (out, r) tensor names
    double scale;      // alpha / r
  };
  struct Level {
    Pretrained info;
    WeightIndex idx;
    std::map<std::string, Adapter> adapted;  // "<module>.weight" -> its adapter in this folder
  };

  void add_level(const Pretrained& info, bool root, bool verify) {
    Level l{info, open_weights(info.dir), {}};
    Transformer m(info.config, TransformerImpl::Deferred{torch::kFloat32});  // names and shapes only
    ParamShapes params;  // what the folder holds: the weights (root only), then the adapters
    if (root) {
      for (auto& p : m->named_parameters()) params.emplace_back(p.key(), p.value().sizes().vec());
      weights_ = params;
    }
    if (info.has_lora)  // adapter names and shapes as apply_lora would make them, none allocated
      for (auto& [module, lin] : lora_target_layers(m, info.lora)) {
        const Adapter a{module + ".lora_A.weight", module + ".lora_B.weight",
                        info.lora.alpha / static_cast<double>(info.lora.rank)};
        params.emplace_back(a.a, std::vector<int64_t>{info.lora.rank, lin->weight.size(1)});  // (r, in)
        params.emplace_back(a.b, std::vector<int64_t>{lin->weight.size(0), info.lora.rank});  // (out, r)
        l.adapted[module + ".weight"] = a;
      }
    check_weights(l.idx, params, !m->lm_head);
    if (verify) l.idx.verify();
    levels_.push_back(std::move(l));
  }

  std::vector<Level> levels_;  // root (whole weights) first
  ParamShapes weights_;
  bool merge_top_;
};

// A model of the chain's config built in `dtype` from its merged weights, one weight at a time.
Transformer build_merged(const FolderChain& chain, torch::Dtype dtype) {
  Transformer m(chain.config(), TransformerImpl::Deferred{dtype});
  torch::NoGradGuard no_grad;
  for (auto& p : m->named_parameters()) p.value().set_data(chain.weight(p.key(), dtype));
  return m;
}

}  // namespace

void load_pretrained(Pretrained& info, torch::Dtype dtype) {
  if (!info.base.empty()) {  // adapters only: the chain of bases below, merged weight by weight, then them
    info.model = build_merged(FolderChain(info, /*merge_top=*/false), dtype);
    apply_lora(info.model, info.lora);
    load_adapter_weights(info.model, info.dir);
    return;
  }
  // Deferred: no random init, and each weight is allocated once, in `dtype`, as it is read.
  info.model = Transformer(info.config, TransformerImpl::Deferred{dtype});
  if (info.has_lora) apply_lora(info.model, info.lora);
  load_weights(info.model, info.dir);
}

void load_pretrained_merged(Pretrained& info, torch::Dtype dtype) {
  // Adapters are folded in in fp32 (in bf16 most of their small update would round away), one
  // weight at a time, then cast.
  if (info.has_lora)
    info.model = build_merged(FolderChain(info), dtype);
  else
    load_pretrained(info, dtype);
  for (auto& p : info.model->parameters()) p.set_requires_grad(true);
}

Pretrained load_pretrained(const std::string& dir, torch::Dtype dtype) {
  Pretrained p = inspect_pretrained(dir);
  load_pretrained(p, dtype);
  return p;
}

void export_hf(const Pretrained& info, const std::string& dir, const ExportOptions& opts) {
  const torch::Dtype dtype = dtype_from_name(opts.dtype, "export dtype");
  const FolderChain chain(info);
  std::vector<LazyWeight> weights;
  for (const auto& [name, shape] : chain.weights())
    weights.push_back({name, shape, [&chain, name = name, dtype] { return chain.weight(name, dtype, 0, -1, true); }});
  write_hf_folder(chain.config(), weights, dir, opts, /*checked=*/true);
}

void for_each_merged_weight(const Pretrained& info, torch::Dtype dtype,
                            const std::function<void(const std::string&, const torch::Tensor&)>& store,
                            const std::function<RowRange(const std::string&, const std::vector<int64_t>&)>& rows,
                            bool verify) {
  const FolderChain chain(info, /*merge_top=*/true, verify);
  for (const auto& [name, shape] : chain.weights()) {
    const int64_t n = shape.empty() ? 1 : shape[0];  // (a scalar: one row)
    const RowRange r = rows ? rows(name, shape) : RowRange{0, n};
    if (rows && r.second <= r.first) continue;
    if (r.first < 0 || r.second > n || r.second < r.first)
      throw Error(info.dir + ": tensor '" + name + "'", "rows [" + std::to_string(r.first) + ", " +
                                                            std::to_string(r.second) + ") asked of a weight of " +
                                                            std::to_string(n));
    store(name, shape.empty() ? chain.weight(name, dtype) : chain.weight(name, dtype, r.first, r.second));
  }
}

void export_peft_adapter(const Pretrained& info, const std::string& dir, const std::string& base_model_name_or_path,
                         const ExportOptions* tokenizer) {
  if (!info.has_lora)
    throw Error(info.dir, "is not a LoRA fine-tuning checkpoint: it has no adapters to export",
                "export the merged model instead");
  Transformer m = FolderChain(info).adapters();
  std::function<void(const std::string&)> more;
  if (tokenizer && !tokenizer->tokenizer_path.empty())
    more = [&](const std::string& tmp) {  // (quiet: the merged export notes a missing tokenizer.json)
      write_tokenizer_files(tmp, info.config.max_seq_len, *tokenizer, /*quiet=*/true);
    };
  export_peft_adapter(m, info.lora, dir, base_model_name_or_path, more);
}

}  // namespace libllm
