// Fine-tuning a released model: where the base comes from, full fine-tuning or LoRA adapters
// (Hu et al. 2021) on chosen projections with the base frozen, merging adapters back, and the
// PEFT adapter layout (adapter_model.safetensors + adapter_config.json) that Hugging Face's
// `peft` loads.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "libllm/model.h"

namespace libllm {

class Fields;

struct FinetuneConfig {            // recipe section `finetune` (llm-finetune)
  // The model to start from: a Hugging Face folder (config.json + safetensors) or a libllm one
  // (a checkpoint or export with recipe.yaml). Its config replaces the recipe's `model` section;
  // its tokenizer.model is used when tokenizer.path is "". Required by llm-finetune.
  std::string base = "";
  // full = every weight trains; lora = only LoRA adapters train (section `lora`), the base is
  // frozen and held in train.dtype (bf16 halves its memory; the adapters stay fp32).
  std::string method = "full";

  void fields(Fields& f);
};

struct LoraConfig {                // recipe section `lora` (finetune.method: lora)
  int64_t rank = 8;                // r: inner dimension of each adapter; >= 1
  double alpha = 16;               // scale numerator: the update is (alpha / rank) * B A; > 0
  double dropout = 0.05;           // dropout on the adapter's input while training; [0, 1)
  // Projections that get an adapter, by module name: any of q_proj, k_proj, v_proj, o_proj,
  // gate_proj, up_proj, down_proj (dense MLP), w1, w2, w3 (MoE experts), gate (MoE router), lm_head.
  std::vector<std::string> targets = {"q_proj", "k_proj", "v_proj", "o_proj"};

  void fields(Fields& f);
};

// The projections that `cfg.targets` names, as (module name, layer) in module order. A target that
// names no projection of the model is an Error naming `lora.targets` and listing the model's.
std::vector<std::pair<std::string, LinearImpl*>> lora_target_layers(Transformer& model, const LoraConfig& cfg);
// Adds an adapter to every target projection (A random from torch's global RNG, B = 0) and
// freezes every other parameter (requires_grad false). A target that names no module of the
// model is an Error naming `lora.targets`.
void apply_lora(Transformer& model, const LoraConfig& cfg);
// Folds every adapter into its weight and removes it (the model is then a plain one).
void merge_lora(Transformer& model);
bool has_lora(Transformer& model);

struct ParamSummary {
  int64_t total = 0;      // every parameter, adapters included
  int64_t trainable = 0;  // requires_grad
};
ParamSummary summarize_parameters(Transformer& model);
// (name, tensor) of the parameters that train, in named_parameters() order.
std::vector<std::pair<std::string, torch::Tensor>> trainable_parameters(Transformer& model);

// A weight computed when it is asked for, so that a writer holds one at a time.
struct LazyWeight {
  std::string name;                      // transformers' name, e.g. "model.layers.0.mlp.up_proj.weight"
  std::vector<int64_t> shape;            // its shape
  std::function<torch::Tensor()> value;  // the tensor: a view of the parameter or a fresh merged copy
};
// The model's weights under transformers' names with every adapter merged (W + scale B A), no
// adapter tensors, in named_parameters() order: what an HF export writes. The merge runs when
// value() is called.
std::vector<LazyWeight> merged_weights_lazy(Transformer& model);
// The same, computed at once. Tensors are views or fresh merged copies.
std::vector<std::pair<std::string, torch::Tensor>> merged_weights(Transformer& model);

// Writes the adapters alone in PEFT's layout: DIR/adapter_model.safetensors (tensors named
// base_model.model.<module>.lora_A.weight / lora_B.weight, fp32) and DIR/adapter_config.json
// (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules, ...).
// Built under a temporary name and renamed when complete; an existing `dir` is replaced only when
// it is empty or an earlier adapter folder (write_folder_atomically). A model without adapters is an Error.
// `more_files` (optional) writes more files into the folder under construction (its path given):
// the tokenizer files an adapter is served with.
void export_peft_adapter(Transformer& model, const LoraConfig& cfg, const std::string& dir,
                         const std::string& base_model_name_or_path,
                         const std::function<void(const std::string&)>& more_files = {});

}  // namespace libllm
