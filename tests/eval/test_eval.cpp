// Perplexity protocol against the float64 reference's numbers for the same documents.
#include "../catch_torch.h"

#include "../common.h"
#include "libllm/error.h"
#include "libllm/eval.h"
#include "libllm/hf.h"

using namespace libllm;
using libllm::test::expected;
using libllm::test::fixture;

TEST_CASE("llm-eval's numbers match the reference within 1e-4 nats (fp32)", "[eval]") {
  const Tokenizer tok = Tokenizer::load(fixture("tokenizer.model"));
  const auto docs = read_documents(fixture("eval.txt"));
  for (const std::string name : {"tiny-llama", "tiny-mistral", "tiny-mixtral"}) {
    INFO(name);
    const auto& e = expected()[name]["eval"];
    Pretrained p = load_pretrained(fixture(name));
    EvalOptions opts;
    opts.batch_size = 3;
    const EvalResult r = evaluate_perplexity(p.model, tok, docs, opts);
    CHECK(r.documents == e["documents"].get<int64_t>());
    CHECK(r.tokens == e["tokens"].get<int64_t>());
    CHECK(r.loss == Approx(e["loss"].get<double>()).margin(1e-4));
    CHECK(r.ppl == Approx(std::exp(r.loss)));
  }
}

TEST_CASE("documents come from .txt lines or .jsonl text fields alike", "[eval]") {
  const auto txt = read_documents(fixture("eval.txt"));
  const auto jsonl = read_documents(fixture("eval.jsonl"));
  CHECK(txt == jsonl);
  CHECK(txt.size() == 6);
  test::TempDir tmp;
  std::ofstream(tmp / "bad.jsonl") << "{\"text\": \"a\"}\n\n{\"text\": 3}\n";
  std::ofstream(tmp / "broken.jsonl") << "{\"text\": \"a\"}\n{\"text\": \n";
  auto err = [](const std::string& path) { return test::error_of([&] { read_documents(path); }); };
  CHECK_THAT(err(tmp / "bad.jsonl"), Catch::Contains("bad.jsonl:3: expected an object with a string field"));
  CHECK_THAT(err(tmp / "broken.jsonl"), Catch::Contains("broken.jsonl:2: invalid JSON"));
  CHECK_THAT(err(tmp / "absent.txt"), Catch::Contains("absent.txt: cannot open data file"));
  // Read as llm-data reads inputs: .txt, .md, .jsonl in any case; anything else is refused, not
  // scored as text (a .json file's raw lines, a gzip's bytes).
  std::ofstream(tmp / "Upper.JSONL") << "{\"text\": \"a b\"}\n";
  CHECK(read_documents(tmp / "Upper.JSONL") == std::vector<std::string>{"a b"});
  std::ofstream(tmp / "notes.md") << "a b\n";
  CHECK(read_documents(tmp / "notes.md") == std::vector<std::string>{"a b"});
  // A UTF-8 byte-order mark (Windows editors write one) is no text of the first document.
  std::ofstream(tmp / "bom.txt") << "\xEF\xBB\xBF"
                                 << "first\nsecond \xEF\xBB\xBF\n";
  CHECK(read_documents(tmp / "bom.txt") == std::vector<std::string>{"first", "second \xEF\xBB\xBF"});
  std::ofstream(tmp / "bom.jsonl") << "\xEF\xBB\xBF"
                                   << "{\"text\": \"a\"}\n";
  CHECK(read_documents(tmp / "bom.jsonl") == std::vector<std::string>{"a"});
  std::ofstream(tmp / "e.json") << "{\"text\": \"a b\"}\n";
  CHECK_THAT(err(tmp / "e.json"), Catch::Contains("e.json: unsupported data file type '.json'"));
  std::ofstream(tmp / "z.txt", std::ios::binary) << std::string("\x1f\x8b\x08\0\0\0", 6) << "\n";
  CHECK_THAT(err(tmp / "z.txt"), Catch::Contains("z.txt:1: holds a NUL byte"));
  CHECK_THAT(err(tmp.path.string()), Catch::Contains("is a folder, not a data file"));
}

TEST_CASE("every token is predicted once, whatever the batch size and stride", "[eval]") {
  Pretrained p = load_pretrained(fixture("tiny-llama"));
  // Documents of 1, 10, 47, 48, 49 and 130 tokens around the 48-token window.
  std::vector<std::vector<int64_t>> docs;
  for (int64_t n : {1, 10, 47, 48, 49, 130}) {
    std::vector<int64_t> d;
    for (int64_t i = 0; i < n; ++i) d.push_back(3 + (i * 37 + n) % 380);
    docs.push_back(d);
  }
  EvalOptions opts;
  opts.batch_size = 1;
  p.model->train();  // (a training loop's mode, which the evaluation leaves as it was)
  const EvalResult one = evaluate_tokens(p.model, docs, opts);
  CHECK(p.model->is_training());
  CHECK(one.tokens == 1 + 10 + 47 + 48 + 49 + 130);
  CHECK(one.documents == 6);
  opts.batch_size = 16;
  const EvalResult many = evaluate_tokens(p.model, docs, opts);
  CHECK(many.tokens == one.tokens);
  CHECK(many.loss == Approx(one.loss).margin(1e-6));
  for (int64_t stride : {1, 7, 24, 48}) {
    opts.stride = stride;
    int64_t total = -1, expected = 0;  // (eval_windows: what llm-eval's stride hint counts)
    for (const auto& d : docs) expected += eval_windows(static_cast<int64_t>(d.size()), 48, stride);
    const EvalResult s = evaluate_tokens(p.model, docs, opts, [&](int64_t, int64_t all) { total = all; });
    CHECK(total == expected);
    CHECK(s.tokens == one.tokens);
    CHECK(s.loss == Approx(one.loss).margin(0.05));  // less context for some tokens, same tokens
  }
  // Against one forward per target: with stride S, after the first window's targets (all of
  // their context), target j is predicted from the W tokens before the end of its stride group
  // (j rounded up to the first window's end + a multiple of S, at most the last target).
  {
    const int64_t W = 48, S = 7;
    std::vector<std::vector<int64_t>> two(docs.end() - 2, docs.end());  // 49 and 130 tokens
    opts.stride = S;
    const EvalResult got = evaluate_tokens(p.model, two, opts);
    torch::NoGradGuard no_grad;
    p.model->eval();
    double sum = 0;
    int64_t count = 0;
    for (const auto& d : two) {
      std::vector<int64_t> t = {1};
      t.insert(t.end(), d.begin(), d.end());
      const int64_t n = static_cast<int64_t>(t.size()), c = std::min(n - 1, W);
      for (int64_t j = 1; j < n; ++j) {
        const int64_t end = j <= c ? j : std::min(c + (j - c + S - 1) / S * S, n - 1);
        const int64_t from = j <= c ? 0 : end - W;
        auto ctx = torch::tensor(std::vector<int64_t>(t.begin() + from, t.begin() + j)).unsqueeze(0);  // (1, j - from)
        auto logp = torch::log_softmax(p.model->forward(ctx).logits[0][-1].to(torch::kFloat64), -1);
        sum -= logp[t[static_cast<size_t>(j)]].item<double>();
        ++count;
      }
    }
    CHECK(got.tokens == count);
    CHECK(got.loss == Approx(sum / static_cast<double>(count)).margin(1e-5));
  }
  // A window past the model's positions, or negative, is an error.
  opts.window = 49;
  CHECK_THROWS_WITH(evaluate_tokens(p.model, docs, opts), Catch::Contains("--window: must be in [0, 48]"));
  opts.window = -1;
  CHECK_THROWS_WITH(evaluate_tokens(p.model, docs, opts), Catch::Contains("--window: must be in [0, 48]"));
  opts.window = 0;
  // Documents that fit the window are unaffected by the stride.
  std::vector<std::vector<int64_t>> short_docs(docs.begin(), docs.begin() + 4);
  opts.stride = 1;
  const double exact = evaluate_tokens(p.model, short_docs, opts).loss;
  opts.stride = 48;
  CHECK(evaluate_tokens(p.model, short_docs, opts).loss == Approx(exact).margin(1e-6));
}
