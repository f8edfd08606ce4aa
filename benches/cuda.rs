//! Per-kernel timings of the CUDA backend through criterion: every row of `clt::backend::cuda::bench`
//! (also `clt bench --cuda`: both encoder kernels with both epilogues, the sparse decode, one layer's
//! backward, the decoder's fused Adam, the sparse step against the dense cuBLAS step, cuBLAS's own GEMM
//! rate, the device-side dequantisation) is also handed to criterion, timed on the device with CUDA events
//! (`iter_custom`: one pair of events around `iters` runs), so criterion's statistics and reports cover the
//! kernels; the table with GB/s, TFLOP/s and the fractions of the ceilings is printed as by `clt bench`.
//! The small shape by default; `CLT_BENCH_SHAPE=1b` the Llama-3.2-1B shape, `tiny` a smoke test.
//! Without a GPU it prints that it was skipped (and exits 1 under `CLT_REQUIRE_GPU=1`).
//! Run: `cargo bench --features cuda --bench cuda`.

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("skipped: built without `--features cuda`");
}

#[cfg(feature = "cuda")]
fn main() {
    use clt::backend::cuda::Gpu;
    use clt::backend::cuda::bench::{Timer, in_row, median, run_with};
    use criterion::Criterion;
    use std::time::Duration;

    /// Hands each row to criterion, then returns the median the table prints.
    struct Rows {
        c: Criterion,
    }

    impl Timer for Rows {
        fn time(
            &mut self,
            gpu: &Gpu,
            name: &str,
            f: &mut dyn FnMut() -> clt::Result<()>,
        ) -> clt::Result<f64> {
            let mut failed = None;
            self.c.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let timed = gpu.time_ms(|| (0..iters).try_for_each(|_| f()));
                    match timed {
                        Ok(ms) => Duration::from_secs_f64(ms as f64 / 1e3),
                        Err(e) => {
                            failed.get_or_insert(e);
                            Duration::from_nanos(1)
                        }
                    }
                })
            });
            if let Some(e) = failed {
                return Err(in_row(name, e));
            }
            median(gpu, 5, f).map_err(|e| in_row(name, e))
        }
    }

    let preset = match std::env::var("CLT_BENCH_SHAPE").as_deref() {
        Ok("1b") => clt::bench::Preset::Large,
        Ok("tiny") => clt::bench::Preset::Tiny,
        _ => clt::bench::Preset::Small,
    };
    let tiny = preset == clt::bench::Preset::Tiny;
    let c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(if tiny { 10 } else { 500 }))
        .measurement_time(Duration::from_millis(if tiny { 50 } else { 2000 }))
        .configure_from_args();
    let mut timer = Rows { c };
    if let Err(e) = run_with(preset, clt::bench::CudaRows::All, &mut timer) {
        println!("skipped or failed: {e}");
        if std::env::var("CLT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            std::process::exit(1);
        }
    }
    timer.c.final_summary();
}
