// The pretraining loop: data -> forward/backward with gradient accumulation -> clip -> AdamW,
// with a learning-rate schedule, periodic held-out evaluation, a console progress line, JSONL
// metrics and data-sequence logs, and atomic checkpoints with exact resume.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "libllm/model.h"

namespace libllm {

class AdamW;
class Fields;
struct GuardDecision;
struct Pretrained;
struct Recipe;

struct TrainConfig {                 // recipe section `train`
  std::string run_dir = "runs/default";  // checkpoints/, metrics.jsonl, data_sequence.jsonl, loss.html go here
  int64_t seq_len = 2048;            // tokens per training sequence (<= model.max_seq_len)
  int64_t micro_batch = 8;           // sequences per forward/backward pass on each rank
  int64_t global_batch_tokens = 0;   // tokens per optimizer step over all ranks and accumulation; 0 = one micro batch per rank
  int64_t steps = 1000;              // optimizer steps of the whole run
  std::string dtype = "fp32";        // fp32, or bf16 (bf16 weights/activations, fp32 master weights in AdamW)
  std::string device = "cpu";        // cpu; cuda (rank r on cuda:LOCAL_RANK, NCCL between ranks); auto (cuda when usable)
  bool activation_checkpointing = false;  // recompute each block's activations in backward (dense and MoE)
  // Pretraining data: each document of a window (documents end with EOS in the shards) attends
  // only to itself, with rotary positions from 0 at its first token (Llama 3's document mask,
  // torchtitan's block_causal); training and held-out losses alike. false (default): causal over
  // the whole window. No effect on chat data (packed chat rows always keep examples apart).
  bool document_mask = false;
  // LM head and cross-entropy together over row chunks, their gradients computed in the forward
  // pass (Liger-Kernel's fused linear cross-entropy): the (B, T, vocab) logits, their fp32 copy
  // and its gradient are never held (linear_cross_entropy, libllm/loss.h). false = project all
  // logits, then the cross-entropy. The same loss either way (to rounding).
  bool fused_loss = true;
  // bf16 weights: gradients summed over micro batches (and, with ZeRO-2/3, ranks) in fp32, rounded
  // never (Megatron-LM's accumulate_allreduce_grads_in_fp32, torchtitan's fp32 reduce); 2 bytes a
  // trainable parameter more (ZeRO-2/3: of its shard). false: summed in bf16, as autograd does by
  // itself, which loses about 5 bits of every micro batch's share. No effect with fp32 weights, or
  // with one micro batch a step on one process (nothing is summed). The fused loss's LM head
  // gradient, summed over its row chunks, is summed in fp32 too (2 bytes a head weight more from
  // the loss's forward to its backward).
  bool fp32_grads = true;
  std::string sharding = "none";     // none (replicated data parallel) | zero1 (AdamW state divided over the ranks) |
                                     // zero2 (also the gradients) | zero3 (also the weights; needs activation_checkpointing) |
                                     // hybrid (zero3 inside groups of shard_group ranks, replicated across them); libllm/shard.h
  int64_t shard_group = 0;           // hybrid: ranks per shard group (a divisor of the world size); 0 = the launcher's
                            // LOCAL_WORLD_SIZE (one node), else Slurm's SLURM_STEP_TASKS_PER_NODE (srun-started ranks),
                            // else the whole world
  // Seconds a rank waits for the others, at the start (every rank joining) and in each collective
  // (a checkpoint that rank 0 writes alone, a slow peer), before the job ends with an error naming
  // the wait. Default 1800, PyTorch's (at most 7 days); a 7B model's replicated checkpoint on
  // network storage can take minutes.
  double dist_timeout_s = 1800;
  int64_t seed = 0;                  // seed of the weight initialisation and of sampling
  int64_t threads = 0;               // LibTorch intra-op CPU threads; 0 = automatic (compat::set_default_num_threads)
  int64_t log_every =
      10;  // console progress line every this many steps, and at each evaluation (metrics.jsonl gets every step)
  int64_t eval_every = 0;            // held-out evaluation every this many steps (data.valid); 0 = off
  int64_t eval_batches = 4;          // micro batches of held-out windows per evaluation (always the same
                                     // eval_batches x micro_batch windows or chat examples: changing either
                                     // changes the held-out set, which a resume notes)
  double peak_tflops = 0.0;          // the device's peak TFLOP/s for MFU (e.g. 989 for an H100 in bf16); 0 = do not report MFU
  std::vector<std::string> sample_prompts;  // after training, print a continuation of each prompt
  int64_t sample_tokens = 48;        // tokens generated per prompt
  double sample_temperature = 0.8;   // sampling temperature; 0 = greedy
  bool plot = true;                  // write run_dir/loss.html (a self-contained loss-curve plot) at the end
  bool save_on_signal = true;        // SIGTERM / SIGINT (a preemption, Ctrl-C): finish the step, save a checkpoint,
                                     // exit 128 + signal (another one over 2 s later ends the process); false: the
                                     // signals' default, and the steps since the last checkpoint are lost

  void fields(Fields& f);
};

// Callbacks into the loop, for tests and tools.
struct TrainHooks {
  // On every rank, right after a rollback (or a supervisor's restart plan) restored the
  // checkpoint `dir` of step `to_step`, before any further update. Under train.sharding zero3 /
  // hybrid the model's parameters are empty there (the weights live in the shards).
  std::function<void(int64_t to_step, const std::string& dir, Transformer& model, const AdamW& optim)> after_rollback;
  // On every rank, when the guard rolls back at step from_step: the checkpoints after to_step are
  // set aside (checkpoints/rolled-back/), nothing is restored yet. A job that dies from here until
  // the rollback's checkpoint is saved again completes the rollback when it is resumed.
  std::function<void(int64_t from_step, int64_t to_step)> before_rollback;
  // On every rank, after the guard judged step `step` and before its decision acts: may change
  // it (alike on every rank), e.g. to roll back (action, spike_start: the rollback goes to the
  // newest checkpoint at or before spike_start - 2 - guard.rollback_margin) on an outside signal.
  std::function<void(int64_t step, GuardDecision& decision)> decide;
};

// Runs (or resumes) the recipe's pretraining; returns the final training loss (of the last
// applied update). The resolved recipe is printed and saved in every checkpoint.
//
// Files in train.run_dir (rank 0 writes them): metrics.jsonl (a line per step: loss, lr,
// grad_norm, tokens/s, ...; chat data adds target_tokens and target_tokens_per_s; with the guard
// also action, z_loss, z_grad and branch = rollbacks so far; under a supervisor, attempt =
// LIBLLM_RESTART), data_sequence.jsonl (per step, every
// rank's windows, or chat examples, [set, number] in the order used: what the final model saw, a skipped update's line
// marked "skipped"; a rollback's discarded steps go to rolled-back-logs/guard-data_sequence.jsonl), events.jsonl
// (start/resume, skip, rollback, stop, restart plans; a step's event has its branch),
// checkpoints/, loss.html.
//
// The loss-spike guard (recipe section `guard`, libllm/guard.h) judges every step: a skipped
// update leaves weights and optimizer untouched; a rollback reloads the newest checkpoint before
// the spike, moves the checkpoints after it to checkpoints/rolled-back/, defers or drops the data
// of the rolled-back steps and re-warms the LR (run_dir/rollback-pending.json records a rollback
// until its checkpoint is saved again: a job that dies meanwhile completes it when resumed there);
// a stop throws SpikeStop (exit code 3). The data stream never goes back: a rollback continues it
// from where the rollback was decided (run_dir/rollback-data.json keeps that position for a
// completion or a restart plan), and defers the windows the rolled-back steps used
// (data_sequence.jsonl), so a rollback past an earlier one's target neither serves that one's
// deferred windows early nor the same window twice.
// A supervisor (llm-spike supervise) sets LIBLLM_RESTART (attempt number; > 0 always resumes from
// the newest checkpoint, whatever checkpoint.resume says) and
// LIBLLM_RESTART_PLAN (a JSON file {"to_step", "from_step", "lr_factor"[, "cumulative_lr_factor"]}):
// when the resumed checkpoint is the plan's to_step, the data of steps to_step+1..from_step is
// deferred and the LR lowered (by lr_factor, and to at most cumulative_lr_factor of the recipe's)
// and re-warmed, as for an in-loop rollback. Once applied (its checkpoint re-saved), the plan file
// is renamed <plan>.applied: it never applies again.
double pretrain(const Recipe& recipe, const TrainHooks& hooks = {});

// Fine-tunes the model in recipe.finetune.base (a Hugging Face or libllm folder; its config
// replaces the recipe's `model` section, its tokenizer.model is used when tokenizer.path is "")
// with the same loop, checkpoints, exact resume and logs as pretrain(). Data: chat examples
// (section `chat`: loss on the assistant's tokens only, held-out split evaluated every
// train.eval_every steps) or packed documents (data.train: continued pretraining). Method:
// full, or LoRA (section `lora`: only the adapters train; checkpoints hold only the adapters and
// name their base, TrainState::lora_base, and load with it anywhere a libllm model folder is read).
double finetune(const Recipe& recipe, const TrainHooks& hooks = {});
// The model a fine-tune of `recipe` on `base` trains: the base's config, with the recipe's MoE
// loss coefficients when it gives them. Any other model key the recipe gives (Recipe::given) must
// agree with the base: an Error names the key otherwise (init_std and init_depth_scaled are ignored).
ModelConfig finetune_model(const Recipe& recipe, const Pretrained& base);

}  // namespace libllm
