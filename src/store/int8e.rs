//! The error-targeted predictive int8 codec with escapes (`int8e`): int8p's inter-layer prediction, one
//! quantisation step per (block, layer, stream) set by an error target ε, and no range limit (codes that do not fit
//! in int8 are escaped to a side stream), so that every layer's relative error is about ε, outlier rows included.
//!
//! Per block, stream (inputs x, targets y) and layer `l`, the step is `Δ_l = √(12 · ε · E_l)`
//! ([`super::codec::target_steps`]; `E_l` the block's mean square of that layer), stored as f32. Every value `v`
//! is put on that grid, `c = round(v / Δ_l)`, and coded relative to the prediction `p` of [`super::predict`]
//! (the same closed-loop least-squares coefficients, bf16, same layout): the stored code is `c − rint(p / Δ_l)`
//! as i8 when it lies in [−127, 127]; otherwise it is the escape byte −128 (0x80) and `c` itself goes, as i32, to
//! the block's escape stream, in token, layer, dimension order. The decoder computes `x̂ = (code + rint(p / Δ)) · Δ`
//! or, for an escape, `x̂ = c · Δ`: the error is at most half a step for every value, whatever its range.
//!
//! Unlike int8 and int8p there is no per-row scale: with one step for all values whose errors are counted together
//! an entropy coder spends the fewest bits for a given error (high-rate theory), and the rows that carry
//! outlier dimensions no longer force a coarse step on the rest of their row (they cost an escape each instead).
//! The error target is required; the writer uses [`DEFAULT_EPS`] when none is given.
//!
//! **What is subtle.** As for int8p, decoding is bit-exact with the encoder's reconstruction (the encoder predicts
//! from decoded rows through the same [`super::predict::pred_code`] and f32 operations, with `1 / Δ` computed
//! from the stored f32 step). Escapes make the block's length variable: the escape stream is the block's tail, after
//! a fixed-size side area whose per-token escape index lets a reader start at any token. [`validate`] checks the
//! index against the codes when a block is read, so decoding can trust it (and still never panics without it).
//!
//! Block layout (`docs/shard-format.md`): x codes (`n·L·d` i8, layer-major: all tokens' rows of layer 0, then of
//! layer 1, …), y codes (the same), the id columns, then the side area:
//! coefficients (as int8p), steps f32 `[x: L][y: L]`, escape index u32 `[x: n + 1][y: n + 1]` (entry `t` is the
//! number of the stream's escapes before token `t`), and then the tail, i32 escapes, x's then y's.

use super::predict::{bf16_at, closed_loop, coef_bytes, pred_code, pred1, predict_y_row};

/// The error target used when the writer is given none: on SmolLM2-135M about 1.02× the size of CLT-Forge's
/// scheme with 11× (inputs) and 46× (targets) lower error overall (`docs/perf-store.md`).
pub const DEFAULT_EPS: f64 = 7e-4;

/// The escape byte: the value's grid code is in the escape stream.
const ESC: u8 = 0x80;

/// Bytes of an int8e block's side area (coefficients, steps, escape index) for `n` tokens, or `None` on overflow.
pub fn side_bytes(layers: usize, d: usize, n: usize) -> Option<usize> {
    coef_bytes(layers, d)?
        .checked_add(layers.checked_mul(8)?)?
        .checked_add(n.checked_add(1)?.checked_mul(8)?)
}

/// Where the codes of (layer `l`, token `t`) start, in rows, in a stream of a block of `n` tokens: layer-major, so
/// that zstd's entropy coder sees each layer's codes (and their statistics) together, which made blocks ~2%
/// smaller on SmolLM2 than the token-major order of the other codecs.
#[inline(always)]
fn row_at(l: usize, t: usize, n: usize) -> usize {
    l * n + t
}

/// The parts of a side area.
struct Side<'a> {
    coef: &'a [u8],
    steps: &'a [u8],
    index: &'a [u8],
}

fn split(side: &[u8], layers: usize, d: usize) -> Side<'_> {
    let (coef, rest) = side.split_at(coef_bytes(layers, d).unwrap());
    let (steps, index) = rest.split_at(8 * layers);
    Side { coef, steps, index }
}

#[inline(always)]
fn u32_at(b: &[u8], i: usize) -> usize {
    u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as usize
}

#[inline(always)]
fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap())
}

/// Escape `k` of the tail (0 past its end: [`validate`] rules that out for blocks read through the reader).
#[inline(always)]
fn esc_at(tail: &[u8], k: usize) -> f32 {
    tail.get(4 * k..4 * k + 4)
        .map_or(0, |b| i32::from_le_bytes(b.try_into().unwrap())) as f32
}

/// Quantises one row on the grid of step `s` relative to the prediction `pred` (None: 0), writing its codes, its
/// reconstruction and its escapes (`(index in the stream, grid code)`, `base` the row's first index).
fn code_row(
    v: &[f32],
    pred: Option<&[f32]>,
    s: f32,
    base: usize,
    codes: &mut [u8],
    dec: &mut [f32],
    esc: &mut Vec<(usize, i32)>,
) {
    let inv = 1.0 / s;
    for (j, ((&a, c), o)) in v
        .iter()
        .zip(codes.iter_mut())
        .zip(dec.iter_mut())
        .enumerate()
    {
        let pc = pred.map_or(0.0, |p| pred_code(p[j], inv));
        // A zero step (a layer of zeros) codes 0 everywhere; the reconstruction is then ±0 like the decoder's.
        let c0 = if s > 0.0 { (a * inv).round() } else { pc };
        let r = c0 as f64 - pc as f64;
        if r.abs() <= 127.0 {
            *c = r as i8 as u8;
            *o = ((r as i8) as f32 + pc) * s;
        } else {
            let e = c0 as i32; // saturating; only reachable for absurdly small ε
            *c = ESC;
            esc.push((base + j, e));
            *o = e as f32 * s;
        }
    }
}

/// Encodes a block's inputs `x` and targets `y` (`n × L × d` values each, token-major, finite) under int8e with
/// error target `eps`: appends the x codes then the y codes to `codes`, the side area to `side` and the escapes to
/// `tail`. Returns the encoder's reconstruction of `x` and `y`, which decoding reproduces bit for bit.
pub fn encode(
    x: &[f32],
    y: &[f32],
    layers: usize,
    d: usize,
    eps: f64,
    codes: &mut Vec<u8>,
    side: &mut Vec<u8>,
    tail: &mut Vec<u8>,
) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / d;
    let n = rows / layers;
    let steps = [
        super::codec::target_steps(x, layers, d, eps),
        super::codec::target_steps(y, layers, d, eps),
    ];
    let mut c = [vec![0u8; x.len()], vec![0u8; y.len()]];
    let mut esc: [Vec<(usize, i32)>; 2] = [Vec::new(), Vec::new()];
    let mut rec = [vec![0f32; x.len()], vec![0f32; y.len()]];
    closed_loop(x, y, layers, d, side, |k, r, v, p, dec| {
        let (o, l) = (r * d, r % layers);
        // Codes are stored layer-major (each layer's rows together); escapes are indexed in token order.
        let co = row_at(l, r / layers, n) * d;
        code_row(
            v,
            p,
            steps[k][l],
            o,
            &mut c[k][co..co + d],
            dec,
            &mut esc[k],
        );
        rec[k][o..o + d].copy_from_slice(dec);
    });
    for s in steps.iter().flatten() {
        side.extend_from_slice(&s.to_le_bytes());
    }
    // Escapes were found layer by layer; the stream is in token order (index = (t·L + l)·d + j).
    for e in &mut esc {
        e.sort_unstable_by_key(|&(i, _)| i);
    }
    let td = layers * d;
    for e in &esc {
        let mut k = 0;
        for t in 0..=n {
            while k < e.len() && e[k].0 < t * td {
                k += 1;
            }
            side.extend_from_slice(&(k as u32).to_le_bytes());
        }
    }
    for (_, v) in esc.iter().flatten() {
        tail.extend_from_slice(&v.to_le_bytes());
    }
    codes.extend_from_slice(&c[0]);
    codes.extend_from_slice(&c[1]);
    let [rx, ry] = rec;
    (rx, ry)
}

/// Checks what decoding indexes by: steps finite and ≥ 0, each stream's escape index starting at 0, never
/// decreasing, matching the escape bytes of every token, and the two streams together exactly filling the tail
/// (`tail.len()` a multiple of 4, which [`super::format::parse`] checks).
pub fn validate(
    xcodes: &[u8],
    ycodes: &[u8],
    side: &[u8],
    tail: &[u8],
    layers: usize,
    d: usize,
    n: usize,
) -> Result<(), String> {
    let sd = split(side, layers, d);
    for i in 0..2 * layers {
        let s = f32_at(sd.steps, i);
        if !(s.is_finite() && s >= 0.0) {
            return Err(format!("int8e step {i} is {s}"));
        }
    }
    let mut total = 0;
    let mut found = vec![0usize; n];
    for (k, codes) in [xcodes, ycodes].into_iter().enumerate() {
        let at = |t: usize| u32_at(sd.index, k * (n + 1) + t);
        if at(0) != 0 {
            return Err(format!(
                "int8e escape index of stream {k} starts at {}",
                at(0)
            ));
        }
        found.fill(0);
        escapes_per_token(codes, d, n, &mut found);
        for (t, &want) in found.iter().enumerate() {
            if at(t + 1).checked_sub(at(t)) != Some(want) {
                return Err(format!(
                    "int8e stream {k}, token {t}: escape index says {} .. {}, codes hold {want} escapes",
                    at(t),
                    at(t + 1)
                ));
            }
        }
        total += at(n);
    }
    if total * 4 != tail.len() {
        return Err(format!(
            "int8e: {total} escapes indexed, the tail holds {} bytes",
            tail.len()
        ));
    }
    Ok(())
}

/// Adds to `found[t]` the escape bytes of token `t`'s rows in a stream's codes (layer-major, `n` tokens of rows of
/// `d`), in one sequential pass; rows without an escape (nearly all) cost one vectorised OR over the row.
#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
fn escapes_per_token(codes: &[u8], d: usize, n: usize, found: &mut [usize]) {
    for (i, q) in codes.chunks_exact(d).enumerate() {
        if has_escape(q) {
            found[i % n] += q.iter().filter(|&&c| c == ESC).count();
        }
    }
}

/// Whether a row of codes holds an escape byte (an OR over the row, which vectorises).
#[inline(always)]
fn has_escape(q: &[u8]) -> bool {
    q.iter().fold(0u8, |a, &c| a | (c == ESC) as u8) != 0
}

/// Overwrites the escaped values of one row (codes `q`, step `s`) with the tail's grid codes from escape `*k` on.
#[inline(always)]
fn patch(q: &[u8], s: f32, tail: &[u8], k: &mut usize, out: &mut [f32]) {
    // Most rows have no escape: an OR over the row (it vectorises) skips them; the per-byte loop with its branch
    // and store does not vectorise and cost ~30% of the decode on SmolLM2 when run on every row.
    if !has_escape(q) {
        return;
    }
    for (o, &c) in out.iter_mut().zip(q) {
        if c == ESC {
            *o = esc_at(tail, *k) * s;
            *k += 1;
        }
    }
}

/// Decodes the inputs of tokens `t0 .. t0 + out.len() / (L·d)` from a block's x codes, side area and tail into
/// `out` (`[T][L][d]`). Lengths are the reader's; rows out of range panic.
#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
pub fn decode_x(
    codes: &[u8],
    side: &[u8],
    tail: &[u8],
    layers: usize,
    d: usize,
    t0: usize,
    out: &mut [f32],
) {
    let sd = split(side, layers, d);
    let n = codes.len() / (layers * d);
    for (i, tok) in out.chunks_exact_mut(layers * d).enumerate() {
        let t = t0 + i;
        let (mut k, k1) = (u32_at(sd.index, t), u32_at(sd.index, t + 1));
        for l in 0..layers {
            let s = f32_at(sd.steps, l);
            let q = &codes[row_at(l, t, n) * d..][..d];
            let (prev, cur) = tok.split_at_mut(l * d);
            let cur = &mut cur[..d];
            if l == 0 {
                for (o, &c) in cur.iter_mut().zip(q) {
                    *o = ((c as i8) as f32 + 0.0) * s;
                }
            } else {
                let prev = &prev[(l - 1) * d..];
                let a = &sd.coef[2 * (l - 1) * d..][..2 * d];
                let inv = 1.0 / s;
                for (((o, &p), &c), a) in cur.iter_mut().zip(prev).zip(q).zip(a.chunks_exact(2)) {
                    *o = ((c as i8) as f32 + pred_code(pred1(bf16_at(a), p), inv)) * s;
                }
            }
            if k < k1 {
                patch(q, s, tail, &mut k, cur);
            }
        }
    }
}

/// Decodes the targets of tokens `t0 ..` of a block of `n` tokens like [`decode_x`], given `xhat`, the decoded
/// inputs of the same tokens.
#[allow(clippy::too_many_arguments)]
#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
pub fn decode_y(
    codes: &[u8],
    side: &[u8],
    tail: &[u8],
    layers: usize,
    d: usize,
    n: usize,
    t0: usize,
    xhat: &[f32],
    out: &mut [f32],
) {
    let sd = split(side, layers, d);
    let (cb, cc) = sd.coef[2 * (layers - 1) * d..].split_at(2 * (layers - 1) * d);
    // The y escapes follow the x escapes in the tail.
    let tail = &tail[(4 * u32_at(sd.index, n)).min(tail.len())..];
    let td = layers * d;
    for (i, (tok, xt)) in out
        .chunks_exact_mut(td)
        .zip(xhat.chunks_exact(td))
        .enumerate()
    {
        let t = t0 + i;
        let (mut k, k1) = (u32_at(sd.index, n + 1 + t), u32_at(sd.index, n + 2 + t));
        for (l, cur) in tok.chunks_exact_mut(d).enumerate() {
            let s = f32_at(sd.steps, layers + l);
            let inv = 1.0 / s;
            let q = &codes[row_at(l, t, n) * d..][..d];
            predict_y_row(cur, q, xt, cb, cc, l, layers, |qj, p| {
                ((qj as i8) as f32 + pred_code(p, inv)) * s
            });
            if k < k1 {
                patch(q, s, tail, &mut k, cur);
            }
        }
    }
}
