// Pretraining data: text corpora tokenized once into binary shard sets, and a packed,
// mixed, deterministic, resumable stream of fixed-length training windows over them.
// Plain C++ (no LibTorch): tokens come out as int64 buffers the trainer wraps in tensors.
//
// A shard set is a folder:
//   shard-00000.bin, shard-00001.bin, ...  tokens, little-endian uint16 (vocab_size <= 65536)
//                                          or uint32; documents concatenated, each followed by EOS;
//                                          a document never spans two shards
//   shard-00000.idx, ...                   uint64 little-endian token offset of each document start
//   meta.json                              {"format": "libllm-tokens-v1", "dtype", "vocab_size", "eos_id",
//                                           "bos_id", "tokenizer_sha256", "tokenizer_path", "shards": [{"file",
//                                           "tokens", "documents", "doc_offsets_file", "xxh64",
//                                           "doc_offsets_xxh64"}], "total_tokens", "total_documents",
//                                           "inputs", "txt_documents"}
//                                          (xxh64: XXH64, seed 0, of the file's bytes as 16 hex digits,
//                                          as `xxhsum -H64 shard-00000.bin` prints it; sets made before
//                                          libllm recorded them have none)
// Every file is written as `<name>.tmp-<pid>` and renamed when complete; meta.json is written
// last, so a folder without it (an interrupted run) is never taken for a complete shard set.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace libllm {

class Fields;
class Tokenizer;

// ---------------------------------------------------------------------------------------------
// Tokenizing a corpus into a shard set.

// Recipe section `data_prep`.
struct DataPrepConfig {
  // Text to tokenize: files or folders, in this order. Folders are walked recursively and their
  // .txt, .md and .jsonl files taken in byte order of their paths (names starting with '.' are
  // skipped). Files named directly must also be .txt, .md or .jsonl. Required.
  std::vector<std::string> inputs;
  // The shard-set folder to write (created if missing; an old shard set there is replaced). Required.
  std::string output = "";
  // How .txt/.md files split into documents: "line" (default) = each non-blank line, trimmed;
  // "paragraph" = blocks separated by blank lines, inner newlines kept, the block trimmed;
  // "fortune" = blocks separated by lines holding only "%" (fortune(6) files; files without an
  // extension are then taken too, e.g. /usr/share/games/fortunes).
  // .jsonl files always give one document per line: the string field "text", trimmed
  // (read_documents, llm-eval's reader, is this one); blank documents are skipped in every format.
  // A NUL byte in any input is an error (binary or compressed data).
  std::string txt_documents = "line";
  // Tokens (BOS and EOS included) per shard file; a shard is closed before the document that would
  // overflow it, so a document longer than this gets a shard of its own. Default 100,000,000; >= 1.
  int64_t shard_tokens = 100000000;
  // Tokenizer threads; 0 (default) = std::thread::hardware_concurrency(). The output is
  // byte-identical for any thread count.
  int64_t threads = 0;
  // Held-out split: every valid_every-th document (indices n-1, 2n-1, ... in corpus order) goes
  // to the shard set `valid_output` instead of `output`. 0 (default) = no split; 1 is an error.
  std::string valid_output = "";
  int64_t valid_every = 0;
  // Start each document with the tokenizer's BOS (true, default: LLaMA's convention, and what
  // generation, llm-eval and an exported model's Hugging Face tokenizer put first); false = the
  // document's tokens and EOS only (GPT-style). No effect with a tokenizer that has no BOS.
  bool bos = true;

  void fields(Fields& f);
};

// Documents of one .txt or .md (each non-blank line, trimmed: txt_documents "line") or .jsonl
// (field "text") file, read as llm-data reads its inputs (extensions in any case); llm-eval's
// input. Another extension, a folder, a missing file, a NUL byte (binary or compressed data) or a
// malformed JSONL line is an Error naming the file (and line).
std::vector<std::string> read_documents(const std::string& path);
// Calls fn on every document of the inputs in corpus order (the documents write_shards
// tokenizes, before any held-out split) until fn returns false.
void for_each_document(const DataPrepConfig& cfg, const std::function<bool(const std::string&)>& fn);
// A uniform sample of at most `limit` lines of those documents (reservoir sampling, a fixed seed:
// the same sample every time), in corpus order: a sentencepiece tokenizer's training text, drawn
// from every input rather than the first ones. Blank lines and lines over max_bytes are left out,
// as sentencepiece leaves them; `seen` (optional) gets the number of lines eligible: all of them.
std::vector<std::string> sample_lines(const DataPrepConfig& cfg, int64_t limit, int64_t max_bytes,
                                      int64_t* seen = nullptr);

// A shard set's summary (meta.json).
struct ShardSetInfo {
  std::string dir;               // the shard-set folder
  int64_t total_tokens = 0;      // tokens in all shards, each document's BOS and EOS included
  int64_t total_documents = 0;   // documents in all shards
  int64_t vocab_size = 0;        // the tokenizer's vocabulary size
  int64_t eos_id = 0;            // the token that ends every document
  int64_t bos_id = -1;  // the token that starts every document; -1 = none (or a set made before it was recorded)
  std::string tokenizer_sha256;  // SHA-256 (hex) of the tokenizer.model file bytes
  std::string tokenizer_path;    // the tokenizer file the set was made with (absolute, as it was then)
  // write_shards only (not stored): a note a line about the inputs ("X: 12 bytes are not UTF-8 ..."),
  // for the caller to print.
  std::vector<std::string> notes;
};

// Tokenizes every input document in order (inputs in listed order, folder contents sorted) into
// shards under cfg.output; calls progress(done_bytes, total_bytes) of input text as it goes.
// Errors (libllm::Error) name the file and the `data_prep.*` key: no inputs, an unreadable or
// unsupported file, a malformed JSONL line (file:line), a tokenizer without EOS.
ShardSetInfo write_shards(const DataPrepConfig& cfg, const Tokenizer& tok,
                          const std::function<void(int64_t, int64_t)>& progress = {});

// "starts documents with BOS (id 1), and DIR has no BOS": what differs between two shard sets'
// documents (data_prep.bos), for an error naming a's folder.
std::string bos_mismatch(const ShardSetInfo& a, const ShardSetInfo& b);

// A complete shard set, memory-mapped read-only. Cheap to copy (shares the mappings). A shard
// that another program truncates while it is mapped ends the process (exit code 1) with one line
// naming it when a read reaches past its new end: libllm handles SIGBUS in its own mappings (the
// weights files' too) and passes other bus errors to the handler that was installed before.
class ShardSet {
 public:
  // Opens and checks a shard set: meta.json present and well-formed, every shard and index
  // file present with exactly the size meta.json implies. Errors say to re-run data preparation.
  static ShardSet open(const std::string& dir);

  const ShardSetInfo& info() const;
  int64_t n_tokens() const;
  int64_t n_shards() const;
  // Copies tokens [begin, begin + n) of the concatenated stream of all shards into out (as int64);
  // a range outside [0, n_tokens()) is an Error.
  void read(int64_t begin, int64_t n, int64_t* out) const;
  // Re-reads shard and offsets files and compares each with the checksum meta.json recorded when
  // it was written: an Error naming the file on a mismatch (damage done to it since, by a disk, a
  // copy or a transfer). Shard i (and its offsets file) is checked when (offset + i) % parts ==
  // part, so that ranks can divide sets among them; the defaults check all. Returns the bytes
  // checked (files without a recorded checksum are skipped). Reads at about 10 GB/s from the page
  // cache, disk speed otherwise, in 64 MiB pieces that leave this process's resident memory as
  // they are hashed.
  int64_t verify(int64_t part = 0, int64_t parts = 1, int64_t offset = 0) const;
  // Whether meta.json records checksums (a set made before libllm recorded them has none).
  bool has_checksums() const;
  // 16 hex digits of a SHA-256 over the set's token and document counts and 16 reads of 2048
  // tokens evenly spaced over its stream: the same data made again (with any shard size) or moved
  // elsewhere keeps it; other data of the same size almost surely changes it.
  std::string fingerprint() const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

// Errors unless the shard set was made with this tokenizer (SHA-256 of the tokenizer file bytes);
// the message names both tokenizer paths and the shard set.
void check_tokenizer(const ShardSet& s, const Tokenizer& tok);

// SHA-256 (lowercase hex) of a file's bytes; an unreadable file is an Error naming it.
std::string sha256_file(const std::string& path);
// SHA-256 (lowercase hex) of a byte string.
std::string sha256_hex(const std::string& bytes);

// ---------------------------------------------------------------------------------------------
// Packed, mixed, deterministic training windows.

// Recipe section `data`.
struct DataConfig {
  // Training shard-set folders (made by write_shards / llm-data). Required for training.
  std::vector<std::string> train;
  // Mixture weights, one per `train` folder, as numbers >= 0 (at least one > 0), relative
  // (["3", "1"] = 75% / 25% of samples). Empty (default) = proportional to each set's windows.
  std::vector<std::string> weights;
  // Held-out shard-set folder for validation loss; "" (default) = none.
  std::string valid = "";
  // Seed of the data order (mixture draws and per-set shuffles). Default 1234.
  int64_t seed = 1234;
  // Check every shard file of `train` and `valid` against the checksum llm-data recorded, before
  // training: damage since it was written (a disk, a copy to the machines) would otherwise train on
  // wrong tokens in silence. "node" (default): the ranks of each machine (and copy: containers
  // of one host with copies of their own) divide the files, so that every machine reads its copy
  // (or the shared filesystem's) once; "shared": all ranks divide
  // them, so that the data is read once in all (a filesystem every machine shares: not for copies
  // of the data on each machine, whose damage on the others would go unseen); "none": trust the
  // files (`llm-data verify DIR` checks a set by hand). Hashing runs at about 10 GB/s a rank from
  // the page cache, disk speed otherwise. A supervisor's restart (LIBLLM_RESTART > 0) does not
  // check again what the job's earlier attempt checked (the run folder's .data-verified says so);
  // sets made before libllm recorded checksums are not checked.
  std::string verify = "node";

  void fields(Fields& f);
};

// One training window: window `window` (tokens [window * (seq_len + 1), +seq_len + 1)) of shard set `set`.
struct WindowRef {
  int32_t set = 0;
  int64_t window = 0;
  bool operator==(const WindowRef& o) const { return set == o.set && window == o.window; }
  bool operator!=(const WindowRef& o) const { return !(*this == o); }
};

// Each shard set's token stream is cut into non-overlapping windows of seq_len + 1 tokens
// (documents packed across window boundaries, EOS-separated; the last partial window dropped).
//
// The global sample order is a pure function of the seed and the sets: global sample i comes from
// set s chosen by weight with a counter-based draw (SplitMix64 of (seed, i) mapped to [0, 1) and
// compared with the cumulative weights: no std:: distributions, so it is the same with every
// standard library), and is that set's next window in its own Fisher-Yates permutation (a
// std::mt19937_64 seeded from (seed, set, epoch), bounded by rejection sampling). When a set's
// windows are used up it starts its next epoch with a new permutation.
// Ranks: global sample i goes to rank i % world_size (counted from the start, or from the cursor's
// global index after restore()). Every rank walks all global samples, so all agree on the order.
class PackedDataset {
 public:
  // Opens every cfg.train shard set. Errors (naming `data.*`): no train sets, a weight count that
  // differs from the set count, a set shorter than one window, sets made with different tokenizers.
  PackedDataset(const DataConfig& cfg, int64_t seq_len, int64_t rank, int64_t world_size);

  // The next `batch` samples of this rank: tokens (batch, seq_len + 1) int64, row-major, in `out`
  // (resized), and which window each row is in `refs` (resized), for the data-sequence log.
  void next(int64_t batch, std::vector<int64_t>& out, std::vector<WindowRef>& refs);

  // Everything needed to continue exactly where this rank is (global index, per-set epoch and
  // position, deferred windows, the planned end), as a JSON string. restore() takes a cursor from
  // a dataset with the same seed, seq_len and sets (checked, sets by size and fingerprint(): an
  // Error says what differs; a set moved to another folder is the same set), or a
  // malformed cursor is an Error. Each rank saves and restores its own cursor. A cursor saved by
  // another number of ranks (a resume on another world size) deals its deferred windows out in the
  // order the saved ranks would have served them; a remainder that does not divide among this
  // run's ranks is dropped, with a note.
  std::string cursor() const;
  void restore(const std::string& cursor);

  // Loss-spike rollback. Called on the dataset restored to the rollback target's cursor, with
  // `live`, the cursor of any rank when the rollback was decided. The set positions and deferred
  // windows come from `live` (the stream never goes back: what an earlier rollback deferred or
  // dropped stays so, also when this one goes back further), the global index and the plan stay
  // (the rolled-back steps run again, on new data). `used[k]` (empty: none, the data is dropped)
  // are the windows rank k used in the rolled-back steps, in order (data_sequence.jsonl): they are
  // deferred, queued behind the windows already deferred, and served as the last samples of the
  // plan, as LLM360's K2 moved the data after a spike to the end of training: once a rank has no
  // more planned slots left than deferred windows, its slots serve them in order (every rank
  // alike, each its own), pushing the stream's tail past the plan; windows still pending when the
  // plan is over come next. Every rank makes the same call. Errors: a cursor restore() refuses,
  // `used` not of world_size equally long lists, a window not in the sets.
  void roll_back(const std::string& live, const std::vector<std::vector<WindowRef>>& used);
  // The planned number of global samples (the run's steps * global batch); default windows_per_epoch().
  void set_planned_samples(int64_t n);
  int64_t planned_samples() const;
  // Windows of this rank deferred and not yet served again.
  int64_t deferred_count() const;

  // Windows of all sets together (one pass over each set when weights are proportional).
  int64_t windows_per_epoch() const;
  int64_t windows(int32_t set) const;  // windows of one set
  int32_t n_sets() const;
  const ShardSet& shard_set(int32_t set) const;
  int64_t seq_len() const { return seq_len_; }
  // The next global sample index this rank will consider.
  int64_t global_index() const { return global_; }
  // The mixture weights in use, normalized to sum 1.
  const std::vector<double>& weights() const { return probs_; }

  // "set 0 (path) window 123 tokens [x, y)"
  std::string describe(const WindowRef& r) const;

 private:
  struct SetState {
    ShardSet shards;
    std::string dir;
    std::string fingerprint;  // shards.fingerprint(), saved in cursors and compared on restore
    int64_t windows = 0;
    int64_t epoch = 0, pos = 0;      // the next window is perm[pos] of epoch `epoch`
    std::vector<uint32_t> perm;      // Fisher-Yates permutation of epoch `perm_epoch`
    int64_t perm_epoch = -1;
  };
  int32_t draw_set(int64_t global) const;
  WindowRef take(int32_t set);
  void advance(std::vector<WindowRef>& slot);  // the next global slot: one window per rank
  void read_window(const WindowRef& r, int64_t* out) const;
  void check_ref(const WindowRef& r, const std::string& where) const;

  std::vector<SetState> sets_;
  std::vector<double> probs_, cumulative_;
  uint64_t seed_ = 0;
  int64_t seq_len_ = 0, rank_ = 0, world_ = 1;
  int64_t global_ = 0;     // next global index (a block of world_size starts here)
  int64_t planned_ = 0;
  std::vector<std::deque<WindowRef>> deferred_;  // per rank: deferred windows, served front first
  std::vector<WindowRef> slot_;
};

}  // namespace libllm
