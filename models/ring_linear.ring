# Ring-linear 2.0: Ring-mini-linear-2.0 (16.4B, 957M active) and Ring-flash-linear-2.0 (104B,
# 6.1B active), HF model_type `bailing_moe_linear`. One file for the whole family: every size is
# read from the checkpoint's config.json.
#
# Paper: Ling Team, "Every Attention Matters: An Efficient Hybrid Architecture for Long-Context
# Reasoning", arXiv 2510.19338. Reference implementations: inclusionAI's SGLang model
# (bailing_moe_linear.py), the HF remote code (modeling_bailing_moe_linear_v2.py).
# Section marks (§) point into shared/spec/ring-linear.md.
#
# One graph serves prefill and decode: `seq` new tokens arrive after `past` cached ones (prefill:
# past = 0; decode: seq = 1). Softmax layers carry a KV cache, linear layers a [H, d, d] f32 state.

# ---- configuration (§1) -------------------------------------------------------------------------
config vocab_size: int;
config hidden_size: int;
config num_hidden_layers: int;
config layer_group_size: int;
config num_attention_heads: int;
config num_key_value_heads: int;
config head_dim: int;
config partial_rotary_factor: float;
config rope_theta: float;
config rope_scaling: any;
config rms_norm_eps: float;
config use_qk_norm: bool = true;
config linear_silu: bool = false;
config group_norm_size: int = 1;
config use_bias: bool = false;
config use_qkv_bias: bool = false;
config first_k_dense_replace: int;
config intermediate_size: int;
config num_experts: int;
config n_group: int = 1;
config topk_group: int = 1;
config num_experts_per_tok: int;
config num_shared_experts: int = 0;
config moe_intermediate_size: int;
config moe_shared_expert_intermediate_size: int = moe_intermediate_size;
config score_function: str = "sigmoid";
config moe_router_enable_expert_bias: bool = true;
config norm_topk_prob: bool = true;
config routed_scaling_factor: float = 1.0;
config tie_word_embeddings: bool = false;
config torch_dtype: str = "bfloat16";
config max_position_embeddings: int = 0;
config ringjit_decay_convention: str = "A";
# which positions get logits: "all", or "last" (a prefill for generation needs only the last)
config ringjit_logits: str = "all";
# activations' dtype; by default the checkpoint's. `float32` runs a bf16 checkpoint in f32.
config ringjit_compute_dtype: str = torch_dtype;

let D = hidden_size;
let H = num_attention_heads;
let Hkv = num_key_value_heads;
let d = head_dim;
let L = num_hidden_layers;
let G = layer_group_size;
let E = num_experts;
let K = num_experts_per_tok;
let eps = rms_norm_eps;
let dt = dtype(torch_dtype);              # weights as stored
let act = dtype(ringjit_compute_dtype);   # activations, residual stream, KV cache
let r = int(d * partial_rotary_factor);   # rotary dims, §2.5

require vocab_size > 0 && D > 0 && L > 0 && H > 0 && d > 0, "sizes must be positive";
require G >= 1, "layer_group_size must be at least 1";
require Hkv >= 1 && H % Hkv == 0, "num_attention_heads ({H}) must be a multiple of num_key_value_heads ({Hkv})";
require r % 2 == 0 && r <= d && r * 1.0 == d * partial_rotary_factor, "head_dim * partial_rotary_factor must be an even integer <= head_dim";
require group_norm_size >= 1 && H * d % group_norm_size == 0, "group_norm_size must divide num_attention_heads * head_dim";
require n_group >= 1 && E % n_group == 0, "num_experts ({E}) must be divisible by n_group ({n_group})";
require topk_group >= 1 && topk_group <= n_group, "topk_group must be in 1..n_group";
require K >= 1 && K <= topk_group * (E // n_group), "num_experts_per_tok must fit in the kept groups (topk_group * num_experts / n_group)";
require first_k_dense_replace >= 0 && first_k_dense_replace <= L, "first_k_dense_replace must be in 0..num_hidden_layers";
require score_function == "sigmoid", "only score_function \"sigmoid\" is defined for Ring-linear (§2.6)";
require !linear_silu, "linear_silu = true is not supported (no reference agrees on its meaning, §2.4.2)";
require !use_bias && !use_qkv_bias, "Ring-linear has no biases; use_bias/use_qkv_bias must be false";
require is_null(rope_scaling), "rope_scaling (YaRN) is not supported yet; set it to null";
require act == dt || act == f32, "ringjit_compute_dtype must be the checkpoint's dtype or float32";
require ringjit_decay_convention == "A" || ringjit_decay_convention == "B", "ringjit_decay_convention must be \"A\" or \"B\"";
require ringjit_logits == "all" || ringjit_logits == "last", "ringjit_logits must be \"all\" or \"last\"";

# ---- inputs -----------------------------------------------------------------------------------
dim batch, seq, past;
input tokens: i64[batch, seq];
let pos = arange(seq) + past;             # absolute positions of this step's tokens

# ---- building blocks ----------------------------------------------------------------------------

fn silu(x) { x * sigmoid(x) }

fn softmax(x, axis) {
    let m = max(x, axis = axis, keepdim = true);
    let e = exp(x - m);
    e / sum(e, axis = axis, keepdim = true)
}

# §2.2: statistics in f32; the normalised value returns to the input dtype before the weight.
fn rms_norm(x, w) {
    let xf = cast(x, f32);
    let n = xf * rsqrt(mean(xf * xf, axis = -1, keepdim = true) + eps);
    cast(n, dtype_of(x)) * w
}

# §2.5: NeoX ("rotate half") RoPE on the first r dims of the last axis, in f32.
# x: [batch, seq, heads, d]
fn rope(x) {
    let h = r // 2;
    let inv_freq = pow(rope_theta, -2.0 * cast(arange(h), f32) / r);        # [h]
    let ang = cast(reshape(pos, [seq, 1]), f32) * reshape(inv_freq, [1, h]);  # [seq, h]
    let c = reshape(cos(ang), [seq, 1, h]);
    let s = reshape(sin(ang), [seq, 1, h]);
    let xf = cast(x, f32);
    let x1 = xf[..., 0:h];
    let x2 = xf[..., h:r];
    let out = concat([x1 * c - x2 * s, x2 * c + x1 * s, xf[..., r:]], axis = -1);
    cast(out, dtype_of(x))
}

# §2.4.4: ALiBi-style power-law slopes; for n not a power of two, the slopes of the closest
# power of two p, then every other slope of the 2p list.
fn alibi_slopes(n) {
    let p = 2 ** int(floor(log2(n)));
    let first = pow(2.0, -8.0 * cast(arange(p) + 1, f32) / p);
    if p == n {
        first
    } else {
        concat([first, pow(2.0, -4.0 * cast(2 * arange(n - p) + 1, f32) / p)], axis = 0)
    }
}

# §2.4.4 layer factor of the decay: convention A (SGLang, vLLM) or B (HF remote code).
fn decay_factor(l) {
    if L <= 1 {
        1.0 + 1e-5
    } else if ringjit_decay_convention == "A" {
        1.0 - l / (L - 1) + 1e-5
    } else {
        1.0 - (l - 1) / (L - 1) + 1e-5
    }
}

fn swiglu_mlp(x, prefix, width) {
    param w_gate: dt[width, D] = "{prefix}.gate_proj.weight";
    param w_up: dt[width, D] = "{prefix}.up_proj.weight";
    param w_down: dt[D, width] = "{prefix}.down_proj.weight";
    (silu(x @ transpose(w_gate)) * (x @ transpose(w_up))) @ transpose(w_down)
}

fn qk_norm(x, prefix, which) {
    if use_qk_norm {
        param w: dt[d] = "{prefix}.{which}_layernorm.weight";
        rms_norm(x, w)
    } else {
        x
    }
}

# ---- lightning (linear) attention, §2.4 ---------------------------------------------------------

# The decayed outer-product recurrence, written as a scan over the sequence axis:
#   S_t = λ S_{t-1} + k_tᵀ v_t,   o_t = q_t S_t      (q pre-scaled by d^-1/2)
# q, k, v: [batch, seq, H, d] f32; lam: [H, 1, 1]; s0: [batch, H, d, d] f32.
fn lightning(q, k, v, lam, s0) {
    scan (s = s0; qt in q, kt in k, vt in v; axis = 1) {
        let s_new = lam * s + unsqueeze(kt, -1) * unsqueeze(vt, -2);
        let o = squeeze(unsqueeze(qt, -2) @ s_new, -2);
        (s_new, o)
    }
}

fn linear_attention(x, l, s0) {
    let p = "model.layers.{l}.attention";
    param w_qkv: dt[3 * H * d, D] = "{p}.query_key_value.weight";
    param w_g: dt[H * d, D] = "{p}.g_proj.weight";
    param g_norm: dt[H * d] = "{p}.g_norm.weight";
    param w_o: dt[D, H * d] = "{p}.dense.weight";
    let qkv = cast(x @ transpose(w_qkv), f32);                     # §2.4.1–2: f32 from here
    let q = reshape(qkv[..., 0 : H * d], [batch, seq, H, d]);
    let k = reshape(qkv[..., H * d : 2 * H * d], [batch, seq, H, d]);
    let v = reshape(qkv[..., 2 * H * d : 3 * H * d], [batch, seq, H, d]);
    let q = rope(qk_norm(q, p, "query"));                           # §2.4.3: QK-norm, then RoPE
    let k = rope(qk_norm(k, p, "key"));
    let lam = reshape(exp(-alibi_slopes(H) * decay_factor(l)), [H, 1, 1]);
    let (s1, o) = lightning(q * d ** -0.5, k, v, lam, s0);
    # §2.4.5: RMSNorm per group of channels, full-width weight, sigmoid output gate
    let og = reshape(o, [batch, seq, group_norm_size, H * d // group_norm_size]);
    let og = og * rsqrt(mean(og * og, axis = -1, keepdim = true) + eps);
    let y = reshape(og, [batch, seq, H * d]) * g_norm;
    let gate = sigmoid(cast(x @ transpose(w_g), f32));
    (cast(y * gate, act) @ transpose(w_o), s1)
}

# ---- softmax (GQA) attention, §2.3 --------------------------------------------------------------

# k_past, v_past: [batch, Hkv, past, d], post QK-norm and RoPE.
fn softmax_attention(x, l, k_past, v_past) {
    let p = "model.layers.{l}.attention";
    param w_qkv: dt[(H + 2 * Hkv) * d, D] = "{p}.query_key_value.weight";
    param w_o: dt[D, H * d] = "{p}.dense.weight";
    let qkv = x @ transpose(w_qkv);
    let q = reshape(qkv[..., 0 : H * d], [batch, seq, H, d]);
    let k = reshape(qkv[..., H * d : (H + Hkv) * d], [batch, seq, Hkv, d]);
    let v = reshape(qkv[..., (H + Hkv) * d : (H + 2 * Hkv) * d], [batch, seq, Hkv, d]);
    let q = rope(qk_norm(q, p, "query"));
    let k = rope(qk_norm(k, p, "key"));
    let k_all = concat([k_past, permute(k, [0, 2, 1, 3])], axis = 2);   # [batch, Hkv, past + seq, d]
    let v_all = concat([v_past, permute(v, [0, 2, 1, 3])], axis = 2);
    # GQA: query head h reads kv head h // (H / Hkv)
    let qh = reshape(permute(q, [0, 2, 1, 3]), [batch, Hkv, H // Hkv, seq, d]);
    let kt = unsqueeze(transpose(k_all), 2);                             # [batch, Hkv, 1, d, past + seq]
    let scores = (cast(qh, f32) @ cast(kt, f32)) * d ** -0.5;          # [batch, Hkv, H/Hkv, seq, past + seq]
    let causal = reshape(arange(past + seq), [1, past + seq]) <= reshape(pos, [seq, 1]);
    let probs = softmax(where(causal, scores, -inf), -1);
    let o = probs @ cast(unsqueeze(v_all, 2), f32);                     # [batch, Hkv, H/Hkv, seq, d]
    let o = reshape(permute(reshape(o, [batch, H, seq, d]), [0, 2, 1, 3]), [batch, seq, H * d]);
    (cast(o, act) @ transpose(w_o), k_all, v_all)
}

# ---- mixture of experts, §2.6 ---------------------------------------------------------------------

fn moe(x, l) {
    let p = "model.layers.{l}.mlp";
    param w_router: dt[E, D] = "{p}.gate.weight";
    let router_probs = sigmoid(cast(x, f32) @ transpose(cast(w_router, f32)));   # [batch, seq, E], f32
    let biased = if moe_router_enable_expert_bias {
        param bias: f32[E] = "{p}.gate.expert_bias";
        router_probs + bias                                                 # selection only
    } else {
        router_probs
    };
    # group-limited top-k: a group scores the sum of its two best experts; keep topk_group groups
    let per = E // n_group;
    let grouped = reshape(biased, [batch, seq, n_group, per]);
    let (best, _) = topk(grouped, min(2, per), axis = -1);
    let (_, keep) = topk(sum(best, axis = -1), topk_group, axis = -1);       # [batch, seq, topk_group]
    let kept = sum(cast(unsqueeze(keep, -1) == arange(n_group), f32), axis = -2) > 0.0;
    let masked = where(unsqueeze(kept, -1), grouped, -inf);                  # -inf, not 0: §6
    let (_, chosen) = topk(reshape(masked, [batch, seq, E]), K, axis = -1);  # [batch, seq, K]
    # weights from the unbiased probabilities
    let w = gather(router_probs, chosen, axis = -1);
    let w = if norm_topk_prob { w / (sum(w, axis = -1, keepdim = true) + 1e-20) } else { w };
    let route_weights = w * routed_scaling_factor;
    # dense combine weights [batch, seq, E]: zero for experts not chosen
    let combine = sum(unsqueeze(route_weights, -1) * cast(unsqueeze(chosen, -1) == arange(E), f32), axis = -2);
    # Every expert over every token, weighted by `combine`: the definition. The moe rewrite
    # turns it into a grouped GEMM over the chosen experts only.
    let I = moe_intermediate_size;
    param eg: dt[E, I, D] = "{p}.experts.{e}.gate_proj.weight" for e in 0..E;
    param eu: dt[E, I, D] = "{p}.experts.{e}.up_proj.weight" for e in 0..E;
    param ed: dt[E, D, I] = "{p}.experts.{e}.down_proj.weight" for e in 0..E;
    let xe = unsqueeze(x, 1);                                                # [batch, 1, seq, D]
    let h = silu(xe @ transpose(eg)) * (xe @ transpose(eu));                # [batch, E, seq, I]
    let y = h @ transpose(ed);                                               # [batch, E, seq, D]
    let routed = sum(cast(y, f32) * unsqueeze(permute(combine, [0, 2, 1]), -1), axis = 1);
    if num_shared_experts > 0 {
        let shared = swiglu_mlp(x, "{p}.shared_experts", num_shared_experts * moe_shared_expert_intermediate_size);
        cast(routed + shared, act)
    } else {
        cast(routed, act)
    }
}

# ---- the decoder, §2.1 ----------------------------------------------------------------------------

param embed: dt[vocab_size, D] = "model.word_embeddings.weight";
let h = cast(take(embed, tokens, axis = 0), act);                                      # [batch, seq, D]

for l in 0..L {
    let pl = "model.layers.{l}";
    param ln_in: dt[D] = "{pl}.input_layernorm.weight";
    param ln_post: dt[D] = "{pl}.post_attention_layernorm.weight";
    let x = rms_norm(h, ln_in);
    # §1.3: the last layer of every group is softmax attention (and any trailing layers)
    let a = if (l + 1) % G == 0 || l >= L // G * G {
        state k_cache: act[batch, Hkv, past, d] = "{pl}.k_cache";
        state v_cache: act[batch, Hkv, past, d] = "{pl}.v_cache";
        let (a, k_all, v_all) = softmax_attention(x, l, k_cache, v_cache);
        carry k_cache = k_all;
        carry v_cache = v_all;
        a
    } else {
        state s: f32[batch, H, d, d] = "{pl}.linear_state";
        let (a, s1) = linear_attention(x, l, s);
        carry s = s1;
        a
    };
    h = h + a;
    let x = rms_norm(h, ln_post);
    let m = if l < first_k_dense_replace {
        swiglu_mlp(x, "{pl}.mlp", intermediate_size)
    } else {
        moe(x, l)
    };
    h = h + m;
}

param final_norm: dt[D] = "model.norm.weight";
let head = if tie_word_embeddings {
    embed
} else {
    param lm_head: dt[vocab_size, D] = "lm_head.weight";
    lm_head
};
# the final norm and the LM head are per position: only the last one's when that is all asked
let hl = if ringjit_logits == "last" { h[:, seq - 1 : seq, :] } else { h };
# §2.1: the LM head runs in f32 (the paper's train/inference alignment)
output "logits" = cast(rms_norm(hl, final_norm), f32) @ transpose(cast(head, f32));
