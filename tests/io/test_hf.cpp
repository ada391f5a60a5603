// Hugging Face folders: config.json mapping, bit-exact import -> export, sharding, atomic
// export, and every kind of bad checkpoint giving a clear error.
#include "../catch_torch.h"

#include <algorithm>
#include <filesystem>

#include "../common.h"
#include "libllm/error.h"
#include "libllm/hf.h"
#include "libllm/safetensors.h"
#include "libllm/tokenizer.h"

using namespace libllm;
using libllm::test::listing;
using libllm::test::read_file;
using libllm::test::write_file;
using libllm::test::error_of;
using libllm::test::fixture;
namespace fs = std::filesystem;

namespace {

// Copies a fixture folder, then rewrites its weights through `edit` (name -> tensor map).
void copy_with_weights(const std::string& name, const std::string& dst,
                       const std::function<void(std::map<std::string, torch::Tensor>&)>& edit) {
  fs::create_directories(dst);
  fs::copy_file(fixture(name + "/config.json"), dst + "/config.json");
  auto w = read_weights(fixture(name));
  edit(w);
  std::vector<safetensors::TensorView> views;
  std::vector<torch::Tensor> keep;
  for (auto& [n, t] : w) {
    keep.push_back(t.contiguous());
    const auto dtype = t.scalar_type() == torch::kInt32 ? safetensors::DType::I32 : safetensors::DType::F32;
    views.push_back({n, dtype, t.sizes().vec(), keep.back().data_ptr()});
  }
  safetensors::write(dst + "/model.safetensors", views);
}

}  // namespace

TEST_CASE("config.json maps onto the model config", "[io][hf]") {
  HfConfig llama = read_hf_config(fixture("tiny-llama"));
  CHECK(llama.architecture == "LlamaForCausalLM");
  CHECK(llama.model.dim == 64);
  CHECK(llama.model.n_layers == 2);
  CHECK(llama.model.kv_heads() == 2);
  CHECK(llama.model.max_seq_len == 48);
  CHECK(!llama.model.tie_embeddings);
  HfConfig mistral = read_hf_config(fixture("tiny-mistral"));
  CHECK(mistral.model.sliding_window == 8);
  CHECK(mistral.model.tie_embeddings);
  CHECK(mistral.model.kv_heads() == 1);
  CHECK(mistral.torch_dtype == "float16");
  HfConfig mixtral = read_hf_config(fixture("tiny-mixtral"));
  CHECK(mixtral.model.n_experts == 4);
  CHECK(mixtral.model.n_experts_per_token == 2);
  CHECK(mixtral.model.moe_aux_loss_coef == Approx(0.02));
  CHECK(mixtral.model.hf_architecture() == "MixtralForCausalLM");
}

TEST_CASE("import -> export is bit-exact for every dtype and layout", "[io][hf]") {
  test::TempDir tmp;
  for (const std::string name : {"tiny-llama", "tiny-mistral", "tiny-mixtral"}) {
    INFO(name);
    HfConfig cfg = read_hf_config(fixture(name));
    Pretrained p = load_pretrained(fixture(name), dtype_from_name(cfg.torch_dtype, "config"));
    ExportOptions opts;
    opts.dtype = cfg.torch_dtype;
    opts.max_shard_bytes = 40000;  // force several shards
    opts.tokenizer_path = fixture(name + "/tokenizer.model");
    const std::string out = tmp / name;
    export_hf(p.model, out, opts);
    CHECK(fs::exists(out + "/model.safetensors.index.json"));
    auto a = read_weights(fixture(name)), b = read_weights(out);
    REQUIRE(a.size() == b.size());
    for (auto& [n, t] : a) {
      INFO(n);
      REQUIRE(b.count(n));
      CHECK(b[n].scalar_type() == t.scalar_type());
      CHECK(torch::equal(b[n], t));  // same bits
    }
    HfConfig back = read_hf_config(out);
    CHECK(back.architecture == cfg.architecture);
    CHECK(back.model.sliding_window == cfg.model.sliding_window);
    CHECK(back.model.tie_embeddings == cfg.model.tie_embeddings);
    CHECK(back.model.norm_eps == cfg.model.norm_eps);
    CHECK(back.model.rope_theta == cfg.model.rope_theta);
    CHECK(read_file(out + "/tokenizer.model") == read_file(fixture(name + "/tokenizer.model")));
  }
}

TEST_CASE("the shard index lists every tensor and the total size", "[io][hf]") {
  test::TempDir tmp;
  Pretrained p = load_pretrained(fixture("tiny-llama"));
  ExportOptions opts;
  opts.dtype = "float32";
  opts.max_shard_bytes = 100000;
  export_hf(p.model, tmp / "out", opts);
  auto index = nlohmann::json::parse(read_file(tmp / "out/model.safetensors.index.json"));
  int64_t total = 0, count = 0;
  for (auto& t : p.model->parameters()) total += t.numel() * 4, ++count;
  CHECK(index["metadata"]["total_size"].get<int64_t>() == total);
  CHECK(static_cast<int64_t>(index["weight_map"].size()) == count);
}

TEST_CASE("export replaces an existing folder only when complete", "[io][hf]") {
  test::TempDir tmp;
  Pretrained p = load_pretrained(fixture("tiny-llama"));
  const std::string out = tmp / "model";
  ExportOptions f32;
  f32.dtype = "float32";
  export_hf(p.model, out, f32);
  const std::string before = read_file(out + "/config.json");
  ExportOptions bad;
  bad.tokenizer_path = tmp / "missing.model";  // fails after the weights are written
  CHECK_THAT(error_of([&] { export_hf(p.model, out, bad); }), Catch::Contains("missing.model"));
  CHECK(read_file(out + "/config.json") == before);  // the previous export is intact
  CHECK(listing(tmp.path.string()) == std::vector<std::string>{"model"});  // no .partial or .old folder beside it
  // What a killed export (Ctrl-C) leaves: removed by the next export to that folder when its
  // marker names this host and a process that is gone; a live process's (pid 1), another host's,
  // one without the marker (a user's folder) and other names stay.
  const pid_t child = ::fork(), other = ::fork();
  if (child == 0 || other == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);  // (reaped: gone)
  ::waitpid(other, nullptr, 0);
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  const std::string dead = out + ".partial." + std::to_string(child);
  const std::string elsewhere = out + ".partial." + std::to_string(other);
  for (const std::string& d : {dead, elsewhere, out + ".partial.1", out + ".partial.x", out + ".partial.20240101"}) {
    fs::create_directories(d);
    write_file(d + "/model.safetensors", "half");
  }
  write_file(dead + "/.libllm-export-in-progress", std::string(host) + " " + std::to_string(child) + "\n");
  write_file(elsewhere + "/.libllm-export-in-progress", "another-node " + std::to_string(other) + "\n");
  write_file(out + ".partial.1/.libllm-export-in-progress", std::string(host) + " 1\n");
  std::string note;
  note = test::stderr_of([&] { export_hf(p.model, out, ExportOptions{}); });  // bfloat16: replaces the float32 export
  CHECK(note == "note: removed " + dead + ", left by an interrupted export\n");
  CHECK(read_hf_config(out).torch_dtype == "bfloat16");
  CHECK(fs::exists(out + "/model.safetensors"));
  std::vector<std::string> left = {"model", "model.partial." + std::to_string(other), "model.partial.1",
                                   "model.partial.20240101", "model.partial.x"};
  std::sort(left.begin(), left.end());
  CHECK(listing(tmp.path.string()) == left);
  CHECK_FALSE(fs::exists(out + "/.libllm-export-in-progress"));  // (the export itself holds no marker)
  for (size_t i = 1; i < left.size(); ++i) fs::remove_all(tmp / left[i]);
  // A filesystem without RENAME_EXCHANGE (NFS): a kill between the two renames leaves the earlier
  // export stepped aside and the new one beside it, both marked: the next export puts the earlier
  // one back first, then replaces it.
  const std::string aside = out + ".old." + std::to_string(child), marker = "/.libllm-export-in-progress";
  fs::rename(out, aside);
  write_file(aside + marker, std::string(host) + " " + std::to_string(child) + "\n");
  fs::create_directories(dead);
  write_file(dead + "/config.json", "{}");
  write_file(dead + marker, std::string(host) + " " + std::to_string(child) + "\n");
  note = test::stderr_of([&] { export_hf(p.model, out, f32); });
  CHECK_THAT(note,
             Catch::Contains("note: put " + aside + " back as " + out + ": an interrupted export had moved it aside") &&
                 Catch::Contains("note: removed " + dead + ", left by an interrupted export"));
  CHECK(listing(tmp.path.string()) == std::vector<std::string>{"model"});
  CHECK(read_hf_config(out).torch_dtype == "float32");
  CHECK_FALSE(fs::exists(out + marker));
  // The earlier export put back is checked as any folder it would replace: a PEFT adapter folder
  // written there is refused, as it is when nothing was interrupted.
  fs::rename(out, aside);
  write_file(aside + marker, std::string(host) + " " + std::to_string(child) + "\n");
  bool filled = false;
  CHECK_THAT(error_of([&] {
               write_folder_atomically(out, FolderKind::peft_adapter, [&](const std::string&) { filled = true; });
             }),
             Catch::Contains("is not empty and not an earlier PEFT adapter folder"));
  CHECK_FALSE(filled);
  CHECK(read_hf_config(out).torch_dtype == "float32");
  // A .partial folder killed before its marker was written (empty) goes too.
  fs::create_directories(dead);
  test::stderr_of([&] { export_hf(p.model, out, f32); });
  CHECK(listing(tmp.path.string()) == std::vector<std::string>{"model"});
  // A marker left in place (a kill right after the move) does not make the folder someone else's.
  write_file(out + marker, std::string(host) + " " + std::to_string(child) + "\n");
  export_hf(p.model, out, ExportOptions{});
  CHECK(read_hf_config(out).torch_dtype == "bfloat16");
  CHECK_FALSE(fs::exists(out + marker));
  // An empty folder is replaced too.
  fs::create_directories(tmp / "empty");
  export_hf(p.model, tmp / "empty", f32);
  CHECK(fs::exists(tmp / "empty/config.json"));
}

TEST_CASE("export never replaces a folder that is not an earlier export of its kind", "[io][hf]") {
  test::TempDir tmp;
  Pretrained p = load_pretrained(fixture("tiny-llama"));
  const std::string not_replaced = "so it is not replaced (hint: write to another folder, or remove this one first)";
  // A run folder with checkpoints (llm-export --checkpoint ... --out RUN_DIR).
  const std::string run = tmp / "run";
  fs::create_directories(run + "/checkpoints/step-00000004");
  write_file(run + "/checkpoints/step-00000004/trainer.json", "{}");
  CHECK_THAT(error_of([&] { export_hf(p.model, run, ExportOptions{}); }),
             Catch::StartsWith(run + ": is not empty and not an earlier Hugging Face export (it holds the folder "
                                     "'checkpoints')") &&
                 Catch::Contains(not_replaced));
  CHECK(read_file(run + "/checkpoints/step-00000004/trainer.json") == "{}");
  // An export with a file of the user's beside it; a config.json without weights; a file.
  ExportOptions f32;
  f32.dtype = "float32";
  export_hf(p.model, tmp / "hf", f32);
  write_file(tmp / "hf/notes.txt", "mine");
  CHECK_THAT(error_of([&] { export_hf(p.model, tmp / "hf", f32); }),
             Catch::Contains("not an earlier Hugging Face export (it holds 'notes.txt')") && Catch::Contains(not_replaced));
  CHECK(read_file(tmp / "hf/notes.txt") == "mine");
  fs::create_directories(tmp / "config-only");
  fs::copy_file(fixture("tiny-llama/config.json"), tmp / "config-only/config.json");
  CHECK_THAT(error_of([&] { export_hf(p.model, tmp / "config-only", f32); }),
             Catch::Contains("(no config.json with model*.safetensors)"));
  write_file(tmp / "file", "x");
  CHECK_THAT(error_of([&] { export_hf(p.model, tmp / "file", f32); }),
             Catch::Contains("file: exists and is not a folder, so it is not replaced"));
  CHECK(read_file(tmp / "file") == "x");
  // A sharded export is an earlier export.
  f32.max_shard_bytes = 40000;
  export_hf(p.model, tmp / "sharded", f32);
  REQUIRE(fs::exists(tmp / "sharded/model.safetensors.index.json"));
  f32.max_shard_bytes = ExportOptions{}.max_shard_bytes;
  export_hf(p.model, tmp / "sharded", f32);
  CHECK(!fs::exists(tmp / "sharded/model.safetensors.index.json"));
  CHECK(fs::exists(tmp / "sharded/model.safetensors"));
  // An HF export and a PEFT adapter folder never replace each other (llm-export --out X --adapter X).
  LoraConfig cfg;
  apply_lora(p.model, cfg);
  export_peft_adapter(p.model, cfg, tmp / "adapter", "base");
  CHECK_THAT(error_of([&] { export_hf(p.model, tmp / "adapter", f32); }),
             Catch::Contains("adapter: is not empty and not an earlier Hugging Face export (it holds 'adapter_"));
  CHECK(fs::exists(tmp / "adapter/adapter_model.safetensors"));
  CHECK_THAT(error_of([&] { export_peft_adapter(p.model, cfg, tmp / "hf", "base"); }),
             Catch::Contains("hf: is not empty and not an earlier PEFT adapter folder"));
  CHECK(fs::exists(tmp / "hf/config.json"));
  export_peft_adapter(p.model, cfg, tmp / "adapter", "base");  // an earlier adapter is replaced
  CHECK(fs::exists(tmp / "adapter/adapter_config.json"));
  // A model saved by transformers (a downloaded base: the same file names, weights not written by
  // libllm's export) is never replaced.
  fs::create_directories(tmp / "base");
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.model"})
    fs::copy_file(fixture(std::string("tiny-llama/") + f), fs::path(tmp / "base") / f);
  CHECK_THAT(error_of([&] { export_hf(p.model, tmp / "base", f32); }),
             Catch::Contains("base: is not empty and not an earlier Hugging Face export (its model.safetensors was "
                             "not written by libllm's export: a model of its own, such as a downloaded base") &&
                 Catch::Contains(not_replaced));
  CHECK(read_file(tmp / "base/model.safetensors") == read_file(fixture("tiny-llama/model.safetensors")));
  // An export of an earlier libllm (unmarked weights; config.json without the transformers_version
  // that save_pretrained always writes) is replaced.
  fs::create_directories(tmp / "old");
  fs::copy_file(fixture("tiny-llama/model.safetensors"), tmp / "old/model.safetensors");
  auto config = nlohmann::json::parse(read_file(fixture("tiny-llama/config.json")));
  REQUIRE(config.erase("transformers_version") == 1);
  write_file(tmp / "old/config.json", config.dump());
  export_hf(p.model, tmp / "old", f32);
  CHECK(safetensors::File::open(tmp / "old/model.safetensors")->metadata().at("written_by") == "libllm");
  CHECK(safetensors::File::open(tmp / "hf/model.safetensors")->metadata().at("written_by") == "libllm");
  CHECK(listing(tmp.path.string()) == std::vector<std::string>{"adapter", "base", "config-only", "file", "hf", "old",
                                                               "run", "sharded"});  // nothing left beside
}

TEST_CASE("a folder's stop ids: every eos_token_id of config.json and generation_config.json", "[io][hf]") {
  test::TempDir tmp;
  CHECK(stop_token_ids(tmp.path.string()).empty());
  write_file(tmp / "config.json", R"({"eos_token_id": 32000})");
  CHECK(stop_token_ids(tmp.path.string()) == std::vector<int64_t>{32000});
  write_file(tmp / "generation_config.json", R"({"eos_token_id": [2, 32000, 7]})");
  CHECK(stop_token_ids(tmp.path.string()) == std::vector<int64_t>{32000, 2, 7});
  write_file(tmp / "config.json", R"({"eos_token_id": null})");
  CHECK(stop_token_ids(tmp.path.string()) == std::vector<int64_t>{2, 32000, 7});
  // A damaged file is an error, not a silent loss of its stop ids (a chat model would not stop).
  write_file(tmp / "generation_config.json", R"({"eos_token_id": "x"})");
  CHECK_THAT(test::error_of([&] { stop_token_ids(tmp.path.string()); }),
             Catch::Contains("generation_config.json: eos_token_id: is \"x\", expected a token id"));
  write_file(tmp / "generation_config.json", "{bad");
  CHECK_THAT(test::error_of([&] { stop_token_ids(tmp.path.string()); }),
             Catch::Contains("generation_config.json: is not a JSON object"));
}

TEST_CASE("export keeps the source's generation settings, with the exported bos and eos", "[io][hf]") {
  test::TempDir tmp;
  Pretrained p = load_pretrained(fixture("tiny-llama"));
  write_file(tmp / "gen.json", R"({"temperature": 0.6, "top_p": 0.9, "max_length": 4096, "do_sample": true,
                                   "bos_token_id": 7, "eos_token_id": [5, 2]})");
  ExportOptions opts;
  opts.generation_config = tmp / "gen.json";
  export_hf(p.model, tmp / "a", opts);
  auto gen = nlohmann::json::parse(read_file(tmp / "a/generation_config.json"));
  CHECK(gen["temperature"] == 0.6);
  CHECK(gen["top_p"] == 0.9);
  CHECK(gen["max_length"] == 4096);
  CHECK(gen["do_sample"] == true);
  CHECK(gen["bos_token_id"] == 1);
  CHECK(gen["eos_token_id"] == nlohmann::json({5, 2}));  // holds the exported eos (2): kept
  opts.eos_id = 3;
  opts.tokenizer_path = fixture("tiny-llama/tokenizer.model");
  export_hf(p.model, tmp / "b", opts);
  // The exported eos first, then the source's stop ids (a chat base's end of turn); config.json
  // lists the same ids, and reads back with eos 3.
  CHECK(nlohmann::json::parse(read_file(tmp / "b/generation_config.json"))["eos_token_id"] ==
        nlohmann::json({3, 5, 2}));
  CHECK(nlohmann::json::parse(read_file(tmp / "b/config.json"))["eos_token_id"] == nlohmann::json({3, 5, 2}));
  CHECK(read_hf_config(tmp / "b").eos_id == 3);
  CHECK(stop_token_ids(tmp / "b") == std::vector<int64_t>{3, 5, 2});
  // tokenizer_config.json names the exported ids' pieces, so that tokenizer.eos_token_id agrees
  // with config.json; an id beyond tokenizer.model keeps its own piece.
  const Tokenizer tok = Tokenizer::load(opts.tokenizer_path);
  REQUIRE(tok.piece(3) != tok.piece(tok.eos_id()));
  auto tc = nlohmann::json::parse(read_file(tmp / "b/tokenizer_config.json"));
  CHECK(tc["eos_token"] == tok.piece(3));
  CHECK(tc["bos_token"] == tok.piece(1));
  CHECK_FALSE(tc.contains("pad_token"));
  // special_tokens_map.json names the same tokens (some tools read it instead).
  auto special = nlohmann::json::parse(read_file(tmp / "b/special_tokens_map.json"));
  CHECK(special ==
        nlohmann::json{{"bos_token", tok.piece(1)}, {"eos_token", tok.piece(3)}, {"unk_token", tok.piece(0)}});
  // The fast tokenizer's file beside it, as Tokenizer::hf_tokenizer_json writes it.
  CHECK(read_file(tmp / "b/tokenizer.json") == tok.hf_tokenizer_json());
  // An id past this model's vocabulary is an error; past tokenizer.model's only (a padded model
  // vocabulary), tokenizer_config.json names tokenizer.model's own eos.
  opts.eos_id = tok.vocab_size() + 5;
  CHECK_THAT(error_of([&] { export_hf(p.model, tmp / "c", opts); }),
             Catch::Contains("the eos id " + std::to_string(opts.eos_id) + " is outside the model's vocabulary [0, " +
                             std::to_string(tok.vocab_size()) + ")"));
  CHECK(!fs::exists(tmp / "c"));
  ModelConfig padded = p.model->config();
  padded.vocab_size = tok.vocab_size() + 16;
  Transformer wide(padded);
  export_hf(wide, tmp / "b", opts);
  tc = nlohmann::json::parse(read_file(tmp / "b/tokenizer_config.json"));
  CHECK(tc["eos_token"] == tok.piece(tok.eos_id()));
  CHECK(read_hf_config(tmp / "b").eos_id == opts.eos_id);
  // A source's stop id past the model's vocabulary is left out (the export must read back).
  opts.eos_id = 3;
  opts.stop_ids = {tok.vocab_size() + 100};
  export_hf(p.model, tmp / "b", opts);
  CHECK(read_hf_config(tmp / "b").eos_id == 3);
  CHECK(stop_token_ids(tmp / "b") == std::vector<int64_t>{3, 5, 2});
  opts.stop_ids.clear();
  // A pad token that is one of tokenizer.model's pieces is named; another is left out (a server
  // would add it to the vocabulary).
  opts.eos_id = 3;
  opts.pad_token = tok.piece(0);
  export_hf(p.model, tmp / "b", opts);
  CHECK(nlohmann::json::parse(read_file(tmp / "b/tokenizer_config.json"))["pad_token"] == tok.piece(0));
  CHECK(nlohmann::json::parse(read_file(tmp / "b/special_tokens_map.json"))["pad_token"] == tok.piece(0));
  opts.pad_token = "<pad-not-a-piece>";
  export_hf(p.model, tmp / "b", opts);
  CHECK_FALSE(nlohmann::json::parse(read_file(tmp / "b/tokenizer_config.json")).contains("pad_token"));
  opts.pad_token.clear();
  write_file(tmp / "gen.json", R"({"eos_token_id": 9})");
  export_hf(p.model, tmp / "b", opts);
  CHECK(nlohmann::json::parse(read_file(tmp / "b/generation_config.json"))["eos_token_id"] == nlohmann::json({3, 9}));
  write_file(tmp / "gen.json", R"({"eos_token_id": 3})");
  export_hf(p.model, tmp / "b", opts);
  CHECK(nlohmann::json::parse(read_file(tmp / "b/generation_config.json"))["eos_token_id"] == 3);
  // The source config.json's stop ids (stop_token_ids) follow: a list there is kept.
  opts.stop_ids = {2, 250, 3};
  export_hf(p.model, tmp / "b", opts);
  CHECK(nlohmann::json::parse(read_file(tmp / "b/generation_config.json"))["eos_token_id"] ==
        nlohmann::json({3, 2, 250}));
  opts.stop_ids.clear();
  opts.tokenizer_path.clear();
  write_file(tmp / "gen.json", "[1]");
  CHECK_THAT(error_of([&] { export_hf(p.model, tmp / "c", opts); }),
             Catch::Contains("gen.json: expected a JSON object"));
  CHECK(!fs::exists(tmp / "c"));
}

TEST_CASE("an export whose weights do not fit its dtype, or hold NaN, is refused naming the tensor", "[io][hf]") {
  test::TempDir tmp;
  Pretrained p = load_pretrained(fixture("tiny-llama"));
  {
    torch::NoGradGuard ng;
    p.model->parameters().back().view(-1)[0].fill_(1e6);  // (fp16's largest is 65504)
  }
  ExportOptions f16;
  f16.dtype = "float16";
  CHECK_THAT(error_of([&] { export_hf(p.model, tmp / "h", f16); }),
             Catch::Contains("has values beyond float16's range (largest magnitude 1e+06)") &&
                 Catch::Contains("export with --dtype bfloat16 or float32"));
  CHECK(!fs::exists(tmp / "h"));
  ExportOptions bf16;
  export_hf(p.model, tmp / "b", bf16);  // (bf16 holds it)
  {
    torch::NoGradGuard ng;
    p.model->parameters().back().view(-1)[1].fill_(std::nan(""));
  }
  CHECK_THAT(error_of([&] { export_hf(p.model, tmp / "n", bf16); }),
             Catch::Contains("holds 1 NaN or infinite values") && Catch::Contains("tensor 'lm_head.weight'"));
  CHECK(!fs::exists(tmp / "n"));
  // The same from a folder, one weight at a time (llm-export's way: weights come converted).
  copy_with_weights("tiny-llama", tmp / "big", [](auto& w) { w["model.norm.weight"][0] = 1e6; });
  const Pretrained big = inspect_pretrained(tmp / "big");
  CHECK_THAT(error_of([&] { export_hf(big, tmp / "h2", f16); }),
             Catch::Contains("big: tensor 'model.norm.weight': has values beyond float16's range"));
  CHECK(!fs::exists(tmp / "h2"));
  export_hf(big, tmp / "b2", bf16);
  copy_with_weights("tiny-llama", tmp / "nan", [](auto& w) { w["model.norm.weight"][1] = std::nan(""); });
  CHECK_THAT(error_of([&] { export_hf(inspect_pretrained(tmp / "nan"), tmp / "n2", bf16); }),
             Catch::Contains("nan: tensor 'model.norm.weight': holds 1 NaN or infinite values"));
}

TEST_CASE("export to a folder named with a trailing separator writes that folder", "[io][hf]") {
  test::TempDir tmp;
  Pretrained p = load_pretrained(fixture("tiny-llama"));
  ExportOptions f32;
  f32.dtype = "float32";
  export_hf(p.model, tmp / "out/", f32);
  CHECK(fs::exists(tmp / "out/config.json"));
  CHECK(fs::exists(tmp / "out/model.safetensors"));
  CHECK(listing(tmp / "out") == std::vector<std::string>{"config.json", "generation_config.json", "model.safetensors"});
  export_hf(p.model, tmp / "out//", ExportOptions{});  // replaces it
  CHECK(read_hf_config(tmp / "out").torch_dtype == "bfloat16");
  export_hf(p.model, tmp / "out/.", f32);
  CHECK(read_hf_config(tmp / "out").torch_dtype == "float32");
  LoraConfig cfg;
  apply_lora(p.model, cfg);
  export_peft_adapter(p.model, cfg, tmp / "adapter/", "base");
  CHECK(listing(tmp / "adapter") == std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"});
  CHECK(listing(tmp.path.string()) == std::vector<std::string>{"adapter", "out"});
  CHECK_THAT(error_of([&] { export_hf(p.model, "/", f32); }), Catch::Contains("/: is not a folder that can be written"));
}

TEST_CASE("bad checkpoints give one clear error naming the file and tensor", "[io][hf]") {
  test::TempDir tmp;
  auto config_error = [&](const std::string& json_text) {
    const std::string dir = tmp / ("c" + std::to_string(std::hash<std::string>()(json_text)));
    fs::create_directories(dir);
    write_file(dir + "/config.json", json_text);
    return error_of([&] { read_hf_config(dir); });
  };
  const std::string ok = read_file(fixture("tiny-llama/config.json"));
  CHECK_THAT(config_error("{\"hidden_size\": 64,"), Catch::Contains("config.json: invalid JSON"));
  CHECK_THAT(config_error("[1, 2]"), Catch::Contains("expected a JSON object"));
  auto edited = [&](const std::string& key, const nlohmann::json& value) {
    auto j = nlohmann::json::parse(ok);
    if (value.is_discarded()) j.erase(key);
    else j[key] = value;
    return config_error(j.dump());
  };
  CHECK_THAT(edited("architectures", {"GPT2LMHeadModel"}), Catch::Contains("unsupported architecture 'GPT2LMHeadModel'"));
  CHECK_THAT(edited("hidden_size", nlohmann::json::value_t::discarded), Catch::Contains("config.json: hidden_size: missing key"));
  CHECK_THAT(edited("hidden_size", "64"), Catch::Contains("hidden_size: expected an integer, got \"64\""));
  CHECK_THAT(edited("num_key_value_heads", 3), Catch::Contains("must be a multiple of n_kv_heads"));
  CHECK_THAT(edited("rope_scaling", {{"type", "linear"}, {"factor", 2.0}}), Catch::Contains("rope_scaling"));
  CHECK_THAT(edited("hidden_act", "gelu"), Catch::Contains("hidden_act"));
  CHECK_THAT(edited("num_hidden_layers", 0), Catch::Contains("num_hidden_layers: must be positive"));

  copy_with_weights("tiny-llama", tmp / "missing", [](auto& w) { w.erase("model.layers.1.mlp.up_proj.weight"); });
  CHECK_THAT(error_of([&] { load_pretrained(tmp / "missing"); }),
             Catch::Contains("tensor 'model.layers.1.mlp.up_proj.weight'") && Catch::Contains("missing from the checkpoint"));
  copy_with_weights("tiny-llama", tmp / "shape", [](auto& w) { w["model.norm.weight"] = torch::ones({63}); });
  CHECK_THAT(error_of([&] { load_pretrained(tmp / "shape"); }),
             Catch::Contains("tensor 'model.norm.weight'") && Catch::Contains("has shape [63]"));
  copy_with_weights("tiny-llama", tmp / "ints",
                    [](auto& w) { w["model.norm.weight"] = w["model.norm.weight"].to(torch::kInt32); });
  CHECK_THAT(
      error_of([&] { load_pretrained(tmp / "ints"); }),
      Catch::Contains("tensor 'model.norm.weight'") && Catch::Contains("is stored as Int, not as floating-point"));
  // Nested past 64 levels: refused, not a stack overflow when an error message shows the value.
  CHECK_THAT(config_error("{\"deep\": " + std::string(100000, '[') + std::string(100000, ']') + ", " + ok.substr(1)),
             Catch::Contains("JSON nested deeper than 64 levels"));
  CHECK_THAT(edited("hidden_size", nlohmann::json::array({1, 2, 3, 4, 5, 6, 7, 8, 9})),
             Catch::Contains("hidden_size: expected an integer, got an array of 9 elements"));
  copy_with_weights("tiny-llama", tmp / "extra", [](auto& w) { w["model.layers.2.mlp.up_proj.weight"] = torch::ones({2}); });
  CHECK_THAT(error_of([&] { load_pretrained(tmp / "extra"); }), Catch::Contains("is not a parameter of this model"));
  copy_with_weights("tiny-llama", tmp / "stale", [](auto& w) { w["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch::ones({8}); });
  CHECK_NOTHROW(load_pretrained(tmp / "stale"));

  fs::create_directories(tmp / "noweights");
  fs::copy_file(fixture("tiny-llama/config.json"), tmp / "noweights/config.json");
  CHECK_THAT(error_of([&] { load_pretrained(tmp / "noweights"); }), Catch::Contains("no model.safetensors"));
  fs::create_directories(tmp / "shard");
  fs::copy_file(fixture("tiny-mixtral/config.json"), tmp / "shard/config.json");
  fs::copy_file(fixture("tiny-mixtral/model.safetensors.index.json"), tmp / "shard/model.safetensors.index.json");
  CHECK_THAT(error_of([&] { load_pretrained(tmp / "shard"); }), Catch::Contains("shard listed in the index is missing"));
  CHECK_THAT(error_of([&] { load_pretrained(tmp / "nothing-here"); }), Catch::Contains("checkpoint folder not found"));
}

namespace {

// read_hf_config's error for fixture NAME's config.json with KEY set to VALUE ("" = it loads).
std::string config_with(const test::TempDir& tmp, const std::string& name, const std::string& key,
                        const nlohmann::json& value) {
  auto j = nlohmann::json::parse(read_file(fixture(name + "/config.json")));
  j[key] = value;
  const std::string dir = tmp / (name + "-" + key + "-" + std::to_string(std::hash<std::string>()(value.dump())));
  fs::create_directories(dir);
  write_file(dir + "/config.json", j.dump());
  return error_of([&] { read_hf_config(dir); });
}

}  // namespace

TEST_CASE("config.json values outside the recipe's limits are errors naming the key", "[io][hf]") {
  test::TempDir tmp;
  auto err = [&](const std::string& name, const std::string& key, const nlohmann::json& value) {
    return config_with(tmp, name, key, value);
  };
  // The limits of ModelConfig's recipe keys (head_dim, norm_eps, rope_theta, sliding_window,
  // n_experts, n_experts_per_token, moe_aux_loss_coef, init_std).
  CHECK_THAT(err("tiny-llama", "head_dim", -16), Catch::Contains("config.json: head_dim: must be >= 1, got -16"));
  CHECK_THAT(err("tiny-llama", "head_dim", 0), Catch::Contains("config.json: head_dim: must be >= 1, got 0"));
  CHECK_THAT(err("tiny-llama", "rope_theta", 0), Catch::Contains("config.json: rope_theta: must be >= 1, got 0"));
  CHECK_THAT(err("tiny-llama", "rope_theta", -10000.0), Catch::Contains("config.json: rope_theta: must be >= 1"));
  CHECK_THAT(err("tiny-llama", "rms_norm_eps", -1), Catch::Contains("config.json: rms_norm_eps: must be >= 0, got -1"));
  CHECK_THAT(err("tiny-llama", "initializer_range", -0.5), Catch::Contains("config.json: initializer_range: must be >= 0"));
  CHECK_THAT(err("tiny-mistral", "sliding_window", -5), Catch::Contains("config.json: sliding_window: must be >= 0, got -5"));
  CHECK_THAT(err("tiny-mixtral", "num_experts_per_tok", 0),
             Catch::Contains("config.json: num_experts_per_tok: must be >= 1, got 0"));
  CHECK_THAT(err("tiny-mixtral", "num_experts_per_tok", 5), Catch::Contains("top-k (5) exceeds n_experts (4)"));
  CHECK_THAT(err("tiny-mixtral", "num_local_experts", 0), Catch::Contains("config.json: num_local_experts: must be >= 1, got 0"));
  CHECK_THAT(err("tiny-mixtral", "router_aux_loss_coef", -0.1),
             Catch::Contains("config.json: router_aux_loss_coef: must be >= 0"));
  // Values at the limits, and nulls (the defaults), load.
  CHECK(err("tiny-llama", "rms_norm_eps", 0) == "");
  CHECK(err("tiny-llama", "head_dim", 16) == "");
  CHECK(err("tiny-llama", "head_dim", nullptr) == "");
  CHECK(err("tiny-mistral", "sliding_window", 0) == "");
  CHECK(err("tiny-mixtral", "num_experts_per_tok", 1) == "");
}

TEST_CASE("absent config.json keys take their architecture's transformers defaults, and rope_parameters (v5)",
          "[io][hf]") {
  test::TempDir tmp;
  // fixture's config.json without `drop`, with `set` merged in
  auto read = [&](const std::string& name, const std::vector<std::string>& drop, const nlohmann::json& set) {
    auto j = nlohmann::json::parse(read_file(fixture(name + "/config.json")));
    for (const auto& k : drop) j.erase(k);
    j.update(set);
    const std::string dir = tmp / (name + "-" + std::to_string(std::hash<std::string>()(j.dump())));
    fs::create_directories(dir);
    write_file(dir + "/config.json", j.dump());
    return read_hf_config(dir);
  };
  const std::vector<std::string> keys = {"num_key_value_heads", "rms_norm_eps", "rope_theta", "sliding_window",
                                         "max_position_embeddings"};
  const ModelConfig llama = read("tiny-llama", keys, nlohmann::json::object()).model;  // LlamaConfig
  CHECK(llama.kv_heads() == 4);
  CHECK(llama.norm_eps == 1e-6);
  CHECK(llama.rope_theta == 10000.0);
  CHECK(llama.sliding_window == 0);
  CHECK(llama.max_seq_len == 2048);
  const nlohmann::json heads16 = {{"num_attention_heads", 16}};           // (a multiple of the default 8 kv heads)
  const ModelConfig mistral = read("tiny-mistral", keys, heads16).model;  // MistralConfig
  CHECK(mistral.kv_heads() == 8);
  CHECK(mistral.norm_eps == 1e-6);
  CHECK(mistral.rope_theta == 10000.0);
  CHECK(mistral.sliding_window == 4096);
  CHECK(mistral.max_seq_len == 131072);
  CHECK(read("tiny-mistral", {}, {{"sliding_window", nullptr}}).model.sliding_window == 0);  // null: no window
  const ModelConfig mixtral = read("tiny-mixtral", keys, heads16).model;                     // MixtralConfig
  CHECK(mixtral.kv_heads() == 8);
  CHECK(mixtral.norm_eps == 1e-5);
  CHECK(mixtral.rope_theta == 1e6);
  CHECK(mixtral.sliding_window == 0);
  // transformers >= 5: RoPE in rope_parameters, the dtype in `dtype`.
  const HfConfig v5 =
      read("tiny-llama", {"rope_theta", "torch_dtype"},
           {{"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 500000.0}}}, {"dtype", "bfloat16"}});
  CHECK(v5.model.rope_theta == 500000.0);
  CHECK(v5.torch_dtype == "bfloat16");
  auto err = [&](const nlohmann::json& rp) {
    return error_of([&] { read("tiny-llama", {}, {{"rope_parameters", rp}}); });
  };
  CHECK_THAT(err({{"rope_type", "llama3"}, {"rope_theta", 500000.0}, {"factor", 8.0}}),
             Catch::Contains("config.json: rope_parameters: rope_type: rope scaling ('llama3') is not supported"));
  CHECK_THAT(err({{"rope_type", "default"}, {"rope_theta", 10000.0}, {"partial_rotary_factor", 0.5}}),
             Catch::Contains("config.json: rope_parameters: partial_rotary_factor: is not supported"));
  CHECK_THAT(err({{"rope_type", "linear"}, {"rope_theta", 10000.0}}),
             Catch::Contains("config.json: rope_parameters: rope_type: rope scaling ('linear') is not supported"));
  CHECK_THAT(err({{"rope_theta", "1e4"}}),
             Catch::Contains("config.json: rope_parameters: rope_theta: expected a number, got \"1e4\""));
  CHECK_THAT(err(10000.0), Catch::Contains("config.json: rope_parameters: expected an object, got 10000.0"));
  // rope_scaling: transformers' unscaled {"rope_type"/"type": "default"} reads as none; scaling fails.
  CHECK(read("tiny-llama", {}, {{"rope_scaling", {{"rope_type", "default"}}}}).model.rope_theta ==
        read("tiny-llama", {}, nlohmann::json::object()).model.rope_theta);
  CHECK(read("tiny-llama", {}, {{"rope_scaling", {{"type", "default"}, {"factor", nullptr}}}}).ignored.empty());
  CHECK_THAT(error_of([&] {
               read("tiny-llama", {}, {{"rope_scaling", {{"type", "linear"}, {"factor", 2.0}}}});
             }),
             Catch::Contains("config.json: rope_scaling: rope scaling is not supported, got"));
  CHECK_THAT(error_of([&] {
               read("tiny-llama", {}, {{"rope_scaling", {{"rope_type", "default"}, {"factor", 2.0}}}});
             }),
             Catch::Contains("config.json: rope_scaling: rope scaling is not supported"));
  CHECK_THAT(error_of([&] {
               read("tiny-llama", {}, {{"mlp_bias", true}});
             }),
             Catch::Contains("config.json: mlp_bias: MLP biases are not supported"));
  CHECK_THAT(error_of([&] {
               read("tiny-llama", {}, {{"attention_bias", true}});
             }),
             Catch::Contains("config.json: attention_bias: attention biases are not supported"));
  // Training-only regularisers libllm lacks are listed for the fine-tune's note, not errors.
  CHECK(read("tiny-mixtral", {}, {{"attention_dropout", 0.1}, {"router_jitter_noise", 0.0}}).ignored ==
        std::vector<std::string>{"attention_dropout 0.1"});
}

TEST_CASE("the tokens an HF tokenizer adds beyond tokenizer.model are found by id", "[io][hf]") {
  test::TempDir tmp;
  const Tokenizer tok = Tokenizer::load(fixture("tokenizer.model"));  // 384 pieces: 0 <unk>, 1 <s>, 2 </s>
  CHECK(added_tokens(tmp.path.string(), tok).empty());                // no files: none
  write_file(tmp / "tokenizer_config.json", R"({"added_tokens_decoder": {
      "0": {"content": "<unk>", "special": true}, "2": {"content": "</s>", "special": true},
      "384": {"content": "<|im_start|>", "special": true}, "1": {"content": "<|im_end|>"}}})");
  write_file(tmp / "added_tokens.json", R"({"<pad>": 385, "<s>": 1})");
  using Added = std::vector<std::pair<int64_t, std::string>>;
  // 0 and 2 are tokenizer.model's own; id 1 is "<s>" there, whatever tokenizer_config.json says
  // (added_tokens.json, read last, agrees with it).
  CHECK(added_tokens(tmp.path.string(), tok) == Added{{384, "<|im_start|>"}, {385, "<pad>"}});
  write_file(tmp / "tokenizer_config.json", "not json");
  CHECK(added_tokens(tmp.path.string(), tok) == Added{{385, "<pad>"}});
}

TEST_CASE("pad_token_of: tokenizer_config.json's pad token, as a text or an object, else special_tokens_map.json's",
          "[io][hf]") {
  test::TempDir tmp;
  CHECK(pad_token_of(tmp.path.string()).empty());
  write_file(tmp / "special_tokens_map.json", R"({"pad_token": {"content": "<pad>", "lstrip": false}})");
  CHECK(pad_token_of(tmp.path.string()) == "<pad>");
  // A legacy folder (no added_tokens_decoder): the map overrides tokenizer_config.json.
  write_file(tmp / "tokenizer_config.json", R"({"pad_token": "</s>"})");
  CHECK(pad_token_of(tmp.path.string()) == "<pad>");
  // A current one: tokenizer_config.json's, else the map's.
  write_file(tmp / "tokenizer_config.json", R"({"pad_token": "</s>", "added_tokens_decoder": {}})");
  CHECK(pad_token_of(tmp.path.string()) == "</s>");
  write_file(tmp / "tokenizer_config.json", R"({"pad_token": null, "added_tokens_decoder": {}})");  // (Llama 2's)
  CHECK(pad_token_of(tmp.path.string()) == "<pad>");
  write_file(tmp / "special_tokens_map.json", "not json");
  CHECK(pad_token_of(tmp.path.string()).empty());
}

TEST_CASE("a chat template in chat_template.jinja is read before tokenizer_config.json's", "[io][hf]") {
  test::TempDir tmp;
  CHECK(read_chat_template(tmp.path.string()) == "");
  write_file(tmp / "tokenizer_config.json", R"({"chat_template": "from the config"})");
  CHECK(read_chat_template(tmp.path.string()) == "from the config");
  write_file(tmp / "chat_template.jinja", "{{ bos_token }}from the file\n");
  CHECK(read_chat_template(tmp.path.string()) == "{{ bos_token }}from the file\n");
  // A chat_template of another type is an error, not silently no template (chatml then).
  fs::remove(tmp / "chat_template.jinja");
  write_file(tmp / "tokenizer_config.json", R"({"chat_template": null})");
  CHECK(read_chat_template(tmp.path.string()) == "");
  write_file(tmp / "tokenizer_config.json", R"({"chat_template": [{"name": "default", "template": "d"}]})");
  CHECK(read_chat_template(tmp.path.string()) == "d");
  write_file(tmp / "tokenizer_config.json", R"({"chat_template": {"default": "x"}})");
  CHECK_THAT(test::error_of([&] { read_chat_template(tmp.path.string()); }),
             Catch::Contains("tokenizer_config.json: chat_template: is object, expected the template's text"));
  write_file(tmp / "tokenizer_config.json", R"({"chat_template": [{"name": "tool_use", "template": "t"}]})");
  CHECK_THAT(test::error_of([&] { read_chat_template(tmp.path.string()); }),
             Catch::Contains("is a list of templates with none named 'default'"));
}

TEST_CASE("a --tokenizer unlike the checkpoint's own is used with a warning", "[io][hf]") {
  const Pretrained pre = inspect_pretrained(fixture("tiny-llama"));
  CHECK(tokenizer_for(pre, "") == pre.tokenizer_path);
  test::TempDir tmp;
  fs::copy_file(pre.tokenizer_path, tmp / "same.model");  // the same pieces elsewhere: no warning
  std::string got;
  CHECK(test::stderr_of([&] { got = tokenizer_for(pre, tmp / "same.model"); }).empty());
  CHECK(got == tmp / "same.model");
  const std::string warning =
      test::stderr_of([&] { got = tokenizer_for(pre, fixture("tokenizer-control.model"), "--tok"); });
  CHECK(got == fixture("tokenizer-control.model"));
  CHECK_THAT(warning, Catch::StartsWith("warning: --tok " + fixture("tokenizer-control.model") +
                                        " is not the tokenizer in " + fixture("tiny-llama") + " ("));
  CHECK_THAT(warning, Catch::Contains("the model reads ids as its own tokenizer made them\n"));
  INFO(warning);
  CHECK(std::count(warning.begin(), warning.end(), '\n') == 1);
  // A folder whose own cannot be read (a Git LFS pointer): the given one, with a warning.
  Pretrained lfs = pre;
  lfs.tokenizer_path = tmp / "pointer.model";
  write_file(tmp / "pointer.model", "version https://git-lfs.github.com/spec/v1\n");
  CHECK_THAT(test::stderr_of([&] { got = tokenizer_for(lfs, tmp / "same.model"); }),
             Catch::Contains("warning: --tokenizer " + tmp / "same.model" +
                             " is used; the model folder's own cannot be compared with it"));
  CHECK(got == tmp / "same.model");
  // A folder without a tokenizer of its own: the given one, nothing to compare.
  Pretrained bare = pre;
  bare.tokenizer_path.clear();
  CHECK(test::stderr_of([&] { got = tokenizer_for(bare, tmp / "same.model"); }).empty());
}

TEST_CASE("wrong-typed config.json values are errors naming the key, never truncated", "[io][hf]") {
  test::TempDir tmp;
  auto err = [&](const std::string& key, const nlohmann::json& value) { return config_with(tmp, "tiny-llama", key, value); };
  CHECK_THAT(err("eos_token_id", {"</s>"}),
             Catch::Contains("config.json: eos_token_id: expected an integer or a list of integers, got [\"</s>\"]"));
  CHECK_THAT(err("eos_token_id", {2.5}), Catch::Contains("config.json: eos_token_id: expected an integer or a list"));
  CHECK_THAT(err("eos_token_id", {2, "x"}), Catch::Contains("config.json: eos_token_id: expected an integer or a list"));
  CHECK_THAT(err("eos_token_id", 2.5), Catch::Contains("config.json: eos_token_id: expected an integer, got 2.5"));
  CHECK_THAT(err("eos_token_id", nlohmann::json::array()), Catch::Contains("config.json: eos_token_id: is an empty list"));
  CHECK_THAT(err("eos_token_id", "</s>"), Catch::Contains("config.json: eos_token_id: expected an integer, got \"</s>\""));
  // Ids outside the embedding (an evaluation would start with it; on a GPU, an index assert).
  const int64_t vocab = read_hf_config(fixture("tiny-llama")).model.vocab_size;
  CHECK_THAT(err("bos_token_id", vocab),
             Catch::Contains("config.json: bos_token_id: " + std::to_string(vocab) + " is outside the vocabulary [0, " +
                             std::to_string(vocab) + ")"));
  CHECK_THAT(err("bos_token_id", -1), Catch::Contains("config.json: bos_token_id: -1 is outside the vocabulary"));
  CHECK_THAT(err("eos_token_id", {2, vocab + 7}),
             Catch::Contains("config.json: eos_token_id: " + std::to_string(vocab + 7) + " is outside the vocabulary"));
  CHECK_THAT(err("eos_token_id", -2), Catch::Contains("config.json: eos_token_id: -2 is outside the vocabulary"));
  CHECK_THAT(err("bos_token_id", 1.5), Catch::Contains("config.json: bos_token_id: expected an integer, got 1.5"));
  CHECK_THAT(err("num_hidden_layers", 2.5), Catch::Contains("config.json: num_hidden_layers: expected an integer, got 2.5"));
  CHECK_THAT(err("max_position_embeddings", 48.0), Catch::Contains("max_position_embeddings: expected an integer"));
  CHECK_THAT(err("vocab_size", nlohmann::json(18446744073709551615ULL)), Catch::Contains("config.json: vocab_size: is out of range"));
  CHECK_THAT(err("rope_theta", "10000"), Catch::Contains("config.json: rope_theta: expected a number, got \"10000\""));
  CHECK_THAT(err("tie_word_embeddings", 0), Catch::Contains("config.json: tie_word_embeddings: expected true or false"));
  CHECK_THAT(err("architectures", "LlamaForCausalLM"), Catch::Contains("config.json: architectures: expected a list of class names"));
  CHECK_THAT(err("architectures", {1}), Catch::Contains("config.json: architectures: expected a list of class names"));
  // A list of end-of-sequence ids: the first is the one kept.
  auto j = nlohmann::json::parse(read_file(fixture("tiny-llama/config.json")));
  j["eos_token_id"] = {3, 2};
  fs::create_directories(tmp / "eos-list");
  write_file(tmp / "eos-list/config.json", j.dump());
  CHECK(read_hf_config(tmp / "eos-list").eos_id == 3);
}

TEST_CASE("a run's folder or a PEFT adapter given as a model names what to give instead", "[io][hf]") {
  test::TempDir tmp;
  fs::create_directories(tmp / "run/checkpoints/step-00000003");
  fs::create_directories(tmp / "run/checkpoints/step-00000006");
  write_file(tmp / "run/recipe.yaml", "train: {steps: 6}\n");
  write_file(tmp / "run/tokenizer.model", "x");
  CHECK_THAT(error_of([&] { inspect_pretrained(tmp / "run"); }),
             Catch::Contains("run: is a training run's folder, not one of its checkpoints") &&
                 Catch::Contains("it has no complete checkpoint yet"));
  for (const char* s : {"step-00000003", "step-00000006"})
    write_file(tmp / "run/checkpoints" + "/" + s + "/trainer.json", "{}");
  CHECK_THAT(error_of([&] { inspect_pretrained(tmp / "run"); }),
             Catch::Contains("give a checkpoint, e.g. the newest: " + tmp / "run/checkpoints/step-00000006"));
  fs::create_directories(tmp / "peft");
  write_file(tmp / "peft/adapter_config.json", "{}");
  CHECK_THAT(error_of([&] { inspect_pretrained(tmp / "peft"); }),
             Catch::Contains("is a PEFT adapter folder (adapter_config.json), not a model"));
}
