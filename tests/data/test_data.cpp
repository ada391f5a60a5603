// Data preparation and the packed dataset: SHA-256, token shard sets (format, atomicity,
// determinism), and the mixed, resumable, rank-split window stream.
#include "../catch_torch.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../common.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "libllm/config.h"
#include "libllm/data.h"
#include "libllm/error.h"
#include "libllm/safetensors.h"
#include "libllm/tokenizer.h"

#ifndef LIBLLM_FIXTURES
#define LIBLLM_FIXTURES "/work/main/tests/fixtures"
#endif

using namespace libllm;
using libllm::test::error_of;
namespace fs = std::filesystem;

namespace libllm {
// How Catch prints a WindowRef in a failed check.
inline std::ostream& operator<<(std::ostream& os, const WindowRef& r) { return os << "{" << r.set << ", " << r.window << "}"; }
}  // namespace libllm

namespace {

std::string fixture(const std::string& rel) { return std::string(LIBLLM_FIXTURES) + "/" + rel; }

// A fresh empty folder under the system temp dir, removed when the object dies.
struct Scratch {
  fs::path path;
  Scratch() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("libllm-data-test-" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& rel) const { return (path / rel).string(); }
};

void write_text(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

const Tokenizer& tokenizer() {
  static const Tokenizer tok = Tokenizer::load(fixture("tokenizer.model"));
  return tok;
}

// encode(doc) + EOS for each document, concatenated.
std::vector<int64_t> expected_stream(const std::vector<std::string>& docs) {
  std::vector<int64_t> out;
  for (const auto& d : docs) {
    const auto ids = tokenizer().encode(d);
    out.push_back(tokenizer().bos_id());  // (data_prep.bos: true, the default)
    out.insert(out.end(), ids.begin(), ids.end());
    out.push_back(tokenizer().eos_id());
  }
  return out;
}

std::vector<int64_t> all_tokens(const ShardSet& s) {
  std::vector<int64_t> out(static_cast<size_t>(s.n_tokens()));
  s.read(0, s.n_tokens(), out.data());
  return out;
}

std::vector<uint64_t> read_u64(const std::string& path) {
  const std::string b = read_bytes(path);
  std::vector<uint64_t> out;
  for (size_t i = 0; i + 8 <= b.size(); i += 8) {
    uint64_t v = 0;
    for (int k = 7; k >= 0; --k) v = (v << 8) | static_cast<unsigned char>(b[i + k]);
    out.push_back(v);
  }
  return out;
}

// `n` distinct synthetic documents of varying length.
std::vector<std::string> synthetic_docs(int n, int salt = 0) {
  static const char* words[] = {"the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "far"};
  std::vector<std::string> docs;
  std::mt19937 rng(static_cast<unsigned>(1000 + salt));
  for (int i = 0; i < n; ++i) {
    std::string d = "doc " + std::to_string(salt) + "-" + std::to_string(i) + ":";
    const int len = 1 + static_cast<int>(rng() % 12);
    for (int w = 0; w < len; ++w) d += std::string(" ") + words[rng() % 11];
    docs.push_back(d);
  }
  return docs;
}

// A shard set in `dir` from one .txt file of `docs`, one per line.
ShardSetInfo make_set(const Scratch& tmp, const std::string& name, const std::vector<std::string>& docs,
                      int64_t shard_tokens = 100000000, int64_t threads = 1) {
  std::string text;
  for (const auto& d : docs) text += d + "\n";
  write_text(tmp / (name + "-src/corpus.txt"), text);
  DataPrepConfig cfg;
  cfg.inputs = {tmp / (name + "-src")};
  cfg.output = tmp / name;
  cfg.shard_tokens = shard_tokens;
  cfg.threads = threads;
  return write_shards(cfg, tokenizer());
}

struct Drawn {
  std::vector<int64_t> tokens;
  std::vector<WindowRef> refs;
};

Drawn draw(PackedDataset& ds, int64_t batches, int64_t batch) {
  Drawn d;
  std::vector<int64_t> out;
  std::vector<WindowRef> refs;
  for (int64_t i = 0; i < batches; ++i) {
    ds.next(batch, out, refs);
    d.tokens.insert(d.tokens.end(), out.begin(), out.end());
    d.refs.insert(d.refs.end(), refs.begin(), refs.end());
  }
  return d;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

TEST_CASE("SHA-256 matches the FIPS 180-4 vectors and sha256sum", "[data]") {
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // Padding edge cases: 55 bytes (length fits the block), 56 (it does not), 64 (one full block).
  CHECK(sha256_hex(std::string(55, 'a')) == "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
  CHECK(sha256_hex(std::string(56, 'a')) == "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
  CHECK(sha256_hex(std::string(64, 'a')) == "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
  CHECK(sha256_hex(std::string(1000000, 'a')) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");

  // 1 MiB of bytes (i * 7 + 3) mod 256, hashed from a file (read in chunks); digest from sha256sum.
  Scratch tmp;
  std::string mib(1 << 20, '\0');
  for (size_t i = 0; i < mib.size(); ++i) mib[i] = static_cast<char>((i * 7 + 3) % 256);
  write_text(tmp / "mib.bin", mib);
  CHECK(sha256_file(tmp / "mib.bin") == "172c15dc2e12b50e523d8e657cbe7fbb11c1053252bbf1e1431077d57d8128fd");
  CHECK(sha256_hex(mib) == sha256_file(tmp / "mib.bin"));
  CHECK_THAT(error_of([&] { sha256_file(tmp / "missing"); }), Catch::Contains("missing"));
}

TEST_CASE("write_shards: BOS + encode(doc) + EOS per document, inputs in sorted order, meta and index", "[data]") {
  Scratch tmp;
  write_text(tmp / "corpus/b.txt", "  second file, first line  \n\n\t\nsecond line\r\n");
  write_text(tmp / "corpus/a.jsonl", "{\"text\": \"from jsonl\\nwith a newline\"}\n\n{\"text\": \"   \"}\n"
                                     "{\"text\": \" padded \", \"id\": 7}\n");
  write_text(tmp / "corpus/sub/c.md", "# Markdown title\nbody text\n");
  write_text(tmp / "corpus/.hidden.txt", "never read\n");
  write_text(tmp / "corpus/.git/x.txt", "never read\n");
  write_text(tmp / "corpus/notes.csv", "never,read\n");
  write_text(tmp / "extra.txt", "explicit file last\n");

  DataPrepConfig cfg;
  cfg.inputs = {tmp / "corpus", tmp / "extra.txt"};
  cfg.output = tmp / "shards";
  cfg.threads = 2;
  std::vector<std::pair<int64_t, int64_t>> calls;
  const ShardSetInfo info = write_shards(cfg, tokenizer(), [&](int64_t d, int64_t t) { calls.emplace_back(d, t); });

  const std::vector<std::string> docs = {"from jsonl\nwith a newline", "padded", "second file, first line",
                                         "second line", "# Markdown title", "body text", "explicit file last"};
  const auto want = expected_stream(docs);
  CHECK(info.total_documents == 7);
  CHECK(info.total_tokens == static_cast<int64_t>(want.size()));
  CHECK(info.eos_id == tokenizer().eos_id());
  CHECK(info.vocab_size == tokenizer().vocab_size());
  CHECK(info.tokenizer_sha256 == sha256_file(fixture("tokenizer.model")));
  REQUIRE_FALSE(calls.empty());
  CHECK(calls.back().first == calls.back().second);
  CHECK(calls.back().second == static_cast<int64_t>(fs::file_size(tmp / "corpus/b.txt") + fs::file_size(tmp / "corpus/a.jsonl") +
                                                    fs::file_size(tmp / "corpus/sub/c.md") +
                                                    fs::file_size(tmp / "extra.txt")));

  const ShardSet set = ShardSet::open(cfg.output);
  CHECK(set.n_tokens() == info.total_tokens);
  CHECK(all_tokens(set) == want);
  std::vector<int64_t> mid(3);
  set.read(2, 3, mid.data());
  CHECK(mid == std::vector<int64_t>(want.begin() + 2, want.begin() + 5));
  CHECK_THAT(error_of([&] { set.read(set.n_tokens() - 1, 2, mid.data()); }), Catch::Contains("outside"));

  // The raw format: uint16 little-endian tokens, uint64 document starts, meta.json fields.
  const std::string bin = read_bytes(tmp / "shards/shard-00000.bin");
  REQUIRE(bin.size() == want.size() * 2);
  for (size_t i = 0; i < want.size(); ++i)
    CHECK((static_cast<unsigned char>(bin[2 * i]) | static_cast<unsigned char>(bin[2 * i + 1]) << 8) == want[i]);
  std::vector<uint64_t> starts{0};
  for (size_t i = 0; i + 1 < docs.size(); ++i) starts.push_back(starts.back() + tokenizer().encode(docs[i]).size() + 2);
  CHECK(read_u64(tmp / "shards/shard-00000.idx") == starts);
  const auto meta = nlohmann::json::parse(read_bytes(tmp / "shards/meta.json"));
  CHECK(meta["format"] == "libllm-tokens-v1");
  CHECK(meta["dtype"] == "uint16");
  CHECK(meta["vocab_size"] == tokenizer().vocab_size());
  CHECK(meta["eos_id"] == tokenizer().eos_id());
  CHECK(meta["bos_id"] == tokenizer().bos_id());
  CHECK(tokenizer().bos_id() >= 0);
  CHECK(meta["tokenizer_sha256"] == info.tokenizer_sha256);
  CHECK(meta["total_tokens"] == info.total_tokens);
  CHECK(meta["total_documents"] == 7);
  REQUIRE(meta["shards"].size() == 1);
  CHECK(meta["shards"][0]["file"] == "shard-00000.bin");
  CHECK(meta["shards"][0]["doc_offsets_file"] == "shard-00000.idx");
  CHECK(meta["shards"][0]["documents"] == 7);
  for (const auto& e : fs::directory_iterator(cfg.output))  // no temporary files left behind
    CHECK(e.path().filename().string().find(".tmp-") == std::string::npos);
  // data_prep.bos: false: the documents' tokens and EOS only.
  cfg.bos = false;
  cfg.output = tmp / "no-bos";
  const ShardSetInfo plain = write_shards(cfg, tokenizer());
  CHECK(plain.total_tokens == info.total_tokens - 7);
  CHECK(plain.bos_id == -1);
  CHECK(ShardSet::open(cfg.output).info().bos_id == -1);
  std::vector<int64_t> without;
  for (int64_t t : want)
    if (t != tokenizer().bos_id()) without.push_back(t);
  CHECK(all_tokens(ShardSet::open(cfg.output)) == without);
}

TEST_CASE("write_shards: shards respect shard_tokens and never split a document", "[data]") {
  Scratch tmp;
  std::vector<std::string> docs = synthetic_docs(40);
  docs.insert(docs.begin() + 20, std::string(300, 'x'));  // longer than a shard: a shard of its own
  const int64_t limit = 120;
  const ShardSetInfo info = make_set(tmp, "set", docs, limit);
  const auto meta = nlohmann::json::parse(read_bytes(tmp / "set/meta.json"));
  REQUIRE(meta["shards"].size() > 3);

  const auto want = expected_stream(docs);
  const ShardSet set = ShardSet::open(tmp / "set");
  CHECK(set.n_shards() == static_cast<int64_t>(meta["shards"].size()));
  CHECK(all_tokens(set) == want);

  // Document starts in the stream: each shard begins at one and holds whole documents.
  std::set<int64_t> doc_starts;
  for (int64_t o = 0, i = 0; i < static_cast<int64_t>(docs.size()); ++i) {
    doc_starts.insert(o);
    o += static_cast<int64_t>(tokenizer().encode(docs[static_cast<size_t>(i)]).size()) + 2;  // BOS, EOS
  }
  int64_t offset = 0, documents = 0;
  for (size_t s = 0; s < meta["shards"].size(); ++s) {
    const auto& sh = meta["shards"][s];
    const int64_t n = sh["tokens"];
    INFO("shard " << s << " tokens " << n);
    CHECK(doc_starts.count(offset) == 1);
    const auto idx = read_u64(tmp / ("set/" + sh["doc_offsets_file"].get<std::string>()));
    CHECK(static_cast<int64_t>(idx.size()) == sh["documents"].get<int64_t>());
    REQUIRE_FALSE(idx.empty());
    CHECK(idx[0] == 0);
    for (uint64_t o : idx) CHECK(doc_starts.count(offset + static_cast<int64_t>(o)) == 1);
    if (sh["documents"] == 1)
      CHECK(n >= 1);  // a single document may exceed the limit
    else
      CHECK(n <= limit);
    if (s + 1 < meta["shards"].size()) {  // closed only because the next document did not fit
      const int64_t next_doc_len = static_cast<int64_t>(
          tokenizer().encode(docs[static_cast<size_t>(documents + sh["documents"].get<int64_t>())]).size() + 2);
      CHECK(n + next_doc_len > limit);
    }
    CHECK(want[static_cast<size_t>(offset + n - 1)] == tokenizer().eos_id());
    offset += n;
    documents += sh["documents"].get<int64_t>();
  }
  CHECK(offset == info.total_tokens);
  CHECK(documents == static_cast<int64_t>(docs.size()));
}

TEST_CASE("write_shards: 1 and 4 threads write byte-identical files", "[data]") {
  Scratch tmp;
  const auto docs = synthetic_docs(3000, 1);
  make_set(tmp, "one", docs, 5000, 1);
  DataPrepConfig cfg;
  cfg.inputs = {tmp / "one-src"};  // the same input file
  cfg.output = tmp / "four";
  cfg.shard_tokens = 5000;
  cfg.threads = 4;
  write_shards(cfg, tokenizer());
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(tmp / "one")) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  REQUIRE(names.size() > 5);
  for (const auto& n : names) {
    INFO(n);
    CHECK(read_bytes(tmp / ("one/" + n)) == read_bytes(tmp / ("four/" + n)));
  }
  CHECK(static_cast<size_t>(std::distance(fs::directory_iterator(tmp / "four"), fs::directory_iterator())) ==
        names.size());
}

TEST_CASE("write_shards: paragraph and line documents of .txt/.md", "[data]") {
  Scratch tmp;
  write_text(tmp / "in/p.md", "\n\nFirst para line one\r\n  line two indented\n\n\n  \nSecond para\n   \nThird\nend  \n");
  DataPrepConfig cfg;
  cfg.inputs = {tmp / "in"};
  cfg.output = tmp / "lines";
  cfg.threads = 1;
  write_shards(cfg, tokenizer());
  CHECK(all_tokens(ShardSet::open(tmp / "lines")) ==
        expected_stream({"First para line one", "line two indented", "Second para", "Third", "end"}));
  cfg.output = tmp / "paras";
  cfg.txt_documents = "paragraph";
  const auto info = write_shards(cfg, tokenizer());
  CHECK(info.total_documents == 3);
  CHECK(all_tokens(ShardSet::open(tmp / "paras")) ==
        expected_stream({"First para line one\n  line two indented", "Second para", "Third\nend"}));
  // Fortune files: "%" lines separate; a record of blank lines only is skipped, not the end.
  write_text(tmp / "fortunes/f", "first\n%\n  \n\t\n%\n%\nthird\nline\n%\n");
  cfg.inputs = {tmp / "fortunes"};
  cfg.output = tmp / "fortune-set";
  cfg.txt_documents = "fortune";
  CHECK(write_shards(cfg, tokenizer()).total_documents == 2);
  CHECK(all_tokens(ShardSet::open(tmp / "fortune-set")) == expected_stream({"first", "third\nline"}));
}

TEST_CASE("write_shards: bytes that are not UTF-8 are counted in a note naming the file and line", "[data]") {
  Scratch tmp;
  // Well-formed: 2-, 3- and 4-byte characters. Ill-formed: Latin-1 'é' (E9), an overlong '/'
  // (C0 AF: 2 bytes), a UTF-16 surrogate (ED A0 80: 3 bytes), a cut 3-byte character at the end.
  write_text(tmp / "ok.txt", "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80\n");
  write_text(tmp / "latin1.txt", "fine\ncaf\xE9\n\xC0\xAF \xED\xA0\x80 \xE2\x82\n");
  DataPrepConfig cfg;
  cfg.inputs = {tmp / "ok.txt"};
  cfg.output = tmp / "a";
  CHECK(write_shards(cfg, tokenizer()).notes.empty());
  cfg.inputs = {tmp / "ok.txt", tmp / "latin1.txt"};
  cfg.output = tmp / "b";
  const auto notes = write_shards(cfg, tokenizer()).notes;
  REQUIRE(notes.size() == 1);
  CHECK_THAT(notes[0], Catch::StartsWith(tmp / "latin1.txt" + ": 8 bytes are not UTF-8 (the first on line 2)") &&
                           Catch::Contains("iconv"));
}

TEST_CASE("sample_lines: a seeded uniform sample of every input's lines, in corpus order", "[data]") {
  Scratch tmp;
  std::string a, b;
  for (int i = 0; i < 150; ++i) a += "a" + std::to_string(2 * i) + "\na" + std::to_string(2 * i + 1) + "\n\n";
  for (int i = 0; i < 300; ++i) b += "b" + std::to_string(i) + "\n";
  b += std::string(50, 'x') + "\n  \n";  // over max_bytes, and blank: never sampled
  write_text(tmp / "in/a.md", a);        // paragraphs of two lines: each line is a sentencepiece sentence
  write_text(tmp / "in/b.txt", b);
  DataPrepConfig cfg;
  cfg.inputs = {tmp / "in"};
  cfg.txt_documents = "paragraph";
  int64_t seen = 0;
  const auto s = sample_lines(cfg, 60, 40, &seen);
  CHECK(seen == 600);
  REQUIRE(s.size() == 60);
  CHECK(sample_lines(cfg, 60, 40) == s);  // the same sample every time
  // Both sources, about half each (binomial: 30 +- 3.9), in corpus order (a* before b*, ascending).
  const auto from_a = std::count_if(s.begin(), s.end(), [](const std::string& d) { return d[0] == 'a'; });
  CHECK(from_a >= 15);
  CHECK(from_a <= 45);
  auto index = [](const std::string& d) { return (d[0] == 'b' ? 1000 : 0) + std::stoi(d.substr(1)); };
  for (size_t i = 1; i < s.size(); ++i) CHECK(index(s[i - 1]) < index(s[i]));
  CHECK(index(s.back()) > 1150);                      // reaches into the second half of b
  CHECK(sample_lines(cfg, 1000, 40).size() == 600);   // all of them
  CHECK(sample_lines(cfg, 1000, 100).size() == 601);  // the long line too
  CHECK(sample_lines(cfg, 0, 40).empty());
}

TEST_CASE("write_shards: bad inputs and config are errors naming the file or key", "[data]") {
  Scratch tmp;
  DataPrepConfig cfg;
  cfg.output = tmp / "out";
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("data_prep.inputs"));
  cfg.inputs = {tmp / "nope.txt"};
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("nope.txt") && Catch::Contains("not found"));
  write_text(tmp / "data.csv", "a,b\n");
  cfg.inputs = {tmp / "data.csv"};
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("unsupported"));
  write_text(tmp / "bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": 5}\n");
  cfg.inputs = {tmp / "bad.jsonl"};
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("bad.jsonl:2"));
  write_text(tmp / "broken.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": \"unterminated}\n");
  cfg.inputs = {tmp / "broken.jsonl"};
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("broken.jsonl:3") && Catch::Contains("invalid JSON"));
  write_text(tmp / "packed.txt", std::string("fine\n\x1f\x8b\x08\0\x01", 10) + "\n");  // (a gzip renamed)
  cfg.inputs = {tmp / "packed.txt"};
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }),
             Catch::Contains("packed.txt:2: holds a NUL byte") && Catch::Contains("check data_prep.inputs"));
  write_text(tmp / "utf16.txt", std::string("\xFF\xFEh\0i\0\n\0", 8));  // (Windows Notepad's "Unicode": NULs too)
  cfg.inputs = {tmp / "utf16.txt"};
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }),
             Catch::Contains("utf16.txt: is UTF-16 text") && Catch::Contains("iconv -f UTF-16 -t UTF-8"));
  write_text(tmp / "blank.txt", "\n  \n");
  cfg.inputs = {tmp / "blank.txt"};
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("no documents"));
  CHECK_FALSE(fs::exists(tmp / "out/meta.json"));
  // A held-out split: its own folder, and at least valid_every documents to take one from.
  write_text(tmp / "three.txt", "one\ntwo\nthree\n");
  cfg.inputs = {tmp / "three.txt"};
  cfg.valid_every = 2;
  cfg.output = tmp / "fresh";  // (not there yet: "fresh/" names it too)
  cfg.valid_output = tmp / "fresh/";
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }),
             Catch::Contains("data_prep.valid_output") && Catch::Contains("folder of its own"));
  cfg.valid_output = tmp / "valid";
  CHECK(write_shards(cfg, tokenizer()).total_documents == 2);
  CHECK(ShardSet::open(tmp / "fresh").info().total_documents == 2);
  CHECK(ShardSet::open(tmp / "valid").info().total_documents == 1);
  cfg.valid_every = 4;
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }),
             Catch::Contains("data_prep.valid_every: is 4, and the inputs hold 3 documents: none is held out"));
  cfg.valid_every = 1;
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }),
             Catch::Contains("data_prep.valid_every: is 1: every document would be held out"));
  // The failed runs left the sets written before them as they were.
  CHECK(ShardSet::open(tmp / "fresh").info().total_documents == 2);
  CHECK(ShardSet::open(tmp / "valid").info().total_documents == 1);

  // The same new folder spelled two ways (relative, absolute) is one folder.
  cfg.valid_every = 2;
  cfg.output = tmp / "same";
  cfg.valid_output = fs::relative(tmp / "same").string();
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }),
             Catch::Contains("data_prep.valid_output: is data_prep.output's folder"));
  // A '..' is taken where the kernel takes it (a folder of documents named so is refused as such).
  write_text(tmp / "docs/notes.txt", "mine\n");
  cfg.valid_output = tmp / "docs/new/..";
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("holds 'notes.txt'"));
  CHECK_FALSE(fs::exists(tmp / "docs/new"));
  // Another run's staging folder is refused.
  cfg.valid_output = tmp / "valid/.llm-data-staging/x";
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("is inside llm-data's staging folder"));
  CHECK_FALSE(fs::exists(tmp / "same"));

  // A failure part-way removes the folders the run created, deepest first (one new folder holds
  // the other), and the lock file it made in an empty folder that was there; nothing else.
  cfg.inputs = {tmp / "three.txt", tmp / "bad.jsonl"};
  for (const auto& [out, valid] : {std::pair{"o/train", "o/valid"}, {"p", "p/valid"}, {"q/valid/train", "q/valid"}}) {
    cfg.output = tmp / out;
    cfg.valid_output = tmp / valid;
    CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("bad.jsonl:2"));
    CHECK_FALSE(fs::exists(tmp / std::string(out).substr(0, 1)));
  }
  fs::create_directories(tmp / "empty");
  cfg.output = tmp / "empty";
  cfg.valid_output = tmp / "empty-valid";
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("bad.jsonl:2"));
  CHECK(fs::is_directory(tmp / "empty"));
  CHECK(fs::is_empty(tmp / "empty"));
  CHECK_FALSE(fs::exists(tmp / "empty-valid"));
  // A symbolic link on the way, even one to nothing, is the user's: a failed run leaves it.
  fs::create_symlink(tmp / "nowhere", tmp / "link");
  cfg.output = tmp / "link";
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("cannot create folder"));
  cfg.output = tmp / "link/train";
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("cannot create folder"));
  CHECK(fs::is_symlink(tmp / "link"));
  CHECK_FALSE(fs::exists(tmp / "empty-valid"));
}

TEST_CASE("write_shards: never into a folder holding other files: skipped file types are noted", "[data]") {
  Scratch tmp;
  write_text(tmp / "docs/a.txt", "one\ntwo\nthree\nfour\n");
  write_text(tmp / "docs/manual.pdf", "%PDF-1.4");
  write_text(tmp / "docs/sub/b.md", "five\n");
  write_text(tmp / "docs/sub/README", "six\n");
  DataPrepConfig cfg;
  cfg.inputs = {tmp / "docs"};
  // Into the documents' own folder, or a run folder: refused before anything is written.
  cfg.output = tmp / "docs";
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }),
             Catch::Contains("data_prep.output: " + tmp / "docs" +
                             " holds 'a.txt' (and 2 more), which is not part of a shard set") &&
                 Catch::Contains("give the shard set a folder of its own"));
  CHECK(test::listing(tmp / "docs") == std::vector<std::string>{"a.txt", "manual.pdf", "sub"});
  // A set's folder may hold the held-out set's folder and the tokenizer of this run.
  cfg.output = tmp / "out";
  cfg.valid_output = tmp / "out/valid";
  cfg.valid_every = 2;
  fs::create_directories(tmp / "out/valid");
  fs::copy_file(fixture("tokenizer.model"), tmp / "out/tokenizer.model");
  const Tokenizer tok = Tokenizer::load(tmp / "out/tokenizer.model");
  const std::string printed = test::stdout_of([&] { CHECK(write_shards(cfg, tok).total_documents == 3); });
  CHECK(ShardSet::open(tmp / "out/valid").info().total_documents == 2);
  // The types it does not read are named (the file without an extension: only fortune mode reads it).
  CHECK_THAT(printed, Catch::Contains("note: skipped 2 file(s) of other types in data_prep.inputs' folders (llm-data "
                                      "reads .txt, .md and .jsonl): " +
                                      fs::path(tmp / "docs/manual.pdf").generic_string() + ", " +
                                      fs::path(tmp / "docs/sub/README").generic_string() + "\n"));
  // Written again over its own set: replaced; without the held-out set its folder (a shard set)
  // and hidden files may stay.
  CHECK(write_shards(cfg, tok).total_documents == 3);
  write_text(tmp / "out/.gitkeep", "");
  cfg.valid_every = 0;
  cfg.valid_output.clear();
  CHECK(write_shards(cfg, tok).total_documents == 5);
  // A folder of files without an extension only: the hint names fortune mode.
  write_text(tmp / "fortunes/zippy", "a\n%\nb\n");
  cfg.inputs = {tmp / "fortunes"};
  cfg.valid_every = 0;
  CHECK_THAT(error_of([&] { write_shards(cfg, tok); }), Catch::Contains("folder has no .txt, .md or .jsonl files") &&
                                                            Catch::Contains("data_prep.txt_documents: fortune"));
}

TEST_CASE("write_shards: a second writer of the same folder is refused while the first runs", "[data]") {
  // (it would remove the first one's staging folder; the lock is an flock, released with the process)
  Scratch tmp;
  make_set(tmp, "set", synthetic_docs(20));
  const int fd = ::open((tmp / "set/.llm-data.lock").c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);  // (another llm-data, as far as the folder can tell)
  CHECK_THAT(error_of([&] { make_set(tmp, "set", synthetic_docs(30)); }),
             Catch::Contains(tmp / "set") &&
                 Catch::Contains("another llm-data is writing a shard set into this folder") &&
                 Catch::Contains("give this one another data_prep.output"));
  CHECK(ShardSet::open(tmp / "set").info().total_documents == 20);  // (untouched)
  ::close(fd);
  make_set(tmp, "set", synthetic_docs(30));
  CHECK(ShardSet::open(tmp / "set").info().total_documents == 30);
}

TEST_CASE("write_shards: the training and held-out folders are locked in the order of their paths", "[data]") {
  // (two runs given the same folders the other way round: the second is refused at the first
  // folder both want, not after taking the other)
  Scratch tmp;
  write_text(tmp / "src/corpus.txt", "one\ntwo\nthree\nfour\n");
  fs::create_directories(tmp / "a-valid");
  fs::create_directories(tmp / "z-train");
  std::vector<int> fds;
  for (const char* dir : {"a-valid", "z-train"}) {
    fds.push_back(::open((tmp / (std::string(dir) + "/.llm-data.lock")).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666));
    REQUIRE(::flock(fds.back(), LOCK_EX | LOCK_NB) == 0);
  }
  DataPrepConfig cfg;
  cfg.inputs = {tmp / "src"};
  cfg.output = tmp / "z-train";
  cfg.valid_output = tmp / "a-valid";
  cfg.valid_every = 2;
  cfg.threads = 1;
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }),
             Catch::Contains(tmp / "a-valid") && Catch::Contains("give this one another data_prep.valid_output"));
  for (const int fd : fds) ::close(fd);
  CHECK(write_shards(cfg, tokenizer()).total_documents == 2);

  // A run refused at its second folder removes the folders it created for the first.
  REQUIRE(::flock(fds[0] = ::open((tmp / "a-valid/.llm-data.lock").c_str(), O_RDWR | O_CLOEXEC), LOCK_EX | LOCK_NB) ==
          0);
  cfg.output = tmp / "0-new/train/";
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains(tmp / "a-valid"));
  CHECK_FALSE(fs::exists(tmp / "0-new"));
  fs::create_directories(tmp / "1-old");  // (a folder that was there stays)
  cfg.output = tmp / "1-old/train";
  CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains(tmp / "a-valid"));
  CHECK(fs::is_directory(tmp / "1-old"));
  CHECK_FALSE(fs::exists(tmp / "1-old/train"));
  ::close(fds[0]);
}

TEST_CASE("write_shards: a failure part-way leaves the previous set whole and no temporary files", "[data]") {
  Scratch tmp;
  // More than one tokenizer batch (4 MiB per thread) of good lines, so a shard is open when the bad line comes.
  std::string text;
  const std::string line = "{\"text\": \"" + std::string(100, 'a') + "\"}\n";
  while (text.size() < (5u << 20)) text += line;
  write_text(tmp / "big.jsonl", text + "{\"no_text\": 1}\n");
  DataPrepConfig cfg;
  cfg.inputs = {tmp / "big.jsonl"};
  cfg.output = tmp / "out";
  cfg.threads = 1;
  SECTION("into a new folder: no set, and no folder") {
    CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("big.jsonl:"));
    CHECK_FALSE(fs::exists(tmp / "out"));
    return;
  }
  SECTION("over an earlier set: the earlier set, untouched") {
    const auto docs = synthetic_docs(7, 3);
    make_set(tmp, "out", docs, 20);  // several shards
    const int64_t shards = ShardSet::open(tmp / "out").n_shards();
    REQUIRE(shards > 1);
    CHECK_THAT(error_of([&] { write_shards(cfg, tokenizer()); }), Catch::Contains("big.jsonl:"));
    const ShardSet kept = ShardSet::open(tmp / "out");
    CHECK(kept.n_shards() == shards);
    CHECK(all_tokens(kept) == expected_stream(docs));
  }
  std::vector<std::string> left;  // nothing of the failed run: no temporaries, no staging folder
  for (const auto& e : fs::directory_iterator(tmp / "out"))  // (the writers' lock file stays, hidden)
    if (e.path().filename().string().rfind("shard-", 0) != 0 && e.path().filename() != "meta.json" &&
        e.path().filename() != ".llm-data.lock")
      left.push_back(e.path().filename().string());
  CHECK(left.empty());
}

TEST_CASE("a shard truncated while it is read ends the process with an error naming it", "[data]") {
  Scratch tmp;
  make_set(tmp, "set", synthetic_docs(50), 200);
  const ShardSet set = ShardSet::open(tmp / "set");
  fs::resize_file(tmp / "set/shard-00001.bin", 0);  // another program rewrites it meanwhile
  int err[2];
  REQUIRE(::pipe(err) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {  // reads the shard's tokens, now past the end of its file: a bus error
    ::dup2(err[1], 2);
    std::vector<int64_t> out(static_cast<size_t>(set.n_tokens()));
    set.read(0, set.n_tokens(), out.data());
    ::_exit(0);
  }
  ::close(err[1]);
  std::string text;
  char buf[512];
  for (ssize_t n; (n = ::read(err[0], buf, sizeof(buf))) > 0;) text.append(buf, static_cast<size_t>(n));
  ::close(err[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);
  CHECK_THAT(text, Catch::Contains("shard-00001.bin: the file shrank while it was mapped"));
}

TEST_CASE("incomplete or damaged shard sets are errors that say to re-run", "[data]") {
  Scratch tmp;
  make_set(tmp, "set", synthetic_docs(50), 200);
  REQUIRE_NOTHROW(ShardSet::open(tmp / "set"));
  CHECK_THAT(error_of([&] { ShardSet::open(tmp / "absent"); }), Catch::Contains("not found"));
  // The user's documents named where their shard set goes: how to make one.
  write_text(tmp / "docs/policy.md", "text\n");
  for (const std::string& p : {tmp / "docs", tmp / "docs/policy.md"})
    CHECK_THAT(error_of([&] { ShardSet::open(p); }),
               Catch::Contains("list the documents in data_prep.inputs, run llm-data, and name its data_prep.output"));
  CHECK_THAT(error_of([&] { ShardSet::open(tmp / "docs"); }), Catch::Contains("holds documents, not a shard set"));
  // A relative path that is not there says where it was looked for.
  CHECK_THAT(error_of([&] { ShardSet::open("no-such-set/train"); }),
             Catch::Contains("no-such-set/train: shard-set folder not found (a relative path, from the working "
                             "directory " +
                             fs::current_path().string() + ")"));

  SECTION("no meta.json: an interrupted run") {
    fs::remove(tmp / "set/meta.json");
    const std::string e = error_of([&] { ShardSet::open(tmp / "set"); });
    CHECK_THAT(e, Catch::Contains("meta.json") && Catch::Contains("re-run"));
  }
  SECTION("a truncated shard") {
    fs::resize_file(tmp / "set/shard-00001.bin", fs::file_size(tmp / "set/shard-00001.bin") - 2);
    const std::string e = error_of([&] { ShardSet::open(tmp / "set"); });
    CHECK_THAT(e, Catch::Contains("shard-00001.bin") && Catch::Contains("truncated") && Catch::Contains("re-run"));
  }
  SECTION("a missing index") {
    fs::remove(tmp / "set/shard-00000.idx");
    CHECK_THAT(error_of([&] { ShardSet::open(tmp / "set"); }), Catch::Contains("shard-00000.idx"));
  }
  SECTION("garbage meta.json") {
    write_text(tmp / "set/meta.json", "{\"format\": \"libllm-tokens-v1\"");
    CHECK_THAT(error_of([&] { ShardSet::open(tmp / "set"); }), Catch::Contains("invalid JSON"));
  }
  SECTION("a token outside the vocabulary (a damaged or foreign shard): named when read") {
    {
      std::fstream f(tmp / "set/shard-00001.bin", std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(6);  // token 3 of the shard
      const char big[2] = {'\xff', '\xff'};
      f.write(big, 2);
    }
    const ShardSet set = ShardSet::open(tmp / "set");  // (sizes agree: it opens)
    std::vector<int64_t> out(static_cast<size_t>(set.n_tokens()));
    CHECK_THAT(error_of([&] { set.read(0, set.n_tokens(), out.data()); }),
               Catch::Contains("shard-00001.bin: token 65535 (at token 3 of the shard) is outside the vocabulary of") &&
                   Catch::Contains("re-run"));
  }
  SECTION("meta.json's vocab_size bounds read()'s check: outside the dtype's range, it is an error") {
    auto meta = nlohmann::json::parse(read_bytes(tmp / "set/meta.json"));
    for (int64_t bad : {int64_t{0}, int64_t{70000}}) {
      meta["vocab_size"] = bad;
      write_text(tmp / "set/meta.json", meta.dump());
      CHECK_THAT(error_of([&] { ShardSet::open(tmp / "set"); }),
                 Catch::Contains("meta.json: vocab_size: " + std::to_string(bad) +
                                 " is outside [1, 65536] for uint16 tokens") &&
                     Catch::Contains("re-run"));
    }
    meta["vocab_size"] = 3;  // (the eos id 2 fits; a bos id would not)
    meta["bos_id"] = 5;
    write_text(tmp / "set/meta.json", meta.dump());
    CHECK_THAT(error_of([&] { ShardSet::open(tmp / "set"); }),
               Catch::Contains("meta.json: bos_id: 5 is outside the vocabulary of 3"));
  }
  SECTION("re-writing a folder replaces the old shard set, stale shards included") {
    const auto docs = synthetic_docs(5, 9);
    write_text(tmp / "set/shard-00099.bin", "stale");
    make_set(tmp, "set", docs);  // same output folder, one shard now
    CHECK_FALSE(fs::exists(tmp / "set/shard-00001.bin"));
    CHECK_FALSE(fs::exists(tmp / "set/shard-00099.bin"));
    CHECK(all_tokens(ShardSet::open(tmp / "set")) == expected_stream(docs));
  }
}

TEST_CASE("shard sets record each file's XXH64: verify() finds a changed byte and names the file", "[data]") {
  Scratch tmp;
  make_set(tmp, "set", synthetic_docs(50), 200);
  auto meta = nlohmann::json::parse(read_bytes(tmp / "set/meta.json"));
  REQUIRE(meta["shards"].size() >= 3);
  // The writer hashes as it writes; the reference is one call on each whole file (XXH64 itself is
  // checked against xxhsum in the safetensors tests).
  int64_t bytes = 0;
  for (const auto& shard : meta["shards"]) {
    for (const auto& [file, key] : {std::pair{"file", "xxh64"}, {"doc_offsets_file", "doc_offsets_xxh64"}}) {
      const std::string data = read_bytes(tmp / ("set/" + shard[file].get<std::string>()));
      char want[17];
      std::snprintf(want, sizeof(want), "%016llx",
                    static_cast<unsigned long long>(libllm::safetensors::xxh64(data.data(), data.size())));
      CHECK(shard[key] == want);
      bytes += static_cast<int64_t>(data.size());
    }
  }
  const ShardSet set = ShardSet::open(tmp / "set");
  CHECK(set.has_checksums());
  CHECK(set.verify() == bytes);
  // Parts (ranks) divide the shards between them: every file once.
  for (int64_t offset : {0, 1, 5}) {
    int64_t sum = 0;
    for (int64_t part = 0; part < 3; ++part) sum += set.verify(part, 3, offset);
    CHECK(sum == bytes);
  }
  CHECK_THAT(error_of([&] { set.verify(3, 3); }), Catch::Contains("is no part"));

  auto flip = [&](const std::string& name, int64_t at) {
    std::fstream f(tmp / ("set/" + name), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(at);
    char c = 0;
    f.get(c);
    f.seekp(at);
    f.put(static_cast<char>(c ^ 1));
  };
  const std::string damaged = "the data does not match the checksum meta.json recorded";
  SECTION("a bit flipped in a shard: opens (sizes agree), and verify names the file") {
    flip("shard-00001.bin", 5);
    const ShardSet s = ShardSet::open(tmp / "set");
    CHECK_THAT(error_of([&] { s.verify(); }), Catch::Contains((tmp / "set/shard-00001.bin") + ": " + damaged) &&
                                                  Catch::Contains("restore the shard set from a copy"));
    CHECK_NOTHROW(s.verify(0, 2));  // (shard 1 is part 1's)
    CHECK_THROWS(s.verify(1, 2));
  }
  SECTION("a bit flipped in an offsets file") {
    flip("shard-00002.idx", 8);
    CHECK_THAT(error_of([&] { ShardSet::open(tmp / "set").verify(); }),
               Catch::Contains((tmp / "set/shard-00002.idx") + ": " + damaged));
  }
  SECTION("a set made before checksums were recorded: opens, and nothing is checked") {
    for (auto& shard : meta["shards"]) shard.erase("xxh64"), shard.erase("doc_offsets_xxh64");
    write_text(tmp / "set/meta.json", meta.dump());
    const ShardSet s = ShardSet::open(tmp / "set");
    CHECK_FALSE(s.has_checksums());
    CHECK(s.verify() == 0);
  }
  SECTION("checksums for some files only: an error (the others would go unchecked)") {
    meta["shards"][1].erase("doc_offsets_xxh64");
    write_text(tmp / "set/meta.json", meta.dump());
    CHECK_THAT(error_of([&] { ShardSet::open(tmp / "set"); }),
               Catch::Contains("meta.json: records checksums for some shard files and not for 1") &&
                   Catch::Contains("re-run"));
  }
  SECTION("a checksum in upper case is the same; one that is no checksum is an error") {
    std::string upper = meta["shards"][0]["xxh64"];
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    meta["shards"][0]["xxh64"] = upper;
    write_text(tmp / "set/meta.json", meta.dump());
    CHECK(ShardSet::open(tmp / "set").verify() == bytes);
    meta["shards"][0]["xxh64"] = "0123";
    write_text(tmp / "set/meta.json", meta.dump());
    CHECK_THAT(error_of([&] { ShardSet::open(tmp / "set"); }),
               Catch::Contains("shards[0]: xxh64: '0123' is no checksum (16 hex digits)") && Catch::Contains("re-run"));
  }
}

TEST_CASE("uint32 shard sets (vocabularies above 65536) read back", "[data]") {
  Scratch tmp;
  const std::vector<uint32_t> tokens = {70000, 5, 2, 65536, 123456, 2};
  std::string bin;
  for (uint32_t t : tokens)
    for (int k = 0; k < 4; ++k) bin += static_cast<char>((t >> (8 * k)) & 0xff);
  write_text(tmp / "s/shard-00000.bin", bin);
  write_text(tmp / "s/shard-00000.idx", std::string("\0\0\0\0\0\0\0\0\3\0\0\0\0\0\0\0", 16));
  nlohmann::json meta = {{"format", "libllm-tokens-v1"}, {"dtype", "uint32"}, {"vocab_size", 200000}, {"eos_id", 2},
                         {"tokenizer_sha256", "x"}, {"tokenizer_path", "t.model"},
                         {"shards", {{{"file", "shard-00000.bin"}, {"tokens", 6}, {"documents", 2},
                                      {"doc_offsets_file", "shard-00000.idx"}}}},
                         {"total_tokens", 6}, {"total_documents", 2}};
  write_text(tmp / "s/meta.json", meta.dump());
  const auto got = all_tokens(ShardSet::open(tmp / "s"));
  CHECK(got == std::vector<int64_t>(tokens.begin(), tokens.end()));
}

TEST_CASE("check_tokenizer: another tokenizer file is an error naming both", "[data]") {
  Scratch tmp;
  make_set(tmp, "set", synthetic_docs(5));
  const ShardSet set = ShardSet::open(tmp / "set");
  CHECK_NOTHROW(check_tokenizer(set, tokenizer()));
  fs::copy_file(fixture("tokenizer.model"), tmp / "same.model");
  CHECK_NOTHROW(check_tokenizer(set, Tokenizer::load(tmp / "same.model")));
  {  // meta.json's vocab_size is the bound each token is checked against: it must be the tokenizer's
    // (a larger one would let ids past the model's vocabulary through to a GPU's embedding)
    auto meta = nlohmann::json::parse(read_bytes(tmp / "set/meta.json"));
    const int64_t n = tokenizer().vocab_size();
    meta["vocab_size"] = n + 1000;
    write_text(tmp / "set/meta.json", meta.dump());
    CHECK_THAT(error_of([&] { check_tokenizer(ShardSet::open(tmp / "set"), tokenizer()); }),
               Catch::Contains("set/meta.json: vocab_size: " + std::to_string(n + 1000) +
                               " is not the vocabulary size of its tokenizer") &&
                   Catch::Contains("(" + std::to_string(n) + ")") && Catch::Contains("re-run"));
    meta["vocab_size"] = n;
    write_text(tmp / "set/meta.json", meta.dump());
  }

  // Change one letter of a piece (keeps the file a valid model); try positions until one loads.
  const std::string bytes = read_bytes(fixture("tokenizer.model"));
  std::unique_ptr<Tokenizer> other;
  for (size_t i = bytes.size() / 2; i < bytes.size() && !other; ++i) {
    if (bytes[i] < 'a' || bytes[i] > 'z') continue;
    std::string changed = bytes;
    changed[i] = 'Q';
    write_text(tmp / "other.model", changed);
    try {
      other = std::make_unique<Tokenizer>(Tokenizer::load(tmp / "other.model"));
    } catch (const Error&) {
    }
  }
  REQUIRE(other);
  const std::string e = error_of([&] { check_tokenizer(set, *other); });
  CHECK_THAT(e, Catch::Contains(tmp / "other.model") && Catch::Contains("tokenizer.model") &&
                    Catch::Contains(tmp / "set"));
}

TEST_CASE("data recipe sections: fields and weight checks", "[data]") {
  Schema schema;
  DataConfig data;
  DataPrepConfig prep;
  data.fields(schema.section("data"));
  prep.fields(schema.section("data_prep"));
  schema.load_string("data:\n  train: [a, b]\n  weights: ['3', '1']\n  seed: 7\n"
                     "data_prep:\n  inputs: [x.txt]\n  output: out\n  txt_documents: paragraph\n  threads: 2\n",
                     "r.yaml");
  schema.validate();
  CHECK(data.train == std::vector<std::string>{"a", "b"});
  CHECK(data.weights == std::vector<std::string>{"3", "1"});
  CHECK(data.seed == 7);
  CHECK(prep.txt_documents == "paragraph");
  CHECK(prep.threads == 2);
  CHECK_THAT(error_of([&] { schema.apply_override("data_prep.txt_documents=sentence"); }),
             Catch::Contains("line") && Catch::Contains("paragraph"));
  CHECK_THAT(error_of([&] { schema.apply_override("data_prep.shard_tokens=0"); }), Catch::Contains("shard_tokens"));
  schema.apply_override("data.weights=[3]");
  CHECK_THAT(error_of([&] { schema.validate(); }), Catch::Contains("data.weights") && Catch::Contains("1 weights for 2"));
  schema.apply_override("data.weights=[3, x]");
  CHECK_THAT(error_of([&] { schema.validate(); }), Catch::Contains("data.weights") && Catch::Contains("'x'"));
  schema.apply_override("data.weights=[0, -1]");
  CHECK_THAT(error_of([&] { schema.validate(); }), Catch::Contains("data.weights"));
  schema.apply_override("data.weights=[0, 0]");
  CHECK_THAT(error_of([&] { schema.validate(); }), Catch::Contains("all weights are 0"));
}

// ---------------------------------------------------------------------------------------------

TEST_CASE("PackedDataset: windows are exact seq_len+1 slices: an epoch is a permutation", "[data]") {
  Scratch tmp;
  make_set(tmp, "set", synthetic_docs(200), 700);
  const ShardSet set = ShardSet::open(tmp / "set");
  const auto stream = all_tokens(set);
  DataConfig cfg;
  cfg.train = {tmp / "set"};
  const int64_t L = 16;
  PackedDataset ds(cfg, L, 0, 1);
  const int64_t W = static_cast<int64_t>(stream.size()) / (L + 1);
  REQUIRE(ds.windows_per_epoch() == W);
  REQUIRE(W > 50);

  const Drawn d = draw(ds, 2, W);  // two epochs (2W samples)
  REQUIRE(d.refs.size() == static_cast<size_t>(2 * W));
  for (size_t i = 0; i < d.refs.size(); ++i) {
    const WindowRef r = d.refs[i];
    REQUIRE(r.set == 0);
    const auto* row = &d.tokens[i * static_cast<size_t>(L + 1)];
    CHECK(std::vector<int64_t>(row, row + L + 1) ==
          std::vector<int64_t>(stream.begin() + r.window * (L + 1), stream.begin() + (r.window + 1) * (L + 1)));
  }
  std::vector<int64_t> e0, e1;
  for (int64_t i = 0; i < W; ++i) e0.push_back(d.refs[static_cast<size_t>(i)].window);
  for (int64_t i = W; i < 2 * W; ++i) e1.push_back(d.refs[static_cast<size_t>(i)].window);
  CHECK(e0 != e1);  // reshuffled for the second epoch
  std::vector<int64_t> ids(static_cast<size_t>(W));
  std::iota(ids.begin(), ids.end(), 0);
  std::vector<int64_t> s0 = e0, s1 = e1;
  std::sort(s0.begin(), s0.end());
  std::sort(s1.begin(), s1.end());
  CHECK(s0 == ids);
  CHECK(s1 == ids);
  CHECK(e0 != ids);  // shuffled at all
  CHECK(ds.describe(d.refs[0]) == "set 0 (" + cfg.train[0] + ") window " + std::to_string(d.refs[0].window) +
                                      " tokens [" + std::to_string(d.refs[0].window * 17) + ", " +
                                      std::to_string(d.refs[0].window * 17 + 17) + ")");
}

TEST_CASE("PackedDataset: the order depends only on the seed: ranks split it exactly", "[data]") {
  Scratch tmp;
  make_set(tmp, "a", synthetic_docs(150, 1));
  make_set(tmp, "b", synthetic_docs(100, 2));
  DataConfig cfg;
  cfg.train = {tmp / "a", tmp / "b"};
  const int64_t L = 12;
  PackedDataset one(cfg, L, 0, 1), again(cfg, L, 0, 1);
  const Drawn d1 = draw(one, 30, 4), d2 = draw(again, 20, 6);  // batch size does not matter
  CHECK(d1.refs == d2.refs);
  CHECK(d1.tokens == d2.tokens);
  std::set<int32_t> sets_seen;
  for (const auto& r : d1.refs) sets_seen.insert(r.set);
  CHECK(sets_seen.size() == 2);

  DataConfig other = cfg;
  other.seed = cfg.seed + 1;
  PackedDataset reseeded(other, L, 0, 1);
  CHECK(draw(reseeded, 30, 4).refs != d1.refs);

  PackedDataset r0(cfg, L, 0, 2), r1(cfg, L, 1, 2);
  const Drawn a = draw(r0, 15, 4), b = draw(r1, 15, 4);
  REQUIRE(a.refs.size() == 60);
  for (size_t i = 0; i < 60; ++i) {
    CHECK(a.refs[i] == d1.refs[2 * i]);
    CHECK(b.refs[i] == d1.refs[2 * i + 1]);
  }
  const size_t row = L + 1;
  CHECK(std::equal(b.tokens.begin() + 7 * row, b.tokens.begin() + 8 * row, d1.tokens.begin() + 15 * row));
}

TEST_CASE("PackedDataset: a cursor continues exactly in a fresh dataset: bad cursors are errors", "[data]") {
  Scratch tmp;
  make_set(tmp, "a", synthetic_docs(60, 3));  // small: several epochs within the test
  make_set(tmp, "b", synthetic_docs(100, 4));
  DataConfig cfg;
  cfg.train = {tmp / "a", tmp / "b"};
  cfg.weights = {"1", "1"};
  const int64_t L = 10;
  for (int64_t world : {1, 2}) {
    INFO("world size " << world);
    PackedDataset ref(cfg, L, world - 1, world);
    const Drawn all = draw(ref, 40, 8);

    PackedDataset first(cfg, L, world - 1, world);
    draw(first, 13, 8);
    const std::string cursor = first.cursor();
    PackedDataset resumed(cfg, L, world - 1, world);
    resumed.restore(cursor);
    const Drawn rest = draw(resumed, 27, 8);
    CHECK(std::vector<WindowRef>(all.refs.begin() + 13 * 8, all.refs.end()) == rest.refs);
    CHECK(std::vector<int64_t>(all.tokens.begin() + 13 * 8 * (L + 1), all.tokens.end()) == rest.tokens);
    CHECK(resumed.cursor() == ref.cursor());
  }

  PackedDataset ds(cfg, L, 0, 1);
  draw(ds, 3, 8);
  const std::string good = ds.cursor();
  CHECK_THAT(error_of([&] { ds.restore("not json"); }), Catch::Contains("data cursor"));
  CHECK_THAT(error_of([&] { ds.restore("{}"); }), Catch::Contains("data cursor"));
  auto j = nlohmann::json::parse(good);
  j["sets"][0].erase("pos");
  CHECK_THAT(error_of([&] { ds.restore(j.dump()); }), Catch::Contains("pos"));
  PackedDataset longer(cfg, L + 1, 0, 1);
  CHECK_THAT(error_of([&] { longer.restore(good); }), Catch::Contains("seq_len"));
  DataConfig reseeded = cfg;
  reseeded.seed = 99;
  PackedDataset other_seed(reseeded, L, 0, 1);
  CHECK_THAT(error_of([&] { other_seed.restore(good); }), Catch::Contains("seed"));
  DataConfig fewer = cfg;
  fewer.train = {tmp / "a"};
  fewer.weights.clear();
  PackedDataset one_set(fewer, L, 0, 1);
  CHECK_THAT(error_of([&] { one_set.restore(good); }), Catch::Contains("train sets"));
  // Another folder in data.train is named as such; the same folder made again has changed.
  make_set(tmp, "c", synthetic_docs(70, 5));
  DataConfig swapped = cfg;
  swapped.train = {tmp / "c", tmp / "b"};
  PackedDataset other_set(swapped, L, 0, 1);
  CHECK_THAT(error_of([&] { other_set.restore(good); }),
             Catch::Contains("train set 0 was " + (tmp / "a") + " (") && Catch::Contains("and is " + (tmp / "c")));
  make_set(tmp, "a", synthetic_docs(70, 5));
  PackedDataset remade(cfg, L, 0, 1);
  CHECK_THAT(error_of([&] { remade.restore(good); }),
             Catch::Contains("train set 0 (" + (tmp / "a") + ") has changed since the cursor was saved"));
  // The same numbers of tokens and windows, other tokens (its documents in reverse order): the
  // fingerprint tells; another folder's likewise. The same data made again, or moved, fits.
  auto reversed = synthetic_docs(60, 3);
  std::reverse(reversed.begin(), reversed.end());
  make_set(tmp, "a", reversed);
  PackedDataset reordered(cfg, L, 0, 1);
  CHECK_THAT(error_of([&] { reordered.restore(good); }),
             Catch::Contains("data cursor: train set 0 (" + (tmp / "a") +
                             ") holds other tokens than it did when the cursor was saved (the same ") &&
                 Catch::Contains("resume with the data settings the run was saved with"));
  fs::rename(tmp / "a", tmp / "a-reversed");
  make_set(tmp, "a", synthetic_docs(60, 3));
  DataConfig moved = cfg;
  moved.train = {tmp / "a-reversed", tmp / "b"};
  PackedDataset other_tokens(moved, L, 0, 1);
  CHECK_THAT(error_of([&] { other_tokens.restore(good); }),
             Catch::Contains("holds other tokens than " + (tmp / "a") + " did"));
  fs::remove_all(tmp / "a-reversed");
  fs::rename(tmp / "a", tmp / "a-moved");
  moved.train = {tmp / "a-moved", tmp / "b"};
  PackedDataset same_data(moved, L, 0, 1);
  CHECK_NOTHROW(same_data.restore(good));
  // The same stream in other shards (another data_prep.shard_tokens) keeps the fingerprint.
  make_set(tmp, "a-moved", synthetic_docs(60, 3), 200);
  REQUIRE(ShardSet::open(tmp / "a-moved").n_shards() > 1);
  PackedDataset resplit(moved, L, 0, 1);
  CHECK_NOTHROW(resplit.restore(good));
  // A cursor from before fingerprints (no key) is taken as it is.
  auto old = nlohmann::json::parse(good);
  for (auto& set : old["sets"]) set.erase("stream_fingerprint");
  CHECK_NOTHROW(reordered.restore(old.dump()));
  CHECK(ds.cursor() == good);  // failed restores change nothing
}

TEST_CASE("PackedDataset: mixture weights 3:1 give ~75% from set 0: default is proportional", "[data]") {
  Scratch tmp;
  make_set(tmp, "a", synthetic_docs(100, 5));
  make_set(tmp, "b", synthetic_docs(100, 6));
  DataConfig cfg;
  cfg.train = {tmp / "a", tmp / "b"};
  cfg.weights = {"3", "1"};
  PackedDataset ds(cfg, 8, 0, 1);
  const Drawn d = draw(ds, 40, 100);
  REQUIRE(d.refs.size() == 4000);
  const auto from0 = std::count_if(d.refs.begin(), d.refs.end(), [](const WindowRef& r) { return r.set == 0; });
  CHECK(std::abs(static_cast<double>(from0) / 4000.0 - 0.75) < 0.05);

  cfg.weights = {};
  PackedDataset prop(cfg, 8, 0, 1);
  const double w0 = static_cast<double>(prop.windows(0)) / static_cast<double>(prop.windows_per_epoch());
  CHECK(prop.weights()[0] == Approx(w0));
  cfg.weights = {"0", "1"};
  PackedDataset only_b(cfg, 8, 0, 1);
  for (const auto& r : draw(only_b, 5, 100).refs) CHECK(r.set == 1);
  cfg.weights = {"1"};
  CHECK_THAT(error_of([&] { PackedDataset bad(cfg, 8, 0, 1); }), Catch::Contains("data.weights"));
}

TEST_CASE("PackedDataset: sets with and without BOS-first documents do not mix", "[data]") {
  Scratch tmp;
  make_set(tmp, "a", synthetic_docs(50));
  DataPrepConfig cfg;
  cfg.inputs = {tmp / "a-src"};
  cfg.output = tmp / "b";
  cfg.bos = false;
  write_shards(cfg, tokenizer());
  DataConfig dc;
  dc.train = {tmp / "a", tmp / "b"};
  CHECK_THAT(error_of([&] { PackedDataset d(dc, 8, 0, 1); }),
             Catch::Contains(tmp / "b: has no BOS, and " + (tmp / "a") + " starts documents with BOS (id 1)"));
}

// A loss-spike rollback as the trainer makes it: the steps after `target` (a cursor of `ds`'s
// run) drew the next `samples` samples of every rank from `ds`'s position, then were rolled back:
// `ds` goes back to `target`, its stream goes on, their windows are deferred (or dropped).
// The deferral tests' data: one set of 200 synthetic documents.
static DataConfig one_set(const Scratch& tmp) {
  make_set(tmp, "a", synthetic_docs(200, 7));
  DataConfig cfg;
  cfg.train = {tmp / "a"};
  return cfg;
}

static void roll_back_next(PackedDataset& ds, const std::string& target, const DataConfig& cfg, int64_t L,
                           int64_t world, int64_t samples, bool defer) {
  std::vector<std::vector<WindowRef>> used;
  std::string live;
  std::vector<int64_t> out;
  for (int64_t k = 0; k < world; ++k) {
    PackedDataset twin(cfg, L, k, world);
    twin.restore(ds.cursor());
    used.emplace_back();
    twin.next(samples, out, used.back());
    live = twin.cursor();
  }
  ds.restore(target);
  ds.roll_back(live, defer ? used : std::vector<std::vector<WindowRef>>{});
}

TEST_CASE("PackedDataset: deferred windows are the last samples of the plan, dropped ones never come", "[data]") {
  Scratch tmp;
  const DataConfig cfg = one_set(tmp);
  const int64_t L = 8;
  PackedDataset plain(cfg, L, 0, 1), ds(cfg, L, 0, 1);
  CHECK(ds.planned_samples() == ds.windows_per_epoch());
  ds.set_planned_samples(40);
  const Drawn p = draw(plain, 15, 4);  // 60 samples, no deferral

  // A rollback to sample 0: the 4 samples that followed are moved to the end of the plan.
  roll_back_next(ds, ds.cursor(), cfg, L, 1, 4, /*defer=*/true);
  CHECK(ds.deferred_count() == 4);
  std::vector<int64_t> out;
  std::vector<WindowRef> refs, served;
  for (int i = 0; i < 14; ++i) {
    ds.next(4, out, refs);
    served.insert(served.end(), refs.begin(), refs.end());
  }
  // The rolled-back steps run again on new data: plan slots 0..35 from the stream (its windows 4..39),
  // slots 36..39 (the plan's last 4) the deferred windows 0..3, then the stream goes on (its tail
  // pushed past the plan).
  std::vector<WindowRef> want(p.refs.begin() + 4, p.refs.begin() + 40);
  want.insert(want.end(), p.refs.begin(), p.refs.begin() + 4);
  want.insert(want.end(), p.refs.begin() + 40, p.refs.begin() + 56);
  CHECK(served == want);
  CHECK(ds.deferred_count() == 0);

  // A rollback longer than the rest of the plan: what the rolled-back steps drew (the stream's
  // windows 6..9) is deferred, and, no slot being left before the plan's end, served at once.
  PackedDataset late(cfg, L, 0, 1);
  late.set_planned_samples(10);
  late.next(6, out, refs);
  roll_back_next(late, late.cursor(), cfg, L, 1, 4, /*defer=*/true);
  CHECK(late.deferred_count() == 4);
  late.next(6, out, refs);
  CHECK(refs == std::vector<WindowRef>(p.refs.begin() + 6, p.refs.begin() + 12));
  // Twice: the second rollback's steps had drawn the first one's deferred windows; they are
  // deferred again, in the order drawn.
  PackedDataset twice(cfg, L, 0, 1);
  twice.set_planned_samples(10);
  twice.next(6, out, refs);
  roll_back_next(twice, twice.cursor(), cfg, L, 1, 4, true);  // queue: 6..9
  roll_back_next(twice, twice.cursor(), cfg, L, 1, 4, true);  // the steps 7..10 again drew 6..9: queue 6..9
  CHECK(twice.deferred_count() == 4);
  twice.next(4, out, refs);
  CHECK(refs == std::vector<WindowRef>(p.refs.begin() + 6, p.refs.begin() + 10));

  // Dropped: the stream simply goes on after them.
  PackedDataset dropped(cfg, L, 0, 1);
  dropped.set_planned_samples(40);
  roll_back_next(dropped, dropped.cursor(), cfg, L, 1, 4, /*defer=*/false);
  CHECK(dropped.deferred_count() == 0);
  dropped.next(8, out, refs);
  CHECK(refs == std::vector<WindowRef>(p.refs.begin() + 4, p.refs.begin() + 12));

  // Two ranks: each defers its own windows and serves them in the same slots; a cursor carries them.
  PackedDataset r0(cfg, L, 0, 2), r1(cfg, L, 1, 2), one(cfg, L, 0, 1);
  for (auto* d : {&r0, &r1}) d->set_planned_samples(20), roll_back_next(*d, d->cursor(), cfg, L, 2, 2, true);
  one.next(4, out, refs);  // global samples 0..3: rank 0 had 0 and 2, rank 1 had 1 and 3
  const std::vector<WindowRef> first4 = refs;
  PackedDataset r1b(cfg, L, 1, 2);
  r1b.restore(r1.cursor());
  CHECK(r1b.deferred_count() == 2);
  r0.next(10, out, refs);  // the 10 slots of rank 0: 8 from the stream, then its deferred 0 and 2
  CHECK(refs[8] == first4[0]);
  CHECK(refs[9] == first4[2]);
  const std::vector<WindowRef> rank0_tail = refs;
  r1b.next(10, out, refs);
  CHECK(refs[8] == first4[1]);
  CHECK(refs[9] == first4[3]);
  for (size_t i = 0; i < 8; ++i) CHECK(refs[i] != rank0_tail[i]);  // ranks never share a window
  // A cursor with deferred windows, restored by another number of ranks: the windows are dealt
  // out in the order the saved ranks would have served them (a remainder that does not divide is
  // dropped). 2 ranks defer the stream's windows 0..5 (rank 0: 0, 2, 4; rank 1: 1, 3, 5); the
  // stream goes on from window 6 at global sample 0, and the plan ends at sample 20.
  PackedDataset r0c(cfg, L, 0, 2);
  r0c.set_planned_samples(20);
  roll_back_next(r0c, r0c.cursor(), cfg, L, 2, 3, true);
  CHECK(r0c.deferred_count() == 3);
  PackedDataset w1(cfg, L, 0, 1);  // 1 rank: slots 0..13 from the stream, 14..19 the deferred 0..5 in order
  w1.restore(r0c.cursor());
  CHECK(w1.deferred_count() == 6);
  w1.next(20, out, refs);
  std::vector<WindowRef> want1(p.refs.begin() + 6, p.refs.begin() + 20);
  want1.insert(want1.end(), p.refs.begin(), p.refs.begin() + 6);
  CHECK(refs == want1);
  for (int64_t k = 0; k < 4; ++k) {  // 4 ranks: one each (0..3), 4 and 5 dropped; slot 16 serves them
    PackedDataset w4(cfg, L, k, 4);
    w4.restore(r0c.cursor());
    CHECK(w4.deferred_count() == 1);
    w4.next(6, out, refs);
    const auto s = [&](int64_t i) { return p.refs[static_cast<size_t>(i)]; };
    CHECK(refs == std::vector<WindowRef>{s(6 + k), s(10 + k), s(14 + k), s(18 + k), s(k), s(22 + k)});
  }
}

TEST_CASE("PackedDataset: a rollback past an earlier one's target keeps its deferral, and no window comes twice",
          "[data]") {
  Scratch tmp;
  const DataConfig cfg = one_set(tmp);
  const int64_t L = 8;
  PackedDataset plain(cfg, L, 0, 1), ds(cfg, L, 0, 1);
  const Drawn p = draw(plain, 10, 4);    // the stream: 40 samples
  REQUIRE(ds.windows_per_epoch() > 40);  // (one epoch: every window differs)
  ds.set_planned_samples(40);
  std::vector<int64_t> out;
  std::vector<WindowRef> refs, seen;
  ds.next(5, out, refs);
  seen = refs;
  const std::string at5 = ds.cursor();  // checkpoints after samples 5 and 8
  ds.next(3, out, refs);
  const std::string at8 = ds.cursor();
  const std::vector<WindowRef> from5(refs);
  // Rollback A from sample 10 to 8: stream windows 8, 9 deferred.
  ds.next(2, out, refs);
  std::string live = ds.cursor();
  ds.restore(at8);
  ds.roll_back(live, {refs});
  CHECK(ds.deferred_count() == 2);
  // Sample 9 again takes stream window 10; rollback B from there to 5 defers what samples 6..9 of
  // this branch used (stream windows 5, 6, 7 and 10), behind A's 8 and 9, which stay deferred.
  ds.next(1, out, refs);
  CHECK(refs[0] == p.refs[10]);
  std::vector<WindowRef> used = from5;
  used.push_back(refs[0]);
  live = ds.cursor();
  ds.restore(at5);
  ds.roll_back(live, {used});
  CHECK(ds.deferred_count() == 6);
  CHECK(ds.global_index() == 5);
  for (int i = 0; i < 35; ++i) {
    ds.next(1, out, refs);
    seen.push_back(refs[0]);
  }
  // Samples 5..33 the stream's windows 11..39, the plan's last six the deferred 8, 9, 5, 6, 7, 10.
  std::vector<WindowRef> want(p.refs.begin(), p.refs.begin() + 5);
  want.insert(want.end(), p.refs.begin() + 11, p.refs.begin() + 40);
  for (int i : {8, 9, 5, 6, 7, 10}) want.push_back(p.refs[static_cast<size_t>(i)]);
  CHECK(seen == want);
  // Every window of the stream's first 40 exactly once.
  auto key = [](const WindowRef& r) { return std::make_pair(r.set, r.window); };
  std::set<std::pair<int32_t, int64_t>> distinct, first40;
  for (const auto& r : seen) distinct.insert(key(r));
  for (size_t i = 0; i < 40; ++i) first40.insert(key(p.refs[i]));
  CHECK(distinct == first40);
  CHECK(distinct.size() == seen.size());
  // Malformed rolled-back windows are errors.
  CHECK_THAT(error_of([&] { ds.roll_back(ds.cursor(), {{}, {}}); }), Catch::Contains("windows of 2 ranks"));
  CHECK_THAT(error_of([&] { ds.roll_back(ds.cursor(), {{WindowRef{0, 1 << 30}}}); }), Catch::Contains("no window"));
}
