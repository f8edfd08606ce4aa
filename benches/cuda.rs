//! Per-kernel timings of the CUDA backend: `clt::backend::cuda::bench` (also `clt bench --cuda`), at the
//! small shape or, with `CLT_BENCH_SHAPE=1b`, the Llama-3.2-1B shape (`tiny`: a smoke test). Without a GPU it prints that
//! it was skipped (and exits 1 under `CLT_REQUIRE_GPU=1`).
//! Run: `cargo bench --features cuda --bench cuda`.

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("skipped: built without `--features cuda`");
}

#[cfg(feature = "cuda")]
fn main() {
    let preset = match std::env::var("CLT_BENCH_SHAPE").as_deref() {
        Ok("1b") => clt::bench::Preset::Large,
        Ok("tiny") => clt::bench::Preset::Tiny,
        _ => clt::bench::Preset::Small,
    };
    if let Err(e) = clt::backend::cuda::bench::run(preset) {
        println!("skipped or failed: {e}");
        if std::env::var("CLT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            std::process::exit(1);
        }
    }
}
