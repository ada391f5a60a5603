// The shape of a LLaMA-style decoder, and its exact parameter count (no weights allocated,
// so it works for 65B configurations).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace libllm {

class Fields;

struct ModelConfig {
  int64_t vocab_size = 32000;    // tokens in the embedding and LM head; >= the tokenizer's vocabulary; <= 2^24
  int64_t dim = 4096;            // model width (HF hidden_size); <= 2^18
  int64_t n_layers = 32;         // transformer blocks (HF num_hidden_layers); <= 4096
  int64_t n_heads = 32;          // query heads (HF num_attention_heads); <= 2^14
  int64_t n_kv_heads = 0;        // key/value heads for grouped-query attention; 0 = n_heads (MHA); must divide n_heads
  int64_t head_dim = 0;          // width of one head; 0 = dim / n_heads; even, <= 2^14
  int64_t ffn_dim = 11008;       // SwiGLU hidden width (HF intermediate_size); per expert for MoE; <= 2^20
  double norm_eps = 1e-5;        // RMSNorm epsilon (HF rms_norm_eps)
  double rope_theta = 10000.0;   // rotary embedding base (HF rope_theta)
  int64_t max_seq_len = 2048;    // context window in tokens (HF max_position_embeddings); <= 2^24
  int64_t sliding_window = 0;    // tokens a query may see, itself included (Mistral); 0 = full causal
  bool tie_embeddings = false;   // LM head shares the token embedding matrix
  int64_t n_experts = 0;         // mixture-of-experts MLP with this many experts; 0 = dense SwiGLU MLP; <= 4096
  int64_t n_experts_per_token = 2;   // experts each token is routed to (top-k), 1 <= k <= n_experts
  double moe_aux_loss_coef = 0.01;   // Switch load-balancing loss coefficient (Mixtral: 0.02)
  double moe_z_loss_coef = 0.0;      // router z-loss coefficient (ST-MoE uses 0.001); 0 = off
  double init_std = 0.02;            // std of the normal initialisation of every weight matrix
  bool init_depth_scaled = false;    // output projections (o_proj, down/w2) get init_std / sqrt(2 * n_layers)

  // Binds the fields above to recipe keys (section `model`).
  void fields(Fields& f);
  // Fills the 0 = "derived" defaults (n_kv_heads, head_dim). Idempotent.
  void resolve();
  // Cross-field checks (heads divide, head_dim even, ...); throws libllm::Error at `where`.
  void validate(const std::string& where) const;

  int64_t kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
  int64_t hdim() const { return head_dim > 0 ? head_dim : dim / n_heads; }
  // The Hugging Face architecture this shape exports as: LlamaForCausalLM,
  // MistralForCausalLM (sliding window) or MixtralForCausalLM (experts).
  std::string hf_architecture() const;
};

// Exact parameter counts of a configuration.
struct ParamCount {
  int64_t embedding = 0;   // token embedding (V x D)
  int64_t per_block = 0;   // one transformer block
  int64_t attention = 0;   // of which: q, k, v, o projections
  int64_t mlp = 0;         // of which: SwiGLU MLP or experts + router
  int64_t norms = 0;       // of which: the two RMSNorm weights
  int64_t final_norm = 0;  // final RMSNorm
  int64_t lm_head = 0;     // 0 when tied to the embedding
  int64_t total = 0;       // every trainable parameter, a tied matrix counted once
  int64_t active = 0;      // parameters used per token (MoE: only top-k experts); = total when dense
};
ParamCount count_parameters(const ModelConfig& cfg);

// One named weight of the model with its shape, in Hugging Face naming
// (model.layers.0.self_attn.q_proj.weight); what llm-plan prints and HF import/export expects.
struct WeightShape {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<WeightShape> weight_shapes(const ModelConfig& cfg);

}  // namespace libllm
