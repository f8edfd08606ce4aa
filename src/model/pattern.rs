//! Attention patterns stored as the tiles of their lower triangle.
//!
//! A causal pattern `P[h][t][s]` is zero for `s > t`, so half of a dense `[n_heads, n, n]` array is zeros, and
//! at long prompts those arrays are what a recorded forward's memory goes to (SmolLM2's 30 layers × 9 heads at
//! 4,096 tokens: 18 GiB dense). [`AttnPattern`] keeps, per head, only the `T × T` tiles `(i, j)` with `j ≤ i`
//! (`T` ≤ [`TILE`], chosen so that the tiles cover `n` evenly), row block by row block: the tiles of row block `i` (query positions
//! `iT..iT + T`) are contiguous, tile `j` of them at `j·T²`, each row-major. That is `n²/2 + nT/2` floats per
//! head instead of `n²`, and every product with the pattern is a sequence of dense tile products
//! ([`HeadTiles::matmul`] for the forward's `P·V`, [`HeadTiles::t_matmul_add`] for attribution's `Pᵀ·ā`),
//! which skip the zero tiles above the diagonal, and the leading tiles of a row block that are zero in every
//! head (keys outside a sliding window, found once the pattern is written).
//!
//! Entries of a stored tile that lie above the diagonal or past `n` are zero.

use crate::backend::cpu::gemm::{Mat, Threads, matmul};
use crate::{Error, Result};
use rayon::prelude::*;

/// The largest tile side.
pub const TILE: usize = 64;

/// Softmax attention weights of every head for one layer, `P[h][t][s]` (see the module docs for the layout).
#[derive(Clone, Debug, PartialEq)]
pub struct AttnPattern {
    n_heads: usize,
    n: usize,
    tile: usize,
    data: Vec<f32>,
    /// Per row block, a tile before which every head's tiles of the block are zero (the key tiles outside a
    /// sliding window), which products skip: 0 until [`AttnPattern::find_leading_zeros`] looks.
    first: Vec<usize>,
}

/// One head's tiles, read-only.
#[derive(Clone, Copy, Debug)]
pub struct HeadTiles<'a> {
    data: &'a [f32],
    n: usize,
    tile: usize,
    first: &'a [usize],
}

/// The tile side for `n` positions: at most [`TILE`], and as even as the blocks allow, so that the last row
/// block pads little (65 positions make two blocks of 33, not 64 and 1).
pub(crate) fn tile_for(n: usize) -> usize {
    n.div_ceil(n.div_ceil(TILE).max(1)).max(1)
}

/// Offset of row block `i`'s first tile within a head (in tiles).
pub(crate) fn block_start(i: usize) -> usize {
    i * (i + 1) / 2
}

impl AttnPattern {
    /// An all-zero pattern of `n_heads` heads over `n` positions.
    pub fn zeros(n_heads: usize, n: usize) -> Self {
        let tile = tile_for(n);
        let per_head = block_start(n.div_ceil(tile)) * tile * tile;
        AttnPattern {
            n_heads,
            n,
            tile,
            data: vec![0.0; n_heads * per_head],
            first: vec![0; n.div_ceil(tile)],
        }
    }

    /// Records, per row block, how many of its leading key tiles are zero in every head (never the
    /// diagonal one), so that products skip them: call after writing the pattern.
    pub(crate) fn find_leading_zeros(&mut self) {
        let (tl, len) = (self.tile, self.head_len());
        let tt = tl * tl;
        self.first = (0..self.n.div_ceil(tl))
            .map(|i| {
                let zero = |j: usize| {
                    (0..self.n_heads).all(|h| {
                        let at = h * len + (block_start(i) + j) * tt;
                        self.data[at..at + tt].iter().all(|&v| v == 0.0)
                    })
                };
                (0..i).find(|&j| !zero(j)).unwrap_or(i)
            })
            .collect();
    }

    /// Bytes of the pattern of `n_heads` heads over `n` positions, before making it.
    pub fn bytes_for(n_heads: usize, n: usize) -> usize {
        let tile = tile_for(n);
        4 * n_heads * block_start(n.div_ceil(tile)) * tile * tile
    }

    /// The pattern of a dense `[n_heads, n, n]` array. Errors if its length is not `n_heads·n·n` or if it has
    /// a nonzero entry above the diagonal (a key after its query), naming the first.
    pub fn from_dense(n_heads: usize, n: usize, dense: &[f32]) -> Result<Self> {
        if dense.len() != n_heads * n * n {
            return Err(Error::Shape {
                what: "attention pattern".into(),
                expected: vec![n_heads, n, n],
                got: vec![dense.len()],
            });
        }
        let mut p = AttnPattern::zeros(n_heads, n);
        for h in 0..n_heads {
            for t in 0..n {
                let row = &dense[(h * n + t) * n..(h * n + t + 1) * n];
                if let Some(s) = row[t + 1..].iter().position(|v| *v != 0.0) {
                    return Err(Error::Unsupported(format!(
                        "attention pattern: head {h}, query {t} gives weight {} to the later key {}; \
                         a causal pattern is zero above the diagonal",
                        row[t + 1 + s],
                        t + 1 + s
                    )));
                }
                for (s, v) in row[..=t].iter().enumerate() {
                    let o = p.offset(h, t, s);
                    p.data[o] = *v;
                }
            }
        }
        p.find_leading_zeros();
        Ok(p)
    }

    /// Number of heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Number of positions.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Tile side `T`.
    pub fn tile(&self) -> usize {
        self.tile
    }

    /// Floats per head.
    fn head_len(&self) -> usize {
        block_start(self.n.div_ceil(self.tile)) * self.tile * self.tile
    }

    /// Index of `P[h][t][s]` for `s ≤ t < n`.
    fn offset(&self, h: usize, t: usize, s: usize) -> usize {
        let tl = self.tile;
        let (i, j) = (t / tl, s / tl);
        h * self.head_len() + (block_start(i) + j) * tl * tl + (t % tl) * tl + s % tl
    }

    /// `P[h][t][s]` (zero above the diagonal).
    pub fn get(&self, h: usize, t: usize, s: usize) -> f32 {
        assert!(
            h < self.n_heads && t < self.n && s < self.n,
            "pattern index"
        );
        if s > t {
            0.0
        } else {
            self.data[self.offset(h, t, s)]
        }
    }

    /// The dense `[n_heads, n, n]` array (zeros above the diagonal), as the Python references write it.
    pub fn to_dense(&self) -> Vec<f32> {
        let n = self.n;
        let mut out = vec![0.0f32; self.n_heads * n * n];
        for h in 0..self.n_heads {
            for t in 0..n {
                for s in 0..=t {
                    out[(h * n + t) * n + s] = self.data[self.offset(h, t, s)];
                }
            }
        }
        out
    }

    /// Bytes of the stored tiles.
    pub fn bytes(&self) -> usize {
        4 * self.data.len()
    }

    /// Head `h`'s tiles.
    pub fn head(&self, h: usize) -> HeadTiles<'_> {
        let len = self.head_len();
        HeadTiles {
            data: &self.data[h * len..(h + 1) * len],
            n: self.n,
            tile: self.tile,
            first: &self.first,
        }
    }

    /// Every head's storage, in parallel (each of [`AttnPattern::head`]'s length); call
    /// [`AttnPattern::find_leading_zeros`] after writing it.
    pub(crate) fn heads_mut(&mut self) -> rayon::slice::ChunksMut<'_, f32> {
        let len = self.head_len().max(1);
        self.data.par_chunks_mut(len)
    }
}

impl<'a> HeadTiles<'a> {
    /// Row block `i`'s tiles: `(i + 1)` of `T × T`, contiguous.
    pub fn block(&self, i: usize) -> &'a [f32] {
        let tt = self.tile * self.tile;
        &self.data[block_start(i) * tt..block_start(i + 1) * tt]
    }

    /// `out[t, :] = Σ_s P[t, s] v[s, :]` for every query `t < n`, where `v` is an `n × w` view and `out` has
    /// row stride `ldo` (each row written, whatever it held).
    pub fn matmul(&self, v: Mat<'_>, out: &mut [f32], ldo: usize) {
        let (n, tl) = (self.n, self.tile);
        assert!(v.rows >= n, "pattern product: too few value rows");
        for i in 0..n.div_ceil(tl) {
            block_matmul(self.block(i), i, self.first[i], tl, n, v, out, ldo);
        }
    }

    /// `out[s, :] += Σ_{t < len} P[t, s] a[t, :]` for `s < len`: the product with the transpose of the
    /// pattern's leading `len × len` block (attribution's backward through a frozen pattern, for a row whose
    /// causal cone ends at `len`). `a` is a `len × w` view; `out` has row stride `ldo`.
    pub fn t_matmul_add(&self, len: usize, a: Mat<'_>, out: &mut [f32], ldo: usize) {
        let tl = self.tile;
        assert!(
            len <= self.n && a.rows >= len,
            "pattern product: bad length"
        );
        for i in 0..len.div_ceil(tl) {
            let rows = tl.min(len - i * tl);
            let block = self.block(i);
            let ai = sub_rows(a, i * tl, rows);
            for j in self.first[i]..=i {
                let cols = tl.min(len - j * tl);
                matmul(
                    &mut out[j * tl * ldo..],
                    ldo,
                    Mat::strided(&block[j * tl * tl..], rows, cols, tl).t(),
                    ai,
                    1.0,
                    1.0,
                    Threads::One,
                );
            }
        }
    }
}

/// Row block `i`'s part of `P·V`: `out[t, :] = Σ_s P[t, s] v[s, :]` for its queries `t` (rows `i·tl..` of
/// `out`, whatever they held), from its `(i + 1)` tiles of `tl × tl` in `block` (the layout of
/// [`HeadTiles::block`]); `n` positions, `v` an `n × w` view, `out` of row stride `ldo`. Tiles before
/// `first` are zero (keys outside every query's sliding window) and skipped. The forward computes a row
/// block's weights and then this, one block at a time.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_matmul(
    block: &[f32],
    i: usize,
    first: usize,
    tl: usize,
    n: usize,
    v: Mat<'_>,
    out: &mut [f32],
    ldo: usize,
) {
    let rows = tl.min(n - i * tl);
    for j in first.min(i)..=i {
        let cols = tl.min(n - j * tl);
        matmul(
            &mut out[i * tl * ldo..],
            ldo,
            Mat::strided(&block[j * tl * tl..], rows, cols, tl),
            sub_rows(v, j * tl, cols),
            if j == first.min(i) { 0.0 } else { 1.0 },
            1.0,
            Threads::One,
        );
    }
}

/// Rows `from..from + rows` of a view.
fn sub_rows(m: Mat<'_>, from: usize, rows: usize) -> Mat<'_> {
    Mat {
        data: &m.data[(from * m.rs).min(m.data.len())..],
        rows,
        ..m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A causal pattern with distinct entries.
    fn dense(h_n: usize, n: usize) -> Vec<f32> {
        let mut d = vec![0.0f32; h_n * n * n];
        for h in 0..h_n {
            for t in 0..n {
                for s in 0..=t {
                    d[(h * n + t) * n + s] =
                        ((h * 7919 + t * 131 + s * 17) % 1000) as f32 / 997.0 - 0.4;
                }
            }
        }
        d
    }

    #[test]
    fn round_trips_through_dense_and_takes_half_the_memory() {
        for n in [1, 2, 5, 63, 64, 65, 130, 200, 700] {
            let d = dense(3, n);
            let p = AttnPattern::from_dense(3, n, &d).unwrap();
            assert_eq!(p.to_dense(), d, "n = {n}");
            for (t, s) in [(0, 0), (n - 1, 0), (n - 1, n - 1), (n / 2, n / 3)] {
                assert_eq!(p.get(2, t, s), d[(2 * n + t) * n + s]);
            }
            // About n²/2 + nT/2 floats a head, never more than the dense n².
            assert!(p.bytes() <= 4 * d.len(), "n = {n}");
            assert_eq!(p.bytes(), AttnPattern::bytes_for(3, n));
            if n >= 500 {
                assert!(
                    p.bytes() * 100 < 4 * d.len() * 57,
                    "n = {n}: {} bytes",
                    p.bytes()
                );
            }
        }
    }

    #[test]
    fn refuses_a_wrong_length_or_a_non_causal_array() {
        assert!(matches!(
            AttnPattern::from_dense(2, 4, &[0.0; 31]),
            Err(Error::Shape { .. })
        ));
        let mut d = dense(2, 4);
        d[(4 + 1) * 4 + 3] = 0.5;
        let e = AttnPattern::from_dense(2, 4, &d).unwrap_err().to_string();
        assert!(e.contains("head 1, query 1") && e.contains("key 3"), "{e}");
    }

    /// Also with a sliding window of 40, whose leading zero tiles the products skip.
    #[test]
    fn products_match_the_dense_pattern() {
        let w = 5;
        for (n, window) in [1, 3, 64, 65, 150, 150, 200]
            .into_iter()
            .zip([0, 0, 0, 0, 0, 40, 40])
        {
            let mut d = dense(2, n);
            if window > 0 {
                for (i, v) in d.iter_mut().enumerate() {
                    let (t, s) = ((i / n) % n, i % n);
                    if s + window <= t {
                        *v = 0.0;
                    }
                }
            }
            let p = AttnPattern::from_dense(2, n, &d).unwrap();
            // Row block i of tiles T sees keys from iT + 1 − 40 on: its first tile is (iT − 39) / T.
            let tl = p.tile();
            let first: Vec<usize> = (0..n.div_ceil(tl))
                .map(|i| {
                    if window > 0 {
                        (i * tl + 1).saturating_sub(window) / tl
                    } else {
                        0
                    }
                })
                .collect();
            assert_eq!(p.first, first, "n = {n}, window {window}");
            assert!(window == 0 || first.iter().any(|&f| f > 0));
            // A value / gradient matrix with a row stride wider than its width.
            let ld = w + 3;
            let v: Vec<f32> = (0..n * ld)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let vm = Mat::strided(&v, n, w, ld);
            let head = p.head(1);
            let pd = &d[n * n..];
            let mut out = vec![f32::NAN; n * w];
            head.matmul(vm, &mut out, w);
            for t in 0..n {
                for c in 0..w {
                    let want: f32 = (0..n).map(|s| pd[t * n + s] * v[s * ld + c]).sum();
                    assert!((out[t * w + c] - want).abs() < 1e-4, "P·V n={n} t={t}");
                }
            }
            for len in [1, n / 2 + 1, n] {
                let mut out = vec![1.0f32; len * w];
                head.t_matmul_add(len, vm, &mut out, w);
                for s in 0..len {
                    for c in 0..w {
                        let want: f32 =
                            1.0 + (0..len).map(|t| pd[t * n + s] * v[t * ld + c]).sum::<f32>();
                        assert!((out[s * w + c] - want).abs() < 1e-4, "Pᵀ·A n={n} len={len}");
                    }
                }
            }
        }
    }
}
