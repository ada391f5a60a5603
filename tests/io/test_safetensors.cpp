// Tests of libllm::safetensors: round trips, header layout, atomic writes, golden bytes, and one
// corrupt file per validation rule (each must give a libllm::Error naming the file).
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>
#include "../catch_torch.h"

#include "libllm/error.h"
#include "libllm/safetensors.h"

namespace {

namespace fs = std::filesystem;
namespace st = libllm::safetensors;
using Catch::Matchers::Contains;

// A fresh directory under the system temp dir, removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ =
        fs::temp_directory_path() / ("libllm_st_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  // Names of the entries in the directory, sorted.
  std::vector<std::string> list() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  fs::path path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

uint64_t read_le64(const std::string& s) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(s[i]);
  return v;
}

// A safetensors file made by hand: length prefix, header text, data.
std::string raw_file(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

// One header entry as JSON text; `shape` and `offsets` are JSON text too, so they can be broken.
std::string entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

// The message of the libllm::Error thrown by File::open(path), or "<no error>".
std::string open_error(const std::string& path) {
  try {
    st::File::open(path);
  } catch (const libllm::Error& e) {
    return e.what();
  }
  return "<no error>";
}

// The message of the libllm::Error `fn` throws, or "<no error>".
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const libllm::Error& e) {
    return e.what();
  }
  return "<no error>";
}

// The message of the libllm::Error thrown by st::write(), or "<no error>".
std::string write_error(const std::string& path, const std::vector<st::TensorView>& tensors) {
  try {
    st::write(path, tensors);
  } catch (const libllm::Error& e) {
    return e.what();
  }
  return "<no error>";
}

std::vector<uint8_t> pattern(size_t n, int seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(i * 31 + seed * 7 + 1);
  return v;
}

// A corrupt file and a word its error message must contain (besides the file path).
struct Corrupt {
  const char* label;
  std::string bytes;
  const char* needle;
};

void check_corrupt(const std::vector<Corrupt>& cases) {
  TempDir dir;
  for (const Corrupt& c : cases) {
    INFO("case: " << c.label);
    const std::string path = dir.file(std::string(c.label) + ".safetensors");
    write_bytes(path, c.bytes);
    const std::string msg = open_error(path);
    CHECK_THAT(msg, Contains(path));
    CHECK_THAT(msg, Contains(c.needle));
  }
}

}  // namespace

TEST_CASE("safetensors dtype names and sizes", "[io]") {
  const std::vector<std::pair<st::DType, size_t>> all = {
      {st::DType::F32, 4}, {st::DType::F16, 2}, {st::DType::BF16, 2}, {st::DType::F64, 8}, {st::DType::I64, 8},
      {st::DType::I32, 4}, {st::DType::I16, 2}, {st::DType::I8, 1},   {st::DType::U8, 1},  {st::DType::BOOL, 1}};
  for (const auto& [dtype, size] : all) {
    CHECK(st::dtype_size(dtype) == size);
    CHECK(st::dtype_from_name(st::dtype_name(dtype), "x") == dtype);
  }
  CHECK(std::string(st::dtype_name(st::DType::BF16)) == "BF16");
  CHECK(std::string(st::dtype_name(st::DType::BOOL)) == "BOOL");
  CHECK_THROWS_AS(st::dtype_from_name("f32", "x"), libllm::Error);
  CHECK_THROWS_WITH(st::dtype_from_name("F8_E4M3", "m.safetensors"), Contains("m.safetensors") && Contains("F8_E4M3"));
}

TEST_CASE("safetensors write/read round trip keeps dtypes, shapes and bytes", "[io]") {
  struct Spec {
    std::string name;
    st::DType dtype;
    std::vector<int64_t> shape;
  };
  const std::vector<Spec> specs = {
      {"layers.0.w", st::DType::F32, {2, 3}},
      {"h", st::DType::F16, {5}},
      {"bf", st::DType::BF16, {2, 2, 1}},
      {"d", st::DType::F64, {1}},
      {"i64", st::DType::I64, {3}},
      {"i32", st::DType::I32, {2, 2, 2}},
      {"i16", st::DType::I16, {7}},
      {"i8", st::DType::I8, {3, 1}},
      {"u8", st::DType::U8, {9}},
      {"mask", st::DType::BOOL, {4}},
      {"scalar", st::DType::F32, {}},
      {"empty", st::DType::I32, {0, 3}},
  };
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<st::TensorView> views;
  for (size_t i = 0; i < specs.size(); ++i) {
    int64_t numel = 1;
    for (int64_t d : specs[i].shape) numel *= d;
    bytes.push_back(pattern(numel * st::dtype_size(specs[i].dtype), static_cast<int>(i)));
    if (specs[i].dtype == st::DType::BOOL) {
      for (auto& b : bytes.back()) b &= 1;
    }
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    views.push_back({specs[i].name, specs[i].dtype, specs[i].shape, bytes[i].data()});
  }
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  st::write(path, views);

  auto file = st::File::open(path);
  CHECK(file->path() == path);
  REQUIRE(file->tensors().size() == specs.size());
  CHECK(file->metadata().size() == 2);
  CHECK(file->metadata().at("format") == "pt");
  CHECK(file->metadata().count(st::kChecksumKey));
  CHECK(file->verify());
  for (size_t i = 0; i < specs.size(); ++i) {
    INFO("tensor " << specs[i].name);
    const st::TensorInfo& t = file->at(specs[i].name);
    CHECK(t.name == specs[i].name);
    CHECK(t.dtype == specs[i].dtype);
    CHECK(t.shape == specs[i].shape);
    REQUIRE(t.end - t.begin == bytes[i].size());
    CHECK(static_cast<size_t>(t.numel()) * st::dtype_size(t.dtype) == bytes[i].size());
    const std::string got(reinterpret_cast<const char*>(file->data(t)), bytes[i].size());
    CHECK(got == std::string(bytes[i].begin(), bytes[i].end()));
  }
  CHECK(file->at("scalar").numel() == 1);
  CHECK(file->at("empty").numel() == 0);
  // tensors() is ordered by data offset.
  for (size_t i = 1; i < file->tensors().size(); ++i) {
    CHECK(file->tensors()[i - 1].begin <= file->tensors()[i].begin);
  }
}

TEST_CASE("safetensors header is 8-byte aligned, metadata first, tensors sorted", "[io]") {
  const std::vector<uint8_t> a = pattern(8, 1), b = pattern(6, 2), c = pattern(3, 3);
  // "A" sorts before "__metadata__" in a plain JSON object: metadata must still come first.
  const std::vector<st::TensorView> views = {{"zeta", st::DType::F32, {2}, a.data()},
                                             {"A", st::DType::I16, {3}, b.data()},
                                             {"mid.x", st::DType::U8, {3}, c.data()}};
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  st::write(path, views, {{"format", "pt"}, {"note", "hi"}});

  const std::string raw = read_bytes(path);
  REQUIRE(raw.size() >= 8);
  const uint64_t n = read_le64(raw);
  CHECK((8 + n) % 8 == 0);
  REQUIRE(raw.size() == 8 + n + a.size() + b.size() + c.size());
  const std::string header = raw.substr(8, n);
  const size_t close = header.rfind('}');
  REQUIRE(close != std::string::npos);
  CHECK(header.find_first_not_of(' ', close + 1) == std::string::npos);
  CHECK(header.rfind(R"({"__metadata__":)", 0) == 0);
  const size_t pa = header.find(R"("A":)"), pm = header.find(R"("mid.x":)"), pz = header.find(R"("zeta":)");
  REQUIRE(pa != std::string::npos);
  CHECK(pa < pm);
  CHECK(pm < pz);

  // Data is contiguous in name order (checked with nlohmann, independently of the reader).
  const auto j = nlohmann::json::parse(header);
  CHECK(j["A"]["data_offsets"] == nlohmann::json::array({0, 6}));
  CHECK(j["mid.x"]["data_offsets"] == nlohmann::json::array({6, 9}));
  CHECK(j["zeta"]["data_offsets"] == nlohmann::json::array({9, 17}));
  CHECK(j["A"]["dtype"] == "I16");
  CHECK(j["A"]["shape"] == nlohmann::json::array({3}));
  CHECK(raw.substr(8 + n, 6) == std::string(b.begin(), b.end()));
  CHECK(raw.substr(8 + n + 6, 3) == std::string(c.begin(), c.end()));
  CHECK(raw.substr(8 + n + 9) == std::string(a.begin(), a.end()));
}

TEST_CASE("safetensors writer produces the exact expected bytes", "[io]") {
  const uint8_t data[3] = {1, 2, 3};
  TempDir dir;
  const std::string path = dir.file("x.safetensors");
  st::write(path, {{"x", st::DType::U8, {3}, data}}, {});
  // The checksum: `printf '\1\2\3' | xxhsum -H64` (xxHash 0.8.1) prints 743e13ee0c4ee5a5.
  const std::string header =
      R"({"__metadata__":{"libllm.data_xxh64":"743e13ee0c4ee5a5"},"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})";
  REQUIRE(header.size() == 109);
  const std::string expected = std::string("\x70\0\0\0\0\0\0\0", 8) + header + "   " + "\x01\x02\x03";
  CHECK(read_bytes(path) == expected);
}

TEST_CASE("safetensors metadata round trip", "[io]") {
  const float v = 2.5f;
  TempDir dir;
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"step", "1200"}, {"quote \" and \\", "ünïcødé\nline"}, {"empty", ""}};
  st::write(dir.file("a.safetensors"), {{"v", st::DType::F32, {}, &v}}, meta);
  auto with_checksum = meta;
  with_checksum[st::kChecksumKey] = "bb4b4897deb4a8a8";  // (`printf '\0\0\x20\x40' | xxhsum -H64`: 2.5f)
  CHECK(st::File::open(dir.file("a.safetensors"))->metadata() == with_checksum);

  // Empty metadata: the checksum alone.
  st::write(dir.file("b.safetensors"), {{"v", st::DType::F32, {}, &v}}, {});
  CHECK(st::File::open(dir.file("b.safetensors"))->metadata().size() == 1);

  // Metadata copied from another file: its checksum is replaced by this file's own.
  const float w = 3.5f;
  st::write(dir.file("d.safetensors"), {{"v", st::DType::F32, {}, &w}}, with_checksum);
  auto d = st::File::open(dir.file("d.safetensors"));
  CHECK(d->metadata().at(st::kChecksumKey) != "bb4b4897deb4a8a8");
  CHECK(d->verify());

  // A key that holds the checksum's key in quotes (sorted before it): the checksum still goes in its own place.
  st::write(dir.file("e.safetensors"), {{"v", st::DType::F32, {}, &w}},
            {{"a\"libllm.data_xxh64", "01234567890123456789"}, {"b", "\"libllm.data_xxh64\":\""}});
  auto e = st::File::open(dir.file("e.safetensors"));
  CHECK(e->metadata().at("a\"libllm.data_xxh64") == "01234567890123456789");
  CHECK(e->metadata().at("b") == "\"libllm.data_xxh64\":\"");
  CHECK(e->verify());

  // A file with metadata only and no tensors.
  st::write(dir.file("c.safetensors"), {}, {{"k", "v"}});
  auto c = st::File::open(dir.file("c.safetensors"));
  CHECK(c->tensors().empty());
  CHECK(c->metadata().at("k") == "v");
}

TEST_CASE("safetensors write is atomic and replaces an existing file", "[io]") {
  const std::vector<uint8_t> one = pattern(4, 1), two = pattern(8, 2);
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  st::write(path, {{"t", st::DType::U8, {4}, one.data()}});
  st::write(path, {{"u", st::DType::I32, {2}, two.data()}});
  CHECK(dir.list() == std::vector<std::string>{"w.safetensors"});  // no .tmp-<pid> left
  auto file = st::File::open(path);
  CHECK(file->find("t") == nullptr);
  REQUIRE(file->find("u") != nullptr);
  CHECK(std::memcmp(file->data(file->at("u")), two.data(), two.size()) == 0);

  SECTION("a failed write keeps the previous file") {
    const std::string before = read_bytes(path);
    const std::string msg =
        write_error(path, {{"a", st::DType::U8, {4}, one.data()}, {"a", st::DType::U8, {4}, one.data()}});
    CHECK_THAT(msg, Contains(path) && Contains("'a'"));
    CHECK(read_bytes(path) == before);
    CHECK(dir.list() == std::vector<std::string>{"w.safetensors"});
  }
  SECTION("a failed rename removes the temporary file") {
    // The target is a non-empty directory: everything is written and synced, the rename fails.
    const std::string target = dir.file("dir_target");
    fs::create_directories(fs::path(target) / "inner");
    const std::string msg = write_error(target, {{"t", st::DType::U8, {4}, one.data()}});
    CHECK_THAT(msg, Contains(target) && Contains("rename"));
    CHECK(dir.list() == std::vector<std::string>{"dir_target", "w.safetensors"});
  }
  SECTION("a missing directory is an error naming the path") {
    const std::string missing = dir.file("no/such/dir/m.safetensors");
    CHECK_THAT(write_error(missing, {{"t", st::DType::U8, {4}, one.data()}}), Contains(missing));
  }
}

TEST_CASE("safetensors writes and reads beat the supervisor's heartbeat on rank 0", "[io]") {
  // llm-spike supervise sets LIBLLM_HEARTBEAT: a long checkpoint write or base read is progress.
  const std::vector<uint8_t> one = pattern(4, 1);
  TempDir dir;
  const std::string beat = dir.file("heartbeat"), path = dir.file("h.safetensors");
  auto said = [&] {  // "<unix time> <what>"
    std::ifstream in(beat);
    double t = 0;
    std::string what;
    in >> t >> std::ws;
    std::getline(in, what);
    return std::make_pair(t, what);
  };
  struct Env {
    Env(const std::string& beat) { ::setenv("LIBLLM_HEARTBEAT", beat.c_str(), 1), ::setenv("RANK", "1", 1); }
    ~Env() { ::unsetenv("LIBLLM_HEARTBEAT"), ::unsetenv("RANK"); }
  } env(beat);
  st::write(path, {{"t", st::DType::U8, {4}, one.data()}});
  CHECK_FALSE(fs::exists(beat));  // rank 1 does not beat
  ::setenv("RANK", "0", 1);
  const double before = static_cast<double>(std::time(nullptr));
  st::write(path, {{"t", st::DType::U8, {4}, one.data()}});
  auto [t, what] = said();
  CHECK(what == "writing " + path);
  CHECK(t >= before - 1);
  CHECK(t <= before + 60);
  ::usleep(1100 * 1000);  // (at most one beat a second)
  auto file = st::File::open(path);
  CHECK(file->data(file->at("t"))[0] == one[0]);
  CHECK(said().second == "reading " + path);
}

TEST_CASE("safetensors stream writer: tensors in the given order, atomic, order and sizes checked", "[io]") {
  const std::vector<uint8_t> a = pattern(12, 3), b = pattern(4, 5), c = pattern(2, 7);
  TempDir dir;
  const std::string path = dir.file("s.safetensors");
  // Not in name order: the data section follows the given order (a sharded model's units).
  const std::vector<st::StreamWriter::Entry> entries = {
      {"z.weight", st::DType::F32, {3}}, {"a.weight", st::DType::U8, {2, 2}}, {"m", st::DType::BF16, {}}};
  {
    st::StreamWriter w(path, entries);
    w.add("z.weight", a.data(), a.size());
    CHECK(dir.list().size() == 1);
    CHECK_FALSE(fs::exists(path));  // (only the temporary file, until commit)
    w.add("a.weight", b.data(), b.size());
    w.add("m", c.data(), c.size());
    w.commit();
  }
  CHECK(dir.list() == std::vector<std::string>{"s.safetensors"});
  auto file = st::File::open(path);
  REQUIRE(file->tensors().size() == 3);
  CHECK(file->tensors()[0].name == "z.weight");  // ordered by data offset
  CHECK(file->at("a.weight").shape == std::vector<int64_t>{2, 2});
  CHECK(file->at("m").shape.empty());
  CHECK(std::memcmp(file->data(file->at("z.weight")), a.data(), a.size()) == 0);
  CHECK(std::memcmp(file->data(file->at("a.weight")), b.data(), b.size()) == 0);
  CHECK(std::memcmp(file->data(file->at("m")), c.data(), c.size()) == 0);
  CHECK(file->metadata().at("format") == "pt");

  const std::string before = read_bytes(path);
  auto error = [&](auto f) {
    try {
      f();
    } catch (const libllm::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK_THAT(error([&] {
               st::StreamWriter w(path, entries);
               w.add("a.weight", b.data(), b.size());
             }),
             Contains("tensor 'a.weight'") && Contains("out of order: tensor 'z.weight' is next"));
  CHECK_THAT(error([&] {
               st::StreamWriter w(path, entries);
               w.add("z.weight", a.data(), 8);
             }),
             Contains("8 bytes given, the header says 12"));
  CHECK_THAT(error([&] {
               st::StreamWriter w(path, entries);
               w.add("z.weight", a.data(), a.size());
               w.commit();
             }),
             Contains("tensor 'a.weight'") && Contains("was never added"));
  CHECK_THAT(error([&] { st::StreamWriter w(path, {{"t", st::DType::U8, {1}}, {"t", st::DType::U8, {1}}}); }),
             Contains("name is given twice"));
  // Every failure left the committed file as it was, and no temporary file.
  CHECK(read_bytes(path) == before);
  CHECK(dir.list() == std::vector<std::string>{"s.safetensors"});
}

TEST_CASE("safetensors write rejects bad tensors", "[io]") {
  const std::vector<uint8_t> buf(16);
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  const int64_t huge = int64_t{1} << 40;
  const std::vector<std::pair<const char*, std::vector<st::TensorView>>> cases = {
      {"duplicate name", {{"a", st::DType::U8, {1}, buf.data()}, {"a", st::DType::U8, {1}, buf.data()}}},
      {"reserved name", {{"__metadata__", st::DType::U8, {1}, buf.data()}}},
      {"empty name", {{"", st::DType::U8, {1}, buf.data()}}},
      {"negative dim", {{"n", st::DType::U8, {2, -1}, buf.data()}}},
      {"null data", {{"n", st::DType::F32, {2}, nullptr}}},
      {"numel overflow", {{"n", st::DType::U8, {huge, huge}, buf.data()}}},
      {"byte size overflow", {{"n", st::DType::F64, {int64_t{1} << 31, int64_t{1} << 31}, buf.data()}}},
  };
  for (const auto& [label, views] : cases) {
    INFO("case: " << label);
    CHECK_THAT(write_error(path, views), Contains(path));
    CHECK_FALSE(fs::exists(path));
  }
  CHECK(dir.list().empty());
  // A zero-size tensor may have a null data pointer.
  st::write(path, {{"z", st::DType::F32, {0}, nullptr}});
  CHECK(st::File::open(path)->at("z").numel() == 0);
}

TEST_CASE("safetensors golden file built by hand parses to the expected values", "[io]") {
  const std::string header = R"({"__metadata__":{"format":"pt"},)"
                             R"("w":{"dtype":"I16","shape":[2],"data_offsets":[4,8]},)"
                             R"("s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)"
                             R"("e":{"dtype":"U8","shape":[0,3],"data_offsets":[8,8]}})";
  REQUIRE(header.size() == 191);
  // 191 = 0xbf little-endian; s = 1.5f = 0x3fc00000; w = [1, -2] as int16.
  const std::string bytes = std::string("\xbf\0\0\0\0\0\0\0", 8) + header + std::string("\x00\x00\xc0\x3f", 4) +
                            std::string("\x01\x00\xfe\xff", 4);
  TempDir dir;
  const std::string path = dir.file("golden.safetensors");
  write_bytes(path, bytes);

  auto file = st::File::open(path);
  CHECK(file->metadata() == std::map<std::string, std::string>{{"format", "pt"}});
  REQUIRE(file->tensors().size() == 3);
  CHECK(file->tensors()[0].name == "s");  // ordered by data offset
  CHECK(file->tensors()[1].name == "w");
  CHECK(file->tensors()[2].name == "e");

  const st::TensorInfo& s = file->at("s");
  CHECK(s.dtype == st::DType::F32);
  CHECK(s.shape.empty());
  CHECK(s.numel() == 1);
  CHECK((s.begin == 0 && s.end == 4));
  float f = 0;
  std::memcpy(&f, file->data(s), 4);
  CHECK(f == 1.5f);

  const st::TensorInfo& w = file->at("w");
  CHECK(w.dtype == st::DType::I16);
  CHECK(w.shape == std::vector<int64_t>{2});
  int16_t iv[2] = {0, 0};
  std::memcpy(iv, file->data(w), 4);
  CHECK(iv[0] == 1);
  CHECK(iv[1] == -2);

  const st::TensorInfo& e = file->at("e");
  CHECK(e.dtype == st::DType::U8);
  CHECK(e.shape == std::vector<int64_t>{0, 3});
  CHECK(e.numel() == 0);
  CHECK(file->data(e) == file->data(w) + 4);
}

TEST_CASE("safetensors lookup of absent tensors and foreign ranges", "[io]") {
  const uint8_t one = 7;
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  st::write(path, {{"model.norm.weight", st::DType::U8, {1}, &one}});
  auto file = st::File::open(path);
  CHECK(file->find("missing") == nullptr);
  CHECK_THROWS_WITH(file->at("missing"), Contains(path) && Contains("no tensor 'missing'"));
  st::TensorInfo bogus = file->at("model.norm.weight");
  bogus.end = 1000;
  CHECK_THROWS_WITH(file->data(bogus), Contains(path) && Contains("model.norm.weight"));
}

TEST_CASE("safetensors accepts gaps, padding and zero-size tensors inside others", "[io]") {
  // "z" is empty and sits inside "a"; bytes 4..7 are an unused gap; the header has padding.
  const std::string header = "{\"a\":" + entry("U8", "[4]", "[0,4]") + ",\"z\":" + entry("F32", "[0]", "[2,2]") +
                             ",\"b\":" + entry("U8", "[2]", "[8,10]") + "}   ";
  TempDir dir;
  const std::string path = dir.file("ok.safetensors");
  write_bytes(path, raw_file(header, "abcdXXXXef"));
  auto file = st::File::open(path);
  REQUIRE(file->tensors().size() == 3);
  CHECK(std::string(reinterpret_cast<const char*>(file->data(file->at("b"))), 2) == "ef");
}

TEST_CASE("safetensors rejects truncated files and bad header lengths", "[io]") {
  const std::string ok = "{\"a\":" + entry("U8", "[2]", "[0,2]") + "}";
  check_corrupt({
      {"empty", "", "too few"},
      {"five_bytes", "\x01\x02\x03\x04\x05", "too few"},
      {"length_past_end", le64(ok.size() + 2) + ok + "x", "past the end of the file"},
      {"length_absurd", le64(uint64_t{1} << 40) + ok + "xx", "100 MB"},
      {"length_max", le64(~uint64_t{0}) + ok + "xx", "100 MB"},
      {"zero_length", le64(0) + "xx", "not valid JSON"},
  });
  TempDir dir;
  CHECK_THAT(open_error(dir.file("missing.safetensors")), Contains("missing.safetensors"));
  CHECK_THAT(open_error(dir.file("")), Contains("not a regular file"));  // the directory itself
}

TEST_CASE("safetensors rejects headers that are not a JSON object", "[io]") {
  std::string deep;
  for (int i = 0; i < 1000; ++i) deep += "[";
  check_corrupt({
      {"garbage", raw_file("{not json at all"), "not valid JSON"},
      {"truncated_json", raw_file(R"({"a":{"dtype":"U8")"), "not valid JSON"},
      {"binary", raw_file(std::string("\0\xff\xfe{", 4)), "not valid JSON"},
      {"array", raw_file("[1,2,3]"), "not a JSON object"},
      {"string", raw_file("\"hello\""), "not a JSON object"},
      {"deep", raw_file("{\"a\":" + deep), "nested too deeply"},
      {"metadata_not_object", raw_file(R"({"__metadata__":[1]})"), "__metadata__"},
      {"metadata_not_strings", raw_file(R"({"__metadata__":{"step":12}})"), "'step'"},
  });
}

TEST_CASE("safetensors rejects malformed tensor entries", "[io]") {
  const std::string d2 = "ab";
  auto one = [&](const std::string& e) { return raw_file("{\"t\":" + e + "}", d2); };
  check_corrupt({
      {"entry_not_object", one("[1]"), "tensor 't'"},
      {"missing_dtype", one(R"({"shape":[2],"data_offsets":[0,2]})"), "\"dtype\""},
      {"missing_shape", one(R"({"dtype":"U8","data_offsets":[0,2]})"), "\"shape\""},
      {"missing_offsets", one(R"({"dtype":"U8","shape":[2]})"), "\"data_offsets\""},
      {"dtype_number", one(R"({"dtype":1,"shape":[2],"data_offsets":[0,2]})"), "\"dtype\""},
      {"shape_string", one(entry("U8", "\"2\"", "[0,2]")), "\"shape\""},
      {"shape_float", one(entry("U8", "[2.0]", "[0,2]")), "\"shape\""},
      {"shape_huge", one(entry("U8", "[18446744073709551615]", "[0,2]")), "\"shape\""},
      {"offsets_three", one(entry("U8", "[2]", "[0,1,2]")), "data_offsets"},
      {"offsets_negative", one(entry("U8", "[2]", "[-1,1]")), "data_offsets"},
      {"offsets_strings", one(entry("U8", "[2]", "[\"0\",\"2\"]")), "data_offsets"},
      {"unknown_dtype", one(entry("Q4_K", "[2]", "[0,2]")), "Q4_K"},
      {"negative_dim", one(entry("U8", "[-2]", "[0,2]")), "negative"},
      {"numel_overflow", one(entry("U8", "[4294967296,4294967296]", "[0,2]")), "too many"},
      {"bytes_overflow", one(entry("F64", "[4294967296,1073741824]", "[0,2]")), "too large"},
  });
}

TEST_CASE("safetensors rejects bad data offsets, overlaps and duplicates", "[io]") {
  const std::string data(8, 'd');
  auto two = [&](const std::string& a, const std::string& b) {
    return raw_file("{\"a\":" + a + ",\"b\":" + b + "}", data);
  };
  const std::string a_ok = entry("U8", "[4]", "[0,4]");
  check_corrupt({
      {"begin_after_end", two(a_ok, entry("U8", "[0]", "[6,4]")), "begin after"},
      {"end_past_data", two(a_ok, entry("U8", "[5]", "[4,9]")), "past the end of the data"},
      {"far_past_data", two(a_ok, entry("U8", "[1]", "[18446744073709551614,18446744073709551615]")),
       "past the end of the data"},
      {"size_mismatch", two(a_ok, entry("F32", "[2]", "[4,8]")), "need 8"},
      {"overlap", two(a_ok, entry("U8", "[4]", "[2,6]")), "overlaps"},
      {"same_range", two(a_ok, a_ok), "overlaps"},
      {"duplicate_name", raw_file("{\"a\":" + a_ok + ",\"a\":" + entry("U8", "[4]", "[4,8]") + "}", data), "twice"},
      {"duplicate_field", raw_file(R"({"a":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]}})", data),
       "duplicate key 'dtype'"},
  });
  // The tensor at fault is named, e.g. "x.safetensors: tensor 'b': ...".
  TempDir dir;
  const std::string path = dir.file("x.safetensors");
  write_bytes(path, two(a_ok, entry("U8", "[4]", "[2,6]")));
  CHECK_THAT(open_error(path), Contains(path + ": tensor '"));
}

TEST_CASE("xxh64 gives xxhsum's digests, whole or in pieces", "[io]") {
  // Bytes (31 i + 7) mod 256; each digest is `xxhsum -H64` of such a file (xxHash 0.8.1, Debian 12).
  const std::vector<std::pair<size_t, uint64_t>> golden = {
      {0, 0xef46db3751d8e999},     {1, 0xa96c7f0ce858bbb7},  {3, 0x56e6957632a487f9},   {4, 0xc60d15b1e3ff8f04},
      {7, 0xafbefc3d6c6f9a8e},     {8, 0x3da5c7aa269683e0},  {31, 0x4a74f3a1a39ad4a1},  {32, 0x8d57d6a4671cc43d},
      {33, 0x62c9fd21ed857664},    {64, 0x7bbabbc45729d17e}, {100, 0xefa0ad2d3e70c151}, {1000, 0x99594f4828043d35},
      {100000, 0x3ac9cbc5a9b7f843}};
  std::vector<uint8_t> bytes(100000);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>((31 * i + 7) & 255);
  for (const auto& [n, digest] : golden) {
    INFO("length " << n);
    CHECK(st::xxh64(bytes.data(), n) == digest);
  }
  CHECK(st::xxh64("abc", 3) == 0x44bc2cf5ad770999);

  // A file's checksum is the same however its bytes arrive: tensors of 1, 3, 33 and 1000 bytes
  // streamed in order checksum as the 1037 bytes at once.
  TempDir dir;
  const std::string path = dir.file("s.safetensors");
  {
    st::StreamWriter w(path, {{"a", st::DType::U8, {1}},
                              {"b", st::DType::U8, {3}},
                              {"c", st::DType::U8, {33}},
                              {"d", st::DType::U8, {1000}}});
    size_t at = 0;
    for (const auto& [name, n] :
         std::vector<std::pair<std::string, size_t>>{{"a", 1}, {"b", 3}, {"c", 33}, {"d", 1000}}) {
      w.add(name, bytes.data() + at, n);
      at += n;
    }
    w.commit();
  }
  auto f = st::File::open(path);
  char expected[17];
  std::snprintf(expected, sizeof expected, "%016llx", static_cast<unsigned long long>(st::xxh64(bytes.data(), 1037)));
  CHECK(f->metadata().at(st::kChecksumKey) == expected);
  CHECK(f->verify());
}

TEST_CASE("safetensors verify finds bytes changed after writing, and passes files of other tools", "[io]") {
  TempDir dir;
  std::vector<float> values(50000);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.25f;
  const std::string path = dir.file("w.safetensors");
  st::write(path, {{"w", st::DType::F32, {50000}, values.data()}});
  CHECK(st::File::open(path)->verify());
  const std::string good = read_bytes(path);

  // One bit of one value flipped in place (a disk or transfer error): still finite, the header
  // whole, found only by the checksum.
  std::string bad = good;
  bad[bad.size() - 4 * 1234] ^= 0x01;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bad;
  auto damaged = st::File::open(path);
  CHECK(damaged->tensors().size() == 1);
  auto e = error_of([&] { damaged->verify(); });
  CHECK_THAT(e, Contains(path + ": the data does not match the checksum its writer recorded") &&
                    Contains("the file was damaged after it was written"));

  // A checksum that is none.
  std::string text = good;
  const size_t at = text.find(st::kChecksumKey) + std::strlen(st::kChecksumKey) + 3;
  text[at] = 'X';
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
  CHECK_THAT(error_of([&] { st::File::open(path)->verify(); }),
             Contains(path + ": __metadata__.libllm.data_xxh64") && Contains("is no checksum"));

  // Upper-case hex digits (a hand-made file) are hex digits.
  text = good;
  for (size_t i = at; i < at + 16; ++i) text[i] = static_cast<char>(std::toupper(static_cast<unsigned char>(text[i])));
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
  CHECK(st::File::open(path)->verify());

  // A file without one (another tool's, or an earlier libllm's): nothing to check.
  const std::string header = R"({"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})";
  std::ofstream(path, std::ios::binary | std::ios::trunc) << std::string("\x38\0\0\0\0\0\0\0", 8) << header << "   "
                                                          << "\x01\x02\x03";
  CHECK_FALSE(st::File::open(path)->verify());

  // The same file checked once a process: a second File of it is not read again.
  std::ofstream(path, std::ios::binary | std::ios::trunc) << good;
  CHECK(st::File::open(path)->verify());
  CHECK(st::File::open(path)->verify());
}
