// Fine-tuning: LoRA adapters (identity at init, frozen base, exact merge), HF export and PEFT
// adapter export, and the fine-tuning loop (exact resume, held-out loss falls).
#include "../catch_torch.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "../common.h"
#include "libllm/checkpoint.h"
#include "libllm/eval.h"
#include "libllm/finetune.h"
#include "libllm/guard.h"
#include "libllm/hf.h"
#include "libllm/recipe.h"
#include "libllm/safetensors.h"
#include "libllm/tokenizer.h"
#include "libllm/train.h"

using namespace libllm;
using libllm::test::jsonl;
using libllm::test::read_file;
using libllm::test::write_file;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::vector<std::string> kAll = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

LoraConfig lora(int64_t rank, double alpha, double dropout, std::vector<std::string> targets = kAll) {
  LoraConfig c;
  c.rank = rank;
  c.alpha = alpha;
  c.dropout = dropout;
  c.targets = std::move(targets);
  return c;
}

// Random B so that adapters change the output.
void randomize_adapters(Transformer& m) {
  torch::NoGradGuard ng;
  for (auto& p : m->named_parameters())
    if (p.key().find("lora_B") != std::string::npos) p.value().normal_(0.0, 0.05);
}

// A chat set where each answer follows from its question: "Spell the word W." -> "W is spelled w-o-r-d."
std::string make_chat(const test::TempDir& tmp, int n) {
  const std::vector<std::string> words = {"time", "model", "data", "train", "word", "language", "text", "token",
                                          "loss", "value", "small", "large", "first", "every", "world", "order"};
  const std::string path = tmp / "chat.jsonl";
  std::ofstream out(path);
  for (int i = 0; i < n; ++i) {
    const std::string& w = words[static_cast<size_t>(i) % words.size()];
    std::string spelled;
    for (char c : w) spelled += (spelled.empty() ? "" : "-") + std::string(1, c);
    if (i % 2 == 0)
      out << json({{"prompt", "Spell the word " + w + "."}, {"response", w + " is spelled " + spelled + "."}}).dump() << "\n";
    else
      out << json({{"messages", {{{"role", "user"}, {"content", "How is " + w + " spelled?"}},
                                 {{"role", "assistant"}, {"content", "It is " + spelled + "."}}}}}).dump() << "\n";
  }
  return path;
}

// A random-weights HF base with the fixture tokenizer and room for chat examples (160 positions).
std::string make_base(const test::TempDir& tmp, uint64_t seed = 11) {
  ModelConfig mc;
  mc.vocab_size = 384, mc.dim = 32, mc.n_layers = 2, mc.n_heads = 4, mc.n_kv_heads = 2, mc.ffn_dim = 64;
  mc.max_seq_len = 160;
  torch::manual_seed(seed);
  Transformer m(mc);
  ExportOptions opts;
  opts.dtype = "float32";
  opts.tokenizer_path = test::fixture("tokenizer.model");
  export_hf(m, tmp / "base", opts);
  return tmp / "base";
}

Recipe ft_recipe(const std::string& base, const std::string& chat, const std::string& run_dir,
                 const std::vector<std::string>& extra = {}) {
  const std::string yaml = R"(
finetune: {base: )" + base + R"(, method: lora}
lora: {rank: 4, alpha: 8, dropout: 0.1, targets: [q_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
chat: {files: [)" + chat + R"(], valid_every: 5, chat_template: llama2}
data: {seed: 3}
optim: {lr: 0.02, weight_decay: 0.0, grad_clip: 1.0}
schedule: {kind: cosine, warmup_steps: 2}
train: {run_dir: )" + run_dir + R"(, seq_len: 150, micro_batch: 4, steps: 8, eval_every: 4, eval_batches: 4, log_every: 100, plot: false, threads: 1}
checkpoint: {every: 3, keep_last: 5}
)";
  return Recipe::parse(yaml, "test-recipe", extra);
}


}  // namespace

TEST_CASE("LoRA with its initial zero B leaves the outputs unchanged, the frozen base gets no gradient", "[finetune]") {
  Pretrained base = load_pretrained(test::fixture("tiny-llama"));
  Transformer m = base.model;
  torch::manual_seed(5);
  auto ids = torch::randint(0, 384, {2, 12}, torch::kInt64);
  m->eval();
  auto before = m->forward(ids).logits.clone();
  apply_lora(m, lora(4, 8, 0.2));
  CHECK(has_lora(m));
  CHECK(torch::equal(m->forward(ids).logits, before));  // eval: bit for bit
  m->train();
  CHECK(torch::equal(m->forward(ids).logits, before));  // dropout on A's input, B = 0: still exact

  // Trainable: r * (in + out) per adapted projection; tiny-llama: dim 64, 4 heads x 16, 2 kv heads, ffn 160.
  const int64_t per_layer = 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 160));
  const ParamSummary ps = summarize_parameters(m);
  CHECK(ps.trainable == 2 * per_layer);
  CHECK(static_cast<int64_t>(trainable_parameters(m).size()) == 2 * 7 * 2);

  auto y = torch::randint(0, 384, {2, 12}, torch::kInt64);
  cross_entropy(m->forward(ids).logits, y).backward();
  int64_t base_params = 0;
  for (auto& p : m->named_parameters()) {
    const bool adapter = p.key().find(".lora_") != std::string::npos;
    if (!adapter) {
      ++base_params;
      INFO(p.key());
      CHECK_FALSE(p.value().requires_grad());
      CHECK_FALSE(p.value().grad().defined());
    } else if (p.key().find("lora_B") != std::string::npos) {
      CHECK(p.value().grad().abs().sum().item<double>() > 0);  // B learns first
    } else {
      CHECK(p.value().grad().abs().sum().item<double>() == 0);  // dL/dA = scale B^T ... = 0 while B = 0
    }
  }
  CHECK(base_params == 2 * 9 + 3);

}

TEST_CASE("LoRA dropout on the CPU drops p of the inputs, scales the rest by 1/(1-p), follows torch's seed", "[finetune]") {
  Linear l(8, 8);
  l->add_lora(8, 8.0, 0.25);  // scale alpha / r = 1
  torch::NoGradGuard no_grad;
  l->weight.zero_();
  l->lora_A->weight.copy_(torch::eye(8));
  l->lora_B->weight.copy_(torch::eye(8));  // y = dropout(x)
  l->train();
  auto x = torch::ones({4, 5000, 8});
  torch::manual_seed(1);
  auto a = l->forward(x);
  torch::manual_seed(1);
  CHECK(torch::equal(l->forward(x), a));
  CHECK(!torch::equal(l->forward(x), a));  // the next draw: another mask
  auto kept = a != 0;
  // 160,000 elements: the kept share's standard deviation is 0.0011; 0.005 is 4.6 of them.
  CHECK(kept.to(torch::kFloat64).mean().item<double>() == Approx(0.75).margin(0.005));
  CHECK((a.masked_select(kept) - 1.0 / 0.75).abs().max().item<double>() < 1e-6);
  // Neighbouring elements are independent: the kept share among the neighbours of dropped ones.
  auto flat = kept.reshape({-1});
  auto after_dropped = flat.slice(0, 1).masked_select(flat.slice(0, 0, -1).logical_not());
  CHECK(after_dropped.to(torch::kFloat64).mean().item<double>() == Approx(0.75).margin(0.01));
  l->eval();
  CHECK(torch::equal(l->forward(x), x));
}

TEST_CASE("the LoRA term's own backward gives autograd's gradients through the plain ops (fp32, bf16, dropout)",
          "[finetune]") {
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16})
    for (const double p : {0.0, 0.3}) {
      INFO("dtype " << dtype << ", dropout " << p);
      const auto shape = std::vector<int64_t>{3, 7, 16};  // (B, T, in)
      // The mask this seed draws for this shape, read through an identity adapter on ones.
      Linear id(16, 16);
      id->add_lora(16, 16.0, p);
      {
        torch::NoGradGuard ng;
        id->lora_A->weight.copy_(torch::eye(16));
        id->lora_B->weight.copy_(torch::eye(16));
      }
      torch::manual_seed(9);
      const auto dropped = id->forward(torch::ones(shape)).detach();  // 0 or 1 / (1 - p)

      Linear l(16, 12);
      l->add_lora(4, 8.0, p);
      torch::manual_seed(3);
      {
        torch::NoGradGuard ng;
        l->weight.normal_(0, 0.2);
        l->weight.set_data(l->weight.to(dtype));
        l->lora_B->weight.normal_(0, 0.2);
      }
      l->weight.requires_grad_(false);  // a frozen base
      auto x = torch::randn(shape).to(dtype).requires_grad_(true);
      auto gy = torch::randn({3, 7, 12}).to(dtype);
      const std::vector<torch::Tensor> inputs{x, l->lora_A->weight, l->lora_B->weight};
      torch::manual_seed(9);
      auto ours = torch::autograd::grad({l->forward(x)}, inputs, {gy});
      // The same arithmetic as plain autograd ops: what LinearImpl::forward was.
      auto h = x.to(torch::kFloat32) * dropped;
      auto ref_y = torch::nn::functional::linear(x, l->weight) + (l->lora_B(l->lora_A(h)) * l->lora_scale()).to(dtype);
      auto ref = torch::autograd::grad({ref_y}, inputs, {gy});
      for (size_t i = 0; i < 3; ++i) {
        INFO("gradient " << i << " (x, A, B)");
        CHECK(ours[i].scalar_type() == ref[i].scalar_type());
        CHECK(ref[i].abs().max().item<double>() > 0);
        CHECK(test::max_abs_diff(ours[i], ref[i]) <= 1e-6 * ref[i].abs().max().item<double>());
      }
    }
}

TEST_CASE("activation checkpointing gives the same adapter gradients (frozen embedding, LoRA dropout)", "[finetune]") {
  Pretrained base = load_pretrained(test::fixture("tiny-llama"));
  Transformer m = base.model;
  torch::manual_seed(1);
  apply_lora(m, lora(4, 8, 0.3));  // the recompute must draw the same dropout masks
  randomize_adapters(m);
  m->train();
  auto ids = torch::randint(0, 384, {2, 12}, torch::kInt64), y = torch::randint(0, 384, {2, 12}, torch::kInt64);
  auto grads = [&](bool ckpt) {
    m->set_activation_checkpointing(ckpt);
    for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
    torch::manual_seed(7);
    cross_entropy(m->forward(ids).logits, y).backward();
    std::vector<torch::Tensor> g;
    for (auto& [n, p] : trainable_parameters(m)) g.push_back(p.grad().clone());
    return g;
  };
  auto plain = grads(false), recomputed = grads(true);
  REQUIRE(plain.size() == recomputed.size());
  for (size_t i = 0; i < plain.size(); ++i) CHECK(test::max_abs_diff(plain[i], recomputed[i]) < 1e-6);
  for (auto& p : m->parameters())
    if (!p.requires_grad()) CHECK_FALSE(p.grad().defined());
}

TEST_CASE("lora.targets naming no projection is an error listing the model's projections", "[finetune]") {
  Pretrained base = load_pretrained(test::fixture("tiny-llama"));
  const std::string err = test::error_of([&] { apply_lora(base.model, lora(4, 8, 0, {"q_proj", "qkv_proj"})); });
  CHECK_THAT(err, Catch::Contains("lora.targets: 'qkv_proj' names no projection"));
  CHECK_THAT(err, Catch::Contains("gate_proj"));
}

TEST_CASE("a merged export equals base + (alpha/r) B A and scores exactly like the in-memory model", "[finetune]") {
  test::TempDir tmp;
  Pretrained base = load_pretrained(test::fixture("tiny-llama"));
  Transformer m = base.model;
  const auto W = m->model->layers[0]->as<BlockImpl>()->self_attn->q_proj->weight.clone();
  torch::manual_seed(2);
  apply_lora(m, lora(8, 4, 0.0));
  randomize_adapters(m);
  m->eval();
  auto* q = m->model->layers[0]->as<BlockImpl>()->self_attn->q_proj.get();
  const auto A = q->lora_A->weight.detach(), B = q->lora_B->weight.detach();
  // Independent reference in float64, then the same sum in fp32: (alpha / r) = 0.5.
  const auto ref64 = W.to(torch::kFloat64) + 0.5 * torch::matmul(B.to(torch::kFloat64), A.to(torch::kFloat64));
  std::map<std::string, torch::Tensor> merged;
  for (auto& [n, t] : merged_weights(m)) merged[n] = t;
  const auto& Wm = merged.at("model.layers.0.self_attn.q_proj.weight");
  CHECK(test::max_abs_diff(Wm.to(torch::kFloat64), ref64) < 1e-6);
  CHECK(torch::equal(Wm, W + torch::matmul(B, A) * 0.5));
  CHECK(merged.size() == 2 * 9 + 3);  // no adapter tensors
  {                                   // merge_lora folds the same sum into the layer itself and removes the adapter
    Transformer copy = load_pretrained(test::fixture("tiny-llama")).model;
    torch::manual_seed(2);
    apply_lora(copy, lora(8, 4, 0.0));
    torch::NoGradGuard ng;
    for (auto& p : copy->named_parameters()) p.value().copy_(m->named_parameters()[p.key()]);
    merge_lora(copy);
    CHECK_FALSE(has_lora(copy));
    CHECK(torch::equal(copy->model->layers[0]->as<BlockImpl>()->self_attn->q_proj->weight, Wm));
  }

  ExportOptions opts;
  opts.dtype = "float32";
  opts.tokenizer_path = test::fixture("tokenizer.model");
  export_hf(m, tmp / "merged", opts);
  auto files = read_weights(tmp / "merged");
  CHECK(files.size() == merged.size());
  for (auto& [n, t] : merged) {
    INFO(n);
    REQUIRE(files.count(n));
    CHECK(torch::equal(files.at(n), t));
  }
  // llm-eval's computation on the exported folder == on the in-memory LoRA model.
  const Tokenizer tok = Tokenizer::load(test::fixture("tokenizer.model"));
  std::vector<std::vector<int64_t>> docs;
  for (const auto& d : read_documents(test::fixture("eval.txt"))) docs.push_back(tok.encode(d));
  EvalOptions eo;
  const EvalResult in_memory = evaluate_tokens(m, docs, eo);
  Pretrained exported = load_pretrained(tmp / "merged");
  CHECK_FALSE(has_lora(exported.model));
  const EvalResult from_disk = evaluate_tokens(exported.model, docs, eo);
  CHECK(from_disk.tokens == in_memory.tokens);
  CHECK(std::abs(from_disk.loss - in_memory.loss) < 1e-5);
  Pretrained fresh = load_pretrained(test::fixture("tiny-llama"));
  CHECK(std::abs(from_disk.loss - evaluate_tokens(fresh.model, docs, eo).loss) > 1e-3);  // the adapters mattered
}

TEST_CASE("a LoRA merge of any rows gets the bits of those rows of the whole weight", "[finetune]") {
  torch::manual_seed(3);
  const int64_t out = 2 * kLoraMergeRows + 37, in = 24, r = 4;
  const torch::Tensor W = torch::randn({out, in}), B = torch::randn({out, r}), A = torch::randn({r, in});
  const torch::Tensor whole = lora_merged_rows(W, B, A, 0.5);
  // Against an independent sum in float64 (fp32 rounding of a 4-term product, values ~3).
  const auto ref = W.to(torch::kFloat64) + 0.5 * torch::matmul(B.to(torch::kFloat64), A.to(torch::kFloat64));
  CHECK(test::max_abs_diff(whole.to(torch::kFloat64), ref) < 1e-5);
  // Row ranges inside one block, across block boundaries, whole blocks, the short last block.
  const std::vector<std::pair<int64_t, int64_t>> ranges = {
      {0, out}, {1, 5}, {kLoraMergeRows - 3, kLoraMergeRows + 3}, {kLoraMergeRows, 2 * kLoraMergeRows}, {out - 2, out}};
  for (const auto& [first, last] : ranges) {
    INFO(first << ".." << last);
    CHECK(torch::equal(lora_merged_rows(W.narrow(0, first, last - first), B, A, 0.5, first),
                       whole.narrow(0, first, last - first)));
  }
  // bf16 rows are merged in fp32.
  CHECK(lora_merged_rows(W.to(torch::kBFloat16), B, A, 0.5).scalar_type() == torch::kFloat32);
  CHECK_THAT(test::error_of([&] { lora_merged_rows(W.narrow(0, 0, 10), B, A, 0.5, out - 5); }),
             Catch::Contains("rows or shapes do not match"));
}

TEST_CASE("the PEFT adapter has the files, tensor names and config keys PEFT reads", "[finetune]") {
  test::TempDir tmp;
  Pretrained base = load_pretrained(test::fixture("tiny-llama"));
  torch::manual_seed(3);
  const LoraConfig cfg = lora(4, 16, 0.05, {"q_proj", "v_proj"});
  apply_lora(base.model, cfg);
  randomize_adapters(base.model);
  export_peft_adapter(base.model, cfg, tmp / "adapter", "org/base-7b");
  const json c = json::parse(read_file(tmp / "adapter/adapter_config.json"));
  // The keys peft.LoraConfig.from_pretrained reads (PeftConfig + LoraConfig fields).
  for (const char* key :
       {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules",
        "bias", "fan_in_fan_out", "inference_mode", "modules_to_save", "init_lora_weights"})
    CHECK(c.contains(key));
  // Keys newer PEFT versions added are left out at their defaults (older ones refuse them).
  for (const char* key : {"use_rslora", "use_dora", "rank_pattern", "alpha_pattern"}) CHECK_FALSE(c.contains(key));
  CHECK(c["peft_type"] == "LORA");
  CHECK(c["task_type"] == "CAUSAL_LM");
  CHECK(c["r"] == 4);
  CHECK(c["lora_alpha"].get<double>() == 16.0);
  CHECK(c["target_modules"] == json({"q_proj", "v_proj"}));
  CHECK(c["bias"] == "none");
  CHECK(c["base_model_name_or_path"] == "org/base-7b");
  auto f = safetensors::File::open(tmp / "adapter/adapter_model.safetensors");
  CHECK(f->tensors().size() == 2 * 2 * 2);
  const std::string a0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
  const std::string b1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
  REQUIRE(f->find(a0));
  REQUIRE(f->find(b1));
  CHECK(f->at(a0).shape == std::vector<int64_t>{4, 64});
  CHECK(f->at(b1).shape == std::vector<int64_t>{32, 4});
  CHECK(f->at(b1).dtype == safetensors::DType::F32);
  auto* v1 = base.model->model->layers[1]->as<BlockImpl>()->self_attn->v_proj.get();
  auto stored = torch::from_blob(const_cast<uint8_t*>(f->data(f->at(b1))), {32, 4}, torch::kFloat32);
  CHECK(torch::equal(stored, v1->lora_B->weight));
  // A model without adapters has nothing to export.
  Pretrained plain = load_pretrained(test::fixture("tiny-llama"));
  CHECK_THAT(test::error_of([&] { export_peft_adapter(plain.model, cfg, tmp / "x", "b"); }),
             Catch::Contains("no LoRA adapters"));
}

TEST_CASE("a fine-tune's tokenizer.path must have its base's pieces", "[finetune][train]") {
  test::TempDir tmp;
  const std::string chat = make_chat(tmp, 20), base = make_base(tmp);
  const std::string other = test::fixture("tokenizer-control.model");
  CHECK_THAT(test::error_of([&] { finetune(ft_recipe(base, chat, tmp / "r", {"tokenizer.path=" + other})); }),
             Catch::Contains("tokenizer.path: " + other + " is not the tokenizer of finetune.base " + base +
                             " (284 of the pieces differ, the first at id 3 ('[INST]' against '<0x00>'))") &&
                 Catch::Contains("leave tokenizer.path empty to use the base's own"));
  CHECK_FALSE(fs::exists(tmp / "r"));
  // The same tokenizer at another path trains; the short run's pitfalls are noted.
  fs::copy_file(test::fixture("tokenizer.model"), tmp / "copy.model");
  std::string printed = test::stdout_of([&] {
    CHECK(std::isfinite(finetune(ft_recipe(
        base, chat, tmp / "r", {"tokenizer.path=" + tmp / "copy.model", "train.steps=1", "train.eval_every=0"}))));
  });
  CHECK_THAT(printed, Catch::Contains("note: schedule.warmup_steps (2) > train.steps (1): the learning rate is still "
                                      "warming up at the last step (50.0% of optim.lr)"));
  CHECK_THAT(printed, Catch::Contains("note: train.eval_every is 0: the 4 examples chat.valid_every holds out are "
                                      "neither trained on nor evaluated"));
  // Every evaluation is printed, also between log_every's lines (100 here).
  printed = test::stdout_of([&] {
    finetune(ft_recipe(base, chat, tmp / "s", {"train.steps=5", "train.eval_every=2"}));
  });
  CHECK_THAT(printed, Catch::Contains("step      2/5 | loss") && Catch::Contains("step      4/5 | loss"));
  CHECK_THAT(printed, !Catch::Contains("step      3/5") && !Catch::Contains("note: schedule.warmup_steps"));
  // A base whose own tokenizer.model cannot be read (a Git LFS pointer): tokenizer.path works
  // around it, with a warning.
  fs::copy(base, tmp / "lfs-base", fs::copy_options::recursive);
  write_file(tmp / "lfs-base/tokenizer.model", "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n");
  const std::string warned = test::stderr_of([&] {
    finetune(ft_recipe(tmp / "lfs-base", chat, tmp / "t", {"tokenizer.path=" + tmp / "copy.model", "train.steps=1"}));
  });
  CHECK_THAT(warned, Catch::Contains("warning: tokenizer.path " + tmp / "copy.model" +
                                     " is used; the model folder's own cannot be compared with it"));
}

TEST_CASE("fine-tuning resumes exactly (LoRA and full) and lowers the held-out loss", "[finetune][train]") {
  test::TempDir tmp;
  const std::string chat = make_chat(tmp, 80), base = make_base(tmp);
  for (const std::string method : {"lora", "full"}) {
    DYNAMIC_SECTION("method " << method) {
      const std::string a = tmp / (method + "-a"), b = tmp / (method + "-b");
      const std::vector<std::string> set = {"finetune.method=" + method};
      finetune(ft_recipe(base, chat, a, set));
      finetune(ft_recipe(base, chat, b, set));
      fs::remove_all(b + "/checkpoints/step-00000006");
      fs::remove_all(b + "/checkpoints/step-00000008");
      REQUIRE(latest_checkpoint(b + "/checkpoints") == b + "/checkpoints/step-00000003");
      finetune(ft_recipe(base, chat, b, set));  // resume: auto from step 3
      if (method == "lora") {  // the saved adapters' scale cannot change on resume (ft_recipe: alpha 8)
        std::vector<std::string> other = set;
        other.insert(other.end(), {"lora.alpha=64", "train.steps=10"});
        CHECK_THAT(test::error_of([&] { finetune(ft_recipe(base, chat, b, other)); }),
                   Catch::Contains("the resumed run trained its adapters with lora.alpha 8 (now 64)"));
      }
      const auto ma = jsonl(a + "/metrics.jsonl"), mb = jsonl(b + "/metrics.jsonl");
      REQUIRE(ma.size() == 8);
      REQUIRE(mb.size() == 8);
      for (size_t i = 0; i < 8; ++i) CHECK(ma[i]["loss"].get<double>() == mb[i]["loss"].get<double>());
      CHECK(read_file(a + "/checkpoints/step-00000008/model.safetensors") ==
            read_file(b + "/checkpoints/step-00000008/model.safetensors"));
      CHECK(read_file(a + "/checkpoints/step-00000008/optimizer.safetensors") ==
            read_file(b + "/checkpoints/step-00000008/optimizer.safetensors"));
      CHECK(read_file(a + "/data_sequence.jsonl") == read_file(b + "/data_sequence.jsonl"));

      // Held-out loss: before fine-tuning (events.jsonl, step 0) vs after 8 steps.
      double before = -1;
      for (const auto& e : jsonl(a + "/events.jsonl"))
        if (e["event"] == "eval") before = e["eval_loss"].get<double>();
      const double after = ma.back()["eval_loss"].get<double>();
      INFO("held-out loss " << before << " -> " << after);
      CHECK(before > 0);
      CHECK(after < before - (method == "full" ? 1.0 : 0.1));  // observed: full 5.96 -> 3.28, LoRA 5.96 -> 5.77

      // The checkpoint is a model folder: a LoRA one loads with its adapters.
      Pretrained ck = load_pretrained(a + "/checkpoints/step-00000008");
      CHECK(ck.has_lora == (method == "lora"));
      CHECK(has_lora(ck.model) == (method == "lora"));
      if (method == "lora") {
        // It holds only the adapters; its base is the HF folder, recorded absolute.
        CHECK(ck.base == fs::canonical(base).string());
        CHECK(read_file(a + "/checkpoints/step-00000008/model.safetensors").size() <
              read_file(base + "/model.safetensors").size() / 4);
        // A LoRA fine-tune of that checkpoint: its adapters are merged into the base first, so the
        // held-out loss before training is run a's last one (merged vs unmerged: fp32 rounding),
        // and its own checkpoint loads through two levels: adapters -> LoRA checkpoint -> base.
        const std::string c = tmp / "lora-c";
        finetune(ft_recipe(a + "/checkpoints/step-00000008", chat, c, {"train.steps=3"}));
        double start = -1;
        for (const auto& e : jsonl(c + "/events.jsonl"))
          if (e["event"] == "eval") start = e["eval_loss"].get<double>();
        CHECK(start == Approx(after).epsilon(1e-5));
        Pretrained cc = load_pretrained(c + "/checkpoints/step-00000003");
        // Rows of the chain's merged weights, as a ZeRO-3 rank asks for its slice: the same bits
        // as those rows of the whole weights.
        const Pretrained chain = inspect_pretrained(c + "/checkpoints/step-00000003");
        std::map<std::string, torch::Tensor> whole;
        for_each_merged_weight(chain, torch::kBFloat16,
                               [&](const std::string& n, const torch::Tensor& w) { whole[n] = w; });
        size_t parts = 0;
        for_each_merged_weight(
            chain, torch::kBFloat16,
            [&](const std::string& n, const torch::Tensor& w) {
              INFO(n);
              ++parts;
              CHECK(torch::equal(w, whole.at(n).narrow(0, 1, w.size(0))));
            },
            [](const std::string& n, const std::vector<int64_t>& shape) {
              return n.find("norm") != std::string::npos ? RowRange{0, 0} : RowRange{1, shape[0] - 2};
            });
        CHECK(parts == 2 * 7 + 2);  // (no norms: 7 projections per block, the embedding and the head)
        CHECK(cc.base == fs::canonical(a + "/checkpoints/step-00000008").string());
        CHECK(has_lora(cc.model));
        // Resuming its adapters in a run that trains every weight: an error, not a silent mix.
        CHECK_THAT(test::error_of([&] { finetune(ft_recipe(base, chat, a, {"finetune.method=full"})); }),
                   Catch::Contains("holds only LoRA adapters, and this run trains every weight"));
        // A base replaced at the same path (another model): the adapters' record of it no longer
        // matches, for loading and for resuming.
        fs::rename(base, tmp / "base-orig");
        make_base(tmp, 12);
        CHECK_THAT(test::error_of([&] { load_pretrained(a + "/checkpoints/step-00000008"); }),
                   Catch::Contains("has changed since the adapters were trained"));
        CHECK_THAT(test::error_of([&] { finetune(ft_recipe(base, chat, a, set)); }),
                   Catch::Contains("its adapters were trained on the base " + ck.base +
                                   ", and this run's finetune.base " + ck.base + " is another model or revision now"));
        fs::remove_all(base);
        fs::rename(tmp / "base-orig", base);
        // A byte of the base changed where its fingerprint samples (the middle of each file): the
        // damaged file is named, not taken for another model.
        {
          const std::string weights = base + "/model.safetensors";
          const std::string good = read_file(weights);
          std::string bad = good;
          bad[bad.size() / 2] ^= 0x10;
          std::ofstream(weights, std::ios::binary | std::ios::trunc) << bad;
          const std::string damaged = weights + ": the data does not match the checksum its writer recorded";
          CHECK_THAT(test::error_of([&] { load_pretrained(a + "/checkpoints/step-00000008"); }),
                     Catch::Contains(damaged));
          CHECK_THAT(test::error_of([&] { finetune(ft_recipe(base, chat, a, set)); }), Catch::Contains(damaged));
          std::ofstream(weights, std::ios::binary | std::ios::trunc) << good;
        }
        // Its base gone: one error naming it.
        fs::rename(a, tmp / "lora-a-moved");
        CHECK_THAT(test::error_of([&] { load_pretrained(c + "/checkpoints/step-00000003"); }),
                   Catch::Contains("holds only LoRA adapters, and their base " + cc.base + " is gone") &&
                       Catch::Contains("or a symbolic link to its new place (ln -s NEW " + cc.base + ")"));
        // The hint's way: a link at the recorded path (no file of the chain changes, so every
        // fingerprint above it still holds).
        fs::create_directory_symlink(tmp / "lora-a-moved", a);
        Pretrained linked = load_pretrained(c + "/checkpoints/step-00000003");
        CHECK(has_lora(linked.model));
        fs::remove(a);
      }
    }
  }
}

TEST_CASE("a chat step's loss is the mean over all its target tokens, not a mean of micro-batch means",
          "[finetune][train]") {
  // 2 micro batches of 2 examples (accumulation 2) hold different numbers of answer tokens: the
  // step's loss weighs every target token alike (torchtune; transformers' num_items_in_batch).
  // Independently: the base model, the same examples (ChatDataset, data.seed), summed CE / count.
  test::TempDir tmp;
  const std::string chat = make_chat(tmp, 40), base = make_base(tmp);
  const Recipe r = ft_recipe(base, chat, tmp / "w",
                             {"finetune.method=full", "train.micro_batch=2", "train.global_batch_tokens=600",
                              "train.steps=1", "train.eval_every=0", "checkpoint.every=0"});
  finetune(r);
  const auto m = jsonl(tmp / "w/metrics.jsonl");
  REQUIRE(m.size() == 1);
  Pretrained p = load_pretrained(base, torch::kFloat32);
  const Tokenizer tok = Tokenizer::load(p.tokenizer_path);
  ChatDataset data(r.chat, tok, r.train.seq_len, static_cast<uint64_t>(r.data.seed), 0, 1);
  double sum = 0, mean_of_means = 0;
  int64_t count = 0;
  std::vector<int64_t> counts;
  std::vector<torch::Tensor> sums;  // each micro batch's summed cross-entropy, with its graph
  for (int micro = 0; micro < 2; ++micro) {
    ChatBatch b;
    data.next(2, b);
    auto logits = p.model->forward(b.inputs).logits;  // (B, T, V)
    auto ce = torch::nn::functional::cross_entropy(
        logits.reshape({-1, logits.size(-1)}), b.targets.reshape({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
    const int64_t k = (b.targets != -100).sum().item<int64_t>();
    sum += ce.item<double>();
    mean_of_means += ce.item<double>() / static_cast<double>(k) / 2;
    count += k;
    counts.push_back(k);
    sums.push_back(ce);
  }
  INFO("targets per micro batch: " << counts[0] << ", " << counts[1]);
  REQUIRE(counts[0] != counts[1]);
  CHECK(m[0]["target_tokens"].get<int64_t>() == count);
  CHECK(m[0]["loss"].get<double>() == Approx(sum / static_cast<double>(count)).epsilon(1e-6));
  CHECK(std::abs(sum / static_cast<double>(count) - mean_of_means) > 1e-4);  // (the two differ here)
  // The gradient (its norm before clipping) is that of the token mean too.
  ((sums[0] + sums[1]) / static_cast<double>(count)).backward();
  double sq = 0;
  for (const auto& w : p.model->parameters()) sq += w.grad().to(torch::kFloat64).pow(2).sum().item<double>();
  CHECK(m[0]["grad_norm"].get<double>() == Approx(std::sqrt(sq)).epsilon(1e-5));
}

TEST_CASE("a folder export streams one weight at a time and equals loading then exporting, bit for bit",
          "[finetune][io]") {
  test::TempDir tmp;
  const std::string chat = make_chat(tmp, 40), base = make_base(tmp);
  // A chain: adapters (b) -> adapters (a) -> HF base; and an older LoRA checkpoint that holds its
  // base and adapters in one file (no lora_base in trainer.json).
  const std::vector<std::string> short_run = {"train.steps=3", "train.eval_every=0"};
  finetune(ft_recipe(base, chat, tmp / "a", short_run));
  const std::string ka = tmp / "a/checkpoints/step-00000003";
  finetune(ft_recipe(ka, chat, tmp / "b", short_run));
  const std::string kb = tmp / "b/checkpoints/step-00000003";
  const std::string whole = tmp / "whole";
  fs::copy(ka, whole);
  {
    auto w = read_weights(base);
    for (auto& [n, t] : read_weights(ka)) w[n] = t;
    std::vector<safetensors::TensorView> views;
    for (auto& [n, t] : w) views.push_back({n, st_dtype_of(t.scalar_type()), t.sizes().vec(), t.data_ptr()});
    safetensors::write(whole + "/model.safetensors", views);
    json tj = json::parse(read_file(whole + "/trainer.json"));
    tj.erase("lora_base");
    tj.erase("lora_base_fingerprint");
    write_file(whole + "/trainer.json", tj.dump());
  }
  REQUIRE(inspect_pretrained(whole).base.empty());
  REQUIRE(inspect_pretrained(whole).has_lora);
  REQUIRE(inspect_pretrained(kb).base == fs::canonical(ka).string());

  // Also torch.save sources (a dense and an MoE model) and a tied fp16 one.
  for (const std::string& folder : {base, ka, kb, whole, test::fixture("tiny-llama-bin"),
                                    test::fixture("tiny-mixtral-bin"), test::fixture("tiny-mistral")})
    for (const std::string dtype : {"float32", "bfloat16"}) {
      INFO(folder << " as " << dtype);
      ExportOptions opts;
      opts.dtype = dtype;
      opts.max_shard_bytes = 30000;  // several shards
      const std::string mem = tmp / "mem", streamed = tmp / "streamed";
      Pretrained loaded = load_pretrained(folder);
      export_hf(loaded.model, mem, opts);
      export_hf(inspect_pretrained(folder), streamed, opts);
      const auto files = test::listing(mem);
      REQUIRE(files.size() > 4);
      CHECK(test::listing(streamed) == files);
      for (const auto& f : files) {
        INFO(f);
        CHECK(read_file(streamed + "/" + f) == read_file(mem + "/" + f));
      }
    }
  // The merge mattered: b's export differs from the base it started from.
  ExportOptions f32;
  f32.dtype = "float32";
  export_hf(inspect_pretrained(kb), tmp / "b-hf", f32);
  const auto merged = read_weights(tmp / "b-hf"), plain = read_weights(base);
  CHECK(test::max_abs_diff(merged.at("model.layers.1.self_attn.v_proj.weight"),
                           plain.at("model.layers.1.self_attn.v_proj.weight")) > 1e-4);
  CHECK(torch::equal(merged.at("model.embed_tokens.weight"), plain.at("model.embed_tokens.weight")));

  // PEFT's layout from the folder alone == from the loaded model.
  for (const std::string& folder : {kb, whole}) {
    INFO(folder);
    Pretrained loaded = load_pretrained(folder);
    export_peft_adapter(loaded.model, loaded.lora, tmp / "peft-mem", "org/base");
    export_peft_adapter(inspect_pretrained(folder), tmp / "peft-streamed", "org/base");
    for (const char* f : {"adapter_model.safetensors", "adapter_config.json"})
      CHECK(read_file(tmp / "peft-streamed" + "/" + f) == read_file(tmp / "peft-mem" + "/" + f));
  }
  CHECK_THAT(test::error_of([&] { export_peft_adapter(inspect_pretrained(base), tmp / "x", "b"); }),
             Catch::Contains("is not a LoRA fine-tuning checkpoint"));

  // A bad tensor anywhere in the chain is found from the headers, before anything is written.
  const std::string bad = tmp / "bad";
  fs::copy(ka, bad);
  {
    auto w = read_weights(ka);
    auto& t = w.at("model.layers.0.self_attn.q_proj.lora_A.weight");
    t = t.t().contiguous();
    std::vector<safetensors::TensorView> views;
    for (auto& [n, x] : w) views.push_back({n, st_dtype_of(x.scalar_type()), x.sizes().vec(), x.data_ptr()});
    safetensors::write(bad + "/model.safetensors", views);
  }
  CHECK_THAT(test::error_of([&] { export_hf(inspect_pretrained(bad), tmp / "never", f32); }),
             Catch::Contains("tensor 'model.layers.0.self_attn.q_proj.lora_A.weight': has shape [32, 4]"));
  CHECK_FALSE(fs::exists(tmp / "never"));
}

TEST_CASE("chat rollbacks drop their examples, and the stream goes on past an earlier rollback's target",
          "[finetune][guard]") {
  test::TempDir tmp;
  const std::string chat = make_chat(tmp, 20), base = make_base(tmp);
  // The example stream of 14 steps, one example per row (16 training examples, reshuffled each epoch).
  finetune(ft_recipe(base, chat, tmp / "clean", {"train.steps=14", "train.eval_every=0"}));
  // Rolled back from step 5 to 3 (steps 4, 5 dropped), then from the repeated step 4 to 0.
  std::vector<std::pair<int64_t, int64_t>> rollbacks;
  TrainHooks hooks;
  hooks.before_rollback = [&](int64_t from, int64_t to) { rollbacks.emplace_back(from, to); };
  hooks.decide = [&](int64_t step, GuardDecision& d) {
    if ((step == 5 && rollbacks.empty()) || (step == 4 && rollbacks.size() == 1)) {
      d.action = GuardAction::Rollback;
      d.spike_start = step;
      d.reason = "test signal";
    }
  };
  finetune(ft_recipe(base, chat, tmp / "run", {"train.eval_every=0", "guard.enabled=true", "guard.defer=drop"}), hooks);
  REQUIRE(rollbacks == std::vector<std::pair<int64_t, int64_t>>{{5, 3}, {4, 0}});
  // Steps 1..3, 4..5, 4 (branch 1) used the stream's first 6 steps: the final 8 steps are its next 8.
  const auto clean = jsonl(tmp / "clean/data_sequence.jsonl"), seq = jsonl(tmp / "run/data_sequence.jsonl");
  REQUIRE(clean.size() == 14);
  REQUIRE(seq.size() == 8);
  for (size_t s = 0; s < 8; ++s) CHECK(seq[s]["windows"] == clean[s + 6]["windows"]);
  std::vector<int64_t> dropped;
  for (const auto& e : jsonl(tmp / "run/events.jsonl"))
    if (e["event"] == "rollback") dropped.push_back(e["examples"].get<int64_t>());
  CHECK(dropped == std::vector<int64_t>{8, 16});  // 2 and 4 steps of 4 rows
}

TEST_CASE("fine-tuning errors: no base, LoRA in pretraining, chat data with deferral", "[finetune]") {
  test::TempDir tmp;
  const std::string chat = make_chat(tmp, 20), base = make_base(tmp);
  CHECK_THAT(test::error_of([&] { finetune(ft_recipe(base, chat, tmp / "r", {"finetune.base="})); }),
             Catch::Contains("finetune.base: is required"));
  CHECK_THAT(test::error_of([&] { pretrain(ft_recipe(base, chat, tmp / "r")); }),
             Catch::Contains("finetune.base: is set in a pretraining run"));
  CHECK_THAT(test::error_of([&] {
               finetune(ft_recipe(base, chat, tmp / "r", {"guard.enabled=true", "guard.defer=end"}));
             }),
             Catch::Contains("guard.defer: 'end' needs packed data"));
  CHECK_THAT(test::error_of([&] { finetune(ft_recipe(base, chat, tmp / "r", {"train.seq_len=200"})); }),
             Catch::Contains("exceeds model.max_seq_len 160"));
  // The base decides the model: a model key that disagrees is an error; the MoE loss coefficients
  // are the recipe's (the saved recipe says which were used); an agreeing key is accepted.
  CHECK_THAT(test::error_of([&] { finetune(ft_recipe(base, chat, tmp / "r", {"model.n_layers=7"})); }),
             Catch::Contains("model.n_layers: is 7, but the base ") && Catch::Contains(" has 2"));
  finetune(ft_recipe(base, chat, tmp / "coef",
                     {"model.moe_z_loss_coef=0.005", "model.moe_aux_loss_coef=0", "model.max_seq_len=160",
                      "train.steps=1", "train.eval_every=0"}));
  const Recipe saved = Recipe::load(tmp / "coef/recipe.yaml");
  CHECK(saved.model.moe_z_loss_coef == 0.005);
  CHECK(saved.model.moe_aux_loss_coef == 0.0);
  CHECK(saved.model.n_layers == 2);
  // A base among the run's own checkpoints (which pruning deletes and a new run moves aside).
  fs::create_directories(tmp / "r/checkpoints");
  fs::rename(base, tmp / "r/checkpoints/step-00000001");
  CHECK_THAT(test::error_of([&] {
               finetune(ft_recipe(tmp / "r/checkpoints/step-00000001", chat, tmp / "r", {"checkpoint.resume=none"}));
             }),
             Catch::Contains("finetune.base: " + std::string(tmp / "r/checkpoints/step-00000001") +
                             " lies in this run's checkpoints folder"));
}
