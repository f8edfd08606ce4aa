#!/usr/bin/env python3
"""Independent reference forward of a Hugging Face GPT-2 directory, in pure Python (standard library only).

Usage: gpt2_reference.py MODEL_DIR '[[token, ...], ...]'

Reads config.json and every *.safetensors file (safetensors_reader.py: F32, F16, BF16, F64), runs
GPT-2 (learned positions, pre-LayerNorm blocks, fused QKV Conv1D attention, gelu_new MLP, ln_f, unembedding
tied to wte unless lm_head.weight exists) in float64 on each token sequence, and prints one JSON object:
{"runs": [{"logits": [[...]], "layers": [{"resid_pre", "resid_mid", "mlp_in_normed", "mlp_in_unweighted",
"mlp_out", "attn_pattern", "attn_norm_scale", "mlp_norm_scale"}, ...], "final_norm_scale": [...]}, ...]}.
Activations are [n_tokens][d_model]; mlp_in_normed = ln_2(resid_mid), mlp_in_unweighted = ln_2 before its
weight and bias, (resid_mid - mean) / sqrt(var + eps); attn_pattern is [n_heads][n_tokens][n_tokens] (zero
above the diagonal); norm scales are 1/sqrt(var + eps) per position.
"""

import json
import math
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_reader import matrix, read_dir, vector  # noqa: E402


def conv1d(x, w, b):
    """transformers' Conv1D: x [n][in] @ w [in][out] + b [out]."""
    n_out = len(b)
    out = []
    for row in x:
        acc = list(b)
        for i, xi in enumerate(row):
            wi = w[i]
            for j in range(n_out):
                acc[j] += xi * wi[j]
        out.append(acc)
    return out


def layer_norm(x, g, b, eps):
    out, scales = [], []
    d = len(g)
    for row in x:
        mean = sum(row) / d
        var = sum((v - mean) ** 2 for v in row) / d
        s = 1.0 / math.sqrt(var + eps)
        scales.append(s)
        out.append([(v - mean) * s * g[i] + b[i] for i, v in enumerate(row)])
    return out, scales


def layer_normalize(x, eps):
    """LayerNorm before its weight and bias: (x - mean) / sqrt(var + eps) per row."""
    out = []
    for row in x:
        mean = sum(row) / len(row)
        var = sum((v - mean) ** 2 for v in row) / len(row)
        out.append([(v - mean) / math.sqrt(var + eps) for v in row])
    return out


def gelu_new(x):
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def add(a, b):
    return [[u + v for u, v in zip(ra, rb)] for ra, rb in zip(a, b)]


def main():
    model_dir, seqs = sys.argv[1], json.loads(sys.argv[2])
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "gpt2", cfg["model_type"]
    d, n_layer, n_head = cfg["n_embd"], cfg["n_layer"], cfg["n_head"]
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    tensors = read_dir(model_dir)

    def t(name):
        if name in tensors:
            return tensors[name]
        return tensors["transformer." + name]

    wte, wpe = matrix(t("wte.weight")), matrix(t("wpe.weight"))
    unembed = matrix(tensors["lm_head.weight"]) if "lm_head.weight" in tensors else wte
    hd = d // n_head
    runs = []
    for toks in seqs:
        n = len(toks)
        x = [[wte[tok][i] + wpe[pos][i] for i in range(d)] for pos, tok in enumerate(toks)]
        layers = []
        for l in range(n_layer):
            p = "h.%d." % l
            rec = {"resid_pre": x}
            h, s1 = layer_norm(x, vector(t(p + "ln_1.weight")), vector(t(p + "ln_1.bias")), eps)
            rec["attn_norm_scale"] = s1
            qkv = conv1d(h, matrix(t(p + "attn.c_attn.weight")), vector(t(p + "attn.c_attn.bias")))
            merged = [[0.0] * d for _ in range(n)]
            patterns = []
            for head in range(n_head):
                qo, ko, vo = head * hd, d + head * hd, 2 * d + head * hd
                pat = [[0.0] * n for _ in range(n)]
                for q in range(n):
                    scores = [
                        sum(qkv[q][qo + i] * qkv[k][ko + i] for i in range(hd)) / math.sqrt(hd)
                        for k in range(q + 1)
                    ]
                    m = max(scores)
                    e = [math.exp(sc - m) for sc in scores]
                    z = sum(e)
                    for k in range(q + 1):
                        pat[q][k] = e[k] / z
                    for i in range(hd):
                        merged[q][qo + i] = sum(pat[q][k] * qkv[k][vo + i] for k in range(q + 1))
                patterns.append(pat)
            rec["attn_pattern"] = patterns
            attn_out = conv1d(merged, matrix(t(p + "attn.c_proj.weight")), vector(t(p + "attn.c_proj.bias")))
            x = add(x, attn_out)
            rec["resid_mid"] = x
            h, s2 = layer_norm(x, vector(t(p + "ln_2.weight")), vector(t(p + "ln_2.bias")), eps)
            rec["mlp_norm_scale"] = s2
            rec["mlp_in_normed"] = h
            rec["mlp_in_unweighted"] = layer_normalize(x, eps)
            hidden = conv1d(h, matrix(t(p + "mlp.c_fc.weight")), vector(t(p + "mlp.c_fc.bias")))
            hidden = [[gelu_new(v) for v in row] for row in hidden]
            mlp_out = conv1d(hidden, matrix(t(p + "mlp.c_proj.weight")), vector(t(p + "mlp.c_proj.bias")))
            rec["mlp_out"] = mlp_out
            x = add(x, mlp_out)
            layers.append(rec)
        h, sf = layer_norm(x, vector(t("ln_f.weight")), vector(t("ln_f.bias")), eps)
        logits = [[sum(a * b for a, b in zip(row, u)) for u in unembed] for row in h]
        runs.append({"logits": logits, "layers": layers, "final_norm_scale": sf})
    json.dump({"runs": runs}, sys.stdout)


if __name__ == "__main__":
    main()
