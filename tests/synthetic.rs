//! Acceptance: training on the synthetic ground truth recovers the planted features.
//!
//! The configuration is the one `clt demo --synthetic` runs (well under two minutes on one core in release).

#[test]
fn synthetic_demo_recovers_planted_features() {
    let dir = tempfile::tempdir().unwrap();
    let r = clt::demo::run_synthetic(clt::demo::synthetic_config(), dir.path(), true).unwrap();
    let n = r.recovery.len();
    let ok = r.recovery.iter().filter(|c| **c >= 0.9).count();
    eprintln!(
        "NMSE {:.4} per layer {:?}; recovered {ok}/{n}; {:.1} s",
        r.nmse, r.nmse_per_layer, r.seconds
    );
    assert!(
        r.recovered_fraction >= 0.9,
        "only {ok}/{n} planted features recovered (cosine ≥ 0.9)"
    );
    assert!(r.nmse <= 0.05, "NMSE {} > 0.05", r.nmse);
    // The metrics log exists and ends at the last step.
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 3000);
}
