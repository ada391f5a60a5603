#include "libllm/chat.h"

#include <fmt/core.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "heartbeat.h"
#include "jsonl.h"
#include "libllm/config.h"
#include "libllm/distributed.h"
#include "libllm/error.h"
#include "libllm/tokenizer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace libllm {

void ChatConfig::fields(Fields& f) {
  f.add("files", files);
  f.add("chat_template", chat_template).one_of({"llama2", "chatml"});
  f.add("system_prompt", system_prompt);
  f.add("valid_every", valid_every).min(0);
  f.add("overlong", overlong).one_of({"truncate", "drop"});
  f.add("malformed", malformed).one_of({"fail", "skip"});
  f.add("packed", packed);
  f.add("packing", packing).one_of({"best_fit", "greedy"});
  f.add("pack_window", pack_window).min(1);
}

namespace {

// Python's str.strip(): removes leading and trailing characters for which str.isspace() is true.
std::string py_strip(const std::string& s) {
  auto space = [](uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
  };
  // The code point of the UTF-8 sequence s[i, j) (invalid sequences are not whitespace).
  auto decode = [&](size_t i, size_t j) -> uint32_t {
    const auto b = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
    const size_t n = j - i;
    if (n == 1) return b(i) < 0x80 ? b(i) : 0xFFFFFFFF;
    if (n == 2 && (b(i) & 0xE0) == 0xC0) return ((b(i) & 0x1Fu) << 6) | (b(i + 1) & 0x3Fu);
    if (n == 3 && (b(i) & 0xF0) == 0xE0) return ((b(i) & 0x0Fu) << 12) | ((b(i + 1) & 0x3Fu) << 6) | (b(i + 2) & 0x3Fu);
    return 0xFFFFFFFF;
  };
  auto continuation = [&](size_t k) { return (static_cast<uint8_t>(s[k]) & 0xC0) == 0x80; };
  size_t begin = 0, end = s.size();
  while (begin < end) {
    size_t next = begin + 1;
    while (next < end && continuation(next)) ++next;
    if (!space(decode(begin, next))) break;
    begin = next;
  }
  while (end > begin) {
    size_t prev = end - 1;
    while (prev > begin && continuation(prev)) --prev;
    if (!space(decode(prev, end))) break;
    end = prev;
  }
  return s.substr(begin, end - begin);
}

// A conversation rendered to text exactly as chat_template_jinja()'s template renders it, and the
// byte ranges of the text the model learns to produce (each answer through its EOS).
struct Rendered {
  std::string text;
  std::vector<std::pair<size_t, size_t>> targets;
};

Rendered render(const std::vector<ChatMessage>& messages, const Tokenizer& tok, const std::string& tmpl,
                const std::string& default_system, bool add_generation_prompt) {
  const std::string bos = tok.bos_id() >= 0 ? tok.piece(tok.bos_id()) : "";
  const std::string eos = tok.eos_id() >= 0 ? tok.piece(tok.eos_id()) : "";
  Rendered r;
  auto emit = [&](const std::string& text, bool target) {
    if (target) r.targets.emplace_back(r.text.size(), r.text.size() + text.size());
    r.text += text;
  };
  const bool first_is_system = !messages.empty() && messages[0].role == "system";
  const size_t first = first_is_system ? 1 : 0;
  const std::string system = first_is_system ? messages[0].content : default_system;
  if (tmpl == "llama2") {  // Meta's Llama-2-chat template
    const bool has_system = first_is_system || !default_system.empty();
    for (size_t i = first; i < messages.size(); ++i) {
      const auto& m = messages[i];
      const size_t k = i - first;
      if ((m.role == "user") != (k % 2 == 0))
        throw Error("chat_template llama2",
                    fmt::format("conversation roles must alternate user/assistant/user/assistant/... (message {} is "
                                "'{}')", i + 1, m.role),
                    "fix the example, or use chat_template: chatml, which takes any order");
      std::string content = m.content;
      if (k == 0 && has_system) content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content;
      if (m.role == "user") emit(bos + "[INST] " + py_strip(content) + " [/INST]", false);
      else if (m.role == "assistant") emit(" " + py_strip(content) + " " + eos, true);
    }
    return r;
  }
  // chatml
  emit(bos, false);
  if (!system.empty()) emit("<|im_start|>system\n" + system + "<|im_end|>\n", false);
  for (size_t i = first; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (m.role == "assistant") {
      emit("<|im_start|>assistant\n", false);
      emit(m.content + "<|im_end|>" + eos, true);
    } else {
      emit("<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n", false);
    }
  }
  if (add_generation_prompt) emit("<|im_start|>assistant\n", false);
  return r;
}

// The tokens of a rendering, tokenized as Hugging Face tokenizes the template's output; a token is
// a target when it covers any byte of a target range (an empty-span byte-fallback token goes with
// its character).
ChatExample tokenize(const Rendered& r, const Tokenizer& tok) {
  ChatExample ex;
  std::vector<Tokenizer::TokenSpan> spans;
  ex.tokens = tok.encode_with_specials(r.text, &spans);
  ex.target.resize(ex.tokens.size(), 0);
  for (size_t i = 0; i < spans.size(); ++i) {
    const auto b = static_cast<size_t>(spans[i].begin), e = static_cast<size_t>(spans[i].end);
    for (const auto& [tb, te] : r.targets)
      if (e > b ? (b < te && e > tb) : (b >= tb && b < te)) ex.target[i] = 1;
  }
  return ex;
}

// A Jinja string literal (single-quoted; Jinja decodes Python escapes in it).
std::string jinja_literal(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == '\'') out += "\\'";
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else out += c;
  }
  return out + "'";
}

std::vector<std::string> jsonl_files(const std::vector<std::string>& inputs) {
  std::vector<std::string> out;
  for (const auto& in : inputs) {
    if (fs::is_directory(in)) {
      std::vector<std::string> found;
      std::error_code ec;
      for (auto it = fs::recursive_directory_iterator(in, ec); !ec && it != fs::recursive_directory_iterator();
           it.increment(ec)) {
        if (it->path().filename().string().rfind('.', 0) == 0) {  // hidden: .ipynb_checkpoints/, .git/, ...
          if (it->is_directory()) it.disable_recursion_pending();
          continue;
        }
        std::string ext = it->path().extension().string();  // (.jsonl in any case, as data preparation)
        std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
        if (it->is_regular_file() && ext == ".jsonl") found.push_back(it->path().string());
      }
      if (ec) throw Error("chat.files: " + in, "cannot list folder: " + ec.message());
      std::sort(found.begin(), found.end());
      if (found.empty()) throw Error("chat.files: " + in, "folder has no .jsonl files");
      out.insert(out.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(in)) {
      out.push_back(in);
    } else {
      throw Error("chat.files: " + in, "no such file or folder", "list JSONL files of {prompt, response} or {messages}");
    }
  }
  if (out.empty()) throw Error("chat.files", "is empty");
  return out;
}

// A uniform draw in [0, n) by rejection (same result with every standard library).
uint64_t bounded(std::mt19937_64& rng, uint64_t n) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t x;
  do x = rng();
  while (x >= limit);
  return x % n;
}

}  // namespace

ChatExample render_chat(const std::vector<ChatMessage>& messages, const Tokenizer& tok, const std::string& tmpl,
                        const std::string& system_prompt) {
  return tokenize(render(messages, tok, tmpl, system_prompt, false), tok);
}

std::vector<int64_t> render_prompt(const std::vector<ChatMessage>& messages, const Tokenizer& tok,
                                   const std::string& tmpl, const std::string& system_prompt) {
  return tokenize(render(messages, tok, tmpl, system_prompt, true), tok).tokens;
}

std::string render_chat_text(const std::vector<ChatMessage>& messages, const Tokenizer& tok, const std::string& tmpl,
                             const std::string& system_prompt, bool add_generation_prompt) {
  return render(messages, tok, tmpl, system_prompt, add_generation_prompt).text;
}

std::string chat_template_jinja(const std::string& tmpl, const std::string& system_prompt) {
  if (tmpl == "llama2")  // Meta's Llama-2-chat template; the recipe's system prompt is the default
    return "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
           "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
           "{% set system_message = " + (system_prompt.empty() ? std::string("false") : jinja_literal(system_prompt)) +
           " %}{% endif %}{% for message in loop_messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if loop.index0 == 0 and system_message != false %}"
           "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
           "{% else %}{% set content = message['content'] %}{% endif %}"
           "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
           "{% endfor %}";
  if (tmpl == "chatml")
    return "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
           "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = " + jinja_literal(system_prompt) +
           " %}{% set loop_messages = messages %}{% endif %}"
           "{% if system_message %}{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}{% endif %}"
           "{% for message in loop_messages %}{% if message['role'] == 'assistant' %}"
           "{{ '<|im_start|>assistant\\n' + message['content'] + '<|im_end|>' + eos_token }}"
           "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
  throw Error("chat_template", "'" + tmpl + "' is not llama2 or chatml");
}

namespace {

// The string a jinja_literal() wrote; false if `lit` is not one.
bool parse_jinja_literal(const std::string& lit, std::string& out) {
  if (lit.size() < 2 || lit.front() != '\'' || lit.back() != '\'') return false;
  out.clear();
  for (size_t i = 1; i + 1 < lit.size(); ++i) {
    char c = lit[i];
    if (c == '\'') return false;  // unescaped quote: not one literal
    if (c == '\\') {
      if (i + 2 >= lit.size()) return false;
      const char e = lit[++i];
      c = e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : e;
      if (e != 'n' && e != 'r' && e != 't' && e != '\\' && e != '\'') return false;
    }
    out += c;
  }
  return true;
}

}  // namespace

bool recognize_chat_template(const std::string& jinja, std::string& name, std::string& system_prompt) {
  for (const std::string t : {"llama2", "chatml"}) {
    if (jinja == chat_template_jinja(t, "")) {
      name = t;
      system_prompt.clear();
      return true;
    }
    // The template around the system prompt's literal.
    const std::string marker = "\x01", with = chat_template_jinja(t, marker), lit = jinja_literal(marker);
    const size_t at = with.find(lit);
    const std::string prefix = with.substr(0, at), suffix = with.substr(at + lit.size());
    if (jinja.size() < prefix.size() + suffix.size() || jinja.compare(0, prefix.size(), prefix) != 0 ||
        jinja.compare(jinja.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    std::string system;
    if (!parse_jinja_literal(jinja.substr(prefix.size(), jinja.size() - prefix.size() - suffix.size()), system)) continue;
    if (chat_template_jinja(t, system) != jinja) continue;
    name = t;
    system_prompt = system;
    return true;
  }
  return false;
}

std::string end_of_turn(const std::string& tmpl) { return tmpl == "chatml" ? "<|im_end|>" : ""; }

std::vector<ChatMessage> parse_chat_line(const std::string& line, const std::string& where) {
  json j;
  try {
    j = json::parse(line);
  } catch (const json::exception& e) {
    std::string msg = e.what();  // "[json.exception.parse_error.101] parse error at line 1, column 9: ..."
    const auto col = msg.find("column ");
    throw Error(where, "invalid JSON at " + (col == std::string::npos ? msg : msg.substr(col)));
  }
  if (!j.is_object()) throw Error(where, "expected a JSON object", R"(e.g. {"prompt": "...", "response": "..."})");
  auto str = [&](const json& obj, const char* key) -> std::string {
    auto it = obj.find(key);
    if (it == obj.end()) throw Error(where, std::string("missing \"") + key + "\"");
    if (!it->is_string()) throw Error(where, std::string("\"") + key + "\" must be a string");
    return it->get<std::string>();
  };
  std::vector<ChatMessage> msgs;
  if (j.contains("messages")) {
    const json& m = j["messages"];
    if (!m.is_array() || m.empty()) throw Error(where, "\"messages\" must be a non-empty array");
    for (const auto& e : m) {
      if (!e.is_object()) throw Error(where, "each message must be an object with \"role\" and \"content\"");
      ChatMessage msg{str(e, "role"), str(e, "content")};
      if (msg.role != "system" && msg.role != "user" && msg.role != "assistant")
        throw Error(where, "unknown role '" + msg.role + "'", "roles are system, user and assistant");
      if (msg.role == "system" && !msgs.empty()) throw Error(where, "a system message may only come first");
      msgs.push_back(std::move(msg));
    }
  } else if (j.contains("prompt") || j.contains("response")) {
    if (j.contains("system")) msgs.push_back({"system", str(j, "system")});
    msgs.push_back({"user", str(j, "prompt")});
    msgs.push_back({"assistant", str(j, "response")});
  } else {
    throw Error(where, "neither \"messages\" nor \"prompt\"/\"response\"",
                R"(each line: {"prompt": ..., "response": ...} or {"messages": [{"role", "content"}, ...]})");
  }
  bool answered = false;
  for (const auto& m : msgs) answered |= m.role == "assistant";
  if (!answered) throw Error(where, "no assistant message: nothing to learn from this example");
  return msgs;
}

ChatDataset::ChatDataset(const ChatConfig& cfg, const Tokenizer& tok, int64_t seq_len, uint64_t seed, int64_t rank,
                         int64_t world_size)
    : seed_(seed),
      seq_len_(seq_len),
      rank_(rank),
      world_(world_size),
      packed_(cfg.packed),
      best_fit_(cfg.packing == "best_fit"),
      window_(cfg.pack_window) {
  pad_id_ = tok.eos_id() >= 0 ? tok.eos_id() : 0;
  int64_t number = 0;  // example number in file order (held-out ones included)
  for (const auto& file : jsonl_files(cfg.files)) {
    std::ifstream in(file);
    if (!in) throw Error("chat.files: " + file, "cannot open file");
    std::string line;
    int64_t lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      ++stats_.lines;
      ChatExample ex;
      try {
        const std::string where = file + ":" + std::to_string(lineno);
        const std::vector<ChatMessage> msgs = parse_chat_line(line, where);
        try {
          ex = render_chat(msgs, tok, cfg.chat_template, cfg.system_prompt);
        } catch (const Error& e) {  // e.g. llama2's alternation rule
          throw Error(where, e.problem(), e.hint());
        }
      } catch (const Error& e) {
        if (cfg.malformed == "fail") {
          throw Error(e.where(), e.problem(),
                      (e.hint().empty() ? "" : e.hint() + "; ") + "fix the line, or set chat.malformed: skip to skip such lines");
        }
        ++stats_.malformed;
        if (stats_.malformed_samples.size() < 5) stats_.malformed_samples.push_back(e.what());
        continue;
      }
      const int64_t n = number++;
      ++stats_.examples;
      const bool held_out = cfg.valid_every > 0 && (n + 1) % cfg.valid_every == 0;
      if (static_cast<int64_t>(ex.tokens.size()) > seq_len + 1) {
        if (cfg.overlong == "drop") {
          ++stats_.dropped_long;
          continue;
        }
        ex.tokens.resize(static_cast<size_t>(seq_len + 1));
        ex.target.resize(static_cast<size_t>(seq_len + 1));
        ++stats_.truncated;
      }
      // Position 0 is never predicted; an example needs a target after it.
      if (std::count(ex.target.begin() + 1, ex.target.end(), uint8_t{1}) == 0) {
        ++stats_.dropped_empty;
        continue;
      }
      if (held_out) {
        valid_.push_back(std::move(ex));
        continue;
      }
      stats_.tokens += static_cast<int64_t>(ex.tokens.size());
      stats_.target_tokens += std::count(ex.target.begin() + 1, ex.target.end(), uint8_t{1});
      train_.push_back(std::move(ex));
      train_index_.push_back(n);
    }
  }
  stats_.train = static_cast<int64_t>(train_.size());
  stats_.valid = static_cast<int64_t>(valid_.size());
  if (train_.empty())
    throw Error("chat.files", "no training examples left",
                fmt::format("{} lines, {} malformed, {} too long, {} without answer tokens, {} held out", stats_.lines,
                            stats_.malformed, stats_.dropped_long, stats_.dropped_empty, stats_.valid));
  if (packed_) {  // the rows of one epoch (epoch 0's order), for the trainer's summary
    int64_t rows = 0, positions = 0;
    for (const auto& ex : train_) positions += static_cast<int64_t>(ex.tokens.size()) - 1;
    if (best_fit_) {
      for (int64_t start = 0; start < stats_.train; start = window_end_) rows += static_cast<int64_t>(pack_window(start).size());
      window_end_ = -1;
    } else {
      for (int64_t i = 0, used = 0; i < stats_.train; ++i) {
        const int64_t need = static_cast<int64_t>(train_[static_cast<size_t>(example_at(i))].tokens.size()) - 1;
        if (rows == 0 || used + need > seq_len_) ++rows, used = 0;
        used += need;
      }
    }
    stats_.packed_rows = rows;
    stats_.packed_fill = static_cast<double>(positions) / static_cast<double>(rows * seq_len_);
  }
}

std::vector<std::vector<int64_t>> ChatDataset::pack_window(int64_t start) {
  // An epoch's examples split into ceil(n / pack_window) windows of equal size (within one):
  // window k holds the epoch's examples [k n / w, (k + 1) n / w).
  const int64_t n = static_cast<int64_t>(train_.size());
  const int64_t w = n / window_ + (n % window_ != 0), offset = start % n;
  auto boundary = [&](int64_t k) { return k * n / w; };
  int64_t k = offset * w / n;
  while (k < w && boundary(k) < offset) ++k;
  while (k > 0 && boundary(k) > offset) --k;
  if (boundary(k) != offset)
    throw Error("data cursor", fmt::format("example {} does not start a window of {} examples", start, window_),
                "resume with the checkpoint's chat.files, chat.pack_window and data.seed");
  window_end_ = start - offset + boundary(k + 1);
  struct Item {
    int64_t need, global;
  };
  std::vector<Item> items;
  for (int64_t g = start; g < window_end_; ++g)
    items.push_back({static_cast<int64_t>(train_[static_cast<size_t>(example_at(g))].tokens.size()) - 1, g});
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.need > b.need; });
  std::vector<std::vector<int64_t>> rows;  // stream indices, then training example indices
  std::multimap<int64_t, size_t> room;     // free positions -> row (equal rooms: the one left so first)
  for (const auto& item : items) {
    auto it = room.lower_bound(item.need);  // the least room that fits
    size_t r;
    int64_t free;
    if (it == room.end()) {
      r = rows.size(), free = seq_len_;
      rows.emplace_back();
    } else {
      r = it->second, free = it->first;
      room.erase(it);
    }
    rows[r].push_back(item.global);
    if (free - item.need > 0) room.emplace(free - item.need, r);
  }
  // A row lists its examples in stream order; the rows go in a seeded order (else the longest
  // examples would all come first).
  std::mt19937_64 rng(seed_ * 0xD1B54A32D192ED03ull + static_cast<uint64_t>(start) * 0x9E3779B97F4A7C15ull + 29);
  for (size_t i = rows.size(); i > 1; --i) std::swap(rows[i - 1], rows[bounded(rng, i)]);
  for (auto& row : rows) {
    std::sort(row.begin(), row.end());
    for (auto& g : row) g = example_at(g);
  }
  return rows;
}

int64_t ChatDataset::example_at(int64_t global) {
  const int64_t n = static_cast<int64_t>(train_.size());
  const int64_t epoch = global / n;
  if (epoch != perm_epoch_) {
    perm_.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) perm_[static_cast<size_t>(i)] = static_cast<uint32_t>(i);
    std::mt19937_64 rng(seed_ * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(epoch) * 0xBF58476D1CE4E5B9ull + 17);
    for (int64_t i = n - 1; i > 0; --i)
      std::swap(perm_[static_cast<size_t>(i)], perm_[bounded(rng, static_cast<uint64_t>(i + 1))]);
    perm_epoch_ = epoch;
  }
  return perm_[static_cast<size_t>(global % n)];
}

void ChatDataset::batch_of(const std::vector<const ChatExample*>& rows, torch::Tensor& inputs, torch::Tensor& targets,
                           torch::Tensor* padding) const {
  int64_t T = 1;
  for (const auto* ex : rows) T = std::max<int64_t>(T, static_cast<int64_t>(ex->tokens.size()) - 1);
  const int64_t B = static_cast<int64_t>(rows.size());
  inputs = torch::full({B, T}, pad_id_, torch::kInt64);   // (B, T)
  targets = torch::full({B, T}, -100, torch::kInt64);     // (B, T)
  auto in = inputs.accessor<int64_t, 2>();
  auto tg = targets.accessor<int64_t, 2>();
  if (padding) *padding = torch::ones({B, T}, torch::kBool);  // (B, T)
  for (int64_t b = 0; b < B; ++b) {
    const auto& ex = *rows[static_cast<size_t>(b)];
    const int64_t L = static_cast<int64_t>(ex.tokens.size());
    for (int64_t t = 0; t + 1 < L; ++t) {
      in[b][t] = ex.tokens[static_cast<size_t>(t)];
      if (ex.target[static_cast<size_t>(t + 1)]) tg[b][t] = ex.tokens[static_cast<size_t>(t + 1)];
    }
    if (padding) padding->select(0, b).narrow(0, 0, std::max<int64_t>(L - 1, 0)).fill_(false);
  }
}

void ChatDataset::next_row(std::vector<int64_t>& examples) {
  examples.clear();
  if (packed_ && best_fit_) {
    if (window_end_ < 0) {  // after construction or restore()
      window_rows_ = pack_window(global_);
      if (window_row_ > window_rows_.size())
        throw Error("data cursor",
                    fmt::format("row {} of the window at example {}, which has {} rows", window_row_, global_,
                                window_rows_.size()),
                    "the chat data changed since the checkpoint: resume with the same chat.files and settings");
    }
    while (window_row_ >= window_rows_.size()) {
      global_ = window_end_;
      window_rows_ = pack_window(global_);
      window_row_ = 0;
    }
    examples = window_rows_[window_row_++];
    return;
  }
  int64_t used = 0;  // input positions taken; an example of L tokens takes L - 1 (<= seq_len)
  for (;;) {
    const int64_t e = example_at(global_);
    const int64_t need = static_cast<int64_t>(train_[static_cast<size_t>(e)].tokens.size()) - 1;
    if (!examples.empty() && used + need > seq_len_) return;
    examples.push_back(e);
    used += need;
    ++global_;
    if (!packed_) return;
  }
}

void ChatDataset::next(int64_t batch, ChatBatch& out) {
  std::vector<std::vector<int64_t>> rows;  // this rank's rows: training example indices
  std::vector<int64_t> row;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < world_; ++r) {  // every rank walks every row of the global stream
      next_row(row);
      if (r == rank_) rows.push_back(row);
    }
  out.refs.clear();
  std::vector<const ChatExample*> unpacked;
  for (const auto& examples : rows)
    for (int64_t e : examples) {
      out.refs.push_back(WindowRef{0, train_index_[static_cast<size_t>(e)]});
      unpacked.push_back(&train_[static_cast<size_t>(e)]);
    }
  out.documents = torch::Tensor();
  out.padding = torch::Tensor();
  if (!packed_) {
    batch_of(unpacked, out.inputs, out.targets, &out.padding);
    if (!out.padding.any().item<bool>()) out.padding = torch::Tensor();
    return;
  }
  int64_t T = 1;
  for (const auto& examples : rows) {
    int64_t used = 0;
    for (int64_t e : examples) used += static_cast<int64_t>(train_[static_cast<size_t>(e)].tokens.size()) - 1;
    T = std::max(T, used);
  }
  const int64_t B = static_cast<int64_t>(rows.size());
  out.inputs = torch::full({B, T}, pad_id_, torch::kInt64);  // (B, T)
  out.targets = torch::full({B, T}, -100, torch::kInt64);    // (B, T)
  out.documents = torch::empty({B, T}, torch::kInt64);       // (B, T)
  out.padding = torch::zeros({B, T}, torch::kBool);          // (B, T)
  bool padded = false;
  auto in = out.inputs.accessor<int64_t, 2>();
  auto tg = out.targets.accessor<int64_t, 2>();
  auto doc = out.documents.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const auto& examples = rows[static_cast<size_t>(b)];
    int64_t p = 0;  // the row's next position
    for (size_t k = 0; k < examples.size(); ++k) {
      const auto& ex = train_[static_cast<size_t>(examples[k])];
      const int64_t L = static_cast<int64_t>(ex.tokens.size());
      for (int64_t t = 0; t + 1 < L; ++t, ++p) {
        in[b][p] = ex.tokens[static_cast<size_t>(t)];
        if (ex.target[static_cast<size_t>(t + 1)]) tg[b][p] = ex.tokens[static_cast<size_t>(t + 1)];
        doc[b][p] = static_cast<int64_t>(k);
      }
    }
    // Padding is a document of its own: it must attend to something (a query that sees no key
    // would give NaN), and nothing real attends to it.
    if (p < T) {
      out.padding.select(0, b).narrow(0, p, T - p).fill_(true);
      padded = true;
    }
    for (; p < T; ++p) doc[b][p] = static_cast<int64_t>(examples.size());
  }
  if (!padded) out.padding = torch::Tensor();
}

double ChatDataset::evaluate(Transformer& model, int64_t micro_batch, int64_t max_examples, Distributed* dist) const {
  if (valid_.empty()) return std::nan("");
  const int64_t n = max_examples > 0 ? std::min<int64_t>(max_examples, static_cast<int64_t>(valid_.size()))
                                     : static_cast<int64_t>(valid_.size());
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const auto device = model->parameters().front().device();
  const int64_t world = dist ? dist->world_size() : 1, rank = dist ? dist->rank() : 0;
  const int64_t batches = (n + micro_batch - 1) / micro_batch, rounds = (batches + world - 1) / world;
  double sum = 0, count = 0;
  for (int64_t round = 0; round < rounds; ++round) {
    detail::heartbeat("evaluating");
    const int64_t k = round * world + rank;  // this rank's batch; past the last: batch 0, unweighted
    const bool real = k < batches;
    const int64_t from = real ? k * micro_batch : 0;
    std::vector<const ChatExample*> rows;
    for (int64_t j = from; j < std::min(n, from + micro_batch); ++j) rows.push_back(&valid_[static_cast<size_t>(j)]);
    torch::Tensor x, y;
    batch_of(rows, x, y);
    const int64_t counted = (y != -100).sum().item<int64_t>();
    // The mean over this batch's target tokens (the fused head holds no (B, T, V) logits).
    const double loss = model->forward_loss(x.to(device), y.to(device)).loss.item<double>();
    if (real && counted > 0) {
      sum += loss * static_cast<double>(counted);
      count += static_cast<double>(counted);
    }
  }
  if (was_training) model->train();
  if (dist) {
    auto t = torch::tensor({sum, count}, torch::kFloat64);
    dist->sum(t);
    sum = t[0].item<double>(), count = t[1].item<double>();
  }
  return count > 0 ? sum / count : std::nan("");
}

namespace {
// FNV-1a over the training examples' tokens and targets, in order: the same count of examples
// with other text (a file edited in place) gives another value.
std::string examples_hash(const std::vector<ChatExample>& examples) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](uint64_t v) {
    for (int b = 0; b < 8; ++b, v >>= 8) h = (h ^ (v & 0xff)) * 1099511628211ull;
  };
  for (const ChatExample& e : examples) {
    mix(e.tokens.size());
    for (size_t i = 0; i < e.tokens.size(); ++i) mix(static_cast<uint64_t>(e.tokens[i]) * 2 + e.target[i]);
  }
  return fmt::format("{:016x}", h);
}
}  // namespace

const std::string& ChatDataset::train_hash() const {
  if (train_hash_.empty()) train_hash_ = examples_hash(train_);  // (the examples never change once read)
  return train_hash_;
}

std::string ChatDataset::cursor() const {
  json j = {{"format", "libllm-chat-cursor-v1"},
            {"global", global_},
            {"examples", train_.size()},
            {"seed", seed_},
            {"world_size", world_},
            {"packed", packed_},
            {"examples_hash", train_hash()}};
  if (packed_) {  // the rows depend on these
    j["seq_len"] = seq_len_;
    j["packing"] = best_fit_ ? "best_fit" : "greedy";
    if (best_fit_) {
      j["pack_window"] = window_;
      j["window_row"] = window_row_;
    }
  }
  return j.dump();
}

void ChatDataset::restore(const std::string& cursor) {
  json j;
  try {
    j = detail::parse_json(cursor, "data cursor");
  } catch (const json::exception& e) {
    throw Error("data cursor", std::string("invalid JSON: ") + e.what(), "the checkpoint is corrupt");
  }
  if (j.value("format", "") != "libllm-chat-cursor-v1")
    throw Error("data cursor", "not a chat data cursor", "the checkpoint was trained on other data (chat.files / data.train)");
  if (j.value("examples", int64_t{-1}) != static_cast<int64_t>(train_.size()) || j.value("seed", uint64_t{0}) != seed_)
    throw Error("data cursor",
                fmt::format("the checkpoint's data had {} training examples and seed {}, now {} and {}",
                            j.value("examples", int64_t{-1}), j.value("seed", uint64_t{0}), train_.size(), seed_),
                "resume with the same chat.files, chat settings, train.seq_len and data.seed; to train on other "
                "data, start a new run from the checkpoint (finetune.base: its folder, another train.run_dir)");
  if (j.contains("examples_hash") && j["examples_hash"] != train_hash())  // (older cursors lack it)
    throw Error("data cursor",
                fmt::format("the checkpoint's {} training examples had other tokens than these {} (a chat file "
                            "edited, or another tokenizer, template or chat setting)",
                            j.value("examples", int64_t{-1}), train_.size()),
                "resume with the same chat.files, chat settings, train.seq_len and data.seed; to train on other "
                "data, start a new run from the checkpoint (finetune.base: its folder, another train.run_dir)");
  if (j.value("world_size", int64_t{-1}) != world_)
    throw Error("data cursor", "saved with world size " + std::to_string(j.value("world_size", int64_t{-1})),
                "resume chat fine-tuning with the same number of ranks");
  if (j.value("packed", false) != packed_ || (packed_ && j.value("seq_len", int64_t{-1}) != seq_len_))
    throw Error("data cursor",
                fmt::format("the checkpoint's rows were {}, now {}",
                            j.value("packed", false) ? fmt::format("packed to {} positions", j.value("seq_len", int64_t{-1}))
                                                     : "one example each",
                            packed_ ? fmt::format("packed to {} positions", seq_len_) : "one example each"),
                "resume with the checkpoint's chat.packed and train.seq_len");
  if (packed_) {
    const std::string packing = j.value("packing", "greedy");
    const int64_t window = j.value("pack_window", int64_t{0});
    if (packing != (best_fit_ ? "best_fit" : "greedy") || (best_fit_ && window != window_))
      throw Error("data cursor",
                  fmt::format("the checkpoint's rows were packed {}, now {}",
                              packing == "best_fit" ? fmt::format("best_fit over windows of {} examples", window) : packing,
                              best_fit_ ? fmt::format("best_fit over windows of {} examples", window_) : "greedy"),
                  "resume with the checkpoint's chat.packing and chat.pack_window");
  }
  global_ = j.at("global").get<int64_t>();
  window_row_ = j.value("window_row", size_t{0});
  window_end_ = -1;  // next_row rebuilds the window that starts at global_
}

}  // namespace libllm
