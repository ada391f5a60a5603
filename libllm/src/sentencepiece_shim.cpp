// A tiny shared module between libllm and libsentencepiece, loaded at run time with
// dlopen(RTLD_LOCAL | RTLD_DEEPBIND) by tokenizer.cpp.
//
// Why: Debian's libsentencepiece embeds and exports its own protobuf-lite (3.14) while Debian's
// LibTorch loads the system libprotobuf (3.21). Linked into one process, one library's protobuf
// symbols interpose the other's and the process crashes in static initialisers or fails
// protobuf's version check. Loaded privately and deep-bound, sentencepiece keeps its own
// protobuf and never meets LibTorch's. The functions take C++ types by pointer: both sides share
// the one libstdc++ of the process.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <new>
#include <string>
#include <vector>

using sentencepiece::SentencePieceProcessor;

// sentencepiece's log threshold (exported by libsentencepiece; weak: a version without it loads).
namespace sentencepiece::logging {
void SetMinLogLevel(int v) __attribute__((weak));
}

namespace {

// Unbuffered writes to a file descriptor.
class FdBuf : public std::streambuf {
 public:
  explicit FdBuf(int fd) : fd_(fd) {}

 protected:
  int overflow(int c) override {
    if (c == traits_type::eof()) return 0;
    const char ch = static_cast<char>(c);
    return xsputn(&ch, 1) == 1 ? c : traits_type::eof();
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    std::streamsize done = 0;
    while (done < n) {
      const ssize_t w = ::write(fd_, s + done, static_cast<size_t>(n - done));
      if (w <= 0) break;
      done += w;
    }
    return done;
  }

 private:
  int fd_;
};

// Deep-bound, this module and sentencepiece see libstdc++'s own std::cerr / std::cout / std::clog.
// A program that uses iostreams itself holds copies of them (copy relocations), and the C++
// runtime constructs those copies only: sentencepiece's first log line (every training run
// writes one, "Running command: ...") then crashed on a never-constructed stream. Construct the
// ones this module sees when they were not (their storage is still all zero).
void ensure_streams() {
  static FdBuf out(1), err(2);
  static std::once_flag once;  // (two threads loading tokenizers at once)
  std::call_once(once, [] {
    auto fix = [](std::ostream& s, std::streambuf* buf) {
      void* vptr = nullptr;
      std::memcpy(&vptr, static_cast<void*>(&s), sizeof vptr);
      if (!vptr) new (&s) std::ostream(buf);
    };
    fix(std::cout, &out);
    fix(std::cerr, &err);
    fix(std::clog, &err);
  });
}

}  // namespace

extern "C" {

int llm_spm_abi_version() { return 1; }

void* llm_spm_load(const std::string* path, std::string* error) {
  ensure_streams();
  auto* sp = new SentencePieceProcessor();
  const auto status = sp->Load(*path);
  if (!status.ok()) {
    *error = status.ToString();
    delete sp;
    return nullptr;
  }
  return sp;
}

void llm_spm_free(void* sp) { delete static_cast<SentencePieceProcessor*>(sp); }

// which: 0 = vocabulary size, 1 = unk id, 2 = bos id, 3 = eos id, 4 = pad id.
int64_t llm_spm_info(void* handle, int which) {
  auto* sp = static_cast<SentencePieceProcessor*>(handle);
  switch (which) {
    case 0: return sp->GetPieceSize();
    case 1: return sp->unk_id();
    case 2: return sp->bos_id();
    case 3: return sp->eos_id();
    case 4: return sp->pad_id();
  }
  return -1;
}

bool llm_spm_encode(void* handle, const std::string* text, std::vector<int>* ids, std::string* error) {
  const auto status = static_cast<SentencePieceProcessor*>(handle)->Encode(*text, ids);
  if (!status.ok()) *error = status.ToString();
  return status.ok();
}

bool llm_spm_decode(void* handle, const std::vector<int>* ids, std::string* text, std::string* error) {
  const auto status = static_cast<SentencePieceProcessor*>(handle)->Decode(*ids, text);
  if (!status.ok()) *error = status.ToString();
  return status.ok();
}

// Like llm_spm_encode, plus each token's [begin, end) byte span in `text` (the leading bytes of a
// character that byte fallback splits get an empty span at the character's start).
bool llm_spm_encode_spans(void* handle, const std::string* text, std::vector<int>* ids, std::vector<int64_t>* begins,
                          std::vector<int64_t>* ends, std::string* error) {
  sentencepiece::ImmutableSentencePieceText spt;
  const auto status = static_cast<SentencePieceProcessor*>(handle)->Encode(*text, spt.mutable_proto());
  if (!status.ok()) return *error = status.ToString(), false;
  ids->clear(), begins->clear(), ends->clear();
  for (const auto& p : spt.pieces()) {
    ids->push_back(static_cast<int>(p.id()));
    begins->push_back(p.begin());
    ends->push_back(p.end());
  }
  return true;
}

void llm_spm_piece(void* handle, int id, std::string* piece) {
  *piece = static_cast<SentencePieceProcessor*>(handle)->IdToPiece(id);
}

// sentencepiece's trainer on `lines` (its sentences, in this order; each is released once the
// trainer has taken it) with spm_train's flag string ("--vocab_size=... --model_type=..."; no
// --input or --model_prefix): the serialized model in `model`, which depends on nothing else (no
// file names are recorded in it).
bool llm_spm_train_lines(std::vector<std::string>* lines, const std::string* args, std::string* model,
                         std::string* error) {
  struct Lines : sentencepiece::SentenceIterator {
    explicit Lines(std::vector<std::string>& l) : lines(l) {}
    bool done() const override { return i >= lines.size(); }
    void Next() override { std::string().swap(lines[i++]); }
    const std::string& value() const override { return lines[i]; }
    sentencepiece::util::Status status() const override { return sentencepiece::util::Status(); }
    std::vector<std::string>& lines;
    size_t i = 0;
  } it(*lines);
  ensure_streams();
  // --minloglevel applies only once sentencepiece has parsed the flags, after it logged them all.
  const size_t at = args->find("--minloglevel=");
  if (at != std::string::npos && sentencepiece::logging::SetMinLogLevel)
    sentencepiece::logging::SetMinLogLevel(std::atoi(args->c_str() + at + 14));
  const auto status = sentencepiece::SentencePieceTrainer::Train(*args, &it, model);
  if (!status.ok()) *error = status.ToString();
  return status.ok();
}

}  // extern "C"
