// The sentencepiece tokenizer: ids as the Python sentencepiece library gives them, and errors.
#include "../catch_torch.h"

#include <fmt/core.h>

#include <algorithm>
#include <climits>
#include <map>

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

namespace {

// Hugging Face tokenizers' encoding pipeline for the layout Tokenizer::hf_tokenizer_json writes,
// written here from the library's documented semantics (the reference for that file): added
// tokens are split out of the raw text first (leftmost, then longest); each other run is
// normalized (Prepend "▁" when not empty, then every " " replaced by "▁") and BPE-encoded as
// one word: its characters (one not in the vocabulary as its UTF-8 bytes' <0xXX> pieces), then
// the adjacent pair of lowest merge rank, leftmost on ties, merged until no pair has a rank.
struct HfBpe {
  std::map<std::string, int64_t> vocab;
  std::map<std::pair<int64_t, int64_t>, std::pair<int64_t, int64_t>> merges;  // pair -> (rank, merged id)
  std::vector<std::pair<std::string, int64_t>> added;
  std::vector<std::string> pieces;
  bool prepend = false;

  explicit HfBpe(const nlohmann::json& j) {
    for (const auto& [piece, id] : j["model"]["vocab"].items()) vocab[piece] = id.get<int64_t>();
    pieces.resize(vocab.size());
    for (const auto& [piece, id] : vocab) pieces.at(id) = piece;
    int64_t rank = 0;
    for (const auto& m : j["model"]["merges"]) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      const std::string l = s.substr(0, sp), r = s.substr(sp + 1);
      merges[{vocab.at(l), vocab.at(r)}] = {rank++, vocab.at(l + r)};
    }
    for (const auto& a : j["added_tokens"]) added.emplace_back(a["content"].get<std::string>(), a["id"].get<int64_t>());
    for (const auto& n : j["normalizer"]["normalizers"]) prepend = prepend || n["type"] == "Prepend";
  }

  std::vector<int64_t> word(const std::string& text) const {
    std::string s = prepend && !text.empty() ? "\u2581" + text : text;
    for (size_t at = 0; (at = s.find(' ', at)) != std::string::npos;) s.replace(at, 1, "\u2581");
    std::vector<int64_t> syms;
    for (size_t i = 0; i < s.size();) {
      size_t n = 1;
      while (i + n < s.size() && (s[i + n] & 0xC0) == 0x80) ++n;
      const auto it = vocab.find(s.substr(i, n));
      if (it != vocab.end()) {
        syms.push_back(it->second);
      } else {
        for (size_t b = 0; b < n; ++b)
          syms.push_back(vocab.at(fmt::format("<0x{:02X}>", static_cast<uint8_t>(s[i + b]))));
      }
      i += n;
    }
    for (;;) {
      size_t best = syms.size();
      std::pair<int64_t, int64_t> best_merge{INT64_MAX, -1};
      for (size_t i = 0; i + 1 < syms.size(); ++i) {
        const auto it = merges.find({syms[i], syms[i + 1]});
        if (it != merges.end() && it->second.first < best_merge.first) best = i, best_merge = it->second;
      }
      if (best == syms.size()) return syms;
      syms[best] = best_merge.second;
      syms.erase(syms.begin() + static_cast<std::ptrdiff_t>(best) + 1);
    }
  }

  std::vector<int64_t> encode(const std::string& text) const {
    std::vector<int64_t> out;
    size_t run = 0;
    for (size_t i = 0; i < text.size();) {
      const std::pair<std::string, int64_t>* hit = nullptr;
      for (const auto& a : added)
        if (text.compare(i, a.first.size(), a.first) == 0 && (!hit || a.first.size() > hit->first.size())) hit = &a;
      if (!hit) {
        ++i;
        continue;
      }
      const auto w = word(text.substr(run, i - run));
      out.insert(out.end(), w.begin(), w.end());
      out.push_back(hit->second);
      i += hit->first.size();
      run = i;
    }
    const auto w = word(text.substr(run));
    out.insert(out.end(), w.begin(), w.end());
    return out;
  }

  // The decoder: pieces joined, "▁" as " ", <0xXX> runs as their bytes, one leading space dropped.
  std::string decode(const std::vector<int64_t>& ids) const {
    std::string s;
    for (int64_t id : ids) {
      const std::string& p = pieces.at(id);
      if (p.size() == 6 && p.rfind("<0x", 0) == 0 && p.back() == '>') {
        s += static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16));
      } else {
        for (size_t at = 0; at < p.size();) {
          if (p.compare(at, 3, "\u2581") == 0)
            s += ' ', at += 3;
          else
            s += p[at++];
        }
      }
    }
    return prepend && !s.empty() && s[0] == ' ' ? s.substr(1) : s;
  }
};

std::vector<std::string> fortune_lines(const std::string& file, size_t from, size_t count) {
  std::ifstream in(file);
  std::vector<std::string> lines;
  std::string line;
  for (size_t i = 0; std::getline(in, line) && lines.size() < count; ++i)
    if (i >= from && !line.empty() && line != "%") lines.push_back(line);
  return lines;
}

}  // namespace

TEST_CASE("hf_tokenizer_json: Hugging Face's BPE with that file encodes and decodes as sentencepiece", "[tokenizer]") {
  // A 1000-piece tokenizer trained as llm-data trains one (on fortunes, Debian's package), and
  // the 384-piece fixture; text the first was trained on and text it was not.
  const std::string fortunes = "/usr/share/games/fortunes/";
  REQUIRE(std::filesystem::exists(fortunes + "computers"));
  test::TempDir tmp;
  const std::string trained = tmp / "bpe.model";
  train_sentencepiece(fortune_lines(fortunes + "computers", 0, 5000),
                      "--vocab_size=1000 --model_type=bpe --character_coverage=0.9995 --byte_fallback=true "
                      "--unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --normalization_rule_name=identity "
                      "--remove_extra_whitespaces=false --split_digits=true --allow_whitespace_only_pieces=true "
                      "--input_sentence_size=100000 --max_sentence_length=4192 --shuffle_input_sentence=false "
                      "--num_threads=1 --minloglevel=2",
                      trained);
  std::vector<std::string> texts = fortune_lines(fortunes + "computers", 0, 300);  // (seen in training)
  for (const std::string& t : fortune_lines(fortunes + "literature", 0, 1000)) texts.push_back(t);
  for (const char* t :
       {"", " ", "a", "  two leading spaces", "trailing  ", "tabs\tand\nnew\n\nlines", "digits 2026-11-24 3.14159",
        "unicode: h\u00e9llo w\u00f6rld \u2014 \u201cquotes\u201d \u65e5\u672c\u8a9e \U0001F642 \u00a0nbsp",
        "<s>hi</s>", "a<unk>b<s", "</s></s> x", "\u2581already\u2581escaped", "    indented code(x);"})
    texts.push_back(t);
  for (const std::string& path : {trained, fixture("tokenizer.model")}) {
    INFO(path);
    const Tokenizer tok = Tokenizer::load(path);
    std::string why;
    const std::string text = tok.hf_tokenizer_json(&why);
    REQUIRE(why.empty());
    const auto j = nlohmann::json::parse(text);
    CHECK(j["model"]["type"] == "BPE");
    CHECK(j["model"]["byte_fallback"] == true);
    CHECK(j["model"]["vocab"].size() == static_cast<size_t>(tok.vocab_size()));
    CHECK(j["added_tokens"].size() == 3);  // unk, BOS, EOS
    CHECK(j["post_processor"]["single"][0]["SpecialToken"]["id"] == "<s>");
    const HfBpe hf(j);
    CHECK(hf.merges.size() > (path == trained ? 600u : 20u));
    size_t checked = 0;
    for (const std::string& t : texts) {
      INFO(t);
      const auto ids = tok.encode_with_specials(t);
      CHECK(hf.encode(t) == ids);
      const auto plain = tok.encode(t);
      CHECK(hf.decode(plain) == tok.decode(plain));
      ++checked;
    }
    CHECK(checked > 1000);
  }
}

TEST_CASE("hf_tokenizer_json: models it cannot reproduce are named with the reason", "[tokenizer]") {
  std::string why = "unset";
  CHECK(Tokenizer::load(fixture("tokenizer-control.model")).hf_tokenizer_json(&why).empty());
  CHECK_THAT(why, Catch::Contains("control pieces ('[INST]')"));  // (ids 3, 4: before its user-defined ones)
  test::TempDir tmp;
  const std::string unigram = tmp / "unigram.model";
  train_sentencepiece(fortune_lines("/usr/share/games/fortunes/literature", 0, 1000),
                      "--vocab_size=500 --model_type=unigram --byte_fallback=true --num_threads=1 --minloglevel=2",
                      unigram);
  CHECK(Tokenizer::load(unigram).hf_tokenizer_json(&why).empty());
  CHECK_THAT(why, Catch::Contains("it is a unigram model"));
  auto bpe = [&](const std::string& name, const std::string& flags) {
    const std::string path = tmp / name;
    train_sentencepiece(fortune_lines("/usr/share/games/fortunes/literature", 0, 1000),
                        "--vocab_size=400 --model_type=bpe --byte_fallback=true --normalization_rule_name=identity "
                        "--remove_extra_whitespaces=false --num_threads=1 --minloglevel=2 " +
                            flags,
                        path);
    why.clear();
    return Tokenizer::load(path).hf_tokenizer_json(&why);
  };
  CHECK(!bpe("plain.model", "").empty());
  CHECK(bpe("suffix.model", "--treat_whitespace_as_suffix=true").empty());
  CHECK_THAT(why, Catch::Contains("treat_whitespace_as_suffix"));
  // Mistral's [INST]: transformers' conversion reads it from text, sentencepiece never.
  CHECK(bpe("control.model", "--control_symbols=[INST]").empty());
  CHECK_THAT(why, Catch::Contains("control pieces ('[INST]')"));
  CHECK(bpe("user.model", "--user_defined_symbols=<|im_start|>").empty());
  CHECK_THAT(why, Catch::Contains("user-defined pieces ('<|im_start|>')"));
}
