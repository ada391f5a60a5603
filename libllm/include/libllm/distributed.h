// Data-parallel training over c10d: one process per device, launched the way torchrun or
// Slurm launches (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, or SLURM_PROCID /
// SLURM_NTASKS / SLURM_LOCALID). Gloo on CPUs, NCCL on GPUs (rank r uses cuda:LOCAL_RANK).
// Gradients are averaged with bucketed all-reduces; every collective has a timeout, so a dead
// peer makes every rank fail with an error instead of hanging (NCCL: its watchdog aborts the
// communicator and ends the process).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace libllm {

// An asynchronous collective in flight: its outputs are valid after wait(). Collectives run in the
// order they were started, on every rank alike.
class Pending {
 public:
  Pending() = default;
  explicit Pending(std::function<void()> finish) : finish_(std::move(finish)) {}
  void wait();  // no-op when already waited or empty
  bool active() const { return static_cast<bool>(finish_); }

 private:
  std::function<void()> finish_;
};

class Distributed {
 public:
  // Reads the launcher's environment. Without one (no WORLD_SIZE / SLURM_NTASKS) this is a
  // single process and every collective is a no-op; a launcher's world of 1 still makes a
  // process group (as torchrun --nproc_per_node 1 does). backend: "gloo" (CPU tensors) or
  // "nccl" (CUDA tensors on cuda:LOCAL_RANK; needs a LibTorch with CUDA and libllm built with
  // NCCL); scalars and host tensors passed to the collectives are staged through the device.
  static Distributed from_env(double timeout_s = 1800, const std::string& backend = "gloo");
  // This process's rank as the launcher's environment gives it (RANK, SLURM_PROCID; 0 without
  // one), before from_env: for messages that one process of a job should print.
  static int launch_rank();
  ~Distributed();
  Distributed(Distributed&&) noexcept;

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  int local_rank() const { return local_rank_; }
  bool is_main() const { return rank_ == 0; }
  std::string describe() const;                            // "rank 1/2 (gloo via 127.0.0.1:29500)"
  const std::string& backend() const { return backend_; }  // "gloo" or "nccl"

  // Averages the gradients of `params` across ranks, flattening them into buckets of about
  // bucket_bytes per all-reduce.
  void average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes = 25 << 20);
  // Element-wise sum over ranks of each tensor, in place, flattened into buckets of about
  // bucket_bytes per all-reduce (tensors of one dtype per bucket).
  void sum_buckets(const std::vector<torch::Tensor>& tensors, int64_t bucket_bytes = 25 << 20);
  // The mean of a scalar over ranks.
  double mean(double value);
  // Element-wise sum of `t` over ranks, in place (a cheap gather: each rank fills its own slot).
  void sum(torch::Tensor& t);
  void barrier();
  // Rank 0's `value`, on every rank (the others' values are ignored): what rank 0 read or
  // decided (a file, a checkpoint step), so that every rank acts on the same.
  int64_t from_main(int64_t value);
  std::string from_main(const std::string& value);
  // For work each rank does alone (reading its own files) before collectives follow: runs `work`
  // and agrees on its outcome, so that one rank's failure is an error on every rank at once, not
  // a wait in the next collective. A rank whose work threw rethrows it (a std::exception other
  // than libllm::Error as Error(where, what, hint)); the others return how many ranks failed
  // (0: none). A peer that dies meanwhile is an Error. Collective.
  int64_t run_agreed(const std::function<void()>& work, const std::string& where, const std::string& hint = "");

  // full (world * n elements) <- every rank's `shard` (n elements) in rank order. Asynchronous.
  Pending all_gather(const torch::Tensor& shard, const torch::Tensor& full);
  // shard (n elements) <- the sum over ranks of elements [rank * n, (rank + 1) * n) of `full`
  // (world * n elements; it may be overwritten). Asynchronous. NCCL reduce-scatters; LibTorch
  // 1.13's Gloo has none, so there an all-reduce of `full` stands in (twice the traffic).
  Pending reduce_scatter(const torch::Tensor& full, const torch::Tensor& shard);

  // A process group of `size` of this world's ranks, on the same store and backend; called by
  // its members only, each with its `rank` in it. `name` is the same on every member and unique
  // per group (hybrid sharding: "shard-<node>", "replica-<local rank>").
  Distributed subgroup(const std::string& name, int rank, int size) const;

 private:
  Distributed() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, world_ = 1, local_rank_ = 0;
  std::string backend_ = "gloo";
};

}  // namespace libllm
