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

#include <string>
#include <vector>

using sentencepiece::SentencePieceProcessor;

extern "C" {

int llm_spm_abi_version() { return 1; }

void* llm_spm_load(const std::string* path, std::string* error) {
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
  const auto status = sentencepiece::SentencePieceTrainer::Train(*args, &it, model);
  if (!status.ok()) *error = status.ToString();
  return status.ok();
}

}  // extern "C"
