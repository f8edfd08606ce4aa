#!/usr/bin/env python3
"""Independent reference forward of a Hugging Face Gemma-2 directory, in pure Python (standard library only).

Usage: gemma2_reference.py MODEL_DIR '[[token, ...], ...]'

Reads config.json and every *.safetensors file (safetensors_reader.py: F32, F16, BF16, F64), runs
Gemma-2 as transformers' modeling_gemma2.py defines it with eager attention (embeddings scaled by
sqrt(hidden_size), Gemma RMSNorm x / sqrt(mean(x^2) + eps) * (1 + weight), sandwich norms around attention and
MLP, grouped-query attention with rotate_half RoPE, scores scaled by query_pre_attn_scalar**-0.5 and optionally
tanh-softcapped, causal mask plus a sliding window on sliding layers, gelu_pytorch_tanh gated MLP, final norm,
unembedding tied to embed_tokens unless tie_word_embeddings is false and lm_head.weight exists, optional final
logit softcapping) in float64 on each token sequence, and prints one JSON object:
{"runs": [{"logits": [[...]], "layers": [{"resid_pre", "resid_mid", "mlp_in_normed", "mlp_in_unweighted",
"mlp_out", "attn_pattern", "attn_norm_scale", "attn_post_norm_scale", "mlp_norm_scale", "mlp_post_norm_scale"}, ...],
"final_norm_scale": [...]}, ...]}.
Activations are [n_tokens][d_model]: resid_mid = resid_pre + post_attention_layernorm(attention output),
mlp_in_normed = pre_feedforward_layernorm(resid_mid), mlp_in_unweighted = that norm before its weight
(Gemma2RMSNorm._norm: resid_mid / sqrt(mean(resid_mid^2) + eps), TransformerLens's ln2.hook_normalized),
mlp_out = post_feedforward_layernorm(MLP output).
attn_pattern is [n_heads][n_tokens][n_tokens] (zero where masked: above the diagonal, and outside the sliding
window on sliding layers); norm scales are 1/sqrt(mean(x^2) + eps) per position of each norm's input.
Config keys absent from config.json take transformers' Gemma2Config defaults (so an absent softcapping key
means 50.0 / 30.0, while an explicit null disables it).
"""

import json
import math
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_reader import matrix, read_dir, vector  # noqa: E402

# transformers' Gemma2Config defaults, used only for keys that config.json omits.
DEFAULTS = {
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
}


def dot(a, b):
    return sum(u * v for u, v in zip(a, b))


def linear(x, w):
    """y = W x for every row of x, W stored (out, in) as a list of rows; no bias."""
    return [[dot(wr, row) for wr in w] for row in x]


def rms_norm(x, weight, eps):
    """Gemma RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + weight); returns (rows, per-position scales)."""
    out, scales = [], []
    d = len(weight)
    for row in x:
        s = 1.0 / math.sqrt(sum(v * v for v in row) / d + eps)
        scales.append(s)
        out.append([v * s * (1.0 + weight[i]) for i, v in enumerate(row)])
    return out, scales


def rms_normalize(x, eps):
    """Gemma2RMSNorm._norm, the norm before its weight: x / sqrt(mean(x^2) + eps) per row."""
    return [[v / math.sqrt(sum(u * u for u in row) / len(row) + eps) for v in row] for row in x]


def gelu_tanh(x):
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softcap(x, cap):
    return x if cap is None else math.tanh(x / cap) * cap


def add(a, b):
    return [[u + v for u, v in zip(ra, rb)] for ra, rb in zip(a, b)]


def rope(vec, pos, theta):
    """transformers' rotate_half RoPE on one head vector at position pos."""
    hd = len(vec)
    half = hd // 2
    out = list(vec)
    for i in range(half):
        angle = pos * (1.0 / theta ** (2.0 * i / hd))
        c, s = math.cos(angle), math.sin(angle)
        out[i] = vec[i] * c - vec[i + half] * s
        out[i + half] = vec[i + half] * c + vec[i] * s
    return out


def heads_of(rows, n_heads, hd, pos_theta=None):
    """Split [n][n_heads*hd] into [n_heads][n][hd], applying RoPE when pos_theta is given."""
    out = []
    for head in range(n_heads):
        per = [row[head * hd : (head + 1) * hd] for row in rows]
        if pos_theta is not None:
            per = [rope(v, pos, pos_theta) for pos, v in enumerate(per)]
        out.append(per)
    return out


def attention(h, wq, wk, wv, cfg, sliding):
    """Eager Gemma-2 attention before o_proj: returns (merged heads [n][heads*hd], pattern [heads][n][n])."""
    n = len(h)
    n_head, n_kv, hd = cfg["n_head"], cfg["n_kv"], cfg["head_dim"]
    q = heads_of(linear(h, wq), n_head, hd, cfg["rope_theta"])
    k = heads_of(linear(h, wk), n_kv, hd, cfg["rope_theta"])
    v = heads_of(linear(h, wv), n_kv, hd)
    scale = cfg["query_pre_attn_scalar"] ** -0.5
    window = cfg["sliding_window"] if sliding else None
    group = n_head // n_kv
    merged = [[0.0] * (n_head * hd) for _ in range(n)]
    patterns = []
    for head in range(n_head):
        qh, kh, vh = q[head], k[head // group], v[head // group]
        pat = [[0.0] * n for _ in range(n)]
        for t in range(n):
            keep = [u for u in range(t + 1) if window is None or t - u < window]
            scores = [softcap(dot(qh[t], kh[u]) * scale, cfg["attn_cap"]) for u in keep]
            m = max(scores)
            e = [math.exp(sc - m) for sc in scores]
            z = sum(e)
            for u, eu in zip(keep, e):
                pat[t][u] = eu / z
            for i in range(hd):
                merged[t][head * hd + i] = sum(pat[t][u] * vh[u][i] for u in keep)
        patterns.append(pat)
    return merged, patterns


def read_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type", "gemma2") != "gemma2":
        raise SystemExit("config.json: model_type %r is not gemma2" % raw["model_type"])
    get = lambda key: raw[key] if key in raw else DEFAULTS[key]
    act = get("hidden_activation")
    if act != "gelu_pytorch_tanh":
        raise SystemExit("config.json: hidden_activation %r unsupported (expected gelu_pytorch_tanh)" % act)
    # transformers 4 writes rope_theta (and rope_scaling), transformers 5 writes rope_parameters instead.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or any(isinstance(v, dict) for v in rope.values()):
        raise SystemExit("config.json: only default RoPE is supported, got %r" % rope)
    rope_theta = raw["rope_theta"] if "rope_theta" in raw else rope.get("rope_theta", DEFAULTS["rope_theta"])
    for key in ("attention_bias", "use_bidirectional_attention"):
        if raw.get(key):
            raise SystemExit("config.json: %s is set, unsupported" % key)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in raw:
            raise SystemExit("config.json: missing %s" % key)
    cfg = {
        "d": raw["hidden_size"],
        "inter": raw["intermediate_size"],
        "n_layer": raw["num_hidden_layers"],
        "n_head": raw["num_attention_heads"],
        "n_kv": raw.get("num_key_value_heads", raw["num_attention_heads"]),
        "head_dim": get("head_dim"),
        "vocab": raw["vocab_size"],
        "eps": get("rms_norm_eps"),
        "rope_theta": float(rope_theta),
        "query_pre_attn_scalar": get("query_pre_attn_scalar"),
        "attn_cap": get("attn_logit_softcapping"),
        "final_cap": get("final_logit_softcapping"),
        "sliding_window": get("sliding_window"),
        "tied": get("tie_word_embeddings"),
    }
    if cfg["n_head"] % cfg["n_kv"] != 0:
        raise SystemExit("config.json: %d heads not a multiple of %d kv heads" % (cfg["n_head"], cfg["n_kv"]))
    if cfg["head_dim"] % 2 != 0:
        raise SystemExit("config.json: head_dim %d is odd (RoPE needs it even)" % cfg["head_dim"])
    if cfg["sliding_window"] is not None and cfg["sliding_window"] < 1:
        raise SystemExit("config.json: sliding_window %r must be at least 1" % cfg["sliding_window"])
    types = raw.get("layer_types")
    if types is None:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["n_layer"])]
    if len(types) != cfg["n_layer"] or any(ty not in ("sliding_attention", "full_attention") for ty in types):
        raise SystemExit("config.json: bad layer_types %r for %d layers" % (types, cfg["n_layer"]))
    cfg["sliding"] = [ty == "sliding_attention" for ty in types]
    return cfg


def main():
    model_dir, seqs = sys.argv[1], json.loads(sys.argv[2])
    cfg = read_config(model_dir)
    d, inter, hd, vocab = cfg["d"], cfg["inter"], cfg["head_dim"], cfg["vocab"]
    n_head, n_kv = cfg["n_head"], cfg["n_kv"]
    tensors = read_dir(model_dir)

    def t(name, shape):
        """The tensor `name` (also found without its leading "model."), checked against `shape`."""
        found = tensors.get(name)
        if found is None and name.startswith("model."):
            found = tensors.get(name[len("model.") :])
        if found is None:
            raise SystemExit("%s: missing tensor %s" % (model_dir, name))
        if list(found[0]) != list(shape):
            raise SystemExit("%s: tensor %s has shape %s, expected %s" % (model_dir, name, found[0], shape))
        return found

    embed = matrix(t("model.embed_tokens.weight", [vocab, d]))
    if not cfg["tied"] and "lm_head.weight" in tensors:
        unembed = matrix(t("lm_head.weight", [vocab, d]))
    else:
        unembed = embed
    layer_weights = []
    for l in range(cfg["n_layer"]):
        p = "model.layers.%d." % l
        layer_weights.append(
            {
                "input_ln": vector(t(p + "input_layernorm.weight", [d])),
                "q": matrix(t(p + "self_attn.q_proj.weight", [n_head * hd, d])),
                "k": matrix(t(p + "self_attn.k_proj.weight", [n_kv * hd, d])),
                "v": matrix(t(p + "self_attn.v_proj.weight", [n_kv * hd, d])),
                "o": matrix(t(p + "self_attn.o_proj.weight", [d, n_head * hd])),
                "post_attn_ln": vector(t(p + "post_attention_layernorm.weight", [d])),
                "pre_ff_ln": vector(t(p + "pre_feedforward_layernorm.weight", [d])),
                "gate": matrix(t(p + "mlp.gate_proj.weight", [inter, d])),
                "up": matrix(t(p + "mlp.up_proj.weight", [inter, d])),
                "down": matrix(t(p + "mlp.down_proj.weight", [d, inter])),
                "post_ff_ln": vector(t(p + "post_feedforward_layernorm.weight", [d])),
            }
        )
    final_norm = vector(t("model.norm.weight", [d]))
    eps, normalizer = cfg["eps"], math.sqrt(d)
    runs = []
    for toks in seqs:
        for tok in toks:
            if not 0 <= tok < vocab:
                raise SystemExit("token %d out of range for vocab %d" % (tok, vocab))
        x = [[v * normalizer for v in embed[tok]] for tok in toks]
        layers = []
        for l, w in enumerate(layer_weights):
            rec = {"resid_pre": x}
            h, rec["attn_norm_scale"] = rms_norm(x, w["input_ln"], eps)
            merged, rec["attn_pattern"] = attention(h, w["q"], w["k"], w["v"], cfg, cfg["sliding"][l])
            a, rec["attn_post_norm_scale"] = rms_norm(linear(merged, w["o"]), w["post_attn_ln"], eps)
            x = add(x, a)
            rec["resid_mid"] = x
            h, rec["mlp_norm_scale"] = rms_norm(x, w["pre_ff_ln"], eps)
            rec["mlp_in_normed"] = h
            rec["mlp_in_unweighted"] = rms_normalize(x, eps)
            gate, up = linear(h, w["gate"]), linear(h, w["up"])
            hidden = [[gelu_tanh(g) * u for g, u in zip(gr, ur)] for gr, ur in zip(gate, up)]
            m, rec["mlp_post_norm_scale"] = rms_norm(linear(hidden, w["down"]), w["post_ff_ln"], eps)
            rec["mlp_out"] = m
            x = add(x, m)
            layers.append(rec)
        h, sf = rms_norm(x, final_norm, eps)
        logits = [[softcap(dot(row, u), cfg["final_cap"]) for u in unembed] for row in h]
        runs.append({"logits": logits, "layers": layers, "final_norm_scale": sf})
    json.dump({"runs": runs}, sys.stdout)


if __name__ == "__main__":
    main()
