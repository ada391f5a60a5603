// Hugging Face checkpoint folders: config.json (LlamaForCausalLM, MistralForCausalLM,
// MixtralForCausalLM) and model.safetensors or sharded model-0000N-of-0000M.safetensors with
// model.safetensors.index.json. Tensor names are transformers' own, which are also libllm's
// parameter names, so import and export are plain copies (bit-exact at the same dtype).
#pragma once

#include <functional>
#include <map>
#include <string>

#include "libllm/finetune.h"
#include "libllm/model.h"
#include "libllm/safetensors.h"

namespace libllm {

class Tokenizer;

// What a config.json says: the model shape plus the facts libllm keeps for export.
struct HfConfig {
  ModelConfig model;
  std::string architecture;             // e.g. "LlamaForCausalLM"
  std::string torch_dtype = "float32";  // dtype the weights were saved in
  int64_t bos_id = 1, eos_id = 2;
  // Training-only settings libllm does not apply, as "key value" (attention_dropout 0.1,
  // router_jitter_noise 0.01): inference is the same; a fine-tune trains without them.
  std::vector<std::string> ignored;
};

// Parses DIR/config.json. Unknown architectures, unsupported features (rope scaling other than
// {"rope_type": "default"}, biases,
// activations other than silu), missing keys and wrong JSON types are errors naming the key.
HfConfig read_hf_config(const std::string& dir);
// The config.json text transformers expects for `cfg`.
std::string hf_config_json(const ModelConfig& cfg, const std::string& torch_dtype, int64_t bos_id = 1,
                           int64_t eos_id = 2);

// Every tensor of a checkpoint folder (single file or sharded via the index), copied out in the
// dtype it is stored in. A weights folder is HF's or libllm's (same file names).
std::map<std::string, torch::Tensor> read_weights(const std::string& dir);
// Copies a folder's weights into `model` (converting dtype): every parameter must be present with
// its exact shape; unknown tensors are errors (stale rotary inv_freq buffers are ignored).
void load_weights(Transformer& model, const std::string& dir);
// The same for the model's LoRA adapters only (a checkpoint that holds only them); the folder must
// hold exactly those. Returns how many tensors were read (0: the model has no adapters).
size_t load_adapter_weights(Transformer& model, const std::string& dir);
// The same checks for parameters that are not materialized (ZeRO-3 keeps only a shard of each):
// `params` lists every parameter's (name, shape); store(name, src) gets each stored tensor (a
// read-only view of the file, in its stored dtype, valid during the call: store copies what it
// keeps) once every shape is checked; its mapped pages leave the resident set after the call.
// `tied`: the model has no lm_head (a stored one is ignored). `verify`: each file is checked
// against its checksum first (safetensors::File::verify, a read of the whole file); a rank that
// reads only its slice leaves that to one rank.
void load_weights(const std::string& dir, const std::vector<std::pair<std::string, std::vector<int64_t>>>& params,
                  bool tied, const std::function<void(const std::string&, const torch::Tensor&)>& store,
                  bool verify = true);

// The safetensors "__metadata__" of the weight files libllm's exports write ({"format": "pt",
// "written_by": "libllm"}): a folder is replaced only when its weights carry it, so a model of the
// user's own (a downloaded base given as --out by mistake) is never deleted.
const std::map<std::string, std::string>& export_metadata();
// What write_folder_atomically writes, and so the only kind of folder it replaces.
enum class FolderKind {
  hf_model,      // export_hf: config.json, model*.safetensors (+ index), generation_config.json, tokenizer files
  peft_adapter,  // export_peft_adapter: adapter_config.json, adapter_model.safetensors (tokenizer files)
};
// Builds a folder under a temporary name beside `dir` (fill() writes into it), then swaps it into
// place (an atomic exchange where the filesystem has one); an existing `dir` is removed only after
// that. `dir` may end in a separator ("out/"). An existing `dir` is replaced only when it is empty
// or an earlier folder of `kind` (nothing but the files such a folder holds, its weights written
// by libllm: export_metadata()); anything else (a run folder, a checkpoint, a file, a model saved
// by transformers) is an Error naming it, checked before fill() runs. On any error the
// temporary folder is removed and `dir` is left as it was.
void write_folder_atomically(const std::string& dir, FolderKind kind,
                             const std::function<void(const std::string& tmp)>& fill);
// Renames the complete folder `tmp` to `final_dir`. An existing `final_dir` is swapped with it
// atomically (renameat2 RENAME_EXCHANGE) and then removed, so a kill at any moment leaves one
// complete folder under the name; a filesystem without the exchange has it moved aside and moved
// back if the rename fails. Throws std::filesystem::filesystem_error, `final_dir` as it was.
void move_folder_into_place(const std::string& tmp, const std::string& final_dir);
// The check write_folder_atomically makes before it writes anything: an Error naming `dir` when it
// exists and may not be replaced by a folder of `kind` (llm-export checks its outputs before it
// loads the model).
void check_replaceable(const std::string& dir, FolderKind kind);

struct ExportOptions {
  std::string dtype = "bfloat16";               // float32, bfloat16 or float16
  int64_t max_shard_bytes = 5LL * 1000 * 1000 * 1000;  // start a new shard past this size (transformers' 5GB)
  std::string tokenizer_path = "";              // tokenizer.model copied into the folder ("" = none)
  // Jinja chat template written into tokenizer_config.json ("" = none), e.g. chat_template_jinja()
  // of the recipe a model was fine-tuned with. Needs tokenizer_path.
  std::string chat_template = "";
  int64_t bos_id = 1, eos_id = 2;
  // A generation_config.json whose settings (sampling defaults, max_length, ...) the export keeps
  // ("" = none): the source model's; bos_token_id is set to bos_id, eos_token_id to eos_id followed
  // by the file's own stop ids (a chat base's end-of-turn token; a list that holds eos_id stays).
  // config.json's eos_token_id is the same id or list.
  std::string generation_config = "";
  // More ids generation stops at, after those (the source config.json's eos_token_id list, which
  // transformers also stops at when it has no generation_config.json; stop_token_ids()).
  std::vector<int64_t> stop_ids = {};
  // The pad token's text written into tokenizer_config.json and special_tokens_map.json ("" =
  // none), when it is one of tokenizer.model's pieces: the source's (pad_token_of).
  std::string pad_token = "";
};
// The pad token an HF model folder's tokenizer names: tokenizer_config.json's "pad_token" (a text,
// or an object with its "content"), else special_tokens_map.json's, whose token comes first in a
// legacy folder (no added_tokens_decoder), as in transformers; "" when neither names one or the
// files are unreadable.
std::string pad_token_of(const std::string& dir);
// DIR's chat template: DIR/chat_template.jinja (transformers >= 4.47 saves it there, and prefers
// it), else the "chat_template" of DIR/tokenizer_config.json, of a list of named templates the
// one named "default"; "" when there is none. A tokenizer_config.json that is not JSON, or whose
// chat_template is neither a text nor such a list, is an Error.
std::string read_chat_template(const std::string& dir);
// The tokens an HF folder's tokenizer adds beyond `tok` (its tokenizer.model): (id, text) from
// tokenizer_config.json's added_tokens_decoder and added_tokens.json whose id tok does not have as
// that piece, by id. libllm tokenizes with tokenizer.model alone, so text holding them becomes
// ordinary pieces. Unreadable files count as none (read_chat_template reports them).
std::vector<std::pair<int64_t, std::string>> added_tokens(const std::string& dir, const Tokenizer& tok);
// The end-of-sequence ids that model folder `dir` names: every id of config.json's and
// generation_config.json's eos_token_id (an id or a list; absent files and keys, or null, name
// none), in that order without repeats; a file that is not a JSON object, or another eos_token_id,
// is an Error naming it. What transformers and vLLM stop generating at (a chat model's
// end-of-turn token may be one tokenizer.model lacks).
std::vector<int64_t> stop_token_ids(const std::string& dir);
// Writes `model` as an HF folder at `dir` (LoRA adapters merged into their weights): built under a temporary name and
// renamed into place when complete (an existing `dir` is replaced only then, and only when it is empty or an earlier
// export). Tensors are merged, converted and written one at a time.
void export_hf(Transformer& model, const std::string& dir, const ExportOptions& opts);
// The same for weights made one at a time (merged_weights_lazy, or a trainer's own source) of a
// model of shape `config`: each weight's value() is called once, converted, written and dropped.
void export_hf(const ModelConfig& config, const std::vector<LazyWeight>& weights, const std::string& dir,
               const ExportOptions& opts);

// A model folder: HF (config.json) or libllm (recipe.yaml), plus safetensors weights.
struct Pretrained {
  std::string dir;
  std::string format;          // "hf" or "libllm"
  ModelConfig config;
  std::string tokenizer_path;  // DIR/tokenizer.model, "" when absent
  int64_t bos_id = 1, eos_id = 2;
  bool has_lora = false;       // a libllm LoRA fine-tuning checkpoint: adapters are attached on load
  LoraConfig lora;             // their settings (recipe section `lora`)
  std::string base;            // a LoRA checkpoint that holds only its adapters: the base folder they
                               // apply to, loaded first (itself possibly such a checkpoint); else ""
  std::string base_fingerprint;  // model_fingerprint(base) when the adapters were trained ("" if unrecorded)
  std::string base_missing;    // why the base cannot be found ("" when it was): load_pretrained's error
  Transformer model{nullptr};  // set by load_pretrained
};
// Reads the folder's config only (cheap: check a tokenizer against it before loading weights).
Pretrained inspect_pretrained(const std::string& dir);
// The tokenizer.model for `pre`'s model: `given` (a tool's `flag`, e.g. --tokenizer) when not
// empty, else the folder's own ("" when it has none). A given one whose pieces differ from the
// folder's own is still used, with one warning on stderr saying how they differ: the model
// reads token ids as its own tokenizer made them.
std::string tokenizer_for(const Pretrained& pre, const std::string& given, const std::string& flag = "--tokenizer");
// How tokenizer file `given` (named `label`, e.g. "--tokenizer X") differs from a model folder's
// own tokenizer file `own` (Tokenizer::difference); "" when they agree, or when `own` cannot be
// read (damaged, a Git LFS pointer): the given one then goes unchecked, with a warning on stderr
// (unless `warn` is false: a job's other ranks).
std::string tokenizer_difference(const std::string& given, const std::string& own, const std::string& label,
                                 bool warn = true);
// A cheap identity of a model folder's contents (SHA-256 hex): its config (config.json or
// recipe.yaml) and, per weight file, its name, size and 64 KiB from its middle. Adapters record
// their base's, so that a base replaced at the same path (a new revision, a rerun) is an error.
std::string model_fingerprint(const std::string& dir);
// Checks the weight files of model folder `dir` (those a load reads) against the checksums their
// writer recorded (safetensors::File::verify): an Error names a damaged one; folders whose
// weights cannot be opened pass. For a fingerprint that no longer matches: damage is said as
// such, not as another model.
void verify_model_files(const std::string& dir);
// Builds the model directly in `dtype` and loads its weights.
Pretrained load_pretrained(const std::string& dir, torch::Dtype dtype = torch::kFloat32);
void load_pretrained(Pretrained& info, torch::Dtype dtype);
// The same, with a LoRA checkpoint's adapters folded into its weights (in fp32, then cast to
// `dtype`): a plain model, every parameter trainable (a base to fine-tune further).
void load_pretrained_merged(Pretrained& info, torch::Dtype dtype);
// export_hf for model folder `info` (inspect_pretrained) without loading the model: each weight is
// read from the folder (an adapters-only checkpoint's chain of bases included, each checked as
// load_pretrained checks it), its LoRA adapters merged in fp32 as load_pretrained + merging would,
// bit for bit, then cast and written. Host memory holds about one fp32 weight (the largest: the
// embedding) instead of the model, so a 65B model exports on a machine with far less memory.
void export_hf(const Pretrained& info, const std::string& dir, const ExportOptions& opts);
// The weights of model folder `info` with every LoRA adapter of its chain of bases merged in
// fp32, one at a time: store(name, w) gets each weight of the plain model (no adapters), in the
// model's order, w in `dtype` (a fresh tensor), as load_pretrained_merged(info, dtype) would hold
// it, bit for bit. Every folder is checked from its headers before any weight is read.
// `rows(name, shape)`, when given, says which rows [first, last) of each weight to produce (dim
// 0; an empty range skips the weight): store then gets just those rows, the same bits as those
// rows of the whole, and only they are read from the root folder. (A ZeRO-3 rank asks for the
// rows holding its slice: a LoRA base is never in memory whole, nor read whole by every rank.)
using RowRange = std::pair<int64_t, int64_t>;
// `verify`: each folder's files are checked against their checksums first (load_weights).
void for_each_merged_weight(
    const Pretrained& info, torch::Dtype dtype,
    const std::function<void(const std::string&, const torch::Tensor&)>& store,
    const std::function<RowRange(const std::string&, const std::vector<int64_t>&)>& rows = nullptr, bool verify = true);
// export_peft_adapter for LoRA checkpoint folder `info`, reading only its adapters (the chain of
// bases is checked, not read). A folder without adapters is an Error naming it. With `tokenizer`
// (its tokenizer_path set), the folder also gets the tokenizer files an export writes
// (tokenizer.model, tokenizer.json, tokenizer_config.json with its chat_template), as a
// fine-tune's tokenizer saved beside its adapter: what PEFT and vLLM users load it with.
void export_peft_adapter(const Pretrained& info, const std::string& dir, const std::string& base_model_name_or_path,
                         const ExportOptions* tokenizer = nullptr);

// safetensors <-> torch element types (st_dtype_of throws for types safetensors cannot hold).
torch::Dtype torch_dtype_of(safetensors::DType d);
safetensors::DType st_dtype_of(torch::Dtype d);
// "float32" / "bfloat16" / "float16" <-> torch dtype; unknown names are errors naming `where`.
torch::Dtype dtype_from_name(const std::string& name, const std::string& where);
std::string dtype_name(torch::Dtype dtype);
// "cpu", "cuda" (the first GPU; an error naming `where` without a usable one) or "auto" (cuda
// when usable, else cpu): where an inference tool (llm-generate, llm-eval) runs the model.
torch::Device device_from_name(const std::string& name, const std::string& where);
// The dtype an inference tool computes in on `device`: fp32 / float32 or bf16 / bfloat16, and
// fp16 / float16 on CUDA only (LibTorch has no half-precision matmul on the CPU). Errors name `where`.
torch::Dtype compute_dtype(const std::string& name, const torch::Device& device, const std::string& where);

}  // namespace libllm
