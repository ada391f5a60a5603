// ZeRO-1 (Rajbhandari et al. 2020): the optimizer state is divided over the data-parallel ranks.
// The trainable parameters, concatenated in order and flattened, are cut into `world` contiguous
// chunks of ceil(total / world) elements (the last ones shorter or empty); rank r keeps AdamW
// state (moments, and the fp32 master of bf16 weights) only for its chunk, updates only those
// elements after the gradient all-reduce, and the ranks then all-gather the updated chunks so
// every rank holds the whole model again. The update is elementwise, so the result equals
// unsharded AdamW exactly.
//
// ZeRO-2 / ZeRO-3 / hybrid (FullySharded below): the model is cut into units (each decoder block,
// plus one "root" unit of the embedding, final norm and LM head). A unit's parameters are laid
// out as one flat vector, padded to a multiple of the group size G, and rank r of the group owns
// elements [r * n / G, (r + 1) * n / G) of it: their AdamW state, their gradient (reduce-scattered
// from every rank's full gradient as soon as the unit's backward is done) and, at ZeRO-3, the
// only persistent copy of those weights (a block's full weights are all-gathered just before it
// runs, forward and recomputed backward, and freed right after; the next block's gather is
// started first, so it overlaps this block's compute). Frozen weights (a LoRA fine-tune's base)
// form units of their own: sharded and gathered alike, with no gradient or optimizer state.
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "libllm/checkpoint.h"
#include "libllm/model.h"
#include "libllm/optim.h"

namespace libllm {

class Distributed;
class Pending;
struct Pretrained;

// A slice of one parameter's flattened elements: [offset, offset + length).
struct ShardPiece {
  size_t param = 0;  // index into the parameter list
  int64_t offset = 0;
  int64_t length = 0;
};

// Rank r's pieces of parameters with these element counts: the concatenated range
// [r * chunk, (r + 1) * chunk) with chunk = ceil(total / world), clipped to total.
std::vector<ShardPiece> shard_pieces(const std::vector<int64_t>& numels, int rank, int world);

class ShardedAdamW {
 public:
  // `named`: the trainable parameters (a tensor listed under several names, e.g. a tied head, is
  // kept once, and decays as an embedding if any of its names is one). Each slice's AdamW entry
  // is named "<param>@<offset>" (its state "<param>@<offset>.exp_avg", ...).
  // `gather_bytes`: the all-gather buffer that brings the updated chunks back (see step()).
  ShardedAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named, const OptimConfig& cfg,
               Distributed& dist, int64_t gather_bytes = 25 << 20);

  // Updates this rank's slices (gradients must already be averaged over ranks and clipped), then
  // gives every rank the whole updated parameters (all-gathers of gather_bytes of the chunks, written
  // into the parameters as they arrive; an all-reduce when the parameters have several dtypes).
  void step(double lr);
  void zero_grad();
  // Gives every rank the whole parameters from every rank's slices, as step() does after its
  // update. Collective; after loading a checkpoint, whose masters (a bf16 run's, resumed in fp32)
  // set only this rank's slices.
  void share_weights();

  AdamW& local() { return *local_; }  // the AdamW over this rank's slices
  const AdamW& local() const { return *local_; }
  int64_t state_bytes() const;            // bytes of moments + masters held by this rank
  int64_t unsharded_state_bytes() const;  // what one unsharded AdamW would hold

 private:
  std::vector<torch::Tensor> params_;  // unique trainable tensors, in order
  std::vector<ShardPiece> mine_;
  std::vector<torch::Tensor> slices_;  // views of the parameters, one per piece
  int64_t total_ = 0, chunk_ = 0;       // elements in all, and per rank
  std::unique_ptr<AdamW> local_;
  Distributed& dist_;
  int64_t gather_bytes_;
  bool low_precision_ = false;
};

// ZeRO-2 (stage 2: gradients and optimizer state sharded, weights replicated and all-gathered after
// each update), ZeRO-3 (stage 3: the weights too; needs activation checkpointing, because a block's
// weights are gathered again for its recomputed backward) and hybrid sharding (stage 3 inside a
// group of `group` ranks, e.g. a node; the groups are replicas whose gradient shards are
// all-reduced across groups). The unsharded result is reproduced up to the order of summation.
class FullySharded : public BlockHooks {
 public:
  // `model`: on the CPU; its parameters move to `device` as shards (stage 3) or as views of
  // per-unit flat buffers (stage 2). Frozen parameters (a LoRA fine-tune's base, requires_grad
  // false) form units of their own: sharded and gathered the same way, with no gradient or AdamW
  // state. A deferred model (TransformerImpl::Deferred) is initialised here from init_parameter()
  // (its allocated parameters, such as LoRA adapters added after building it, keep their values):
  // at stage 3 each rank computes only its own elements, so no rank ever holds the whole model. `dist`: all ranks;
  // `group`: ranks per shard group (dist.world_size() but for hybrid; must divide it).
  // `init_deferred` false: a deferred model's weights are left zero, for load_weights() to fill.
  // `fp32_grads`: bf16 weights' gradient shards are fp32, each micro batch's reduced gradient
  // added into them (train.fp32_grads).
  FullySharded(Transformer model, int stage, int64_t group, const OptimConfig& cfg, Distributed& dist,
               torch::Device device, bool init_deferred = true, bool fp32_grads = true);
  ~FullySharded() override;

  // The training step, around forward/backward of each micro batch:
  void reduce_gradients();                 // after a micro batch's backward: the units' full gradients -> shards
  double clip_grad_norm(double max_norm);  // averages the shards over ranks; the global norm before clipping
  void step(double lr);                    // AdamW over this rank's shards (stage 2: then all-gathers the weights)
  void zero_grad();
  // Stage 2: gives every rank the others' elements of the trainable weights (as step() does);
  // stage 3: drops gathered copies. Collective; after loading a checkpoint (ShardedAdamW's).
  void share_weights();

  AdamW& local() { return *local_; }  // the AdamW over this rank's slices, named "<param>@<offset>"
  const AdamW& local() const { return *local_; }
  int stage() const { return stage_; }
  int shard_rank() const;      // this rank's index in its shard group (which shard it holds)
  int shard_world() const;     // the shard group's size
  bool writes_shards() const;  // this rank saves its optimizer shard (the first replica's ranks)

  // Checkpoints and sampling. Collective: the whole weights (`trainable_only`: the trainable ones,
  // a LoRA fine-tune's adapters), gathered one unit at a time and handed to rank 0's sink, named as
  // model->named_parameters() names them (save_checkpoint_sharded writes each as it comes, so rank
  // 0 holds one gathered unit, not the model).
  WeightStream weight_stream(bool trainable_only = false);
  // Each rank reads its elements of the parameters `which` names from dir's weights (safetensors
  // or pytorch_model.bin): all, the frozen ones (a LoRA fine-tune's base, which has no adapters)
  // or the trainable ones (a LoRA checkpoint that holds only its adapters).
  enum class Which { all, frozen, trainable };
  void load_weights(const std::string& dir, Which which = Which::all);
  // The same from model folder `base` (inspect_pretrained): a LoRA checkpoint's adapters, and
  // those of its chain of bases, are merged into each weight as it is read (for_each_merged_weight,
  // one weight at a time), so a LoRA base is never whole in any rank's memory. A collective: an
  // error on any rank is an error on every rank.
  void load_weights(const Pretrained& base, Which which);

  // Bytes of parameters + gradients + optimizer state this rank holds now, and the most it held
  // at any moment since reset_peak() (gathered weights and full gradients included).
  int64_t held_bytes() const { return held_; }
  int64_t peak_bytes() const { return peak_; }
  void reset_peak() { peak_ = held_; }

  // BlockHooks
  void begin_forward() override;
  void before_block(int64_t layer, bool backward) override;
  void after_block(int64_t layer, bool backward) override;

 private:
  struct Unit;
  void gather(Unit& u, bool wait);  // starts (or finishes) the gather of u's weights
  void release(Unit& u);            // frees u's gathered weights (stage 3)
  void grad_buffer(Unit& u);        // u's gradients accumulate in place into one flat buffer
  void reduce(Unit& u);             // starts reduce-scattering u's full gradients into its shard
  void finish(Unit& u);             // waits for u's reduce-scatter and adds it to u's gradient shard
  void wait_reductions();
  void track(int64_t delta);
  void read_weights(const Pretrained& base, Which which);  // load_weights on this rank alone

  Transformer model_;
  int stage_;
  Distributed& dist_;
  std::unique_ptr<Distributed> shard_group_, replicas_;  // hybrid only
  Distributed* shard_ = nullptr;                         // the group the shards are cut over
  torch::Device device_;
  std::vector<std::unique_ptr<Unit>> units_;  // blocks 0..L-1, then the root (frozen before trainable)
  std::vector<std::vector<Unit*>> layers_;    // layers_[l]: block l's units; layers_[L]: the root's
  std::deque<Unit*> inflight_;                // units whose reduce-scatter runs, oldest first
  std::unique_ptr<AdamW> local_;
  std::vector<torch::Tensor> slices_, slice_grads_;  // AdamW's slices and their gradients
  int64_t held_ = 0, peak_ = 0;
};

}  // namespace libllm
