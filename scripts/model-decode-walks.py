#!/usr/bin/env python3
# docs/cuda.md, "Tokens decoded in order of list length": the table's numbers (python3, no packages; ~2 min).
# Model of sparse_decode_tiled's walks: per chunk of 2,048 features, a warp runs as many rounds as the most
# entries any of its 128 walks (32 lanes x 4 tokens) has in the chunk; a block (8 warps) waits at the chunk
# barrier for its slowest warp. Lists of 16,384 tokens over 8,192 features (4 chunks), lengths either
# Binomial-like around L0 = 64 or log-normal (sigma 1, mean 64, capped at 4,096), features uniform.
import math, random
random.seed(1)
B, F, CH, L0 = 16384, 8192, 2048, 64
NCH = F // CH
def lists(kind):
    out = []
    for _ in range(B):
        if kind == "binomial":
            n = int(round(random.gauss(L0, math.sqrt(L0))))
        else:
            n = min(F // 2, int(round(L0 * math.exp(random.gauss(0, 1) - 0.5))))
        n = max(0, n)
        c = [0] * NCH
        for f in random.sample(range(F), n):
            c[f // CH] += 1
        out.append((n, c))
    return out
def model(ls, order):
    toks = list(range(B))
    if order == "length":
        toks.sort(key=lambda b: -ls[b][0])
    entries = sum(n for n, _ in ls)
    warp_rounds = 0; block_rounds = 0
    for t0 in range(0, B, 1024):
        tile = toks[t0:t0 + 1024]
        for c in range(NCH):
            wr = []
            for w in range(8):
                # thread t owns positions 4t..4t+3: warp w owns positions 128w..128w+127
                ws = tile[128 * w:128 * (w + 1)]
                wr.append(max(ls[b][1][c] for b in ws))
            warp_rounds += sum(wr)
            block_rounds += 8 * max(wr)
    return entries / (warp_rounds * 128), entries / (block_rounds * 128)
for kind in ["binomial", "lognormal"]:
    ls = lists(kind)
    for order in ["batch", "length"]:
        e_w, e_b = model(ls, order)
        print(f"{kind:9} {order:6}: lanes busy {100*e_w:5.1f}% of warp rounds, {100*e_b:5.1f}% counting block barriers")
