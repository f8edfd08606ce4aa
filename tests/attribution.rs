//! Attribution graphs on stories260K with a CLT trained in the test, and on random GPT-2 and Gemma-2 models
//! with random transcoders, checked against the oracle: perturb one source in the frozen model, run it
//! forward, and compare the change of every target with the adjacency.

use clt::attribution::graph::{AttributionConfig, Graph, attribute};
use clt::attribution::intervene::{Edit, Mode, intervene, intervene_and_generate};
use clt::attribution::linear::NormKind;
use clt::attribution::replacement::{
    ReplacementTranscoder, activation, add_skip, calibrated_transcoder,
};
use clt::attribution::{Attributable, load_transcoder, prune, scores};
use clt::cache::InputHook;
use clt::model::{
    CausalLm, ForwardOptions, ForwardRecord, Gemma2Config, Gemma2Model, Gemma2PostNorms,
    Gpt2Config, Gpt2LayerWeights, Gpt2Model, Hooks, Intervention, LayerWeights, LlamaConfig,
    LlamaModel, Logits, MlpInputs, MlpOverride, RopeStyle,
};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn shared() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    assert!(
        p.is_dir(),
        "../shared is missing: these tests need the stories260K fixture and the corpus"
    );
    p
}

struct Fixture {
    _dir: tempfile::TempDir,
    model: clt::model::LoadedModel,
    checkpoint: PathBuf,
    export: PathBuf,
}

/// A CLT trained on cached stories260K activations (once for all tests of this file).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut demo = clt::demo::StoriesDemo::from_shared(&shared(), dir.path());
        demo.train_tokens = 20_000;
        demo.steps = 300;
        demo.quiet = true;
        let r = clt::demo::run_stories(&demo).unwrap();
        let s = shared();
        let model = clt::model::load(
            &s.join("models/stories260K/stories260K.bin"),
            Some(&s.join("models/stories260K/tok512.bin")),
        )
        .unwrap();
        Fixture {
            _dir: dir,
            model,
            checkpoint: r.checkpoint,
            export: r.export,
        }
    })
}

const PROMPT: &str = "Once upon a time, there was a little girl named Lily. She";

fn setup() -> (&'static LlamaModel, ReplacementTranscoder, Vec<u32>) {
    let f = fixture();
    let lt = load_transcoder(&f.checkpoint, None, NormKind::Rms).unwrap();
    assert_eq!(
        lt.input_hook,
        InputHook::MlpInNormed,
        "hook from cache.json"
    );
    let tc = ReplacementTranscoder::new(&lt.transcoder, lt.input_hook).unwrap();
    let tokens = f.model.tokenizer.encode(PROMPT).unwrap();
    (f.model.model.as_llama().unwrap(), tc, tokens)
}

/// What the oracle measures in a frozen forward: every feature target's pre-activation (without bias) and
/// the demeaned last-position logits.
struct Measured {
    pre: Vec<f32>,
    logits: Vec<f32>,
}

/// The transcoder's input at every layer of a forward's record, as `tc` reads it.
fn inputs(tc: &ReplacementTranscoder, record: &ForwardRecord) -> Vec<Vec<f32>> {
    record
        .layers
        .iter()
        .map(|r| tc.input_hook.recorded(r).unwrap().clone())
        .collect()
}

/// The frozen model's MLPs: the clean outputs with the perturbation added (`mlp`), plus, for a transcoder
/// with skip connections, the skip path of the input's change from the clean run (the one part of the
/// replacement model's MLP that the linearisation keeps differentiable).
#[derive(Debug)]
struct FrozenMlps<'a> {
    tc: &'a ReplacementTranscoder,
    mlp: &'a [Vec<f32>],
    clean_inputs: &'a [Vec<f32>],
}

impl MlpOverride for FrozenMlps<'_> {
    fn mlp_out(&self, layer: usize, inputs: &MlpInputs<'_>) -> Vec<f32> {
        let mut out = self.mlp[layer].clone();
        if self.tc.cfg.skip {
            let x = self.tc.input_hook.of(inputs);
            let d = self.tc.cfg.d_model;
            for (p, o) in out.chunks_exact_mut(d).enumerate() {
                let dx: Vec<f32> = x[p * d..(p + 1) * d]
                    .iter()
                    .zip(&self.clean_inputs[layer][p * d..(p + 1) * d])
                    .map(|(a, b)| a - b)
                    .collect();
                add_skip(self.tc, layer, &dx, o);
            }
        }
        out
    }
}

fn measure(
    m: &dyn Attributable,
    tc: &ReplacementTranscoder,
    g: &Graph,
    frozen: &ForwardRecord,
    emb: Vec<f32>,
    mlps: &FrozenMlps,
) -> Measured {
    let out = m
        .forward_embedded(
            emb,
            &ForwardOptions {
                hooks: tc.input_hook.hooks(),
                logits: Logits::Last,
                intervention: Intervention {
                    frozen: Some(frozen),
                    mlp_out: None,
                    mlp_fn: Some(mlps),
                    patterns_only: false,
                },
            },
        )
        .unwrap();
    let d = m.linear().d_model;
    let xs = inputs(tc, &out.record);
    let pre = (0..g.selected.len())
        .map(|i| {
            let (l, p, f, _) = g.feature(i);
            let x = &xs[l][p * d..(p + 1) * d];
            let w = &tc.params.w_enc[l][f * d..(f + 1) * d];
            x.iter().zip(w).map(|(a, b)| a * b).sum()
        })
        .collect();
    // Logit nodes are the logits before a soft cap (Gemma-2's): undo it.
    let raw: Vec<f64> = out
        .logits
        .iter()
        .map(|&v| match m.linear().logit_softcap {
            Some(c) => c as f64 * (v as f64 / c as f64).atanh(),
            None => v as f64,
        })
        .collect();
    let mean = raw.iter().sum::<f64>() / raw.len() as f64;
    let logits = g
        .logit_tokens
        .iter()
        .map(|&t| (raw[t as usize] - mean) as f32)
        .collect();
    Measured { pre, logits }
}

#[test]
fn adjacency_columns_match_the_frozen_model_oracle() {
    let (m, tc, tokens) = setup();
    oracle(m, &tc, &tokens, 100);
}

#[test]
fn a_per_layer_transcoder_matches_the_oracle_too() {
    // The trained CLT's same-layer decoders alone, as per-layer transcoders.
    let (m, clt_tc, tokens) = setup();
    let mut tc = clt_tc.clone();
    tc.cfg.decoder = clt::clt::DecoderKind::PerLayer;
    let d = tc.cfg.d_model;
    for l in 0..tc.cfg.n_layers {
        let rl = clt_tc.cfg.dec_row_len(l);
        tc.params.w_dec[l] = clt_tc.params.w_dec[l]
            .chunks_exact(rl)
            .flat_map(|row| row[..d].to_vec())
            .collect();
    }
    oracle(m, &tc, &tokens, 60);
}

/// A random GPT-2 (LayerNorms with weights and biases, attention and MLP biases, position embeddings) of
/// `n_layers` blocks, and prompt token ids for it.
fn random_gpt2(n_layers: usize, seed: u64) -> (Gpt2Model, Vec<u32>) {
    let c = Gpt2Config {
        d_model: 24,
        d_mlp: 96,
        n_layers,
        n_heads: 4,
        vocab_size: 40,
        max_seq_len: 16,
        norm_eps: 1e-5,
    };
    let mut rng = clt::rng::Rng::seed(seed);
    let mut r =
        |len: usize, s: f64| -> Vec<f32> { (0..len).map(|_| (rng.normal() * s) as f32).collect() };
    let (d, h, v) = (c.d_model, c.d_mlp, c.vocab_size);
    let sd = 1.0 / (d as f64).sqrt();
    let layers = (0..n_layers)
        .map(|_| Gpt2LayerWeights {
            ln_1_w: r(d, 0.2).iter().map(|x| x + 1.0).collect(),
            ln_1_b: r(d, 0.1),
            w_qkv: r(3 * d * d, 2.0 * sd),
            b_qkv: r(3 * d, 0.1),
            w_o: r(d * d, sd),
            b_o: r(d, 0.1),
            ln_2_w: r(d, 0.2).iter().map(|x| x + 1.0).collect(),
            ln_2_b: r(d, 0.1),
            w_fc: r(h * d, sd),
            b_fc: r(h, 0.1),
            w_proj: r(d * h, 1.0 / (h as f64).sqrt()),
            b_proj: r(d, 0.1),
        })
        .collect();
    let m = Gpt2Model {
        wte: r(v * d, 1.0),
        wpe: r(c.max_seq_len * d, 0.3),
        ln_f_w: r(d, 0.2).iter().map(|x| x + 1.0).collect(),
        ln_f_b: r(d, 0.1),
        output: None,
        layers,
        config: c,
    };
    let tokens = (0..12u64).map(|i| ((i * 7 + 3) % 40) as u32).collect();
    (m, tokens)
}

/// GPT-2's linearisation (frozen LayerNorms, which centre as well as scale; biases; position embeddings)
/// against the oracle, with a cross-layer transcoder reading the normed MLP input.
#[test]
fn gpt2_adjacency_columns_match_the_frozen_model_oracle() {
    let (m, tokens) = random_gpt2(3, 11);
    let tc = calibrated_transcoder(&m, &tokens, 48, 6, 5, InputHook::MlpInNormed).unwrap();
    oracle(&m, &tc, &tokens, 80);
    interventions_move_the_logits(&m, &tc, &tokens);
}

/// A KV cache filled by one model is refused by another with as many layers but other key widths (an
/// error naming the mismatch, not a panic or a read past its keys); the first model goes on with it.
#[test]
fn a_kv_cache_from_another_model_is_refused() {
    let (gpt2, tokens) = random_gpt2(2, 31);
    let (gemma, _) = random_gemma2(2, 32);
    let mut cache = clt::model::KvCache::new();
    let opts = ForwardOptions::default();
    gpt2.forward_cached(&tokens[..4], &mut cache, &opts)
        .unwrap();
    let e = gemma
        .forward_cached(&tokens[4..5], &mut cache, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another model"), "{e}");
    assert_eq!(cache.len(), 4);
    let (gpt2_3, _) = random_gpt2(3, 33);
    let e = gpt2_3
        .forward_cached(&tokens[4..5], &mut cache, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another model"), "{e}");
    gpt2.forward_cached(&tokens[4..5], &mut cache, &opts)
        .unwrap();
    assert_eq!(cache.len(), 5);
}

/// Chosen logit targets (circuit-tracer's `attribution_targets`): the top two tokens named as targets give
/// the automatic graph's logit rows and weights; a difference target's row is the difference of its tokens'
/// rows, numbered past the vocabulary with weight 1.
#[test]
fn chosen_and_difference_targets_are_the_automatic_rows() {
    use clt::attribution::graph::LogitTarget::{Difference, Token};
    let (m, tc, tokens) = setup();
    let auto = attribute(m, &tc, &tokens, &AttributionConfig::default()).unwrap();
    assert!(auto.logit_tokens.len() >= 2, "{:?}", auto.logit_tokens);
    let (a, b) = (auto.logit_tokens[0], auto.logit_tokens[1]);
    let cfg = AttributionConfig {
        targets: vec![Token(b), Difference(a, b), Token(a)],
        ..AttributionConfig::default()
    };
    let g = attribute(m, &tc, &tokens, &cfg).unwrap();
    let vocab = m.config.vocab_size as u32;
    assert_eq!(g.logit_tokens, vec![b, vocab + 1, a]);
    assert_eq!(
        g.logit_probs,
        vec![auto.logit_probs[1], 1.0, auto.logit_probs[0]]
    );
    let (ga, aa) = (&g.adjacency, &auto.adjacency);
    assert_eq!(
        ga.n_sources(),
        aa.n_sources(),
        "every active feature is a node in both"
    );
    let row = |adj: &clt::attribution::Adjacency, j: usize| -> Vec<f32> {
        (0..adj.n_sources())
            .map(|c| adj.get(adj.n_sources() + j, c))
            .collect()
    };
    let close = |x: &[f32], y: &[f32], what: &str| {
        for (c, (p, q)) in x.iter().zip(y).enumerate() {
            assert!(
                (p - q).abs() <= 1e-5 + 1e-4 * q.abs(),
                "{what}, source {c}: {p} against {q}"
            );
        }
    };
    close(&row(ga, 0), &row(aa, 1), "token b");
    close(&row(ga, 2), &row(aa, 0), "token a");
    let want: Vec<f32> = row(aa, 0)
        .iter()
        .zip(row(aa, 1))
        .map(|(x, y)| x - y)
        .collect();
    close(&row(ga, 1), &want, "a − b");
    let bad = AttributionConfig {
        targets: vec![Token(vocab)],
        ..AttributionConfig::default()
    };
    let e = attribute(m, &tc, &tokens, &bad).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}

/// Every intervention mode.
const MODES: [Mode; 4] = [
    Mode::FrozenAttention,
    Mode::Live,
    Mode::Replacement,
    Mode::Direct,
];

/// Interventions through a model's MLP override, in every mode: a no-op edit is the model itself,
/// silencing the last position's features moves its logits.
fn interventions_move_the_logits(m: &dyn Attributable, tc: &ReplacementTranscoder, tokens: &[u32]) {
    let clean = m.next_logits(tokens).unwrap();
    let last = tokens.len() - 1;
    let moved = |a: &[f32]| {
        a.iter()
            .zip(&clean)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    let noop: Edit = format!("0:{last}:0*=1").parse().unwrap();
    let silence: Vec<Edit> = (0..tc.cfg.n_layers)
        .flat_map(|l| (0..tc.cfg.n_features).map(move |f| (l, f)))
        .map(|(l, f)| format!("{l}:{last}:{f}=0").parse().unwrap())
        .collect();
    for mode in MODES {
        let r = intervene(m, tc, tokens, &[noop], mode).unwrap();
        assert!(
            moved(&r.logits) < 1e-4,
            "{mode:?}, no-op edit: {}",
            moved(&r.logits)
        );
        let r = intervene(m, tc, tokens, &silence, mode).unwrap();
        assert!(
            moved(&r.logits) > 1e-3,
            "{mode:?}, silenced: {}",
            moved(&r.logits)
        );
    }
    interventions_generate(m, tc, tokens);
}

/// Generation with edits (through the KV cache): a no-op edit at every position continues as the model
/// does; each new token is the argmax of its step's logits, the first step's being the edited logits; and
/// a steering edit of a last-layer feature at every position moves the first generated position's logits
/// as the model does with that position's MLP output changed by exactly (set value − the feature's own
/// activation) × its decoder row (the oracle: the model run with its recorded MLP outputs, that one row
/// changed).
fn interventions_generate(m: &dyn Attributable, tc: &ReplacementTranscoder, tokens: &[u32]) {
    let n_new = 6.min(m.max_seq_len() - tokens.len());
    assert!(n_new >= 2, "room to generate after the prompt");
    let noop: Edit = "0:*:0*=1".parse().unwrap();
    let own = m.generate_greedy(tokens, n_new, None).unwrap();
    assert_eq!(own.len(), n_new);
    for mode in MODES {
        let r = intervene_and_generate(m, tc, tokens, &[noop], mode, n_new, None).unwrap();
        assert_eq!(r.clean_continuation, own);
        assert_eq!(r.continuation, own, "{mode:?}, a no-op edit");
    }
    for mode in MODES {
        generated_position_oracle(m, tc, tokens, mode);
    }
}

/// The first generated position's logits under a last-layer feature set at every position, against the
/// model run with that position's recorded MLP output changed by (value − own activation) × decoder row.
fn generated_position_oracle(
    m: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    mode: Mode,
) {
    let (k, d) = (tc.cfg.n_layers - 1, tc.cfg.d_model);
    // The last layer's feature with the largest decoder row, set far above its activations.
    let norm = |f: usize| {
        tc.dec_row(k, f, k)
            .unwrap()
            .iter()
            .map(|w| w * w)
            .sum::<f32>()
    };
    let f = (0..tc.cfg.n_features)
        .max_by(|&a, &b| norm(a).total_cmp(&norm(b)))
        .unwrap();
    let v = 4.0 / norm(f).sqrt();
    let edit: Edit = format!("{k}:*:{f}={v}").parse().unwrap();
    let r = intervene_and_generate(m, tc, tokens, &[edit], mode, 2, None).unwrap();
    let vocab = r.logits.len();
    assert_eq!(r.continuation.len(), 2);
    assert_eq!(r.step_logits.len(), 2 * vocab);
    assert_eq!(&r.step_logits[..vocab], &r.logits[..]);
    for (i, &t) in r.continuation.iter().enumerate() {
        let row = &r.step_logits[i * vocab..(i + 1) * vocab];
        assert_eq!(t as usize, clt::model::forward::argmax(row));
    }

    let mut seq = tokens.to_vec();
    seq.push(r.continuation[0]);
    let g = tokens.len();
    let all = ForwardOptions {
        hooks: Hooks::all(),
        ..ForwardOptions::default()
    };
    let clean = m.forward_with(&seq, &all).unwrap();
    let x = &tc.input_hook.recorded(&clean.record.layers[k]).unwrap()[g * d..(g + 1) * d];
    let w = &tc.params.w_enc[k][f * d..(f + 1) * d];
    let h = x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + tc.params.b_enc[k][f];
    let a = activation(h, tc.thresholds[k][f]);
    let mut outs: Vec<Vec<f32>> = clean
        .record
        .layers
        .iter()
        .map(|l| l.mlp_out.clone().unwrap())
        .collect();
    let row = tc.dec_row(k, f, k).unwrap();
    outs[k][g * d..(g + 1) * d]
        .iter_mut()
        .zip(row)
        .for_each(|(o, w)| *o += (v - a) * w);
    let want = m
        .forward_with(
            &seq,
            &ForwardOptions {
                logits: Logits::Last,
                intervention: Intervention {
                    mlp_out: Some(&outs),
                    ..Intervention::default()
                },
                ..ForwardOptions::default()
            },
        )
        .unwrap()
        .logits;
    let got = &r.step_logits[vocab..];
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    let clean_next = &clean.logits[g * vocab..];
    assert!(
        diff(&want, clean_next) > 1e-2,
        "the edit moves the generated position's logits: {}",
        diff(&want, clean_next)
    );
    assert!(
        diff(got, &want) < 1e-4,
        "{mode:?}: the generated position's logits against the oracle: {}",
        diff(got, &want)
    );
}

/// A random Gemma-2 of `n_layers` blocks (grouped-query attention with `head_dim` unlike `d / n_heads`,
/// `query_pre_attn_scalar` unlike `head_dim`, soft caps that bite, a window of 4 on the even layers, norms
/// after the attention and the MLP), and prompt token ids for it.
fn random_gemma2(n_layers: usize, seed: u64) -> (Gemma2Model, Vec<u32>) {
    let c = LlamaConfig {
        d_model: 24,
        hidden_dim: 40,
        n_layers,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        vocab_size: 40,
        max_seq_len: 32,
        norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_style: RopeStyle::HalfSplit,
        rope_freq_factors: Vec::new(),
    };
    let mut rng = clt::rng::Rng::seed(seed);
    let mut r =
        |len: usize, s: f64| -> Vec<f32> { (0..len).map(|_| (rng.normal() * s) as f32).collect() };
    let (d, h, v, q, kv) = (c.d_model, c.hidden_dim, c.vocab_size, c.q_dim(), c.kv_dim());
    let sd = 1.0 / (d as f64).sqrt();
    let gain = |r: &mut dyn FnMut(usize, f64) -> Vec<f32>| -> Vec<f32> {
        r(d, 0.2).iter().map(|x| x + 1.0).collect()
    };
    let mut layers = Vec::new();
    let mut post_norms = Vec::new();
    for _ in 0..n_layers {
        layers.push(LayerWeights {
            attn_norm: gain(&mut r),
            wq: r(q * d, 3.0 * sd),
            wk: r(kv * d, 3.0 * sd),
            wv: r(kv * d, sd),
            wo: r(d * q, 1.0 / (q as f64).sqrt()),
            mlp_norm: gain(&mut r),
            w_gate: r(h * d, sd),
            w_up: r(h * d, sd),
            w_down: r(d * h, 1.0 / (h as f64).sqrt()),
        });
        post_norms.push(Gemma2PostNorms {
            attn: gain(&mut r),
            mlp: gain(&mut r),
        });
    }
    let base = LlamaModel {
        tok_embeddings: r(v * d, sd),
        final_norm: gain(&mut r),
        output: None,
        layers,
        config: c,
    };
    let m = Gemma2Model {
        base,
        gemma: Gemma2Config {
            query_pre_attn_scalar: 12.0,
            attn_logit_softcapping: Some(3.0),
            final_logit_softcapping: Some(8.0),
            sliding_window: Some(4),
            sliding_layers: (0..n_layers).map(|l| l % 2 == 0).collect(),
        },
        post_norms,
    };
    m.validate(Path::new("random gemma2")).unwrap();
    let tokens = (0..12u64).map(|i| ((i * 11 + 5) % 40) as u32).collect();
    (m, tokens)
}

/// Gemma-2's linearisation (the frozen post-attention norms, the scaled token embeddings, logits before
/// the soft cap) against the oracle; interventions run through it.
#[test]
fn gemma2_adjacency_columns_match_the_frozen_model_oracle() {
    let (m, tokens) = random_gemma2(3, 21);
    let tc = calibrated_transcoder(&m, &tokens, 48, 6, 5, InputHook::MlpInNormed).unwrap();
    oracle(&m, &tc, &tokens, 80);
    interventions_move_the_logits(&m, &tc, &tokens);
}

/// The same oracle over 150 positions with a window of 40: the recorded patterns span three row blocks of
/// 50-position tiles, the last block's first key tile wholly outside its window.
#[test]
fn gemma2_windows_across_tiles_match_the_oracle() {
    let (mut m, _) = random_gemma2(2, 24);
    m.base.config.max_seq_len = 160;
    m.gemma.sliding_window = Some(40);
    let tokens: Vec<u32> = (0..150u64).map(|i| ((i * 11 + 5) % 40) as u32).collect();
    let tc = calibrated_transcoder(&m, &tokens, 40, 4, 7, InputHook::MlpInNormed).unwrap();
    oracle(&m, &tc, &tokens, 40);
}

/// Gemma Scope's convention on Gemma-2: a transcoder reading the MLP norm before its weight
/// (`mlp_in_unweighted`, TransformerLens's `ln2.hook_normalized` on an RMSNorm), with skip connections
/// through the same frozen unweighted norm, against the oracle; interventions run through it.
#[test]
fn gemma2_with_the_unweighted_norm_hook_matches_the_oracle() {
    let (m, tokens) = random_gemma2(2, 22);
    let tc = calibrated_transcoder(&m, &tokens, 40, 6, 6, InputHook::MlpInUnweighted).unwrap();
    interventions_move_the_logits(&m, &tc, &tokens);
    oracle(&m, &with_skip(tc, 23), &tokens, 60);
}

/// `tc` with random skip connections `W_skip` (`[d, d]` per layer, entries ~0.3/√d).
fn with_skip(mut tc: ReplacementTranscoder, seed: u64) -> ReplacementTranscoder {
    let d = tc.cfg.d_model;
    let mut rng = clt::rng::Rng::seed(seed);
    tc.cfg.skip = true;
    tc.params.w_skip = (0..tc.cfg.n_layers)
        .map(|_| {
            (0..d * d)
                .map(|_| (rng.normal() * 0.3 / (d as f64).sqrt()) as f32)
                .collect()
        })
        .collect();
    tc
}

/// The skip path (the part of the replacement model's MLPs that stays differentiable) through both
/// norms: a transcoder with skip connections reading `resid_mid`, `mlp_in_normed` and `mlp_in_unweighted`
/// on GPT-2 (through the frozen LayerNorm, with and without its weight) and `mlp_in_normed` on
/// stories260K (through the frozen RMSNorm).
#[test]
fn skip_connections_match_the_oracle_through_either_norm() {
    let (g2, tokens) = random_gpt2(2, 12);
    for hook in [
        InputHook::ResidMid,
        InputHook::MlpInNormed,
        InputHook::MlpInUnweighted,
    ] {
        let tc = with_skip(
            calibrated_transcoder(&g2, &tokens, 40, 6, 7, hook).unwrap(),
            8,
        );
        oracle(&g2, &tc, &tokens, 40);
        // Generation: positions after the prompt run the model's MLP, the skip path not added twice.
        interventions_generate(&g2, &tc, &tokens);
    }
    let (m, _, tokens) = setup();
    let tc = calibrated_transcoder(m, &tokens, 64, 4, 9, InputHook::MlpInNormed).unwrap();
    oracle(m, &with_skip(tc, 10), &tokens, 40);
}

/// Checks every error and token column and `n_feature_cols` random feature columns against the oracle.
fn oracle(m: &dyn Attributable, tc: &ReplacementTranscoder, tokens: &[u32], n_feature_cols: usize) {
    let (tc, tokens) = (tc.clone(), tokens.to_vec());
    let g = attribute(m, &tc, &tokens, &AttributionConfig::default()).unwrap();
    let n = tokens.len();
    let lin = m.linear();
    let l_n = lin.n_layers;
    let d = lin.d_model;
    let a = &g.adjacency;
    assert!(
        g.selected.len() > 100,
        "want a graph with enough features: {} active",
        g.selected.len()
    );
    assert_eq!(a.n_errors, l_n * n);
    eprintln!(
        "{} tokens, {} features, {} logits, {:?}",
        n,
        g.selected.len(),
        g.logit_tokens.len(),
        g.timings
    );

    // The frozen state and the clean MLP outputs.
    let base = m
        .forward_with(
            &tokens,
            &ForwardOptions {
                hooks: Hooks {
                    mlp_out: true,
                    attn_pattern: true,
                    norm_scales: true,
                    ..tc.input_hook.hooks()
                },
                logits: Logits::Last,
                ..ForwardOptions::default()
            },
        )
        .unwrap();
    let mlp: Vec<Vec<f32>> = base
        .record
        .layers
        .iter()
        .map(|r| r.mlp_out.clone().unwrap())
        .collect();
    let emb = m.embed(&tokens).unwrap();
    let clean_inputs = inputs(&tc, &base.record);
    let frozen = FrozenMlps {
        tc: &tc,
        mlp: &mlp,
        clean_inputs: &clean_inputs,
    };
    let clean = measure(m, &tc, &g, &base.record, emb.clone(), &frozen);
    let st = clt::attribution::prompt_state(m, &tc, &tokens).unwrap();

    // Sources: every error and token column and 100 random feature columns.
    let mut sources: Vec<usize> = (a.n_features..a.n_sources()).collect();
    let mut rng = clt::rng::Rng::seed(3);
    for _ in 0..n_feature_cols {
        sources.push((rng.next_u64() % a.n_features as u64) as usize);
    }
    let (mut worst_pre, mut worst_logit) = (0.0f32, 0.0f32);
    for &c in &sources {
        let mut mlp2 = mlp.clone();
        let mut emb2 = emb.clone();
        if c < a.n_features {
            // Double the feature's activation: its decoders add a·W_dec to every target layer.
            let (l, p, f, act) = g.feature(c);
            for k in l..l_n {
                if let Some(row) = tc.dec_row(l, f, k) {
                    for (o, w) in mlp2[k][p * d..(p + 1) * d].iter_mut().zip(row) {
                        *o += act * w;
                    }
                }
            }
        } else if c < a.n_features + a.n_errors {
            let (k, p) = ((c - a.n_features) / n, (c - a.n_features) % n);
            for (o, e) in mlp2[k][p * d..(p + 1) * d]
                .iter_mut()
                .zip(&st.errors[k][p * d..(p + 1) * d])
            {
                *o += e;
            }
        } else {
            let p = c - a.n_features - a.n_errors;
            let t = tokens[p] as usize;
            for (o, e) in emb2[p * d..(p + 1) * d]
                .iter_mut()
                .zip(&lin.token_vector(t))
            {
                *o += e;
            }
        }
        let got = measure(
            m,
            &tc,
            &g,
            &base.record,
            emb2,
            &FrozenMlps {
                mlp: &mlp2,
                ..frozen
            },
        );
        for (t, (after, before)) in got.pre.iter().zip(&clean.pre).enumerate() {
            let (delta, want) = (after - before, a.get(t, c));
            let err = (delta - want).abs();
            worst_pre = worst_pre.max(err);
            assert!(
                err <= 1e-3 * (1.0 + want.abs()),
                "feature target {t} ← source {c}: oracle {delta}, adjacency {want}"
            );
        }
        for (j, (after, before)) in got.logits.iter().zip(&clean.logits).enumerate() {
            let (delta, want) = (after - before, a.get(a.n_sources() + j, c));
            let err = (delta - want).abs();
            worst_logit = worst_logit.max(err);
            assert!(
                err <= 1e-5 + 1e-3 * want.abs(),
                "logit {j} ← source {c}: oracle {delta}, adjacency {want}"
            );
        }
    }
    eprintln!(
        "{} source columns checked; worst |Δ − A|: pre-activations {worst_pre:.2e}, logits {worst_logit:.2e}",
        sources.len()
    );

    // `clt intervene --mode direct` is the same linear model: doubling a feature moves each (demeaned,
    // uncapped) logit by its edge.
    let demeaned = |logits: &[f32]| -> Vec<f32> {
        let raw: Vec<f64> = logits
            .iter()
            .map(|&v| match lin.logit_softcap {
                Some(c) => c as f64 * (v as f64 / c as f64).atanh(),
                None => v as f64,
            })
            .collect();
        let mean = raw.iter().sum::<f64>() / raw.len() as f64;
        g.logit_tokens
            .iter()
            .map(|&t| (raw[t as usize] - mean) as f32)
            .collect()
    };
    let mut worst_direct = 0.0f32;
    for &c in sources.iter().filter(|&&c| c < a.n_features).take(12) {
        let (l, p, f, _) = g.feature(c);
        let double: Edit = format!("{l}:{p}:{f}*=2").parse().unwrap();
        let r = intervene(m, &tc, &tokens, &[double], Mode::Direct).unwrap();
        let (after, before) = (demeaned(&r.logits), demeaned(&r.clean_logits));
        for (j, (x, y)) in after.iter().zip(&before).enumerate() {
            let (delta, want) = (x - y, a.get(a.n_sources() + j, c));
            worst_direct = worst_direct.max((delta - want).abs());
            assert!(
                (delta - want).abs() <= 1e-4 + 1e-3 * want.abs(),
                "direct intervention on source {c}, logit {j}: {delta} against the edge {want}"
            );
        }
    }
    eprintln!("direct interventions against the logit edges: worst |Δ − A| {worst_direct:.2e}");

    // The graph's scores are shares.
    let s = scores(a, &g.logit_probs).unwrap();
    assert!((0.0..=1.0).contains(&s.replacement), "{s:?}");
    assert!((0.0..=1.0).contains(&s.completeness), "{s:?}");
    let p = prune(a, &g.logit_probs, 0.8, 0.98).unwrap();
    assert!(
        p.node_mask[a.n_sources()..].iter().all(|&k| k),
        "logits kept"
    );
}

#[test]
fn a_graph_that_would_not_fit_is_refused_with_its_size() {
    let (m, tc, tokens) = setup();
    // Too little for the recorded forward: refused before it runs, naming the prompt's length.
    let cfg = AttributionConfig {
        memory_limit: Some(1 << 10),
        ..AttributionConfig::default()
    };
    let err = attribute(m, &tc, &tokens, &cfg).unwrap_err().to_string();
    assert!(
        err.contains(&format!("a prompt of {} tokens", tokens.len()))
            && err.contains("recorded forward")
            && err.contains("GiB"),
        "{err}"
    );
    // Enough for the forward, not for the adjacency.
    let record = clt::attribution::graph::recorded_bytes(&m.linear(), tokens.len());
    let cfg = AttributionConfig {
        memory_limit: Some(record + (1 << 10)),
        ..AttributionConfig::default()
    };
    let err = attribute(m, &tc, &tokens, &cfg).unwrap_err().to_string();
    assert!(
        err.contains("max_feature_nodes") && err.contains("GiB"),
        "{err}"
    );
}

#[test]
fn explored_rows_equal_the_full_graphs_rows() {
    let (m, tc, tokens) = setup();
    let full = attribute(m, &tc, &tokens, &AttributionConfig::default()).unwrap();
    let cfg = AttributionConfig {
        max_feature_nodes: Some(full.selected.len() / 3),
        batch_size: 16,
        update_interval: 2,
        backward_batch: 7,
        ..AttributionConfig::default()
    };
    let part = attribute(m, &tc, &tokens, &cfg).unwrap();
    assert_eq!(part.selected.len(), full.selected.len() / 3);
    assert!(part.selected.windows(2).all(|w| w[0] < w[1]));
    let (fa, pa) = (&full.adjacency, &part.adjacency);
    // Map the explored graph's nodes back to the full graph's and compare every stored entry.
    let src_map = |j: usize| -> usize {
        if j < pa.n_features {
            part.selected[j]
        } else {
            fa.n_features + (j - pa.n_features)
        }
    };
    for r in 0..pa.n_rows() {
        let fr = if r < pa.n_features {
            part.selected[r]
        } else {
            fa.n_features + (r - pa.n_features)
        };
        for j in 0..pa.n_sources() {
            let (x, y) = (pa.row(r)[j], fa.row(fr)[src_map(j)]);
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "row {r} col {j}: {x} vs {y}"
            );
        }
    }
    // The first feature rows explored are the most influential on the logits: every selected feature has
    // a non-zero path to them, so no selected feature can have zero influence.
    let infl = clt::attribution::prune::node_influence(pa, &part.logit_probs).unwrap();
    assert!(infl[..pa.n_features].iter().any(|&v| v > 0.0));
}

#[test]
fn circuit_tracer_export_gives_the_same_graph_and_json() {
    let (m, tc, tokens) = setup();
    let f = fixture();
    let lt = load_transcoder(&f.export, None, NormKind::Rms).unwrap();
    assert_eq!(lt.input_hook, InputHook::MlpInNormed);
    let tc2 = ReplacementTranscoder::new(&lt.transcoder, lt.input_hook).unwrap();
    let a = attribute(m, &tc, &tokens, &AttributionConfig::default()).unwrap();
    let b = attribute(m, &tc2, &tokens, &AttributionConfig::default()).unwrap();
    assert_eq!(a.selected.len(), b.selected.len());
    let worst = a
        .adjacency
        .rows
        .iter()
        .zip(&b.adjacency.rows)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "export round trip changes edges by {worst}");

    // The frontend JSON: ids, kinds and links that refer to nodes.
    let p = prune(&a.adjacency, &a.logit_probs, 0.8, 0.98).unwrap();
    let s = scores(&a.adjacency, &a.logit_probs).unwrap();
    let j = clt::attribution::output::graph_json(
        &a,
        &p,
        &s,
        &f.model.tokenizer,
        "test",
        "stories260K",
        PROMPT,
        0.8,
    );
    let ids: std::collections::HashSet<&str> = j.nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids.len(), j.nodes.len(), "node ids are unique");
    assert!(j.links.iter().all(|l| ids.contains(l.source.as_str())));
    assert!(j.links.iter().all(|l| ids.contains(l.target.as_str())));
    assert_eq!(
        j.nodes
            .iter()
            .filter(|n| n.feature_type == "embedding")
            .count(),
        tokens.len()
    );
    assert_eq!(
        j.nodes.iter().filter(|n| n.feature_type == "logit").count(),
        a.logit_tokens.len()
    );
    assert!(
        j.nodes
            .iter()
            .any(|n| n.feature_type == "cross layer transcoder")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.json");
    clt::attribution::output::write_json(&path, &j).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["metadata"]["schema_version"], 1);
    assert!(v["nodes"][0]["jsNodeId"].is_string());
    let raw = dir.path().join("g.graph.safetensors");
    clt::attribution::output::write_raw(&raw, &a, PROMPT).unwrap();
    let bytes = std::fs::read(&raw).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("adjacency").unwrap().shape(),
        &[a.adjacency.n_rows(), a.adjacency.n_sources()]
    );
}

#[test]
fn damaged_transcoder_files_name_the_tensor() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&f.export).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    // Rewrite layer 2's encoder file without its b_enc, then with a misshapen one.
    let path = dir.path().join("W_enc_2.safetensors");
    let mut file = clt::clt::checkpoint::TensorFile::read(&path).unwrap();
    let shape = file.shape("W_enc_2").unwrap().to_vec();
    let w = file.take("W_enc_2", &shape).unwrap();
    let write = |b_enc: Option<Vec<f32>>| {
        let mut t = vec![clt::clt::checkpoint::TensorOut {
            name: "W_enc_2".into(),
            shape: shape.clone(),
            data: &w,
        }];
        let b = b_enc.unwrap_or_default();
        if !b.is_empty() {
            t.push(clt::clt::checkpoint::TensorOut {
                name: "b_enc_2".into(),
                shape: vec![b.len()],
                data: &b,
            });
        }
        clt::clt::checkpoint::write_tensors(&path, &t, None).unwrap();
    };
    write(None);
    let err = load_transcoder(dir.path(), None, NormKind::Rms)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("b_enc_2") && err.contains("W_enc_2.safetensors"),
        "{err}"
    );
    write(Some(vec![0.0; 7]));
    let err = load_transcoder(dir.path(), None, NormKind::Rms)
        .unwrap_err()
        .to_string();
    assert!(err.contains("b_enc_2"), "{err}");
    // A transcoder for another model: wrong width.
    let (m, _, tokens) = setup();
    let mut t = load_transcoder(&f.checkpoint, None, NormKind::Rms)
        .unwrap()
        .transcoder;
    t.cfg.n_layers -= 1;
    t.params.w_enc.pop();
    let tc = ReplacementTranscoder {
        cfg: t.cfg.clone(),
        params: t.params.clone(),
        thresholds: vec![],
        topk: None,
        input_hook: InputHook::MlpInNormed,
    };
    let err = attribute(m, &tc, &tokens, &AttributionConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("transcoder"), "{err}");
}

#[test]
fn interventions_without_edits_reproduce_the_model_and_edits_move_the_logits() {
    let (m, tc, tokens) = setup();
    let clean = m.next_logits(&tokens).unwrap();
    // A no-op edit (scale by one) runs the replacement model: exactly the model.
    let g = attribute(m, &tc, &tokens, &AttributionConfig::default()).unwrap();
    let (l, p, f, act) = g.feature(g.selected.len() - 1);
    let noop: Edit = format!("{l}:{p}:{f}*=1").parse().unwrap();
    for mode in MODES {
        let r = intervene(m, &tc, &tokens, &[noop], mode).unwrap();
        let diff = r
            .logits
            .iter()
            .zip(&clean)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{mode:?} differs from the model by {diff}");
    }
    // Silencing every feature at the last position changes the prediction.
    let last = tokens.len() - 1;
    let edits: Vec<Edit> = (0..g.selected.len())
        .map(|i| g.feature(i))
        .filter(|&(_, p, _, _)| p == last)
        .map(|(l, p, f, _)| format!("{l}:{p}:{f}=0").parse().unwrap())
        .collect();
    assert!(!edits.is_empty());
    let r = intervene(m, &tc, &tokens, &edits, Mode::default()).unwrap();
    let moved = r
        .logits
        .iter()
        .zip(&clean)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        moved > 1e-2,
        "silencing {} features moved logits by {moved}",
        edits.len()
    );
    assert!(act > 0.0);
    // Bad edits are refused with the reason.
    for bad in ["1:2", "a:1:2=3", "1:1:2=inf"] {
        assert!(bad.parse::<Edit>().is_err(), "{bad}");
    }
    let far: Edit = format!("{l}:{}:{f}=1", tokens.len()).parse().unwrap();
    assert!(intervene(m, &tc, &tokens, &[far], Mode::default()).is_err());
    interventions_generate(m, &tc, &tokens);
}

/// Feature `f`'s activation in layer `l` at a position whose transcoder input is `x` (`[d]`), written out:
/// its pre-activation against its threshold, or, for a TopK transcoder, whether it is among the `k` largest
/// of the position's pre-activations (all of them sorted; ties to the lower index) and positive.
fn written_out_activation(tc: &ReplacementTranscoder, l: usize, x: &[f32], f: usize) -> f32 {
    let d = tc.cfg.d_model;
    let pre = |g: usize| -> f32 {
        let w = &tc.params.w_enc[l][g * d..(g + 1) * d];
        x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + tc.params.b_enc[l][g]
    };
    match tc.topk {
        None => activation(pre(f), tc.thresholds[l][f]),
        Some(k) => {
            let h: Vec<f32> = (0..tc.cfg.n_features).map(pre).collect();
            let mut order: Vec<usize> = (0..h.len()).collect();
            order.sort_by(|&a, &b| h[b].total_cmp(&h[a]).then(a.cmp(&b)));
            if order[..k].contains(&f) {
                h[f].max(0.0)
            } else {
                0.0
            }
        }
    }
}

/// circuit-tracer's rule written out independently: the model's own MLP plus, for each set feature, its
/// change of activation (from the current stream) times its decoder rows to this and later layers.
#[derive(Debug)]
struct ModelPlusChanges<'a> {
    tc: &'a ReplacementTranscoder,
    /// (layer, position, feature, value).
    sets: Vec<(usize, usize, usize, f32)>,
    /// This forward's (layer, position, feature, change) so far.
    changes: std::sync::Mutex<Vec<(usize, usize, usize, f32)>>,
}

impl MlpOverride for ModelPlusChanges<'_> {
    fn mlp_out(&self, k: usize, inputs: &MlpInputs<'_>) -> Vec<f32> {
        let (tc, d) = (self.tc, self.tc.cfg.d_model);
        let x = tc.input_hook.of(inputs);
        let mut changes = self.changes.lock().unwrap();
        if k == 0 {
            changes.clear();
        }
        for &(l, p, f, v) in self.sets.iter().filter(|s| s.0 == k) {
            let a = written_out_activation(tc, l, &x[p * d..(p + 1) * d], f);
            changes.push((l, p, f, v - a));
        }
        let mut out = inputs.model_mlp.unwrap().to_vec();
        for &(l, p, f, c) in changes.iter() {
            for (o, w) in out[p * d..(p + 1) * d]
                .iter_mut()
                .zip(tc.dec_row(l, f, k).unwrap())
            {
                *o += c * w;
            }
        }
        out
    }

    fn wants_model_mlp(&self, _: usize, _: usize) -> bool {
        true
    }
}

/// The default mode is circuit-tracer's `feature_intervention` (attention patterns frozen at the clean
/// run's, the model's MLPs plus the set features' changes) and `live` the same with attention recomputed:
/// both against the rule written out above, on stories260K with features set at early positions (whose
/// effect on the last position goes through attention, so freezing the patterns matters).
#[test]
fn frozen_attention_and_live_modes_are_circuit_tracers() {
    let (m, tc, tokens) = setup();
    modes_follow_the_rule(m, &tc, &tokens, &[]);
}

/// [`Mode::FrozenAttention`] and [`Mode::Live`] against [`ModelPlusChanges`], with features of layer 0 at
/// positions 1–3 set to ten times their activation, and the (layer, position, feature, value) sets `more`.
fn modes_follow_the_rule(
    m: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    more: &[(usize, usize, usize, f32)],
) {
    let (tc, tokens) = (tc.clone(), tokens.to_vec());
    let g = attribute(m, &tc, &tokens, &AttributionConfig::default()).unwrap();
    let mut sets: Vec<(usize, usize, usize, f32)> = (0..g.selected.len())
        .map(|i| g.feature(i))
        .filter(|&(l, p, _, _)| l == 0 && (1..4).contains(&p))
        .take(6)
        .map(|(l, p, f, a)| (l, p, f, 10.0 * a))
        .collect();
    assert!(!sets.is_empty());
    sets.extend_from_slice(more);
    let edits: Vec<Edit> = sets
        .iter()
        .map(|(l, p, f, v)| format!("{l}:{p}:{f}={v}").parse().unwrap())
        .collect();
    let clean = m
        .forward_with(
            &tokens,
            &ForwardOptions {
                hooks: Hooks::frozen_state(),
                ..ForwardOptions::default()
            },
        )
        .unwrap();
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    let mut got = Vec::new();
    for (mode, frozen) in [(Mode::FrozenAttention, true), (Mode::Live, false)] {
        let rule = ModelPlusChanges {
            tc: &tc,
            sets: sets.clone(),
            changes: Default::default(),
        };
        let want = m
            .forward_with(
                &tokens,
                &ForwardOptions {
                    logits: Logits::Last,
                    intervention: Intervention {
                        frozen: frozen.then_some(&clean.record),
                        patterns_only: true,
                        mlp_fn: Some(&rule),
                        ..Intervention::default()
                    },
                    ..ForwardOptions::default()
                },
            )
            .unwrap()
            .logits;
        let r = intervene(m, &tc, &tokens, &edits, mode).unwrap();
        assert!(
            diff(&r.logits, &want) < 1e-4,
            "{mode:?} against the rule: {}",
            diff(&r.logits, &want)
        );
        assert!(
            diff(&r.logits, &r.clean_logits) > 1e-2,
            "{mode:?} moves the logits"
        );
        got.push(r.logits);
    }
    assert!(
        diff(&got[0], &got[1]) > 1e-3,
        "freezing the patterns matters here: {}",
        diff(&got[0], &got[1])
    );
}

/// `clt <command>` on the fixture's model, tokenizer and exported transcoder, then `extra`.
fn clt_on_fixture(command: &str, extra: &[&str]) -> std::process::Output {
    let (f, s) = (fixture(), shared());
    let model = s.join("models/stories260K/stories260K.bin");
    let tok = s.join("models/stories260K/tok512.bin");
    std::process::Command::new(env!("CARGO_BIN_EXE_clt"))
        .arg(command)
        .args(["--model", model.to_str().unwrap()])
        .args(["--tokenizer", tok.to_str().unwrap()])
        .args(["--transcoder", f.export.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn the_attribute_and_intervene_commands_write_a_graph_and_print_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("graphs/lily.json");
    // `clt <command>` with the prompt, then `extra`.
    let run = |command: &str, extra: &[&str]| {
        let mut all = vec!["--prompt", PROMPT];
        all.extend(extra);
        clt_on_fixture(command, &all)
    };
    let o = run(
        "attribute",
        &[
            "--max-feature-nodes",
            "500",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("500 feature nodes"), "{stdout}");
    assert!(stdout.contains("replacement score"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(v["metadata"]["slug"], "lily");
    assert!(v["links"].as_array().unwrap().len() > 10);
    assert!(dir.path().join("graphs/lily.graph.safetensors").is_file());

    // Chosen logit targets: a token by its text and by its id, and a logit difference.
    let diff = dir.path().join("graphs/diff.json");
    let o = run(
        "attribute",
        &[
            "--max-feature-nodes",
            "100",
            "--target",
            "Lily",
            "--versus",
            "#298",
            "--target",
            "#426",
            "--versus",
            "day",
            "--out",
            diff.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&diff).unwrap()).unwrap();
    let logits: Vec<String> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["feature_type"] == "logit")
        .map(|n| n["clerp"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(logits.len(), 2, "{logits:?}");
    assert!(logits.iter().all(|c| c.contains("\" − \"")), "{logits:?}");
    for (args, says) in [
        (vec!["--target", "a little girl"], "not one"),
        (vec!["--target", "#99999"], "outside the vocabulary"),
        (
            vec!["--target", "girl", "--target", "boy", "--versus", "dog"],
            "1 --versus for 2 --target",
        ),
        (vec!["--target", "Lily", "--versus", "#317"], "with itself"),
    ] {
        let mut all = args.clone();
        all.extend(["--out", diff.to_str().unwrap(), "--quiet"]);
        let o = run("attribute", &all);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }

    let o = run("intervene", &["--set", "0:3:1=5.0", "--set", "1:*:2*=0"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("with the edits:"), "{stdout}");
    assert!(!stdout.contains("continuation"), "{stdout}");
    // With `--generate`, both continuations, quoted.
    let o = run(
        "intervene",
        &["--set", "0:*:1=5.0", "--set", "1:*:2*=0", "--generate", "8"],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}");
    for head in ["clean continuation: \"", "continuation with the edits: \""] {
        assert!(stdout.contains(head), "{stdout}");
    }
    // Each mode runs; an unknown one is refused with the choices.
    for mode in ["frozen-attention", "live", "replacement", "direct"] {
        let o = run("intervene", &["--set", "0:3:1=5.0", "--mode", mode]);
        assert!(
            o.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // The JSON record.
    let json = dir.path().join("iv/result.json");
    let o = run(
        "intervene",
        &[
            "--set",
            "0:*:1=5.0",
            "--generate",
            "4",
            "--top",
            "3",
            "--mode",
            "direct",
            "--watch",
            "Lily",
            "--watch",
            "#426",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("watched (clean -> with the edits):"),
        "{stdout}"
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["mode"], "direct");
    let watch = v["watch"].as_array().unwrap();
    assert_eq!(watch.len(), 2);
    assert_eq!(watch[0]["token"], 317);
    assert_eq!(watch[1]["token"], 426);
    for w in watch {
        for k in ["clean_prob", "prob", "clean_logit", "logit"] {
            assert!(w[k].as_f64().is_some(), "{w}");
        }
    }
    assert_eq!(v["edits"][0], "0:*:1=5.0");
    assert_eq!(v["top"].as_array().unwrap().len(), 3);
    assert_eq!(v["clean_top"].as_array().unwrap().len(), 3);
    let cont = &v["continuation"];
    assert_eq!(cont["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(cont["probs"].as_array().unwrap().len(), 4);
    assert!(cont["text"].as_str().is_some());
    let p0 = v["top"][0]["prob"].as_f64().unwrap();
    assert_eq!(cont["tokens"][0], v["top"][0]["token"]);
    assert!((cont["probs"][0].as_f64().unwrap() - p0).abs() < 1e-6);
    let o = run("intervene", &["--set", "0:3:1=5.0", "--mode", "frozen"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("frozen-attention"));
    // A bad edit names itself.
    let o = run("intervene", &["--set", "0:3=5"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("0:3=5"));

    // The prompt from a file (its final line break not part of it) gives the same logits; a missing file
    // is named; a prompt given both ways is refused.
    let with_file = |file: &Path, both: bool| {
        let mut extra = vec![
            "--prompt-file",
            file.to_str().unwrap(),
            "--set",
            "0:3:1=5.0",
        ];
        if both {
            extra.extend(["--prompt", PROMPT]);
        }
        clt_on_fixture("intervene", &extra)
    };
    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, format!("{PROMPT}\n")).unwrap();
    let by_file = with_file(&file, false);
    assert!(by_file.status.success());
    let by_arg = run("intervene", &["--set", "0:3:1=5.0"]);
    assert_eq!(by_file.stdout, by_arg.stdout);
    let o = with_file(&dir.path().join("absent.txt"), false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("absent.txt"));
    let o = with_file(&file, true);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
}

/// `prompt_activations` against everything written out here: the active features from the encoder rows
/// and thresholds, each layer's fit from a reconstruction summed feature by feature, the traces'
/// pre-activations; with and without skip connections.
#[test]
fn prompt_activations_are_the_encoders_and_the_fit_is_the_error_nodes() {
    use clt::attribution::activations::prompt_activations;
    let (m, tc, tokens) = setup();
    for tc in [tc.clone(), with_skip(tc, 31)] {
        let (l_n, d, f_n) = (tc.cfg.n_layers, tc.cfg.d_model, tc.cfg.n_features);
        let n = tokens.len();
        let out = m
            .forward_with(
                &tokens,
                &ForwardOptions {
                    hooks: Hooks {
                        mlp_out: true,
                        ..tc.input_hook.hooks()
                    },
                    ..ForwardOptions::default()
                },
            )
            .unwrap();
        let xs = inputs(&tc, &out.record);
        let pre = |l: usize, p: usize, f: usize| -> f32 {
            let w = &tc.params.w_enc[l][f * d..(f + 1) * d];
            let x = &xs[l][p * d..(p + 1) * d];
            x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + tc.params.b_enc[l][f]
        };
        // A feature that fires somewhere, the strongest of a middle position, and one that never fires.
        let mut firing = (0, 0);
        let mut silent = None;
        for l in 0..l_n {
            for f in 0..f_n {
                let acts: Vec<f32> = (1..n)
                    .map(|p| activation(pre(l, p, f), tc.thresholds[l][f]))
                    .collect();
                if acts.iter().all(|&a| a == 0.0) {
                    silent.get_or_insert((l, f));
                } else if firing == (0, 0) && l > 0 {
                    firing = (l, f);
                }
            }
        }
        let silent = silent.expect("some feature never fires");
        let watch = [firing, silent, (0, 3)];
        let pa = prompt_activations(m, &tc, &tokens, &watch).unwrap();
        // The graph's features, exactly.
        let st = clt::attribution::prompt_state(m, &tc, &tokens).unwrap();
        assert_eq!(pa.features, st.features);
        assert_eq!(pa.tokens, tokens);
        // Against the encoder rows: every active feature, and no other (but at the threshold's edge).
        let af = &pa.features;
        let mut listed = std::collections::HashSet::new();
        for i in 0..af.len() {
            let (l, p, f) = (
                af.layer[i] as usize,
                af.pos[i] as usize,
                af.index[i] as usize,
            );
            assert!(p > 0, "position 0 keeps no features");
            let want = pre(l, p, f);
            assert!(
                (af.value[i] - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{l}:{p}:{f}: {} vs {want}",
                af.value[i]
            );
            listed.insert((l, p, f));
        }
        for l in 0..l_n {
            for p in 1..n {
                for f in 0..f_n {
                    let h = pre(l, p, f);
                    let th = tc.thresholds[l][f];
                    if activation(h, th) > 0.0 && !listed.contains(&(l, p, f)) {
                        assert!((h - th.max(0.0)).abs() < 1e-4, "{l}:{p}:{f} fires unlisted");
                    }
                }
            }
        }
        // The fit: the reconstruction summed here, feature by feature.
        for (k, fit) in pa.layers.iter().enumerate() {
            let y = out.record.layers[k].mlp_out.as_ref().unwrap();
            let (mut err_sq, mut out_sq) = (0.0f64, 0.0f64);
            let mut mean = vec![0.0f64; d];
            for p in 1..n {
                for (j, m) in mean.iter_mut().enumerate() {
                    *m += y[p * d + j] as f64 / (n - 1) as f64;
                }
            }
            let mut var = 0.0f64;
            for p in 1..n {
                let mut yhat = tc.params.b_dec[k].clone();
                for i in 0..af.len() {
                    let (l, q, f) = (
                        af.layer[i] as usize,
                        af.pos[i] as usize,
                        af.index[i] as usize,
                    );
                    if q == p
                        && let Some(row) = tc.dec_row(l, f, k)
                    {
                        yhat.iter_mut()
                            .zip(row)
                            .for_each(|(o, w)| *o += af.value[i] * w);
                    }
                }
                if tc.cfg.skip {
                    add_skip(&tc, k, &xs[k][p * d..(p + 1) * d], &mut yhat);
                }
                let yp = &y[p * d..(p + 1) * d];
                let es: f64 = yp
                    .iter()
                    .zip(&yhat)
                    .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                    .sum();
                let ys: f64 = yp.iter().map(|a| (*a as f64).powi(2)).sum();
                var += yp
                    .iter()
                    .zip(&mean)
                    .map(|(a, m)| (*a as f64 - m).powi(2))
                    .sum::<f64>();
                err_sq += es;
                out_sq += ys;
                let by_pos = (es / ys).sqrt();
                assert!(
                    (fit.error_by_position[p] as f64 - by_pos).abs() <= 1e-4 * by_pos.max(1e-3),
                    "layer {k} position {p}: {} vs {by_pos}",
                    fit.error_by_position[p]
                );
            }
            assert_eq!(fit.error_by_position[0], 0.0);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1e-6);
            assert!(
                close(fit.error_share, err_sq / out_sq),
                "layer {k}: {fit:?}"
            );
            assert!(close(fit.nmse, err_sq / var), "layer {k}: {fit:?}");
            let active = (0..af.len()).filter(|&i| af.layer[i] as usize == k).count();
            assert_eq!(fit.l0, active as f64 / (n - 1) as f64);
        }
        // The traces, in the order asked: pre-activations everywhere, the list's activations.
        assert_eq!(pa.traces.len(), watch.len());
        for (t, &(l, f)) in pa.traces.iter().zip(&watch) {
            assert_eq!((t.layer, t.feature), (l, f));
            assert_eq!(t.threshold, tc.thresholds[l][f]);
            assert_eq!(t.activation[0], 0.0);
            for p in 0..n {
                let want = pre(l, p, f);
                assert!((t.pre[p] - want).abs() <= 1e-5 * want.abs().max(1.0));
                let listed = (0..af.len()).find(|&i| {
                    (
                        af.layer[i] as usize,
                        af.pos[i] as usize,
                        af.index[i] as usize,
                    ) == (l, p, f)
                });
                assert_eq!(t.activation[p], listed.map_or(0.0, |i| af.value[i]));
            }
        }
        assert!(pa.traces[0].activation.iter().any(|&a| a > 0.0));
        assert!(pa.traces[1].activation.iter().all(|&a| a == 0.0));
        // The strongest features of each position: sorted, and the position's largest first.
        for p in 0..n {
            let top = pa.top_at(p, 4);
            let at: Vec<usize> = (0..af.len()).filter(|&i| af.pos[i] as usize == p).collect();
            assert_eq!(top.len(), at.len().min(4));
            assert!(top.iter().all(|&i| af.pos[i] as usize == p));
            assert!(top.windows(2).all(|w| af.value[w[0]] >= af.value[w[1]]));
            if let Some(&first) = top.first() {
                let max = at.iter().map(|&i| af.value[i]).fold(f32::MIN, f32::max);
                assert_eq!(af.value[first], max);
            }
        }
        // A feature outside the transcoder is refused.
        let e = prompt_activations(m, &tc, &tokens, &[(l_n, 0)]).unwrap_err();
        assert!(e.to_string().contains(&format!("{l_n}:0")), "{e}");
    }
}

#[test]
fn the_activations_command_lists_features_traces_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("feats");
    std::fs::create_dir_all(&feats).unwrap();
    let mut labels = clt::features::labels::Labels::default();
    labels.insert(2, 7, "a label for 2:7".into());
    labels.write(&feats).unwrap();
    let run_many = |extra: &[&str]| clt_on_fixture("activations", extra);
    let run = |extra: &[&str]| {
        let mut all = vec!["--prompt", PROMPT];
        all.extend(extra);
        run_many(&all)
    };
    let json = dir.path().join("acts/lily.json");
    let o = run(&[
        "--top",
        "3",
        "--feature",
        "2:7",
        "--feature",
        "4:100",
        "--labels",
        feats.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "layer      L0      NMSE  error share",
        "strongest features",
        "feature 2:7 \"a label for 2:7\" (θ ",
        "feature 4:100 (θ ",
        "fires at ",
    ] {
        assert!(stdout.contains(want), "{want}: {stdout}");
    }
    // The JSON is the library's result.
    let (m, tc, tokens) = setup();
    let pa =
        clt::attribution::activations::prompt_activations(m, &tc, &tokens, &[(2, 7), (4, 100)])
            .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), tokens.len());
    assert_eq!(v["pieces"].as_array().unwrap().len(), tokens.len());
    assert_eq!(v["layers"].as_array().unwrap().len(), tc.cfg.n_layers);
    for (l, fit) in pa.layers.iter().enumerate() {
        assert_eq!(v["layers"][l]["l0"].as_f64().unwrap(), fit.l0);
        assert!((v["layers"][l]["error_share"].as_f64().unwrap() - fit.error_share).abs() < 1e-12);
    }
    let active = &v["active"];
    assert_eq!(
        active["feature"].as_array().unwrap().len(),
        pa.features.len()
    );
    assert_eq!(
        active["position"].as_array().unwrap().len(),
        pa.features.len()
    );
    let top = v["top"].as_array().unwrap();
    assert_eq!(top.len(), tokens.len());
    assert!(
        top[0].as_array().unwrap().is_empty(),
        "position 0 keeps none"
    );
    for (p, t) in top.iter().enumerate().skip(1) {
        let want = pa.top_at(p, 3);
        let got = t.as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, &i) in got.iter().zip(&want) {
            assert_eq!(g["layer"], pa.features.layer[i]);
            assert_eq!(g["feature"], pa.features.index[i]);
        }
    }
    let traces = v["traces"].as_array().unwrap();
    assert_eq!(traces[0]["label"], "a label for 2:7");
    assert!(traces[1]["label"].is_null());
    assert_eq!(
        traces[1]["activation"].as_array().unwrap().len(),
        tokens.len()
    );
    // Many prompts: a JSON line each, the single prompt's record; a failing one recorded, the rest run.
    let file = dir.path().join("prompts.jsonl");
    let long = vec!["dog"; 700].join(" ");
    std::fs::write(
        &file,
        format!(
            "{}\n{}\n",
            serde_json::json!({"prompt": long, "slug": "long"}),
            serde_json::json!({"prompt": PROMPT, "slug": "lily"})
        ),
    )
    .unwrap();
    let lines_file = dir.path().join("many.jsonl");
    let o = run_many(&[
        "--prompts",
        file.to_str().unwrap(),
        "--feature",
        "2:7",
        "--json",
        lines_file.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 of 2 prompts failed (long)"));
    assert!(
        stdout.contains("lily: ") && stdout.contains("  2:7 "),
        "{stdout}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&lines_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["slug"], "long");
    assert!(lines[0]["error"].as_str().unwrap().contains("max_seq_len"));
    assert_eq!(lines[1]["slug"], "lily");
    assert_eq!(lines[1]["prompt"], PROMPT);
    let want = pa.traces[0]
        .activation
        .iter()
        .map(|&a| serde_json::json!(a))
        .collect::<Vec<_>>();
    let got: Vec<serde_json::Value> =
        serde_json::from_str(&lines[1]["traces"][0]["activation"].to_string()).unwrap();
    assert_eq!(got, want);
    assert_eq!(
        lines[1]["active"]["feature"].as_array().unwrap().len(),
        pa.features.len()
    );
    // Bad requests name themselves.
    for (args, says) in [
        (vec!["--feature", "5:1"], "past the transcoder's 5 layers"),
        (vec!["--feature", "1:99999"], "features per layer"),
        (vec!["--feature", "1-2"], "LAYER:FEATURE"),
        (vec!["--feature", "x:2"], "`x`"),
        (
            vec!["--labels", "/nonexistent/feats"],
            "not a features directory",
        ),
    ] {
        let o = run(&args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// `clt attribute --prompts`: one graph per prompt, each the graph `--prompt` writes; a prompt that fails
/// is recorded and does not stop the others; the prompts file's errors name their line.
#[test]
fn attribute_with_many_prompts_writes_each_graph_and_a_summary() {
    use clt::attribution::cli::read_prompts;
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut all = vec!["--max-feature-nodes", "200", "--quiet"];
        all.extend(extra);
        clt_on_fixture("attribute", &all)
    };
    let park = "Lily went to the park.\nShe";
    let file = dir.path().join("prompts.jsonl");
    let lines = [
        serde_json::json!({"prompt": park, "slug": "park"}),
        serde_json::json!({"prompt": vec!["dog"; 700].join(" ")}),
        serde_json::json!({"prompt": PROMPT}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, text).unwrap();
    let out = dir.path().join("graphs");
    let o = run(&[
        "--prompts",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "one prompt is too long");
    assert!(
        stderr.contains("1 of 3 prompts failed (002-dog-dog-dog-dog-dog)"),
        "{stderr}"
    );
    let summary: Vec<serde_json::Value> = std::fs::read_to_string(out.join("summary.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(summary.len(), 3);
    assert!(
        summary[1]["error"]
            .as_str()
            .unwrap()
            .contains("max_seq_len")
    );
    let slugs = ["park", "003-once-upon-a-time-there"];
    for (line, slug) in [&summary[0], &summary[2]].into_iter().zip(slugs) {
        assert_eq!(line["slug"], slug);
        assert_eq!(line["graph"], format!("{slug}.json"));
        assert!(line["replacement_score"].as_f64().unwrap() > 0.0);
        assert!(out.join(format!("{slug}.graph.safetensors")).is_file());
    }
    assert!(!out.join("002-dog-dog-dog-dog-dog.json").exists());
    // Each graph is the one a single `--prompt` run writes.
    let single = dir.path().join("single");
    for (prompt, slug) in [(park, "park"), (PROMPT, slugs[1])] {
        let one = single.join(format!("{slug}.json"));
        let o = run(&["--prompt", prompt, "--out", one.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
        };
        let (a, b) = (read(&out.join(format!("{slug}.json"))), read(&one));
        assert_eq!(a["nodes"], b["nodes"], "{slug}");
        assert_eq!(a["links"], b["links"], "{slug}");
        assert_eq!(a["metadata"]["prompt"], prompt);
    }
    // Plain text: a prompt a line, blank lines skipped, slugs by line number.
    let txt = dir.path().join("prompts.txt");
    std::fs::write(&txt, "Once upon a time\r\n\nThe cat sat. It\n").unwrap();
    let got = read_prompts(&txt).unwrap();
    let pairs: Vec<(&str, &str)> = got
        .iter()
        .map(|p| (p.slug.as_str(), p.prompt.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("001-once-upon-a-time", "Once upon a time"),
            ("003-the-cat-sat-it", "The cat sat. It")
        ]
    );
    // Bad files name the line.
    for (body, says) in [
        (
            "{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"slug\": \"../x\"}\n",
            "line 2: slug \"../x\"",
        ),
        (
            "{\"prompt\": \"a\", \"slug\": \"s\"}\n{\"prompt\": \"b\", \"slug\": \"s\"}\n",
            "line 2: slug \"s\" is used twice",
        ),
        ("{\"prompt\": \"\"}\n", "line 1: an empty prompt"),
        ("{\"prompt\": \"a\"}\nnot json\n", "byte 16: line 2: not a"),
        ("{\"text\": \"a\"}\n", "line 1: not a"),
        ("\n\n", "no prompts"),
    ] {
        std::fs::write(&file, body).unwrap();
        let e = read_prompts(&file).unwrap_err().to_string();
        assert!(
            e.contains(says) && e.contains("prompts.jsonl"),
            "{body:?}: {e}"
        );
    }
    let o = run(&[
        "--prompts",
        file.to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        "y",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
}

/// A spliced forward computed independently: the transcoder's output at every layer from the inputs a
/// forward with those outputs records (the attribution path's batch `encode` and `reconstruct`), iterated
/// until it no longer changes (layer `k`'s output depends on layers `< k` only, so `L + 1` rounds reach the
/// fixed point); position 0 keeps the model's MLP output.
fn spliced_reference(m: &dyn Attributable, tc: &ReplacementTranscoder, tokens: &[u32]) -> Vec<f32> {
    let (n, d) = (tokens.len(), tc.cfg.d_model);
    let hooks = Hooks {
        mlp_out: true,
        ..tc.input_hook.hooks()
    };
    let clean = m
        .forward_with(
            tokens,
            &ForwardOptions {
                hooks,
                ..ForwardOptions::default()
            },
        )
        .unwrap();
    let model_out: Vec<Vec<f32>> = clean
        .record
        .layers
        .iter()
        .map(|r| r.mlp_out.clone().unwrap())
        .collect();
    let mut outs = model_out.clone();
    for _ in 0..=tc.cfg.n_layers {
        let opts = ForwardOptions {
            hooks: tc.input_hook.hooks(),
            intervention: Intervention {
                mlp_out: Some(&outs),
                ..Intervention::default()
            },
            ..ForwardOptions::default()
        };
        let rec = m.forward_with(tokens, &opts).unwrap().record;
        let xs = inputs(tc, &rec);
        let af = clt::attribution::replacement::encode(tc, &xs, n);
        let mut next = clt::attribution::replacement::reconstruct(tc, &af, &xs, n);
        for (o, c) in next.iter_mut().zip(&model_out) {
            o[..d].copy_from_slice(&c[..d]);
        }
        outs = next;
    }
    let opts = ForwardOptions {
        intervention: Intervention {
            mlp_out: Some(&outs),
            ..Intervention::default()
        },
        ..ForwardOptions::default()
    };
    m.forward_with(tokens, &opts).unwrap().logits
}

/// The model with one layer's MLP output replaced by `fixed` (others its own, on the changed stream).
#[derive(Debug)]
struct OneLayer {
    layer: usize,
    fixed: Vec<f32>,
}

impl MlpOverride for OneLayer {
    fn mlp_out(&self, layer: usize, inputs: &MlpInputs<'_>) -> Vec<f32> {
        if layer == self.layer {
            self.fixed.clone()
        } else {
            inputs.model_mlp.unwrap().to_vec()
        }
    }
    fn wants_model_mlp(&self, _: usize, _: usize) -> bool {
        true
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Checks the three kinds of spliced forward against independent computations on `m`.
fn splices_match(m: &dyn Attributable, tc: &ReplacementTranscoder, tokens: &[u32], what: &str) {
    use clt::attribution::splice::{Splice, spliced_logits};
    let (n, d) = (tokens.len(), tc.cfg.d_model);
    let clean = m.forward(tokens).unwrap();
    let spliced = spliced_logits(m, tc, tokens, Splice::All).unwrap();
    let want = spliced_reference(m, tc, tokens);
    let scale = want.iter().fold(0.0f32, |s, v| s.max(v.abs()));
    let moved = max_diff(&spliced, &clean);
    let err = max_diff(&spliced, &want);
    eprintln!(
        "{what}: spliced logits off the reference by {err:.2e} (scale {scale:.1}); moved {moved:.3} from the model's"
    );
    assert!(moved > 1e-2, "{what}: splicing changed nothing");
    assert!(
        err <= 2e-5 * scale.max(1.0),
        "{what}: {err} from the reference"
    );
    // Each layer alone: its transcoder output from the clean inputs (nothing before it changed).
    let hooks = Hooks {
        mlp_out: true,
        ..tc.input_hook.hooks()
    };
    let rec = m
        .forward_with(
            tokens,
            &ForwardOptions {
                hooks,
                ..ForwardOptions::default()
            },
        )
        .unwrap()
        .record;
    let xs = inputs(tc, &rec);
    let recon = clt::attribution::replacement::reconstruct(
        tc,
        &clt::attribution::replacement::encode(tc, &xs, n),
        &xs,
        n,
    );
    for l in 0..tc.cfg.n_layers {
        let mut fixed = recon[l].clone();
        fixed[..d].copy_from_slice(&rec.layers[l].mlp_out.as_ref().unwrap()[..d]);
        let one = OneLayer { layer: l, fixed };
        let opts = ForwardOptions {
            intervention: Intervention {
                mlp_fn: Some(&one),
                ..Intervention::default()
            },
            ..ForwardOptions::default()
        };
        let want = m.forward_with(tokens, &opts).unwrap().logits;
        let got = spliced_logits(m, tc, tokens, Splice::Layer(l)).unwrap();
        let err = max_diff(&got, &want);
        assert!(
            err <= 2e-5 * scale.max(1.0),
            "{what}: layer {l} alone off by {err}"
        );
    }
    // The ablation: every MLP output zero after position 0.
    let zeros: Vec<Vec<f32>> = rec
        .layers
        .iter()
        .map(|r| {
            let mut z = vec![0.0f32; n * d];
            z[..d].copy_from_slice(&r.mlp_out.as_ref().unwrap()[..d]);
            z
        })
        .collect();
    let opts = ForwardOptions {
        intervention: Intervention {
            mlp_out: Some(&zeros),
            ..Intervention::default()
        },
        ..ForwardOptions::default()
    };
    let want = m.forward_with(tokens, &opts).unwrap().logits;
    let got = spliced_logits(m, tc, tokens, Splice::Zero).unwrap();
    assert!(
        max_diff(&got, &want) <= 2e-5 * scale.max(1.0),
        "{what}: ablation"
    );
    assert!(spliced_logits(m, tc, tokens, Splice::Layer(tc.cfg.n_layers)).is_err());
}

/// `clt splice`'s forwards: the trained CLT on stories260K (with and without skip connections), random
/// GPT-2 and Gemma-2 models with random transcoders (Gemma-2's MLP output is the post-MLP norm's), each
/// against the fixed point computed by the attribution path.
#[test]
fn spliced_forwards_are_the_transcoder_on_its_own_stream() {
    let (m, tc, tokens) = setup();
    splices_match(m, &tc, &tokens, "stories260K, trained CLT");
    splices_match(m, &with_skip(tc, 21), &tokens, "stories260K, with skip");
    let (g2, tokens) = random_gpt2(3, 31);
    let tc = calibrated_transcoder(&g2, &tokens, 48, 6, 32, InputHook::ResidMid).unwrap();
    splices_match(&g2, &tc, &tokens, "GPT-2, resid_mid");
    let (gm, tokens) = random_gemma2(3, 33);
    let tc = calibrated_transcoder(&gm, &tokens, 48, 6, 34, InputHook::MlpInNormed).unwrap();
    splices_match(&gm, &tc, &tokens, "Gemma-2");
}

/// The trained CLT's weights read as a TopK transcoder with `k` features per position and layer (or another
/// activation function).
fn reread_as(activation: clt::clt::Activation) -> clt::Result<ReplacementTranscoder> {
    let mut lt = load_transcoder(&fixture().checkpoint, None, NormKind::Rms).unwrap();
    lt.transcoder.cfg.activation = activation;
    ReplacementTranscoder::new(&lt.transcoder, lt.input_hook)
}

/// A TopK transcoder (`clt train` makes them, circuit-tracer's files hold them) on every path of the
/// replacement model: each position's active features are the `k` largest positive pre-activations (sorted
/// out here), the graph matches the oracle, the spliced forwards their fixed point, interventions
/// circuit-tracer's rule and, without edits, the model; BatchTopK is refused with the conversion named.
#[test]
fn topk_transcoders_attribute_splice_and_intervene() {
    use clt::clt::Activation;
    let (m, _, tokens) = setup();
    let k = 6;
    let tc = reread_as(Activation::TopK { k }).unwrap();
    let (n, d) = (tokens.len(), tc.cfg.d_model);
    let opts = ForwardOptions {
        hooks: tc.input_hook.hooks(),
        ..ForwardOptions::default()
    };
    let xs = inputs(&tc, &m.forward_with(&tokens, &opts).unwrap().record);
    let af = clt::attribution::replacement::encode(&tc, &xs, n);
    let mut full = 0;
    for l in 0..tc.cfg.n_layers {
        assert!(af.group(l, 0).is_empty(), "position 0 has no features");
        for p in 1..n {
            let want: Vec<(u32, f32)> = (0..tc.cfg.n_features)
                .map(|f| {
                    let a = written_out_activation(&tc, l, &xs[l][p * d..(p + 1) * d], f);
                    (f as u32, a)
                })
                .filter(|&(_, a)| a > 0.0)
                .collect();
            let got: Vec<(u32, f32)> = af.group(l, p).map(|i| (af.index[i], af.value[i])).collect();
            let ids = |v: &[(u32, f32)]| v.iter().map(|e| e.0).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(&want), "layer {l}, position {p}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g.1 - w.1).abs() <= 1e-4 * w.1.abs().max(1.0),
                    "{g:?} against {w:?}"
                );
            }
            full += (got.len() == k) as usize;
        }
    }
    // Mostly k per position (fewer only where fewer than k pre-activations are positive).
    assert!(
        full * 2 > tc.cfg.n_layers * (n - 1),
        "{full} of {} positions have {k} features",
        tc.cfg.n_layers * (n - 1)
    );
    oracle(m, &tc, &tokens, 60);
    splices_match(m, &tc, &tokens, "stories260K, the CLT as TopK");
    // Also set a feature whose pre-activation is positive but not among the k largest: its change of
    // activation is the whole value (the feature is off), not the value less its ReLU.
    let x1 = &xs[0][d..2 * d];
    let outside = (0..tc.cfg.n_features)
        .find(|&f| {
            let w = &tc.params.w_enc[0][f * d..(f + 1) * d];
            let h = x1.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + tc.params.b_enc[0][f];
            h > 0.05 && written_out_activation(&tc, 0, x1, f) == 0.0
        })
        .expect("a positive pre-activation outside the top k at layer 0, position 1");
    modes_follow_the_rule(m, &tc, &tokens, &[(0, 1, outside, 2.0)]);
    // A no-op edit: every mode, the replacement model's (every feature recomputed) included, is the model.
    let clean = m.next_logits(&tokens).unwrap();
    let last = af.len() - 1;
    let noop: Edit = format!("{}:{}:{}*=1", af.layer[last], af.pos[last], af.index[last])
        .parse()
        .unwrap();
    for mode in MODES {
        let r = intervene(m, &tc, &tokens, &[noop], mode).unwrap();
        let diff = max_diff(&r.logits, &clean);
        assert!(diff < 1e-4, "{mode:?} differs from the model by {diff}");
    }
    let err = reread_as(Activation::BatchTopK {
        k,
        across_layers: false,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("clt convert-batchtopk"), "{err}");
}

/// The scores over contexts: the model's cross-entropy as computed here from its logits, the spliced one
/// from the spliced logits, KL zero only for the model, the loss recovered by its formula; and the command
/// on held-out TinyStories (JSON and table), with bad arguments refused by name.
#[test]
fn splice_scores_and_the_splice_command() {
    use clt::attribution::splice::{Splice, splice_eval, spliced_logits};
    let (m, tc, _) = setup();
    let f = fixture();
    let texts = [
        "Once upon a time, there was a dog named Max. Max liked to run in the park.",
        "Tom had a red ball. He gave it to his sister, and she was very happy.",
    ];
    let contexts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| f.model.tokenizer.encode(t).unwrap())
        .collect();
    let r = splice_eval(m, &tc, contexts.iter().cloned().map(Ok), true, |_| {}).unwrap();
    let ce = |logits: &[f32], t: &[u32]| -> (f64, usize) {
        let v = logits.len() / t.len();
        let mut sum = 0.0;
        for p in 1..t.len() - 1 {
            let row = &logits[p * v..(p + 1) * v];
            let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            sum += lse - row[t[p + 1] as usize] as f64;
        }
        (sum, t.len() - 2)
    };
    let (mut model_ce, mut spliced_ce, mut n) = (0.0, 0.0, 0);
    for t in &contexts {
        let (a, k) = ce(&m.forward(t).unwrap(), t);
        let (b, _) = ce(&spliced_logits(m, &tc, t, Splice::All).unwrap(), t);
        model_ce += a;
        spliced_ce += b;
        n += k;
    }
    assert_eq!((r.contexts, r.model.n as usize), (2, n));
    assert!((r.model.mean_ce() - model_ce / n as f64).abs() < 1e-9);
    assert!((r.spliced.mean_ce() - spliced_ce / n as f64).abs() < 1e-9);
    assert_eq!((r.model.kl, r.model.top1 as usize), (0.0, n));
    assert!(r.spliced.kl > 0.0 && r.zero.mean_ce() > r.spliced.mean_ce());
    let want = (r.zero.mean_ce() - r.spliced.mean_ce()) / (r.zero.mean_ce() - r.model.mean_ce());
    assert_eq!(r.loss_recovered(), want);
    assert_eq!(r.per_layer.len(), tc.cfg.n_layers);
    eprintln!("{}", clt::attribution::cli::splice_table(&r, "fixture"));

    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("splice.json");
    let corpus = shared().join("corpus/tinystories_valid_head.txt");
    let out = clt_on_fixture(
        "splice",
        &[
            "--corpus",
            corpus.to_str().unwrap(),
            "--tokens",
            "300",
            "--context",
            "64",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let preds = v["predictions"].as_u64().unwrap();
    // Whole contexts of at most 64 tokens (62 predictions each) until 300 predictions.
    assert!((300..300 + 62).contains(&preds), "{preds}");
    let lr = v["loss_recovered"].as_f64().unwrap();
    assert!(
        stdout.contains(&format!("loss recovered: {lr:.4}")),
        "{stdout}"
    );
    assert_eq!(v["per_layer"], serde_json::json!([]));
    for (args, says) in [
        (
            vec!["--corpus", corpus.to_str().unwrap(), "--context", "1"],
            "no room",
        ),
        (
            vec!["--corpus", "/nonexistent/corpus.txt"],
            "/nonexistent/corpus.txt",
        ),
    ] {
        let out = clt_on_fixture("splice", &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    }
}
