// Training checkpoints: model, optimizer state, RNG state, step, data cursor and the resolved
// recipe, in one folder per step (run_dir/checkpoints/step-00000100). A folder is built under a
// temporary name and renamed when complete, so a kill -9 mid-save leaves the previous
// checkpoints intact and never a folder that looks complete but is not. A checkpoint folder
// is also a libllm model folder (recipe.yaml + model.safetensors + tokenizer.model): llm-eval
// and export read it directly (a LoRA fine-tune's, which holds only adapters, with its base).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "libllm/model.h"

namespace libllm {

class Distributed;

class Fields;
class AdamW;

struct CheckpointConfig {      // recipe section `checkpoint`
  int64_t every = 1000;        // save every this many optimizer steps (and at the end); 0 = only at the end
  int64_t keep_last = 3;  // regular checkpoints kept (older ones deleted, except those a guard rollback may need); >= 1
  int64_t milestone_every = 0; // steps that are multiples of this are milestones, never deleted (LLM360); 0 = none
  std::string resume = "auto";  // auto = newest complete checkpoint in the run folder, none = start fresh (an earlier
                                // run's checkpoints move to checkpoints/superseded/), or a folder path (the run
                                // folder's newer checkpoints move to checkpoints/rolled-back/)

  void fields(Fields& f);
};

// What the training loop needs to continue exactly, besides model and optimizer.
struct TrainState {
  int64_t step = 0;          // optimizer steps completed
  std::string data_cursor;   // the dataset's cursor (JSON)
  std::string extra;         // trainer-owned JSON (metrics so far, stability guard state)
  // A LoRA fine-tune: the absolute path of its frozen base folder (trainer.json "lora_base"). The
  // checkpoint's model.safetensors then holds only the adapters (lora_A / lora_B); the base is
  // read from that folder (or the recipe's finetune.base). "" = the weights are whole.
  std::string lora_base;
  std::string lora_base_fingerprint;  // model_fingerprint() of that folder when trained (libllm/hf.h)
  // The other ranks' RNG states (gather_rank_rng), which rank 0 writes into optimizer.safetensors
  // beside its own; empty in one process. Not filled by loading: restore_rank_rng reads them.
  std::vector<std::pair<std::string, torch::Tensor>> rank_rng;
};

// Every rank's RNG states (torch's CPU generator and, where CUDA is here, the current device's),
// collected on rank 0 as "rng.rank<r>.cpu" / "rng.rank<r>.cuda" for ranks r >= 1 (rank 0's are
// the checkpoint's own "rng.cpu" / "rng.cuda"). Collective; empty in one process and on ranks
// other than 0. Ranks draw differently (LoRA dropout on a GPU over rows of unequal lengths), and
// only rank 0 writes a replicated run's checkpoint: with these, every rank resumes exactly.
std::vector<std::pair<std::string, torch::Tensor>> gather_rank_rng(Distributed& dist);
// Restores this rank's generators from checkpoint `dir`'s "rng.rank<rank>.*" where it has them
// (a checkpoint of as many ranks or more); false (nothing changed) where it does not. Call it
// after load_checkpoint, which restores rank 0's (or the rank's optimizer shard's).
bool restore_rank_rng(const std::string& dir, int rank);

// Saves into root/step-NNNNNNNN (8 digits) and returns that path (with state.lora_base set, the
// model's adapters only). Throws libllm::Error (e.g. disk full) after removing the partial folder.
std::string save_checkpoint(const std::string& root, Transformer& model, const AdamW& optim,
                            const TrainState& state, const std::string& recipe_yaml,
                            const std::string& tokenizer_path);
// Sharded training (libllm/shard.h): called on every rank with that rank's AdamW over its slices.
// Shard holders (`shard` = this rank's index among `shards`; -1 = rank and world size; hybrid
// sharding: only the first replica's ranks, `write_shard`) write
// optimizer-shard-<shard>-of-<shards>.safetensors (their slices' state, "<param>@<offset>.exp_avg"
// ..., and their RNG states); rank 0 writes `weights` (the whole model, named as its parameters,
// or with state.lora_base its adapters; other ranks may pass none), the recipe, trainer.json ("optimizer_shards": shards) and the
// rank-independent optimizer.safetensors ("step"), then renames the folder into place.
std::string save_checkpoint_sharded(const std::string& root, const std::vector<std::pair<std::string, torch::Tensor>>& weights,
                                    const AdamW& local, const TrainState& state, const std::string& recipe_yaml,
                                    const std::string& tokenizer_path, Distributed& dist, int shard = -1,
                                    int shards = -1, bool write_shard = true);

// Weights delivered one at a time, so that no host holds them all (a ZeRO-3 model gathered unit
// by unit): `specs`, on rank 0, lists them in delivery order; `produce`, called on every rank
// (it may be collective), calls its argument on rank 0 once per weight in that order.
struct WeightSpec {
  std::string name;
  torch::Dtype dtype;
  std::vector<int64_t> shape;
};
using WeightSink = std::function<void(const std::string& name, const torch::Tensor& value)>;
struct WeightStream {
  std::vector<WeightSpec> specs;
  std::function<void(const WeightSink&)> produce;
};
// save_checkpoint_sharded with streamed weights: rank 0 writes each into model.safetensors as it
// arrives (with state.lora_base only the adapters are written; the stream may still deliver all).
std::string save_checkpoint_sharded(const std::string& root, const WeightStream& weights, const AdamW& local,
                                    const TrainState& state, const std::string& recipe_yaml,
                                    const std::string& tokenizer_path, Distributed& dist, int shard = -1,
                                    int shards = -1, bool write_shard = true);
// The LoRA base a checkpoint folder's adapters apply to (trainer.json "lora_base" and
// "lora_base_fingerprint"; an empty path when the folder holds whole weights or is not a libllm checkpoint).
struct LoraBaseRef {
  std::string path, fingerprint;
};
LoraBaseRef checkpoint_lora_base(const std::string& dir);
// "model.layers.0.self_attn.q_proj.lora_A.weight": a LoRA adapter's weight.
bool is_adapter_weight(const std::string& name);
// Completes the replacement of a checkpoint folder that a kill interrupted on a filesystem
// without an atomic exchange (NFS): the old folder renamed aside to step-N.old.<pid>, the new one
// not yet in place (a rollback's re-save of step N). The new folder goes in when it is complete,
// else the old one goes back; an old folder whose replacement is in place is removed. Returns the
// steps restored. Call it on one rank, before resuming.
std::vector<int64_t> recover_checkpoint_swaps(const std::string& root);
// The newest complete checkpoint folder under root ("" when none). Partial folders are ignored.
std::string latest_checkpoint(const std::string& root);
// All complete checkpoint steps under root, ascending.
std::vector<int64_t> checkpoint_steps(const std::string& root);
// Restores model, optimizer, the RNG states (torch's CPU generator, and the current device's
// CUDA generator where saved and this process uses CUDA already: move the model to the GPU
// first) and returns the state; from a LoRA checkpoint that
// holds only adapters (lora_base), only the model's adapters (its base must be loaded already). A checkpoint of another
// model shape is an error naming the tensor. The optimizer state is resharded as needed: a checkpoint written unsharded
// or by any number of ZeRO-1 ranks loads into a whole-parameter AdamW or into one over slices "<param>@<offset>" (each
// slot takes its elements from whichever files hold them); `rank` picks the RNG of that rank's shard when there is one.
TrainState load_checkpoint(const std::string& dir, Transformer& model, AdamW& optim, int rank = 0);
// The same without the weights (a ZeRO-3 engine reads its own elements of them): optimizer, RNG
// and state. Load the weights first: a bf16 slot's restored master is copied into its parameter.
TrainState load_checkpoint_state(const std::string& dir, AdamW& optim, int rank = 0);
// Deletes regular checkpoints beyond keep_last (milestones stay) and leftover partial folders.
// keep_at_or_before >= 0 also keeps the newest checkpoint at or before that step and every newer
// one (what a loss-spike rollback from this step or a later one may need: Guard::lookback).
void prune_checkpoints(const std::string& root, const CheckpointConfig& cfg, int64_t keep_at_or_before = -1);
std::string checkpoint_name(int64_t step);

}  // namespace libllm
