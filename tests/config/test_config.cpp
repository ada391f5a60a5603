// Recipes: strict parsing, overrides, printing, and the shipped recipes' exact parameter counts.
#include "../catch_torch.h"

#include "../common.h"
#include "libllm/error.h"
#include "libllm/model.h"
#include "libllm/recipe.h"

using namespace libllm;

namespace {
std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    Recipe::parse(yaml, "r.yaml", overrides);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
std::string recipe(const char* name) { return std::string(LIBLLM_SOURCE_DIR) + "/recipes/" + name; }
}  // namespace

TEST_CASE("recipe values are read into the config structs", "[config]") {
  const Recipe r = Recipe::parse("model:\n  dim: 128\n  n_heads: 8\n  norm_eps: 1e-6\n  tie_embeddings: yes\n"
                                 "tokenizer:\n  path: t.model\n",
                                 "r.yaml");
  CHECK(r.model.dim == 128);
  CHECK(r.model.n_heads == 8);
  CHECK(r.model.n_kv_heads == 8);  // resolved from n_heads
  CHECK(r.model.head_dim == 16);   // resolved from dim / n_heads
  CHECK(r.model.norm_eps == Approx(1e-6));
  CHECK(r.model.tie_embeddings);
  CHECK(r.tokenizer.path == "t.model");
  CHECK(r.model.n_layers == 32);  // default kept
}

TEST_CASE("unknown keys name the file, line, key path and the nearest valid key", "[config]") {
  const std::string e = error_of("model:\n  dim: 64\n  n_layer: 4\n");
  CHECK_THAT(e, Catch::Contains("r.yaml:3: model.n_layer: unknown key"));
  CHECK_THAT(e, Catch::Contains("did you mean 'n_layers'?"));
  CHECK_THAT(error_of("modle:\n  dim: 4\n"), Catch::Contains("unknown section 'modle'") &&
                                                 Catch::Contains("did you mean 'model'?"));
}

TEST_CASE("wrong types and out-of-range values name the key and what is allowed", "[config]") {
  CHECK_THAT(error_of("model:\n  dim: wide\n"),
             Catch::Contains("model.dim: expected an integer in [1, 262144], got 'wide'"));
  CHECK_THAT(error_of("model:\n  n_layers: 2.5\n"), Catch::Contains("model.n_layers: expected an integer"));
  CHECK_THAT(error_of("model:\n  n_heads: 0\n"),
             Catch::Contains("model.n_heads: expected an integer in [1, 16384], got 0"));
  CHECK_THAT(error_of("model:\n  tie_embeddings: maybe\n"), Catch::Contains("expected true or false"));
  CHECK_THAT(error_of("model:\n  dim: [1, 2]\n"), Catch::Contains("got a list"));
  CHECK_THAT(error_of("model:\n  dim: 64\n  n_heads: 4\n  n_kv_heads: 3\n"),
             Catch::Contains("must be a multiple of n_kv_heads"));
  CHECK_THAT(error_of("model:\n  dim: 60\n  n_heads: 8\n"), Catch::Contains("not divisible"));
  CHECK_THAT(error_of("model: [1]\n"), Catch::Contains("must be a mapping"));
  CHECK_THAT(error_of("model:\n  dim: 4\n dim: 3\n"), Catch::Contains("invalid YAML"));
  // Nesting past yaml-cpp's depth guard (0.7: 500 levels) says so, not yaml-cpp's "bad file".
  CHECK_THAT(error_of("model: " + std::string(100000, '[') + std::string(100000, ']') + "\n"),
             Catch::Contains("r.yaml:1: invalid YAML: nested deeper than yaml-cpp reads") &&
                 Catch::Contains("the file is damaged"));
  CHECK_THAT(error_of("model:\n  n_experts: 2\n  n_experts_per_token: 3\n"), Catch::Contains("exceeds n_experts"));
}

TEST_CASE("set overrides are typed and checked like the file", "[config]") {
  const Recipe r = Recipe::parse("model:\n  dim: 64\n  n_heads: 4\n", "r.yaml", {"model.n_layers=3", "model.dim=128"});
  CHECK(r.model.n_layers == 3);
  CHECK(r.model.dim == 128);
  CHECK(r.model.head_dim == 32);
  CHECK_THAT(error_of("", {"model.n_layerz=3"}), Catch::Contains("did you mean 'n_layers'"));
  CHECK_THAT(error_of("", {"model.n_layers=three"}), Catch::Contains("--set model.n_layers=three: expected an integer"));
  CHECK_THAT(error_of("", {"n_layers=3"}), Catch::Contains("expected section.key=value"));
}

TEST_CASE("the resolved recipe prints as YAML that parses back to the same values", "[config]") {
  const Recipe a = Recipe::load(recipe("mixtral-8x7b.yaml"), {"model.norm_eps=2.5e-6"});
  const std::string yaml = a.to_yaml();
  CHECK_THAT(yaml, Catch::Contains("  n_experts: 8\n"));
  CHECK_THAT(yaml, Catch::Contains("  rope_theta: 1000000.0\n"));
  const Recipe b = Recipe::parse(yaml, "printed");
  CHECK(b.to_yaml() == yaml);
  CHECK(b.model.norm_eps == a.model.norm_eps);
}

TEST_CASE("shipped recipes have the published exact parameter counts", "[config]") {
  // Published shapes' exact counts (LLaMA paper Table 2 shapes; K2 = LLaMA-65B with vocab 32032).
  CHECK(count_parameters(Recipe::load(recipe("llama-7b.yaml")).model).total == 6738415616LL);
  CHECK(count_parameters(Recipe::load(recipe("amber-7b.yaml")).model).total == 6738415616LL);
  CHECK(count_parameters(Recipe::load(recipe("llama-65b.yaml")).model).total == 65285660672LL);
  CHECK(count_parameters(Recipe::load(recipe("k2-65b.yaml")).model).total == 65286184960LL);
  // Mixtral 8x7B: 46.7 B total, 12.9 B active (Mixtral paper).
  const ParamCount mx = count_parameters(Recipe::load(recipe("mixtral-8x7b.yaml")).model);
  CHECK(mx.total == 46702792704LL);
  CHECK(mx.active == 12879925248LL);
  const Recipe moxin = Recipe::load(recipe("moxin-7b.yaml"));
  CHECK(moxin.model.n_layers == 36);
  CHECK(moxin.model.kv_heads() == 8);
  CHECK(moxin.model.sliding_window == 4096);
}

TEST_CASE("the analytic parameter count equals the instantiated model's", "[config][model]") {
  for (const char* yaml : {"model: {vocab_size: 50, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 48}",
                           "model: {vocab_size: 50, dim: 32, n_layers: 3, n_heads: 4, ffn_dim: 40, tie_embeddings: true}",
                           "model: {vocab_size: 50, dim: 32, n_layers: 2, n_heads: 2, n_kv_heads: 1, head_dim: 8, "
                           "ffn_dim: 24, n_experts: 3, n_experts_per_token: 2}"}) {
    const Recipe r = Recipe::parse(yaml, "inline");
    Transformer m(r.model);
    int64_t n = 0;
    for (const auto& p : m->parameters()) n += p.numel();
    CHECK(n == count_parameters(r.model).total);
    size_t i = 0;
    const auto shapes = weight_shapes(r.model);
    auto params = m->named_parameters();
    REQUIRE(params.size() == shapes.size());
    for (const auto& w : shapes) {
      CHECK(params.contains(w.name));
      if (params.contains(w.name)) CHECK(params[w.name].sizes().vec() == w.shape);
      ++i;
    }
  }
}

TEST_CASE("a key or section given twice, a null text value and a recipe that is no file are errors", "[config]") {
  CHECK_THAT(error_of("train:\n  steps: 300\n  seq_len: 64\n  steps: 10\n"),
             Catch::Contains("r.yaml:4: train.steps: given twice (first at line 2)"));
  CHECK_THAT(error_of("model: {dim: 64}\ntrain: {steps: 3}\nmodel: {n_layers: 2}\n"),
             Catch::Contains("r.yaml:3: section 'model': given twice (first at line 1)"));
  CHECK_THAT(error_of("checkpoint:\n  resume:\n"), Catch::Contains("r.yaml:2: checkpoint.resume: has no value"));
  CHECK(Recipe::parse("checkpoint: {resume: none}\ntrain: {run_dir: \"\"}\n", "r.yaml").train.run_dir.empty());
  // One string where a list of strings goes is that string, whatever YAML would make of it.
  const Recipe r = Recipe::parse("train:\n  sample_prompts: \"Once upon a time #1\"\n", "r.yaml");
  CHECK(r.train.sample_prompts == std::vector<std::string>{"Once upon a time #1"});
  CHECK(Recipe::parse("train: {sample_prompts: \"Q: what is\"}\n", "r.yaml").train.sample_prompts ==
        std::vector<std::string>{"Q: what is"});
  // A folder, a missing file, an empty one.
  auto load_error = [](const std::string& path) {
    try {
      Recipe::load(path);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK_THAT(load_error(recipe("")), Catch::Contains("is not a recipe file"));
  CHECK_THAT(load_error(recipe("no-such.yaml")), Catch::Contains("recipe not found"));
  test::TempDir tmp;
  test::write_file(tmp / "empty.yaml", "# nothing yet\n");
  CHECK_THAT(load_error(tmp / "empty.yaml"), Catch::Contains("the recipe is empty"));
}

TEST_CASE("numbers are plain decimals, and a recipe is one YAML document", "[config]") {
  CHECK(parse_int("4096") == 4096);
  CHECK(parse_int("-3") == -3);
  CHECK(parse_int("+7") == 7);
  CHECK(parse_int("1e6") == 1000000);
  CHECK(parse_int("4096.0") == 4096);
  CHECK(parse_int("9223372036854775807") == INT64_MAX);  // exact, past 2^53
  for (const char* bad : {"0x10", "0X10", "2.5", "1e-3", "", " 5", "5 ", "1_000", "inf", "nan", "12abc", "e5", ".",
                          "99999999999999999999", "1e300", "0b101"})
    CHECK_FALSE(parse_int(bad).has_value());
  CHECK(parse_number("1e-5") == 1e-5);
  CHECK(parse_number(".5") == 0.5);
  CHECK(parse_number("3.") == 3.0);
  CHECK(parse_number("-2.5E+3") == -2500.0);
  for (const char* bad : {"0x1p3", "0x10", "inf", "-inf", "nan", "1e", "1e+", "--1", "1.2.3", "1e999", "", "+"})
    CHECK_FALSE(parse_number(bad).has_value());
  // In a recipe and in --set: hex used to read as 16 (strtod's hex floats).
  CHECK_THAT(error_of("model:\n  dim: 0x10\n"),
             Catch::Contains("model.dim: expected an integer in [1, 262144], got '0x10'"));
  CHECK_THAT(error_of("", {"optim.lr=0x1p-10"}), Catch::Contains("--set optim.lr=0x1p-10: expected a number"));
  CHECK_THAT(error_of("", {"model.n_layers=0x10"}), Catch::Contains("expected an integer"));
  CHECK(Recipe::parse("", "r.yaml", {"model.n_layers=1e1"}).model.n_layers == 10);
  // A second document after '---' would be ignored: it is an error naming its line.
  CHECK_THAT(error_of("model:\n  dim: 64\n---\ntrain:\n  steps: 3\n"),
             Catch::Contains("r.yaml:4: a second YAML document") && Catch::Contains("remove the '---'"));
  CHECK(Recipe::parse("---\nmodel:\n  n_layers: 3\n", "r.yaml").model.n_layers == 3);  // one document, marked
  CHECK(Recipe::parse("model:\n  n_layers: 3\n---\n", "r.yaml").model.n_layers == 3);  // an empty one after it
}

TEST_CASE("model sizes have bounds past any published model", "[config]") {
  // llm-plan --set model.n_layers=1e7 used to take 13.8 GB and 40 s to list the weights.
  CHECK_THAT(error_of("", {"model.n_layers=1e7"}), Catch::Contains("expected an integer in [1, 4096], got 10000000"));
  CHECK_THAT(error_of("", {"model.vocab_size=100000000"}),
             Catch::Contains("--set model.vocab_size=100000000: expected an integer in [1, 16777216]"));
  // Each size within its bound, the whole past 100 trillion parameters.
  CHECK_THAT(error_of("model:\n  dim: 65536\n  n_heads: 512\n  n_layers: 4096\n  ffn_dim: 1048576\n"),
             Catch::Contains("model: describes a model of 914") && Catch::Contains("trillion parameters"));
  // Each within its bound, but 4096 x 4096 experts to list (llm-plan ran out of memory).
  CHECK_THAT(error_of("model:\n  dim: 64\n  n_heads: 4\n  ffn_dim: 64\n  n_layers: 4096\n  n_experts: 4096\n"),
             Catch::Contains("model.n_experts: n_layers x n_experts is 16777216, past libllm's limit of 131072"));
  // The largest shipped recipe passes.
  CHECK_NOTHROW(Recipe::load(recipe("k2-65b.yaml")));
}
