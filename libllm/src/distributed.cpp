#include "libllm/distributed.h"

#define USE_C10D_GLOO 1
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <fmt/core.h>

#include <cstdlib>

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
  try {
    return std::stoi(v);
  } catch (...) {
    throw Error(*names.begin(), std::string("expected an integer, got '") + v + "'", "check the launcher's environment");
  }
}

}  // namespace

struct Distributed::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  std::string addr;
  int port = 0;

  void allreduce(torch::Tensor& t) {
    std::vector<torch::Tensor> v{t};
    try {
      pg->allreduce(v)->wait();
    } catch (const std::exception& e) {
      throw Error("distributed", std::string("all-reduce failed (a peer died or timed out): ") + e.what());
    }
  }
};

Distributed::~Distributed() = default;
Distributed::Distributed(Distributed&&) noexcept = default;

Distributed Distributed::from_env(double timeout_s) {
  Distributed d;
  d.world_ = env_int({"WORLD_SIZE", "SLURM_NTASKS"}, 1);
  d.rank_ = env_int({"RANK", "SLURM_PROCID"}, 0);
  d.local_rank_ = env_int({"LOCAL_RANK", "SLURM_LOCALID"}, 0);
  if (d.world_ <= 1) return d;
  if (d.rank_ < 0 || d.rank_ >= d.world_)
    throw Error("RANK", fmt::format("rank {} outside a world of {}", d.rank_, d.world_));
  auto impl = std::make_unique<Impl>();
  const char* addr = env_first({"MASTER_ADDR"});
  impl->addr = addr ? addr : "127.0.0.1";
  impl->port = env_int({"MASTER_PORT"}, 29500);
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  try {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(impl->port);
    opts.isServer = d.rank_ == 0;
    opts.numWorkers = d.world_;
    opts.timeout = timeout;
    impl->store = c10::make_intrusive<c10d::TCPStore>(impl->addr, opts);
    auto pg_opts = c10d::ProcessGroupGloo::Options::create(timeout);
    pg_opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(impl->addr));
    impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("libllm", impl->store), d.rank_, d.world_, pg_opts);
  } catch (const std::exception& e) {
    throw Error(fmt::format("{}:{}", impl->addr, impl->port),
                fmt::format("rank {}/{} could not join the process group: {}", d.rank_, d.world_,
                            std::string(e.what()).substr(0, std::string(e.what()).find('\n'))),
                "check MASTER_ADDR/MASTER_PORT and that every rank was started");
  }
  d.impl_ = std::move(impl);
  return d;
}

std::string Distributed::describe() const {
  if (!impl_) return "single process";
  return fmt::format("rank {}/{} (gloo via {}:{})", rank_, world_, impl_->addr, impl_->port);
}

void Distributed::average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes) {
  if (!impl_) return;
  // Buckets of same-dtype gradients, flattened, reduced, divided and copied back.
  std::vector<torch::Tensor> bucket;
  int64_t bytes = 0;
  auto flush = [&] {
    if (bucket.empty()) return;
    std::vector<torch::Tensor> flat_parts;
    for (auto& g : bucket) flat_parts.push_back(g.reshape({-1}));
    auto flat = torch::cat(flat_parts);
    impl_->allreduce(flat);
    flat.div_(world_);
    int64_t off = 0;
    for (auto& g : bucket) {
      g.copy_(flat.narrow(0, off, g.numel()).view_as(g));
      off += g.numel();
    }
    bucket.clear();
    bytes = 0;
  };
  for (const auto& p : params) {
    torch::Tensor g = p.grad();
    if (!g.defined()) {  // every rank must reduce the same tensors: a missing gradient is zero
      p.mutable_grad() = torch::zeros_like(p);
      g = p.grad();
    }
    if (!bucket.empty() && (g.scalar_type() != bucket.front().scalar_type() || bytes >= bucket_bytes)) flush();
    bucket.push_back(g);
    bytes += g.numel() * g.element_size();
  }
  flush();
}

double Distributed::mean(double value) {
  if (!impl_) return value;
  auto t = torch::tensor({value}, torch::kFloat64);
  impl_->allreduce(t);
  return t.item<double>() / world_;
}

void Distributed::sum(torch::Tensor& t) {
  if (impl_) impl_->allreduce(t);
}

void Distributed::barrier() {
  if (!impl_) return;
  auto t = torch::zeros({1});
  impl_->allreduce(t);
}

}  // namespace libllm
