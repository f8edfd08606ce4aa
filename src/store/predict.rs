//! The predictive int8 codec (`int8p`): each row is coded relative to a prediction from rows of the same token
//! that the decoder already has, at (about) plain int8's step, so the error is int8's and the codes are smaller.
//!
//! The residual stream makes a transformer's activations strongly correlated from layer to layer (measured in
//! `docs/perf-store.md`: about 1 bit per value). Per block, and per (layer, dimension) `j`, with `x̂` the decoded
//! inputs:
//! - input `x_l[j]` is predicted by `a_l[j] · x̂_(l−1)[j]` (layer 0 has nothing to predict from);
//! - target `y_l[j]` by `b_l[j] · x̂_(l+1)[j] + c_l[j] · x̂_l[j]` (the last layer: `c_l[j] · x̂_l[j]`), because
//!   `x_(l+1)` is the normalised residual stream that `y_l` was added to.
//!
//! The coefficients are least-squares fits over the block's tokens (in f64), stored as bf16 (decoding them is a
//! shift). A predicted row is quantised on a grid of step `|scale|` = int8's step (`max|row| / 127`) times
//! `√(1 − 1/d)` (int8 codes each row's largest value exactly; this finer step gives the same expected error), and
//! each code stored is the value's grid code minus the prediction's grid code, modulo 256 (so it never
//! overflows: `x̂ = wrap8(code + round(p / step)) · step`, the error is at most half a step whatever the
//! prediction). A row is predicted when that makes its codes cheaper (smaller Σ|code|) than the plain row's; its
//! scale is stored negated (the sign bit marks it). Other rows (zero rows, rows the prediction does not help,
//! every row when `d = 1`) are stored exactly as int8 would. With an error target ε
//! ([`super::writer::WriterConfig::target_rel_err`]) neither step is finer than the layer's
//! [`super::codec::target_steps`], so the error is about ε per layer instead of int8's where rows' ranges allow.
//!
//! **What is subtle.** The prediction is closed-loop: the encoder predicts from the *decoded* previous rows, with
//! the bf16-rounded coefficients, through the same [`pred1`]/[`pred2`] and [`pred_code`] as the decoder, so
//! decoding reproduces the encoder's reconstruction bit for bit and errors do not accumulate across layers. (Rust
//! never contracts `a * b + c` into a fused multiply-add, so the f32 results are the same on every target.)
//! Decoding a target row needs the decoded inputs of its token: [`decode_y`] takes them.
//!
//! Block layout (`docs/shard-format.md`): the x and y sections have int8's layout (`R` f32 scales, then `R·d`
//! codes), and the block ends, after the token ids, with the coefficients, bf16 `[a_1..a_(L−1)] [b_0..b_(L−2)]
//! [c_0..c_(L−1)]`, each `d` long: `(3L − 2)·d` values.

/// Largest coefficient magnitude stored (a fit beyond it, from near-zero regressors, is clamped; rows that the
/// clamped prediction does not fit fall back to plain int8).
const COEF_MAX: f64 = 65504.0;

/// Bytes of an int8p block's coefficient area for `layers` layers of `d` values.
pub fn coef_bytes(layers: usize, d: usize) -> Option<usize> {
    layers
        .checked_mul(3)?
        .checked_sub(2)?
        .checked_mul(d)?
        .checked_mul(2)
}

/// The prediction of one value from one decoded regressor (input rows).
#[inline(always)]
pub fn pred1(a: f32, xa: f32) -> f32 {
    a * xa
}

/// The prediction of one value from two decoded regressors (target rows).
#[inline(always)]
pub fn pred2(b: f32, xa: f32, c: f32, xb: f32) -> f32 {
    b * xa + c * xb
}

#[inline(always)]
pub(crate) fn bf16_at(c: &[u8]) -> f32 {
    f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)
}

fn to_bf16(a: f64) -> half::bf16 {
    let a = if a.is_finite() {
        a.clamp(-COEF_MAX, COEF_MAX)
    } else {
        0.0
    };
    half::bf16::from_f64(a)
}

/// Least squares `y ≈ b·xa + c·xb` from the sums of products; near-collinear regressors (or a single token) fall
/// back to the better of the two alone, and a regressor that is all zero gets coefficient 0.
fn fit2(saa: f64, sab: f64, sbb: f64, say: f64, sby: f64) -> (f64, f64) {
    let det = saa * sbb - sab * sab;
    if saa > 0.0 && sbb > 0.0 && det > 1e-9 * saa * sbb {
        return ((say * sbb - sby * sab) / det, (sby * saa - say * sab) / det);
    }
    let ga = if saa > 0.0 { say * say / saa } else { 0.0 };
    let gb = if sbb > 0.0 { sby * sby / sbb } else { 0.0 };
    if ga >= gb && saa > 0.0 {
        (say / saa, 0.0)
    } else if sbb > 0.0 {
        (0.0, sby / sbb)
    } else {
        (0.0, 0.0)
    }
}

/// Codes one row `v` given its prediction `pred` (None: nothing to predict from). Writes the codes and the decoded
/// values (exactly as the decoder will compute them) and returns the stored scale (negative: predicted row).
/// `floor` is the error-targeted step ([`super::codec::target_steps`]; 0: none): neither step is finer.
fn code_row(v: &[f32], pred: Option<&[f32]>, floor: f32, codes: &mut [u8], dec: &mut [f32]) -> f32 {
    let amax = v.iter().fold(0f32, |m, a| m.max(a.abs()));
    let s = (amax / 127.0).max(floor);
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    let d = v.len();
    if let Some(p) = pred
        && s > 0.0
        && d > 1
    {
        // With a floor, `s` may exceed int8's step; then the grid codes are smaller still.
        let sp = (amax / 127.0 * step_factor(d)).max(floor);
        let inv_p = 1.0 / sp;
        let (mut cost_p, mut cost_0) = (0u32, 0u32);
        for (&a, &b) in v.iter().zip(p) {
            // |a| · inv_p ≤ 127.49, so the grid code is in [−127, 127].
            let c0 = (a * inv_p).round() as i32;
            cost_p += ((c0 - pred_code(b, inv_p) as i32) as i8).unsigned_abs() as u32;
            cost_0 += (a * inv).round().abs() as u32;
        }
        if cost_p < cost_0 {
            for (((&a, &b), c), o) in v.iter().zip(p).zip(codes.iter_mut()).zip(dec.iter_mut()) {
                let c0 = (a * inv_p).round() as i32;
                *c = (c0 - pred_code(b, inv_p) as i32) as i8 as u8;
                *o = c0 as f32 * sp;
            }
            return -sp;
        }
    }
    for ((&a, c), o) in v.iter().zip(codes.iter_mut()).zip(dec.iter_mut()) {
        let q = (a * inv).round().clamp(-127.0, 127.0) as i8;
        *c = q as u8;
        *o = q as f32 * s;
    }
    s
}

/// A predicted row's step relative to int8's (`d > 1`). int8 codes each row's largest value exactly (code
/// ±127), so its mean squared error is (1 − 1/d) of a uniform quantiser's step²/12; a predicted row has no such
/// value, so its step is int8's times √(1 − 1/d), which gives the same expected error. It is kept ≥ 127/127.49
/// so that every value's code on the step's grid stays in [−127, 127] (this matters for d < 130 only).
fn step_factor(d: usize) -> f32 {
    ((d - 1) as f32 / d as f32).sqrt().max(127.0 / 127.49)
}

/// Rounds half to even with the 1.5·2²³ trick (exact for |x| ≤ 2²²; plain f32 adds, so it vectorises).
#[inline(always)]
fn rint(x: f32) -> f32 {
    const M: f32 = 12_582_912.0;
    (x + M) - M
}

/// The prediction `p` as a code on the grid of step `1 / inv`, an integer-valued f32: `p · inv` clamped to ±2²²
/// (a NaN becomes −2²²: `f32::max` returns the other operand), rounded half to even. Encoder and decoder share it.
// Not `clamp`: it would keep a NaN, and the decoder must map every prediction (even from a crafted file) the
// same way as the encoder.
#[allow(clippy::manual_clamp)]
#[inline(always)]
pub fn pred_code(p: f32, inv: f32) -> f32 {
    const LIM: f32 = 4_194_304.0;
    rint((p * inv).max(-LIM).min(LIM))
}

/// Decodes target row `l` of a token (`cur`, codes `q`) from the token's decoded inputs `xt` (`[L][d]`) and the
/// block's target coefficients `cb` (next layer's input) and `cc` (same layer's): each value is
/// `value(code, prediction)`, the prediction from layers `l + 1` and `l` (`pred2`), or from `l` alone on the last
/// layer (`pred1`). The walk int8p's and int8e's decoders share; each passes its own per-value formula.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn predict_y_row(
    cur: &mut [f32],
    q: &[u8],
    xt: &[f32],
    cb: &[u8],
    cc: &[u8],
    l: usize,
    layers: usize,
    value: impl Fn(u8, f32) -> f32,
) {
    let d = cur.len();
    let xb = &xt[l * d..][..d];
    let c = &cc[2 * l * d..][..2 * d];
    if l + 1 < layers {
        let xa = &xt[(l + 1) * d..][..d];
        let b = &cb[2 * l * d..][..2 * d];
        let coefs = b.chunks_exact(2).zip(c.chunks_exact(2));
        let regs = xa.iter().zip(xb).zip(q);
        for (o, ((bj, cj), ((&va, &vb), &qj))) in cur.iter_mut().zip(coefs.zip(regs)) {
            *o = value(qj, pred2(bf16_at(bj), va, bf16_at(cj), vb));
        }
    } else {
        for (((o, &xv), &qj), c) in cur.iter_mut().zip(xb).zip(q).zip(c.chunks_exact(2)) {
            *o = value(qj, pred1(bf16_at(c), xv));
        }
    }
}

/// A predicted value: the code `q` is the difference, modulo 256, between the value's code on the grid (in
/// [−127, 127]) and the prediction's, so it never overflows; the value is its grid code times the step `s`. All in
/// f32 (integers below 2²³ are exact), so that it vectorises.
#[inline(always)]
fn unwrap(q: u8, p: f32, s: f32, inv: f32) -> f32 {
    let t = (q as i8) as f32 + pred_code(p, inv);
    (t - 256.0 * rint(t * (1.0 / 256.0))) * s
}

/// Encodes a block's inputs `x` and targets `y` (`n × L × d` values each, token-major, finite) under int8p:
/// appends the x section to `xsec`, the y section to `ysec` and the coefficient area to `coef`. With an error
/// target `ε`, no row's step is finer than its layer's [`super::codec::target_steps`] (per stream, over the block).
#[allow(clippy::too_many_arguments)]
pub fn encode(
    x: &[f32],
    y: &[f32],
    layers: usize,
    d: usize,
    target: Option<f64>,
    xsec: &mut Vec<u8>,
    ysec: &mut Vec<u8>,
    coef: &mut Vec<u8>,
) {
    let rows = x.len() / d;
    let floors = |v: &[f32]| match target {
        Some(eps) => super::codec::target_steps(v, layers, d, eps),
        None => vec![0.0; layers],
    };
    let f = [floors(x), floors(y)];
    let mut codes = [vec![0u8; x.len()], vec![0u8; y.len()]];
    let mut scales = [vec![0f32; rows], vec![0f32; rows]];
    closed_loop(x, y, layers, d, coef, |k, r, v, p, dec| {
        let o = r * d;
        scales[k][r] = code_row(v, p, f[k][r % layers], &mut codes[k][o..o + d], dec);
    });
    write_section(&scales[0], &codes[0], xsec);
    write_section(&scales[1], &codes[1], ysec);
}

/// The closed-loop prediction shared by int8p and int8e ([`super::int8e`]): fits the coefficients layer by layer
/// from the decoded rows, appends them to `coef` (bf16, the layout of the module doc), and calls
/// `code(stream, row, values, prediction, decoded)` for every row, stream 0 (inputs, layer by layer, each layer
/// for every token before the next layer's fit) then stream 1 (targets). `code` quantises the row and writes its
/// reconstruction, exactly as the decoder will compute it, into `decoded` (for targets, a scratch row).
pub(crate) fn closed_loop(
    x: &[f32],
    y: &[f32],
    layers: usize,
    d: usize,
    coef: &mut Vec<u8>,
    mut code: impl FnMut(usize, usize, &[f32], Option<&[f32]>, &mut [f32]),
) {
    let l_n = layers;
    let rows = x.len() / d;
    let n = rows / l_n;
    debug_assert_eq!((x.len(), y.len()), (n * l_n * d, n * l_n * d));
    let at = |t: usize, l: usize| (t * l_n + l) * d;
    let mut xhat = vec![0f32; x.len()];
    let mut pred = vec![0f32; d];
    let (mut ca, mut cb, mut cc) = (Vec::new(), Vec::new(), Vec::new());
    let (mut s_rr, mut s_ry) = (vec![0f64; d], vec![0f64; d]);
    // Inputs, layer by layer (each layer's fit needs the previous layer decoded for every token).
    for l in 0..l_n {
        let mut a = Vec::new();
        if l > 0 {
            s_rr.fill(0.0);
            s_ry.fill(0.0);
            for t in 0..n {
                let (r, v) = (&xhat[at(t, l - 1)..][..d], &x[at(t, l)..][..d]);
                for j in 0..d {
                    s_rr[j] += r[j] as f64 * r[j] as f64;
                    s_ry[j] += r[j] as f64 * v[j] as f64;
                }
            }
            a = (0..d)
                .map(|j| {
                    let q = to_bf16(if s_rr[j] > 0.0 {
                        s_ry[j] / s_rr[j]
                    } else {
                        0.0
                    });
                    ca.push(q);
                    q.to_f32()
                })
                .collect();
        }
        for t in 0..n {
            let o = at(t, l);
            let p = if l > 0 {
                let prev = &xhat[at(t, l - 1)..][..d];
                for j in 0..d {
                    pred[j] = pred1(a[j], prev[j]);
                }
                Some(&pred[..])
            } else {
                None
            };
            code(0, o / d, &x[o..o + d], p, &mut xhat[o..o + d]);
        }
    }
    // Targets: every layer from the decoded inputs, which are final now.
    let mut ydec = vec![0f32; d];
    let mut sums = vec![[0f64; 5]; d];
    for l in 0..l_n {
        let two = l + 1 < l_n;
        sums.fill([0.0; 5]);
        for t in 0..n {
            let xb = &xhat[at(t, l)..][..d];
            let v = &y[at(t, l)..][..d];
            let xa = if two { &xhat[at(t, l + 1)..][..d] } else { xb };
            for j in 0..d {
                let (ra, rb, yv) = (xa[j] as f64, xb[j] as f64, v[j] as f64);
                let s = &mut sums[j];
                s[0] += ra * ra;
                s[1] += ra * rb;
                s[2] += rb * rb;
                s[3] += ra * yv;
                s[4] += rb * yv;
            }
        }
        let mut bc = Vec::with_capacity(d);
        for s in &sums {
            let (b, c) = if two {
                fit2(s[0], s[1], s[2], s[3], s[4])
            } else {
                (0.0, if s[2] > 0.0 { s[4] / s[2] } else { 0.0 })
            };
            let (b, c) = (to_bf16(b), to_bf16(c));
            if two {
                cb.push(b);
            }
            cc.push(c);
            bc.push((b.to_f32(), c.to_f32()));
        }
        for t in 0..n {
            let o = at(t, l);
            let xb = &xhat[o..][..d];
            if two {
                let xa = &xhat[at(t, l + 1)..][..d];
                for j in 0..d {
                    pred[j] = pred2(bc[j].0, xa[j], bc[j].1, xb[j]);
                }
            } else {
                for j in 0..d {
                    pred[j] = pred1(bc[j].1, xb[j]);
                }
            }
            code(1, o / d, &y[o..o + d], Some(&pred[..]), &mut ydec);
        }
    }
    for c in ca.iter().chain(&cb).chain(&cc) {
        coef.extend_from_slice(&c.to_bits().to_le_bytes());
    }
}

fn write_section(scales: &[f32], codes: &[u8], out: &mut Vec<u8>) {
    for s in scales {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.extend_from_slice(codes);
}

/// The scale word of row `r`: (step, predicted).
#[inline(always)]
fn scale(sec: &[u8], r: usize) -> (f32, bool) {
    let bits = u32::from_le_bytes(sec[4 * r..4 * r + 4].try_into().unwrap());
    (f32::from_bits(bits & 0x7fff_ffff), bits >> 31 == 1)
}

#[inline(always)]
fn plain(out: &mut [f32], codes: &[u8], s: f32) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = (c as i8) as f32 * s;
    }
}

/// Decodes the inputs of tokens `t0 .. t0 + out.len() / (L·d)` from the block's x section `sec` (`rows` rows) and
/// coefficient area `coef` into `out` (`[T][L][d]`). Lengths are the reader's (checked when the block was read);
/// rows out of range are a programming error and panic.
#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
pub fn decode_x(sec: &[u8], coef: &[u8], layers: usize, d: usize, t0: usize, out: &mut [f32]) {
    let rows = sec.len() / (4 + d);
    let codes = &sec[4 * rows..];
    for (i, tok) in out.chunks_exact_mut(layers * d).enumerate() {
        let r0 = (t0 + i) * layers;
        for l in 0..layers {
            let r = r0 + l;
            let (s, predicted) = scale(sec, r);
            let c = &codes[r * d..][..d];
            let (prev, cur) = tok.split_at_mut(l * d);
            let cur = &mut cur[..d];
            if l > 0 && predicted {
                let prev = &prev[(l - 1) * d..];
                let a = &coef[2 * (l - 1) * d..][..2 * d];
                let inv = 1.0 / s;
                for (((o, &p), &c), a) in cur.iter_mut().zip(prev).zip(c).zip(a.chunks_exact(2)) {
                    *o = unwrap(c, pred1(bf16_at(a), p), s, inv);
                }
            } else {
                plain(cur, c, s);
            }
        }
    }
}

/// Decodes the targets of tokens `t0 ..` like [`decode_x`], given `xhat`, the decoded inputs of the same tokens
/// (`out.len()` values).
#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
pub fn decode_y(
    sec: &[u8],
    coef: &[u8],
    layers: usize,
    d: usize,
    t0: usize,
    xhat: &[f32],
    out: &mut [f32],
) {
    let rows = sec.len() / (4 + d);
    let codes = &sec[4 * rows..];
    let (cb, cc) = coef[2 * (layers - 1) * d..].split_at(2 * (layers - 1) * d);
    let td = layers * d;
    for (i, (tok, xt)) in out
        .chunks_exact_mut(td)
        .zip(xhat.chunks_exact(td))
        .enumerate()
    {
        let r0 = (t0 + i) * layers;
        for (l, cur) in tok.chunks_exact_mut(d).enumerate() {
            let r = r0 + l;
            let (s, predicted) = scale(sec, r);
            let q = &codes[r * d..][..d];
            if !predicted {
                plain(cur, q, s);
                continue;
            }
            let inv = 1.0 / s;
            predict_y_row(cur, q, xt, cb, cc, l, layers, |q, p| unwrap(q, p, s, inv));
        }
    }
}
