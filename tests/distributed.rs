//! Feature-sharded training without MPI: ranks as threads of one process (an in-memory `Comm` that sums in
//! rank order, as a 2-rank MPI all-reduce does), so the sharded step, its statistics and the sharded
//! checkpoints are checked in every build. `tests/mpi.rs` runs the same under `mpirun` (the `mpi` feature).
//!
//! Tolerance: a 2-rank step sums each token's reconstruction in a different order than one process (rank
//! 0's features, then rank 1's partial added in the all-reduce), so float results differ by rounding; K
//! steps of Adam keep that at about 1e-7 relative; we ask for 1e-5 (losses per step, each parameter tensor
//! in relative L2 norm). With one rank the sharded step is the single-process step bit for bit.

use clt::Result;
use clt::clt::Params;
use clt::data::ActivationSource;
use clt::dist::checkpoint;
use clt::dist::comm::{Comm, SelfComm};
use clt::dist::shard::{copy_features, feature_range};
use clt::dist::trainer::ShardedTrainer;
use clt::train::{RunConfig, Trainer};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};

/// Ranks as threads: each collective deposits its buffer, waits for all, sums in rank order, waits again.
/// `split` makes groups of threads the same way (the 2-D grid's axes).
#[derive(Clone)]
struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
    /// How many splits this rank has made of `shared` (every rank splits in the same order).
    splits: std::cell::Cell<usize>,
}

struct Shared {
    n: usize,
    barrier: Barrier,
    f64s: Mutex<Vec<Vec<f64>>>,
    f32s: Mutex<Vec<Vec<f32>>>,
    /// The groups split from this one, by (split number, color).
    children: Mutex<HashMap<(usize, usize), Arc<Shared>>>,
}

impl Shared {
    fn new(n: usize) -> Arc<Shared> {
        Arc::new(Shared {
            n,
            barrier: Barrier::new(n),
            f64s: Mutex::new(vec![Vec::new(); n]),
            f32s: Mutex::new(vec![Vec::new(); n]),
            children: Mutex::new(HashMap::new()),
        })
    }
}

impl ThreadComm {
    fn group(n: usize) -> Vec<ThreadComm> {
        let shared = Shared::new(n);
        (0..n)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
                splits: Default::default(),
            })
            .collect()
    }
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.n
    }
    fn sum_f32(&self, _what: &str, buf: &mut [f32]) -> Result<()> {
        self.shared.f32s.lock().unwrap()[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        {
            let all = self.shared.f32s.lock().unwrap();
            buf.copy_from_slice(&all[0]);
            for other in &all[1..] {
                buf.iter_mut().zip(other).for_each(|(a, b)| *a += b);
            }
        }
        self.shared.barrier.wait();
        Ok(())
    }
    fn sum_f64(&self, _what: &str, buf: &mut [f64]) -> Result<()> {
        self.shared.f64s.lock().unwrap()[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        {
            let all = self.shared.f64s.lock().unwrap();
            buf.copy_from_slice(&all[0]);
            for other in &all[1..] {
                buf.iter_mut().zip(other).for_each(|(a, b)| *a += b);
            }
        }
        self.shared.barrier.wait();
        Ok(())
    }
    fn gather_u64(&self, what: &str, value: u64) -> Result<Vec<u64>> {
        // Exact through f64 for the small test hashes' two halves.
        let mut buf = vec![0.0f64; 2 * self.shared.n];
        buf[2 * self.rank] = (value >> 32) as f64;
        buf[2 * self.rank + 1] = (value & 0xffff_ffff) as f64;
        self.sum_f64(what, &mut buf)?;
        Ok(buf
            .chunks(2)
            .map(|c| ((c[0] as u64) << 32) | c[1] as u64)
            .collect())
    }
    fn gather_u32(&self, what: &str, buf: &[u32]) -> Result<Vec<u32>> {
        // Exact through f64: each rank fills its own block of zeros.
        let len = buf.len();
        let mut all = vec![0.0f64; len * self.shared.n];
        all[self.rank * len..(self.rank + 1) * len]
            .iter_mut()
            .zip(buf)
            .for_each(|(a, &b)| *a = b as f64);
        self.sum_f64(what, &mut all)?;
        Ok(all.into_iter().map(|v| v as u32).collect())
    }
    fn barrier(&self, _what: &str) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn split(&self, color: usize, key: usize) -> Result<Self> {
        let n = self.shared.n;
        let mut buf = vec![0.0f64; 2 * n];
        buf[2 * self.rank] = color as f64;
        buf[2 * self.rank + 1] = key as f64;
        self.sum_f64("split", &mut buf)?;
        let mut members: Vec<(usize, usize)> = (0..n)
            .filter(|r| buf[2 * r] == color as f64)
            .map(|r| (buf[2 * r + 1] as usize, r))
            .collect();
        members.sort();
        let rank = members.iter().position(|m| m.1 == self.rank).unwrap();
        let split = self.splits.get();
        self.splits.set(split + 1);
        let shared = self
            .shared
            .children
            .lock()
            .unwrap()
            .entry((split, color))
            .or_insert_with(|| Shared::new(members.len()))
            .clone();
        Ok(ThreadComm {
            rank,
            shared,
            splits: Default::default(),
        })
    }
    fn abort(&self, code: i32) -> ! {
        panic!("abort({code})")
    }
}

fn run_config() -> RunConfig {
    let mut run = clt::demo::synthetic_config();
    run.model.n_features = 37; // not a multiple of the number of ranks
    run.model.skip = true;
    run.train.steps = 8;
    run.train.batch_size = 96;
    run.train.warmup_steps = 2;
    run.train.log_every = 1;
    run.train.calibration_batches = 2;
    run.train.lambda_ramp = clt::train::LambdaRamp::Constant;
    run
}

fn source(run: &RunConfig) -> Box<dyn ActivationSource> {
    clt::train::trainer::make_source(run).unwrap()
}

/// Runs `f` on every rank of a thread group and returns the results in rank order.
fn on_ranks<T: Send>(n: usize, f: impl Fn(ThreadComm) -> T + Sync) -> Vec<T> {
    let comms = ThreadComm::group(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assemble(run: &RunConfig, shards: &[Params]) -> Params {
    let cfg = &run.model;
    let mut full = Params::zeros(cfg);
    for (r, p) in shards.iter().enumerate() {
        let range = feature_range(cfg.n_features, r, shards.len());
        copy_features(cfg, p, &range, &mut full, &(0..cfg.n_features), r == 0);
    }
    full
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn assert_params_close(what: &str, got: &Params, want: &Params, tol: f64) {
    for (i, (g, w)) in got.tensors().iter().zip(want.tensors()).enumerate() {
        let d = rel_diff(g, w);
        assert!(
            d <= tol,
            "{what}: tensor {i} differs by {d:e} (relative L2)"
        );
    }
}

fn assert_loss_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (s, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs(),
            "{what}: loss at step {s}: {g} vs {w}"
        );
    }
}

fn single(run: &RunConfig, steps: usize) -> (Vec<f64>, Trainer) {
    let mut t = Trainer::new(run.clone()).unwrap();
    let losses = (0..steps).map(|_| t.step().unwrap().stats.loss()).collect();
    (losses, t)
}

#[test]
fn one_rank_is_the_single_process_step_bit_for_bit() {
    let run = run_config();
    let (want, t) = single(&run, 8);
    let mut s = ShardedTrainer::with_source(run.clone(), source(&run), SelfComm).unwrap();
    let got: Vec<f64> = (0..8).map(|_| s.step().unwrap().stats.loss()).collect();
    assert_eq!(got, want);
    assert!(s.params == t.params, "parameters differ");
}

#[test]
fn two_and_three_ranks_equal_one_process() {
    let run = run_config();
    let (want, t) = single(&run, 8);
    for n in [2, 3] {
        let out = on_ranks(n, |c| {
            let mut s = ShardedTrainer::with_source(run.clone(), source(&run), c).unwrap();
            let reps: Vec<_> = (0..8).map(|_| s.step().unwrap()).collect();
            let dead = s.dead_per_layer().unwrap();
            (reps, s.params.clone(), dead)
        });
        for (r, (reps, _, _)) in out.iter().enumerate() {
            let losses: Vec<f64> = reps.iter().map(|r| r.stats.loss()).collect();
            assert_loss_close(&format!("{n} ranks, rank {r}"), &losses, &want);
        }
        let shards: Vec<Params> = out.iter().map(|o| o.1.clone()).collect();
        assert_params_close(
            &format!("{n} ranks"),
            &assemble(&run, &shards),
            &t.params,
            1e-5,
        );
        // Statistics as one process reports them.
        let (reps, _, dead) = &out[0];
        let last = &reps.last().unwrap().stats;
        assert_eq!(*dead, t.dead_per_layer());
        let mut t2 = Trainer::new(run.clone()).unwrap();
        let mut one = None;
        for _ in 0..8 {
            one = Some(t2.step().unwrap());
        }
        let one = one.unwrap();
        assert_eq!(last.n_active, one.stats.n_active);
        assert!((last.sparsity - one.stats.sparsity).abs() <= 1e-5 * one.stats.sparsity.abs());
        assert!((reps.last().unwrap().grad_norm - one.grad_norm).abs() <= 1e-5 * one.grad_norm);
    }
}

fn sharded_run(run: &RunConfig, n: usize, steps: u64, out: &Path) {
    on_ranks(n, |c| {
        let mut s = ShardedTrainer::with_source(run.clone(), source(run), c).unwrap();
        for _ in 0..steps {
            s.step().unwrap();
        }
        s.save_checkpoint(out).unwrap();
    });
}

fn resume_on(n: usize, dir: &Path, run: &RunConfig, steps: u64) -> Params {
    let shards = on_ranks(n, |c| {
        let mut s = ShardedTrainer::resume_with_source(dir, source(run), None, c).unwrap();
        for _ in 0..steps {
            s.step().unwrap();
        }
        s.params.clone()
    });
    assemble(run, &shards)
}

#[test]
fn checkpoints_reshard_2_to_1_to_3_and_from_native() {
    let run = run_config();
    let (_, t8) = single(&run, 8);
    let dir = tempfile::tempdir().unwrap();
    sharded_run(&run, 2, 4, dir.path());
    let ck = checkpoint::resolve(dir.path()).unwrap();
    assert!(checkpoint::is_sharded(&ck));
    // The whole transcoder of a sharded checkpoint (what `clt export` reads).
    let (_, t4) = single(&run, 4);
    let whole = checkpoint::load_transcoder(dir.path()).unwrap();
    assert_params_close(
        "assembled 2-rank checkpoint",
        &whole.params,
        &t4.params,
        1e-5,
    );
    assert_eq!(whole.norms, t4.norms);
    for n in [1, 3] {
        let p = resume_on(n, &ck, &run, 4);
        assert_params_close(&format!("2 → {n} ranks"), &p, &t8.params, 1e-5);
    }
    // 2 → 1 → 2: one rank resumes, checkpoints, and two ranks finish.
    let dir1 = tempfile::tempdir().unwrap();
    let mut one = ShardedTrainer::resume_with_source(&ck, source(&run), None, SelfComm).unwrap();
    for _ in 0..2 {
        one.step().unwrap();
    }
    one.save_checkpoint(dir1.path()).unwrap();
    let ck1 = checkpoint::resolve(dir1.path()).unwrap();
    let p = resume_on(2, &ck1, &run, 2);
    assert_params_close("2 → 1 → 2 ranks", &p, &t8.params, 1e-5);
    // A native single-process checkpoint loads into 2 ranks.
    let native = tempfile::tempdir().unwrap();
    t4.save_checkpoint(native.path()).unwrap();
    let ckn = clt::train::resolve_checkpoint(native.path()).unwrap();
    let p = resume_on(2, &ckn, &run, 4);
    assert_params_close("native → 2 ranks", &p, &t8.params, 1e-5);
}

#[test]
fn mismatched_configurations_are_named_at_start_up() {
    let run = run_config();
    let errs = on_ranks(2, |c| {
        let mut r = run.clone();
        if c.rank() == 1 {
            r.train.lr *= 2.0;
        }
        ShardedTrainer::with_source(r.clone(), source(&r), c)
            .err()
            .map(|e| e.to_string())
    });
    for e in &errs {
        let e = e.as_ref().expect("a mismatch must fail");
        assert!(e.contains("rank(s) [1]"), "{e}");
    }
}

#[test]
fn bad_sharded_checkpoints_name_the_file() {
    let run = run_config();
    let dir = tempfile::tempdir().unwrap();
    sharded_run(&run, 2, 1, dir.path());
    let ck = checkpoint::resolve(dir.path()).unwrap();
    std::fs::remove_file(ck.join("shard_00001.safetensors")).unwrap();
    let e = checkpoint::load_transcoder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("shard_00001.safetensors"), "{e}");
    let m = std::fs::read_to_string(ck.join("manifest.json")).unwrap();
    std::fs::write(
        ck.join("manifest.json"),
        m.replace("\"world\": 2", "\"world\": 3"),
    )
    .unwrap();
    let e = checkpoint::load_transcoder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("manifest.json") && e.contains("2 shards listed for 3 ranks"),
        "{e}"
    );
}

/// Starting `run` on 2 ranks fails on every rank with an error naming TopK (which the CUDA steps cannot
/// feature-shard).
fn every_rank_refuses_topk(run: &RunConfig) {
    let errs = on_ranks(2, |c| {
        ShardedTrainer::with_source(run.clone(), source(run), c)
            .err()
            .map(|e| e.to_string())
    });
    assert!(
        errs.iter()
            .all(|e| e.as_ref().is_some_and(|e| e.contains("TopK")))
    );
}

/// Backends the distributed trainer does not run are refused at start-up on every rank, with the reason:
/// the dense CPU step (and without the `cuda` feature, opening a CUDA one says so).
#[test]
fn unsupported_backends_are_refused_at_start_up() {
    use clt::backend::BackendKind;
    use clt::train::Parallel;
    let refused = |backend, parallel, skip, want: &str| {
        let mut run = run_config();
        run.train.backend = backend;
        run.train.parallel = parallel;
        run.model.skip = skip;
        run.train.overlap = parallel == Parallel::Features;
        let errs = on_ranks(2, |c| {
            ShardedTrainer::with_source(run.clone(), source(&run), c)
                .err()
                .map(|e| e.to_string())
        });
        for e in &errs {
            assert!(
                e.as_ref().is_some_and(|e| e.contains(want)),
                "{backend:?} {parallel:?}: {e:?}"
            );
        }
    };
    refused(
        BackendKind::CpuDense,
        Parallel::Features,
        false,
        "is not supported",
    );
    if !cfg!(feature = "cuda") {
        refused(
            BackendKind::CudaHost,
            Parallel::Data,
            false,
            "built without CUDA support",
        );
    }
}

/// TopK and BatchTopK (per layer and across layers) select across every shard's features
/// (`dist::select`): 2 and 3 ranks train as one process does, with the same number of features active
/// in every layer at every step; BatchTopK's selection is `k · B` over the batch, so it takes every rank's
/// candidates, TopK's `k` per token.
#[test]
fn topk_and_batchtopk_shard_like_one_process() {
    use clt::clt::Activation;
    let steps = 6;
    for activation in [
        Activation::TopK { k: 3 },
        Activation::BatchTopK {
            k: 3,
            across_layers: false,
        },
        Activation::BatchTopK {
            k: 2,
            across_layers: true,
        },
    ] {
        let mut run = run_config();
        run.model.activation = activation;
        let mut t = Trainer::new(run.clone()).unwrap();
        let one: Vec<_> = (0..steps).map(|_| t.step().unwrap()).collect();
        let want: Vec<f64> = one.iter().map(|r| r.stats.loss()).collect();
        for n in [2, 3] {
            let out = on_ranks(n, |c| {
                let mut s = ShardedTrainer::with_source(run.clone(), source(&run), c).unwrap();
                let reps: Vec<_> = (0..steps).map(|_| s.step().unwrap()).collect();
                (reps, s.params.clone())
            });
            let what = format!("{activation:?} on {n} ranks");
            for (r, (reps, _)) in out.iter().enumerate() {
                let losses: Vec<f64> = reps.iter().map(|r| r.stats.loss()).collect();
                assert_loss_close(&format!("{what}, rank {r}"), &losses, &want);
                for (s, (a, b)) in reps.iter().zip(&one).enumerate() {
                    assert_eq!(a.stats.n_active, b.stats.n_active, "{what}: step {s}");
                }
            }
            let shards: Vec<Params> = out.iter().map(|o| o.1.clone()).collect();
            assert_params_close(&what, &assemble(&run, &shards), &t.params, 1e-5);
        }
    }
}

#[test]
fn data_parallel_ranks_equal_one_process() {
    let mut run = run_config();
    run.train.parallel = clt::train::Parallel::Data;
    run.model.activation = clt::clt::Activation::TopK { k: 3 }; // per token: fine when the batch is split
    let (want, t) = single(&run, 8);
    for n in [2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let out = on_ranks(n, |c| {
            let mut s = ShardedTrainer::with_source(run.clone(), source(&run), c).unwrap();
            let reps: Vec<_> = (0..8).map(|_| s.step().unwrap()).collect();
            s.save_checkpoint(dir.path()).unwrap();
            (reps, s.params.clone())
        });
        for (r, (reps, p)) in out.iter().enumerate() {
            let losses: Vec<f64> = reps.iter().map(|r| r.stats.loss()).collect();
            assert_loss_close(
                &format!("data-parallel {n} ranks, rank {r}"),
                &losses,
                &want,
            );
            assert_params_close(
                &format!("data-parallel {n} ranks, rank {r}"),
                p,
                &t.params,
                1e-5,
            );
            assert!(*p == out[0].1, "data-parallel replicas must stay identical");
        }
        let last = &out[0].0.last().unwrap().stats;
        let mut t2 = Trainer::new(run.clone()).unwrap();
        let one = (0..8).map(|_| t2.step().unwrap()).last().unwrap();
        assert_eq!(last.n_active, one.stats.n_active);
        assert!(
            (last.nmse_total() - one.stats.nmse_total()).abs() <= 1e-5 * one.stats.nmse_total()
        );
        // One shard (rank 0's replica), loadable as the whole transcoder.
        let ck = checkpoint::resolve(dir.path()).unwrap();
        assert_eq!(checkpoint::read_manifest(&ck).unwrap().world, 1);
        assert_params_close(
            "data-parallel checkpoint",
            &checkpoint::load_transcoder(&ck).unwrap().params,
            &t.params,
            1e-5,
        );
    }
}

/// BatchTopK's budget is over the whole batch: data-parallel replicas (2 and 3) and a 2 x 2 grid gather
/// every rank's candidates and train as one process does, the same number of features active in every
/// layer at every step; the CUDA steps refuse it with more than one replica, naming it.
#[test]
fn batchtopk_spans_the_replicas_batch_slices() {
    use clt::clt::Activation;
    use clt::train::Parallel;
    let steps = 6;
    for (across_layers, k) in [(false, 3), (true, 2)] {
        let mut run = run_config();
        run.model.activation = Activation::BatchTopK { k, across_layers };
        let mut t = Trainer::new(run.clone()).unwrap();
        let one: Vec<_> = (0..steps).map(|_| t.step().unwrap()).collect();
        let want: Vec<f64> = one.iter().map(|r| r.stats.loss()).collect();
        for (parallel, n, shards) in [
            (Parallel::Data, 2, 1),
            (Parallel::Data, 3, 1),
            (Parallel::Grid, 4, 2),
        ] {
            run.train.parallel = parallel;
            run.train.feature_shards = (parallel == Parallel::Grid).then_some(shards);
            let what = format!("BatchTopK (across layers: {across_layers}), {parallel:?} on {n}");
            let out = grid_run(&run, n, steps);
            for (r, (reps, _, _)) in out.iter().enumerate() {
                let losses: Vec<f64> = reps.iter().map(|r| r.stats.loss()).collect();
                assert_loss_close(&format!("{what}, rank {r}"), &losses, &want);
                for (s, (a, b)) in reps.iter().zip(&one).enumerate() {
                    assert_eq!(a.stats.n_active, b.stats.n_active, "{what}: step {s}");
                }
            }
            let shards: Vec<Params> = out[..shards].iter().map(|o| o.1.clone()).collect();
            assert_params_close(&what, &assemble(&run, &shards), &t.params, 1e-5);
        }
        run.train.backend = clt::backend::BackendKind::CudaHost;
        run.train.parallel = Parallel::Data;
        run.train.feature_shards = None;
        let errs = on_ranks(2, |c| {
            ShardedTrainer::with_source(run.clone(), source(&run), c)
                .err()
                .map(|e| e.to_string())
        });
        assert!(
            errs.iter().all(|e| e
                .as_ref()
                .is_some_and(|e| e.contains("data-parallel BatchTopK"))),
            "{errs:?}"
        );
    }
}

/// Ranks of a grid run on threads: per rank, the step reports, the parameters and the dead counts.
fn grid_run(
    run: &RunConfig,
    n: usize,
    steps: usize,
) -> Vec<(Vec<clt::train::StepReport>, Params, Vec<usize>)> {
    on_ranks(n, |c| {
        let mut s = ShardedTrainer::with_source(run.clone(), source(run), c).unwrap();
        let reps: Vec<_> = (0..steps).map(|_| s.step().unwrap()).collect();
        let dead = s.dead_per_layer().unwrap();
        (reps, s.params.clone(), dead)
    })
}

#[test]
fn grids_of_feature_shards_and_replicas_equal_one_process() {
    let mut run = run_config();
    run.train.parallel = clt::train::Parallel::Grid;
    run.train.feature_shards = Some(2); // (one process ignores the layout)
    let (want, t) = single(&run, 8);
    let mut t2 = Trainer::new(run.clone()).unwrap();
    let one = (0..8).map(|_| t2.step().unwrap()).last().unwrap();
    // (ranks, feature shards): 2 x 2, 3 shards x 2 replicas, and the degenerate 1 x 2 and 2 x 1.
    for (n, k) in [(4, 2), (6, 3), (2, 1), (2, 2)] {
        run.train.feature_shards = Some(k);
        let out = grid_run(&run, n, 8);
        for (r, (reps, p, _)) in out.iter().enumerate() {
            let losses: Vec<f64> = reps.iter().map(|r| r.stats.loss()).collect();
            assert_loss_close(&format!("grid {n}/{k}, rank {r}"), &losses, &want);
            // The replicas of a shard stay identical.
            assert!(
                *p == out[r % k].1,
                "grid {n}/{k}: rank {r} differs from its replica 0"
            );
        }
        let shards: Vec<Params> = out[..k].iter().map(|o| o.1.clone()).collect();
        assert_params_close(
            &format!("grid {n}/{k}"),
            &assemble(&run, &shards),
            &t.params,
            1e-5,
        );
        // Rank 0 reports what one process does: firing counts, every loss term, NMSE, norm, dead features.
        let (reps, _, dead) = &out[0];
        let last = reps.last().unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-12);
        assert_eq!(last.stats.n_active, one.stats.n_active, "grid {n}/{k}");
        assert_eq!(last.stats.n_window, one.stats.n_window, "grid {n}/{k}");
        assert_eq!(last.stats.n_tokens, one.stats.n_tokens, "grid {n}/{k}");
        assert!(
            close(last.stats.recon, one.stats.recon),
            "grid {n}/{k}: recon"
        );
        assert!(
            close(last.stats.sparsity, one.stats.sparsity),
            "grid {n}/{k}: sparsity"
        );
        assert!(
            close(last.stats.preact, one.stats.preact),
            "grid {n}/{k}: preact"
        );
        assert!(
            close(last.stats.nmse_total(), one.stats.nmse_total()),
            "grid {n}/{k}: nmse"
        );
        assert!(
            close(last.grad_norm, one.grad_norm),
            "grid {n}/{k}: gradient norm"
        );
        assert_eq!(*dead, t.dead_per_layer(), "grid {n}/{k}");
    }
}

#[test]
fn grids_train_topk_like_one_process() {
    // TopK selects per token across all features: one feature shard per replica, or two that gather their
    // candidates.
    let mut run = run_config();
    run.train.parallel = clt::train::Parallel::Grid;
    run.train.feature_shards = Some(1);
    run.model.activation = clt::clt::Activation::TopK { k: 3 };
    let (want, t) = single(&run, 8);
    let out = grid_run(&run, 2, 8);
    for (r, (reps, p, _)) in out.iter().enumerate() {
        let losses: Vec<f64> = reps.iter().map(|r| r.stats.loss()).collect();
        assert_loss_close(&format!("TopK grid 1 x 2, rank {r}"), &losses, &want);
        assert_params_close(&format!("TopK grid 1 x 2, rank {r}"), p, &t.params, 1e-5);
    }
    // Two TopK shards of two replicas each.
    run.train.feature_shards = Some(2);
    let out = grid_run(&run, 4, 8);
    for (r, (reps, _, _)) in out.iter().enumerate() {
        let losses: Vec<f64> = reps.iter().map(|r| r.stats.loss()).collect();
        assert_loss_close(&format!("TopK grid 2 x 2, rank {r}"), &losses, &want);
    }
    let shards: Vec<Params> = out[..2].iter().map(|o| o.1.clone()).collect();
    assert_params_close("TopK grid 2 x 2", &assemble(&run, &shards), &t.params, 1e-5);
    // The CUDA steps do not gather the selection: refused at start-up, naming it.
    run.train.backend = clt::backend::BackendKind::CudaHost;
    every_rank_refuses_topk(&run);
}

#[test]
fn grid_checkpoints_hold_one_replica_and_reshard() {
    let mut run = run_config();
    run.train.parallel = clt::train::Parallel::Grid;
    run.train.feature_shards = Some(2);
    let (_, t8) = single(&run, 8);
    let dir = tempfile::tempdir().unwrap();
    sharded_run(&run, 4, 4, dir.path());
    let ck = checkpoint::resolve(dir.path()).unwrap();
    assert_eq!(
        checkpoint::read_manifest(&ck).unwrap().world,
        2,
        "one replica's shards"
    );
    // Resumed on 2 ranks (2 x 1) and on one process, each continues to one process's parameters.
    for n in [1, 2] {
        let p = resume_on(n, &ck, &run, 4);
        assert_params_close(&format!("grid 4 → {n} ranks"), &p, &t8.params, 1e-5);
    }
}

#[test]
fn grid_sizes_that_do_not_divide_are_refused_naming_the_field() {
    let mut run = run_config();
    run.train.parallel = clt::train::Parallel::Grid;
    run.train.feature_shards = Some(2);
    let errs = on_ranks(3, |c| {
        ShardedTrainer::with_source(run.clone(), source(&run), c)
            .err()
            .map(|e| e.to_string())
    });
    for e in &errs {
        let e = e.as_ref().expect("2 shards on 3 ranks must fail");
        assert!(
            e.contains("train.feature_shards") && e.contains("3 ranks"),
            "{e}"
        );
    }
}

#[test]
fn overlapped_partials_are_the_blocking_ones_bit_for_bit() {
    let run = run_config();
    let mut ov = run.clone();
    ov.train.overlap = true;
    for n in [1, 2, 3] {
        let go = |r: &RunConfig| {
            on_ranks(n, |c| {
                let mut s = ShardedTrainer::with_source(r.clone(), source(r), c).unwrap();
                let losses: Vec<f64> = (0..8).map(|_| s.step().unwrap().stats.loss()).collect();
                (losses, s.params.clone())
            })
        };
        let (a, b) = (go(&run), go(&ov));
        for r in 0..n {
            assert_eq!(a[r].0, b[r].0, "{n} ranks, rank {r}: losses");
            assert!(a[r].1 == b[r].1, "{n} ranks, rank {r}: parameters differ");
        }
    }
}
