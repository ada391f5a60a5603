#include "libllm/tokenizer.h"

#include <sentencepiece_processor.h>

#include <filesystem>

#include "libllm/config.h"
#include "libllm/error.h"
#include "libllm/model_config.h"

namespace libllm {

void TokenizerConfig::fields(Fields& f) { f.add("path", path); }

Tokenizer Tokenizer::load(const std::string& path) {
  if (!std::filesystem::is_regular_file(path))
    throw Error(path, "tokenizer file not found",
                "give a sentencepiece tokenizer.model (tokenizer.path in the recipe)");
  Tokenizer t;
  t.sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = t.sp_->Load(path);
  if (!status.ok())
    throw Error(path, "not a valid sentencepiece model: " + status.ToString(),
                "HF folders with only tokenizer.json are not supported; use the tokenizer.model");
  t.path_ = path;
  return t;
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  if (!status.ok()) throw Error(path_, "encoding failed: " + status.ToString());
  return {ids.begin(), ids.end()};
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<int> v;
  v.reserve(ids.size());
  for (int64_t id : ids)
    if (id >= 0 && id < vocab_size()) v.push_back(static_cast<int>(id));
  std::string out;
  const auto status = sp_->Decode(v, &out);
  if (!status.ok()) throw Error(path_, "decoding failed: " + status.ToString());
  return out;
}

std::string Tokenizer::piece(int64_t id) const {
  if (id < 0 || id >= vocab_size()) return "<out of range " + std::to_string(id) + ">";
  return sp_->IdToPiece(static_cast<int>(id));
}

int64_t Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int64_t Tokenizer::bos_id() const { return sp_->bos_id(); }
int64_t Tokenizer::eos_id() const { return sp_->eos_id(); }
int64_t Tokenizer::unk_id() const { return sp_->unk_id(); }

void Tokenizer::check_fits(const ModelConfig& model, const std::string& model_where) const {
  if (vocab_size() > model.vocab_size)
    throw Error(path_, "tokenizer has " + std::to_string(vocab_size()) + " tokens but the model (" +
                           model_where + ") has vocab_size " + std::to_string(model.vocab_size),
                "this tokenizer does not match the model; use the model's own tokenizer.model");
}

}  // namespace libllm
