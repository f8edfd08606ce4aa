//! Criterion benchmarks of the activation store: block decode (decompress + checksums + dequantise into f32) per
//! codec, and the shuffling loader's batches, in f32 and still coded (`next_coded`, what the CUDA trainer
//! stages from an int8 store). Throughput is in f32-equivalent bytes (inputs and targets).
//! Run: `cargo bench --bench store`. The figures table in docs/perf-store.md comes from
//! `examples/store_figures.rs`, which also measures sizes, errors and the CLT-Forge baseline.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use clt::data::{ActDims, ActivationSource, Batch, CodedBatch};
use clt::store::format::ShardMeta;
use clt::store::{
    BlockReader, Codec, Dataset, DatasetWriter, LoaderConfig, ShardLoader, WriterConfig,
};

const DIMS: ActDims = ActDims {
    n_layers: 4,
    d_model: 512,
};
const TOKENS: usize = 4096;

fn data() -> (Vec<f32>, Vec<f32>) {
    let mut s = 1u64;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
    };
    let n = TOKENS * DIMS.n_layers * DIMS.d_model;
    let x: Vec<f32> = (0..n)
        .map(|i| if i % 97 == 0 { next() * 30.0 } else { next() })
        .collect();
    let y = x.iter().rev().copied().collect();
    (x, y)
}

fn write(dir: &std::path::Path, codec: Codec, x: &[f32], y: &[f32]) {
    let cfg = WriterConfig {
        codec,
        byte_planes: true,
        block_tokens: 256,
        zstd_level: 3,
        threads: 0,
        outlier_dims: 8,
        target_rel_err: None,
    };
    let mut w = DatasetWriter::create(dir, DIMS, cfg, ShardMeta::default(), TOKENS as u64).unwrap();
    w.push(x, y, None).unwrap();
    w.finish().unwrap();
}

fn bench(c: &mut Criterion) {
    let (x, y) = data();
    let tmp = tempfile::tempdir().unwrap();
    let row = DIMS.n_layers * DIMS.d_model;
    let mut g = c.benchmark_group("decode_block");
    g.throughput(Throughput::Bytes((256 * row * 8) as u64));
    for codec in Codec::ALL {
        let dir = tmp.path().join(codec.name());
        write(&dir, codec, &x, &y);
        let ds = Dataset::open(&dir).unwrap();
        let shard = ds.shards()[0].clone();
        let mut r = BlockReader::new().unwrap();
        let mut out = vec![0f32; 256 * row];
        let mut b = 0;
        g.bench_function(codec.name(), |bch| {
            bch.iter(|| {
                let blk = r.read(&shard, b % shard.blocks().len()).unwrap();
                blk.x_rows(0, &mut out);
                blk.y_rows(0, &mut out);
                b += 1;
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("loader");
    g.throughput(Throughput::Bytes((1024 * row * 8) as u64));
    for workers in [0, 2] {
        let dir = tmp.path().join(Codec::Int8.name());
        let cfg = LoaderConfig {
            seed: 0,
            window_blocks: 4,
            workers,
            prefetch: 2,
            rank: 0,
            world: 1,
        };
        let mut ld = ShardLoader::open(&dir, cfg.clone()).unwrap();
        let mut batch = Batch::default();
        g.bench_function(format!("int8_batch1024_workers{workers}"), |bch| {
            bch.iter(|| ld.next_batch(1024, &mut batch).unwrap())
        });
        let mut ld = ShardLoader::open(&dir, cfg).unwrap();
        let mut coded = CodedBatch::default();
        g.bench_function(format!("int8_coded_batch1024_workers{workers}"), |bch| {
            bch.iter(|| ld.next_coded(1024, &mut coded).unwrap())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
