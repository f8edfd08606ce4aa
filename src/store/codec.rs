//! Value codecs of the activation store: how one section of `rows × d` f32 values is laid out in a block.
//!
//! A *row* is the `d` values of one (token, layer) pair. The codecs are:
//! - [`Codec::F32`]: little-endian f32, lossless;
//! - [`Codec::Bf16`], [`Codec::F16`]: 16-bit floats (round to nearest even), optionally split into byte planes
//!   (all low bytes, then all high bytes) before zstd;
//! - [`Codec::Int8`]: one f32 absmax scale per row (`scale = max|x| / 127`), values `round(x / scale)` in `[-127, 127]`;
//! - [`Codec::Int4`]: one f32 absmax scale per row (`scale = max|x| / 7`), values in `[-7, 7]` stored offset by 8,
//!   two per byte (even index in the low nibble), each row padded to a whole byte;
//! - [`Codec::Int8o`]: outlier-aware int8: per block and layer, the `k` dimensions with the largest sum of squares
//!   are kept as bf16, and the rest quantised like int8 with a per-row scale over the remaining dimensions only;
//! - [`Codec::Int8p`]: predictive int8: each row coded as the residual of a prediction from the already decoded
//!   rows of the same token (the previous layer's input; for a target, the next and the same layer's input), at
//!   int8's step. Its sections depend on each other and on per-block coefficients, so [`super::predict`] encodes
//!   and decodes it; a [`Section`] alone sees only its int8-like layout (scales, then codes).
//! - [`Codec::Int8e`]: int8p's prediction with one step per (block, layer, stream) set by an error target, no row
//!   scales, and codes outside int8's range escaped to a side stream ([`super::int8e`] encodes and decodes it; a
//!   [`Section`] alone holds only the i8 codes).
//!
//! Quantised sections store all the row scales first, then all the codes (int8o: outlier indices, scales, outlier
//! values, codes). Decoding writes straight into the
//! caller's f32 buffer: dequantisation is fused with the copy out of the decompressed block.

use crate::{Error, Result};

/// How values are encoded in a shard. The discriminant is the byte stored in the shard header.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    F32 = 0,
    Bf16 = 1,
    F16 = 2,
    Int8 = 3,
    Int4 = 4,
    #[serde(rename = "int8o")]
    #[value(name = "int8o")]
    Int8o = 5,
    #[serde(rename = "int8p")]
    #[value(name = "int8p")]
    Int8p = 6,
    #[serde(rename = "int8e")]
    #[value(name = "int8e")]
    Int8e = 7,
}

impl Codec {
    /// All codecs, in discriminant order.
    pub const ALL: [Codec; 8] = [
        Codec::F32,
        Codec::Bf16,
        Codec::F16,
        Codec::Int8,
        Codec::Int4,
        Codec::Int8o,
        Codec::Int8p,
        Codec::Int8e,
    ];

    /// The codec stored as byte `b`, if any.
    pub fn from_u8(b: u8) -> Option<Codec> {
        Codec::ALL.get(b as usize).copied()
    }

    /// The codec's name as used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::Bf16 => "bf16",
            Codec::F16 => "f16",
            Codec::Int8 => "int8",
            Codec::Int4 => "int4",
            Codec::Int8o => "int8o",
            Codec::Int8p => "int8p",
            Codec::Int8e => "int8e",
        }
    }

    /// True for the 16-bit float codecs (the ones a byte-plane split applies to).
    pub fn is_16bit(self) -> bool {
        matches!(self, Codec::Bf16 | Codec::F16)
    }

    /// True for the codecs with a per-row scale.
    pub fn is_quantised(self) -> bool {
        matches!(
            self,
            Codec::Int8 | Codec::Int4 | Codec::Int8o | Codec::Int8p
        )
    }

    /// Bytes of codes (without scales) for one row of `d` values.
    pub fn row_code_bytes(self, d: usize) -> usize {
        match self {
            Codec::F32 => 4 * d,
            Codec::Bf16 | Codec::F16 => 2 * d,
            Codec::Int8 | Codec::Int8o | Codec::Int8p | Codec::Int8e => d,
            Codec::Int4 => d.div_ceil(2),
        }
    }
}

/// The layout of one section (`rows` rows of `d` values) under a codec; computes sizes and encodes/decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Section {
    pub codec: Codec,
    /// Byte-plane split (16-bit codecs only; ignored otherwise).
    pub planes: bool,
    pub rows: usize,
    pub d: usize,
    /// Layers per token (rows are token-major: row `r` is layer `r % layers`).
    pub layers: usize,
    /// Outlier dimensions per layer (int8o only; 0 otherwise).
    pub outliers: usize,
}

impl Section {
    /// Bytes of the encoded section, or `None` on overflow.
    pub fn checked_bytes(&self) -> Option<usize> {
        let scales = if self.codec.is_quantised() {
            self.rows.checked_mul(4)?
        } else {
            0
        };
        let codes = self.rows.checked_mul(self.codec.row_code_bytes(self.d))?;
        let extra = if self.codec == Codec::Int8o {
            let idx = self.layers.checked_mul(self.outliers)?.checked_mul(2)?;
            idx.checked_add(self.rows.checked_mul(self.outliers)?.checked_mul(2)?)?
        } else {
            0
        };
        scales.checked_add(codes)?.checked_add(extra)
    }

    /// Bytes of the encoded section.
    pub fn bytes(&self) -> usize {
        self.checked_bytes().expect("section size overflows usize")
    }

    /// Byte offsets of the int8o parts: scales, outlier values, codes (indices start at 0).
    fn int8o_offsets(&self) -> (usize, usize, usize) {
        let s = 2 * self.layers * self.outliers;
        let v = s + 4 * self.rows;
        (s, v, v + 2 * self.rows * self.outliers)
    }

    /// Checks the parts of an encoded section that decoding indexes by (int8o outlier indices must be distinct,
    /// ascending and below `d`); other codecs need no check.
    pub fn validate(&self, sec: &[u8]) -> std::result::Result<(), String> {
        if sec.len() != self.bytes() {
            return Err(format!(
                "section of {} bytes, expected {}",
                sec.len(),
                self.bytes()
            ));
        }
        if self.codec == Codec::Int8o {
            for l in 0..self.layers {
                let mut prev = None;
                for j in 0..self.outliers {
                    let i = self.outlier_index(sec, l, j);
                    if i >= self.d || prev.is_some_and(|p| p >= i) {
                        return Err(format!(
                            "layer {l}: outlier index {i} is out of order or range"
                        ));
                    }
                    prev = Some(i);
                }
            }
        }
        Ok(())
    }

    fn outlier_index(&self, sec: &[u8], l: usize, j: usize) -> usize {
        let at = 2 * (l * self.outliers + j);
        u16::from_le_bytes([sec[at], sec[at + 1]]) as usize
    }

    fn encode_int8o(&self, src: &[f32], out: &mut Vec<u8>) {
        let (d, nl, k) = (self.d, self.layers, self.outliers);
        let mut chosen = Vec::with_capacity(nl);
        for l in 0..nl {
            let mut ss = vec![0f64; d];
            for row in src.chunks_exact(d).skip(l).step_by(nl) {
                for (a, &v) in ss.iter_mut().zip(row) {
                    *a += (v as f64) * (v as f64);
                }
            }
            let mut idx: Vec<usize> = (0..d).collect();
            idx.sort_by(|a, b| ss[*b].total_cmp(&ss[*a]).then(a.cmp(b)));
            idx.truncate(k);
            idx.sort_unstable();
            for &i in &idx {
                out.extend_from_slice(&(i as u16).to_le_bytes());
            }
            chosen.push(idx);
        }
        let mut scales = Vec::with_capacity(self.rows);
        for (r, row) in src.chunks_exact(d).enumerate() {
            let o = &chosen[r % nl];
            let mut absmax = 0f32;
            let mut next = 0;
            for (i, v) in row.iter().enumerate() {
                if next < o.len() && o[next] == i {
                    next += 1;
                } else {
                    absmax = absmax.max(v.abs());
                }
            }
            scales.push(absmax / 127.0);
            out.extend_from_slice(&(absmax / 127.0).to_le_bytes());
        }
        for (r, row) in src.chunks_exact(d).enumerate() {
            for &i in &chosen[r % nl] {
                out.extend_from_slice(&half::bf16::from_f32(row[i]).to_bits().to_le_bytes());
            }
        }
        for (r, row) in src.chunks_exact(d).enumerate() {
            let s = scales[r];
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            let start = out.len();
            out.extend(
                row.iter()
                    .map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
            );
            for &i in &chosen[r % nl] {
                out[start + i] = 0;
            }
        }
    }

    fn scales_bytes(&self) -> usize {
        if self.codec.is_quantised() {
            self.rows * 4
        } else {
            0
        }
    }

    /// Appends the encoding of `src` (`rows × d` values, all finite) to `out`.
    ///
    /// An int8p section encoded here alone has no prediction: every row is plain int8 (a valid int8p section
    /// whatever the block's coefficients). The writer encodes int8p blocks with [`super::predict::encode`]. An
    /// int8e section cannot be encoded alone (its codes depend on the block's steps, coefficients and escape
    /// stream): the writer encodes it with [`super::int8e::encode`], and this panics.
    pub fn encode(&self, src: &[f32], out: &mut Vec<u8>) {
        self.encode_with(src, None, out)
    }

    /// [`encode`](Self::encode) with an optional error target `ε` (int8 only; ignored by the other codecs): each
    /// row's step is `max(Δ_l, max|row| / 127)`, with `Δ_l` from [`target_steps`] over this section's rows of
    /// layer `l`, instead of int8's `max|row| / 127`. The layout is int8's, so decoding is unchanged.
    pub fn encode_with(&self, src: &[f32], target: Option<f64>, out: &mut Vec<u8>) {
        let d = self.d;
        debug_assert_eq!(src.len(), self.rows * d);
        let start = out.len();
        out.reserve(self.bytes());
        assert!(
            self.codec != Codec::Int8e,
            "int8e sections are encoded by store::int8e::encode"
        );
        if self.codec == Codec::Int8o {
            self.encode_int8o(src, out);
            debug_assert_eq!(out.len() - start, self.bytes());
            return;
        }
        match self.codec {
            Codec::F32 => {
                for v in src {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Codec::Bf16 | Codec::F16 => {
                let bits = |v: f32| -> u16 {
                    if self.codec == Codec::Bf16 {
                        half::bf16::from_f32(v).to_bits()
                    } else {
                        half::f16::from_f32(v).to_bits()
                    }
                };
                if self.planes {
                    out.extend(src.iter().map(|&v| bits(v) as u8));
                    out.extend(src.iter().map(|&v| (bits(v) >> 8) as u8));
                } else {
                    for &v in src {
                        out.extend_from_slice(&bits(v).to_le_bytes());
                    }
                }
            }
            _ => {
                let qmax = if self.codec != Codec::Int4 {
                    127.0
                } else {
                    7.0
                };
                let floors = match target {
                    Some(eps) if self.codec == Codec::Int8 => {
                        target_steps(src, self.layers, d, eps)
                    }
                    _ => vec![0.0; self.layers.max(1)],
                };
                let mut scales = Vec::with_capacity(self.rows);
                for (r, row) in src.chunks_exact(d.max(1)).take(self.rows).enumerate() {
                    let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    scales.push((absmax / qmax).max(floors[r % floors.len()]));
                }
                for s in &scales {
                    out.extend_from_slice(&s.to_le_bytes());
                }
                for (row, &s) in src.chunks_exact(d.max(1)).zip(&scales) {
                    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                    let q = |v: f32| -> i8 { (v * inv).round().clamp(-qmax, qmax) as i8 };
                    if self.codec != Codec::Int4 {
                        out.extend(row.iter().map(|&v| q(v) as u8));
                    } else {
                        for pair in row.chunks(2) {
                            let lo = (q(pair[0]) + 8) as u8;
                            let hi = pair.get(1).map_or(8u8, |&v| (q(v) + 8) as u8);
                            out.push(lo | (hi << 4));
                        }
                    }
                }
            }
        }
        debug_assert_eq!(out.len() - start, self.bytes());
    }

    /// Decodes rows `r0 .. r0 + out.len() / d` of the encoded section `sec` into `out` (fused dequantisation).
    ///
    /// `sec` must be exactly [`bytes`](Self::bytes) long (the reader guarantees it); out-of-range rows are a
    /// programming error and panic. For int8p this yields only the coded part of each row (its prediction, which
    /// needs the block's other rows and coefficients, is added by [`super::predict`], as
    /// [`super::reader::Block`] does); for int8e, whose steps, coefficients and escapes are outside the section,
    /// the codes themselves (step 1, escapes as −128): [`super::int8e`] decodes it.
    pub fn decode_rows(&self, sec: &[u8], r0: usize, out: &mut [f32]) {
        let d = self.d;
        let nr = out.len() / d;
        assert!(r0 + nr <= self.rows && sec.len() == self.bytes() && out.len() == nr * d);
        let v0 = r0 * d;
        let n = nr * d;
        match self.codec {
            Codec::F32 => {
                for (o, b) in out
                    .iter_mut()
                    .zip(sec[4 * v0..4 * (v0 + n)].chunks_exact(4))
                {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Codec::Bf16 | Codec::F16 => {
                let total = self.rows * d;
                let conv: fn(u16) -> f32 = if self.codec == Codec::Bf16 {
                    |b| f32::from_bits((b as u32) << 16)
                } else {
                    |b| half::f16::from_bits(b).to_f32()
                };
                if self.planes {
                    let lo = &sec[v0..v0 + n];
                    let hi = &sec[total + v0..total + v0 + n];
                    for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
                        *o = conv(u16::from_le_bytes([l, h]));
                    }
                } else {
                    for (o, b) in out
                        .iter_mut()
                        .zip(sec[2 * v0..2 * (v0 + n)].chunks_exact(2))
                    {
                        *o = conv(u16::from_le_bytes([b[0], b[1]]));
                    }
                }
            }
            Codec::Int8o => {
                let (so, vo, co) = self.int8o_offsets();
                let k = self.outliers;
                for (i, orow) in out.chunks_exact_mut(d).enumerate() {
                    let r = r0 + i;
                    let s = f32::from_le_bytes(sec[so + 4 * r..so + 4 * r + 4].try_into().unwrap());
                    for (o, &c) in orow.iter_mut().zip(&sec[co + r * d..co + (r + 1) * d]) {
                        *o = (c as i8) as f32 * s;
                    }
                    for j in 0..k {
                        let at = vo + 2 * (r * k + j);
                        let v = f32::from_bits(
                            (u16::from_le_bytes([sec[at], sec[at + 1]]) as u32) << 16,
                        );
                        // Indices were validated when the block was read; `get_mut` keeps a bad one from panicking.
                        if let Some(o) = orow.get_mut(self.outlier_index(sec, r % self.layers, j)) {
                            *o = v;
                        }
                    }
                }
            }
            Codec::Int8e => {
                for (o, &c) in out.iter_mut().zip(&sec[v0..v0 + n]) {
                    *o = (c as i8) as f32;
                }
            }
            Codec::Int8 | Codec::Int4 | Codec::Int8p => {
                let codes = &sec[self.scales_bytes()..];
                let rb = self.codec.row_code_bytes(d);
                for (i, orow) in out.chunks_exact_mut(d).enumerate() {
                    let r = r0 + i;
                    let s = f32::from_le_bytes(sec[4 * r..4 * r + 4].try_into().unwrap());
                    // int8p marks predicted rows by the sign of their scale; the step is its magnitude.
                    let s = if self.codec == Codec::Int8p {
                        s.abs()
                    } else {
                        s
                    };
                    let crow = &codes[r * rb..(r + 1) * rb];
                    if self.codec != Codec::Int4 {
                        for (o, &c) in orow.iter_mut().zip(crow) {
                            *o = (c as i8) as f32 * s;
                        }
                    } else {
                        for (pair, &c) in orow.chunks_mut(2).zip(crow) {
                            pair[0] = ((c & 0x0f) as i32 - 8) as f32 * s;
                            if let Some(o) = pair.get_mut(1) {
                                *o = ((c >> 4) as i32 - 8) as f32 * s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The error-targeted steps of a section, one per layer: `Δ_l = √(12 · ε · E_l)`, with `E_l` the mean square of
/// the values of layer `l` in `src` (`rows × d`, token-major, `layers` rows per token). A uniform quantiser of step
/// Δ has an error of Δ²/12 per value at high rate (less where values are small against Δ and round to 0), so a
/// layer quantised at Δ_l has a relative error ‖v − v̂‖²/‖v‖² of about ε or less. At a fixed total error, the same
/// step for every value is what minimises an entropy coder's rate (high-rate theory), unlike a per-row absmax step,
/// which spends fine steps on rows of small range; a row whose range needs more than ±127 steps of Δ_l keeps its
/// absmax step (finer, so its error is lower).
pub fn target_steps(src: &[f32], layers: usize, d: usize, eps: f64) -> Vec<f32> {
    let layers = layers.max(1);
    let mut ss = vec![0f64; layers];
    let mut n = vec![0usize; layers];
    for (r, row) in src.chunks_exact(d.max(1)).enumerate() {
        ss[r % layers] += row.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
        n[r % layers] += row.len();
    }
    ss.iter()
        .zip(&n)
        .map(|(&s, &k)| {
            if k == 0 {
                0.0
            } else {
                (12.0 * eps * s / k as f64).sqrt().min(f32::MAX as f64) as f32
            }
        })
        .collect()
}

/// Checks that every value is finite (the quantised codecs and the error bounds need it).
pub fn check_finite(what: &str, values: &[f32], d: usize) -> Result<()> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidData {
            what: what.into(),
            reason: format!(
                "non-finite value {} at row {}, column {}",
                values[i],
                i / d.max(1),
                i % d.max(1)
            ),
        });
    }
    Ok(())
}
