#include "libllm/distributed.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
// Gloo's headers come with Debian's libgloo-dev; a pip LibTorch lacks them (then only NCCL).
// libllm/CMakeLists.txt defines LIBLLM_GLOO where they lie beside LibTorch.
#ifdef LIBLLM_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef LIBLLM_NCCL
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL 1
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "libllm/compat.h"

#if LIBLLM_TORCH_AT_LEAST(2, 0)
#include <torch/csrc/distributed/c10d/Backend.hpp>
using ProcessGroupBase = c10d::Backend;  // 2.x: Gloo and NCCL are backends of a ProcessGroup
#else
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
using ProcessGroupBase = c10d::ProcessGroup;
#endif

#include <fmt/core.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>

#include "libllm/config.h"
#include "libllm/error.h"

namespace libllm {
namespace {

const char* env_first(std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (const char* v = std::getenv(n)) return v;
  return nullptr;
}

int env_int(std::initializer_list<const char*> names, int fallback) {
  const char* v = env_first(names);
  if (!v) return fallback;
  const std::optional<int64_t> x = parse_int(v);
  if (!x || *x < INT_MIN || *x > INT_MAX)
    throw Error(*names.begin(), std::string("expected an integer, got '") + v + "'",
                "check the launcher's environment");
  return static_cast<int>(*x);
}

#ifdef LIBLLM_GLOO
// The network devices a Gloo group listens on, as PyTorch chooses them: one per interface that
// GLOO_SOCKET_IFNAME lists (comma-separated) when set; the loopback for a master on this machine
// (127.x, localhost: one node); else the address this machine's hostname resolves to (loopback if
// it resolves to none usable). Never the master's address: on another node that is no local address.
std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices(const std::string& master) {
  std::vector<std::shared_ptr<::gloo::transport::Device>> out;
  if (const char* ifnames = std::getenv("GLOO_SOCKET_IFNAME"); ifnames && *ifnames) {
    std::string rest = ifnames;
    while (!rest.empty()) {
      const std::string name = rest.substr(0, rest.find(','));
      rest = rest.find(',') == std::string::npos ? "" : rest.substr(rest.find(',') + 1);
      if (name.empty()) continue;
      try {
        out.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
      } catch (const std::exception& e) {
        const std::string why = e.what();
        throw Error("GLOO_SOCKET_IFNAME",
                    "cannot use the network interface '" + name + "': " + why.substr(0, why.find('\n')),
                    "name interfaces of this machine (ip -brief address), or unset it");
      }
    }
    if (!out.empty()) return out;
  }
  if (master == "localhost" || master.rfind("127.", 0) == 0 || master == "::1")
    out.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(master));
  else
    out.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  return out;
}
#endif

}  // namespace

int Distributed::launch_rank() { return env_int({"RANK", "SLURM_PROCID"}, 0); }

struct Distributed::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<ProcessGroupBase> pg;
  std::string addr;
  int port = 0;
  torch::Device device = torch::kCPU;         // where the backend's tensors must live
  bool gloo = true;                           // Gloo cannot reduce bf16/fp16: they go through fp32
  std::chrono::milliseconds timeout{300000};  // of every collective (subgroups too)
  int64_t serial = 0;                         // the group's number in this process (the same on every rank) and name
  std::string name;                           // ("" for the world): its exit key

  static int64_t next_serial() {
    static std::atomic<int64_t> n{0};
    return n++;
  }

  // Sums t over ranks in place; a tensor on another device is staged through `device`.
  void allreduce(torch::Tensor& t) { allreduce_async(t).wait(); }

  static Error failed(const char* what, const std::exception& e) {
    return Error("distributed", std::string(what) + " failed (a peer died or timed out): " + e.what());
  }

  Pending allreduce_async(const torch::Tensor& t) {
    torch::Tensor work = t.device() == device ? t : t.to(device);
    if (gloo && (work.scalar_type() == torch::kBFloat16 || work.scalar_type() == torch::kHalf))
      work = work.to(torch::kFloat32);
    std::vector<torch::Tensor> v{work};
    try {
      return pending(pg->allreduce(v), "all-reduce", [work, t]() mutable {
        if (!work.is_same(t)) t.copy_(work);
      });
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw failed("all-reduce", e);
    }
  }

  // A collective in flight: waiting rethrows its failure as one Error; then `after` runs.
  template <typename Work>
  static Pending pending(Work w, const char* what, std::function<void()> after) {
    return Pending([w, what, after]() {
      try {
        w->wait();
      } catch (const std::exception& e) {
        throw failed(what, e);
      }
      after();
    });
  }
};

// Ends the group. At a normal end, first every rank waits until all have come here, their
// device's work done (60 s at most for all of a process's groups together; the last to come says
// so through the store, which the others wait on; groups are matched by their order of creation
// and name, the same on every rank as long as every rank makes the same groups): an NCCL rank's last collective may
// still be sending when its wait() returns (the host only orders its stream), and ending its communicators then could
// cut off a slower peer. Then, on LibTorch 2.6+ with NCCL, abort(): what ProcessGroupNCCL's destructor does itself
// after warning that the group was never destroyed. Not shutdown(), which waits for the peers' communicators without a
// limit: a rank that finished would hang if another died after its last collective under a launcher that does not kill
// the rest. While an exception unwinds (this rank failed), no waiting.
Distributed::~Distributed() {
  if (!impl_ || !impl_->pg) return;
  if (std::uncaught_exceptions() == 0 && world_ > 1) try {
      if (!impl_->gloo) compat::cuda_synchronize();
      static const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      const std::string key = "libllm/exit/" + std::to_string(impl_->serial) + "/" + impl_->name;
      if (impl_->store->add(key, 1) >= world_) {
        impl_->store->set(key + "/all", std::vector<uint8_t>{1});
      } else {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
        if (left.count() > 0) impl_->store->wait({key + "/all"}, left);
      }
    } catch (const std::exception&) {  // (the time is up, or rank 0's store is gone: it left)
    }
  try {
#if LIBLLM_TORCH_AT_LEAST(2, 6) && defined(LIBLLM_NCCL)  // (Backend::abort is virtual only since ~2.7)
    if (auto* nccl = dynamic_cast<c10d::ProcessGroupNCCL*>(impl_->pg.get())) nccl->abort();
#endif
  } catch (const std::exception& e) {  // (a destructor: say it, do not throw)
    fmt::print(stderr, "warning: ending the process group: {}\n",
               std::string(e.what()).substr(0, std::string(e.what()).find('\n')));
  }
}
Distributed::Distributed(Distributed&&) noexcept = default;

Distributed Distributed::from_env(double timeout_s, const std::string& backend) {
  Distributed d;
  if (backend != "gloo" && backend != "nccl")
    throw Error("backend", "unknown process-group backend '" + backend + "'", "use gloo or nccl");
  d.backend_ = backend;
  d.world_ = env_int({"WORLD_SIZE", "SLURM_NTASKS"}, 1);
  d.rank_ = env_int({"RANK", "SLURM_PROCID"}, 0);
  d.local_rank_ = env_int({"LOCAL_RANK", "SLURM_LOCALID"}, 0);
  // One process makes a group only when a launcher says WORLD_SIZE (torchrun does, even for 1);
  // Slurm's SLURM_NTASKS=1 of every single-task job does not.
  if (d.world_ <= 1 && !std::getenv("WORLD_SIZE")) return d;
  if (d.world_ < 1) throw Error("WORLD_SIZE", fmt::format("must be >= 1, got {}", d.world_));
#ifndef LIBLLM_GLOO
  if (backend == "gloo")
    throw Error("backend", "this libllm was built without Gloo (no gloo headers beside LibTorch)",
                "train on CUDA (NCCL), or build with Gloo's headers (Debian: libgloo-dev)");
#endif
#ifndef LIBLLM_NCCL
  if (backend == "nccl")
    throw Error("backend", "this libllm was built without NCCL",
                "configure with a CUDA LibTorch and NCCL's headers (-DNCCL_INCLUDE_DIR=...)");
#endif
  if (d.rank_ < 0 || d.rank_ >= d.world_)
    throw Error("RANK", fmt::format("rank {} outside a world of {}", d.rank_, d.world_));
  auto impl = std::make_unique<Impl>();
  impl->serial = Impl::next_serial();
  const char* addr = env_first({"MASTER_ADDR"});
  impl->addr = addr ? addr : "127.0.0.1";
  impl->port = env_int({"MASTER_PORT"}, 29500);
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  impl->timeout = timeout;
  // (Said before the wait: a rank whose peers never come otherwise shows nothing until the timeout.)
  fmt::print(stderr, "rank {} of {}: meeting the other ranks at {}:{}{}{} (waiting at most {:.0f} s)\n", d.rank_,
             d.world_, impl->addr, impl->port, addr ? "" : " (MASTER_ADDR unset: this machine only)",
             std::getenv("MASTER_PORT") ? "" : " (MASTER_PORT unset: 29500)", timeout_s);
  try {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(impl->port);
    opts.isServer = d.rank_ == 0;
    opts.numWorkers = d.world_;
    opts.timeout = timeout;
    impl->store = c10::make_intrusive<c10d::TCPStore>(impl->addr, opts);
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("libllm", impl->store);
    if (backend == "nccl") {
#ifdef LIBLLM_NCCL
      const int gpu = compat::cuda_device_for(d.local_rank_);
      compat::cuda_set_device(gpu);
      impl->gloo = false;
      impl->device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(gpu));
      auto pg_opts = c10d::ProcessGroupNCCL::Options::create();
      pg_opts->timeout = timeout;
      impl->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, d.rank_, d.world_, pg_opts);
#endif
    } else {
#ifdef LIBLLM_GLOO
      auto pg_opts = c10d::ProcessGroupGloo::Options::create(timeout);
      pg_opts->devices = gloo_devices(impl->addr);
      impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, d.rank_, d.world_, pg_opts);
#endif
    }
  } catch (const Error&) {  // (GLOO_SOCKET_IFNAME's, which says what to do)
    throw;
  } catch (const std::exception& e) {
    throw Error(fmt::format("{}:{}", impl->addr, impl->port),
                fmt::format("rank {}/{} could not join the process group: {}", d.rank_, d.world_,
                            std::string(e.what()).substr(0, std::string(e.what()).find('\n'))),
                "check MASTER_ADDR/MASTER_PORT and that every rank was started");
  }
  d.impl_ = std::move(impl);
  return d;
}

Distributed Distributed::subgroup(const std::string& name, int rank, int size) const {
  if (!impl_) throw Error("distributed", "a subgroup needs a process group");
  if (rank < 0 || rank >= size) throw Error("distributed", fmt::format("rank {} outside a subgroup of {}", rank, size));
  Distributed d;
  d.backend_ = backend_;
  d.rank_ = rank;
  d.world_ = size;
  d.local_rank_ = local_rank_;
  auto impl = std::make_unique<Impl>();
  impl->serial = Impl::next_serial();
  impl->name = name;
  impl->store = impl_->store;
  impl->addr = impl_->addr;
  impl->port = impl_->port;
  impl->device = impl_->device;
  impl->gloo = impl_->gloo;
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("libllm/" + name, impl->store);
  try {
#ifdef LIBLLM_NCCL
    if (backend_ == "nccl") {
      auto pg_opts = c10d::ProcessGroupNCCL::Options::create();
      pg_opts->timeout = impl_->timeout;
      impl->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, pg_opts);
    }
#endif
#ifdef LIBLLM_GLOO
    if (backend_ == "gloo") {
      auto pg_opts = c10d::ProcessGroupGloo::Options::create(impl_->timeout);
      pg_opts->devices = gloo_devices(impl->addr);
      impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, pg_opts);
    }
#endif
  } catch (const std::exception& e) {
    throw Error("distributed", fmt::format("rank {}/{} could not join the group '{}': {}", rank, size, name,
                                           std::string(e.what()).substr(0, std::string(e.what()).find('\n'))));
  }
  d.impl_ = std::move(impl);
  return d;
}

void Pending::wait() {
  if (!finish_) return;
  auto f = std::move(finish_);
  finish_ = nullptr;
  f();
}

Pending Distributed::all_gather(const torch::Tensor& shard, const torch::Tensor& full) {
  if (full.numel() != shard.numel() * world_)
    throw Error("distributed",
                fmt::format("all_gather: {} elements for {} ranks of {}", full.numel(), world_, shard.numel()));
  if (!impl_) {
    full.copy_(shard.reshape({-1}));
    return {};
  }
  torch::Tensor in = shard.reshape({-1});
  torch::Tensor out =
      full.device() == impl_->device ? full : torch::empty({full.numel()}, full.options().device(impl_->device));
  if (in.device() != impl_->device) in = in.to(impl_->device);
  auto copy_back = [full, out]() mutable {
    if (!out.is_same(full)) full.copy_(out);
  };
  try {
    if (impl_->gloo) {
      // Gloo's all-gather copies bytes; bf16 goes through it as fp16 (same size; no arithmetic).
      const bool low = in.scalar_type() == torch::kBFloat16;
      std::vector<std::vector<torch::Tensor>> outputs{(low ? out.view(torch::kHalf) : out).chunk(world_)};
      std::vector<torch::Tensor> inputs{(low ? in.view(torch::kHalf) : in).contiguous()};
      return Impl::pending(impl_->pg->allgather(outputs, inputs), "all-gather", copy_back);
    }
    torch::Tensor src = in.contiguous();
    return Impl::pending(impl_->pg->_allgather_base(out, src), "all-gather",
                         [copy_back, src]() mutable { copy_back(); });
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Impl::failed("all-gather", e);
  }
}

Pending Distributed::reduce_scatter(const torch::Tensor& full, const torch::Tensor& shard) {
  const int64_t n = shard.numel();
  if (full.numel() != n * world_)
    throw Error("distributed", fmt::format("reduce_scatter: {} elements for {} ranks of {}", full.numel(), world_, n));
  if (!impl_) {
    shard.copy_(full.reshape({-1}));
    return {};
  }
  if (impl_->gloo) {
    torch::Tensor flat = full.reshape({-1});
    Pending p = impl_->allreduce_async(flat);
    const int64_t offset = rank_ * n;
    auto holder = std::make_shared<Pending>(std::move(p));
    return Pending([holder, flat, shard, offset, n]() {
      holder->wait();
      shard.view({-1}).copy_(flat.narrow(0, offset, n));
    });
  }
  torch::Tensor in = full.device() == impl_->device ? full.reshape({-1}) : full.reshape({-1}).to(impl_->device);
  torch::Tensor out = shard.device() == impl_->device && shard.is_contiguous()
                          ? shard.view({-1})
                          : torch::empty({n}, shard.options().device(impl_->device));
  try {
    return Impl::pending(impl_->pg->_reduce_scatter_base(out, in), "reduce-scatter", [in, out, shard]() mutable {
      if (!out.is_same(shard)) shard.view({-1}).copy_(out);
    });
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Impl::failed("reduce-scatter", e);
  }
}

std::string Distributed::describe() const {
  if (!impl_) return "single process";
  return fmt::format("rank {}/{} ({} via {}:{})", rank_, world_, backend_, impl_->addr, impl_->port);
}

void Distributed::sum_buckets(const std::vector<torch::Tensor>& tensors, int64_t bucket_bytes) {
  if (!impl_) return;
  torch::NoGradGuard no_grad;
  // Buckets of same-dtype tensors, flattened, reduced and copied back.
  std::vector<torch::Tensor> bucket;
  int64_t bytes = 0;
  auto flush = [&] {
    if (bucket.empty()) return;
    std::vector<torch::Tensor> flat_parts;
    for (auto& t : bucket) flat_parts.push_back(t.reshape({-1}));
    auto flat = torch::cat(flat_parts);
    impl_->allreduce(flat);
    int64_t off = 0;
    for (auto& t : bucket) {
      t.copy_(flat.narrow(0, off, t.numel()).view_as(t));
      off += t.numel();
    }
    bucket.clear();
    bytes = 0;
  };
  for (const auto& t : tensors) {
    if (!bucket.empty() && (t.scalar_type() != bucket.front().scalar_type() || bytes >= bucket_bytes)) flush();
    bucket.push_back(t);
    bytes += t.numel() * t.element_size();
  }
  flush();
}

void Distributed::average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes) {
  if (!impl_) return;
  std::vector<torch::Tensor> grads;
  std::vector<const void*> seen;  // a tensor listed twice (a tied head) is reduced once
  for (const auto& p : params) {
    if (std::find(seen.begin(), seen.end(), p.unsafeGetTensorImpl()) != seen.end()) continue;
    seen.push_back(p.unsafeGetTensorImpl());
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);  // every rank reduces the same tensors
    grads.push_back(p.grad());
  }
  sum_buckets(grads, bucket_bytes);
  for (auto& g : grads) g.div_(world_);
}

double Distributed::mean(double value) {
  if (!impl_) return value;
  auto t = torch::tensor({value}, torch::kFloat64);  // staged through the device for NCCL
  impl_->allreduce(t);
  return t.item<double>() / world_;
}

int64_t Distributed::run_agreed(const std::function<void()>& work, const std::string& where, const std::string& hint) {
  std::exception_ptr failed;
  try {
    work();
  } catch (const Error&) {
    failed = std::current_exception();  // (as thrown: a subclass stays one)
  } catch (const std::exception& e) {   // (a filesystem or torch error)
    failed = std::make_exception_ptr(Error(where, e.what(), hint));
  }
  double share = 0;
  try {
    share = mean(failed ? 1.0 : 0.0);
  } catch (const Error&) {  // (a peer died: this rank's own error says more, where it has one)
    if (failed) std::rethrow_exception(failed);
    throw;
  }
  if (failed) std::rethrow_exception(failed);
  return std::llround(share * world_);
}

void Distributed::sum(torch::Tensor& t) {
  if (impl_) impl_->allreduce(t);
}

int64_t Distributed::from_main(int64_t value) {
  if (!impl_) return value;
  auto t = torch::full({1}, is_main() ? value : 0, torch::kInt64);
  impl_->allreduce(t);
  return t.item<int64_t>();
}

std::string Distributed::from_main(const std::string& value) {
  if (!impl_) return value;
  const int64_t size = from_main(static_cast<int64_t>(value.size()));
  auto bytes = torch::zeros({size}, torch::kUInt8);
  if (is_main() && size > 0) std::memcpy(bytes.data_ptr<uint8_t>(), value.data(), static_cast<size_t>(size));
  impl_->allreduce(bytes);
  return std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), static_cast<size_t>(size));
}

void Distributed::barrier() {
  if (!impl_) return;
  auto t = torch::zeros({1}, torch::TensorOptions().device(impl_->device));
  impl_->allreduce(t);
  if (impl_->device.is_cuda()) compat::cuda_synchronize();
}

}  // namespace libllm
