//! How a run's `auto` kernels are chosen, apart from the device: the candidates' order, the check that a
//! candidate's step agrees with the reference's, the choice, and the report (`tuning.json`). The CUDA
//! side that runs and times the candidates is `backend::cuda::tune`.
//!
//! The candidates, in order: the encoders the device runs (`mma` first), each with the gathers (or the
//! sparse kernels the run fixed); then the tiled kernels with the encoder chosen; then, where the tiled
//! kernels are chosen, `act_grad_partial`'s two other divisions of shared memory ([`ActBlocks`]).
//!
//! Each candidate's step (the loss and gradient of the run's first batch) is checked against the first
//! candidate's, the reference (`mma` with the gathers, or the settings the run fixed): the same sums in
//! another order agree to within f32 rounding, so a candidate that does not (a kernel that computes
//! something else on this device) is reported and never chosen. The check compares what one step
//! reports, not every gradient element: the loss and, per layer, the squared error, the active entries and
//! the gradient's squared norm. It catches a kernel that computes garbage, not one wrong tile among
//! thousands; `tests/cuda.rs` is what checks the kernels.

use super::{ActBlocks, EncoderKernel, KernelChoice, SparseKernels};

/// Relative difference of the loss and of each layer's squared error within which a candidate agrees
/// (f32 sums in another order differ by about 10⁻⁶; a threshold decision flipped by that rounding moves
/// one entry's share).
pub const LOSS_TOLERANCE: f64 = 1e-3;
/// The same for each layer's gradient squared norm (one flipped entry moves its feature's row).
pub const GRAD_TOLERANCE: f64 = 1e-2;
/// Active entries per layer may differ by this fraction of the reference's, plus one (threshold
/// decisions within rounding of θ).
pub const ACTIVE_TOLERANCE: f64 = 0.01;

/// Every choice of kernels `auto` may make, in a fixed order (the distributed trainer's slots).
pub fn every_choice() -> Vec<KernelChoice> {
    use ActBlocks::{One, Three, Two};
    use EncoderKernel::{Mma, Wgmma, WgmmaNarrow, WgmmaTma};
    use SparseKernels::{Gather, Tiled};
    let mut v = Vec::new();
    for encoder in [Mma, Wgmma, WgmmaNarrow, WgmmaTma] {
        for sparse in [Gather, Tiled] {
            for act_blocks in [One, Two, Three] {
                v.push(KernelChoice {
                    encoder,
                    sparse,
                    act_blocks,
                });
            }
        }
    }
    v
}

/// What one step reports, for comparing candidates.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub loss: f64,
    /// Per layer: `Σ_b ‖ŷ_l − y_l‖²`.
    pub sq_err: Vec<f64>,
    /// Per layer: active (token, feature) entries.
    pub n_active: Vec<usize>,
    /// Per layer: the squared norm of the gradient of its encoder rows and biases, thresholds and decoder
    /// rows (without the decoder-norm term, which Adam adds), plus its decoder bias's.
    pub grad_sq: Vec<f64>,
}

/// Whether `got` agrees with the reference `want` ([`LOSS_TOLERANCE`], [`GRAD_TOLERANCE`],
/// [`ACTIVE_TOLERANCE`]); if not, the first thing that differs.
pub fn agrees(got: &Summary, want: &Summary) -> std::result::Result<(), String> {
    let close = |a: f64, b: f64, tol: f64| {
        a.is_finite() && (a - b).abs() <= tol * a.abs().max(b.abs()).max(f64::MIN_POSITIVE)
    };
    if !close(got.loss, want.loss, LOSS_TOLERANCE) {
        return Err(format!(
            "loss {} where the reference has {}",
            got.loss, want.loss
        ));
    }
    let layers = want.sq_err.len();
    if got.sq_err.len() != layers || got.n_active.len() != layers || got.grad_sq.len() != layers {
        return Err(format!(
            "statistics of {}, {} and {} layers (squared errors, active entries, gradient norms) where \
             the reference has {layers}",
            got.sq_err.len(),
            got.n_active.len(),
            got.grad_sq.len()
        ));
    }
    for l in 0..layers {
        if !close(got.sq_err[l], want.sq_err[l], LOSS_TOLERANCE) {
            return Err(format!(
                "layer {l}: squared error {} where the reference has {}",
                got.sq_err[l], want.sq_err[l]
            ));
        }
        let (a, b) = (got.n_active[l] as f64, want.n_active[l] as f64);
        if (a - b).abs() > ACTIVE_TOLERANCE * b + 1.0 {
            return Err(format!(
                "layer {l}: {a} active entries where the reference has {b}"
            ));
        }
        if !close(got.grad_sq[l], want.grad_sq[l], GRAD_TOLERANCE) {
            return Err(format!(
                "layer {l}: gradient squared norm {} where the reference has {}",
                got.grad_sq[l], want.grad_sq[l]
            ));
        }
    }
    Ok(())
}

/// One candidate's trial.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Trial {
    pub kernels: KernelChoice,
    pub summary: Summary,
    /// `None` where it agrees with the reference (the first trial); else what differs.
    pub disagrees: Option<String>,
    /// The median step time in milliseconds (timed only where it agrees).
    pub ms: Option<f64>,
}

/// What `auto` chose, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tuning {
    /// What the run asked for (any setting may be `auto`).
    pub wanted: KernelChoice,
    /// The fastest agreeing trial's kernels.
    pub chosen: KernelChoice,
    /// Every trial in the order run; the first is the reference.
    pub trials: Vec<Trial>,
    /// The device, in words.
    pub device: String,
}

impl Tuning {
    /// The report's lines: the choice, then one line per trial.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "kernels (auto, timed on the first batch on {}): encoder_kernel = \"{}\", sparse_kernels = \
             \"{}\", act_blocks = \"{}\"",
            self.device,
            self.chosen.encoder.name(),
            self.chosen.sparse.name(),
            self.chosen.act_blocks.name()
        )];
        for (i, t) in self.trials.iter().enumerate() {
            let what = match (&t.disagrees, t.ms) {
                (Some(why), _) => format!("not used: disagrees with the reference ({why})"),
                (None, Some(ms)) if i == 0 => format!("{ms:.3} ms a step (the reference)"),
                (None, Some(ms)) => format!("{ms:.3} ms a step"),
                (None, None) => "not timed".into(),
            };
            out.push(format!("  {:<36} {what}", t.kernels.to_string()));
        }
        out
    }
}

/// The encoders `auto` tries, in order (the reference first): every one the device runs (`wgmma`: compute
/// capability 9.x), or the one the run fixed.
pub fn encoders(wanted: EncoderKernel, wgmma: bool) -> Vec<EncoderKernel> {
    match wanted {
        EncoderKernel::Auto if wgmma => vec![
            EncoderKernel::Mma,
            EncoderKernel::Wgmma,
            EncoderKernel::WgmmaNarrow,
            EncoderKernel::WgmmaTma,
        ],
        EncoderKernel::Auto => vec![EncoderKernel::Mma],
        k => vec![k],
    }
}

/// The kernels of the fastest timed trial (the first of equals); the first trial's where none was timed.
/// `trials` is never empty: the reference is always tried.
pub fn fastest(trials: &[Trial]) -> KernelChoice {
    let mut best: Option<(KernelChoice, f64)> = None;
    for t in trials {
        if let Some(ms) = t.ms
            && best.is_none_or(|(_, b)| ms < b)
        {
            best = Some((t.kernels, ms));
        }
    }
    best.map_or(trials[0].kernels, |(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            loss: 2.5,
            sq_err: vec![10.0, 20.0],
            n_active: vec![1000, 2000],
            grad_sq: vec![3.0, 4.0],
        }
    }

    #[test]
    fn agreement_allows_rounding_and_names_what_differs() {
        let want = summary();
        assert_eq!(agrees(&want, &want), Ok(()));
        let mut got = summary();
        got.loss *= 1.0 + 1e-4;
        got.sq_err[1] *= 1.0 - 5e-4;
        got.n_active[0] += 11;
        got.grad_sq[1] *= 1.0 + 5e-3;
        assert_eq!(agrees(&got, &want), Ok(()));
        type Change = fn(&mut Summary);
        let cases: [(Change, &str); 6] = [
            (|s| s.loss *= 1.01, "loss"),
            (|s| s.loss = f64::NAN, "loss"),
            (|s| s.sq_err[1] *= 0.99, "layer 1: squared error"),
            (|s| s.n_active[1] += 22, "layer 1: 2022 active"),
            (|s| s.grad_sq[0] *= 1.02, "layer 0: gradient"),
            (
                |s| {
                    s.grad_sq.pop();
                },
                "of 2, 2 and 1 layers",
            ),
        ];
        for (change, says) in cases {
            let mut got = summary();
            change(&mut got);
            let why = agrees(&got, &want).expect_err(says);
            assert!(why.contains(says), "{why:?} should say {says:?}");
        }
        // An infinite gradient norm never agrees, not even with an infinite reference.
        let mut inf = summary();
        inf.grad_sq[0] = f64::INFINITY;
        assert!(agrees(&inf, &inf).is_err());
    }

    #[test]
    fn encoder_candidates_follow_the_device() {
        assert_eq!(
            encoders(EncoderKernel::Auto, false),
            vec![EncoderKernel::Mma]
        );
        assert_eq!(encoders(EncoderKernel::Auto, true).len(), 4);
        assert_eq!(encoders(EncoderKernel::Auto, true)[0], EncoderKernel::Mma);
        assert_eq!(
            encoders(EncoderKernel::Wgmma, true),
            vec![EncoderKernel::Wgmma]
        );
    }

    fn trial(encoder: EncoderKernel, sparse: SparseKernels, ms: Option<f64>) -> Trial {
        Trial {
            kernels: KernelChoice {
                encoder,
                sparse,
                act_blocks: ActBlocks::One,
            },
            summary: summary(),
            disagrees: ms.is_none().then(|| "loss".to_string()),
            ms,
        }
    }

    #[test]
    fn the_fastest_timed_trial_is_chosen() {
        use EncoderKernel::{Mma, Wgmma, WgmmaTma};
        use SparseKernels::{Gather, Tiled};
        let trials = [
            trial(Mma, Gather, Some(3.0)),
            trial(Wgmma, Gather, None),
            trial(WgmmaTma, Gather, Some(2.0)),
            trial(WgmmaTma, Tiled, Some(2.0)),
        ];
        assert_eq!(fastest(&trials), trials[2].kernels);
        assert_eq!(fastest(&trials[..2]), trials[0].kernels);
        assert_eq!(fastest(&trials[1..2]), trials[1].kernels, "none timed");
        let t = Tuning {
            wanted: KernelChoice {
                encoder: EncoderKernel::Auto,
                sparse: SparseKernels::Auto,
                act_blocks: ActBlocks::Auto,
            },
            chosen: fastest(&trials),
            trials: trials.to_vec(),
            device: "a device".into(),
        };
        let lines = t.lines();
        assert!(lines[0].contains(
            "encoder_kernel = \"wgmma_tma\", sparse_kernels = \"gather\", act_blocks = \"one\""
        ));
        assert!(lines[1].contains("(the reference)"), "{}", lines[1]);
        assert!(lines[2].contains("not used: disagrees"), "{}", lines[2]);
        assert_eq!(lines.len(), 5);
        // Every choice `auto` can make is in the distributed trainer's slots, once.
        let every = every_choice();
        for e in encoders(EncoderKernel::Auto, true) {
            for sparse in [Gather, Tiled] {
                for act_blocks in [ActBlocks::One, ActBlocks::Two, ActBlocks::Three] {
                    let k = KernelChoice {
                        encoder: e,
                        sparse,
                        act_blocks,
                    };
                    assert_eq!(every.iter().filter(|c| **c == k).count(), 1, "{k}");
                }
            }
        }
        assert_eq!(every.len(), 24);
    }
}
