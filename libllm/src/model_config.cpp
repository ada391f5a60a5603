#include "libllm/model_config.h"

#include <algorithm>

#include "libllm/config.h"
#include "libllm/error.h"

namespace libllm {

void ModelConfig::fields(Fields& f) {
  f.add("vocab_size", vocab_size).min(1).max(1 << 24);
  f.add("dim", dim).min(1).max(1 << 18);
  f.add("n_layers", n_layers).min(1).max(4096);
  f.add("n_heads", n_heads).min(1).max(1 << 14);
  f.add("n_kv_heads", n_kv_heads).min(0).max(1 << 14);
  f.add("head_dim", head_dim).min(0).max(1 << 14);
  f.add("ffn_dim", ffn_dim).min(1).max(1 << 20);
  f.add("norm_eps", norm_eps).min(0);
  f.add("rope_theta", rope_theta).min(1);
  f.add("max_seq_len", max_seq_len).min(1).max(1 << 24);
  f.add("sliding_window", sliding_window).min(0).max(1 << 24);
  f.add("tie_embeddings", tie_embeddings);
  f.add("n_experts", n_experts).min(0).max(4096);
  f.add("n_experts_per_token", n_experts_per_token).min(1).max(4096);
  f.add("moe_aux_loss_coef", moe_aux_loss_coef).min(0);
  f.add("moe_z_loss_coef", moe_z_loss_coef).min(0);
  f.add("init_std", init_std).min(0);
  f.add("init_depth_scaled", init_depth_scaled);
  f.validate_with([this](const std::string& where) { validate(where); });
}

void ModelConfig::resolve() {
  if (n_kv_heads == 0) n_kv_heads = n_heads;
  if (head_dim == 0 && n_heads > 0) head_dim = dim / n_heads;
}

void ModelConfig::validate(const std::string& where) const {
  const int64_t kv = kv_heads();
  if (n_heads % kv != 0)
    throw Error(where + ".n_kv_heads", "n_heads (" + std::to_string(n_heads) +
                                           ") must be a multiple of n_kv_heads (" + std::to_string(kv) + ")");
  if (head_dim == 0 && dim % n_heads != 0)
    throw Error(where + ".n_heads", "dim (" + std::to_string(dim) + ") is not divisible by n_heads (" +
                                        std::to_string(n_heads) + ")",
                "set model.head_dim explicitly");
  if (hdim() % 2 != 0)
    throw Error(where + ".head_dim", "rotary embeddings need an even head_dim, got " + std::to_string(hdim()));
  // (Each size has a bound far past any published model; together they could still describe a
  // model no planner or checkpoint arithmetic should be asked about.)
  const double E = static_cast<double>(std::max<int64_t>(n_experts, 1)), D = static_cast<double>(dim);
  const double params = 2.0 * static_cast<double>(vocab_size) * D +
                        static_cast<double>(n_layers) * (2.0 * D * static_cast<double>((n_heads + kv) * hdim()) +
                                                         3.0 * E * D * static_cast<double>(ffn_dim));
  if (n_experts <= 1 && n_layers > (1 << 17))
    throw Error(where + ".n_layers", "is " + std::to_string(n_layers) + ", past libllm's limit of 131072 blocks");
  if (n_layers * std::max<int64_t>(n_experts, 1) > (1 << 17))  // (each expert of each block is listed)
    throw Error(where + ".n_experts",
                "n_layers x n_experts is " + std::to_string(n_layers * n_experts) +
                    ", past libllm's limit of 131072 experts in all",
                "check model.n_layers and n_experts");
  if (params > 1e14)
    throw Error(where,
                "describes a model of " + std::to_string(static_cast<int64_t>(params / 1e12)) +
                    " trillion parameters, past libllm's limit of 100 trillion",
                "check model.n_layers, dim, ffn_dim, n_experts and vocab_size");
  if (n_experts > 0 && n_experts_per_token > n_experts)
    throw Error(where + ".n_experts_per_token", "top-k (" + std::to_string(n_experts_per_token) +
                                                    ") exceeds n_experts (" + std::to_string(n_experts) + ")");
}

std::string ModelConfig::hf_architecture() const {
  if (n_experts > 0) return "MixtralForCausalLM";
  if (sliding_window > 0) return "MistralForCausalLM";
  return "LlamaForCausalLM";
}

std::vector<WeightShape> weight_shapes(const ModelConfig& cfg) {
  const int64_t D = cfg.dim, V = cfg.vocab_size, F = cfg.ffn_dim;
  const int64_t Q = cfg.n_heads * cfg.hdim(), KV = cfg.kv_heads() * cfg.hdim();
  std::vector<WeightShape> w;
  w.push_back({"model.embed_tokens.weight", {V, D}});
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    w.push_back({p + "input_layernorm.weight", {D}});
    w.push_back({p + "self_attn.q_proj.weight", {Q, D}});
    w.push_back({p + "self_attn.k_proj.weight", {KV, D}});
    w.push_back({p + "self_attn.v_proj.weight", {KV, D}});
    w.push_back({p + "self_attn.o_proj.weight", {D, Q}});
    w.push_back({p + "post_attention_layernorm.weight", {D}});
    if (cfg.n_experts > 0) {
      w.push_back({p + "block_sparse_moe.gate.weight", {cfg.n_experts, D}});
      for (int64_t e = 0; e < cfg.n_experts; ++e) {
        const std::string x = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
        w.push_back({x + "w1.weight", {F, D}});
        w.push_back({x + "w2.weight", {D, F}});
        w.push_back({x + "w3.weight", {F, D}});
      }
    } else {
      w.push_back({p + "mlp.gate_proj.weight", {F, D}});
      w.push_back({p + "mlp.up_proj.weight", {F, D}});
      w.push_back({p + "mlp.down_proj.weight", {D, F}});
    }
  }
  w.push_back({"model.norm.weight", {D}});
  if (!cfg.tie_embeddings) w.push_back({"lm_head.weight", {V, D}});
  return w;
}

ParamCount count_parameters(const ModelConfig& cfg) {
  const int64_t D = cfg.dim, V = cfg.vocab_size, F = cfg.ffn_dim;
  const int64_t Q = cfg.n_heads * cfg.hdim(), KV = cfg.kv_heads() * cfg.hdim();
  ParamCount c;
  c.embedding = V * D;
  c.attention = D * Q + 2 * D * KV + Q * D;
  const int64_t expert = 3 * D * F;
  c.mlp = cfg.n_experts > 0 ? cfg.n_experts * expert + cfg.n_experts * D : expert;
  c.norms = 2 * D;
  c.per_block = c.attention + c.mlp + c.norms;
  c.final_norm = D;
  c.lm_head = cfg.tie_embeddings ? 0 : V * D;
  c.total = c.embedding + cfg.n_layers * c.per_block + c.final_norm + c.lm_head;
  c.active = c.total;
  if (cfg.n_experts > 0)
    c.active -= cfg.n_layers * (cfg.n_experts - cfg.n_experts_per_token) * expert;
  return c;
}

}  // namespace libllm
