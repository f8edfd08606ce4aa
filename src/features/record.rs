//! One feature's dashboard record: the JSON layout circuit-tracer's frontend fetches per feature, plus the fields
//! our viewer adds (layer, index within the layer, histogram bin edges, signed logit values).
//!
//! Field names follow circuit-tracer's feature schema (`examples_quantiles`, `tokens_acts_list`, `top_logits`,
//! `act_min`, `act_max`, `quantile_values`, `histogram`, `activation_frequency`), so a record serialised as is
//! can be served to that frontend.

/// One context: a window of tokens around a token on which the feature fired.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    /// The window's tokens, decoded for display (`#id` without a tokenizer).
    pub tokens: Vec<String>,
    /// The feature's activation on each token of the window.
    pub tokens_acts_list: Vec<f32>,
    /// Index in the window of the token the example was chosen for.
    pub train_token_ind: usize,
    /// Always false here (circuit-tracer's flag for repeated training data).
    #[serde(default)]
    pub is_repeated_datapoint: bool,
    /// The window's token ids.
    #[serde(default)]
    pub token_ids: Vec<u32>,
    /// The document the window comes from and the position of its chosen token in that document.
    #[serde(default)]
    pub doc_id: u64,
    #[serde(default)]
    pub position: u32,
}

/// A named group of examples: the top activations, or a sample from a lower quantile of the activations.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExamplesQuantile {
    pub quantile_name: String,
    pub examples: Vec<Example>,
}

/// Everything the dashboard of one feature shows.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FeatureRecord {
    /// The scan / transcoder name.
    pub transcoder_id: String,
    /// circuit-tracer's feature id: the Cantor pairing of (layer, feature).
    pub index: u64,
    /// The feature's layer and index within the layer.
    #[serde(default)]
    pub layer: u32,
    #[serde(default)]
    pub feature: u32,
    /// First group: the top activations; then samples from lower quantiles.
    pub examples_quantiles: Vec<ExamplesQuantile>,
    /// Tokens whose logits the feature's decoder direction raises (lowers) most, best first.
    pub top_logits: Vec<String>,
    pub bottom_logits: Vec<String>,
    /// The logit effects of `top_logits` and `bottom_logits`.
    #[serde(default)]
    pub top_logit_values: Vec<f32>,
    #[serde(default)]
    pub bottom_logit_values: Vec<f32>,
    /// Smallest and largest nonzero activation seen (0 for a feature that never fired).
    pub act_min: f32,
    pub act_max: f32,
    /// Approximate activation quantiles (from the histogram) at [`QUANTILES`].
    pub quantile_values: Vec<f32>,
    /// Counts of nonzero activations per bin; bin `i` spans `histogram_edges[i] .. histogram_edges[i + 1]`.
    pub histogram: Vec<f32>,
    #[serde(default)]
    pub histogram_edges: Vec<f32>,
    /// Fraction of tokens on which the feature fired.
    pub activation_frequency: f64,
    /// Number of tokens on which it fired, and of tokens analysed.
    #[serde(default)]
    pub n_active: u64,
    #[serde(default)]
    pub n_tokens: u64,
}

/// The quantiles reported in [`FeatureRecord::quantile_values`].
pub const QUANTILES: [f64; 5] = [0.1, 0.25, 0.5, 0.75, 0.9];

/// circuit-tracer's feature id: the Cantor pairing `(l + f)(l + f + 1) / 2 + f`.
pub fn cantor(layer: u64, feature: u64) -> u64 {
    (layer + feature) * (layer + feature + 1) / 2 + feature
}

/// The (layer, feature) of a Cantor id ([`cantor`]'s inverse); `None` past the range where f64 is exact.
pub fn uncantor(z: u64) -> Option<(u64, u64)> {
    if z > (1 << 50) {
        return None;
    }
    let mut w = (((8 * z + 1) as f64).sqrt() as u64).saturating_sub(1) / 2;
    // Correct the float estimate: w is the largest with w(w+1)/2 <= z.
    while (w + 1) * (w + 2) / 2 <= z {
        w += 1;
    }
    while w * (w + 1) / 2 > z {
        w -= 1;
    }
    let f = z - w * (w + 1) / 2;
    Some((w - f, f))
}

#[cfg(test)]
mod tests {
    #[test]
    fn uncantor_inverts_cantor() {
        for l in 0..40 {
            for f in [0, 1, 2, 17, 4095, 65535, 1 << 20] {
                assert_eq!(super::uncantor(super::cantor(l, f)), Some((l, f)));
            }
        }
        assert_eq!(super::uncantor(u64::MAX), None);
    }

    #[test]
    fn cantor_pairing() {
        assert_eq!(super::cantor(0, 0), 0);
        assert_eq!(super::cantor(1, 0), 1);
        assert_eq!(super::cantor(0, 1), 2);
        assert_eq!(super::cantor(2, 3), 18);
    }
}
