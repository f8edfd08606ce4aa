//! Which features each rank owns, and moving features between full and sharded parameters.
//!
//! Rank r of N owns the contiguous range `[r·F/N, (r+1)·F/N)` (rounded so that sizes differ by at most one)
//! of every layer. A shard's parameters are an ordinary [`Params`] of the same model with `n_features` set
//! to the range's length ([`local_config`]): the single-process step runs on it unchanged. Per-feature
//! tensors (`W_enc`, `b_enc`, `log_threshold`, `W_dec`) are feature-major, so a range is one contiguous
//! slice of each; `b_dec` and `W_skip` are replicated.

use crate::backend::BackendKind;
use crate::clt::{CltConfig, Params};
use crate::rng::Rng;
use crate::{Error, Result};
use std::ops::Range;

/// The features rank `rank` of `world` owns, out of `n_features`.
pub fn feature_range(n_features: usize, rank: usize, world: usize) -> Range<usize> {
    let start = n_features * rank / world;
    let end = n_features * (rank + 1) / world;
    start..end
}

/// The configuration of a shard: the model's, with `n_features` the range's length.
pub fn local_config(cfg: &CltConfig, range: &Range<usize>) -> CltConfig {
    CltConfig {
        n_features: range.len(),
        ..cfg.clone()
    }
}

/// Checks that a model can be feature-sharded over `world` ranks on `backend`: TopK and BatchTopK
/// select across every shard's features, which the CPU step does (`dist::select`) and the CUDA steps do
/// not.
pub fn check_shardable(cfg: &CltConfig, world: usize, backend: BackendKind) -> Result<()> {
    if world > 1 && !cfg.has_threshold() && backend != BackendKind::Cpu {
        return Err(Error::Unsupported(format!(
            "feature-sharded training of a {:?} transcoder on the {backend:?} backend: its selection \
             spans every shard's features, which only the CPU step gathers (train JumpReLU, on one \
             rank, or with backend = \"cpu\")",
            cfg.activation
        )));
    }
    if cfg.n_features < world {
        return Err(Error::config(
            "model.n_features",
            format!(
                "{} features cannot be sharded over {world} ranks",
                cfg.n_features
            ),
        ));
    }
    Ok(())
}

/// The per-feature tensors of layer `l` with their row length (elements per feature).
fn feature_tensors<'a>(cfg: &CltConfig, p: &'a Params, l: usize) -> [(&'a [f32], usize); 4] {
    [
        (&p.w_enc[l], cfg.d_model),
        (&p.b_enc[l], 1),
        (&p.log_theta[l], 1),
        (&p.w_dec[l], cfg.dec_row_len(l)),
    ]
}

fn feature_tensors_mut<'a>(
    cfg: &CltConfig,
    p: &'a mut Params,
    l: usize,
) -> [(&'a mut [f32], usize); 4] {
    let rl = cfg.dec_row_len(l);
    [
        (&mut p.w_enc[l], cfg.d_model),
        (&mut p.b_enc[l], 1),
        (&mut p.log_theta[l], 1),
        (&mut p.w_dec[l], rl),
    ]
}

/// Copies the features that `src` (holding the features `src_range`) and `dst` (holding `dst_range`) have in
/// common, and, when `replicated`, the replicated tensors (`b_dec`, `W_skip`). `cfg` is the full model's.
pub fn copy_features(
    cfg: &CltConfig,
    src: &Params,
    src_range: &Range<usize>,
    dst: &mut Params,
    dst_range: &Range<usize>,
    replicated: bool,
) {
    let lo = src_range.start.max(dst_range.start);
    let hi = src_range.end.min(dst_range.end);
    for l in 0..cfg.n_layers {
        if lo < hi {
            let from = feature_tensors(cfg, src, l);
            for (i, (d, n)) in feature_tensors_mut(cfg, dst, l).into_iter().enumerate() {
                let (s, _) = from[i];
                let so = (lo - src_range.start) * n;
                let dof = (lo - dst_range.start) * n;
                d[dof..dof + (hi - lo) * n].copy_from_slice(&s[so..so + (hi - lo) * n]);
            }
        }
        if replicated {
            dst.b_dec[l].copy_from_slice(&src.b_dec[l]);
            if cfg.skip {
                dst.w_skip[l].copy_from_slice(&src.w_skip[l]);
            }
        }
    }
}

/// The shard `range` of full parameters.
pub fn slice(cfg: &CltConfig, full: &Params, range: &Range<usize>) -> Params {
    let mut p = Params::zeros(&local_config(cfg, range));
    copy_features(cfg, full, &(0..cfg.n_features), &mut p, range, true);
    p
}

/// [`Params::init`] of the full model, keeping only the features in `range`: draws the same random
/// numbers in the same order, so every rank's shard is the slice of the single-process initialisation
/// without holding the whole model.
pub fn init_shard(cfg: &CltConfig, theta0: f32, rng: &mut Rng, range: &Range<usize>) -> Params {
    let local = local_config(cfg, range);
    let mut p = Params::zeros(&local);
    let enc_bound = 1.0 / (cfg.n_features as f64).sqrt();
    let dec_bound = 1.0 / ((cfg.n_layers * cfg.d_model) as f64).sqrt();
    let keep = |w: &mut [f32], row: usize, bound: f64, rng: &mut Rng| {
        for i in 0..cfg.n_features * row {
            let v = rng.uniform_range(-bound, bound) as f32;
            let f = i / row;
            if range.contains(&f) {
                w[i - range.start * row] = v;
            }
        }
    };
    for w in &mut p.w_enc {
        keep(w, cfg.d_model, enc_bound, rng);
    }
    for (l, w) in p.w_dec.iter_mut().enumerate() {
        keep(w, cfg.dec_row_len(l), dec_bound, rng);
    }
    for t in &mut p.log_theta {
        t.iter_mut().for_each(|v| *v = theta0.ln());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clt::{Activation, DecoderKind};

    fn cfg(skip: bool) -> CltConfig {
        CltConfig {
            n_layers: 3,
            d_model: 5,
            n_features: 11,
            decoder: DecoderKind::CrossLayer,
            activation: Activation::JumpRelu,
            skip,
        }
    }

    #[test]
    fn ranges_cover_every_feature_once() {
        for world in 1..=7 {
            let mut next = 0;
            for r in 0..world {
                let range = feature_range(11, r, world);
                assert_eq!(range.start, next);
                assert!(range.len() >= 11 / world && range.len() <= 11 / world + 1);
                next = range.end;
            }
            assert_eq!(next, 11);
        }
    }

    #[test]
    fn init_shard_is_the_slice_of_init_and_slices_reassemble() {
        for skip in [false, true] {
            let c = cfg(skip);
            let mut full = Params::init(&c, 0.03, &mut Rng::seed(5));
            full.b_dec[1][2] = 0.5;
            let mut back = Params::zeros(&c);
            for r in 0..3 {
                let range = feature_range(11, r, 3);
                let mut s = init_shard(&c, 0.03, &mut Rng::seed(5), &range);
                let sl = slice(&c, &full, &range);
                s.b_dec = sl.b_dec.clone();
                assert_eq!(s, sl);
                copy_features(&c, &sl, &range, &mut back, &(0..11), r == 0);
            }
            assert_eq!(back, full);
        }
    }
}
