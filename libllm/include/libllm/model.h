// A LLaMA-style decoder: token embedding, N blocks of (RMSNorm -> causal self-attention with
// rotary embeddings and grouped-query attention -> residual, RMSNorm -> SwiGLU MLP or
// mixture-of-experts -> residual), final RMSNorm, LM head (tied or untied).
// Module and parameter names follow Hugging Face transformers (model.layers.0.self_attn.q_proj.weight),
// so named_parameters() is the HF checkpoint layout.
#pragma once

#include <torch/torch.h>

#include "libllm/loss.h"
#include "libllm/model_config.h"

namespace libllm {

// y = x / sqrt(mean(x^2) + eps) * weight, in fp32 internally.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

// Rotary position embedding tables (HF rotate-half convention), computed in fp32.
class Rotary {
 public:
  Rotary(int64_t head_dim, double theta);
  // cos and sin for positions [start, start + T): each (T, head_dim), in `dtype` on `device`.
  std::pair<torch::Tensor, torch::Tensor> table(int64_t start, int64_t T, torch::Device device,
                                                torch::Dtype dtype);
  // cos and sin for per-token positions (B, T) int64: each (B, 1, T, head_dim), broadcasting
  // over heads; the same values as the (start, T) table at the same positions.
  std::pair<torch::Tensor, torch::Tensor> table(const torch::Tensor& positions, torch::Dtype dtype);

 private:
  int64_t head_dim_;
  double theta_;
};

// x * cos + rotate_half(x) * sin, x: (B, H, T, D), cos/sin: (T, D) or (B, 1, T, D).
torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

// A bias-free linear layer y = x W^T (parameter `weight`, (out, in)), with an optional LoRA
// update (Hu et al. 2021): y = x W^T + (alpha / r) * B(A(dropout(x))). The adapter's submodules
// are named as PEFT names them (lora_A.weight (r, in), lora_B.weight (out, r)); they are created
// in fp32 whatever W's dtype (a bf16 base stays bf16), computed in fp32 and added in y's dtype.
// Rows [first, first + w.size(0)) of a merged LoRA weight: w + scale * (B A), w those rows of W
// (out, in), B (out, r) and A (r, in) whole; in fp32, a fresh tensor. B A is formed in blocks of
// kLoraMergeRows rows starting at multiples of it, whatever rows are asked for, so a row range
// (a ZeRO-3 rank's slice) gets the same bits as the rows of the whole weight.
constexpr int64_t kLoraMergeRows = 512;
torch::Tensor lora_merged_rows(const torch::Tensor& w, const torch::Tensor& B, const torch::Tensor& A, double scale,
                               int64_t first = 0);

class LinearImpl : public torch::nn::Module {
 public:
  // `weight` is zeros until the owning model initialises it (TransformerImpl::init_weights).
  LinearImpl(int64_t in, int64_t out);
  torch::Tensor forward(const torch::Tensor& x);
  // Adds the adapter: A ~ kaiming-uniform(a=sqrt(5)) like PEFT (torch's global RNG), B = 0, so
  // the layer's output is unchanged until B is trained. Once per layer.
  void add_lora(int64_t rank, double alpha, double dropout);
  bool has_lora() const { return !lora_A.is_empty(); }
  double lora_scale() const { return lora_scale_; }
  // W + (alpha / r) B A, computed in fp32 and returned in W's dtype (W itself when no adapter).
  torch::Tensor merged_weight() const;
  // Folds the adapter into W (merged_weight()) and removes it.
  void merge_lora();

  torch::Tensor weight;
  torch::nn::Linear lora_A{nullptr}, lora_B{nullptr};

 private:
  int64_t in_, out_;
  double lora_scale_ = 0, lora_dropout_ = 0;
};
TORCH_MODULE(Linear);

// Keys and values of past positions for incremental decoding (generation). Each layer's k/v is
// preallocated (B, Hkv, capacity, D); `length` positions are filled.
struct KVCache {
  std::vector<torch::Tensor> k, v;  // per layer, (B, Hkv, capacity, D)
  int64_t length = 0;               // positions cached so far (the next token's position)
  int64_t capacity = 0;             // positions the cache holds (the model's max_seq_len)
};

// How the documents of packed rows stay apart inside attention. TransformerImpl::hidden builds it
// once per forward from `documents` (document_mask() / document_segments()); every layer shares
// it. At most one member is defined; neither = one causal sequence per row.
struct Packing {
  // (B, 1, T, T) additive mask in the activations' dtype: 0 where key j <= query i lies in the
  // query's document (and within the sliding window), the dtype's lowest finite value elsewhere.
  // A view of rows padded to a multiple of 16 elements, so SDPA's memory-efficient CUDA kernel
  // takes it without a copy (LibTorch >= 2.2).
  torch::Tensor bias;
  // (N, 3) int64 on the CPU: the row, first position and length of every document (padding is a
  // document too), row by row in order, together covering every row (document_segments()).
  // Each document's causal attention is computed on its own: L² scores per document, not T².
  torch::Tensor segments;
  bool empty() const { return !bias.defined() && !segments.defined(); }
};

// Which Packing forward_packed builds. kAuto: the bias mask where SDPA runs it in a fused kernel
// (compat::fused_masked_attention: CUDA with LibTorch >= 2.2); elsewhere (an unfused masked
// attention computes all T² scores of a row, segments each document's L², but at one attention
// call per document and layer) segments when the scores they save outweigh their calls, by a
// cost measured on a 2-core CPU (rows of 512 with ~150-token documents: segments; rows of 128
// with ~60-token ones: the mask).
enum class PackedAttention { kAuto, kBias, kSegments };

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const ModelConfig& cfg);
  // x: (B, T, D) at positions [start, start + T); cos/sin: (T, head_dim) or (B, 1, T, head_dim).
  // `packing`: how packed rows keep their documents apart (Packing), or empty = causal. With a
  // cache layer (k, v of `cache`'s length past positions), the new keys/values are written into
  // it and the queries attend to every cached position.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVCache* cache = nullptr, int64_t layer = 0, const Packing& packing = {});
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};

 private:
  int64_t n_heads_, n_kv_heads_, head_dim_, window_;
};
TORCH_MODULE(Attention);

// down(silu(gate(x)) * up(x)).
class MLPImpl : public torch::nn::Module {
 public:
  MLPImpl(int64_t dim, int64_t hidden, const char* gate = "gate_proj", const char* up = "up_proj",
          const char* down = "down_proj");
  torch::Tensor forward(const torch::Tensor& x);
  Linear gate{nullptr}, up{nullptr}, down{nullptr};
};
TORCH_MODULE(MLP);

// Dropless top-k mixture of experts (Mixtral): softmax router over all experts, top-k,
// weights renormalised to sum 1; every token reaches its k experts (no capacity limit).
class MoEImpl : public torch::nn::Module {
 public:
  explicit MoEImpl(const ModelConfig& cfg);
  // x: (B, T, D) -> (B, T, D); appends this layer's router logits (B*T, E) to `router_logits`.
  torch::Tensor forward(const torch::Tensor& x, std::vector<torch::Tensor>& router_logits);
  Linear gate{nullptr};
  torch::nn::ModuleList experts;

 private:
  int64_t n_experts_, top_k_;
};
TORCH_MODULE(MoE);

class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const ModelConfig& cfg);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        std::vector<torch::Tensor>& router_logits, KVCache* cache = nullptr, int64_t layer = 0,
                        const Packing& packing = {});
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  Attention self_attn{nullptr};
  MLP mlp{nullptr};              // dense models
  MoE block_sparse_moe{nullptr};  // mixture-of-experts models
};
TORCH_MODULE(Block);

// Switch-Transformer load-balancing loss over router logits of all layers, (N, E), exactly as
// transformers' load_balancing_loss_func: E * sum_e f_e * P_e, with f the mean top-k one-hot
// assignment (per k slot) and P the mean router probability.
torch::Tensor load_balancing_loss(const torch::Tensor& router_logits, int64_t top_k);
// ST-MoE router z-loss: mean over rows of logsumexp(router_logits)^2.
torch::Tensor router_z_loss(const torch::Tensor& router_logits);

// Called around each block by a sharded data-parallel engine (ZeRO-3 gathers a block's weights
// before the block runs and frees them after; its gradients are reduce-scattered as soon as its
// backward is done; libllm/shard.h). `backward`: the block is recomputed for its backward (only
// with activation checkpointing).
class BlockHooks {
 public:
  virtual ~BlockHooks() = default;
  virtual void begin_forward() {}  // before the embedding, on every forward
  virtual void before_block(int64_t layer, bool backward) = 0;
  virtual void after_block(int64_t layer, bool backward) = 0;
};

// Packed rows (several documents in one row, each computed as if it were alone): `documents`
// (B, T) int64 gives each position's document; a document is a run of equal ids (an id that
// returns after another one starts a new document).
// document_mask: (B, 1, T, T) bool, true where key j <= query i and both are in one document.
// document_positions: (B, T) int64, each position's offset from its document's first position.
// document_segments: (N, 3) int64 on the CPU, (row, start, length) of every document in order.
torch::Tensor document_mask(const torch::Tensor& documents);
torch::Tensor document_positions(const torch::Tensor& documents);
torch::Tensor document_segments(const torch::Tensor& documents);
// Documents of token windows (B, T) whose documents end with `separator` (EOS): a new document
// starts after each separator. (B, T) int64 for forward_packed.
torch::Tensor documents_after(const torch::Tensor& tokens, int64_t separator);

// A parameter of a deferred model that holds no values yet (TransformerImpl::Deferred).
bool is_unallocated(const torch::Tensor& p);

// The decoder body: HF's `model.` prefix.
class DecoderImpl : public torch::nn::Module {
 public:
  explicit DecoderImpl(const ModelConfig& cfg);
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers;
  RMSNorm norm{nullptr};
};
TORCH_MODULE(Decoder);

class TransformerImpl : public torch::nn::Module {
 public:
  struct Output {
    torch::Tensor logits;    // (B, T, vocab_size); undefined from forward_loss with the fused loss
    torch::Tensor loss;      // forward_loss only: mean next-token cross-entropy (fp32, fp64 for fp64 models;
                             // aux_loss not included)
    torch::Tensor aux_loss;  // scalar: moe_aux_loss_coef * balance + moe_z_loss_coef * z (0 when dense)
    torch::Tensor balance_loss, z_loss;  // unweighted MoE losses (undefined when dense)
  };

  explicit TransformerImpl(const ModelConfig& cfg);
  // Deferred construction: the module tree without its weights. Every parameter is unallocated
  // (its shape and `dtype`, zero strides over one element of storage: is_unallocated()) until
  // materialize(), a weight file (load_weights) or a sharding engine (FullySharded) fills it.
  // Building a 65B model this way costs no host memory. Moving or casting the model before then
  // is an Error (it would allocate every weight in full, each filled with one uninitialised value).
  struct Deferred {
    torch::Dtype dtype = torch::kFloat32;  // of the weights once materialised
  };
  TransformerImpl(const ModelConfig& cfg, Deferred deferred);
  // tokens: (B, T) int64 at positions [start_pos, start_pos + T).
  Output forward(const torch::Tensor& tokens, int64_t start_pos = 0);
  // Packed rows: tokens (B, T) and `documents` (B, T) int64 (document_mask()). A token attends
  // only to earlier tokens of its own document, and rotary positions restart at 0 with each
  // document, so each document's logits are those of forward() on it alone (torchtune's packed
  // datasets, transformers' position_ids with flash-attention varlen).
  Output forward_packed(const torch::Tensor& tokens, const torch::Tensor& documents);
  // Training and evaluation: out.loss, the mean cross-entropy of the logits against targets (B, T)
  // (ignore_index -100 does not count). With the fused loss (set_fused_loss, default on) the LM
  // head and the cross-entropy run together over row chunks (linear_cross_entropy) and out.logits
  // stays undefined; an LM head with a LoRA adapter always takes the plain path. `documents` as
  // forward_packed (undefined = one sequence per row). `padding` (B, T) bool marks positions that
  // hold no token (ChatBatch::padding): the MoE losses average over the other positions only, as
  // transformers' attention_mask makes them (undefined = no padding).
  Output forward_loss(const torch::Tensor& tokens, const torch::Tensor& targets, const torch::Tensor& documents = {},
                      const torch::Tensor& padding = {});
  // Incremental decoding: tokens (B, T) at positions [cache.length, cache.length + T) attend to the
  // cached positions too; their keys/values are appended (cache.length += T). Inference only.
  // last_only: logits of the last position only, (B, 1, vocab_size) (a prompt's prefill).
  Output forward_cached(const torch::Tensor& tokens, KVCache& cache, bool last_only = false);
  // An empty cache for batch size B and up to `capacity` positions (0 = max_seq_len).
  KVCache new_cache(int64_t batch, int64_t capacity = 0);
  // Final hidden states (B, T, D) after the last norm, and the router logits of every MoE layer;
  // `documents` as forward_packed (undefined = one sequence per row).
  torch::Tensor hidden(const torch::Tensor& tokens, int64_t start_pos, std::vector<torch::Tensor>* router_logits,
                       KVCache* cache = nullptr, const torch::Tensor& documents = {});
  // hidden (.., D) -> logits (.., vocab_size).
  torch::Tensor project(const torch::Tensor& hidden);

  // Initial weights, a pure function of (init_seed(), parameter name, element index):
  // normal(0, init_std) for weight matrices and embeddings (init_std / sqrt(2 n_layers) for
  // o_proj and the MLP's down projection when init_depth_scaled), ones for norms. So any rank
  // can compute any slice of any parameter, and the initial model does not depend on the world
  // size, the sharding or the device. The normals come from a counter-based generator
  // (SplitMix64 of the element's index, Box-Muller), computed in fp32 and rounded to `out`'s dtype.
  void init_weights();
  // Elements [offset, offset + out.numel()) of parameter `name`'s flattened initial values,
  // written into `out` (any dtype or device).
  void init_parameter(const std::string& name, torch::Tensor out, int64_t offset = 0) const;
  // Drawn from torch's global RNG when the model is built: pretrain() seeds it with train.seed first;
  // a program of its own calls torch::manual_seed before building the model for a repeatable init.
  uint64_t init_seed() const { return init_seed_; }
  // Allocates every unallocated parameter on the CPU and initialises it (deferred models).
  void materialize();
  bool deferred() const;  // some parameter is still unallocated
  // torch::nn::Module's moves and casts, refused (an Error) while the model is deferred().
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;
  const ModelConfig& config() const { return cfg_; }
  // Activation checkpointing per block: in training, each block keeps only its input and
  // recomputes its activations during backward (less memory, ~1/3 more compute). Mixture-of-
  // experts blocks recompute their routing too (the same top-k: same input, same weights).
  void set_activation_checkpointing(bool on);
  bool activation_checkpointing() const { return checkpointing_; }
  // Hooks called around every block (null = none); not owned.
  void set_block_hooks(BlockHooks* hooks) { hooks_ = hooks; }
  // How forward_packed keeps documents apart (PackedAttention; default kAuto). Every choice gives
  // each document the logits it has alone; they differ in speed and memory.
  void set_packed_attention(PackedAttention how) { packed_attention_ = how; }
  BlockHooks* block_hooks() const { return hooks_; }
  // forward_loss's LM head: fused with the cross-entropy (no logits held) or plain; chunk_rows and
  // fp32_weight_grad as linear_cross_entropy's (0 = automatic; the head's bf16 gradient summed
  // over the row chunks in fp32).
  void set_fused_loss(bool on, int64_t chunk_rows = 0, bool fp32_weight_grad = false) {
    fused_loss_ = on;
    loss_chunk_rows_ = chunk_rows;
    loss_fp32_weight_grad_ = fp32_weight_grad;
  }

  Decoder model{nullptr};
  Linear lm_head{nullptr};  // null when tie_embeddings

 private:
  // The logits (unless !project_logits) and the MoE losses.
  Output finish(torch::Tensor hidden, std::vector<torch::Tensor>& router_logits, bool project_logits = true,
                const torch::Tensor& padding = {});
  ModelConfig cfg_;
  Rotary rotary_;
  uint64_t init_seed_ = 0;
  bool checkpointing_ = false;
  BlockHooks* hooks_ = nullptr;
  PackedAttention packed_attention_ = PackedAttention::kAuto;
  bool fused_loss_ = true;
  int64_t loss_chunk_rows_ = 0;
  bool loss_fp32_weight_grad_ = false;
};
TORCH_MODULE(Transformer);

}  // namespace libllm
