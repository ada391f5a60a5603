// Instruction and chat data for fine-tuning: JSON Lines of {"prompt", "response"} (optionally
// "system") or {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}, rendered
// with a chat template into tokens, where only the assistant's tokens (and the EOS ending each
// answer) are training targets. One example per row, padded to the longest row of the batch, or
// (chat.packed) several examples packed into each row, each attending only to itself.
//
// Training and serving see the same tokens: a conversation is rendered to exactly the text that
// the Jinja template chat_template_jinja() renders (llm-export writes it into the exported
// folder's tokenizer_config.json), and that text is tokenized as Hugging Face's LlamaTokenizer
// tokenizes it (Tokenizer::encode_with_specials). So transformers' apply_chat_template, and the
// servers built on it, feed a fine-tuned model the token ids it was trained on.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "libllm/data.h"
#include "libllm/model.h"

namespace libllm {

class Distributed;
class Fields;
class Tokenizer;

struct ChatConfig {                  // recipe section `chat`
  // JSONL files, or folders whose .jsonl files are taken in path order. Empty (default) = the run
  // trains on packed documents from data.train instead (continued pretraining).
  std::vector<std::string> files;
  // llama2: Meta's Llama-2-chat format, "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>"
  //   and "<s>[INST] {user} [/INST] {answer} </s>" for later turns (texts stripped; roles must alternate).
  // chatml: "<s><|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
  //   "<|im_start|>assistant\n{answer}<|im_end|></s>" (the system turn only when there is a system text).
  std::string chat_template = "chatml";
  std::string system_prompt = "";    // system message for examples that have none; "" = none
  // Held-out split: every valid_every-th example (indices n-1, 2n-1, ... in file order) is kept
  // for validation (train.eval_every) instead of training. 0 = none. Default 20.
  int64_t valid_every = 20;
  // An example longer than train.seq_len + 1 tokens: truncate (keep its first seq_len + 1 tokens;
  // it is dropped if no answer token is left) or drop.
  std::string overlong = "truncate";
  // A malformed line (bad JSON, missing/mistyped fields, unknown role, no assistant turn):
  // fail (an error naming file:line) or skip (counted and the first few printed).
  std::string malformed = "fail";
  // false (default): one example per row, padded to the batch's longest. true: several examples
  // are packed into each row of train.seq_len positions (an example of L tokens takes L - 1: its
  // inputs), as `packing` says; each attends only to itself, with rotary positions from 0
  // (Transformer::forward_packed), so its loss is the one it has alone; a row's unused tail is
  // padding. A sample (train.micro_batch, data_sequence.jsonl) is then a row.
  bool packed = false;
  // How packed rows are filled. best_fit (default): each epoch's shuffled examples are split into
  // ceil(examples / pack_window) consecutive windows of equal size (within one); in a window,
  // longest first, each example goes into the row with the least room that still fits it, or
  // opens a new row (best-fit decreasing, TRL's "bfd"); the window's rows are then shuffled
  // (seeded). greedy: rows are filled in the shuffled order, a row closing when the next example
  // does not fit (torchtune's packing); fewer positions filled.
  std::string packing = "best_fit";
  // The most examples best_fit packs together (>= 1; default 1000). Larger windows fill rows
  // better; a window's rows are built when it starts.
  int64_t pack_window = 1000;

  void fields(Fields& f);
};

struct ChatMessage {
  std::string role;     // system, user or assistant
  std::string content;
};

// A rendered example: tokens and, per token, whether it is a training target.
struct ChatExample {
  std::vector<int64_t> tokens;
  std::vector<uint8_t> target;  // 1 = the model learns to predict this token (assistant text, EOS)
};

// Renders messages with `chat_template` (llama2 or chatml) and tokenizes the text with
// Tokenizer::encode_with_specials. Targets: the tokens that cover any byte of an answer as the
// template writes it (llama2: " {answer} </s>"; chatml: "{answer}<|im_end|></s>"); the rest
// (system, user, template text) are not. A llama2 conversation whose roles do not alternate is an
// Error (as the template's raise_exception).
ChatExample render_chat(const std::vector<ChatMessage>& messages, const Tokenizer& tok,
                        const std::string& chat_template, const std::string& system_prompt = "");
// The prompt tokens of a conversation whose last message is the user's, up to where the
// assistant's answer starts (what llm-generate --chat feeds the model): the rendering with
// add_generation_prompt (chatml appends "<|im_start|>assistant\n").
std::vector<int64_t> render_prompt(const std::vector<ChatMessage>& messages, const Tokenizer& tok,
                                   const std::string& chat_template, const std::string& system_prompt = "");
// The text of a rendering (what the Jinja template renders for the same messages).
std::string render_chat_text(const std::vector<ChatMessage>& messages, const Tokenizer& tok,
                             const std::string& chat_template, const std::string& system_prompt,
                             bool add_generation_prompt);
// The Jinja chat template (Hugging Face's tokenizer_config.json "chat_template") that renders
// conversations as render_chat does, with `system_prompt` as the default system text.
std::string chat_template_jinja(const std::string& chat_template, const std::string& system_prompt);
// Recognizes a Jinja template that chat_template_jinja() writes (Meta's Llama-2-chat template is
// llama2 with no system prompt): sets `name` and `system_prompt` and returns true; false for any
// other template (the arguments are then left alone).
bool recognize_chat_template(const std::string& jinja, std::string& name, std::string& system_prompt);
// The text that ends an assistant turn besides EOS ("<|im_end|>" for chatml, "" for llama2).
std::string end_of_turn(const std::string& chat_template);

// Parses one JSONL line into messages; throws libllm::Error naming `where` (file:line).
std::vector<ChatMessage> parse_chat_line(const std::string& line, const std::string& where);

// What loading found, printed by the trainer.
struct ChatStats {
  int64_t lines = 0, examples = 0, train = 0, valid = 0;
  int64_t truncated = 0, dropped_long = 0, dropped_empty = 0, malformed = 0;
  int64_t tokens = 0, target_tokens = 0;  // over training examples
  // Packed: the rows one epoch of training examples fills (in epoch 0's order), and the share of
  // their positions that hold tokens (the rest is padding). Unpacked: 0.
  int64_t packed_rows = 0;
  double packed_fill = 0;
  std::vector<std::string> malformed_samples;  // "file:line: what" of the first few skipped lines
};

// A batch of training rows.
struct ChatBatch {
  torch::Tensor inputs;     // (B, T) int64
  torch::Tensor targets;    // (B, T) int64: the next token where it is a target, else -100
  // (B, T) int64 when packed: the example each position belongs to, numbered from 0 within its
  // row (a row's padding is one more); Transformer::forward_packed's `documents`. Undefined when
  // every row holds one example.
  torch::Tensor documents;
  // (B, T) bool: true at a row's padding (positions after its last example's tokens), which the
  // MoE losses leave out (Transformer::forward_loss). Undefined when no row is padded.
  torch::Tensor padding;
  std::vector<WindowRef> refs;  // the examples used, in row order: {0, example number in file order}
};

// The examples of cfg.files rendered and split; a deterministic, resumable order of training
// examples (a Fisher-Yates permutation per epoch from the seed) and of rows: unpacked, row i of
// the global stream is example i; packed, rows are filled from the example stream (chat.packing),
// the same on every rank. Global row i goes to rank i % world_size.
class ChatDataset {
 public:
  ChatDataset(const ChatConfig& cfg, const Tokenizer& tok, int64_t seq_len, uint64_t seed, int64_t rank,
              int64_t world_size);
  const ChatStats& stats() const { return stats_; }

  // The next `batch` rows of this rank, T = the longest row's inputs (at most seq_len).
  void next(int64_t batch, ChatBatch& out);
  bool packed() const { return packed_; }
  // Mean loss per target token over the first `max_examples` held-out examples (0 = all), in
  // batches of micro_batch examples. With `dist`, a collective: the batches are dealt out over its
  // ranks (batch k to rank k % world) and the sums all-reduced, so every rank returns the mean
  // over all of them; each rank runs the same number of forwards (one without a batch in the last
  // round runs the first again, unweighted: a ZeRO-3 forward gathers with every rank).
  double evaluate(Transformer& model, int64_t micro_batch, int64_t max_examples, Distributed* dist = nullptr) const;
  // Rows of one example each, right-padded (`padding`: ChatBatch::padding, always defined), for
  // held-out examples, tests and tools.
  void batch_of(const std::vector<const ChatExample*>& rows, torch::Tensor& inputs, torch::Tensor& targets,
                torch::Tensor* padding = nullptr) const;
  const std::vector<ChatExample>& train_examples() const { return train_; }
  const std::vector<ChatExample>& valid_examples() const { return valid_; }

  // {"format": "libllm-chat-cursor-v1", "global" (the example stream's next index; best_fit: the
  // current window's first), "examples", "seed", "world_size", "packed", and when packed
  // "seq_len", "packing" and for best_fit "pack_window" and "window_row" (the window's rows
  // taken)}; restore() checks all but "global" and "window_row". A cursor without "packing" is greedy.
  std::string cursor() const;
  void restore(const std::string& cursor);

 private:
  int64_t example_at(int64_t global);  // training example index of global sample i
  // The training examples of the next row of the global stream (advances global_).
  void next_row(std::vector<int64_t>& examples);
  // best_fit: the rows (training example indices) of the window that starts at stream index
  // `start`; sets window_end_.
  std::vector<std::vector<int64_t>> pack_window(int64_t start);

  std::vector<ChatExample> train_, valid_;
  mutable std::string train_hash_;  // of train_'s tokens and targets (the cursor's examples_hash), once
  const std::string& train_hash() const;
  std::vector<int64_t> train_index_;  // example number (file order) of each training example
  ChatStats stats_;
  uint64_t seed_;
  int64_t seq_len_, rank_, world_, global_ = 0, pad_id_ = 0;
  bool packed_ = false, best_fit_ = false;
  int64_t window_ = 0;                             // pack_window
  std::vector<std::vector<int64_t>> window_rows_;  // best_fit: the current window's rows
  size_t window_row_ = 0;                          // of which this many are taken
  int64_t window_end_ = -1;                        // the current window's end; -1 = not built
  int64_t perm_epoch_ = -1;
  std::vector<uint32_t> perm_;
};

}  // namespace libllm
