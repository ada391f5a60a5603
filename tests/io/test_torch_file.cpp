// torch.save files (pytorch_model.bin): read against files PyTorch itself wrote
// (tests/fixtures/make_torch_bin.py), and every file it must refuse.
#include "../catch_torch.h"

#include <filesystem>
#include <fstream>

#include "../common.h"
#include "libllm/error.h"
#include "libllm/hf.h"
#include "libllm/safetensors.h"
#include "libllm/torch_file.h"

using namespace libllm;
using libllm::test::error_of;
using libllm::test::fixture;
namespace fs = std::filesystem;

namespace {

torch::Tensor expected_tensor(const std::string& name) {
  auto f = safetensors::File::open(fixture("torch-bin/odd_expected.safetensors"));
  const auto& info = f->at(name);
  return torch::from_blob(const_cast<uint8_t*>(f->data(info)), info.shape, torch_dtype_of(info.dtype)).clone();
}

bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && torch::equal(a, b);
}

}  // namespace

TEST_CASE("torch.save files: every dtype, shared storages, views, scalars, parameters", "[io][torch_file]") {
  auto f = torchfile::File::open(fixture("torch-bin/odd.bin"));
  std::vector<std::string> names;
  for (const auto& t : f->tensors()) names.push_back(t.name);
  CHECK(names == std::vector<std::string>{"f32", "f32_again", "f32_rows", "f32_t", "f32_cols", "f16", "bf16", "f64",
                                          "i64", "i32", "i16", "i8", "u8", "bool", "scalar", "empty", "param"});
  auto read = [&](const std::string& n) {
    const auto* info = f->find(n);
    REQUIRE(info);
    return f->read(*info);
  };
  // Floats bit for bit against the contiguous copies PyTorch wrote with safetensors' layout.
  for (const std::string n :
       {"f32", "f32_again", "f32_rows", "f32_t", "f32_cols", "f16", "bf16", "f64", "scalar", "empty", "param"}) {
    INFO(n);
    CHECK(same_bits(read(n), expected_tensor(n)));
  }
  // The views keep their layout in the one storage of f32.
  const auto* t = f->find("f32_t");
  CHECK(t->shape == std::vector<int64_t>{6, 4});
  CHECK(t->stride == std::vector<int64_t>{1, 6});
  CHECK(f->find("f32_cols")->offset == 2);
  CHECK(f->find("f32_cols")->stride == std::vector<int64_t>{6, 2});
  CHECK(f->find("f32_rows")->storage == f->find("f32")->storage);
  CHECK(f->find("f32_rows")->offset == 6);
  CHECK(read("scalar").dim() == 0);
  CHECK(read("scalar").item<float>() == 2.5f);
  CHECK(read("empty").sizes() == c10::IntArrayRef{0, 3});
  CHECK(torch::equal(read("i64"), torch::arange(-3, 5, torch::kInt64).view({2, 4})));
  CHECK(torch::equal(read("i32"), torch::tensor({1, -2, 2147483647}, torch::kInt32)));
  CHECK(torch::equal(read("i16"), torch::tensor({-300, 7}, torch::kInt16)));
  CHECK(torch::equal(read("i8"), torch::tensor({-128, 0, 127}, torch::kInt8)));
  CHECK(torch::equal(read("u8"), torch::tensor({0, 200, 255}, torch::kUInt8)));
  CHECK(torch::equal(read("bool"), torch::tensor({true, false, true}, torch::kBool)));
  CHECK(f->find("nothing") == nullptr);
}

TEST_CASE("torch.save with pickle protocol 4 reads as protocol 2", "[io][torch_file]") {
  auto a = torchfile::File::open(fixture("torch-bin/odd.bin"));
  auto b = torchfile::File::open(fixture("torch-bin/odd4.bin"));
  REQUIRE(a->tensors().size() == b->tensors().size());
  for (size_t i = 0; i < a->tensors().size(); ++i) {
    INFO(a->tensors()[i].name);
    CHECK(b->tensors()[i].name == a->tensors()[i].name);
    CHECK(same_bits(a->read(a->tensors()[i]), b->read(b->tensors()[i])));
  }
}

TEST_CASE("crafted torch.save files are errors, never crashes or wrong data", "[io][torch_file]") {
  auto open = [](const std::string& name) {
    return error_of([&] { torchfile::File::open(fixture("torch-bin/" + name)); });
  };
  // Sizes 2^62 x 4 with strides (4, 2^62): the last element's index overflows int64.
  CHECK_THAT(open("overflow.bin"),
             Catch::Contains("overflow.bin: tensor 'x'") && Catch::Contains("lies outside its storage of 24 elements"));
  // One storage declared as float32 by one tensor and int32 by another.
  CHECK_THAT(open("two_types.bin"), Catch::Contains("tensor 'y'") && Catch::Contains("size or type"));
  // A million nested tuples (a deflated record): read without recursion, then refused.
  CHECK_THAT(open("deep.bin"), Catch::Contains("deep.bin: holds a tuple, not a dict of tensors"));
  CHECK_THAT(open("cycle.bin"), Catch::Contains("cycle.bin: tensor 'x'") && Catch::Contains("is a list, not a tensor"));
  CHECK_THAT(open("no_stop.bin"), Catch::Contains("no_stop.bin: data.pkl") && Catch::Contains("ends early"));
  CHECK_THAT(open("opcode.bin"), Catch::Contains("pickle opcode 0x49 at byte 2"));
  CHECK_THAT(open("memo.bin"),
             Catch::Contains("memo.bin: data.pkl") && Catch::Contains("more than 4000000 values or references"));
  // A record shorter than its storage: opens (only the pickle is read), then fails to read.
  auto f = torchfile::File::open(fixture("torch-bin/short_record.bin"));
  CHECK_THAT(error_of([&] { f->read(f->tensors().at(0)); }),
             Catch::Contains("tensor 'x'") && Catch::Contains("its storage holds 96 bytes, not 4000"));
}

TEST_CASE("torch.save zips: zip64 directories, misaligned and compressed records, sizes checked first",
          "[io][torch_file]") {
  const torch::Tensor f32 = expected_tensor("f32");
  // Every size and offset in zip64 fields (as torch.save writes files over 4 GiB), records
  // 64-byte aligned: the tensor is read in place from the mapping.
  auto z = torchfile::File::open(fixture("torch-bin/zip64.bin"));
  torch::Tensor x = z->read(z->tensors().at(0));
  CHECK(same_bits(x, f32));
  CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 64 == 0);
  // Released pages are read back from the file.
  z->release(z->tensors().at(0));
  CHECK(same_bits(z->read(z->tensors().at(0)), f32));
  // A record another zip writer left at an odd offset: copied into aligned memory.
  auto u = torchfile::File::open(fixture("torch-bin/unaligned.bin"));
  x = u->read(u->tensors().at(0));
  CHECK(same_bits(x, f32));
  CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0);
  // A deflated storage: named, with the tensor that needs it.
  auto d = torchfile::File::open(fixture("torch-bin/deflated_storage.bin"));
  CHECK_THAT(error_of([&] { d->read(d->tensors().at(0)); }), Catch::Contains("deflated_storage.bin: tensor 'x'") &&
                                                                 Catch::Contains("record data/0 is compressed") &&
                                                                 Catch::Contains("torch.save never writes"));
  // A data.pkl whose directory entry claims 2 GiB: refused from the directory, before inflating.
  CHECK_THAT(error_of([] { torchfile::File::open(fixture("torch-bin/big_pickle.bin")); }),
             Catch::Contains("big_pickle.bin: data.pkl") && Catch::Contains("is 2147483648 bytes"));
  CHECK_THAT(error_of([] { torchfile::File::open(fixture("torch-bin/twice.bin")); }),
             Catch::Contains("twice.bin: is not a readable zip archive: record twice/data.pkl appears twice"));
  // A storage whose local header is damaged (the directory intact): the error names the tensor.
  test::TempDir tmp;
  std::string odd = test::read_file(fixture("torch-bin/odd.bin"));
  const std::string key = torchfile::File::open(fixture("torch-bin/odd.bin"))->find("f32")->storage;
  const size_t local = odd.find("odd/data/" + key);  // (the local header's name comes first)
  REQUIRE(local != std::string::npos);
  odd[local - 30] = 'X';
  test::write_file(tmp / "damaged.bin", odd);
  auto damaged = torchfile::File::open(tmp / "damaged.bin");
  CHECK_THAT(error_of([&] { damaged->read(*damaged->find("f32")); }),
             Catch::Contains("damaged.bin: tensor 'f32'") && Catch::Contains("has a bad local header"));
  // Its extra-field length grown to 64 KiB (the bytes would start past the record's end), or moved
  // by 8 bytes either way (within torch.save's padding: its entries no longer fill the field), and
  // its name changed: each refused, not read from elsewhere.
  for (const int edit : {0, -8, 8, 1}) {
    std::string bad = test::read_file(fixture("torch-bin/odd.bin"));
    const size_t at = local - 30 + 28;  // (the extra field's length, 2 bytes little-endian)
    const int m = static_cast<unsigned char>(bad[at]) | static_cast<unsigned char>(bad[at + 1]) << 8;
    const int moved = edit == 0 ? 0xffff : m + edit * (edit == 1 ? 0 : 1);
    bad[at] = static_cast<char>(moved & 0xff);
    bad[at + 1] = static_cast<char>(moved >> 8);
    if (edit == 1) bad[local] = 'X';
    test::write_file(tmp / "moved-data.bin", bad);
    auto f = torchfile::File::open(tmp / "moved-data.bin");
    CHECK_THAT(error_of([&] { f->read(*f->find("f32")); }),
               Catch::Contains("moved-data.bin: tensor 'f32'") && (Catch::Contains("has a damaged local header") ||
                                                                   Catch::Contains("local header runs past the end")));
  }
  // A zip cut short inside its central directory, and one whose directory points past its end.
  const std::string zip64 = test::read_file(fixture("torch-bin/zip64.bin"));
  test::write_file(tmp / "cut.bin", zip64.substr(0, zip64.size() - 30));
  CHECK_THAT(error_of([&] { torchfile::File::open(tmp / "cut.bin"); }),
             Catch::Contains("cut.bin: is not a readable zip archive"));
  std::string moved = zip64;
  // The zip64 end record (56 bytes, then a 20-byte locator and the 22-byte end record): the top
  // byte of its directory offset (at 48).
  moved[moved.size() - 98 + 48 + 7] = '\x7f';
  test::write_file(tmp / "moved.bin", moved);
  CHECK_THAT(error_of([&] { torchfile::File::open(tmp / "moved.bin"); }),
             Catch::Contains("moved.bin: is not a readable zip archive: the central directory runs past the end"));
}

TEST_CASE("a pytorch_model.bin folder loads as its safetensors twin", "[io][torch_file]") {
  // tiny-llama-bin: one file, an OrderedDict with _metadata and rotary inv_freq buffers (ignored);
  // tiny-mixtral-bin: BF16, two plain-dict shards and pytorch_model.bin.index.json.
  for (const std::string name : {"tiny-llama", "tiny-mixtral"}) {
    INFO(name);
    auto a = read_weights(fixture(name)), b = read_weights(fixture(name + "-bin"));
    size_t inv_freq = 0;
    for (const auto& [n, t] : b) {
      if (n.find("rotary_emb.inv_freq") != std::string::npos) {
        ++inv_freq;
        continue;
      }
      INFO(n);
      REQUIRE(a.count(n));
      CHECK(same_bits(a.at(n), t));
    }
    CHECK(a.size() + inv_freq == b.size());
    CHECK(inv_freq == (name == "tiny-llama" ? 2 : 0));
    Pretrained p = load_pretrained(fixture(name + "-bin"), torch::kFloat32);
    Pretrained q = load_pretrained(fixture(name), torch::kFloat32);
    auto ids = test::tokens_from_json(test::expected()[name]["input_ids"]);
    torch::NoGradGuard no_grad;
    CHECK(torch::equal(p.model->forward(ids).logits, q.model->forward(ids).logits));
  }
}

TEST_CASE("torch.save files that are not a dict of tensors are refused, and nothing in them runs", "[io][torch_file]") {
  fs::remove("/tmp/libllm-torch-bin-code-ran");
  const std::string code = error_of([] { torchfile::File::open(fixture("torch-bin/code.bin")); });
  CHECK_THAT(code, Catch::Contains("code.bin: data.pkl") && Catch::Contains("posix.system") &&
                       Catch::Contains("it is not run"));
  CHECK_FALSE(fs::exists("/tmp/libllm-torch-bin-code-ran"));
  CHECK_THAT(error_of([] { torchfile::File::open(fixture("torch-bin/legacy.bin")); }),
             Catch::Contains("legacy format (PyTorch < 1.6)") && Catch::Contains("hint:"));
  CHECK_THAT(error_of([] { torchfile::File::open(fixture("torch-bin/list.bin")); }),
             Catch::Contains("list.bin: holds a list, not a dict of tensors"));
  CHECK_THAT(error_of([] { torchfile::File::open(fixture("torch-bin/int_keys.bin")); }),
             Catch::Contains("int_keys.bin: has a key of type int"));
  CHECK_THAT(error_of([] { torchfile::File::open(fixture("torch-bin/complex.bin")); }),
             Catch::Contains("complex.bin: data.pkl: holds tensors of type torch.ComplexFloatStorage") &&
                 Catch::Contains("libllm reads float32/64, float16, bfloat16"));

  test::TempDir tmp;
  const std::string odd = test::read_file(fixture("torch-bin/odd.bin"));
  test::write_file(tmp / "half.bin", odd.substr(0, odd.size() / 2));
  CHECK_THAT(error_of([&] { torchfile::File::open(tmp / "half.bin"); }),
             Catch::Contains("half.bin: is not a readable zip archive") && Catch::Contains("corrupt or truncated"));
  test::write_file(tmp / "text.bin", "version https://git-lfs.github.com/spec/v1\n");
  CHECK_THAT(error_of([&] { torchfile::File::open(tmp / "text.bin"); }),
             Catch::Contains("text.bin: is not a torch.save file (not a zip archive)"));
  CHECK_THAT(error_of([&] { torchfile::File::open(tmp / "absent.bin"); }),
             Catch::Contains("absent.bin: cannot open file"));

  // A shard index naming a tensor its shard lacks; a folder without weights.
  fs::copy(fixture("tiny-mixtral-bin"), tmp / "mix");
  std::string index = test::read_file(tmp / "mix/pytorch_model.bin.index.json");
  const std::string from = "\"lm_head.weight\": \"pytorch_model-00002-of-00002.bin\"";
  REQUIRE(index.find(from) != std::string::npos);
  index.replace(index.find(from), from.size(), "\"lm_head.weight\": \"pytorch_model-00001-of-00002.bin\"");
  test::write_file(tmp / "mix/pytorch_model.bin.index.json", index);
  CHECK_THAT(error_of([&] { load_pretrained(tmp / "mix"); }),
             Catch::Contains("pytorch_model-00001-of-00002.bin: tensor 'lm_head.weight'") &&
                 Catch::Contains("listed in the index but not in the shard"));
  fs::create_directories(tmp / "empty");
  fs::copy_file(fixture("tiny-llama/config.json"), tmp / "empty/config.json");
  CHECK_THAT(error_of([&] { load_pretrained(tmp / "empty"); }), Catch::Contains("pytorch_model.bin(.index.json)"));
}
