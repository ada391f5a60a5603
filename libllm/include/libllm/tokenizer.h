// A sentencepiece tokenizer.model (LLaMA/Mistral style: unk 0, BOS 1, EOS 2, byte fallback).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace libllm {

class Fields;
struct ModelConfig;

struct TokenizerConfig {    // recipe section `tokenizer`
  std::string path = "";    // sentencepiece tokenizer.model file; "" = the one beside the checkpoint
  // Training (llm-data), used when `path` does not exist yet:
  int64_t vocab_size = 0;             // pieces in a newly trained tokenizer; 0 = never train, `path` must exist
  std::string model_type = "bpe";     // bpe or unigram
  double character_coverage = 1.0;    // fraction of characters covered by pieces (rest: byte fallback)
  int64_t input_sentence_size = 2000000;  // lines sampled for training at most (uniformly from the whole corpus)

  void fields(Fields& f);
};

class Tokenizer {
 public:
  // Loads a tokenizer.model; a missing or corrupt file is a libllm::Error naming it.
  static Tokenizer load(const std::string& path);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text`, without BOS/EOS.
  std::vector<int64_t> encode(const std::string& text) const;
  // Token ids of `text` as Hugging Face's LlamaTokenizer (legacy mode, the tokenizer_config.json
  // that llm-export writes) tokenizes a rendered chat template: each special piece written out
  // (unk, BOS, EOS: "<unk>", "<s>", "</s>") becomes its id, and each run of text between them is
  // encoded on its own (so it starts with sentencepiece's dummy prefix). `spans`, if given, gets
  // each token's [begin, end) byte range in `text`; the leading bytes of a character that byte
  // fallback splits get an empty range at the character's start.
  struct TokenSpan {
    int64_t begin, end;
  };
  std::vector<int64_t> encode_with_specials(const std::string& text, std::vector<TokenSpan>* spans = nullptr) const;
  std::string decode(const std::vector<int64_t>& ids) const;
  std::string piece(int64_t id) const;

  int64_t vocab_size() const { return vocab_size_; }
  int64_t bos_id() const { return bos_id_; }  // -1 when the model defines none
  int64_t eos_id() const { return eos_id_; }
  int64_t unk_id() const { return unk_id_; }
  const std::string& path() const { return path_; }

  // Errors (naming the tokenizer file and the model key) unless every token id fits the
  // model's embedding (vocab_size <= model.vocab_size; a larger, padded model vocabulary is fine).
  void check_fits(const ModelConfig& model, const std::string& model_where) const;
  // How this tokenizer's vocabulary differs from `other`'s, e.g. "12 of the pieces differ, the
  // first at id 3 ('a' against 'b')"; "" when every piece and the bos/eos ids agree (the same
  // model file, or one made the same way).
  std::string difference(const Tokenizer& other) const;
  // The same tokenizer as a Hugging Face `tokenizer.json` (the `tokenizers` library; what
  // LlamaTokenizerFast, TGI and other servers load): transformers' LlamaConverter layout in legacy
  // mode (normalizer Prepend + Replace, a BPE model whose merges rank the pieces by sentencepiece
  // score, byte fallback, BOS added by the post-processor). It encodes as encode_with_specials:
  // unk/BOS/EOS written out become their ids; other control pieces are never read from text, as
  // sentencepiece never does. "" with `why_not` set for a model that file cannot reproduce: a
  // unigram model, a normalization rule (nmt_nfkc, ...), removed extra whitespace, whitespace as
  // a suffix, user-defined pieces (which transformers' legacy layout tokenizes differently after
  // them), control pieces beyond unk/BOS/EOS (which transformers' conversion reads from text).
  std::string hf_tokenizer_json(std::string* why_not = nullptr) const;

 private:
  Tokenizer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
  int64_t vocab_size_ = 0, bos_id_ = -1, eos_id_ = -1, unk_id_ = -1;
};

// Trains a sentencepiece model on `lines` (its sentences; each is freed as the trainer takes it,
// so pass them with std::move) with spm_train's flag string `args`
// ("--vocab_size=8000 --model_type=bpe ..."; no --input or --model_prefix) and writes it to
// `model_path` atomically (making its folder, once trained). The file depends only on the lines and the flags
// (sentencepiece's
// --num_threads among them), not on file names or the time.
void train_sentencepiece(std::vector<std::string> lines, const std::string& args, const std::string& model_path);

// The sentencepiece module libllm loads at run time (lib/libllm_sentencepiece.so of its install;
// loaded now if it was not): $LIBLLM_SENTENCEPIECE_SHIM, else found by name through the program's
// run path (libllm's CMake package adds its lib/) and LD_LIBRARY_PATH, else in lib/ beside the
// program's bin/, else where libllm was configured to install it. An Error names what was tried.
std::string sentencepiece_module_path();

}  // namespace libllm
