#include "libllm/data.h"

#include <fcntl.h>
#include <fmt/core.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <regex>
#include <sstream>
#include <thread>
#include <tuple>

#include "atomic_file.h"
#include "heartbeat.h"
#include "jsonl.h"
#include "libllm/config.h"
#include "libllm/error.h"
#include "libllm/tokenizer.h"
#include "mapped_file.h"
#include "xxh64.h"

namespace libllm {
namespace fs = std::filesystem;
using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

namespace {

constexpr const char* kFormat = "libllm-tokens-v1";
constexpr const char* kCursorFormat = "libllm-data-cursor-v2";
constexpr const char* kRerun = "re-run data preparation (llm-data / write_shards) into this folder";
// The folder inside a shard-set folder where data preparation writes the new set.
constexpr const char* kStaging = ".llm-data-staging";
// A shard file whose size or bytes changed after llm-data wrote it.
constexpr const char* kDamaged =
    "the file changed after llm-data wrote it (a disk, copy or transfer error): restore the shard set from a copy, "
    "or re-run data preparation (llm-data) into this folder";

// ---- SHA-256 (FIPS 180-4) ---------------------------------------------------------------------

class Sha256 {
 public:
  void update(const unsigned char* p, size_t n) {
    total_ += n;
    while (n > 0) {
      const size_t take = std::min(n, sizeof(buf_) - len_);
      std::memcpy(buf_ + len_, p, take);
      len_ += take, p += take, n -= take;
      if (len_ == sizeof(buf_)) block(buf_), len_ = 0;
    }
  }
  std::string hex() {
    const uint64_t bits = total_ * 8;
    const unsigned char pad = 0x80, zero = 0;
    update(&pad, 1);
    while (len_ != 56) update(&zero, 1);
    unsigned char be[8];
    for (int i = 0; i < 8; ++i) be[i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    update(be, 8);
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (uint32_t v : h_)
      for (int s = 28; s >= 0; s -= 4) out += digits[(v >> s) & 0xf];
    return out;
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void block(const unsigned char* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h_[0] += a, h_[1] += b, h_[2] += c, h_[3] += d, h_[4] += e, h_[5] += f, h_[6] += g, h_[7] += h;
  }

  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char buf_[64];
  size_t len_ = 0;
  uint64_t total_ = 0;
};

// ---- small helpers ----------------------------------------------------------------------------

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

std::string errno_text() { return std::strerror(errno); }

std::string tmp_name(const std::string& path) { return path + ".tmp-" + std::to_string(::getpid()); }

// Writes all of `n` bytes to fd; an Error naming `path` on failure.
void write_all(int fd, const unsigned char* p, size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw Error(path, "cannot write: " + errno_text(), "check free disk space and permissions");
    p += w, n -= static_cast<size_t>(w);
  }
}

// Makes a finished `<path>.tmp-<pid>` durable and gives it its final name.
void sync_close_rename(int fd, const std::string& tmp, const std::string& path) {
  int err = ::fsync(fd) != 0 ? errno : 0;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err == 0 && ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_text();
    ::unlink(tmp.c_str());
    throw Error(path, "cannot rename from " + tmp + ": " + why);
  }
  if (err != 0) {
    ::unlink(tmp.c_str());
    throw Error(tmp, std::string("cannot flush: ") + std::strerror(err), "check free disk space");
  }
  detail::fsync_parent_dir(path);
}

int open_tmp(const std::string& tmp) {
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(tmp, "cannot create: " + errno_text(), "check that its folder is writable");
  return fd;
}

}  // namespace

void detail::copy_file_atomic(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (!in || in.bad()) throw Error(from, "cannot be read: " + errno_text(), "check that the file is still there");
  write_file_atomic(to, bytes.str());
}

void detail::write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = tmp_name(path);
  const int fd = open_tmp(tmp);
  try {
    write_all(fd, reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), tmp);
  } catch (...) {  // (a full disk: no half-written temporary is left behind)
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  sync_close_rename(fd, tmp, path);
}

void detail::fsync_parent_dir(const std::string& path) {
  const fs::path parent = fs::path(path).parent_path();
  const std::string dir = parent.empty() ? "." : parent.string();
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

namespace {

void put_le(std::vector<unsigned char>& buf, uint64_t v, int width) {
  for (int i = 0; i < width; ++i) buf.push_back(static_cast<unsigned char>(v >> (8 * i)));
}

uint64_t get_le(const unsigned char* p, int width) {
  uint64_t v = 0;
  for (int i = width - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string shard_name(int64_t i, const char* ext) {
  char name[32];
  std::snprintf(name, sizeof(name), "shard-%05lld.%s", static_cast<long long>(i), ext);
  return name;
}

// ---- input documents --------------------------------------------------------------------------

std::string lower_ext(const fs::path& p) {
  std::string e = p.extension().string();
  std::transform(e.begin(), e.end(), e.begin(), [](unsigned char c) { return std::tolower(c); });
  return e;
}

// fortune mode also takes files without an extension (fortune(6) databases; their .dat/.u8
// companions are skipped by extension).
bool supported(const fs::path& p, bool fortune) {
  const std::string e = lower_ext(p);
  return e == ".txt" || e == ".md" || e == ".jsonl" || (fortune && e.empty());
}

// The input files in order: listed order, folder contents recursively in byte order of their
// paths, hidden entries (names starting with '.') skipped. `skipped` (optional) gets the files in
// those folders of a type llm-data does not read (a .pdf, a .docx), in the same order.
std::vector<std::string> list_input_files(const std::vector<std::string>& inputs, bool fortune,
                                          std::vector<std::string>* skipped = nullptr) {
  const std::string hint = "data_prep.inputs lists .txt, .md or .jsonl files, or folders holding them";
  std::vector<std::string> files;
  for (const auto& in : inputs) {
    std::error_code ec;
    if (fs::is_regular_file(in, ec)) {
      if (!supported(in, fortune)) throw Error(in, "unsupported input file type '" + lower_ext(in) + "'", hint);
      files.push_back(in);
      continue;
    }
    if (!fs::is_directory(in, ec)) throw Error(in, "input not found", hint);
    std::vector<std::string> found, others;
    for (auto it = fs::recursive_directory_iterator(in, ec); !ec && it != fs::recursive_directory_iterator();
         it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (!name.empty() && name[0] == '.') {
        if (it->is_directory()) it.disable_recursion_pending();
        continue;
      }
      if (!it->is_regular_file()) continue;
      const std::string e = lower_ext(it->path());
      if (supported(it->path(), fortune))
        found.push_back(it->path().generic_string());
      else if (!fortune || (e != ".dat" && e != ".u8"))
        others.push_back(it->path().generic_string());  // (strfile's)
    }
    if (ec) throw Error(in, "cannot list folder: " + ec.message());
    const bool bare =
        std::any_of(others.begin(), others.end(), [](const std::string& f) { return lower_ext(f).empty(); });
    if (found.empty())
      throw Error(in, "folder has no .txt, .md or .jsonl files",
                  bare && !fortune ? "its files without an extension are read with data_prep.txt_documents: fortune "
                                     "(fortune(6) files); else " +
                                         hint
                                   : hint);
    std::sort(found.begin(), found.end());
    std::sort(others.begin(), others.end());
    if (skipped) skipped->insert(skipped->end(), others.begin(), others.end());
    others.clear();
    files.insert(files.end(), found.begin(), found.end());
  }
  return files;
}

// Bytes of `s` that are not part of a well-formed UTF-8 sequence (each maximal ill-formed part
// counted once per byte; sentencepiece reads each as U+FFFD).
int64_t invalid_utf8(std::string_view s) {
  int64_t bad = 0;
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range (RFC 3629's table)
    if (c >= 0xC2 && c <= 0xDF)
      len = 2;
    else if (c >= 0xE0 && c <= 0xEF)
      len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4)
      len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    bool ok = len > 0 && i + len <= n && p[i + 1] >= lo && p[i + 1] <= hi;
    for (size_t k = 2; ok && k < len; ++k) ok = p[i + k] >= 0x80 && p[i + k] <= 0xBF;
    if (ok) {
      i += len;
    } else {
      ++bad;
      ++i;
    }
  }
  return bad;
}

// Streams the documents of one input file (rules in DataPrepConfig's comments).
class DocReader {
 public:
  // mode: "line", "paragraph" (blank-line separated) or "fortune" ("%"-line separated).
  // `hint` ends the errors that name the file.
  DocReader(const std::string& path, const std::string& mode, const std::string& hint = "check data_prep.inputs")
      : in_(path, std::ios::binary),
        path_(path),
        hint_(hint),
        jsonl_(lower_ext(path) == ".jsonl"),
        paragraph_(mode != "line"),
        fortune_(mode == "fortune") {
    if (!in_) throw Error(path, "cannot open input file", hint_);
  }

  // The next document; false at the end of the file.
  bool next(std::string& doc) {
    if (jsonl_) return next_jsonl(doc);
    if (!paragraph_) {
      while (getline()) {
        doc = trim(line_);
        if (!doc.empty()) return true;
      }
      return false;
    }
    for (;;) {  // (a fortune record of blank lines only is no document: the next one is read)
      std::string block;
      bool more = false;  // a separator ended the block: the file goes on
      while (getline()) {
        if (!line_.empty() && line_.back() == '\r') line_.pop_back();
        const bool separator = fortune_ ? trim(line_) == "%" : trim(line_).empty();
        if (separator) {
          if (!block.empty()) {
            more = true;
            break;
          }
          continue;
        }
        if (!block.empty()) block += '\n';
        block += line_;
      }
      doc = trim(block);
      if (!doc.empty()) return true;
      if (!more) return false;
    }
  }

  int64_t bytes() const { return bytes_; }  // bytes read so far (may pass the size by one at the end)
  // "FILE: 12 bytes are not UTF-8 (...)" when the text read so far held any; else "".
  std::string encoding_note() const {
    if (bad_bytes_ == 0) return "";
    return fmt::format(
        "{}: {} byte{} not UTF-8 (the first on line {}); the tokenizer reads each as U+FFFD (convert the file, "
        "e.g. iconv -f latin1 -t utf-8, to keep those characters)",
        path_, bad_bytes_, bad_bytes_ == 1 ? " is" : "s are", first_bad_line_);
  }

 private:
  bool getline() {
    if (!std::getline(in_, line_)) {
      if (in_.bad()) throw Error(path_, "read error", "check the file");
      return false;
    }
    if (++lineno_ == 1 && line_.compare(0, 3, "\xEF\xBB\xBF") == 0) {  // a UTF-8 byte-order mark: no text
      line_.erase(0, 3);
      bytes_ += 3;
    }
    if (lineno_ == 1 && (line_.compare(0, 2, "\xFF\xFE") == 0 || line_.compare(0, 2, "\xFE\xFF") == 0))
      throw Error(path_, "is UTF-16 text (it starts with UTF-16's byte-order mark), not UTF-8",
                  "convert it: iconv -f UTF-16 -t UTF-8 " + path_ + " > converted.txt");
    if (line_.find('\0') != std::string::npos)  // (text never holds one; gzip, .bin and the like do)
      throw Error(path_ + ":" + std::to_string(lineno_), "holds a NUL byte: binary (or compressed) data, not text",
                  hint_);
    bytes_ += static_cast<int64_t>(line_.size()) + 1;
    if (!jsonl_)  // (JSON's parser refuses ill-formed UTF-8 itself)
      if (const int64_t bad = invalid_utf8(line_); bad > 0) {
        if (bad_bytes_ == 0) first_bad_line_ = lineno_;
        bad_bytes_ += bad;
      }
    return true;
  }

  bool next_jsonl(std::string& doc) {
    while (getline()) {
      if (trim(line_).empty()) continue;
      const std::string where = path_ + ":" + std::to_string(lineno_);
      json j;
      try {
        j = json::parse(line_);
      } catch (const json::exception& e) {
        throw Error(where, std::string("invalid JSON: ") + e.what(), "each line must be one JSON object");
      }
      if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
        throw Error(where, "expected an object with a string field \"text\"");
      doc = trim(j["text"].get<std::string>());
      if (!doc.empty()) return true;
    }
    return false;
  }

  std::ifstream in_;
  std::string path_, hint_, line_;
  bool jsonl_, paragraph_, fortune_;
  int64_t lineno_ = 0, bytes_ = 0, bad_bytes_ = 0, first_bad_line_ = 0;
};

// Token ids of every document, in document order, whatever the thread count.
std::vector<std::vector<int64_t>> tokenize_all(const Tokenizer& tok, const std::vector<std::string>& docs,
                                               int64_t threads) {
  std::vector<std::vector<int64_t>> out(docs.size());
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex mu;
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < docs.size();) {
      try {
        out[i] = tok.encode(docs[i]);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        next = docs.size();
      }
    }
  };
  const int64_t n = std::min<int64_t>(threads, static_cast<int64_t>(docs.size()));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
  return out;
}

// ---- shard writing ----------------------------------------------------------------------------

struct ShardRecord {
  std::string file, idx;
  int64_t tokens = 0, documents = 0;
  std::string xxh64, idx_xxh64;  // checksums of the two files' bytes (16 hex digits)
};

// Appends documents to shard files, starting a new shard before a document that would overflow.
class ShardWriter {
 public:
  // bos < 0: documents start with their own tokens.
  ShardWriter(std::string dir, int width, int64_t shard_tokens, int64_t vocab, int64_t bos, int64_t eos,
              std::string tok_path)
      : dir_(std::move(dir)),
        width_(width),
        limit_(shard_tokens),
        vocab_(vocab),
        bos_(bos),
        eos_(eos),
        tok_path_(std::move(tok_path)) {}
  ~ShardWriter() {  // an unfinished shard (an error part-way) leaves no file behind
    if (fd_ >= 0) ::close(fd_), ::unlink(tmp_.c_str());
  }

  void add(const std::vector<int64_t>& ids) {
    const int64_t len = static_cast<int64_t>(ids.size()) + 1 + (bos_ >= 0);  // [BOS] ids EOS
    if (fd_ >= 0 && tokens_ > 0 && tokens_ + len > limit_) close_shard();
    if (fd_ < 0) open_shard();
    offsets_.push_back(static_cast<uint64_t>(tokens_));
    if (bos_ >= 0) put_le(buf_, static_cast<uint64_t>(bos_), width_);
    for (int64_t id : ids) {
      if (id < 0 || id >= vocab_)
        throw Error(tok_path_, "token id " + std::to_string(id) + " outside the vocabulary of " +
                                   std::to_string(vocab_));
      put_le(buf_, static_cast<uint64_t>(id), width_);
    }
    put_le(buf_, static_cast<uint64_t>(eos_), width_);
    tokens_ += len;
    if (buf_.size() >= (4u << 20)) flush();
  }

  std::vector<ShardRecord> finish() {
    if (fd_ >= 0) close_shard();
    return std::move(done_);
  }

 private:
  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  void open_shard() {
    const int64_t i = static_cast<int64_t>(done_.size());
    record_ = {shard_name(i, "bin"), shard_name(i, "idx"), 0, 0};
    tmp_ = tmp_name(path(record_.file));
    fd_ = open_tmp(tmp_);
    hash_ = detail::Xxh64();
    tokens_ = 0;
    offsets_.clear();
  }

  void flush() {
    hash_.update(buf_.data(), buf_.size());
    write_all(fd_, buf_.data(), buf_.size(), tmp_);
    buf_.clear();
  }

  void close_shard() {
    flush();
    const int fd = fd_;
    fd_ = -1;
    std::vector<unsigned char> idx;
    idx.reserve(offsets_.size() * 8);
    for (uint64_t o : offsets_) put_le(idx, o, 8);
    record_.idx_xxh64 = detail::hex16(detail::Xxh64().update(idx.data(), idx.size()).digest());
    record_.xxh64 = detail::hex16(hash_.digest());
    detail::write_file_atomic(path(record_.idx), std::string(idx.begin(), idx.end()));
    sync_close_rename(fd, tmp_, path(record_.file));
    record_.tokens = tokens_;
    record_.documents = static_cast<int64_t>(offsets_.size());
    done_.push_back(record_);
  }

  std::string dir_;
  int width_;
  int64_t limit_, vocab_, bos_, eos_;
  std::string tok_path_, tmp_;
  int fd_ = -1;
  int64_t tokens_ = 0;
  detail::Xxh64 hash_;  // of the open shard's bytes so far
  ShardRecord record_;
  std::vector<uint64_t> offsets_;
  std::vector<unsigned char> buf_;
  std::vector<ShardRecord> done_;
};

// Removes a previous shard set's files (meta.json first, so a half-replaced set is never complete).
void remove_old_shards(const std::string& dir) {
  static const std::regex ours(R"((shard-\d+\.(bin|idx)|meta\.json)(\.tmp-\d+)?)");
  std::error_code ec;
  fs::remove(fs::path(dir) / "meta.json", ec);
  if (ec) throw Error(dir + "/meta.json", "cannot remove the old meta.json: " + ec.message());
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!std::regex_match(e.path().filename().string(), ours)) continue;
    fs::remove(e.path(), ec);
    if (ec) throw Error(e.path().string(), "cannot remove an old shard file: " + ec.message());
  }
}

// An output folder as written to: as given, or resolved where it has a '..' (which the kernel takes
// after the symbolic links before it: "docs/new/.." is docs, whose files must be seen).
std::string output_path(const std::string& dir) {
  for (const auto& part : fs::path(dir))
    if (part == "..") return fs::weakly_canonical(fs::absolute(dir)).string();
  return dir;
}

void check_prep_config(const DataPrepConfig& cfg) {
  if (cfg.inputs.empty())
    throw Error("data_prep.inputs", "no inputs", "list .txt, .md or .jsonl files or folders to tokenize");
  if (cfg.output.empty()) throw Error("data_prep.output", "no output folder", "set the shard-set folder to write");
  if (cfg.txt_documents != "line" && cfg.txt_documents != "paragraph" && cfg.txt_documents != "fortune")
    throw Error("data_prep.txt_documents",
                "expected one of: line, paragraph, fortune, got '" + cfg.txt_documents + "'");
  if (cfg.valid_every == 1)
    throw Error("data_prep.valid_every", "is 1: every document would be held out, none left for training",
                "set 0 for no held-out set, or n >= 2 to hold out every n-th document");
  if (cfg.valid_every > 0 && cfg.valid_output.empty())
    throw Error("data_prep.valid_output", "valid_every is set but valid_output is empty", "name the held-out folder");
  for (const auto& [key, dir] :
       {std::pair{"data_prep.output", &cfg.output}, {"data_prep.valid_output", &cfg.valid_output}})
    for (const auto& part : fs::path(output_path(*dir))) {  // (the staging folder is another run's)
      if (part == kStaging)
        throw Error(key, "'" + *dir + "' is inside llm-data's staging folder " + kStaging,
                    "give the shard set a folder of its own");
    }
  auto folder = [](const std::string& p) {  // (weakly_canonical keeps the "/" of "out/" when out does not exist)
    fs::path c = fs::weakly_canonical(fs::absolute(p));
    return c.has_filename() ? c : c.parent_path();
  };
  if (cfg.valid_every > 0 && folder(cfg.valid_output) == folder(cfg.output))
    throw Error("data_prep.valid_output", "is data_prep.output's folder " + cfg.output + " (the held-out set would replace the training set)",
                "give the held-out set a folder of its own");
  if (cfg.shard_tokens < 1) throw Error("data_prep.shard_tokens", "must be >= 1");
  if (cfg.threads < 0) throw Error("data_prep.threads", "must be >= 0 (0 = all cores)");
}

// ---- reading ----------------------------------------------------------------------------------

// A read-only memory mapping of a whole file.
struct Mapping {
  const unsigned char* data = nullptr;
  size_t size = 0;
  Mapping(const std::string& path, size_t expected) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error(path, "cannot open shard: " + errno_text(), kRerun);
    size = expected;
    if (size > 0) {
      void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      ::close(fd);
      if (p == MAP_FAILED) throw Error(path, "cannot map shard: " + errno_text());
      data = static_cast<const unsigned char*>(p);
      detail::note_mapping(data, size, path);  // (a shard truncated while mapped: an error naming it)
    } else {
      ::close(fd);
    }
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (data) detail::forget_mapping(data), ::munmap(const_cast<unsigned char*>(data), size);
  }
};

template <class T>
T meta_get(const json& j, const std::string& key, const std::string& where) {
  if (!j.is_object() || !j.contains(key)) throw Error(where, "missing key \"" + key + "\"", kRerun);
  try {
    return j.at(key).get<T>();
  } catch (const json::exception&) {
    throw Error(where, "key \"" + key + "\" has the wrong type", kRerun);
  }
}

// ---- ordering ---------------------------------------------------------------------------------

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
uint64_t mix(uint64_t a, uint64_t b) { return splitmix64(splitmix64(a) ^ b); }

constexpr uint64_t kMixtureStream = 0x6d69787475726531ull;  // "mixture1"
constexpr uint64_t kShuffleStream = 0x73687566666c6531ull;  // "shuffle1"

// Uniform integer in [0, n) from a 64-bit engine by rejection (same on every standard library).
uint64_t bounded(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n: values below it would bias the modulo
  for (;;) {
    const uint64_t x = rng();
    if (x >= threshold) return x % n;
  }
}

std::vector<double> parse_weights(const DataConfig& cfg, const std::string& where) {
  std::vector<double> w;
  if (cfg.weights.empty()) return w;
  if (cfg.weights.size() != cfg.train.size())
    throw Error(where + ".weights", std::to_string(cfg.weights.size()) + " weights for " +
                                        std::to_string(cfg.train.size()) + " train folders",
                "give one weight per data.train folder, or none for weights proportional to size");
  double sum = 0;
  for (const auto& s : cfg.weights) {
    const double v = parse_number(trim(s)).value_or(-1);
    if (v < 0)
      throw Error(where + ".weights", "expected a number >= 0, got '" + s + "'", "e.g. weights: [\"3\", \"1\"]");
    w.push_back(v);
    sum += v;
  }
  if (!(sum > 0)) throw Error(where + ".weights", "all weights are 0", "give at least one set a weight > 0");
  return w;
}

}  // namespace

// ---- public: hashing, config ------------------------------------------------------------------

std::string sha256_hex(const std::string& bytes) {
  Sha256 h;
  h.update(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  return h.hex();
}

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path, "cannot open file to hash", "check the path");
  Sha256 h;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h.update(reinterpret_cast<const unsigned char*>(buf.data()), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) throw Error(path, "read error while hashing");
  return h.hex();
}

void DataPrepConfig::fields(Fields& f) {
  f.add("inputs", inputs);
  f.add("output", output);
  f.add("txt_documents", txt_documents).one_of({"line", "paragraph", "fortune"});
  f.add("shard_tokens", shard_tokens).min(1);
  f.add("threads", threads).min(0);
  f.add("valid_output", valid_output);
  f.add("valid_every", valid_every).min(0);
  f.add("bos", bos);
}

void DataConfig::fields(Fields& f) {
  f.add("train", train);
  f.add("weights", weights);
  f.add("valid", valid);
  f.add("seed", seed);
  f.add("verify", verify).one_of({"node", "shared", "none"});
  f.validate_with([this](const std::string& where) { parse_weights(*this, where); });
}

// ---- public: writing --------------------------------------------------------------------------

std::vector<std::string> read_documents(const std::string& path) {
  const std::string hint = "give a .txt or .md file (one document per line) or a .jsonl file (field \"text\")";
  std::error_code ec;
  if (fs::is_directory(path, ec)) throw Error(path, "is a folder, not a data file", hint);
  if (!fs::exists(path, ec)) throw Error(path, "cannot open data file", hint);
  if (!supported(path, /*fortune=*/false))
    throw Error(path, "unsupported data file type '" + lower_ext(path) + "'", hint);
  DocReader reader(path, "line", hint);
  std::vector<std::string> docs;
  for (std::string doc; reader.next(doc);) docs.push_back(std::move(doc));
  if (const std::string note = reader.encoding_note(); !note.empty()) fmt::print(stderr, "note: {}\n", note);
  return docs;
}

void for_each_document(const DataPrepConfig& cfg, const std::function<bool(const std::string&)>& fn) {
  for (const auto& file : list_input_files(cfg.inputs, cfg.txt_documents == "fortune")) {
    DocReader reader(file, cfg.txt_documents);
    std::string doc;
    while (reader.next(doc))
      if (!fn(doc)) return;
  }
}

std::vector<std::string> sample_lines(const DataPrepConfig& cfg, int64_t limit, int64_t max_bytes, int64_t* seen) {
  if (limit < 0) throw Error("data", "sample size must be >= 0");
  const auto k = static_cast<size_t>(limit);
  std::vector<std::pair<int64_t, std::string>> kept;  // (corpus index, line)
  std::mt19937_64 rng(0x6c69626c6c6dULL);             // (mt19937_64's output is the same everywhere)
  int64_t n = 0;
  for_each_document(cfg, [&](const std::string& d) {
    for (size_t at = 0; at <= d.size();) {
      size_t end = d.find('\n', at);
      if (end == std::string::npos) end = d.size();
      const size_t len = end - at;
      // (sentencepiece leaves blank and over-long lines out)
      if (static_cast<int64_t>(len) <= max_bytes && d.find_first_not_of(" \t\r", at) < end) {
        if (kept.size() < k) {
          kept.emplace_back(n, d.substr(at, len));
        } else if (k > 0) {
          const uint64_t j = rng() % static_cast<uint64_t>(n + 1);  // algorithm R: line n stays with chance k/(n+1)
          if (j < k) kept[j] = {n, d.substr(at, len)};
        }
        ++n;
      }
      at = end + 1;
    }
    return true;
  });
  if (seen) *seen = n;
  std::sort(kept.begin(), kept.end());
  std::vector<std::string> out;
  out.reserve(kept.size());
  for (auto& [index, d] : kept) out.push_back(std::move(d));
  return out;
}

namespace {

// One shard set being written: the documents whose index (0-based, corpus order) `keep` accepts.
struct SetOutput {
  std::string dir;
  std::string stage;  // the staging folder inside `dir` the set is written to until it is whole
  std::shared_ptr<void> lock;  // the flock on dir/.llm-data.lock for the run's life (one writer a set)
  bool locked = false;         // this run holds the lock
  bool made_lock = false;      // and made its file
  fs::path created;            // the outermost folder of `dir`'s path this run created ("" = none)
  std::function<bool(int64_t)> keep;
  ShardSetInfo info;
  std::unique_ptr<ShardWriter> writer;
  std::vector<std::string> pending;  // documents to tokenize
};

// Removes the staging folders of `outs` unless released (a failed run leaves the old sets alone).
// A folder's absolute path without a trailing separator ("out/" -> /cwd/out).
fs::path folder_path(const std::string& dir) {
  std::error_code ec;
  fs::path p = fs::absolute(dir, ec).lexically_normal();
  if (p.filename().empty() && p.has_parent_path()) p = p.parent_path();
  return p;
}

// On a failure before the new sets are whole: removes their staging folders, the lock files this
// run made (and held), and the folders it created (a run refused by another's lock, say) as far as
// they are empty, deepest first (one set's new folder may hold the other's).
struct StagingGuard {
  std::vector<SetOutput>& outs;
  bool released = false;
  ~StagingGuard() {
    if (released) return;
    std::error_code ec;
    std::vector<fs::path> made;
    for (const SetOutput& o : outs) {
      if (!o.stage.empty()) fs::remove_all(o.stage, ec);
      if (o.locked && o.made_lock) fs::remove(fs::path(o.dir) / ".llm-data.lock", ec);
      if (o.created.empty()) continue;
      for (fs::path p = folder_path(o.dir); !p.empty(); p = p.parent_path()) {
        made.push_back(p);
        if (p == o.created || p == p.parent_path()) break;
      }
    }
    std::sort(made.begin(), made.end(), [](const fs::path& a, const fs::path& b) {
      return std::distance(a.begin(), a.end()) > std::distance(b.begin(), b.end());
    });
    for (const fs::path& p : made)  // (only an empty folder goes; never a symbolic link)
      if (!fs::is_symlink(fs::symlink_status(p, ec))) fs::remove(p, ec);
  }
};

// Replaces the shard set in o.dir by the whole one in o.stage: the old set's files go (meta.json
// first, so it is never taken for complete), the new ones are renamed in (meta.json last).
void move_staged_set(const SetOutput& o) {
  remove_old_shards(o.dir);
  std::vector<fs::path> staged;
  for (const auto& e : fs::directory_iterator(o.stage)) staged.push_back(e.path());
  std::sort(staged.begin(), staged.end(), [](const fs::path& a, const fs::path& b) {
    return (a.filename() == "meta.json") < (b.filename() == "meta.json") ||
           ((a.filename() == "meta.json") == (b.filename() == "meta.json") && a < b);
  });
  for (const fs::path& from : staged) {
    const fs::path to = fs::path(o.dir) / from.filename();
    std::error_code ec;
    fs::rename(from, to, ec);
    if (ec) throw Error(to.string(), "cannot move the new shard file in from " + from.string() + ": " + ec.message());
  }
  detail::fsync_parent_dir((fs::path(o.dir) / "meta.json").string());
  std::error_code ec;
  fs::remove(o.stage, ec);
}

// Writes every set in one pass over the inputs (each document to the first set that keeps it).
// Each set is written to a staging folder inside its own and moved in only once every set is
// whole: a run that fails (bad input, full disk, Ctrl-C) leaves the previous sets as they were.
std::vector<ShardSetInfo> write_shard_sets(const DataPrepConfig& cfg, std::vector<SetOutput>& outs,
                                           const Tokenizer& tok,
                                           const std::function<void(int64_t, int64_t)>& progress) {
  std::vector<std::string> skipped;
  const std::vector<std::string> files = list_input_files(cfg.inputs, cfg.txt_documents == "fortune", &skipped);
  if (!skipped.empty()) {
    std::string names;
    for (size_t i = 0; i < std::min<size_t>(skipped.size(), 5); ++i) names += (i ? ", " : "") + skipped[i];
    fmt::print(
        "note: skipped {} file(s) of other types in data_prep.inputs' folders (llm-data reads .txt, .md and "
        ".jsonl{}): {}{}\n",
        skipped.size(), cfg.txt_documents == "fortune" ? ", and files without an extension" : "", names,
        skipped.size() > 5 ? ", ..." : "");
  }
  int64_t total_bytes = 0;
  for (const auto& f : files) total_bytes += static_cast<int64_t>(fs::file_size(f));
  const int width = tok.vocab_size() <= 65536 ? 2 : 4;
  const int64_t threads =
      cfg.threads > 0 ? cfg.threads : std::max<int64_t>(1, std::thread::hardware_concurrency());
  const std::string sha = sha256_file(tok.path());
  // A set's folder holds a shard set or nothing else (its old set is replaced): never the files
  // of a run folder or a user's documents. Allowed beside it: another shard set's folder (this
  // run's output/valid, or an earlier one's), the tokenizer this run uses, hidden entries (.gitkeep,
  // .nfs files of replaced shards still open) and a volume's lost+found.
  std::vector<fs::path> ours_too = {fs::weakly_canonical(tok.path())};
  for (const SetOutput& o : outs) ours_too.push_back(fs::weakly_canonical(o.dir));
  static const std::regex shard_file(R"((shard-\d+\.(bin|idx)|meta\.json)(\.tmp-\d+)?)");
  for (size_t i = 0; i < outs.size(); ++i) {
    std::error_code ec;
    std::vector<std::string> foreign;
    for (fs::directory_iterator it(outs[i].dir, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (!std::regex_match(name, shard_file) && name[0] != '.' && name != "lost+found" &&
          !fs::is_regular_file(it->path() / "meta.json") &&
          std::find(ours_too.begin(), ours_too.end(), fs::weakly_canonical(it->path())) == ours_too.end())
        foreign.push_back(name);
    }
    std::sort(foreign.begin(), foreign.end());
    if (!foreign.empty())
      throw Error(i == 0 ? "data_prep.output" : "data_prep.valid_output",
                  outs[i].dir + " holds '" + foreign[0] + "'" +
                      (foreign.size() > 1 ? " (and " + std::to_string(foreign.size() - 1) + " more)" : "") +
                      ", which is not part of a shard set",
                  "give the shard set a folder of its own (llm-data replaces the shard set in it)");
  }
  StagingGuard staging{outs};  // (before any staging folder exists)
  // Every folder is locked before anything is staged, in the order of their paths: two runs
  // given the same two folders the other way round do not each take one and refuse the other.
  std::vector<SetOutput*> by_path;
  for (SetOutput& o : outs) by_path.push_back(&o);
  std::sort(by_path.begin(), by_path.end(), [](const SetOutput* a, const SetOutput* b) {
    return fs::absolute(a->dir).lexically_normal() < fs::absolute(b->dir).lexically_normal();
  });
  for (SetOutput* out : by_path) {
    SetOutput& o = *out;
    const char* key = &o == &outs.front() ? "data_prep.output" : "data_prep.valid_output";
    std::error_code ec;
    o.info.dir = o.dir;
    o.info.vocab_size = tok.vocab_size();
    o.info.eos_id = tok.eos_id();
    o.info.bos_id = cfg.bos ? tok.bos_id() : -1;
    o.info.tokenizer_sha256 = sha;
    o.info.tokenizer_path = fs::absolute(tok.path()).lexically_normal().string();
    // One writer a folder: a second llm-data on it would remove the first one's staging folder. The
    // lock's path must still name the file locked: a failing run removes the lock file it made (and
    // its new folder, if empty), and a run that opened them before tries again.
    const std::string lock_path = (fs::path(o.dir) / ".llm-data.lock").string();
    for (int attempt = 1;; ++attempt) {
      // The folders this run makes, the outermost kept over attempts (a symbolic link there, even
      // one to nothing, is the user's: not made here).
      for (fs::path p = folder_path(o.dir); !p.empty() && !fs::exists(fs::symlink_status(p, ec)); p = p.parent_path()) {
        if (o.created.empty() || std::distance(p.begin(), p.end()) < std::distance(o.created.begin(), o.created.end()))
          o.created = p;
        if (p == p.parent_path()) break;
      }
      fs::create_directories(o.dir, ec);
      if (ec == std::errc::no_such_file_or_directory && attempt < 100) continue;  // (a failing run removed a parent)
      if (ec || !fs::is_directory(o.dir))
        throw Error(key, "cannot create folder " + o.dir + (ec ? ": " + ec.message() : ""));
      // (for writing, as NFS's emulated flock needs; read-only where another user made it, which a
      // local flock takes)
      int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      const bool made = fd >= 0;
      if (fd < 0 && errno == EEXIST) fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
      if (fd < 0 && errno == EACCES) fd = ::open(lock_path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0 && errno == ENOENT && attempt < 100) continue;
      if (fd < 0)
        throw Error(lock_path, "cannot create the lock: " + errno_text(), "check that " + o.dir + " is writable");
      o.lock = std::shared_ptr<void>(nullptr, [fd](void*) { ::close(fd); });
      if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK) throw Error(lock_path, "cannot lock: " + errno_text());
        throw Error(o.dir, "another llm-data is writing a shard set into this folder (it holds " + lock_path + ")",
                    std::string("wait for it to finish, or give this one another ") + key);
      }
      struct stat held {
      }, named{};
      if (::fstat(fd, &held) == 0 && ::stat(lock_path.c_str(), &named) == 0 && held.st_dev == named.st_dev &&
          held.st_ino == named.st_ino) {
        o.locked = true;
        o.made_lock = made;
        break;
      }
      o.lock.reset();  // (closed: a lock on a file that is gone from the folder locks nothing)
      if (attempt >= 100)
        throw Error(lock_path, "was removed or replaced each time it was locked", "run one llm-data at a time here");
    }
  }
  for (SetOutput& o : outs) {
    std::error_code ec;
    const std::string stage = (fs::path(o.dir) / kStaging).string();
    fs::remove_all(stage, ec);  // (an interrupted run's)
    if (!ec) fs::create_directory(stage, ec);
    if (ec)
      throw Error(stage, "cannot create the staging folder: " + ec.message(), "check that " + o.dir + " is writable");
    o.stage = stage;
    o.writer = std::make_unique<ShardWriter>(o.stage, width, cfg.shard_tokens, o.info.vocab_size, o.info.bos_id,
                                             o.info.eos_id, tok.path());
  }
  int64_t pending_bytes = 0, done_bytes = 0, doc_index = 0;
  const int64_t batch_bytes = std::max<int64_t>(1, threads) * (4 << 20);
  auto flush = [&](int64_t done_at) {
    for (SetOutput& o : outs) {
      for (const auto& ids : tokenize_all(tok, o.pending, threads)) o.writer->add(ids);
      o.info.total_documents += static_cast<int64_t>(o.pending.size());
      o.pending.clear();
    }
    pending_bytes = 0;
    if (progress) progress(std::min(done_at, total_bytes), total_bytes);
  };
  std::vector<std::string> encoding_notes;  // (ShardSetInfo::notes)
  for (const auto& file : files) {
    DocReader reader(file, cfg.txt_documents);
    std::string doc;
    while (reader.next(doc)) {
      const int64_t i = doc_index++;
      for (SetOutput& o : outs) {
        if (!o.keep(i)) continue;
        pending_bytes += static_cast<int64_t>(doc.size());
        o.pending.push_back(std::move(doc));
        break;
      }
      if (pending_bytes >= batch_bytes) flush(done_bytes + reader.bytes());
    }
    if (const std::string note = reader.encoding_note(); !note.empty()) encoding_notes.push_back(note);
    done_bytes += static_cast<int64_t>(fs::file_size(file));
  }
  flush(done_bytes);
  if (doc_index == 0)
    throw Error("data_prep.inputs", "the inputs hold no documents (every line is blank)", "check the input files");
  for (const SetOutput& o : outs)  // (before any set is complete: none is taken for a whole one)
    if (o.info.total_documents == 0)
      throw Error("data_prep.valid_every",
                  "is " + std::to_string(cfg.valid_every) + ", and the inputs hold " + std::to_string(doc_index) +
                      " documents: none is held out",
                  "lower valid_every, or set it to 0 for no held-out set");

  std::vector<ShardSetInfo> infos;
  for (SetOutput& o : outs) {
    ShardSetInfo& info = o.info;
    ojson shards = ojson::array();
    for (const auto& r : o.writer->finish()) {
      shards.push_back({{"file", r.file},
                        {"tokens", r.tokens},
                        {"documents", r.documents},
                        {"doc_offsets_file", r.idx},
                        {"xxh64", r.xxh64},
                        {"doc_offsets_xxh64", r.idx_xxh64}});
      info.total_tokens += r.tokens;
    }
    ojson meta;
    meta["format"] = kFormat;
    meta["dtype"] = width == 2 ? "uint16" : "uint32";
    meta["vocab_size"] = info.vocab_size;
    meta["eos_id"] = info.eos_id;
    meta["bos_id"] = info.bos_id;
    meta["tokenizer_sha256"] = info.tokenizer_sha256;
    meta["tokenizer_path"] = info.tokenizer_path;
    meta["shards"] = shards;
    meta["total_tokens"] = info.total_tokens;
    meta["total_documents"] = info.total_documents;
    meta["inputs"] = cfg.inputs;
    meta["txt_documents"] = cfg.txt_documents;
    detail::write_file_atomic((fs::path(o.stage) / "meta.json").string(), meta.dump(2) + "\n");
    info.notes = encoding_notes;
    infos.push_back(info);
  }
  // Every set is whole: from here a failure must not delete the staged files (the old set may
  // be gone already), it says where the complete new set is.
  staging.released = true;
  for (const SetOutput& o : outs) {
    try {
      move_staged_set(o);
    } catch (const Error& e) {
      throw Error(e.where(), e.problem(),
                  "the complete new shard set is in " + o.stage + ": move its files into " + o.dir);
    }
  }
  return infos;
}

}  // namespace

ShardSetInfo write_shards(const DataPrepConfig& cfg, const Tokenizer& tok,
                          const std::function<void(int64_t, int64_t)>& progress) {
  check_prep_config(cfg);
  if (tok.eos_id() < 0)
    throw Error(tok.path(), "the tokenizer defines no EOS token", "documents are separated by EOS; use a tokenizer with one");
  const int64_t n = cfg.valid_every;
  std::vector<SetOutput> outs(1);
  outs[0].dir = output_path(cfg.output);
  outs[0].keep = [n](int64_t i) { return n <= 0 || i % n != n - 1; };
  if (n > 0) {  // the held-out set, from the same pass
    outs.emplace_back();
    outs[1].dir = output_path(cfg.valid_output);
    outs[1].keep = [n](int64_t i) { return i % n == n - 1; };
  }
  return write_shard_sets(cfg, outs, tok, progress).front();
}

// ---- public: reading --------------------------------------------------------------------------

struct ShardSet::Impl {
  ShardSetInfo info;
  int width = 2;
  std::vector<std::string> files, idx_files;
  std::vector<std::string> sums, idx_sums;  // meta.json's checksums of each file; "" = none recorded
  std::vector<int64_t> starts;  // token offset of each shard in the stream; starts.back() = total
  std::vector<std::unique_ptr<Mapping>> maps;
};

ShardSet ShardSet::open(const std::string& dir) {
  const std::string make = "list the documents in data_prep.inputs, run llm-data, and name its data_prep.output here";
  std::error_code ec;
  if (fs::is_regular_file(dir, ec))
    throw Error(dir, "is a file, not a shard-set folder",
                supported(dir, false) ? make : "name llm-data's data_prep.output");
  if (!fs::is_directory(dir)) {
    std::error_code cwd_ec;
    const std::string from = fs::path(dir).is_relative() ? " (a relative path, from the working directory " +
                                                               fs::current_path(cwd_ec).string() + ")"
                                                         : "";
    throw Error(dir, "shard-set folder not found" + from, "make it with data preparation (llm-data / write_shards)");
  }
  const std::string meta_path = (fs::path(dir) / "meta.json").string();
  if (!fs::is_regular_file(meta_path)) {
    bool documents = false;  // (a folder of the user's documents, named where their tokens go)
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end && !documents; it.increment(ec))
      documents = it->is_regular_file() && supported(it->path(), false);
    if (documents) throw Error(dir, "holds documents, not a shard set of their tokens", make);
    throw Error(dir, "no meta.json: the shard set is incomplete (data preparation was interrupted or never run)",
                kRerun);
  }
  json meta;
  try {
    std::ifstream in(meta_path);
    meta = json::parse(in);
  } catch (const json::exception& e) {
    throw Error(meta_path, std::string("invalid JSON: ") + e.what(), kRerun);
  }
  const std::string format = meta_get<std::string>(meta, "format", meta_path);
  if (format != kFormat)
    throw Error(meta_path, "unknown format '" + format + "' (expected " + kFormat + ")", kRerun);
  auto impl = std::make_shared<Impl>();
  ShardSetInfo& info = impl->info;
  info.dir = dir;
  const std::string dtype = meta_get<std::string>(meta, "dtype", meta_path);
  if (dtype != "uint16" && dtype != "uint32")
    throw Error(meta_path, "unknown dtype '" + dtype + "' (expected uint16 or uint32)", kRerun);
  impl->width = dtype == "uint16" ? 2 : 4;
  info.vocab_size = meta_get<int64_t>(meta, "vocab_size", meta_path);
  info.eos_id = meta_get<int64_t>(meta, "eos_id", meta_path);
  info.bos_id = meta.contains("bos_id") ? meta_get<int64_t>(meta, "bos_id", meta_path) : -1;
  // (read() checks each token against vocab_size: the bound must be the one the writer used)
  if (info.vocab_size < 1 || info.vocab_size > (impl->width == 2 ? 65536 : INT32_MAX))
    throw Error(meta_path + ": vocab_size",
                std::to_string(info.vocab_size) + " is outside [1, " + (impl->width == 2 ? "65536" : "2^31 - 1") +
                    "] for " + dtype + " tokens",
                kRerun);
  for (auto [key, id] : {std::pair{"eos_id", info.eos_id}, {"bos_id", info.bos_id}})
    if (id < -1 || id >= info.vocab_size)
      throw Error(meta_path + ": " + key,
                  std::to_string(id) + " is outside the vocabulary of " + std::to_string(info.vocab_size), kRerun);
  info.tokenizer_sha256 = meta_get<std::string>(meta, "tokenizer_sha256", meta_path);
  info.tokenizer_path = meta_get<std::string>(meta, "tokenizer_path", meta_path);
  info.total_tokens = meta_get<int64_t>(meta, "total_tokens", meta_path);
  info.total_documents = meta_get<int64_t>(meta, "total_documents", meta_path);
  const json shards = meta_get<json>(meta, "shards", meta_path);
  if (!shards.is_array()) throw Error(meta_path, "\"shards\" is not a list", kRerun);

  int64_t tokens = 0, documents = 0;
  impl->starts.push_back(0);
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string where = meta_path + ": shards[" + std::to_string(i) + "]";
    const std::string file = meta_get<std::string>(shards[i], "file", where);
    const std::string idx = meta_get<std::string>(shards[i], "doc_offsets_file", where);
    const int64_t n = meta_get<int64_t>(shards[i], "tokens", where);
    const int64_t d = meta_get<int64_t>(shards[i], "documents", where);
    // (bounds that keep the byte counts below in int64_t)
    if (file.find('/') != std::string::npos || idx.find('/') != std::string::npos || n < 0 || d < 0 ||
        n > INT64_MAX / 8 || d > INT64_MAX / 8)
      throw Error(where, "invalid shard entry", kRerun);
    const std::string path = (fs::path(dir) / file).string(), idx_path = (fs::path(dir) / idx).string();
    auto size_of = [&](const std::string& p) {
      std::error_code ec;
      const auto s = fs::file_size(p, ec);
      if (ec) throw Error(p, "shard file missing (" + ec.message() + ")", kRerun);
      return static_cast<int64_t>(s);
    };
    if (size_of(path) != n * impl->width)
      throw Error(path,
                  "has " + std::to_string(size_of(path)) + " bytes but meta.json says " + std::to_string(n) + " " +
                      dtype + " tokens (" + std::to_string(n * impl->width) + " bytes): truncated or modified",
                  kDamaged);
    if (size_of(idx_path) != d * 8)
      throw Error(idx_path,
                  "has " + std::to_string(size_of(idx_path)) + " bytes but meta.json says " + std::to_string(d) +
                      " documents (" + std::to_string(d * 8) + " bytes)",
                  kDamaged);
    // (a set made before checksums were recorded has none: verify() skips its files)
    auto checksum = [&](const char* key) {
      if (!shards[i].contains(key)) return std::string();
      std::string v = meta_get<std::string>(shards[i], key, where);
      if (v.size() != 16 || v.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
        throw Error(where + ": " + key, "'" + v + "' is no checksum (16 hex digits)", kRerun);
      for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return v;
    };
    impl->sums.push_back(checksum("xxh64"));
    impl->idx_sums.push_back(checksum("doc_offsets_xxh64"));
    impl->maps.push_back(std::make_unique<Mapping>(path, static_cast<size_t>(n * impl->width)));
    impl->files.push_back(path);
    impl->idx_files.push_back(idx_path);
    tokens += n, documents += d;
    impl->starts.push_back(tokens);
  }
  if (tokens != info.total_tokens || documents != info.total_documents)
    throw Error(meta_path, "total_tokens/total_documents do not match the shards' sums", kRerun);
  // (all or none: a file without one where the others have theirs would go unchecked)
  const auto unrecorded = [](const std::vector<std::string>& v) { return std::count(v.begin(), v.end(), ""); };
  const auto missing = unrecorded(impl->sums) + unrecorded(impl->idx_sums);
  if (missing > 0 && missing < static_cast<int64_t>(2 * impl->sums.size()))
    throw Error(meta_path, "records checksums for some shard files and not for " + std::to_string(missing), kRerun);
  ShardSet s;
  s.impl_ = std::move(impl);
  return s;
}

bool ShardSet::has_checksums() const {  // (open() takes all or none)
  return !impl_->sums.empty() && !impl_->sums.front().empty();
}

int64_t ShardSet::verify(int64_t part, int64_t parts, int64_t offset) const {
  const Impl& m = *impl_;
  if (parts < 1 || part < 0 || part >= parts || offset < 0)
    throw Error(m.info.dir, "verify: part " + std::to_string(part) + " of " + std::to_string(parts) + " is no part");
  auto check = [](const std::string& path, const std::string& stored, const detail::Xxh64& h) {
    const std::string now = detail::hex16(h.digest());
    if (now != stored)
      throw Error(path, "the data does not match the checksum meta.json recorded (" + stored + ", now " + now + ")",
                  kDamaged);
  };
  // In 64 MiB pieces: a heartbeat for each, and the pages leave this process's resident memory.
  constexpr size_t kPiece = size_t{64} << 20;
  int64_t bytes = 0;
  for (size_t i = 0; i < m.maps.size(); ++i) {
    if ((offset + static_cast<int64_t>(i)) % parts != part) continue;
    if (!m.sums[i].empty()) {
      detail::Xxh64 h;
      const Mapping& map = *m.maps[i];
      for (size_t at = 0; at < map.size; at += kPiece) {
        detail::heartbeat("verifying", m.files[i]);
        const size_t n = std::min(kPiece, map.size - at);
        h.update(map.data + at, n);
        detail::release_pages(map.data + at, n);
      }
      check(m.files[i], m.sums[i], h);
      bytes += static_cast<int64_t>(map.size);
    }
    if (!m.idx_sums[i].empty()) {
      std::ifstream in(m.idx_files[i], std::ios::binary);
      if (!in) throw Error(m.idx_files[i], "cannot open: " + errno_text(), kRerun);
      detail::Xxh64 h;
      std::vector<char> buf(size_t{1} << 20);
      while (in) {
        detail::heartbeat("verifying", m.idx_files[i]);
        in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
        h.update(buf.data(), static_cast<size_t>(in.gcount()));
        bytes += in.gcount();
      }
      if (in.bad()) throw Error(m.idx_files[i], "cannot read: " + errno_text(), kRerun);
      check(m.idx_files[i], m.idx_sums[i], h);
    }
  }
  return bytes;
}

const ShardSetInfo& ShardSet::info() const { return impl_->info; }
int64_t ShardSet::n_tokens() const { return impl_->info.total_tokens; }
int64_t ShardSet::n_shards() const { return static_cast<int64_t>(impl_->maps.size()); }

void ShardSet::read(int64_t begin, int64_t n, int64_t* out) const {
  const Impl& m = *impl_;
  if (begin < 0 || n < 0 || begin + n > m.info.total_tokens)
    throw Error(m.info.dir, "token range [" + std::to_string(begin) + ", " + std::to_string(begin + n) +
                                ") outside the shard set's " + std::to_string(m.info.total_tokens) + " tokens");
  size_t shard = static_cast<size_t>(std::upper_bound(m.starts.begin(), m.starts.end(), begin) - m.starts.begin()) - 1;
  while (n > 0) {
    const int64_t local = begin - m.starts[shard];
    const int64_t take = std::min(n, m.starts[shard + 1] - begin);
    const unsigned char* p = m.maps[shard]->data + local * m.width;
    int64_t largest = 0;
    if (m.width == 2)
      for (int64_t i = 0; i < take; ++i) {
        out[i] = static_cast<int64_t>(p[2 * i] | (p[2 * i + 1] << 8));
        largest = std::max(largest, out[i]);
      }
    else
      for (int64_t i = 0; i < take; ++i) {
        out[i] = static_cast<int64_t>(get_le(p + 4 * i, 4));
        largest = std::max(largest, out[i]);
      }
    if (largest >= m.info.vocab_size) {  // a damaged or foreign shard: name it, not an index error later
      const int64_t at = std::find_if(out, out + take, [&](int64_t v) { return v >= m.info.vocab_size; }) - out;
      throw Error(m.files[shard],
                  "token " + std::to_string(out[at]) + " (at token " + std::to_string(local + at) +
                      " of the shard) is outside the vocabulary of " + std::to_string(m.info.vocab_size),
                  kRerun);
    }
    out += take, begin += take, n -= take;
    ++shard;
  }
}

std::string ShardSet::fingerprint() const {
  // Of the token stream alone, not of its split into shards (another data_prep.shard_tokens makes
  // the same stream): 16 reads of up to 2048 tokens, evenly spaced from its start to its end.
  const int64_t total = impl_->info.total_tokens;
  std::string text =
      "tokens " + std::to_string(total) + " documents " + std::to_string(impl_->info.total_documents) + "\n";
  constexpr int64_t kReads = 16, kRead = 2048;
  std::vector<int64_t> tokens(static_cast<size_t>(kRead));
  for (int64_t r = 0; r < kReads; ++r) {
    const int64_t n = std::min(kRead, total);
    const int64_t begin = (total - n) * r / (kReads - 1);
    read(begin, n, tokens.data());
    text.append(reinterpret_cast<const char*>(tokens.data()), static_cast<size_t>(n) * sizeof(int64_t));
  }
  return sha256_hex(text).substr(0, 16);
}

std::string bos_mismatch(const ShardSetInfo& a, const ShardSetInfo& b) {
  auto how = [](const ShardSetInfo& i) {
    return i.bos_id >= 0 ? "starts documents with BOS (id " + std::to_string(i.bos_id) + ")"
                         : std::string("has no BOS");
  };
  return how(a) + ", and " + b.dir + " " + how(b);
}

void check_tokenizer(const ShardSet& s, const Tokenizer& tok) {
  const std::string sha = sha256_file(tok.path());
  const ShardSetInfo& info = s.info();
  if (sha == info.tokenizer_sha256) {
    // (the tokens are checked against meta.json's vocab_size as they are read: it must be the
    // tokenizer's, which fits the model, so that no id reaches the embedding out of range)
    if (info.vocab_size != tok.vocab_size())
      throw Error((fs::path(info.dir) / "meta.json").string() + ": vocab_size",
                  std::to_string(info.vocab_size) + " is not the vocabulary size of its tokenizer " + tok.path() +
                      " (" + std::to_string(tok.vocab_size()) + ")",
                  kRerun);
    return;
  }
  throw Error(info.dir, "the shard set was made with tokenizer " + info.tokenizer_path + " (sha256 " +
                            info.tokenizer_sha256.substr(0, 12) + "...) but this run's tokenizer is " + tok.path() +
                            " (sha256 " + sha.substr(0, 12) + "...)",
              "use the tokenizer the data was made with (tokenizer.path), or re-run data preparation with this one");
}

// ---- public: the packed dataset ---------------------------------------------------------------

PackedDataset::PackedDataset(const DataConfig& cfg, int64_t seq_len, int64_t rank, int64_t world_size)
    : seed_(static_cast<uint64_t>(cfg.seed)), seq_len_(seq_len), rank_(rank), world_(world_size) {
  if (seq_len < 1) throw Error("data", "seq_len must be >= 1, got " + std::to_string(seq_len));
  if (world_size < 1 || rank < 0 || rank >= world_size)
    throw Error("data", "rank " + std::to_string(rank) + " outside world size " + std::to_string(world_size));
  if (cfg.train.empty())
    throw Error("data.train", "no training shard sets", "list shard-set folders made by data preparation");
  std::vector<double> w = parse_weights(cfg, "data");
  for (const auto& dir : cfg.train) {
    SetState st;
    st.shards = ShardSet::open(dir);
    st.dir = dir;
    st.fingerprint = st.shards.fingerprint();
    st.windows = st.shards.n_tokens() / (seq_len + 1);
    if (st.windows == 0)
      throw Error(dir, "has " + std::to_string(st.shards.n_tokens()) + " tokens, less than one window of seq_len + 1 = " +
                           std::to_string(seq_len + 1),
                  "use a shorter seq_len or more data");
    if (st.windows > static_cast<int64_t>(UINT32_MAX))
      throw Error(dir, "more than 2^32 windows in one shard set", "split the data into several shard sets");
    if (!sets_.empty() && st.shards.info().tokenizer_sha256 != sets_[0].shards.info().tokenizer_sha256)
      throw Error(dir, "made with tokenizer " + st.shards.info().tokenizer_path + " but " + sets_[0].dir +
                           " with " + sets_[0].shards.info().tokenizer_path + " (different sha256)",
                  "every data.train set must be tokenized with the same tokenizer");
    if (!sets_.empty() && st.shards.info().bos_id != sets_[0].shards.info().bos_id)
      throw Error(dir, bos_mismatch(st.shards.info(), sets_[0].shards.info()),
                  "re-run llm-data for one of them with the other's data_prep.bos");
    sets_.push_back(std::move(st));
  }
  if (w.empty())
    for (const auto& s : sets_) w.push_back(static_cast<double>(s.windows));
  const double sum = std::accumulate(w.begin(), w.end(), 0.0);
  double c = 0;
  for (double x : w) {
    probs_.push_back(x / sum);
    c += x / sum;
    cumulative_.push_back(c);
  }
  planned_ = windows_per_epoch();
  deferred_.resize(static_cast<size_t>(world_));
}

int32_t PackedDataset::draw_set(int64_t global) const {
  const uint64_t bits = splitmix64(mix(seed_, kMixtureStream) ^ static_cast<uint64_t>(global));
  const double u = static_cast<double>(bits >> 11) * 0x1.0p-53;  // [0, 1), 53 exact bits
  for (size_t s = 0; s < cumulative_.size(); ++s)
    if (u < cumulative_[s]) return static_cast<int32_t>(s);
  for (size_t s = probs_.size(); s-- > 0;)  // rounding left u above the last sum
    if (probs_[s] > 0) return static_cast<int32_t>(s);
  return 0;
}

WindowRef PackedDataset::take(int32_t set) {
  SetState& s = sets_[static_cast<size_t>(set)];
  if (s.perm_epoch != s.epoch) {
    s.perm.resize(static_cast<size_t>(s.windows));
    std::iota(s.perm.begin(), s.perm.end(), 0u);
    std::mt19937_64 rng(mix(mix(mix(seed_, kShuffleStream), static_cast<uint64_t>(set)), static_cast<uint64_t>(s.epoch)));
    for (size_t i = s.perm.size() - 1; i > 0; --i) std::swap(s.perm[i], s.perm[bounded(rng, i + 1)]);
    s.perm_epoch = s.epoch;
  }
  const WindowRef r{set, static_cast<int64_t>(s.perm[static_cast<size_t>(s.pos)])};
  if (++s.pos == s.windows) s.pos = 0, ++s.epoch;
  return r;
}

void PackedDataset::read_window(const WindowRef& r, int64_t* out) const {
  sets_[static_cast<size_t>(r.set)].shards.read(r.window * (seq_len_ + 1), seq_len_ + 1, out);
}

void PackedDataset::advance(std::vector<WindowRef>& slot) {
  slot.resize(static_cast<size_t>(world_));
  const auto pending = static_cast<int64_t>(deferred_[0].size());  // the same on every rank
  if (pending > 0 && planned_ - global_ <= pending * world_) {
    for (int64_t k = 0; k < world_; ++k) {
      auto& q = deferred_[static_cast<size_t>(k)];
      slot[static_cast<size_t>(k)] = q.front();
      q.pop_front();
    }
  } else {
    for (int64_t k = 0; k < world_; ++k)  // every rank advances every set alike
      slot[static_cast<size_t>(k)] = take(draw_set(global_ + k));
  }
  global_ += world_;
}

void PackedDataset::next(int64_t batch, std::vector<int64_t>& out, std::vector<WindowRef>& refs) {
  if (batch < 0) throw Error("data", "batch must be >= 0");
  out.resize(static_cast<size_t>(batch * (seq_len_ + 1)));
  refs.resize(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    advance(slot_);
    const WindowRef mine = slot_[static_cast<size_t>(rank_)];
    refs[static_cast<size_t>(b)] = mine;
    read_window(mine, out.data() + b * (seq_len_ + 1));
  }
}

void PackedDataset::roll_back(const std::string& live, const std::vector<std::vector<WindowRef>>& used) {
  if (!used.empty() && used.size() != static_cast<size_t>(world_))
    throw Error("data", "rolled-back windows of " + std::to_string(used.size()) + " ranks, this run has " +
                            std::to_string(world_));
  for (const auto& mine : used) {
    if (mine.size() != used[0].size()) throw Error("data", "ranks rolled back different numbers of windows");
    for (const WindowRef& r : mine) check_ref(r, "data");
  }
  const int64_t global = global_, planned = planned_;
  restore(live);
  global_ = global;  // (the steps that used them run again)
  planned_ = planned;
  for (size_t k = 0; k < used.size(); ++k) deferred_[k].insert(deferred_[k].end(), used[k].begin(), used[k].end());
}

void PackedDataset::check_ref(const WindowRef& r, const std::string& where) const {
  if (r.set < 0 || r.set >= n_sets() || r.window < 0 || r.window >= windows(r.set))
    throw Error(where, "no window " + std::to_string(r.window) + " in set " + std::to_string(r.set));
}

void PackedDataset::set_planned_samples(int64_t n) {
  if (n < 0) throw Error("data", "planned samples must be >= 0");
  planned_ = n;
}
int64_t PackedDataset::planned_samples() const { return planned_; }
int64_t PackedDataset::deferred_count() const { return static_cast<int64_t>(deferred_[static_cast<size_t>(rank_)].size()); }

int64_t PackedDataset::windows_per_epoch() const {
  int64_t n = 0;
  for (const auto& s : sets_) n += s.windows;
  return n;
}
int64_t PackedDataset::windows(int32_t set) const { return sets_.at(static_cast<size_t>(set)).windows; }
int32_t PackedDataset::n_sets() const { return static_cast<int32_t>(sets_.size()); }
const ShardSet& PackedDataset::shard_set(int32_t set) const { return sets_.at(static_cast<size_t>(set)).shards; }

std::string PackedDataset::describe(const WindowRef& r) const {
  const int64_t begin = r.window * (seq_len_ + 1);
  const std::string dir = r.set >= 0 && r.set < n_sets() ? sets_[static_cast<size_t>(r.set)].dir : "?";
  return "set " + std::to_string(r.set) + " (" + dir + ") window " + std::to_string(r.window) + " tokens [" +
         std::to_string(begin) + ", " + std::to_string(begin + seq_len_ + 1) + ")";
}

std::string PackedDataset::cursor() const {
  ojson j;
  j["format"] = kCursorFormat;
  j["seed"] = seed_;
  j["seq_len"] = seq_len_;
  j["rank"] = rank_;
  j["world_size"] = world_;
  j["global"] = global_;
  j["planned"] = planned_;
  j["sets"] = ojson::array();
  for (const auto& s : sets_)
    j["sets"].push_back({{"dir", s.dir},
                         {"tokens", s.shards.n_tokens()},
                         {"windows", s.windows},
                         {"stream_fingerprint", s.fingerprint},
                         {"epoch", s.epoch},
                         {"pos", s.pos}});
  j["deferred"] = ojson::array();  // per rank: [[set, window], ...]
  for (const auto& q : deferred_) {
    ojson mine = ojson::array();
    for (const auto& r : q) mine.push_back({r.set, r.window});
    j["deferred"].push_back(mine);
  }
  return j.dump();
}

void PackedDataset::restore(const std::string& text) {
  const std::string where = "data cursor";
  const std::string fresh =
      "resume with the data settings the run was saved with; to train on other data, start a new run from the "
      "checkpoint (finetune.base: its folder, finetune.method: full, another train.run_dir)";
  json j;
  try {
    j = detail::parse_json(text, where);
  } catch (const json::exception& e) {
    throw Error(where, std::string("invalid JSON: ") + e.what(), "the checkpoint's data cursor is corrupt");
  }
  auto get = [&](const json& o, const std::string& key) -> int64_t {
    if (!o.is_object() || !o.contains(key) || !o[key].is_number_integer())
      throw Error(where, "missing or non-integer \"" + key + "\"", "the checkpoint's data cursor is corrupt");
    return o[key].get<int64_t>();
  };
  if (!j.is_object() || !j.contains("format") || j["format"] != kCursorFormat)
    throw Error(where, std::string("not a ") + kCursorFormat + " cursor", "the checkpoint's data cursor is corrupt");
  if (static_cast<uint64_t>(get(j, "seed")) != seed_)
    throw Error(where, "saved with data.seed " + std::to_string(get(j, "seed")) + ", this run uses " +
                           std::to_string(static_cast<int64_t>(seed_)), fresh);
  if (get(j, "seq_len") != seq_len_)
    throw Error(where, "saved with seq_len " + std::to_string(get(j, "seq_len")) + ", this run uses " +
                           std::to_string(seq_len_), fresh);
  const json& sets = j.contains("sets") ? j["sets"] : json();
  if (!sets.is_array() || sets.size() != sets_.size())
    throw Error(where, "saved with " + std::to_string(sets.is_array() ? sets.size() : 0) + " train sets, this run has " +
                           std::to_string(sets_.size()), fresh);
  std::vector<std::pair<int64_t, int64_t>> state;
  for (size_t i = 0; i < sets.size(); ++i) {
    const SetState& s = sets_[i];
    if (get(sets[i], "tokens") != s.shards.n_tokens() || get(sets[i], "windows") != s.windows) {
      // Another folder in the list (data.train edited), or the same one made again.
      const std::string then =
          sets[i].contains("dir") && sets[i]["dir"].is_string() ? sets[i]["dir"].get<std::string>() : "";
      std::error_code e1, e2;
      const bool other = !then.empty() && fs::weakly_canonical(then, e1) != fs::weakly_canonical(s.dir, e2);
      throw Error(where,
                  "train set " + std::to_string(i) +
                      (other ? " was " + then + " (" + std::to_string(get(sets[i], "tokens")) +
                                   " tokens) when the cursor was saved, and is " + s.dir + " (" +
                                   std::to_string(s.shards.n_tokens()) + " tokens) now"
                             : " (" + s.dir + ") has changed since the cursor was saved (" +
                                   std::to_string(get(sets[i], "tokens")) + " tokens then, " +
                                   std::to_string(s.shards.n_tokens()) + " now)"),
                  fresh);
    }
    // The same size, other tokens (another data set of that size; the same documents made with other
    // data_prep settings): a cursor from before fingerprints (no key) is taken as it is.
    if (sets[i].contains("stream_fingerprint") && sets[i]["stream_fingerprint"] != s.fingerprint) {
      const std::string then =
          sets[i].contains("dir") && sets[i]["dir"].is_string() ? sets[i]["dir"].get<std::string>() : "";
      throw Error(where,
                  "train set " + std::to_string(i) + " (" + s.dir + ") holds other tokens than " +
                      (then.empty() || then == s.dir ? std::string("it did") : then + " did") +
                      " when the cursor was saved (the same " + std::to_string(s.shards.n_tokens()) +
                      " tokens in number; fingerprint " + s.fingerprint + ", then " +
                      detail::shown(sets[i]["stream_fingerprint"]) + ")",
                  fresh);
    }
    const int64_t epoch = get(sets[i], "epoch"), pos = get(sets[i], "pos");
    if (epoch < 0 || pos < 0 || pos >= s.windows)
      throw Error(where, "invalid position of train set " + std::to_string(i), "the checkpoint's data cursor is corrupt");
    state.emplace_back(epoch, pos);
  }
  const int64_t global = get(j, "global"), planned = get(j, "planned");
  if (global < 0 || planned < 0) throw Error(where, "negative global index", "the checkpoint's data cursor is corrupt");
  if (!j.contains("deferred") || !j["deferred"].is_array())
    throw Error(where, "missing \"deferred\"", "the checkpoint's data cursor is corrupt");
  // The saved ranks' queues, of equal length: slot i of every rank, rank by rank, is the order
  // in which they would have been served.
  const json& saved = j["deferred"];
  std::vector<std::vector<WindowRef>> queues;
  for (const auto& q : saved) {
    if (!q.is_array()) throw Error(where, "invalid deferred windows", "the checkpoint's data cursor is corrupt");
    auto& mine = queues.emplace_back();
    for (const auto& r : q) {
      if (!r.is_array() || r.size() != 2 || !r[0].is_number_integer() || !r[1].is_number_integer())
        throw Error(where, "invalid deferred window", "the checkpoint's data cursor is corrupt");
      const WindowRef ref{r[0].get<int32_t>(), r[1].get<int64_t>()};
      check_ref(ref, where);
      mine.push_back(ref);
    }
    if (mine.size() != queues[0].size())
      throw Error(where, "ranks have different numbers of deferred windows", "the checkpoint's data cursor is corrupt");
  }
  std::vector<std::deque<WindowRef>> deferred(static_cast<size_t>(world_));
  if (queues.size() == deferred.size()) {
    for (size_t k = 0; k < queues.size(); ++k) deferred[k].assign(queues[k].begin(), queues[k].end());
  } else if (!queues.empty() && !queues[0].empty()) {
    // Saved by another number of ranks: dealt out in that order to this run's ranks, so that the
    // same windows come back in the same order; a remainder that does not divide is dropped.
    const size_t old_world = queues.size(), per_rank = queues[0].size(), total = old_world * per_rank;
    const size_t dealt = total - total % static_cast<size_t>(world_);
    for (size_t n = 0; n < dealt; ++n)
      deferred[n % static_cast<size_t>(world_)].push_back(queues[n % old_world][n / old_world]);
    if (dealt < total && rank_ == 0)
      fmt::print(
          "note: the data cursor's {} deferred windows of {} ranks do not divide among {} ranks: the last {} "
          "are dropped, not deferred\n",
          total, old_world, world_, total - dealt);
  }
  for (size_t i = 0; i < sets_.size(); ++i) std::tie(sets_[i].epoch, sets_[i].pos) = state[i];
  global_ = global;
  planned_ = planned;
  deferred_ = std::move(deferred);
}

}  // namespace libllm
