//! Checks of a model's KV-cached forward against its full forward (every architecture runs them).

use clt::model::{
    CausalLm, ForwardOptions, Hooks, Intervention, KvCache, Logits, MlpInputs, MlpOverride,
};

/// An MLP replacement that fails at layer 1 (a wrong-sized output), after layer 0 has run.
#[derive(Debug)]
struct FailsAtLayer1;

impl MlpOverride for FailsAtLayer1 {
    fn mlp_out(&self, layer: usize, inputs: &MlpInputs<'_>) -> Vec<f32> {
        if layer == 0 {
            inputs.normed.to_vec()
        } else {
            Vec::new()
        }
    }
}

/// The logits `[n, vocab]` of `seq` run through a cache in chunks of the given lengths (summing to its
/// length).
fn chunked_logits(m: &dyn CausalLm, seq: &[u32], chunks: &[usize]) -> Vec<f32> {
    assert_eq!(chunks.iter().sum::<usize>(), seq.len());
    let mut cache = KvCache::new();
    let mut logits = Vec::new();
    let mut at = 0;
    for &c in chunks {
        let out = m
            .forward_cached(&seq[at..at + c], &mut cache, &ForwardOptions::default())
            .unwrap();
        assert_eq!(out.n_tokens, c);
        logits.extend(out.logits);
        at += c;
        assert_eq!(cache.len(), at);
    }
    assert!(cache.bytes() > 0);
    logits
}

/// Greedy generation the slow way: a full forward over the whole sequence for every new token.
fn greedy_uncached(m: &dyn CausalLm, prompt: &[u32], n_new: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    while seq.len() < prompt.len() + n_new && seq.len() < m.max_seq_len() {
        let l = m.next_logits(&seq).unwrap();
        seq.push(clt::model::forward::argmax(&l) as u32);
    }
    seq[prompt.len()..].to_vec()
}

/// Asserts that `m`'s cached forward gives the full forward's logits on `seq` however it is split into
/// chunks (one prompt then one token at a time; uneven chunks), within `tol`; that greedy generation
/// through the cache picks the tokens full forwards pick; and that a forward the cache cannot take is an
/// error that leaves the cache as it was. Returns the largest logit difference.
pub fn assert_cached_forward_matches(m: &dyn CausalLm, seq: &[u32], tol: f32) -> f32 {
    let n = seq.len();
    assert!(n >= 6, "a sequence of at least 6 tokens");
    let full = m.forward(seq).unwrap();
    let mut worst = 0.0f32;
    let splits: [Vec<usize>; 3] = [
        std::iter::once(1)
            .chain(std::iter::repeat_n(1, n - 1))
            .collect(),
        std::iter::once(n / 2)
            .chain(std::iter::repeat_n(1, n - n / 2))
            .collect(),
        vec![2, 1, n - 5, 2],
    ];
    for chunks in &splits {
        let got = chunked_logits(m, seq, chunks);
        let diff = super::hf::max_diff(&got, &full);
        assert!(diff < tol, "chunks {chunks:?}: logits differ by {diff}");
        worst = worst.max(diff);
    }

    // Branching: a cache cut back to the first half takes the second half again.
    let mut cache = KvCache::new();
    let all = ForwardOptions::default();
    m.forward_cached(seq, &mut cache, &all).unwrap();
    cache.truncate(n + 1);
    assert_eq!(cache.len(), n);
    cache.truncate(n / 2);
    assert_eq!(cache.len(), n / 2);
    let got = m
        .forward_cached(&seq[n / 2..], &mut cache, &all)
        .unwrap()
        .logits;
    let vocab = full.len() / n;
    let diff = super::hf::max_diff(&got, &full[n / 2 * vocab..]);
    assert!(diff < tol, "after truncate: {diff}");
    cache.clear();
    assert!(cache.is_empty());
    assert_eq!(cache.bytes(), 0);

    // Generation: the same tokens as full forwards.
    let prompt = &seq[..3];
    let room = m.max_seq_len() - prompt.len();
    let n_new = room.min(12);
    assert_eq!(
        m.generate_greedy(prompt, n_new, None).unwrap(),
        greedy_uncached(m, prompt, n_new),
        "greedy continuation of {prompt:?}"
    );

    // Errors leave the cache as it was, and it goes on working.
    let mut cache = KvCache::new();
    let opts = ForwardOptions {
        logits: Logits::Last,
        ..ForwardOptions::default()
    };
    m.forward_cached(&seq[..2], &mut cache, &opts).unwrap();
    let before = cache.clone();
    let too_long = vec![seq[0]; m.max_seq_len() - 1];
    let e = m.forward_cached(&too_long, &mut cache, &opts).unwrap_err();
    assert!(e.to_string().contains("max_seq_len"), "{e}");
    assert_eq!(cache, before);
    let record = m
        .forward_with(
            &seq[..3],
            &ForwardOptions {
                hooks: Hooks::frozen_state(),
                ..ForwardOptions::default()
            },
        )
        .unwrap()
        .record;
    let frozen = ForwardOptions {
        intervention: Intervention {
            frozen: Some(&record),
            ..Intervention::default()
        },
        ..opts
    };
    let e = m
        .forward_cached(&seq[2..3], &mut cache, &frozen)
        .unwrap_err();
    assert!(e.to_string().contains("cached positions"), "{e}");
    assert_eq!(cache, before);
    let failing = ForwardOptions {
        intervention: Intervention {
            mlp_fn: Some(&FailsAtLayer1),
            ..Intervention::default()
        },
        ..opts
    };
    let e = m
        .forward_cached(&seq[2..4], &mut cache, &failing)
        .unwrap_err();
    assert!(e.to_string().contains("mlp_fn output of layer 1"), "{e}");
    assert_eq!(cache, before);
    let e = m.forward_cached(&[], &mut cache, &opts).unwrap_err();
    assert!(e.to_string().contains("zero tokens"), "{e}");
    let got = m
        .forward_cached(&seq[2..3], &mut cache, &opts)
        .unwrap()
        .logits;
    let vocab = full.len() / n;
    let diff = super::hf::max_diff(&got, &full[2 * vocab..3 * vocab]);
    assert!(diff < tol, "after the errors: {diff}");
    worst
}
