// Reading the tensors of a file written by Python's torch.save, such as a Hugging Face
// pytorch_model.bin (what transformers saved before safetensors became its default in late 2023;
// many released checkpoints ship only these): a dict of name -> tensor.
//
// Format (PyTorch >= 1.6, the zip format): a zip archive with <archive>/data.pkl, a pickle of the
// dict in which each tensor is a call torch._utils._rebuild_tensor_v2(storage, offset, size,
// stride, ...) and each storage a persistent id ('storage', torch.<Type>Storage, key, location,
// numel), and <archive>/data/<key>: that storage's raw little-endian bytes, stored uncompressed.
//
// The file is mapped read-only and its zip directory (zip64 included) read by libllm, so that
// storages are read in place, like safetensors tensors, and sizes are checked before anything is
// read: data.pkl may be at most 64 MB (a deflated one, which only other zip tools write, is
// inflated by LibTorch's zip reader once its declared size is known to fit).
//
// The pickle is read by a small interpreter of its own, not Python's or TorchScript's unpickler.
// It knows the opcodes pickle protocols 2-5 use for such a dict and builds only dicts, lists,
// tuples, strings, numbers and tensors. The only callables it accepts are collections.OrderedDict
// and torch's tensor and parameter rebuild functions; any other global (os.system, a numpy array,
// a user class) is an error naming it. Nothing in the file is ever run. Opening reads the pickle
// and checks every tensor against its storage's size; a tensor's bytes are read when asked for.
// Every failure is a libllm::Error naming the file and, where one is at fault, the tensor; a
// crafted file (sizes that overflow, deep nesting, memo cycles) is an error, never a crash.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace libllm::torchfile {

// One tensor of the dict.
struct TensorInfo {
  std::string name;             // its key in the dict
  torch::Dtype dtype;           // from the storage type (torch.FloatStorage -> float32, ...)
  std::vector<int64_t> shape;   // dimensions; empty for a 0-dim scalar
  std::vector<int64_t> stride;  // in elements, one per dimension
  int64_t offset = 0;           // first element, in elements into the storage
  std::string storage;          // the storage's key (record data/<key>); tensors may share one
  int64_t storage_numel = 0;    // elements in the storage
};

// An opened torch.save file. Reading is thread-safe.
class File {
 public:
  // Opens `path` and reads its pickle. Errors: not a zip archive (or truncated), the legacy
  // pre-1.6 format, a big-endian file, a pickle that is not a dict of string -> tensor or that
  // names anything but the callables above, a tensor outside its storage, a missing storage record.
  static std::shared_ptr<File> open(const std::string& path);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const;
  // All tensors, in the dict's order.
  const std::vector<TensorInfo>& tensors() const;
  // The tensor called `name`, or nullptr.
  const TensorInfo* find(const std::string& name) const;
  // The tensor `t` (from this file) on the CPU, with its stored dtype, shape and strides: a
  // zero-copy view of the read-only mapping (torch.save stores records uncompressed and aligned;
  // a record another zip writer left misaligned is copied once). Valid while this File lives;
  // clone it before changing it. Errors name the tensor: a record shorter than its storage, or
  // compressed (torch.save never compresses one), or running past the end of the file.
  torch::Tensor read(const TensorInfo& t) const;
  // Done with `t`: the pages of its storage leave this process's resident memory (they are read
  // from the file again if used again).
  void release(const TensorInfo& t) const;

 private:
  struct Impl;
  explicit File(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace libllm::torchfile
