#include "libllm/tokenizer.h"

#include <dlfcn.h>

#include <algorithm>
#include <filesystem>
#include <mutex>

#include "atomic_file.h"
#include "libllm/config.h"
#include "libllm/error.h"
#include "libllm/model_config.h"

namespace libllm {
namespace {

// The sentencepiece shim (sentencepiece_shim.cpp), loaded privately; see the comment there.
struct Shim {
  void* (*load)(const std::string*, std::string*);
  void (*free)(void*);
  int64_t (*info)(void*, int);
  bool (*encode)(void*, const std::string*, std::vector<int>*, std::string*);
  bool (*encode_spans)(void*, const std::string*, std::vector<int>*, std::vector<int64_t>*, std::vector<int64_t>*,
                       std::string*);
  bool (*decode)(void*, const std::vector<int>*, std::string*, std::string*);
  void (*piece)(void*, int, std::string*);
  bool (*train)(std::vector<std::string>*, const std::string*, std::string*, std::string*);
  std::string path;  // the file loaded
};

template <class F>
void bind(void* lib, const char* name, F& fn, const std::string& path) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn) throw Error(path, std::string("sentencepiece shim lacks ") + name, "rebuild libllm");
}

// The module's file: $LIBLLM_SENTENCEPIECE_SHIM; else by its name through the program's run path
// and LD_LIBRARY_PATH (libllm's CMake package gives the programs that link it a run path to its
// lib/); else lib/ beside the program's bin/ (libllm's own programs, installed or in the build
// tree); else where libllm was configured to install it.
const Shim& shim() {
  static Shim s;
  static std::once_flag once;
  std::call_once(once, [] {
    const std::string name = std::filesystem::path(LIBLLM_SPM_INSTALL_PATH).filename().string();
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("LIBLLM_SENTENCEPIECE_SHIM"); env && *env) candidates.push_back(env);
    candidates.push_back(name);  // (a bare name: dlopen searches the run path)
    std::error_code ec;
    const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (!ec) candidates.push_back((exe.parent_path().parent_path() / "lib" / name).string());
    candidates.push_back(LIBLLM_SPM_INSTALL_PATH);
    std::string errors;
    for (const auto& path : candidates) {
      const bool bare = path == name;
      if (!bare && !std::filesystem::exists(path)) continue;
      void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (!lib) {
        if (!bare) errors += std::string(" ") + dlerror();
        continue;
      }
      bind(lib, "llm_spm_load", s.load, path);
      bind(lib, "llm_spm_free", s.free, path);
      bind(lib, "llm_spm_info", s.info, path);
      bind(lib, "llm_spm_encode", s.encode, path);
      bind(lib, "llm_spm_encode_spans", s.encode_spans, path);
      bind(lib, "llm_spm_decode", s.decode, path);
      bind(lib, "llm_spm_piece", s.piece, path);
      bind(lib, "llm_spm_train_lines", s.train, path);
      Dl_info info{};
      s.path = dladdr(reinterpret_cast<void*>(s.load), &info) && info.dli_fname ? info.dli_fname : path;
      return;
    }
    throw Error(name, "cannot find or load libllm's sentencepiece module" + errors,
                "set LIBLLM_SENTENCEPIECE_SHIM to its path (lib/" + name +
                    " of libllm's install), or give the "
                    "program a run path to that lib/ (libllm's CMake package does)");
  });
  if (!s.load) throw Error(LIBLLM_SPM_INSTALL_PATH, "libllm's sentencepiece module failed to load earlier");
  return s;
}

}  // namespace

std::string sentencepiece_module_path() { return shim().path; }

struct Tokenizer::Impl {
  void* handle = nullptr;
  ~Impl() {
    if (handle) shim().free(handle);
  }
};

void train_sentencepiece(std::vector<std::string> lines, const std::string& args, const std::string& model_path) {
  std::string model, error;
  if (!shim().train(&lines, &args, &model, &error))
    throw Error("sentencepiece trainer", error, "check the tokenizer training options");
  detail::write_file_atomic(model_path, model);
}

void TokenizerConfig::fields(Fields& f) {
  f.add("path", path);
  f.add("vocab_size", vocab_size).min(0);
  f.add("model_type", model_type).one_of({"bpe", "unigram"});
  f.add("character_coverage", character_coverage).min(0.5).max(1.0);
  f.add("input_sentence_size", input_sentence_size).min(1);
}

Tokenizer Tokenizer::load(const std::string& path) {
  if (!std::filesystem::is_regular_file(path))
    throw Error(path, "tokenizer file not found",
                "give a sentencepiece tokenizer.model (tokenizer.path in the recipe)");
  Tokenizer t;
  std::string error;
  t.impl_ = std::make_unique<Impl>();
  t.impl_->handle = shim().load(&path, &error);
  if (!t.impl_->handle)
    throw Error(path, "not a valid sentencepiece model: " + error,
                "HF folders with only tokenizer.json are not supported; use the tokenizer.model");
  t.path_ = path;
  t.vocab_size_ = shim().info(t.impl_->handle, 0);
  t.unk_id_ = shim().info(t.impl_->handle, 1);
  t.bos_id_ = shim().info(t.impl_->handle, 2);
  t.eos_id_ = shim().info(t.impl_->handle, 3);
  return t;
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  std::string error;
  if (!shim().encode(impl_->handle, &text, &ids, &error)) throw Error(path_, "encoding failed: " + error);
  return {ids.begin(), ids.end()};
}

std::vector<int64_t> Tokenizer::encode_with_specials(const std::string& text, std::vector<TokenSpan>* spans) const {
  // The special pieces written out, longest first (so "</s>" is tried before a shorter one).
  std::vector<std::pair<std::string, int64_t>> specials;
  for (int64_t id : {unk_id_, bos_id_, eos_id_})
    if (id >= 0) specials.emplace_back(piece(id), id);
  std::sort(specials.begin(), specials.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  std::vector<int64_t> ids;
  if (spans) spans->clear();
  std::vector<int> chunk_ids;
  std::vector<int64_t> begins, ends;
  std::string error;
  auto flush = [&](size_t from, size_t to) {  // encodes text[from, to) on its own
    if (to <= from) return;
    const std::string chunk = text.substr(from, to - from);
    if (!shim().encode_spans(impl_->handle, &chunk, &chunk_ids, &begins, &ends, &error))
      throw Error(path_, "encoding failed: " + error);
    for (size_t i = 0; i < chunk_ids.size(); ++i) {
      ids.push_back(chunk_ids[i]);
      if (spans) spans->push_back({static_cast<int64_t>(from) + begins[i], static_cast<int64_t>(from) + ends[i]});
    }
  };
  size_t start = 0, pos = 0;
  while (pos < text.size()) {
    const std::pair<std::string, int64_t>* hit = nullptr;
    for (const auto& sp : specials)
      if (!sp.first.empty() && text.compare(pos, sp.first.size(), sp.first) == 0) {
        hit = &sp;
        break;
      }
    if (!hit) {
      ++pos;
      continue;
    }
    flush(start, pos);
    ids.push_back(hit->second);
    if (spans) spans->push_back({static_cast<int64_t>(pos), static_cast<int64_t>(pos + hit->first.size())});
    pos += hit->first.size();
    start = pos;
  }
  flush(start, text.size());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<int> v;
  v.reserve(ids.size());
  for (int64_t id : ids)
    if (id >= 0 && id < vocab_size()) v.push_back(static_cast<int>(id));
  std::string out, error;
  if (!shim().decode(impl_->handle, &v, &out, &error)) throw Error(path_, "decoding failed: " + error);
  return out;
}

std::string Tokenizer::difference(const Tokenizer& other) const {
  std::string how;
  if (vocab_size() != other.vocab_size())
    how = "it has " + std::to_string(vocab_size()) + " pieces, the other " + std::to_string(other.vocab_size());
  int64_t differ = 0, first = -1;
  for (int64_t id = 0; id < std::min(vocab_size(), other.vocab_size()); ++id)
    if (piece(id) != other.piece(id) && differ++ == 0) first = id;
  if (differ > 0)
    how += (how.empty() ? "" : "; ") + std::to_string(differ) + " of the pieces differ, the first at id " +
           std::to_string(first) + " ('" + piece(first) + "' against '" + other.piece(first) + "')";
  if (how.empty() && (bos_id() != other.bos_id() || eos_id() != other.eos_id()))
    how = "its bos/eos ids are " + std::to_string(bos_id()) + "/" + std::to_string(eos_id()) + ", the other's " +
          std::to_string(other.bos_id()) + "/" + std::to_string(other.eos_id());
  return how;
}

std::string Tokenizer::piece(int64_t id) const {
  if (id < 0 || id >= vocab_size()) return "<out of range " + std::to_string(id) + ">";
  std::string piece;
  shim().piece(impl_->handle, static_cast<int>(id), &piece);
  return piece;
}

void Tokenizer::check_fits(const ModelConfig& model, const std::string& model_where) const {
  if (vocab_size() > model.vocab_size)
    throw Error(path_, "tokenizer has " + std::to_string(vocab_size()) + " tokens but the model (" +
                           model_where + ") has vocab_size " + std::to_string(model.vocab_size),
                "this tokenizer does not match the model; use the model's own tokenizer.model");
}

}  // namespace libllm
