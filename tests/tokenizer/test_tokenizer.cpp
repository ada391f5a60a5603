// The sentencepiece tokenizer: ids as the Python sentencepiece library gives them, and errors.
#include "../catch_torch.h"

#include <algorithm>

#include "../common.h"
#include "libllm/error.h"
#include "libllm/model_config.h"
#include "libllm/tokenizer.h"

using namespace libllm;
using libllm::test::expected;
using libllm::test::fixture;

TEST_CASE("encodes like the Python sentencepiece library, LLaMA special ids", "[tokenizer]") {
  const Tokenizer tok = Tokenizer::load(fixture("tokenizer.model"));
  const auto& e = expected()["tokenizer"];
  CHECK(tok.vocab_size() == e["vocab_size"].get<int64_t>());
  CHECK(tok.unk_id() == 0);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);
  for (auto& [text, ids] : e["encode"].items()) {
    INFO(text);
    CHECK(tok.encode(text) == ids.get<std::vector<int64_t>>());
    CHECK(tok.decode(tok.encode(text)) == text);  // byte fallback: lossless for any UTF-8
  }
}

TEST_CASE("encode_with_specials: written-out special tokens become ids, each text run is encoded alone", "[tokenizer]") {
  const Tokenizer tok = Tokenizer::load(fixture("tokenizer.model"));
  auto cat = [](std::vector<int64_t> a, const std::vector<int64_t>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  const std::string text = "<s>one two</s>\nthree<unk><s></s>";
  std::vector<Tokenizer::TokenSpan> spans;
  const auto ids = tok.encode_with_specials(text, &spans);
  std::vector<int64_t> want = cat({1}, tok.encode("one two"));
  want = cat(cat(want, {2}), tok.encode("\nthree"));  // a run after a special token gets its own dummy prefix
  want = cat(want, {0, 1, 2});
  CHECK(ids == want);
  REQUIRE(spans.size() == ids.size());
  CHECK((spans.front().begin == 0 && spans.front().end == 3));  // "<s>"
  CHECK((spans.back().begin == 28 && spans.back().end == 32));  // the last "</s>"
  // Every token's span lies in the text, in order; the non-empty ones spell the text out.
  std::string spelled;
  for (size_t i = 0; i < spans.size(); ++i) {
    CHECK(spans[i].begin <= spans[i].end);
    CHECK(spans[i].end <= static_cast<int64_t>(text.size()));
    if (i > 0) CHECK(spans[i].begin >= spans[i - 1].end);
    spelled += text.substr(spans[i].begin, spans[i].end - spans[i].begin);
  }
  CHECK(spelled == text);
  CHECK(tok.encode_with_specials("plain text") == tok.encode("plain text"));
  CHECK(tok.encode_with_specials("").empty());
}

TEST_CASE("control pieces are never read from text, user-defined ones always (as sentencepiece)", "[tokenizer]") {
  // tokenizer-control.model: [INST] and [/INST] are control pieces 3 and 4, <|im_start|> and
  // <|im_end|> user-defined pieces 5 and 6 (tests/fixtures/make_fixtures.py checks the same with
  // Python's sentencepiece; tests/parity/check_export.py compares transformers' tokenizers).
  const Tokenizer tok = Tokenizer::load(fixture("tokenizer-control.model"));
  CHECK(tok.piece(3) == "[INST]");
  const auto inst = tok.encode_with_specials("<s>[INST] hi [/INST]");
  CHECK(inst.front() == 1);
  CHECK(std::find(inst.begin(), inst.end(), 3) == inst.end());
  CHECK(std::find(inst.begin(), inst.end(), 4) == inst.end());
  const auto im = tok.encode_with_specials("<|im_start|>user\nhi<|im_end|>");
  CHECK(std::count(im.begin(), im.end(), 5) == 1);
  CHECK(std::count(im.begin(), im.end(), 6) == 1);
}

TEST_CASE("missing or corrupt tokenizer files and a vocabulary larger than the model are errors",
          "[tokenizer]") {
  const auto err = test::error_of;
  CHECK_THAT(err([] { Tokenizer::load("/nonexistent/tokenizer.model"); }), Catch::Contains("tokenizer file not found"));
  test::TempDir tmp;
  std::ofstream(tmp / "junk.model") << "this is not a protobuf";
  CHECK_THAT(err([&] { Tokenizer::load(tmp / "junk.model"); }), Catch::Contains("not a valid sentencepiece model"));
  const Tokenizer tok = Tokenizer::load(fixture("tokenizer.model"));
  ModelConfig small;
  small.vocab_size = 100;
  CHECK_THAT(err([&] { tok.check_fits(small, "m"); }),
             Catch::Contains("tokenizer has 384 tokens but the model (m) has vocab_size 100"));
  ModelConfig padded;
  padded.vocab_size = 512;  // a padded embedding is fine
  CHECK_NOTHROW(tok.check_fits(padded, "m"));
}
