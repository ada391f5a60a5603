// torch.save files: the zip read from its central directory over a read-only mapping, the pickle
// through a small interpreter that builds only plain values and tensors. See torch_file.h.
#include "libllm/torch_file.h"

#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include "heartbeat.h"
#include "libllm/error.h"
#include "mapped_file.h"

namespace libllm::torchfile {

namespace {

// A pickled value. Every value lives in the Unpickler's arena until it is done, and values refer
// to each other by plain pointers: containers are shared (the memo refers to them, SETITEMS fills
// a dict after it was memoised), a crafted pickle may nest them a million deep or make cycles, and
// none of that recurses or leaks when the arena is freed.
struct Obj;
using Ref = Obj*;
struct Obj {
  enum Kind { kNone, kBool, kInt, kFloat, kStr, kTuple, kList, kDict, kGlobal, kStorage, kTensor } kind = kNone;
  int64_t i = 0;
  double f = 0;
  std::string s;                 // kStr: the text; kGlobal: "module.name"
  std::vector<Ref> items;        // kTuple, kList; kDict: key, value, key, value, ...
  TensorInfo* tensor = nullptr;  // kTensor; kStorage: dtype, storage, storage_numel (in the arena)
};

// Limits that no state dict comes near (a 65B model's pickle is under 100 KB).
constexpr size_t kMaxValues = 4'000'000;  // values made, and stack pushes, marks and memo stores
constexpr size_t kMaxPickleBytes = size_t{64} << 20;

const char* kind_name(Obj::Kind k) {
  static const char* names[] = {"None", "bool", "int",    "float",   "str",   "tuple",
                                "list", "dict", "global", "storage", "tensor"};
  return names[k];
}

// torch.<Type>Storage -> dtype.
constexpr const char* kReadableTypes = "libllm reads float32/64, float16, bfloat16, int8-64, uint8 and bool tensors";
const std::map<std::string, torch::Dtype>& storage_types() {
  static const std::map<std::string, torch::Dtype> m = {
      {"torch.FloatStorage", torch::kFloat32}, {"torch.DoubleStorage", torch::kFloat64},
      {"torch.HalfStorage", torch::kFloat16},  {"torch.BFloat16Storage", torch::kBFloat16},
      {"torch.LongStorage", torch::kInt64},    {"torch.IntStorage", torch::kInt32},
      {"torch.ShortStorage", torch::kInt16},   {"torch.CharStorage", torch::kInt8},
      {"torch.ByteStorage", torch::kUInt8},    {"torch.BoolStorage", torch::kBool}};
  return m;
}

// The globals a dict of tensors needs; GLOBAL refuses every other one.
const std::set<std::string>& known_globals() {
  static const std::set<std::string> s = {"collections.OrderedDict",
                                          "torch._utils._rebuild_tensor_v2",
                                          "torch._utils._rebuild_tensor",
                                          "torch._utils._rebuild_parameter",
                                          "torch._utils._rebuild_parameter_with_state",
                                          "torch._tensor._rebuild_from_type_v2",
                                          "torch._tensor.Tensor",
                                          "torch.Tensor",
                                          "torch.nn.parameter.Parameter"};
  return s;
}

class Unpickler {
 public:
  Unpickler(const uint8_t* data, size_t size, std::string where)
      : p_(data), end_(data + size), begin_(data), where_(std::move(where)) {}

  // Every growing structure (values, stack, marks, memo) counts against one budget, so a crafted
  // pickle cannot grow memory without bound.
  void spend() {
    if (++spent_ > kMaxValues) fail("more than " + std::to_string(kMaxValues) + " values or references");
  }
  Ref make(Obj::Kind k) {
    spend();
    values_.emplace_back();
    values_.back().kind = k;
    return &values_.back();
  }
  TensorInfo* info(const TensorInfo& from = {}) {
    infos_.push_back(from);
    return &infos_.back();
  }

  Ref run() {
    for (;;) {
      const size_t at = static_cast<size_t>(p_ - begin_);
      const uint8_t op = u8();
      switch (op) {
        case 0x80: {  // PROTO
          const int v = u8();
          if (v < 2 || v > 5) fail("pickle protocol " + std::to_string(v) + " (torch.save writes 2)");
          break;
        }
        case 0x95:
          take(8);
          break;  // FRAME: a size hint
        case '}':
          push(make(Obj::kDict));
          break;
        case ']':
          push(make(Obj::kList));
          break;
        case ')':
          push(make(Obj::kTuple));
          break;
        case '(':
          spend();
          marks_.push_back(stack_.size());
          break;
        case 'N':
          push(make(Obj::kNone));
          break;
        case 0x88:
        case 0x89: {  // NEWTRUE, NEWFALSE
          auto o = make(Obj::kBool);
          o->i = op == 0x88;
          push(o);
          break;
        }
        case 'K':
          push_int(u8());
          break;
        case 'M':
          push_int(le(2));
          break;
        case 'J':
          push_int(static_cast<int32_t>(static_cast<uint32_t>(le(4))));
          break;
        case 0x8a: {  // LONG1: n little-endian two's-complement bytes
          const int n = u8();
          if (n > 8) fail("an integer of " + std::to_string(n) + " bytes");
          uint64_t v = n ? le(n) : 0;
          if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t{0} << (8 * n);  // sign-extend
          push_int(static_cast<int64_t>(v));
          break;
        }
        case 'G': {  // BINFLOAT, big-endian
          uint64_t v = 0;
          for (uint8_t b : take(8)) v = v << 8 | b;
          auto o = make(Obj::kFloat);
          std::memcpy(&o->f, &v, 8);
          push(o);
          break;
        }
        case 'X':
          push_str(le(4));
          break;  // BINUNICODE
        case 0x8c:
          push_str(u8());
          break;  // SHORT_BINUNICODE
        case 0x8d:
          push_str(le(8));
          break;     // BINUNICODE8
        case 'c': {  // GLOBAL "module\nname\n"
          const std::string module = line(), name = line();
          push_global(module, name);
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          Ref name = pop(), module = pop();
          if (module->kind != Obj::kStr || name->kind != Obj::kStr) fail("STACK_GLOBAL of non-strings");
          push_global(module->s, name->s);
          break;
        }
        case 'q':
          spend();
          memo_[u8()] = top();
          break;  // BINPUT
        case 'r':
          spend();
          memo_[le(4)] = top();
          break;  // LONG_BINPUT
        case 0x94:
          spend();
          memo_[memo_.size()] = top();
          break;  // MEMOIZE
        case 'h':
          push(memo(u8()));
          break;  // BINGET
        case 'j':
          push(memo(le(4)));
          break;  // LONG_BINGET
        case 0x85:
        case 0x86:
        case 0x87: {  // TUPLE1..3
          auto t = make(Obj::kTuple);
          t->items.resize(op - 0x84);
          for (size_t k = t->items.size(); k-- > 0;) t->items[k] = pop();
          push(t);
          break;
        }
        case 't': {  // TUPLE from the mark
          auto t = make(Obj::kTuple);
          t->items = pop_mark();
          push(t);
          break;
        }
        case 'Q':
          push(persistent(pop()));
          break;     // BINPERSID
        case 'R': {  // REDUCE
          Ref args = pop(), fn = pop();
          push(call(fn, args));
          break;
        }
        case 'b': {  // BUILD: a state dict's _metadata, a parameter's state: not needed
          pop();
          if (top()->kind != Obj::kDict && top()->kind != Obj::kTensor)
            fail("BUILD on a " + std::string(kind_name(top()->kind)));
          break;
        }
        case 's': {  // SETITEM
          Ref v = pop(), k = pop();
          dict(top())->items.insert(top()->items.end(), {k, v});
          break;
        }
        case 'u': {  // SETITEMS
          auto kv = pop_mark();
          if (kv.size() % 2) fail("SETITEMS with an odd number of items");
          auto& d = dict(top())->items;
          d.insert(d.end(), kv.begin(), kv.end());
          break;
        }
        case 'a': {  // APPEND
          Ref v = pop();
          list(top())->items.push_back(v);
          break;
        }
        case 'e': {  // APPENDS
          auto vs = pop_mark();
          auto& l = list(top())->items;
          l.insert(l.end(), vs.begin(), vs.end());
          break;
        }
        case '.':  // STOP
          if (stack_.size() != 1) fail("STOP with " + std::to_string(stack_.size()) + " values on the stack");
          return stack_.back();
        default: {
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          fail(std::string("pickle opcode ") + hex + " at byte " + std::to_string(at) +
               ", which torch.save (pickle protocols 2-5) does not write for a dict of tensors");
        }
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(where_, "unsupported or corrupt pickle: " + what,
                "libllm reads files torch.save wrote from a dict of tensors; re-save the weights with "
                "save_pretrained(safe_serialization=True) or safetensors");
  }
  std::vector<uint8_t> take(size_t n) {
    if (static_cast<size_t>(end_ - p_) < n) fail("it ends early");
    std::vector<uint8_t> out(p_, p_ + n);
    p_ += n;
    return out;
  }
  uint8_t u8() {
    if (p_ >= end_) fail("it ends early (no STOP)");
    return *p_++;
  }
  uint64_t le(int n) {
    uint64_t v = 0;
    auto b = take(static_cast<size_t>(n));
    for (int k = n - 1; k >= 0; --k) v = v << 8 | b[static_cast<size_t>(k)];
    return v;
  }
  std::string line() {
    const uint8_t* nl = static_cast<const uint8_t*>(std::memchr(p_, '\n', static_cast<size_t>(end_ - p_)));
    if (!nl) fail("an unterminated GLOBAL");
    std::string s(reinterpret_cast<const char*>(p_), static_cast<size_t>(nl - p_));
    p_ = nl + 1;
    return s;
  }
  void push(Ref r) {
    spend();
    stack_.push_back(std::move(r));
  }
  void push_int(int64_t v) {
    auto o = make(Obj::kInt);
    o->i = v;
    push(o);
  }
  void push_str(uint64_t n) {
    if (n > static_cast<uint64_t>(end_ - p_)) fail("a string past the end");
    auto o = make(Obj::kStr);
    o->s.assign(reinterpret_cast<const char*>(p_), static_cast<size_t>(n));
    p_ += n;
    push(o);
  }
  void push_global(const std::string& module, const std::string& name) {
    const std::string full = module + "." + name;
    if (!known_globals().count(full) && !storage_types().count(full)) {
      if (module == "torch" && name.size() > 7 && name.compare(name.size() - 7, 7, "Storage") == 0)
        throw Error(where_, "holds tensors of type " + full + ", which libllm does not read",
                    std::string(kReadableTypes) + "; convert those tensors in Python (e.g. .float()) and save again");
      throw Error(where_, "the pickle refers to " + full + ", which is not part of a dict of tensors (it is not run)",
                  "libllm reads only tensors; load the file in Python and save its tensors with safetensors");
    }
    auto o = make(Obj::kGlobal);
    o->s = full;
    push(o);
  }
  Ref pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back()))
      fail("a value taken from an empty stack (or across a MARK)");
    Ref r = std::move(stack_.back());
    stack_.pop_back();
    return r;
  }
  Ref top() {
    if (stack_.empty()) fail("an empty stack");
    return stack_.back();
  }
  std::vector<Ref> pop_mark() {
    if (marks_.empty()) fail("no MARK");
    std::vector<Ref> out(stack_.begin() + static_cast<std::ptrdiff_t>(marks_.back()), stack_.end());
    stack_.resize(marks_.back());
    marks_.pop_back();
    return out;
  }
  Ref memo(uint64_t k) {
    auto it = memo_.find(k);
    if (it == memo_.end()) fail("a memo entry that was never stored");
    return it->second;
  }
  Ref dict(Ref r) {
    if (r->kind != Obj::kDict) fail("SETITEM on a " + std::string(kind_name(r->kind)));
    return r;
  }
  Ref list(Ref r) {
    if (r->kind != Obj::kList) fail("APPEND on a " + std::string(kind_name(r->kind)));
    return r;
  }
  static const Obj& arg(const Ref& args, size_t k) { return *args->items[k]; }
  int64_t int_arg(const Obj& o, const char* what) {
    if (o.kind != Obj::kInt) fail(std::string(what) + " is a " + kind_name(o.kind) + ", not an int");
    return o.i;
  }
  std::vector<int64_t> ints(const Obj& o, const char* what) {
    if (o.kind != Obj::kTuple && o.kind != Obj::kList) fail(std::string(what) + " is not a tuple");
    std::vector<int64_t> v;
    for (const auto& x : o.items) v.push_back(int_arg(*x, what));
    return v;
  }

  // ('storage', torch.<Type>Storage, key, location, numel)
  Ref persistent(const Ref& pid) {
    if (pid->kind != Obj::kTuple || pid->items.size() != 5 || pid->items[0]->kind != Obj::kStr ||
        pid->items[0]->s != "storage")
      fail("a persistent id that is not ('storage', type, key, location, numel)");
    const Obj& type = arg(pid, 1);
    if (type.kind != Obj::kGlobal || !storage_types().count(type.s))
      throw Error(where_,
                  "a storage of type " + (type.kind == Obj::kGlobal ? type.s : std::string("(not a class)")) +
                      ", which libllm does not read",
                  kReadableTypes);
    if (arg(pid, 2).kind != Obj::kStr) fail("a storage key that is not a string");
    auto o = make(Obj::kStorage);
    o->tensor = info();
    o->tensor->dtype = storage_types().at(type.s);
    o->tensor->storage = arg(pid, 2).s;
    o->tensor->storage_numel = int_arg(arg(pid, 4), "a storage's size");
    // Its bytes must be countable (the record's size is checked against them when read).
    int64_t bytes = 0;
    if (o->tensor->storage_numel < 0 ||
        __builtin_mul_overflow(o->tensor->storage_numel, static_cast<int64_t>(c10::elementSize(o->tensor->dtype)),
                               &bytes))
      fail("a storage size of " + std::to_string(o->tensor->storage_numel) + " elements");
    return o;
  }

  Ref call(const Ref& fn, const Ref& args) {
    if (fn->kind != Obj::kGlobal) fail("a call of a " + std::string(kind_name(fn->kind)));
    if (args->kind != Obj::kTuple) fail("call arguments that are not a tuple");
    const std::string& f = fn->s;
    const size_t n = args->items.size();
    if (f == "collections.OrderedDict") {
      if (n != 0) fail("OrderedDict with arguments");
      return make(Obj::kDict);
    }
    if (f == "torch._utils._rebuild_tensor_v2" || f == "torch._utils._rebuild_tensor") {
      if (n < 4) fail(f + " with " + std::to_string(n) + " arguments");
      const Obj& storage = arg(args, 0);
      if (storage.kind != Obj::kStorage) fail("a tensor whose storage is a " + std::string(kind_name(storage.kind)));
      auto t = make(Obj::kTensor);
      t->tensor = info(*storage.tensor);
      t->tensor->offset = int_arg(arg(args, 1), "a storage offset");
      t->tensor->shape = ints(arg(args, 2), "a tensor's size");
      t->tensor->stride = ints(arg(args, 3), "a tensor's stride");
      return t;
    }
    if (f == "torch._utils._rebuild_parameter" || f == "torch._utils._rebuild_parameter_with_state") {
      if (n < 1 || arg(args, 0).kind != Obj::kTensor) fail("a parameter without a tensor");
      return args->items[0];
    }
    if (f == "torch._tensor._rebuild_from_type_v2") {  // (func, type, args, state)
      if (n != 4 || arg(args, 2).kind != Obj::kTuple) fail(f + " with unexpected arguments");
      const Obj& type = arg(args, 1);
      if (type.kind != Obj::kGlobal ||
          (type.s != "torch._tensor.Tensor" && type.s != "torch.Tensor" && type.s != "torch.nn.parameter.Parameter"))
        fail("a tensor subclass");
      const Obj& fn2 = arg(args, 0);  // one level only: the inner call must build the tensor itself
      if (fn2.kind != Obj::kGlobal ||
          (fn2.s != "torch._utils._rebuild_tensor_v2" && fn2.s != "torch._utils._rebuild_tensor"))
        fail(f + " of something other than a tensor");
      return call(args->items[0], args->items[2]);
    }
    fail("a call of " + f);
  }

  const uint8_t *p_, *end_, *begin_;
  std::string where_;
  std::vector<Ref> stack_;
  std::vector<size_t> marks_;
  std::map<uint64_t, Ref> memo_;
  size_t spent_ = 0;
  std::deque<Obj> values_;  // the arena (a deque: pointers stay valid as it grows)
  std::deque<TensorInfo> infos_;
};

std::string what_of(const std::exception& e) {
  std::string s = e.what();
  const auto nl = s.find('\n');  // c10::Error appends a backtrace
  return nl == std::string::npos ? s : s.substr(0, nl);
}

// One record of the zip archive, from the central directory.
struct Record {
  uint16_t method = 0;  // 0: stored (torch.save writes only these); 8: deflated
  uint64_t size = 0;    // uncompressed bytes
  uint64_t packed = 0;  // bytes in the file
  uint64_t local = 0;   // offset of its local header
};

uint64_t rd(const uint8_t* p, int n) {  // little-endian
  uint64_t v = 0;
  for (int k = n - 1; k >= 0; --k) v = v << 8 | p[k];
  return v;
}

}  // namespace

// The file, mapped read-only, and its zip directory. Storages are read in place: torch.save
// stores every record uncompressed (and 64-byte aligned), so a tensor is a view of the mapping,
// as with safetensors, and its pages can be dropped once copied.
struct File::Impl {
  std::string path;
  const uint8_t* base = nullptr;
  size_t size = 0;
  std::string prefix;                     // "<archive>/", the folder every record is in
  uint64_t central = 0;                   // offset of the central directory: every record ends before it
  std::vector<uint64_t> locals;           // every record's local header offset, ascending
  std::map<std::string, Record> records;  // by name, without the prefix
  std::vector<TensorInfo> tensors;
  std::map<std::string, size_t> index;
  mutable std::mutex mu;
  mutable std::map<std::string, torch::Tensor> copies;  // storages whose bytes are misaligned for their type

  ~Impl() { detail::unmap({base, size}); }

  [[noreturn]] void corrupt(const std::string& what) const {
    throw Error(path, "is not a readable zip archive: " + what, "the file is corrupt or truncated");
  }
  // [offset, offset + n) must lie in the file; else an error about `what`, naming `who` (a
  // tensor) or, by default, the archive.
  const uint8_t* at(uint64_t offset, uint64_t n, const std::string& what, const std::string& who = "") const {
    if (offset > size || n > size - offset) {
      if (who.empty()) corrupt(what + " runs past the end of the file");
      throw Error(who, what + " runs past the end of the file", "the file is corrupt or truncated");
    }
    return base + offset;
  }

  void map() {
    const detail::Mapping m = detail::map_readonly(path);
    base = m.base;
    size = m.size;
    if (size == 0) throw Error(path, "is empty", "expected a pytorch_model.bin written by torch.save");
  }

  // The central directory: found from its end record (zip64's when the counts overflow 16/32 bits).
  void read_directory() {
    if (size < 22) corrupt("too short for a zip archive");
    size_t eocd = size - 22;
    const size_t lowest = size > 22 + 65535 ? size - 22 - 65535 : 0;  // the archive comment is < 64 KiB
    while (rd(base + eocd, 4) != 0x06054b50) {
      if (eocd == lowest) corrupt("no end of central directory (the end of the file is missing)");
      --eocd;
    }
    uint64_t count = rd(base + eocd + 10, 2), dir_size = rd(base + eocd + 12, 4), dir = rd(base + eocd + 16, 4);
    if (count == 0xFFFF || dir_size == 0xFFFFFFFF || dir == 0xFFFFFFFF) {  // zip64
      if (eocd < 20 || rd(base + eocd - 20, 4) != 0x07064b50) corrupt("no zip64 end of central directory locator");
      const uint8_t* z = at(rd(base + eocd - 20 + 8, 8), 56, "the zip64 end of central directory");
      if (rd(z, 4) != 0x06064b50) corrupt("a bad zip64 end of central directory");
      count = rd(z + 32, 8);
      dir_size = rd(z + 40, 8);
      dir = rd(z + 48, 8);
    }
    const uint8_t* p = at(dir, dir_size, "the central directory");
    central = dir;
    std::set<std::string> names;
    const uint8_t* end = p + dir_size;
    if (count > dir_size / 46)
      corrupt(std::to_string(count) + " records in a central directory of " + std::to_string(dir_size) + " bytes");
    for (uint64_t i = 0; i < count; ++i) {
      if (end - p < 46 || rd(p, 4) != 0x02014b50) corrupt("a bad central directory entry");
      const uint64_t flags = rd(p + 8, 2), n = rd(p + 28, 2), m = rd(p + 30, 2), k = rd(p + 32, 2);
      if (static_cast<uint64_t>(end - p) < 46 + n + m + k) corrupt("a central directory entry runs past its end");
      Record r;
      r.method = static_cast<uint16_t>(rd(p + 10, 2));
      r.packed = rd(p + 20, 4);
      r.size = rd(p + 24, 4);
      r.local = rd(p + 42, 4);
      const std::string name(reinterpret_cast<const char*>(p + 46), n);
      // zip64 extra field (id 1): the 64-bit values of the fields saturated above, in this order.
      for (const uint8_t *x = p + 46 + n, *xend = x + m; xend - x >= 4;) {
        const uint64_t id = rd(x, 2), len = rd(x + 2, 2);
        if (static_cast<uint64_t>(xend - x - 4) < len) corrupt("a bad extra field in record " + name);
        if (id == 1) {
          const uint8_t *v = x + 4, *vend = v + len;
          for (uint64_t* f : {&r.size, &r.packed, &r.local})
            if (*f == 0xFFFFFFFF) {
              if (vend - v < 8) corrupt("a short zip64 field in record " + name);
              *f = rd(v, 8);
              v += 8;
            }
        }
        x += 4 + len;
      }
      if (flags & 1) throw Error(path + ": " + name, "is encrypted", "re-save the weights with torch.save");
      if (i == 0) {
        const auto slash = name.find('/');
        if (slash == std::string::npos)
          throw Error(path, "is a zip archive, but not one torch.save wrote (its records are in no folder)",
                      "expected a pytorch_model.bin written by torch.save");
        prefix = name.substr(0, slash + 1);
      }
      // A name twice (or twice but for case, as LibTorch's zip reader compares them) could make
      // what is checked here differ from what is read.
      std::string folded = name;
      for (char& ch : folded) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (!names.insert(folded).second) corrupt("record " + name + " appears twice");
      if (name.compare(0, prefix.size(), prefix) == 0) records.emplace(name.substr(prefix.size()), r);
      locals.push_back(r.local);
      p += 46 + n + m + k;
    }
    std::sort(locals.begin(), locals.end());
  }

  const Record* find(const std::string& name) const {
    auto it = records.find(name);
    return it == records.end() ? nullptr : &it->second;
  }
  // The bytes of stored record `r` in the mapping; `where` names what needs them in errors.
  const uint8_t* stored(const std::string& name, const Record& r, const std::string& where) const {
    if (r.method != 0 || r.packed != r.size)
      throw Error(where,
                  "its record " + name + " is compressed (zip method " + std::to_string(r.method) +
                      "), which torch.save never writes",
                  "re-save the weights with torch.save or safetensors");
    const uint8_t* h = at(r.local, 30, "its record " + name + "'s local header", where);
    if (rd(h, 4) != 0x04034b50)
      throw Error(where, "its record " + name + " has a bad local header", "the file is corrupt or truncated");
    // The local header must name the record the central directory names, and the bytes must end
    // before the next record (or the central directory): a damaged header would otherwise move
    // the read elsewhere.
    const uint64_t n = rd(h + 26, 2), m = rd(h + 28, 2), begin = r.local + 30 + n + m;
    const auto next_it = std::upper_bound(locals.begin(), locals.end(), r.local);
    const uint64_t next = next_it == locals.end() ? central : std::min(*next_it, central);
    const std::string full = prefix + name;
    const uint8_t* local_name = at(r.local + 30, n, "its record " + name + "'s local header", where);
    // (its extra field, torch.save's alignment padding, must be whole (id, length) entries that
    // fill exactly its declared length: a length off by a few bytes breaks that)
    bool extra_ok = true;
    const uint8_t* x = at(r.local + 30 + n, m, "its record " + name + "'s local header", where);
    for (uint64_t used = 0; extra_ok && used < m;) {
      extra_ok = m - used >= 4 && rd(x + used + 2, 2) <= m - used - 4;
      if (extra_ok) used += 4 + rd(x + used + 2, 2);
    }
    if (n != full.size() || std::memcmp(local_name, full.data(), n) != 0 || !extra_ok || begin > next ||
        r.size > next - begin)
      throw Error(where, "its record " + name + " has a damaged local header", "the file is corrupt");
    return at(begin, r.size, "its record " + name, where);
  }
  // A small record's bytes (data.pkl, byteorder), at most `cap`: a deflated one is inflated by
  // LibTorch's zip reader once its declared size is known to fit.
  std::string small(const std::string& name, size_t cap, const std::string& where) const {
    const Record* r = find(name);
    if (!r)
      throw Error(path, "has no " + name + " record", "is it a TorchScript archive? libllm reads torch.save files");
    if (r->size > cap)
      throw Error(where, "is " + std::to_string(r->size) + " bytes, more than a dict of tensors needs",
                  "the file is corrupt, or not a state dict");
    if (r->method == 0) {
      const uint8_t* b = stored(name, *r, where);
      return std::string(reinterpret_cast<const char*>(b), r->size);
    }
    if (r->method != 8)
      throw Error(where, "is compressed with zip method " + std::to_string(r->method) + ", which libllm does not read",
                  "re-save the weights with torch.save or safetensors");
    std::string out;
    try {
      caffe2::serialize::PyTorchStreamReader zip(path);
      auto [ptr, n] = zip.getRecord(name);
      out.assign(static_cast<const char*>(ptr.get()), n);
    } catch (const std::exception& e) {
      throw Error(where, "cannot inflate the record: " + what_of(e), "the file is corrupt or truncated");
    }
    if (out.size() != r->size)
      throw Error(where,
                  "inflates to " + std::to_string(out.size()) + " bytes, not the " + std::to_string(r->size) +
                      " its directory entry says",
                  "the file is corrupt");
    return out;
  }
};

File::File(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
File::~File() = default;

std::shared_ptr<File> File::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->map();
  const uint8_t* magic = impl->base;
  if (magic[0] == 0x80)  // a bare pickle: torch.save(..., _use_new_zipfile_serialization=False)
    throw Error(
        path, "is in torch.save's legacy format (PyTorch < 1.6), which libllm does not read",
        "re-save it in Python: torch.save(torch.load(path), path), or save_pretrained(safe_serialization=True)");
  if (impl->size < 2 || magic[0] != 'P' || magic[1] != 'K')
    throw Error(path, "is not a torch.save file (not a zip archive)",
                "expected a pytorch_model.bin written by torch.save");
  impl->read_directory();
  if (impl->find("byteorder")) {
    const std::string order = impl->small("byteorder", 16, path + ": byteorder");
    if (order != "little")
      throw Error(path, "holds " + order + "-endian tensors", "re-save it on a little-endian machine");
  }
  const std::string pkl = impl->small("data.pkl", kMaxPickleBytes, path + ": data.pkl");
  Unpickler unpickler(reinterpret_cast<const uint8_t*>(pkl.data()), pkl.size(), path + ": data.pkl");
  Ref root;
  try {
    root = unpickler.run();
  } catch (const std::bad_alloc&) {
    throw Error(path + ": data.pkl", "does not fit in memory", "the file is corrupt, or not a state dict");
  }
  if (root->kind != Obj::kDict)
    throw Error(path, std::string("holds a ") + kind_name(root->kind) + ", not a dict of tensors",
                "expected a state dict (name -> tensor), as save_pretrained writes");
  std::map<std::string, std::pair<int64_t, torch::Dtype>> storage_sizes;  // key -> (elements, type): one per storage
  for (size_t k = 0; k < root->items.size(); k += 2) {
    const Obj& key = *root->items[k];
    const Obj& value = *root->items[k + 1];
    if (key.kind != Obj::kStr)
      throw Error(path, std::string("has a key of type ") + kind_name(key.kind), "expected a dict of name -> tensor");
    const std::string where = path + ": tensor '" + key.s + "'";
    if (value.kind != Obj::kTensor)
      throw Error(where, std::string("is a ") + kind_name(value.kind) + ", not a tensor",
                  "expected a dict of name -> tensor");
    TensorInfo t = *value.tensor;
    t.name = key.s;
    if (t.shape.size() != t.stride.size()) throw Error(where, "has sizes and strides of different lengths");
    // The last element's index, offset + sum (size - 1) * stride, checked for overflow: a file
    // could claim sizes and strides whose product wraps around into the storage.
    const std::string outside = "lies outside its storage of " + std::to_string(t.storage_numel) + " elements";
    int64_t last = t.offset, numel = 1;
    bool overflow = t.offset < 0;
    for (size_t d = 0; d < t.shape.size(); ++d) {
      if (t.shape[d] < 0 || t.stride[d] < 0) throw Error(where, "has a negative size or stride");
      int64_t step = 0;
      overflow = overflow || __builtin_mul_overflow(numel, t.shape[d], &numel);
      if (t.shape[d] > 0)
        overflow = overflow || __builtin_mul_overflow(t.shape[d] - 1, t.stride[d], &step) ||
                   __builtin_add_overflow(last, step, &last);
    }
    if (overflow || t.offset > t.storage_numel || (numel > 0 && last >= t.storage_numel)) {
      std::ostringstream os;
      os << outside << " (offset " << t.offset << ", size " << c10::IntArrayRef(t.shape) << ", stride "
         << c10::IntArrayRef(t.stride) << ")";
      throw Error(where, os.str(), "the file is corrupt");
    }
    auto [it, fresh] = storage_sizes.emplace(t.storage, std::make_pair(t.storage_numel, t.dtype));
    if (!fresh && it->second != std::make_pair(t.storage_numel, t.dtype))
      throw Error(where, "disagrees with another tensor on its storage's size or type", "the file is corrupt");
    if (!impl->find("data/" + t.storage))
      throw Error(where, "its storage record data/" + t.storage + " is missing", "the file is corrupt or truncated");
    if (!impl->index.emplace(t.name, impl->tensors.size()).second) throw Error(where, "appears twice");
    impl->tensors.push_back(std::move(t));
  }
  return std::shared_ptr<File>(new File(std::move(impl)));
}

const std::string& File::path() const { return impl_->path; }
const std::vector<TensorInfo>& File::tensors() const { return impl_->tensors; }

const TensorInfo* File::find(const std::string& name) const {
  auto it = impl_->index.find(name);
  return it == impl_->index.end() ? nullptr : &impl_->tensors[it->second];
}

torch::Tensor File::read(const TensorInfo& t) const {
  const std::string where = impl_->path + ": tensor '" + t.name + "'";
  const std::string name = "data/" + t.storage;
  const Record& r = impl_->records.at(name);  // (checked by open)
  const size_t need = static_cast<size_t>(t.storage_numel) * c10::elementSize(t.dtype);
  if (r.size < need)
    throw Error(where, "its storage holds " + std::to_string(r.size) + " bytes, not " + std::to_string(need),
                "the file is corrupt or truncated");
  const uint8_t* bytes = impl_->stored(name, r, where);
  detail::heartbeat("reading", impl_->path);
  torch::Tensor storage;
  if (reinterpret_cast<uintptr_t>(bytes) % c10::elementSize(t.dtype) == 0) {
    storage = torch::from_blob(const_cast<uint8_t*>(bytes), {t.storage_numel}, torch::dtype(t.dtype));
  } else {  // not torch.save's layout (other zip writers do not align): copied once
    std::lock_guard<std::mutex> lock(impl_->mu);
    torch::Tensor& copy = impl_->copies[t.storage];
    if (!copy.defined()) {
      copy = torch::empty({t.storage_numel}, torch::dtype(t.dtype));
      std::memcpy(copy.data_ptr(), bytes, need);
    }
    storage = copy;
  }
  return storage.as_strided(t.shape, t.stride, t.offset);
}

void File::release(const TensorInfo& t) const {
  const std::string name = "data/" + t.storage;
  const Record& r = impl_->records.at(name);
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->copies.erase(t.storage);  // (tensors handed out keep their own reference)
  }
  if (r.method == 0) detail::release_pages(impl_->stored(name, r, impl_->path), r.size);
}

}  // namespace libllm::torchfile
