// Generation: the KV cache gives exactly what recomputing the whole context gives.
#include "../catch_torch.h"

#include "../common.h"
#include "libllm/generate.h"
#include "libllm/hf.h"
#include "libllm/tokenizer.h"

using namespace libllm;

namespace {
std::vector<int64_t> concat_ids(std::vector<int64_t> a, const std::vector<int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}
}  // namespace

TEST_CASE("greedy generation with the KV cache gives the same tokens as without it", "[generate]") {
  // llama: GQA; mistral: sliding window 8 (the cache's mask must apply it); mixtral: MoE.
  for (const char* name : {"tiny-llama", "tiny-mistral", "tiny-mixtral"}) {
    DYNAMIC_SECTION(name) {
      Pretrained p = load_pretrained(test::fixture(name));
      const std::vector<int64_t> prompt = {1, 17, 250, 33, 99, 5, 140};
      GenerateOptions g;
      g.temperature = 0;
      g.eos_id = -1;
      g.max_new_tokens = 30;  // prompt + 30 < max_seq_len 48: both see the whole context
      g.use_cache = true;
      const auto cached = generate(p.model, prompt, g);
      g.use_cache = false;
      const auto plain = generate(p.model, prompt, g);
      CHECK(cached.size() == 30);
      CHECK(cached == plain);
      // Past max_seq_len (48) the cache is rebuilt from the last half window and goes on incrementally.
      g.use_cache = true;
      g.max_new_tokens = 100;
      const auto longer = generate(p.model, prompt, g);
      CHECK(longer.size() == 100);
      CHECK(std::vector<int64_t>(longer.begin(), longer.begin() + 30) == cached);
      g.use_cache = false;  // (the same context without the cache: it moves on at the same tokens)
      CHECK(generate(p.model, prompt, g) == longer);

      // Logits: a prefill of 5 then one token at a time == one full forward.
      auto ids = torch::tensor(std::vector<int64_t>{1, 17, 250, 33, 99, 5, 140, 8, 64, 3, 77, 12}).unsqueeze(0);
      torch::NoGradGuard ng;
      p.model->eval();
      auto full = p.model->forward(ids).logits;  // (1, 12, V)
      KVCache cache = p.model->new_cache(1);
      std::vector<torch::Tensor> parts = {p.model->forward_cached(ids.slice(1, 0, 5), cache).logits};
      for (int64_t t = 5; t < 12; ++t) parts.push_back(p.model->forward_cached(ids.slice(1, t, t + 1), cache).logits);
      CHECK(cache.length == 12);
      CHECK(test::max_abs_diff(torch::cat(parts, 1), full) < 1e-5);
      // A prefill with last_only gives the last position's logits alone, and the same cache.
      KVCache last = p.model->new_cache(1);
      auto prefill = p.model->forward_cached(ids.slice(1, 0, 5), last, /*last_only=*/true).logits;
      CHECK(prefill.sizes() == c10::IntArrayRef{1, 1, full.size(2)});
      CHECK(test::max_abs_diff(prefill, full.slice(1, 4, 5)) < 1e-5);
      CHECK(test::max_abs_diff(p.model->forward_cached(ids.slice(1, 5, 6), last).logits, full.slice(1, 5, 6)) < 1e-5);
    }
  }
}

TEST_CASE("sampling repeats for a seed, stops at EOS, and the stream rebuilds the text", "[generate]") {
  Pretrained p = load_pretrained(test::fixture("tiny-llama"));
  const Tokenizer tok = Tokenizer::load(test::fixture("tokenizer.model"));
  GenerateOptions g;
  g.temperature = 1.0;
  g.top_k = 50;
  g.top_p = 0.9;
  g.seed = 4;
  g.eos_id = -1;
  g.max_new_tokens = 20;
  const auto a = generate(p.model, {1, 40, 41}, g), b = generate(p.model, {1, 40, 41}, g);
  CHECK(a == b);
  // Pretend the 6th token is EOS: generation stops right after its first occurrence.
  const auto first = std::find(a.begin(), a.end(), a[5]);
  const std::vector<int64_t> upto(a.begin(), first + 1);
  g.eos_id = a[5];
  CHECK(generate(p.model, {1, 40, 41}, g) == upto);
  g.eos_id = -1;
  g.stop_ids = {a[5]};  // or one of the model's own end-of-sequence ids
  CHECK(generate(p.model, {1, 40, 41}, g) == upto);
  g.stop_ids.clear();

  // top-p applies to the top k renormalised (transformers' and vLLM's warpers): with k = 2 the
  // first token holds over half of the pair, so p = 0.5 keeps it alone, whatever its share of the
  // whole vocabulary (far below half in this random model): sampling is greedy.
  GenerateOptions greedy = g;
  greedy.temperature = 0;
  const auto want = generate(p.model, {1, 40, 41}, greedy);
  g.top_k = 2;
  g.top_p = 0.5;
  for (uint64_t seed : {1, 2, 3}) {
    g.seed = seed;
    CHECK(generate(p.model, {1, 40, 41}, g) == want);
  }

  const auto ids = tok.encode("the model reads the text and the data");
  TextStream s(tok, tok.encode("so"));
  std::string streamed;
  for (int64_t id : ids) streamed += s.push(id);
  CHECK(streamed == s.text());
  CHECK(tok.decode(concat_ids(tok.encode("so"), ids)) == "so" + streamed);
}

TEST_CASE("past the window the context restarts from its last half, with or without the cache, for any budget",
          "[generate]") {
  // tiny-llama's window is 48: a 61-token prompt is read from its last 24 tokens (at positions
  // 0..23), so it answers as the 24-token prompt does; the budget does not change the answer.
  Pretrained p = load_pretrained(test::fixture("tiny-llama"));
  REQUIRE(p.model->config().max_seq_len == 48);
  std::vector<int64_t> prompt;
  for (int64_t i = 0; i < 61; ++i) prompt.push_back(3 + (i * 37) % 300);
  GenerateOptions g;
  g.temperature = 0;
  g.eos_id = -1;
  g.max_new_tokens = 5;
  const auto cached = generate(p.model, prompt, g);
  CHECK(cached.size() == 5);
  g.max_new_tokens = 40;
  const auto longer = generate(p.model, prompt, g);
  CHECK(std::vector<int64_t>(longer.begin(), longer.begin() + 5) == cached);
  g.use_cache = false;
  CHECK(generate(p.model, prompt, g) == longer);
  g.max_new_tokens = 5;
  CHECK(generate(p.model, std::vector<int64_t>(prompt.end() - 24, prompt.end()), g) == cached);
}

TEST_CASE("sampling options: a tiny temperature is greedy, out-of-range options throw", "[generate]") {
  Pretrained p = load_pretrained(test::fixture("tiny-llama"));
  GenerateOptions g;
  g.eos_id = -1;
  g.max_new_tokens = 8;
  g.temperature = 0;
  const auto greedy = generate(p.model, {1, 40, 41}, g);
  g.temperature = 1e-30;  // (logits / T overflows float; the logits less their maximum do not)
  g.top_k = 0;
  CHECK(generate(p.model, {1, 40, 41}, g) == greedy);
  GenerateOptions bad = g;
  bad.top_p = 0;
  CHECK_THROWS_WITH(generate(p.model, {1}, bad), Catch::Contains("GenerateOptions.top_p"));
  bad = g, bad.temperature = -1;
  CHECK_THROWS_WITH(generate(p.model, {1}, bad), Catch::Contains("GenerateOptions.temperature"));
  bad = g, bad.top_k = -2;
  CHECK_THROWS_WITH(generate(p.model, {1}, bad), Catch::Contains("GenerateOptions.top_k"));
}

TEST_CASE("a stream holds back a partial UTF-8 character and gives it up at the end", "[generate]") {
  const Tokenizer tok = Tokenizer::load(test::fixture("tokenizer.model"));
  const auto ids = tok.encode("caf\xC3\xA9");  // "café": the é as byte pieces <0xC3> <0xA9>
  const auto lead = std::find_if(ids.begin(), ids.end(), [&](int64_t id) { return tok.piece(id) == "<0xC3>"; });
  REQUIRE(lead != ids.end());
  REQUIRE(lead + 1 != ids.end());
  TextStream s(tok);
  std::string streamed;
  for (auto it = ids.begin(); it <= lead; ++it) streamed += s.push(*it);
  CHECK(streamed == "caf");             // the lead byte alone is no character yet
  CHECK(s.finish() == "\xEF\xBF\xBD");  // at the end: U+FFFD, as decode() gives it
  CHECK(s.text() == tok.decode(std::vector<int64_t>(ids.begin(), lead + 1)));
  TextStream whole(tok);
  for (int64_t id : ids) streamed = whole.push(id);
  CHECK(whole.text() == "caf\xC3\xA9");
  CHECK(whole.finish().empty());
}

TEST_CASE("sampling draws from softmax(logits / T) cut to the top k, then the top p renormalised", "[generate]") {
  // A model whose logits are the same after any context (the blocks' outputs zeroed, every
  // embedding row alike, the head's rows chosen): 20,000 draws against the expected distribution
  // (transformers' and vLLM's order: temperature, top-k, top-p over the renormalised top k),
  // Pearson's chi-square below its 1e-4 quantile, and no draw outside the kept tokens.
  ModelConfig mc;
  mc.vocab_size = 8, mc.dim = 8, mc.n_layers = 1, mc.n_heads = 2, mc.n_kv_heads = 1, mc.ffn_dim = 16;
  mc.max_seq_len = 64;
  Transformer m(mc);
  const std::vector<double> l = {2.0, 1.6, 1.2, 0.9, 0.5, 0.1, -0.5, -1.0};
  {
    torch::NoGradGuard no_grad;
    for (auto& p : m->named_parameters()) {
      const std::string& n = p.key();
      if (n.find("o_proj") != std::string::npos || n.find("down_proj") != std::string::npos) p.value().zero_();
      if (n.find("embed_tokens") != std::string::npos) p.value().fill_(1.0);
      if (n == "lm_head.weight")
        for (int64_t i = 0; i < 8; ++i) p.value()[i].fill_(l[static_cast<size_t>(i)] / 8);
    }
  }
  m->eval();
  torch::Tensor logits;
  {
    torch::NoGradGuard no_grad;
    logits =
        m->forward(torch::tensor(std::vector<int64_t>{0, 5, 3}).unsqueeze(0)).logits[0].to(torch::kFloat64);  // (3, V)
  }
  CHECK(test::max_abs_diff(logits[0], logits[2]) < 1e-6);
  CHECK(logits[0][0].item<double>() == Approx(2.0).epsilon(1e-4));
  const double T = 0.8, top_p = 0.8;
  const int64_t top_k = 5;
  // Expected: softmax(l / T) (sorted already), the top 5 renormalised, then the smallest prefix
  // whose mass before each token is < 0.8, renormalised.
  std::vector<double> q(8, 0.0);
  double z = 0;
  for (int64_t i = 0; i < top_k; ++i) z += std::exp(logits[0][i].item<double>() / T);
  double before = 0, kept_mass = 0;
  int64_t kept = 0;
  for (int64_t i = 0; i < top_k; ++i) {
    const double pi = std::exp(logits[0][i].item<double>() / T) / z;
    if (before < top_p) q[static_cast<size_t>(i)] = pi, kept_mass += pi, ++kept;
    before += pi;
  }
  for (auto& v : q) v /= kept_mass;
  REQUIRE(
      kept ==
      3);  // (the top 5 renormalised: 0.420, 0.255, 0.155, 0.106, ...: 0.830 precedes the 4th; over all 8 tokens, 4)
  GenerateOptions g;
  g.temperature = T, g.top_k = top_k, g.top_p = top_p, g.eos_id = -1, g.seed = 17;
  const int64_t N = 20000;
  g.max_new_tokens = N;
  const auto draws = generate(m, {0}, g);
  REQUIRE(static_cast<int64_t>(draws.size()) == N);
  std::vector<double> seen(8, 0.0);
  for (int64_t d : draws) seen[static_cast<size_t>(d)] += 1;
  double chi2 = 0;
  for (size_t i = 0; i < 8; ++i) {
    INFO("token " << i << ": drawn " << seen[i] << ", expected " << N * q[i]);
    if (q[i] == 0)
      CHECK(seen[i] == 0);
    else
      chi2 += (seen[i] - N * q[i]) * (seen[i] - N * q[i]) / (N * q[i]);
  }
  INFO("chi-square " << chi2 << " with 2 degrees of freedom");
  CHECK(chi2 < 18.42);  // (the 1 - 1e-4 quantile of chi-square with 2 degrees of freedom)
}
