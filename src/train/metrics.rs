//! Training metrics: accumulated over a logging interval, written as JSON lines and summarised on the terminal.

use crate::backend::StepStats;

/// Sums over the steps of one logging interval.
#[derive(Clone, Debug, Default)]
pub struct Interval {
    pub steps: u64,
    pub tokens: u64,
    pub loss: f64,
    pub recon: f64,
    pub sparsity: f64,
    pub preact: f64,
    pub grad_norm: f64,
    pub sq_err: Vec<f64>,
    pub target_var: Vec<f64>,
    pub n_active: Vec<f64>,
    pub n_window: Vec<f64>,
    /// Seconds spent waiting for batches.
    pub data_wait_s: f64,
}

impl Interval {
    /// Adds one step.
    pub fn add(&mut self, s: &StepStats, grad_norm: f64) {
        let l_n = s.sq_err.len();
        if self.sq_err.is_empty() {
            self.sq_err = vec![0.0; l_n];
            self.target_var = vec![0.0; l_n];
            self.n_active = vec![0.0; l_n];
            self.n_window = vec![0.0; l_n];
        }
        self.steps += 1;
        self.tokens += s.n_tokens as u64;
        self.loss += s.loss();
        self.recon += s.recon;
        self.sparsity += s.sparsity;
        self.preact += s.preact;
        self.grad_norm += grad_norm;
        for l in 0..l_n {
            self.sq_err[l] += s.sq_err[l];
            self.target_var[l] += s.target_var[l];
            self.n_active[l] += s.n_active[l] as f64;
            self.n_window[l] += s.n_window[l] as f64;
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricsLine {
    pub step: u64,
    pub tokens_seen: u64,
    pub loss: f64,
    pub recon: f64,
    pub sparsity: f64,
    pub preact: f64,
    pub lambda: f32,
    pub lr: f32,
    pub grad_norm: f64,
    pub nmse: f64,
    pub explained_variance: f64,
    pub nmse_per_layer: Vec<f64>,
    pub explained_variance_per_layer: Vec<f64>,
    pub l0_per_layer: Vec<f64>,
    pub dead_per_layer: Vec<usize>,
    pub near_threshold_per_token: Vec<f64>,
    pub tokens_per_s: f64,
    /// Fraction of the interval's wall time spent waiting for the activation source.
    pub data_wait_fraction: f64,
}

impl MetricsLine {
    /// Summarises an interval.
    #[allow(clippy::too_many_arguments)]
    pub fn from_interval(
        iv: &Interval,
        step: u64,
        tokens_seen: u64,
        lambda: f32,
        lr: f32,
        dead_per_layer: Vec<usize>,
        seconds: f64,
    ) -> Self {
        let n = iv.steps.max(1) as f64;
        let toks = iv.tokens.max(1) as f64;
        let nmse_l: Vec<f64> = iv
            .sq_err
            .iter()
            .zip(&iv.target_var)
            .map(|(e, v)| e / v.max(1e-30))
            .collect();
        let nmse = iv.sq_err.iter().sum::<f64>() / iv.target_var.iter().sum::<f64>().max(1e-30);
        MetricsLine {
            step,
            tokens_seen,
            loss: iv.loss / n,
            recon: iv.recon / n,
            sparsity: iv.sparsity / n,
            preact: iv.preact / n,
            lambda,
            lr,
            grad_norm: iv.grad_norm / n,
            nmse,
            explained_variance: 1.0 - nmse,
            explained_variance_per_layer: nmse_l.iter().map(|v| 1.0 - v).collect(),
            nmse_per_layer: nmse_l,
            l0_per_layer: iv.n_active.iter().map(|a| a / toks).collect(),
            dead_per_layer,
            near_threshold_per_token: iv.n_window.iter().map(|a| a / toks).collect(),
            tokens_per_s: iv.tokens as f64 / seconds.max(1e-9),
            data_wait_fraction: iv.data_wait_s / seconds.max(1e-9),
        }
    }

    /// A one-line terminal summary.
    pub fn summary(&self) -> String {
        let l0: f64 = self.l0_per_layer.iter().sum::<f64>() / self.l0_per_layer.len().max(1) as f64;
        let dead: usize = self.dead_per_layer.iter().sum();
        format!(
            "step {:>6}  loss {:.4}  nmse {:.4}  L0/layer {:.1}  dead {}  λ {:.3}  lr {:.2e}  {:.0} tok/s",
            self.step, self.loss, self.nmse, l0, dead, self.lambda, self.lr, self.tokens_per_s
        )
    }
}
