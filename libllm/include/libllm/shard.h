// ZeRO-1 (Rajbhandari et al. 2020): the optimizer state is divided over the data-parallel ranks.
// The trainable parameters, concatenated in order and flattened, are cut into `world` contiguous
// ranges of (nearly) equal size; rank r keeps AdamW state (moments, and the fp32 master of bf16
// weights) only for its range, updates only those elements after the gradient all-reduce, and
// the ranks then exchange the updated elements so every rank holds the whole model again. The
// update is elementwise, so the result equals unsharded AdamW exactly.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "libllm/optim.h"

namespace libllm {

class Distributed;

// A slice of one parameter's flattened elements: [offset, offset + length).
struct ShardPiece {
  size_t param = 0;     // index into the parameter list
  int64_t offset = 0;
  int64_t length = 0;
};

// Rank r's pieces of parameters with these element counts: the concatenated range
// [r * total / world, (r + 1) * total / world).
std::vector<ShardPiece> shard_pieces(const std::vector<int64_t>& numels, int rank, int world);

class ShardedAdamW {
 public:
  // `named`: the trainable parameters (a tensor listed under several names, e.g. a tied head, is
  // kept once, and decays as an embedding if any of its names is one). Each slice's AdamW entry
  // is named "<param>@<offset>" (its state "<param>@<offset>.exp_avg", ...).
  ShardedAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named, const OptimConfig& cfg,
               Distributed& dist);

  // Updates this rank's slices (gradients must already be averaged over ranks and clipped), then
  // gives every rank the whole updated parameters (one bucketed all-reduce of the weights).
  void step(double lr);
  void zero_grad();

  AdamW& local() { return *local_; }              // the AdamW over this rank's slices
  const AdamW& local() const { return *local_; }
  int64_t state_bytes() const;                     // bytes of moments + masters held by this rank
  int64_t unsharded_state_bytes() const;           // what one unsharded AdamW would hold

 private:
  std::vector<torch::Tensor> params_;   // unique trainable tensors, in order
  std::vector<ShardPiece> mine_;
  std::vector<torch::Tensor> slices_;   // views of the parameters, one per piece
  std::unique_ptr<AdamW> local_;
  Distributed& dist_;
  bool low_precision_ = false;
};

}  // namespace libllm
