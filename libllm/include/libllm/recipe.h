// A recipe: the YAML file that drives every app. One section per component config; all
// sections are optional in the file (defaults apply) and unknown sections or keys are errors.
#pragma once

#include <string>
#include <vector>

#include "libllm/chat.h"
#include "libllm/checkpoint.h"
#include "libllm/config.h"
#include "libllm/data.h"
#include "libllm/finetune.h"
#include "libllm/guard.h"
#include "libllm/model_config.h"
#include "libllm/optim.h"
#include "libllm/tokenizer.h"
#include "libllm/train.h"

namespace libllm {

struct Recipe {
  ModelConfig model;            // section `model`
  TokenizerConfig tokenizer;    // section `tokenizer`
  DataPrepConfig data_prep;     // section `data_prep` (llm-data)
  DataConfig data;              // section `data`
  OptimConfig optim;            // section `optim`
  ScheduleConfig schedule;      // section `schedule`
  TrainConfig train;            // section `train`
  CheckpointConfig checkpoint;  // section `checkpoint`
  GuardConfig guard;            // section `guard` (loss spikes)
  FinetuneConfig finetune;      // section `finetune` (llm-finetune: base model, full or LoRA)
  LoraConfig lora;              // section `lora` (finetune.method: lora)
  ChatConfig chat;              // section `chat` (instruction / chat data for fine-tuning)
  // "section.key" of every key the recipe file or an override set (the rest are defaults), in
  // order; not part of to_yaml(). Fine-tuning uses it to tell a model key given from a default.
  std::vector<std::string> given;

  // Reads `path` strictly, applies `--set section.key=value` overrides in order, resolves
  // derived defaults and validates. Errors name the file and key.
  static Recipe load(const std::string& path, const std::vector<std::string>& overrides = {});
  // Same, from YAML text (`source` names it in errors).
  static Recipe parse(const std::string& yaml, const std::string& source,
                      const std::vector<std::string>& overrides = {});
  // The resolved recipe as YAML: every key of every section, defaults included.
  std::string to_yaml() const;
  // Binds every section's fields to `s` (what load/parse/to_yaml use).
  void bind(Schema& s);
};

}  // namespace libllm
