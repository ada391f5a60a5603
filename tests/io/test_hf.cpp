// Hugging Face folders: config.json mapping, bit-exact import -> export, sharding, atomic
// export, and every kind of bad checkpoint giving a clear error.
#include "../catch_torch.h"

#include <filesystem>

#include "../common.h"
#include "libllm/error.h"
#include "libllm/hf.h"
#include "libllm/safetensors.h"

using namespace libllm;
using libllm::test::error_of;
using libllm::test::fixture;
namespace fs = std::filesystem;

namespace {

void write_file(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

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
    views.push_back({n, safetensors::DType::F32, t.sizes().vec(), keep.back().data_ptr()});
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
  fs::create_directories(out);
  write_file(out + "/marker", "old");
  ExportOptions bad;
  bad.tokenizer_path = tmp / "missing.model";  // fails after the weights are written
  CHECK_THAT(error_of([&] { export_hf(p.model, out, bad); }), Catch::Contains("missing.model"));
  CHECK(read_file(out + "/marker") == "old");  // the previous export is intact
  for (auto& e : fs::directory_iterator(tmp.path)) CHECK(e.path().filename().string().find(".partial") == std::string::npos);
  export_hf(p.model, out, ExportOptions{});
  CHECK(!fs::exists(out + "/marker"));
  CHECK(fs::exists(out + "/model.safetensors"));
  CHECK(fs::exists(out + "/config.json"));
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
