// Chat data: templates, which tokens are targets, malformed lines, length handling, the
// deterministic resumable order, and zero loss/gradient from prompt tokens.
#include "../catch_torch.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "../common.h"
#include "libllm/chat.h"
#include "libllm/model.h"
#include "libllm/tokenizer.h"

using namespace libllm;
using json = nlohmann::json;

namespace {

const Tokenizer& tok() {
  static const Tokenizer t = Tokenizer::load(test::fixture("tokenizer.model"));
  return t;
}

std::vector<int64_t> concat(std::vector<int64_t> a, const std::vector<int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The tokens marked as targets, in order.
std::vector<int64_t> targets_of(const ChatExample& ex) {
  std::vector<int64_t> out;
  for (size_t i = 0; i < ex.tokens.size(); ++i)
    if (ex.target[i]) out.push_back(ex.tokens[i]);
  return out;
}

std::string write(const test::TempDir& tmp, const std::string& name, const std::vector<std::string>& lines) {
  const std::string path = tmp / name;
  std::ofstream out(path);
  for (const auto& l : lines) out << l << "\n";
  return path;
}

std::string qa(const std::string& q, const std::string& a) { return json({{"prompt", q}, {"response", a}}).dump(); }

ChatConfig config(const std::string& file) {
  ChatConfig c;
  c.files = {file};
  c.valid_every = 0;
  return c;
}

}  // namespace

TEST_CASE("llama2 template: [INST] prompts with the system block, answers + EOS are the only targets", "[chat]") {
  const Tokenizer& t = tok();
  const std::vector<ChatMessage> msgs = {{"system", "Be brief."},
                                         {"user", "the first question"},
                                         {"assistant", "the first answer"},
                                         {"user", "a second one"},
                                         {"assistant", "the second answer"}};
  const ChatExample ex = render_chat(msgs, t, "llama2");
  std::vector<int64_t> want = {t.bos_id()};
  want = concat(want, t.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nthe first question [/INST]"));
  want = concat(want, t.encode("the first answer"));
  want.push_back(t.eos_id());
  want.push_back(t.bos_id());
  want = concat(want, t.encode("[INST] a second one [/INST]"));
  want = concat(want, t.encode("the second answer"));
  want.push_back(t.eos_id());
  CHECK(ex.tokens == want);
  std::vector<int64_t> answers = concat(t.encode("the first answer"), {t.eos_id()});
  answers = concat(answers, concat(t.encode("the second answer"), {t.eos_id()}));
  CHECK(targets_of(ex) == answers);
  // The prompt for the next answer is the rendering up to the user's turn.
  const std::vector<ChatMessage> open(msgs.begin(), msgs.begin() + 2);
  CHECK(render_prompt(open, t, "llama2") ==
        concat({t.bos_id()}, t.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nthe first question [/INST]")));
}

TEST_CASE("chatml template: im_start/im_end turns; the answer, its im_end and EOS are the targets", "[chat]") {
  const Tokenizer& t = tok();
  const ChatExample ex = render_chat({{"user", "a question"}, {"assistant", "an answer"}}, t, "chatml", "You help.");
  std::vector<int64_t> want = {t.bos_id()};
  want = concat(want, t.encode("<|im_start|>system\nYou help.<|im_end|>\n"));
  want = concat(want, t.encode("<|im_start|>user\na question<|im_end|>\n<|im_start|>assistant\n"));
  const auto answer = concat(t.encode("an answer<|im_end|>"), {t.eos_id()});
  want = concat(want, answer);
  CHECK(ex.tokens == want);
  CHECK(targets_of(ex) == answer);
  CHECK(end_of_turn("chatml") == "<|im_end|>");
  CHECK(end_of_turn("llama2").empty());
}

TEST_CASE("malformed lines name file:line; chat.malformed: skip counts them", "[chat]") {
  test::TempDir tmp;
  const std::string path = write(tmp, "data.jsonl",
                                 {qa("one", "uno"), "{not json", qa("two", "dos"),
                                  R"({"messages": [{"role": "user", "content": "hi"}]})",
                                  R"({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]})",
                                  R"({"prompt": "three"})", "", qa("four", "cuatro")});
  ChatConfig c = config(path);
  const std::string err = test::error_of([&] { ChatDataset(c, tok(), 200, 1, 0, 1); });
  CHECK_THAT(err, Catch::Contains(path + ":2: invalid JSON"));
  CHECK_THAT(err, Catch::Contains("chat.malformed: skip"));
  CHECK_THAT(test::error_of([&] { parse_chat_line(R"({"messages": [{"role": "user", "content": "hi"}]})", "f:4"); }),
             Catch::Contains("f:4: no assistant message"));
  CHECK_THAT(test::error_of([&] { parse_chat_line(R"({"messages": [{"role": "robot", "content": "a"}]})", "f:5"); }),
             Catch::Contains("f:5: unknown role 'robot'"));
  CHECK_THAT(test::error_of([&] { parse_chat_line(R"({"prompt": "three"})", "f:6"); }),
             Catch::Contains("f:6: missing \"response\""));
  c.malformed = "skip";
  ChatDataset d(c, tok(), 200, 1, 0, 1);
  CHECK(d.stats().lines == 7);
  CHECK(d.stats().malformed == 4);
  CHECK(d.stats().train == 3);
  REQUIRE(d.stats().malformed_samples.size() == 4);
  CHECK_THAT(d.stats().malformed_samples[3], Catch::Contains(":6: missing \"response\""));
}

TEST_CASE("over-long examples are truncated or dropped and counted; held-out split is every n-th", "[chat]") {
  test::TempDir tmp;
  std::string long_answer;
  for (int i = 0; i < 40; ++i) long_answer += "the model reads the text ";
  std::vector<std::string> lines;
  for (int i = 0; i < 10; ++i) lines.push_back(qa("question " + std::to_string(i), i % 3 == 0 ? long_answer : "short"));
  // A prompt so long that no answer token survives truncation.
  lines.push_back(qa(long_answer, "short"));
  ChatConfig c = config(write(tmp, "d.jsonl", lines));
  c.chat_template = "llama2";
  c.valid_every = 5;  // examples 4 and 9 (0-based)
  ChatDataset d(c, tok(), 100, 1, 0, 1);
  CHECK(d.stats().examples == 11);
  CHECK(d.stats().truncated == 5);      // 0, 3, 6, 9 and the long prompt
  CHECK(d.stats().dropped_empty == 1);  // the long prompt
  CHECK(d.stats().valid == 2);
  CHECK(d.stats().train == 8);
  for (const auto& ex : d.train_examples()) CHECK(ex.tokens.size() <= 101);
  c.overlong = "drop";
  ChatDataset d2(c, tok(), 100, 1, 0, 1);
  CHECK(d2.stats().dropped_long == 5);
  CHECK(d2.stats().truncated == 0);
  CHECK(d2.stats().train + d2.stats().valid == 6);
}

TEST_CASE("the example order is seeded, split across ranks, and resumes exactly from a cursor", "[chat]") {
  test::TempDir tmp;
  std::vector<std::string> lines;
  for (int i = 0; i < 7; ++i) lines.push_back(qa("q" + std::to_string(i), "answer " + std::to_string(i)));
  const ChatConfig c = config(write(tmp, "d.jsonl", lines));
  auto order = [&](ChatDataset& d, int n) {
    std::vector<int64_t> out;
    torch::Tensor x, y;
    std::vector<WindowRef> refs;
    for (int i = 0; i < n; ++i) {
      d.next(1, x, y, refs);
      out.push_back(refs[0].window);
    }
    return out;
  };
  ChatDataset one(c, tok(), 200, 9, 0, 1);
  const auto all = order(one, 21);  // three epochs, each a permutation of 0..6
  for (int e = 0; e < 3; ++e) {
    std::vector<int64_t> epoch(all.begin() + 7 * e, all.begin() + 7 * (e + 1));
    std::sort(epoch.begin(), epoch.end());
    CHECK(epoch == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6});
  }
  CHECK(std::vector<int64_t>(all.begin(), all.begin() + 7) != std::vector<int64_t>(all.begin() + 7, all.begin() + 14));
  ChatDataset other_seed(c, tok(), 200, 10, 0, 1);
  CHECK(order(other_seed, 21) != all);

  ChatDataset r0(c, tok(), 200, 9, 0, 2), r1(c, tok(), 200, 9, 1, 2);
  const auto o0 = order(r0, 5), o1 = order(r1, 5);
  for (size_t i = 0; i < 5; ++i) {
    CHECK(o0[i] == all[2 * i]);
    CHECK(o1[i] == all[2 * i + 1]);
  }

  ChatDataset a(c, tok(), 200, 9, 0, 1);
  order(a, 10);
  ChatDataset b(c, tok(), 200, 9, 0, 1);
  b.restore(a.cursor());
  CHECK(order(b, 11) == std::vector<int64_t>(all.begin() + 10, all.end()));
  ChatDataset fewer(config(write(tmp, "e.jsonl", {qa("a", "b")})), tok(), 200, 9, 0, 1);
  CHECK_THAT(test::error_of([&] { fewer.restore(a.cursor()); }), Catch::Contains("7 training examples"));
}

TEST_CASE("prompt tokens contribute exactly zero to the loss and its gradients", "[chat]") {
  test::TempDir tmp;
  const ChatConfig c = config(write(tmp, "d.jsonl", {qa("what is the first word of the text", "the model"),
                                                     qa("a much longer question about the language and the data", "word")}));
  ChatDataset d(c, tok(), 200, 1, 0, 1);
  torch::Tensor x, y;
  std::vector<WindowRef> refs;
  d.next(2, x, y, refs);  // (2, T), padded to the longer row
  // Targets: exactly the answer tokens + EOS of each row, at the positions that predict them.
  for (int64_t b = 0; b < 2; ++b) {
    const auto& ex = d.train_examples()[static_cast<size_t>(refs[static_cast<size_t>(b)].window)];
    std::vector<int64_t> got;
    for (int64_t t = 0; t < y.size(1); ++t)
      if (y[b][t].item<int64_t>() != -100) got.push_back(y[b][t].item<int64_t>());
    CHECK(got == targets_of(ex));
  }
  ModelConfig mc;
  mc.vocab_size = 384, mc.dim = 32, mc.n_layers = 2, mc.n_heads = 4, mc.n_kv_heads = 2, mc.ffn_dim = 64;
  mc.max_seq_len = 256;
  torch::manual_seed(0);
  Transformer model(mc);
  auto logits = model->forward(x).logits;  // (B, T, V)
  logits.retain_grad();
  auto loss = cross_entropy(logits, y);
  loss.backward();
  // Reference: mean of -log p(target) over the target positions only.
  auto logp = torch::log_softmax(logits.detach().to(torch::kFloat64), -1);
  double sum = 0;
  int64_t n = 0;
  for (int64_t b = 0; b < y.size(0); ++b)
    for (int64_t t = 0; t < y.size(1); ++t)
      if (y[b][t].item<int64_t>() != -100) sum -= logp[b][t][y[b][t].item<int64_t>()].item<double>(), ++n;
  CHECK(std::abs(loss.item<double>() - sum / n) < 1e-6);
  auto mask = (y == -100);  // (B, T): prompt, template and padding positions
  CHECK(mask.sum().item<int64_t>() > 0);
  CHECK(logits.grad().index({mask}).abs().max().item<double>() == 0.0);
  CHECK(logits.grad().index({mask.logical_not()}).abs().max().item<double>() > 0.0);
}
