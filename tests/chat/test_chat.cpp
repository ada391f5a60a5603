// Chat data: templates, which tokens are targets, malformed lines, length handling, the
// deterministic resumable order, zero loss/gradient from prompt tokens, and the exported Jinja
// template against an independent rendering + tokenization (hf_chat_reference.py).
#include "../catch_torch.h"

#include <filesystem>
#include <fstream>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <numeric>

#include "../common.h"
#include "chat_cases.h"
#include "libllm/chat.h"
#include "libllm/distributed.h"
#include "libllm/hf.h"
#include "libllm/model.h"
#include "libllm/tokenizer.h"

using namespace libllm;
using json = nlohmann::json;
namespace fs = std::filesystem;

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

// The tokens of `chunk` that follow the tokens of its prefix `head` (sentencepiece splits at the
// spaces and newlines where these tests cut, so the chunk's tokens start with the prefix's).
std::vector<int64_t> after(const std::string& head, const std::string& chunk) {
  const auto h = tok().encode(head), c = tok().encode(chunk);
  REQUIRE(c.size() > h.size());
  REQUIRE(std::equal(h.begin(), h.end(), c.begin()));
  return std::vector<int64_t>(c.begin() + static_cast<std::ptrdiff_t>(h.size()), c.end());
}

TEST_CASE("llama2 template: Meta's Llama-2-chat text, each answer, its spaces and EOS are the targets", "[chat]") {
  const Tokenizer& t = tok();
  const std::vector<ChatMessage> msgs = {{"system", "Be brief."},
                                         {"user", "the first question"},
                                         {"assistant", "the first answer"},
                                         {"user", "a second one"},
                                         {"assistant", "  the second answer \n"}};
  const ChatExample ex = render_chat(msgs, t, "llama2");
  // One sentencepiece encode per run of text between BOS/EOS, as transformers' LlamaTokenizer.
  const std::string p1 = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nthe first question [/INST]", p2 = "[INST] a second one [/INST]";
  std::vector<int64_t> want = concat({t.bos_id()}, t.encode(p1 + " the first answer "));
  want.push_back(t.eos_id());
  want.push_back(t.bos_id());
  want = concat(want, t.encode(p2 + " the second answer "));  // stripped
  want.push_back(t.eos_id());
  CHECK(ex.tokens == want);
  const auto answers = concat(concat(after(p1, p1 + " the first answer "), {t.eos_id()}),
                              concat(after(p2, p2 + " the second answer "), {t.eos_id()}));
  CHECK(targets_of(ex) == answers);
  // The prompt for the next answer is the rendering up to the user's turn.
  const std::vector<ChatMessage> open(msgs.begin(), msgs.begin() + 2);
  CHECK(render_prompt(open, t, "llama2") == concat({t.bos_id()}, t.encode(p1)));
  // Roles must alternate, as the template's raise_exception says.
  CHECK_THAT(test::error_of([&] { render_chat({{"user", "a"}, {"user", "b"}, {"assistant", "c"}}, t, "llama2"); }),
             Catch::Contains("roles must alternate") && Catch::Contains("message 2 is 'user'"));
}

TEST_CASE("llama2 template renders the text of Meta's template (a transformers-based project's golden)", "[chat]") {
  // mistral.rs, mistralrs-core/src/pipeline/chat_template.rs: the test of Llama-2-13b-chat-hf's
  // chat_template renders these messages to this text.
  const std::vector<ChatMessage> msgs = {{"system", "You are a helpful assistant"}, {"user", "Hello"},
                                         {"assistant", "Hi there"},                    {"user", "Who are you"},
                                         {"assistant", "   I am an assistant   "},      {"user", "Another question"}};
  CHECK(render_chat_text(msgs, tok(), "llama2", "", true) ==
        "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s><s>[INST] Who are you "
        "[/INST] I am an assistant </s><s>[INST] Another question [/INST]");
  // Python's str.strip() takes Unicode spaces too (U+3000, U+00A0); a default system text is used
  // when the conversation has none, and the strip applies to the system block + the text.
  CHECK(render_chat_text({{"user", "\xe3\x80\x80hi\xc2\xa0"}}, tok(), "llama2", "", false) == "<s>[INST] hi [/INST]");
  CHECK(render_chat_text({{"user", "\xe3\x80\x80hi\xc2\xa0"}}, tok(), "llama2", "Be kind.", false) ==
        "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\n\xe3\x80\x80hi [/INST]");
}

TEST_CASE("chatml template: im_start/im_end turns, the answer, its im_end and EOS are the targets", "[chat]") {
  const Tokenizer& t = tok();
  const ChatExample ex = render_chat({{"user", "a question"}, {"assistant", "an answer"}}, t, "chatml", "You help.");
  const std::string head = "<|im_start|>system\nYou help.<|im_end|>\n<|im_start|>user\na question<|im_end|>\n"
                           "<|im_start|>assistant\n";
  CHECK(render_chat_text({{"user", "a question"}, {"assistant", "an answer"}}, t, "chatml", "You help.", false) ==
        "<s>" + head + "an answer<|im_end|></s>");
  const std::vector<int64_t> want = concat(concat({t.bos_id()}, t.encode(head + "an answer<|im_end|>")), {t.eos_id()});
  CHECK(ex.tokens == want);
  CHECK(targets_of(ex) == concat(after(head, head + "an answer<|im_end|>"), {t.eos_id()}));
  CHECK(render_prompt({{"user", "a question"}}, t, "chatml", "You help.") ==
        concat({t.bos_id()}, t.encode(head)));
  CHECK(end_of_turn("chatml") == "<|im_end|>");
  CHECK(end_of_turn("llama2").empty());
}

TEST_CASE("a character that byte fallback splits is a target as a whole", "[chat]") {
  const Tokenizer& t = tok();
  // The fixture tokenizer has no piece for these characters: each becomes several byte tokens,
  // all but the last with an empty span; every one of them belongs to the answer.
  const ChatExample ex = render_chat({{"user", "q"}, {"assistant", "\xe6\xbc\xa2\xe5\xad\x97"}}, t, "chatml");
  const auto head = t.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n");
  const auto full = t.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n\xe6\xbc\xa2\xe5\xad\x97<|im_end|>");
  std::vector<int64_t> answer(full.begin() + static_cast<std::ptrdiff_t>(head.size()), full.end());
  CHECK(answer.size() >= 8);  // 6 bytes + the im_end pieces
  CHECK(targets_of(ex) == concat(answer, {t.eos_id()}));
}

TEST_CASE("malformed lines name file:line, chat.malformed: skip counts them", "[chat]") {
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

TEST_CASE("a folder of chat files: its .jsonl files in order, hidden files and folders skipped", "[chat]") {
  test::TempDir tmp;
  fs::create_directories(tmp / "data/sub");
  fs::create_directories(tmp / "data/.ipynb_checkpoints");
  write(tmp, "data/b.jsonl", {qa("b", "B")});
  write(tmp, "data/sub/a.jsonl", {qa("a", "A")});
  write(tmp, "data/.hidden.jsonl", {qa("h", "H")});
  write(tmp, "data/.ipynb_checkpoints/b-checkpoint.jsonl", {qa("c", "C")});
  write(tmp, "data/notes.txt", {"not chat"});
  ChatDataset d(config(tmp / "data"), tok(), 200, 1, 0, 1);
  CHECK(d.stats().lines == 2);
  CHECK(d.stats().train == 2);
  fs::create_directories(tmp / "empty/.ipynb_checkpoints");
  write(tmp, "empty/.ipynb_checkpoints/x.jsonl", {qa("c", "C")});
  CHECK_THAT(test::error_of([&] { ChatDataset(config(tmp / "empty"), tok(), 200, 1, 0, 1); }),
             Catch::Contains("folder has no .jsonl files"));
}

TEST_CASE("over-long examples are truncated or dropped and counted, held-out split is every n-th", "[chat]") {
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
    ChatBatch batch;
    for (int i = 0; i < n; ++i) {
      d.next(1, batch);
      out.push_back(batch.refs.at(0).window);
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
  // As many examples, one answer edited in place: the order would resume over other text.
  lines[3] = qa("q3", "another answer");
  ChatDataset edited(config(write(tmp, "d.jsonl", lines)), tok(), 200, 9, 0, 1);
  CHECK_THAT(test::error_of([&] { edited.restore(a.cursor()); }),
             Catch::Contains("the checkpoint's 7 training examples had other tokens than these 7"));
  // A cursor from before the check (no examples_hash) still resumes.
  auto old = nlohmann::json::parse(a.cursor());
  old.erase("examples_hash");
  ChatDataset c2(c, tok(), 200, 9, 0, 1);
  c2.restore(old.dump());
  CHECK(order(c2, 11) == std::vector<int64_t>(all.begin() + 10, all.end()));
}

TEST_CASE("packed rows: the example stream filled greedily, each example's own tokens, ranks and cursor", "[chat]") {
  test::TempDir tmp;
  std::vector<std::string> lines;
  for (int i = 0; i < 23; ++i) {
    std::string answer = "answer";
    for (int k = 0; k < i % 6; ++k) answer += " and more";
    lines.push_back(qa("question " + std::to_string(i), answer));
  }
  ChatConfig c = config(write(tmp, "d.jsonl", lines));
  const int64_t seq_len = 200;
  ChatDataset plain(c, tok(), seq_len, 5, 0, 1);
  c.packed = true;
  c.packing = "greedy";
  ChatDataset packed(c, tok(), seq_len, 5, 0, 1);
  CHECK(plain.stats().packed_rows == 0);
  const auto& examples = packed.train_examples();
  int64_t need = 0;  // input positions of an epoch
  for (const auto& ex : examples) need += static_cast<int64_t>(ex.tokens.size()) - 1;
  CHECK(packed.stats().packed_rows >= (need + seq_len - 1) / seq_len);
  CHECK(packed.stats().packed_rows < static_cast<int64_t>(examples.size()));
  CHECK(packed.stats().packed_fill == Approx(static_cast<double>(need) / (packed.stats().packed_rows * seq_len)));

  // The examples come in the unpacked order (the same seeded permutation per epoch).
  std::vector<std::vector<int64_t>> rows;  // examples of each row, over four batches of 3 rows
  std::vector<int64_t> stream;
  for (int i = 0; i < 4; ++i) {
    ChatBatch batch;
    packed.next(3, batch);
    REQUIRE(batch.documents.defined());
    REQUIRE(batch.inputs.size(0) == 3);
    CHECK(batch.inputs.size(1) <= seq_len);
    size_t r = 0;  // index into batch.refs
    for (int64_t b = 0; b < 3; ++b) {
      auto in = batch.inputs[b], tg = batch.targets[b], doc = batch.documents[b];
      std::vector<int64_t> row;
      int64_t p = 0;
      for (int64_t k = 0;; ++k) {
        if (p == batch.inputs.size(1) || doc[p].item<int64_t>() != k) break;
        int64_t L = 0;
        while (p + L < batch.inputs.size(1) && doc[p + L].item<int64_t>() == k) ++L;
        // The padding document has no targets; every example has some.
        if ((tg.slice(0, p, p + L) != -100).sum().item<int64_t>() == 0) break;
        REQUIRE(r < batch.refs.size());
        const int64_t number = batch.refs[r++].window;
        // train_examples() holds examples in file order (valid_every 0: number == index).
        const auto& ex = examples[static_cast<size_t>(number)];
        REQUIRE(L == static_cast<int64_t>(ex.tokens.size()) - 1);
        for (int64_t t = 0; t < L; ++t) {
          CHECK(in[p + t].item<int64_t>() == ex.tokens[static_cast<size_t>(t)]);
          CHECK(tg[p + t].item<int64_t>() ==
                (ex.target[static_cast<size_t>(t + 1)] ? ex.tokens[static_cast<size_t>(t + 1)] : int64_t{-100}));
        }
        row.push_back(number);
        stream.push_back(number);
        p += L;
      }
      // ChatBatch::padding marks exactly the rest (undefined when no row has any).
      const auto pad = batch.padding.defined() ? batch.padding[b] : torch::zeros({batch.inputs.size(1)}, torch::kBool);
      CHECK(pad.slice(0, 0, p).any().item<bool>() == false);
      CHECK(pad.slice(0, p).all().item<bool>());
      for (; p < batch.inputs.size(1); ++p) {  // the rest is padding, its own document, no targets
        CHECK(doc[p].item<int64_t>() == static_cast<int64_t>(row.size()));
        CHECK(tg[p].item<int64_t>() == -100);
      }
      rows.push_back(row);
    }
    CHECK(r == batch.refs.size());
  }
  ChatBatch one;
  {  // Unpacked rows: one example each, right-padded to the longest; padding marks the rest.
    ChatDataset fresh(config(write(tmp, "d.jsonl", lines)), tok(), seq_len, 5, 0, 1);
    fresh.next(4, one);
    REQUIRE(one.padding.defined());
    REQUIRE(one.refs.size() == 4);
    for (int64_t b = 0; b < 4; ++b) {
      const int64_t L =
          static_cast<int64_t>(examples[static_cast<size_t>(one.refs[static_cast<size_t>(b)].window)].tokens.size()) -
          1;
      CHECK(one.padding[b].slice(0, 0, L).any().item<bool>() == false);
      CHECK(one.padding[b].slice(0, L).all().item<bool>());
      CHECK(one.padding[b].sum().item<int64_t>() == one.inputs.size(1) - L);
    }
    CHECK(one.padding.any().item<bool>());
  }
  std::vector<int64_t> order;
  for (size_t i = 0; i < stream.size() + 1; ++i) {
    plain.next(1, one);
    order.push_back(one.refs[0].window);
  }
  CHECK(stream == std::vector<int64_t>(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(stream.size())));
  CHECK(stream.size() > examples.size());  // into the second epoch
  // Greedy: each row ends where the next example would not fit.
  auto length = [&](int64_t e) { return static_cast<int64_t>(examples[static_cast<size_t>(e)].tokens.size()) - 1; };
  size_t at = 0;
  for (const auto& row : rows) {
    int64_t used = 0;
    for (int64_t e : row) used += length(e);
    at += row.size();
    CHECK(used <= seq_len);
    CHECK(used + length(order[at]) > seq_len);
  }

  // Two ranks take alternate rows of the same stream.
  ChatDataset r0(c, tok(), seq_len, 5, 0, 2), r1(c, tok(), seq_len, 5, 1, 2);
  for (size_t i = 0; i + 1 < rows.size(); i += 2) {
    ChatBatch a, b;
    r0.next(1, a);
    r1.next(1, b);
    std::vector<int64_t> ea, eb;
    for (const auto& ref : a.refs) ea.push_back(ref.window);
    for (const auto& ref : b.refs) eb.push_back(ref.window);
    CHECK(ea == rows[i]);
    CHECK(eb == rows[i + 1]);
  }

  // A cursor resumes exactly; packed and unpacked cursors do not mix.
  auto refs_of = [](ChatDataset& d, int64_t batch) {
    ChatBatch x;
    d.next(batch, x);
    std::vector<int64_t> e;
    for (const auto& ref : x.refs) e.push_back(ref.window);
    return e;
  };
  ChatDataset a(c, tok(), seq_len, 5, 0, 1), b(c, tok(), seq_len, 5, 0, 1);
  refs_of(a, 4);
  b.restore(a.cursor());
  CHECK(refs_of(b, 2) == refs_of(a, 2));
  CHECK_THAT(test::error_of([&] { plain.restore(a.cursor()); }), Catch::Contains("packed to 200 positions"));
  ChatDataset longer(c, tok(), 2 * seq_len, 5, 0, 1);
  CHECK_THAT(test::error_of([&] { longer.restore(a.cursor()); }), Catch::Contains("chat.packed and train.seq_len"));
}

TEST_CASE("best_fit packing: each window's examples once, rows no two of which would fit in one, resumable", "[chat]") {
  test::TempDir tmp;
  std::vector<std::string> lines;
  for (int i = 0; i < 41; ++i) {
    std::string answer = "answer";
    for (int k = 0; k < (i * 7) % 11; ++k) answer += " and some more";
    lines.push_back(qa("question " + std::to_string(i), answer));
  }
  ChatConfig c = config(write(tmp, "d.jsonl", lines));
  c.packed = true;
  const int64_t seq_len = 150, n = 41;
  auto rows_of = [](ChatDataset& d, int64_t count) {
    std::vector<std::vector<int64_t>> rows;
    for (int64_t i = 0; i < count; ++i) {
      ChatBatch x;
      d.next(1, x);
      rows.emplace_back();
      for (const auto& ref : x.refs) rows.back().push_back(ref.window);
    }
    return rows;
  };
  ChatConfig g = c;
  g.packing = "greedy";
  ChatDataset greedy(g, tok(), seq_len, 3, 0, 1);
  for (int64_t window : {int64_t{1000}, int64_t{10}}) {
    INFO("pack_window " << window);
    c.pack_window = window;
    ChatDataset d(c, tok(), seq_len, 3, 0, 1);
    const auto& examples = d.train_examples();
    REQUIRE(static_cast<int64_t>(examples.size()) == n);
    // refs hold example numbers in file order; with valid_every 0 they index train_examples().
    auto need = [&](int64_t e) { return static_cast<int64_t>(examples[static_cast<size_t>(e)].tokens.size()) - 1; };
    // The stats' rows are exactly epoch 0; best fit fills them better than greedy.
    const int64_t epoch_rows = d.stats().packed_rows;
    CHECK(d.stats().packed_fill > greedy.stats().packed_fill);
    auto rows = rows_of(d, epoch_rows);
    // Unpacked order: the windows' examples (the same permutation as every other mode).
    ChatConfig u = c;
    u.packed = false;
    ChatDataset plain(u, tok(), seq_len, 3, 0, 1);
    std::vector<int64_t> stream;
    for (const auto& row : rows_of(plain, n)) stream.push_back(row[0]);
    // Windows: ceil(n / pack_window) of equal size (within one), each epoch.
    const int64_t n_windows = (n + window - 1) / window;
    std::vector<size_t> bounds;
    for (int64_t k = 0; k <= n_windows; ++k) bounds.push_back(static_cast<size_t>(k * n / n_windows));
    std::vector<int64_t> seen;
    size_t window_start = 0, in_window = 0, wi = 0;
    std::vector<std::vector<int64_t>> window_rows;
    for (const auto& row : rows) {
      int64_t used = 0;
      for (int64_t e : row) used += need(e);
      CHECK(used <= seq_len);
      seen.insert(seen.end(), row.begin(), row.end());
      window_rows.push_back(row);
      in_window += row.size();
      const size_t window_size = bounds[wi + 1] - bounds[wi];
      REQUIRE(window_start == bounds[wi]);
      if (in_window == window_size) {  // the window's rows hold exactly its examples
        std::vector<int64_t> got(seen.end() - static_cast<std::ptrdiff_t>(window_size), seen.end());
        std::vector<int64_t> want(stream.begin() + static_cast<std::ptrdiff_t>(window_start),
                                  stream.begin() + static_cast<std::ptrdiff_t>(window_start + window_size));
        std::sort(got.begin(), got.end());
        std::sort(want.begin(), want.end());
        CHECK(got == want);
        // Best-fit decreasing: a row was opened only for an example no earlier row had room for,
        // so no two rows of a window would fit into one.
        for (size_t i = 0; i < window_rows.size(); ++i)
          for (size_t j = i + 1; j < window_rows.size(); ++j) {
            int64_t both = 0;
            for (int64_t e : window_rows[i]) both += need(e);
            for (int64_t e : window_rows[j]) both += need(e);
            CHECK(both > seq_len);
          }
        window_start += window_size, in_window = 0, ++wi;
        window_rows.clear();
      }
      CHECK(in_window < window_size);  // no row spans two windows
    }
    CHECK(window_start == stream.size());  // the stats' rows are exactly one epoch
    std::sort(seen.begin(), seen.end());
    std::vector<int64_t> all(static_cast<size_t>(n));
    std::iota(all.begin(), all.end(), 0);
    CHECK(seen == all);

    // A cursor taken after any row (mid-window, at a window's end, in the next epoch) resumes
    // exactly; two ranks alternate and resume alike.
    for (int64_t k = 0; k <= epoch_rows + 2; ++k) {
      INFO("cursor after " << k << " rows");
      ChatDataset x(c, tok(), seq_len, 3, 0, 1), y(c, tok(), seq_len, 3, 0, 1);
      rows_of(x, k);
      y.restore(x.cursor());
      CHECK(rows_of(y, 3) == rows_of(x, 3));
    }
    ChatDataset a(c, tok(), seq_len, 3, 0, 1), b(c, tok(), seq_len, 3, 0, 1);
    const auto first = rows_of(a, 3);
    b.restore(a.cursor());
    CHECK(rows_of(b, epoch_rows) == rows_of(a, epoch_rows));  // into the next epoch
    ChatDataset fresh(c, tok(), seq_len, 3, 0, 1);
    const auto from_start = rows_of(fresh, 5);
    CHECK(first == std::vector<std::vector<int64_t>>(from_start.begin(), from_start.begin() + 3));
    ChatDataset r0(c, tok(), seq_len, 3, 0, 2), r1(c, tok(), seq_len, 3, 1, 2);
    CHECK(rows_of(r0, 2) == std::vector<std::vector<int64_t>>{from_start[0], from_start[2]});
    CHECK(rows_of(r1, 2) == std::vector<std::vector<int64_t>>{from_start[1], from_start[3]});
    ChatDataset s0(c, tok(), seq_len, 3, 0, 2), s1(c, tok(), seq_len, 3, 1, 2), t1(c, tok(), seq_len, 3, 1, 2);
    rows_of(s0, 1);
    CHECK(rows_of(s0, 1) == std::vector<std::vector<int64_t>>{from_start[2]});
    rows_of(s1, 1);
    t1.restore(s1.cursor());
    CHECK(rows_of(t1, 1) == std::vector<std::vector<int64_t>>{from_start[3]});
    // A cursor past its window's rows means the data changed.
    auto bad = nlohmann::json::parse(a.cursor());
    bad["window_row"] = 1000;
    ChatDataset z(c, tok(), seq_len, 3, 0, 1);
    z.restore(bad.dump());
    CHECK_THAT(test::error_of([&] { rows_of(z, 1); }), Catch::Contains("the chat data changed"));
    // Cursors of another packing or window do not mix.
    CHECK_THAT(test::error_of([&] { greedy.restore(a.cursor()); }), Catch::Contains("chat.packing and chat.pack_window"));
    ChatConfig other = c;
    other.pack_window = window + 1;
    ChatDataset o(other, tok(), seq_len, 3, 0, 1);
    CHECK_THAT(test::error_of([&] { o.restore(a.cursor()); }), Catch::Contains("windows of " + std::to_string(window)));
  }
}

TEST_CASE("prompt tokens contribute exactly zero to the loss and its gradients", "[chat]") {
  test::TempDir tmp;
  const ChatConfig c = config(write(tmp, "d.jsonl", {qa("what is the first word of the text", "the model"),
                                                     qa("a much longer question about the language and the data", "word")}));
  ChatDataset d(c, tok(), 200, 1, 0, 1);
  ChatBatch batch;
  d.next(2, batch);  // (2, T), padded to the longer row
  CHECK(!batch.documents.defined());
  const torch::Tensor &x = batch.inputs, &y = batch.targets;
  const std::vector<WindowRef>& refs = batch.refs;
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

namespace {

// The held-out set of the evaluation tests: 10 examples of several lengths, every 2nd held out (5).
ChatConfig eval_config(const test::TempDir& tmp) {
  std::vector<std::string> lines;
  for (int i = 0; i < 10; ++i)
    lines.push_back(qa("question number " + std::to_string(i) + std::string(static_cast<size_t>(i), '?'),
                       i % 3 == 0 ? "the model reads the text and the data" : "a word"));
  ChatConfig c = config(write(tmp, "d.jsonl", lines));
  c.valid_every = 2;
  return c;
}

Transformer eval_model(uint64_t seed = 0) {
  ModelConfig mc;
  mc.vocab_size = 384, mc.dim = 32, mc.n_layers = 2, mc.n_heads = 4, mc.n_kv_heads = 2, mc.ffn_dim = 64;
  mc.max_seq_len = 256;
  mc.init_std = 0.3;  // (far from uniform predictions: models of other seeds score apart)
  torch::manual_seed(seed);
  return Transformer(mc);
}

}  // namespace

TEST_CASE("held-out evaluation: the mean per target token, the same when 2 ranks deal out its batches", "[chat]") {
  test::TempDir tmp;
  const ChatConfig c = eval_config(tmp);
  ChatDataset d(c, tok(), 200, 1, 0, 1);
  REQUIRE(d.valid_examples().size() == 5);
  Transformer model = eval_model();
  // Reference: each example alone, -log p of its targets in float64, summed over all of them.
  double sum = 0;
  int64_t n = 0;
  for (const auto& ex : d.valid_examples()) {
    torch::Tensor x, y;
    d.batch_of({&ex}, x, y);
    auto logp = torch::log_softmax(model->forward(x).logits.detach().to(torch::kFloat64), -1)[0];  // (T, V)
    for (int64_t t = 0; t < y.size(1); ++t)
      if (y[0][t].item<int64_t>() != -100) sum -= logp[t][y[0][t].item<int64_t>()].item<double>(), ++n;
  }
  const double one = d.evaluate(model, 2, 0);  // 3 batches: 2 + 2 + 1 examples
  CHECK(std::abs(one - sum / static_cast<double>(n)) < 1e-5);
  CHECK(std::abs(d.evaluate(model, 2, 3) - one) > 1e-3);  // (max_examples counts)
  // 2 ranks: rank 0 scores batches 0 and 2, rank 1 batch 1 and (unweighted) batch 0 again. Each
  // rank's model has its own weights (seed = rank), so the result shows which rank scored which
  // batch: the mean per target token of batches 0 and 2 under rank 0's model and batch 1 under
  // rank 1's (each rank scoring every batch would give another number).
  Transformer other = eval_model(1);
  double split_sum = 0, split_n = 0;
  for (size_t b = 0; b < 3; ++b) {
    std::vector<const ChatExample*> rows;
    for (size_t i = 2 * b; i < std::min<size_t>(5, 2 * b + 2); ++i) rows.push_back(&d.valid_examples()[i]);
    torch::Tensor x, y;
    d.batch_of(rows, x, y);
    const double count = static_cast<double>((y != -100).sum().item<int64_t>());
    split_sum += (b == 1 ? other : model)->forward_loss(x, y).loss.item<double>() * count;
    split_n += count;
  }
  const double split = split_sum / split_n;
  REQUIRE(std::abs(split - one) > 1e-3);
  CHECK(test::run_ranks("[.chat_eval_worker]", 2, {"LIBLLM_TEST_ROOT=" + tmp.path.string()}) == std::vector<int>{0, 0});
  for (int r = 0; r < 2; ++r) {
    std::ifstream in(tmp / ("eval." + std::to_string(r)));
    double got = 0;
    REQUIRE(in >> got);
    CHECK(std::abs(got - split) < 1e-6);
  }
}

// One rank of the test above, in a process of its own (hidden: only that test starts it).
TEST_CASE("held-out evaluation: one of two ranks", "[.chat_eval_worker]") {
  const char* root = std::getenv("LIBLLM_TEST_ROOT");
  REQUIRE(root);
  Distributed dist = Distributed::from_env(60);
  test::TempDir tmp;  // (the rank's own copy of the data)
  ChatDataset d(eval_config(tmp), tok(), 200, 1, dist.rank(), dist.world_size());
  Transformer model = eval_model(static_cast<uint64_t>(dist.rank()));
  const double got = d.evaluate(model, 2, 0, &dist);
  std::ofstream(std::string(root) + "/eval." + std::to_string(dist.rank())) << std::setprecision(17) << got;
}

TEST_CASE("the templates llm-export writes are recognized with their system prompt, others are not", "[chat]") {
  for (const std::string tmpl : {"llama2", "chatml"})
    for (const std::string system : {std::string(), std::string("Be terse."), std::string(test::kTrickySystem),
                                     std::string("it's a \\n 'quote'\n\tand\\")}) {
      INFO(tmpl << " / " << system);
      std::string name = "?", got = "?";
      REQUIRE(recognize_chat_template(chat_template_jinja(tmpl, system), name, got));
      CHECK(name == tmpl);
      CHECK(got == system);
    }
  std::string name = "unchanged", system = "unchanged";
  const std::string chatml = chat_template_jinja("chatml", "x");
  CHECK_FALSE(recognize_chat_template(chatml.substr(0, chatml.size() - 1), name, system));
  CHECK_FALSE(recognize_chat_template("{{ messages }}", name, system));
  // A literal that is not one: the quote inside is unescaped.
  std::string broken = chat_template_jinja("chatml", "ab");
  broken.replace(broken.find("'ab'"), 4, "'a'b'");
  CHECK_FALSE(recognize_chat_template(broken, name, system));
  CHECK(name == "unchanged");
  CHECK(system == "unchanged");
}

TEST_CASE("an exported chat template renders and tokenizes as libllm trains (jinja2 + sentencepiece reference)",
          "[chat][export]") {
  // tests/chat/hf_chat_reference.py rebuilds transformers' apply_chat_template(tokenize=True) from
  // jinja2 and sentencepiece; it reads the tokenizer_config.json and tokenizer.model that
  // export_hf wrote. Text and ids must match exactly.
  const std::string python = LIBLLM_TEST_PYTHON;
  INFO("no python3 with jinja2 and sentencepiece: install python3-jinja2 python3-sentencepiece (scripts/install-deps.sh)");
  REQUIRE(!python.empty());
  const Tokenizer& t = tok();
  ModelConfig mc;
  mc.vocab_size = 384, mc.dim = 16, mc.n_layers = 1, mc.n_heads = 2, mc.n_kv_heads = 1, mc.ffn_dim = 32;
  torch::manual_seed(0);
  Transformer model(mc);
  const std::string tricky = test::kTrickySystem;
  using Msgs = std::vector<ChatMessage>;
  const std::vector<Msgs>& conversations = test::chat_cases();
  for (const auto& [tmpl, system] : std::vector<std::pair<std::string, std::string>>{
           {"chatml", tricky}, {"chatml", ""}, {"llama2", ""}, {"llama2", tricky}}) {
    DYNAMIC_SECTION(tmpl << " with system prompt '" << system.substr(0, 8) << "'") {
      test::TempDir tmp;
      ExportOptions opts;
      opts.dtype = "float32";
      opts.tokenizer_path = test::fixture("tokenizer.model");
      opts.chat_template = chat_template_jinja(tmpl, system);
      export_hf(model, tmp / "hf", opts);
      std::ofstream cases(tmp / "cases.jsonl");
      std::vector<std::pair<const Msgs*, bool>> order;
      for (const auto& msgs : conversations)
        for (bool gen : {false, true}) {
          json m = json::array();
          for (const auto& x : msgs) m.push_back({{"role", x.role}, {"content", x.content}});
          cases << json({{"messages", m}, {"add_generation_prompt", gen}}).dump() << "\n";
          order.emplace_back(&msgs, gen);
        }
      cases.close();
      const std::string cmd = python + " " + test::source("tests/chat/hf_chat_reference.py") + " " + (tmp / "hf") +
                              " " + (tmp / "cases.jsonl") + " " + (tmp / "out.jsonl");
      REQUIRE(std::system(cmd.c_str()) == 0);
      std::ifstream in(tmp / "out.jsonl");
      std::string line;
      size_t i = 0, errors = 0;
      for (; std::getline(in, line); ++i) {
        REQUIRE(i < order.size());
        const json ref = json::parse(line);
        const Msgs& msgs = *order[i].first;
        const bool gen = order[i].second;
        INFO("case " << i << ": " << json(line).dump());
        if (ref.contains("error")) {  // the template refused: libllm must refuse too
          ++errors;
          CHECK(tmpl == "llama2");
          CHECK_THAT(test::error_of([&] { render_chat(msgs, t, tmpl, system); }), Catch::Contains("alternate"));
          continue;
        }
        CHECK(render_chat_text(msgs, t, tmpl, system, gen) == ref["text"].get<std::string>());
        const auto want = ref["ids"].get<std::vector<int64_t>>();
        CHECK((gen ? render_prompt(msgs, t, tmpl, system) : render_chat(msgs, t, tmpl, system).tokens) == want);
      }
      CHECK(i == order.size());
      CHECK(errors == (tmpl == "llama2" ? 2u : 0u));
    }
  }
}
