//! Training-step benchmarks: the sparse CPU step against the dense reference on the same problem, and the
//! encoder (blocked GEMM + sparse epilogue) alone, throughput in tokens.
//!
//! `cargo bench --bench train_step` (small preset; the large one is `clt bench --preset large`, too slow for
//! criterion's minimum of ten samples of the dense reference).

use clt::backend::cpu::encode::encode_all;
use clt::backend::cpu::sparse::thresholds;
use clt::backend::{Backend, BackendKind, Grads};
use clt::bench::{Preset, Problem};
use clt::clt::params::decoder_norms;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn train_step(c: &mut Criterion) {
    let (l, d, f, b) = Preset::Small.dims();
    let p = Problem::new(l, d, f, b, 32.0, 1.0, 0);
    let norms = decoder_norms(&p.cfg, &p.params.w_dec);
    let mut group = c.benchmark_group("train_step_small");
    group.sample_size(10);
    group.throughput(Throughput::Elements(b as u64));
    for kind in [BackendKind::Cpu, BackendKind::CpuDense] {
        let backend = Backend::new(kind).expect("cpu backends exist");
        let mut grads = Grads::zeros(&p.cfg);
        group.bench_function(format!("{kind:?}/loss_and_grad"), |bench| {
            bench.iter(|| {
                backend
                    .loss_and_grad(
                        &p.cfg, &p.params, &norms, &p.x, &p.y, p.n_tokens, &p.obj, None, &mut grads,
                    )
                    .expect("the CPU step cannot fail")
            })
        });
    }
    let th = thresholds(&p.params);
    group.bench_function("Cpu/encode", |bench| {
        bench.iter(|| encode_all(&p.cfg, &p.params, &p.x, p.n_tokens, &th, 1.0))
    });
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
