#include "libllm/tokenizer.h"

#include <dlfcn.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

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
  // (only now: a failed training leaves no new folder)
  const std::filesystem::path parent = std::filesystem::path(model_path).parent_path();
  std::error_code ec;
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  if (ec) throw Error(model_path, "cannot create its folder: " + ec.message(), "check the path and its permissions");
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
  if (!std::ifstream(path, std::ios::binary))  // (not a model problem: the file cannot be read)
    throw Error(path, std::string("cannot read the tokenizer file: ") + std::strerror(errno), "check its permissions");
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

// ---- tokenizer.json ---------------------------------------------------------------------------

namespace {

// One field of a protobuf message in wire format (a tokenizer.model is sentencepiece's ModelProto).
struct ProtoField {
  uint64_t number = 0;
  int wire = 0;
  uint64_t varint = 0;     // wire type 0
  std::string_view bytes;  // wire type 2 (a string or a nested message)
  uint32_t fixed32 = 0;    // wire type 5 (a float)
};

template <class Fn>
void for_each_field(std::string_view msg, const std::string& where, Fn&& fn) {
  size_t i = 0;
  auto bad = [&] {
    throw Error(where, "not a valid sentencepiece model (malformed protobuf at byte " + std::to_string(i) + ")");
  };
  auto varint = [&]() -> uint64_t {
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && i < msg.size(); shift += 7) {
      const auto b = static_cast<uint8_t>(msg[i++]);
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    bad();
    return 0;
  };
  while (i < msg.size()) {
    ProtoField f;
    const uint64_t key = varint();
    f.number = key >> 3;
    f.wire = static_cast<int>(key & 7);
    if (f.wire == 0) {
      f.varint = varint();
    } else if (f.wire == 1) {
      if (msg.size() - i < 8) bad();
      i += 8;
    } else if (f.wire == 2) {
      const uint64_t n = varint();
      if (n > msg.size() - i) bad();
      f.bytes = msg.substr(i, n);
      i += n;
    } else if (f.wire == 5) {
      if (msg.size() - i < 4) bad();
      std::memcpy(&f.fixed32, msg.data() + i, 4);
      i += 4;
    } else {
      bad();
    }
    fn(f);
  }
}

// What tokenizer.json needs of a ModelProto (field numbers from sentencepiece_model.proto).
struct SpmModel {
  enum Type { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };
  struct Piece {
    std::string text;
    float score = 0;
    int type = kNormal;
  };
  std::vector<Piece> pieces;
  int model_type = 1;  // TrainerSpec.model_type: UNIGRAM 1, BPE 2, WORD 3, CHAR 4
  bool byte_fallback = false;
  bool whitespace_suffix = false;  // TrainerSpec.treat_whitespace_as_suffix: "▁" ends a word
  std::string normalizer;  // NormalizerSpec.name
  bool charsmap = false;   // a precompiled normalization (any rule but identity)
  bool add_dummy_prefix = true, remove_extra_whitespaces = true, escape_whitespaces = true;
};

SpmModel read_spm_model(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (!in) throw Error(path, "cannot read the tokenizer file");
  const std::string data = bytes.str();
  SpmModel m;
  for_each_field(data, path, [&](const ProtoField& f) {
    if (f.number == 1 && f.wire == 2) {  // ModelProto.pieces
      SpmModel::Piece p;
      for_each_field(f.bytes, path, [&](const ProtoField& g) {
        if (g.number == 1 && g.wire == 2) p.text = std::string(g.bytes);
        if (g.number == 2 && g.wire == 5) std::memcpy(&p.score, &g.fixed32, 4);
        if (g.number == 3 && g.wire == 0) p.type = static_cast<int>(g.varint);
      });
      m.pieces.push_back(std::move(p));
    } else if (f.number == 2 && f.wire == 2) {  // ModelProto.trainer_spec
      for_each_field(f.bytes, path, [&](const ProtoField& g) {
        if (g.number == 3 && g.wire == 0) m.model_type = static_cast<int>(g.varint);
        if (g.number == 35 && g.wire == 0) m.byte_fallback = g.varint != 0;
        if (g.number == 24 && g.wire == 0) m.whitespace_suffix = g.varint != 0;
      });
    } else if (f.number == 3 && f.wire == 2) {  // ModelProto.normalizer_spec
      for_each_field(f.bytes, path, [&](const ProtoField& g) {
        if (g.number == 1 && g.wire == 2) m.normalizer = std::string(g.bytes);
        if (g.number == 2 && g.wire == 2) m.charsmap = !g.bytes.empty();
        if (g.number == 3 && g.wire == 0) m.add_dummy_prefix = g.varint != 0;
        if (g.number == 4 && g.wire == 0) m.remove_extra_whitespaces = g.varint != 0;
        if (g.number == 5 && g.wire == 0) m.escape_whitespaces = g.varint != 0;
      });
    }
  });
  return m;
}

size_t code_points(std::string_view s) {
  return static_cast<size_t>(std::count_if(s.begin(), s.end(), [](char c) { return (c & 0xC0) != 0x80; }));
}

}  // namespace

std::string Tokenizer::hf_tokenizer_json(std::string* why_not) const {
  const SpmModel m = read_spm_model(path_);
  auto refuse = [&](const std::string& why) {
    if (why_not) *why_not = why;
    return std::string();
  };
  if (m.model_type != 2) {
    static const char* kinds[] = {"?", "unigram", "BPE", "word", "char"};
    return refuse(std::string("it is a ") + kinds[m.model_type >= 1 && m.model_type <= 4 ? m.model_type : 0] +
                  " model (tokenizer.json is written for BPE models)");
  }
  if (m.charsmap) return refuse("it normalizes text (rule '" + m.normalizer + "'), which tokenizer.json would not");
  if (m.remove_extra_whitespaces) return refuse("it removes extra whitespace (remove_extra_whitespaces)");
  if (!m.escape_whitespaces) return refuse("it keeps spaces as they are (escape_whitespaces: false)");
  if (m.whitespace_suffix) return refuse("it ends words with its whitespace piece (treat_whitespace_as_suffix)");
  if (static_cast<int64_t>(m.pieces.size()) != vocab_size_)
    return refuse("its file holds " + std::to_string(m.pieces.size()) + " pieces, sentencepiece reports " +
                  std::to_string(vocab_size_));
  std::unordered_map<std::string_view, int64_t> normal;  // the pieces BPE merges build
  std::unordered_set<size_t> lengths;                    // their lengths in bytes
  for (size_t i = 0; i < m.pieces.size(); ++i) {
    const SpmModel::Piece& p = m.pieces[i];
    if (p.type == SpmModel::kUserDefined)
      return refuse("it has user-defined pieces ('" + p.text +
                    "'), which transformers' legacy Llama layout tokenizes differently after them");
    // Control pieces beyond unk/BOS/EOS (Mistral's [INST]): transformers' own conversion reads
    // them from text as special tokens, sentencepiece (and libllm's training) never does; which
    // one a server should follow is the model's business: no tokenizer.json, transformers converts.
    if (p.type == SpmModel::kControl && static_cast<int64_t>(i) != bos_id_ && static_cast<int64_t>(i) != eos_id_)
      return refuse("it has control pieces ('" + p.text +
                    "') that transformers' conversion reads from text and sentencepiece does not");
    if (p.type == SpmModel::kNormal) {
      if (p.text.find(' ') != std::string::npos) return refuse("piece " + std::to_string(i) + " holds a space");
      normal.emplace(p.text, static_cast<int64_t>(i));
      lengths.insert(p.text.size());
    }
  }

  // Merges as transformers' generate_merges derives them: every split of a piece into two pieces,
  // by the merged piece's score (high first), then the longer left part, the longer right part,
  // then piece id order; sentencepiece's BPE merges by that score. Only normal pieces: BPE never
  // builds a control, byte or unused piece.
  struct Merge {
    int64_t left, right;
    float score;
    size_t left_len, right_len;
  };
  std::vector<Merge> merges;
  for (const SpmModel::Piece& p : m.pieces) {
    if (p.type != SpmModel::kNormal) continue;
    const size_t begin = merges.size();
    for (size_t k = 1; k < p.text.size(); ++k) {
      if ((p.text[k] & 0xC0) == 0x80) continue;  // (inside a UTF-8 character)
      // (no piece of either length: skipped without hashing, so one very long piece costs its
      // length, not its length squared)
      if (!lengths.count(k) || !lengths.count(p.text.size() - k)) continue;
      const std::string_view whole(p.text), l = whole.substr(0, k), r = whole.substr(k);
      const auto li = normal.find(l), ri = normal.find(r);
      if (li != normal.end() && ri != normal.end())
        merges.push_back({li->second, ri->second, p.score, code_points(l), code_points(r)});
    }
    std::sort(merges.begin() + static_cast<std::ptrdiff_t>(begin), merges.end(),
              [](const Merge& a, const Merge& b) { return a.left != b.left ? a.left < b.left : a.right < b.right; });
  }
  std::stable_sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.left_len != b.left_len) return a.left_len > b.left_len;
    return a.right_len > b.right_len;
  });

  using ojson = nlohmann::ordered_json;
  auto quote = [](const std::string& s) {
    return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  };
  const std::string space = "\u2581";  // sentencepiece's ▁
  ojson added = ojson::array();
  std::vector<int64_t> specials{unk_id_, bos_id_, eos_id_};
  std::sort(specials.begin(), specials.end());
  specials.erase(std::unique(specials.begin(), specials.end()), specials.end());
  for (int64_t id : specials)
    if (id >= 0 && id < vocab_size_)
      added.push_back({{"id", id},
                       {"content", m.pieces[id].text},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", true}});
  ojson normalizers = ojson::array();
  if (m.add_dummy_prefix) normalizers.push_back({{"type", "Prepend"}, {"prepend", space}});
  normalizers.push_back({{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", space}});
  ojson post = nullptr;
  if (bos_id_ >= 0) {
    const std::string bos = m.pieces[bos_id_].text;
    auto special = [&](int type_id) { return ojson{{"SpecialToken", {{"id", bos}, {"type_id", type_id}}}}; };
    auto sequence = [&](const char* id, int type_id) {
      return ojson{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
    };
    post = {{"type", "TemplateProcessing"},
            {"single", {special(0), sequence("A", 0)}},
            {"pair", {special(0), sequence("A", 0), special(1), sequence("B", 1)}},
            {"special_tokens", {{bos, {{"id", bos}, {"ids", {bos_id_}}, {"tokens", {bos}}}}}}};
  }
  ojson decoders = {{{"type", "Replace"}, {"pattern", {{"String", space}}}, {"content", " "}}};
  if (m.byte_fallback) decoders.push_back({{"type", "ByteFallback"}});
  decoders.push_back({{"type", "Fuse"}});
  if (m.add_dummy_prefix) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  const ojson unk = unk_id_ >= 0 ? ojson(m.pieces[unk_id_].text) : ojson(nullptr);
  ojson doc = {{"version", "1.0"},
               {"truncation", nullptr},
               {"padding", nullptr},
               {"added_tokens", added},
               {"normalizer", {{"type", "Sequence"}, {"normalizers", normalizers}}},
               {"pre_tokenizer", nullptr},
               {"post_processor", post},
               {"decoder", {{"type", "Sequence"}, {"decoders", decoders}}},
               {"model",
                {{"type", "BPE"},
                 {"dropout", nullptr},
                 {"unk_token", unk},
                 {"continuing_subword_prefix", nullptr},
                 {"end_of_word_suffix", nullptr},
                 {"fuse_unk", true},
                 {"byte_fallback", m.byte_fallback},
                 {"vocab", "@vocab@"},
                 {"merges", "@merges@"}}}};
  // The vocabulary (by id) and the merges written out directly: one entry a line, as transformers
  // saves them (an ordered_json object of 32000 keys would be built in quadratic time).
  std::string vocab = "{", merge_list = "[";
  for (size_t i = 0; i < m.pieces.size(); ++i)
    vocab += (i ? ",\n      " : "\n      ") + quote(m.pieces[i].text) + ": " + std::to_string(i);
  vocab += "\n    }";
  for (size_t i = 0; i < merges.size(); ++i)
    merge_list +=
        (i ? ",\n      " : "\n      ") + quote(m.pieces[merges[i].left].text + " " + m.pieces[merges[i].right].text);
  merge_list += merges.empty() ? "]" : "\n    ]";
  std::string out = doc.dump(2, ' ', false, nlohmann::json::error_handler_t::replace);
  auto splice = [&](const std::string& mark, const std::string& text) {
    const size_t at = out.find("\"" + mark + "\"");
    out.replace(at, mark.size() + 2, text);
  };
  splice("@vocab@", vocab);
  splice("@merges@", merge_list);
  return out + "\n";
}

void Tokenizer::check_fits(const ModelConfig& model, const std::string& model_where) const {
  if (vocab_size() > model.vocab_size)
    throw Error(path_, "tokenizer has " + std::to_string(vocab_size()) + " tokens but the model (" +
                           model_where + ") has vocab_size " + std::to_string(model.vocab_size),
                "this tokenizer does not match the model; use the model's own tokenizer.model");
}

}  // namespace libllm
