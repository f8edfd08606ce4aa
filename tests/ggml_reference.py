#!/usr/bin/env python3
"""ggml's reference dequantisation (ggml-quants.c, dequantize_row_*), transcribed line for line, in float64.

Reads {"type": GGML type id, "blocks": [hex string of one block, ...]} on stdin and writes one list of
floats per block on stdout. Used by src/model/ggml_quants.rs's unit test as an independent oracle.
Standard library only.
"""
import json
import struct
import sys

QK_K = 256


def f16(b, at):
    return struct.unpack_from("<e", b, at)[0]


def q4_0(b):
    d = f16(b, 0)
    qs = b[2:18]
    y = [0.0] * 32
    for j in range(16):
        x0 = (qs[j] & 0x0F) - 8
        x1 = (qs[j] >> 4) - 8
        y[j + 0] = x0 * d
        y[j + 16] = x1 * d
    return y


def q4_1(b):
    d, m = f16(b, 0), f16(b, 2)
    qs = b[4:20]
    y = [0.0] * 32
    for j in range(16):
        x0 = qs[j] & 0x0F
        x1 = qs[j] >> 4
        y[j + 0] = x0 * d + m
        y[j + 16] = x1 * d + m
    return y


def q5(b, with_min):
    d = f16(b, 0)
    m = f16(b, 2) if with_min else 0.0
    at = 4 if with_min else 2
    (qh,) = struct.unpack_from("<I", b, at)
    qs = b[at + 4:at + 20]
    y = [0.0] * 32
    for j in range(16):
        xh_0 = ((qh >> (j + 0)) << 4) & 0x10
        xh_1 = ((qh >> (j + 12))) & 0x10
        x0 = (qs[j] & 0x0F) | xh_0
        x1 = (qs[j] >> 4) | xh_1
        if with_min:
            y[j + 0] = x0 * d + m
            y[j + 16] = x1 * d + m
        else:
            y[j + 0] = (x0 - 16) * d
            y[j + 16] = (x1 - 16) * d
    return y


def q8_0(b):
    d = f16(b, 0)
    return [d * struct.unpack_from("<b", b, 2 + j)[0] for j in range(32)]


def q2_k(b):
    scales = b[0:16]
    q = b[16:80]
    d, dmin = f16(b, 80), f16(b, 82)
    y = []
    qo = 0
    is_ = 0
    for _ in range(0, QK_K, 128):
        shift = 0
        for _j in range(4):
            sc = scales[is_]
            is_ += 1
            dl, ml = d * (sc & 0xF), dmin * (sc >> 4)
            for l in range(16):
                y.append(dl * ((q[qo + l] >> shift) & 3) - ml)
            sc = scales[is_]
            is_ += 1
            dl, ml = d * (sc & 0xF), dmin * (sc >> 4)
            for l in range(16):
                y.append(dl * ((q[qo + l + 16] >> shift) & 3) - ml)
            shift += 2
        qo += 32
    return y


def q3_k(b):
    kmask1, kmask2 = 0x03030303, 0x0F0F0F0F
    hm = b[0:32]
    q = b[32:96]
    d_all = f16(b, 108)
    aux = list(struct.unpack_from("<3I", b, 96)) + [0]
    tmp = aux[2]
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4)
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4)
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4)
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4)
    scales = struct.unpack("<16b", struct.pack("<4I", *aux))
    y = []
    qo = 0
    is_ = 0
    m = 1
    for _ in range(0, QK_K, 128):
        shift = 0
        for _j in range(4):
            dl = d_all * (scales[is_] - 32)
            is_ += 1
            for l in range(16):
                y.append(dl * (((q[qo + l + 0] >> shift) & 3) - (0 if hm[l + 0] & m else 4)))
            dl = d_all * (scales[is_] - 32)
            is_ += 1
            for l in range(16):
                y.append(dl * (((q[qo + l + 16] >> shift) & 3) - (0 if hm[l + 16] & m else 4)))
            shift += 2
            m <<= 1
        qo += 32
    return y


def get_scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)
    m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4)
    return d, m


def q4_k(b):
    d, dmin = f16(b, 0), f16(b, 2)
    scales = b[4:16]
    q = b[16:144]
    y = []
    qo = 0
    is_ = 0
    for _ in range(0, QK_K, 64):
        sc, m = get_scale_min_k4(is_ + 0, scales)
        d1, m1 = d * sc, dmin * m
        sc, m = get_scale_min_k4(is_ + 1, scales)
        d2, m2 = d * sc, dmin * m
        for l in range(32):
            y.append(d1 * (q[qo + l] & 0xF) - m1)
        for l in range(32):
            y.append(d2 * (q[qo + l] >> 4) - m2)
        qo += 32
        is_ += 2
    return y


def q5_k(b):
    d, dmin = f16(b, 0), f16(b, 2)
    scales = b[4:16]
    qh = b[16:48]
    ql = b[48:176]
    y = []
    qo = 0
    is_ = 0
    u1, u2 = 1, 2
    for _ in range(0, QK_K, 64):
        sc, m = get_scale_min_k4(is_ + 0, scales)
        d1, m1 = d * sc, dmin * m
        sc, m = get_scale_min_k4(is_ + 1, scales)
        d2, m2 = d * sc, dmin * m
        for l in range(32):
            y.append(d1 * ((ql[qo + l] & 0xF) + (16 if qh[l] & u1 else 0)) - m1)
        for l in range(32):
            y.append(d2 * ((ql[qo + l] >> 4) + (16 if qh[l] & u2 else 0)) - m2)
        qo += 32
        is_ += 2
        u1 <<= 2
        u2 <<= 2
    return y


def q6_k(b):
    ql = b[0:128]
    qh = b[128:192]
    sc = [struct.unpack_from("<b", b, 192 + i)[0] for i in range(16)]
    d = f16(b, 208)
    y = [0.0] * QK_K
    yo = qlo = qho = sco = 0
    for _ in range(0, QK_K, 128):
        for l in range(32):
            is_ = l // 16
            q1 = ((ql[qlo + l + 0] & 0xF) | (((qh[qho + l] >> 0) & 3) << 4)) - 32
            q2 = ((ql[qlo + l + 32] & 0xF) | (((qh[qho + l] >> 2) & 3) << 4)) - 32
            q3 = ((ql[qlo + l + 0] >> 4) | (((qh[qho + l] >> 4) & 3) << 4)) - 32
            q4 = ((ql[qlo + l + 32] >> 4) | (((qh[qho + l] >> 6) & 3) << 4)) - 32
            y[yo + l + 0] = d * sc[sco + is_ + 0] * q1
            y[yo + l + 32] = d * sc[sco + is_ + 2] * q2
            y[yo + l + 64] = d * sc[sco + is_ + 4] * q3
            y[yo + l + 96] = d * sc[sco + is_ + 6] * q4
        yo += 128
        qlo += 64
        qho += 32
        sco += 8
    return y


# ggml-quants.c's kvalues_iq4nl: the non-linear 4-bit codebook of IQ4_NL and IQ4_XS.
KVALUES_IQ4NL = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def iq4_nl(b):
    # block_iq4_nl: ggml_half d; uint8_t qs[16]
    d = f16(b, 0)
    qs = b[2:18]
    y = [0.0] * 32
    for j in range(16):
        y[j + 0] = d * KVALUES_IQ4NL[qs[j] & 0xF]
        y[j + 16] = d * KVALUES_IQ4NL[qs[j] >> 4]
    return y


def iq4_xs(b):
    # block_iq4_xs: ggml_half d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]
    d = f16(b, 0)
    scales_h = struct.unpack_from("<H", b, 2)[0]
    scales_l = b[4:8]
    qs = b[8:136]
    y = [0.0] * QK_K
    yo = qo = 0
    for ib in range(QK_K // 32):
        ls = ((scales_l[ib // 2] >> 4 * (ib % 2)) & 0xF) | (((scales_h >> 2 * ib) & 3) << 4)
        dl = d * (ls - 32)
        for j in range(16):
            y[yo + j + 0] = dl * KVALUES_IQ4NL[qs[qo + j] & 0xF]
            y[yo + j + 16] = dl * KVALUES_IQ4NL[qs[qo + j] >> 4]
        yo += 32
        qo += 16
    return y


DEQUANT = {
    2: q4_0,
    3: q4_1,
    6: lambda b: q5(b, False),
    7: lambda b: q5(b, True),
    8: q8_0,
    10: q2_k,
    11: q3_k,
    12: q4_k,
    13: q5_k,
    14: q6_k,
    20: iq4_nl,
    23: iq4_xs,
}


def main():
    req = json.load(sys.stdin)
    f = DEQUANT[req["type"]]
    json.dump([f(bytes.fromhex(h)) for h in req["blocks"]], sys.stdout)


if __name__ == "__main__":
    main()
