//! The GGML block formats that GGUF tensors are stored in, and their dequantisation to f32 as ggml's
//! reference `dequantize_row_*` functions (ggml-quants.c) define it: F32, F16 and BF16; the 32-element
//! blocks Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0; and the 256-element k-quant super-blocks Q2_K, Q3_K, Q4_K, Q5_K
//! and Q6_K (what llama.cpp's `Q2_K` to `Q6_K` files, `_S`/`_M`/`_L` alike, hold); and the non-linear 4-bit
//! IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks with 6-bit sub-block scales). Every other
//! type (the lattice `IQ1`–`IQ3` formats among them) is refused by the reader.
//!
//! `tests/ggml_reference.py` transcribes ggml's C line for line; a unit test compares the two on random
//! blocks.

use half::{bf16, f16};
use rayon::prelude::*;

/// The types [`block_layout`] accepts, for error messages.
pub const SUPPORTED: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS";

/// ggml's `kvalues_iq4nl`: the codebook a 4-bit IQ4_NL / IQ4_XS quant indexes.
const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Elements of a k-quant super-block.
const QK_K: usize = 256;

/// (elements per block, bytes per block) of a supported GGML type id.
pub fn block_layout(t: u32) -> Option<(u64, u64)> {
    match t {
        0 => Some((1, 4)),      // F32
        1 | 30 => Some((1, 2)), // F16, BF16
        2 => Some((32, 18)),    // Q4_0: f16 d, 16 bytes of nibbles
        3 => Some((32, 20)),    // Q4_1: f16 d, f16 m, 16 bytes of nibbles
        6 => Some((32, 22)),    // Q5_0: f16 d, 32 high bits, 16 bytes of nibbles
        7 => Some((32, 24)),    // Q5_1: f16 d, f16 m, 32 high bits, 16 bytes of nibbles
        8 => Some((32, 34)),    // Q8_0: f16 d, 32 × i8
        10 => Some((256, 84)), // Q2_K: 16 bytes of 4-bit scales and mins, 64 of 2-bit quants, f16 d, dmin
        11 => Some((256, 110)), // Q3_K: 32 bytes of high bits, 64 of 2-bit quants, 12 of 6-bit scales, f16 d
        12 => Some((256, 144)), // Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles
        13 => Some((256, 176)), // Q5_K: as Q4_K, with 32 bytes of high bits before the nibbles
        14 => Some((256, 210)), // Q6_K: 128 bytes of low nibbles, 64 of high pairs, 16 i8 scales, f16 d
        20 => Some((32, 18)),   // IQ4_NL: f16 d, 16 bytes of codebook nibbles
        23 => Some((256, 136)), // IQ4_XS: f16 d, u16 high scale bits, 4 bytes of low scale nibbles, 128 of nibbles
        _ => None,
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantises a whole tensor of type `t` (`raw`: its bytes) into `out` (its elements), in parallel: the
/// element types (F32, F16, BF16) in runs of 4,096 elements, the block types a block at a time. `t` must be
/// one [`block_layout`] accepts, and the lengths must agree with it.
pub fn dequantize(t: u32, raw: &[u8], out: &mut [f32]) {
    let (block, bytes) = block_layout(t).expect("a type block_layout accepts");
    let (block, bytes) = (block as usize, bytes as usize);
    let per_task = if block == 1 { 4096 } else { 1 };
    out.par_chunks_mut(block * per_task)
        .zip(raw.par_chunks(bytes * per_task))
        .for_each(|(o, b)| {
            for (o, b) in o.chunks_mut(block).zip(b.chunks(bytes)) {
                dequantize_block(t, b, o);
            }
        });
}

/// Dequantises one block of type `t` (`b`: exactly its bytes) into `out` (exactly its elements).
/// `t` must be one [`block_layout`] accepts.
pub fn dequantize_block(t: u32, b: &[u8], out: &mut [f32]) {
    match t {
        0 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        1 => out[0] = half_at(b, 0),
        30 => out[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        2 => {
            let d = half_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                out[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        3 => {
            let (d, m) = (half_at(b, 0), half_at(b, 2));
            for (j, &q) in b[4..20].iter().enumerate() {
                out[j] = (q & 0x0F) as f32 * d + m;
                out[j + 16] = (q >> 4) as f32 * d + m;
            }
        }
        6 | 7 => {
            // Q5_0 (centred on 16) and Q5_1 (with a minimum): the fifth bit of element j is bit j of qh.
            let q5_1 = t == 7;
            let d = half_at(b, 0);
            let (m, at) = if q5_1 { (half_at(b, 2), 4) } else { (0.0, 2) };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            for (j, &q) in b[at + 4..at + 20].iter().enumerate() {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                let (x0, x1) = ((q as u32 & 0x0F) | h0, (q as u32 >> 4) | h1);
                if q5_1 {
                    out[j] = x0 as f32 * d + m;
                    out[j + 16] = x1 as f32 * d + m;
                } else {
                    out[j] = (x0 as i32 - 16) as f32 * d;
                    out[j + 16] = (x1 as i32 - 16) as f32 * d;
                }
            }
        }
        8 => {
            let d = half_at(b, 0);
            for (v, &q) in out.iter_mut().zip(&b[2..34]) {
                *v = d * (q as i8) as f32;
            }
        }
        10 => q2_k(b, out),
        11 => q3_k(b, out),
        12 | 13 => k_quant_4_5(t == 13, b, out),
        14 => q6_k(b, out),
        20 => iq4_nibbles(half_at(b, 0), &b[2..18], out),
        23 => {
            let d = half_at(b, 0);
            let scales_h = u16::from_le_bytes([b[2], b[3]]);
            for (ib, (o, qs)) in out
                .chunks_exact_mut(32)
                .zip(b[8..136].chunks_exact(16))
                .enumerate()
            {
                let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0x0F;
                let ls = low as i32 | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
                iq4_nibbles(d * (ls - 32) as f32, qs, o);
            }
        }
        _ => unreachable!("block_layout accepts only the types handled here"),
    }
}

/// 32 elements from 16 bytes of codebook indices (low nibbles first, as Q4_0), scaled by `d`.
fn iq4_nibbles(d: f32, qs: &[u8], out: &mut [f32]) {
    for (j, &q) in qs.iter().enumerate() {
        out[j] = d * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32;
        out[j + 16] = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
    }
}

/// Q2_K: 16 sub-blocks of 16 elements, each `d · scale · q − dmin · min` with 2-bit `q` and a 4-bit scale
/// and minimum per sub-block.
fn q2_k(b: &[u8], out: &mut [f32]) {
    let (scales, q) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
    for (half, y) in out.chunks_exact_mut(128).enumerate() {
        let q = &q[32 * half..32 * half + 32];
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let shift = 2 * j;
            for (part, y) in y.chunks_exact_mut(16).enumerate() {
                let sc = scales[8 * half + 2 * j + part];
                let (dl, ml) = (d * (sc & 0x0F) as f32, dmin * (sc >> 4) as f32);
                for (l, v) in y.iter_mut().enumerate() {
                    *v = dl * ((q[16 * part + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// Q3_K: 16 sub-blocks of 16 elements, each `d · (scale − 32) · q` with 3-bit signed `q` (2 low bits in
/// `qs`, the third in `hmask`, set meaning "not minus 4") and 6-bit scales (4 low bits in the first 8
/// bytes, 2 high in the last 4).
fn q3_k(b: &[u8], out: &mut [f32]) {
    let (hmask, q, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half_at(b, 108);
    let scale = |j: usize| {
        let low = if j < 8 {
            packed[j] & 0x0F
        } else {
            packed[j - 8] >> 4
        };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i32 - 32
    };
    for (half, y) in out.chunks_exact_mut(128).enumerate() {
        let q = &q[32 * half..32 * half + 32];
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let (shift, m) = (2 * j, 1u8 << (4 * half + j));
            for (part, y) in y.chunks_exact_mut(16).enumerate() {
                let dl = d * scale(8 * half + 2 * j + part) as f32;
                for (l, v) in y.iter_mut().enumerate() {
                    let i = 16 * part + l;
                    let lo = ((q[i] >> shift) & 3) as i32;
                    let minus = if hmask[i] & m != 0 { 0 } else { 4 };
                    *v = dl * (lo - minus) as f32;
                }
            }
        }
    }
}

/// Scale and minimum `j` (of 8) of a Q4_K/Q5_K super-block: 6 bits each, packed in 12 bytes
/// (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K, or Q5_K with `high`: 8 sub-blocks of 32 elements, each `d · scale · q − dmin · min`.
fn k_quant_4_5(high: bool, b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let (qh, qs) = if high {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    for (chunk, j) in (0..QK_K).step_by(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * chunk..32 * chunk + 32];
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        for l in 0..32 {
            let (mut lo, mut hi) = ((q[l] & 0x0F) as u32, (q[l] >> 4) as u32);
            if high {
                lo += if qh[l] & u1 != 0 { 16 } else { 0 };
                hi += if qh[l] & u2 != 0 { 16 } else { 0 };
            }
            out[j + l] = d1 * lo as f32 - m1;
            out[j + 32 + l] = d2 * hi as f32 - m2;
        }
    }
}

/// Q6_K: 16 sub-blocks of 16 elements, each `d · scale · (q − 32)` with 6-bit `q` (4 low bits in `ql`, 2
/// high in `qh`).
fn q6_k(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = |i: usize| b[192 + 8 * half + i] as i8 as f32;
        let y = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc(is) * q1 as f32;
            y[l + 32] = d * sc(is + 2) * q2 as f32;
            y[l + 64] = d * sc(is + 4) * q3 as f32;
            y[l + 96] = d * sc(is + 6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block type against `tests/ggml_reference.py` (a line-for-line transcription of ggml's
    /// `dequantize_row_*`, in float64) on 40 random blocks each, their f16 scales drawn finite.
    #[test]
    fn blocks_dequantise_as_ggml_does() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ggml_reference.py");
        let mut seed = 0x243f6a8885a308d3u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for t in [2u32, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23] {
            let (n, bytes) = block_layout(t).unwrap();
            let (n, bytes) = (n as usize, bytes as usize);
            let mut blocks = Vec::new();
            for _ in 0..40 {
                let mut b: Vec<u8> = (0..bytes).map(|_| next() as u8).collect();
                // The f16 fields: d (and m or dmin) at the start, Q6_K's d at the end.
                let halves: &[usize] = match t {
                    2 | 6 | 8 | 20 | 23 => &[0],
                    10 => &[80, 82],
                    11 => &[108],
                    14 => &[208],
                    _ => &[0, 2],
                };
                for &at in halves {
                    let v = ((next() % 20001) as f32 / 10000.0 - 1.0) * 0.05;
                    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
                blocks.push(b);
            }
            let input = serde_json::json!({
                "type": t,
                "blocks": blocks.iter().map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<String>()).collect::<Vec<_>>(),
            });
            let mut child = std::process::Command::new("python3")
                .arg(script)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("python3 runs the ggml reference (tests/ggml_reference.py)");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.to_string().as_bytes())
                .unwrap();
            let o = child.wait_with_output().unwrap();
            assert!(o.status.success(), "ggml_reference.py failed for type {t}");
            let want: Vec<Vec<f64>> = serde_json::from_slice(&o.stdout).unwrap();
            for (b, w) in blocks.iter().zip(&want) {
                let mut got = vec![f32::NAN; n];
                dequantize_block(t, b, &mut got);
                assert_eq!(w.len(), n);
                for (i, (g, w)) in got.iter().zip(w).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()),
                        "type {t} element {i}: {g} vs ggml {w}"
                    );
                }
            }
        }
    }
}
