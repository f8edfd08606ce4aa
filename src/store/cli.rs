//! The `clt store` commands as library code: inspect, verify, convert and import datasets.
//!
//! The binary wires [`StoreCommand`] in as a subcommand and calls [`run`]. The commands print to stdout and return
//! typed errors; [`verify`] is also callable directly (tests use it): it checks blocks in parallel and reports the
//! lowest-numbered bad block of the first bad shard, naming the shard, the block and the block's byte offset.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::codec::Codec;
use super::format::ShardMeta;
use super::import::ImportSource;
use super::manifest::Manifest;
use super::reader::{BlockReader, Dataset, Shard};
use super::writer::{DatasetWriter, TokenIds, WriterConfig};
use crate::{Error, Result};

/// How output datasets are encoded (shared by `convert` and `import`).
#[derive(Clone, Debug, clap::Args)]
pub struct EncodeArgs {
    /// Value codec.
    #[arg(long, value_enum, default_value_t = Codec::Int8)]
    pub codec: Codec,
    /// Do not split 16-bit codes into byte planes.
    #[arg(long)]
    pub no_byte_planes: bool,
    /// Tokens per block.
    #[arg(long, default_value_t = 256)]
    pub block_tokens: usize,
    /// Tokens per shard.
    #[arg(long, default_value_t = 1 << 20)]
    pub shard_tokens: u64,
    /// zstd level (1..=22).
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// Compression threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Outlier dimensions per layer kept in bf16 (int8o codec only).
    #[arg(long, default_value_t = 8)]
    pub outlier_dims: usize,
    /// Error target ε (int8, int8p and int8e only): no row is quantised finer than a step that gives each layer a
    /// relative error of about ε; under int8 and int8p, rows whose range needs a coarser step keep int8's absmax
    /// step; int8e codes every value at that step (escaping codes beyond ±127), default 7e-4.
    #[arg(long)]
    pub target_rel_err: Option<f64>,
}

impl EncodeArgs {
    fn config(&self) -> WriterConfig {
        WriterConfig {
            codec: self.codec,
            byte_planes: !self.no_byte_planes,
            block_tokens: self.block_tokens,
            zstd_level: self.zstd_level,
            threads: self.threads,
            outlier_dims: self.outlier_dims,
            target_rel_err: self.target_rel_err,
        }
    }
}

/// Input formats of `import`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    /// `--x X.npy --y Y.npy [--tokens T.npy]`, arrays `[T, L, d]`.
    Npy,
    /// CLT-Forge safetensors splits (`act_in`, `act_out`, `tokens`), given as positional files.
    CltForge,
}

/// `clt store ...`
#[derive(Clone, Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Print a dataset's manifest summary, or a shard's header and metadata.
    Inspect {
        /// Dataset directory, manifest.json, or one shard file.
        path: PathBuf,
        /// Also list every block (offset, sizes, checksums).
        #[arg(long)]
        blocks: bool,
    },
    /// Check the manifest against the shards and every block's checksums; report the first bad block.
    Verify {
        /// Dataset directory, manifest.json, or one shard file.
        path: PathBuf,
    },
    /// Re-encode a dataset with another codec (values pass through f32; lossy codecs do not regain precision).
    Convert {
        input: PathBuf,
        output: PathBuf,
        #[command(flatten)]
        encode: EncodeArgs,
    },
    /// Import activations written by Python tools into a new dataset.
    Import {
        #[arg(long, value_enum)]
        format: ImportFormat,
        /// Output dataset directory.
        #[arg(long)]
        out: PathBuf,
        /// Inputs `[T, L, d]` (npy format).
        #[arg(long)]
        x: Option<PathBuf>,
        /// Targets `[T, L, d]` (npy format).
        #[arg(long)]
        y: Option<PathBuf>,
        /// Token ids `[T]` (npy format, optional).
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// CLT-Forge safetensors files, appended in order.
        files: Vec<PathBuf>,
        /// Model name recorded in the shards.
        #[arg(long, default_value = "")]
        model: String,
        #[command(flatten)]
        encode: EncodeArgs,
    },
}

/// Runs a `clt store` command.
pub fn run(cmd: StoreCommand) -> Result<()> {
    match cmd {
        StoreCommand::Inspect { path, blocks } => inspect(&path, blocks),
        StoreCommand::Verify { path } => {
            let r = verify(&path)?;
            println!(
                "ok: {} shards, {} blocks, {} tokens, {} bytes verified",
                r.shards, r.blocks, r.tokens, r.bytes
            );
            Ok(())
        }
        StoreCommand::Convert {
            input,
            output,
            encode,
        } => {
            let m = convert(&input, &output, &encode)?;
            println!(
                "wrote {} tokens in {} shards to {}",
                m.n_tokens,
                m.shards.len(),
                output.display()
            );
            Ok(())
        }
        StoreCommand::Import {
            format,
            out,
            x,
            y,
            tokens,
            files,
            model,
            encode,
        } => {
            let sources = match format {
                ImportFormat::Npy => {
                    let (Some(x), Some(y)) = (x, y) else {
                        return Err(Error::config("import.x", "npy import needs --x and --y"));
                    };
                    vec![ImportSource::npy(&x, &y, tokens.as_deref())?]
                }
                ImportFormat::CltForge => {
                    if files.is_empty() {
                        return Err(Error::config(
                            "import.files",
                            "name at least one safetensors file",
                        ));
                    }
                    files
                        .iter()
                        .map(|f| ImportSource::clt_forge(f))
                        .collect::<Result<_>>()?
                }
            };
            let m = import(&sources, &out, &encode, &model)?;
            println!(
                "imported {} tokens in {} shards to {}",
                m.n_tokens,
                m.shards.len(),
                out.display()
            );
            Ok(())
        }
    }
}

fn inspect(path: &Path, blocks: bool) -> Result<()> {
    let shards: Vec<std::sync::Arc<Shard>> = if path.is_file()
        && path.extension().is_some_and(|e| e == "clts")
    {
        vec![std::sync::Arc::new(Shard::open(path)?)]
    } else {
        let ds = Dataset::open(path)?;
        let m = ds.manifest();
        println!(
            "dataset {}: {} tokens, {} shards, L={} d={}, codec {} (byte planes {}), {} tokens/block, model {:?}",
            ds.dir().display(),
            m.n_tokens,
            m.shards.len(),
            m.dims.n_layers,
            m.dims.d_model,
            m.codec.name(),
            m.byte_planes,
            m.block_tokens,
            m.model
        );
        let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
        let row = (m.dims.n_layers * m.dims.d_model) as f64;
        println!(
            "{} bytes on disk, {:.1} bytes/token ({:.2}x smaller than f32 inputs+targets)",
            bytes,
            bytes as f64 / m.n_tokens as f64,
            m.n_tokens as f64 * row * 8.0 / bytes as f64
        );
        ds.shards().to_vec()
    };
    for s in &shards {
        let h = s.header();
        println!(
            "{}: v{} {} tokens in {} blocks of {}, L={} d={}, codec {} (outlier dims {}), checksum {:016x}",
            s.path().display(),
            h.version,
            h.n_tokens,
            h.n_blocks,
            h.block_tokens,
            h.n_layers,
            h.d_model,
            h.codec.name(),
            h.outliers,
            h.checksum
        );
        println!(
            "  meta: {}",
            serde_json::to_string(s.meta()).unwrap_or_default()
        );
        if blocks {
            for (i, b) in s.blocks().iter().enumerate() {
                println!(
                    "  block {i}: offset {} compressed {} raw {} tokens {} xxh3 {:016x}/{:016x}",
                    b.offset, b.comp_len, b.raw_len, b.n_tokens, b.comp_xxh3, b.raw_xxh3
                );
            }
        }
    }
    Ok(())
}

/// What [`verify`] checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub shards: u64,
    pub blocks: u64,
    pub tokens: u64,
    pub bytes: u64,
}

/// Checks a dataset (manifest against shards, then every block's checksums, in order) or a single shard file;
/// returns the first failure, whose error names the shard, block and byte offset.
pub fn verify(path: &Path) -> Result<VerifyReport> {
    let shards = if path.is_file() && path.extension().is_some_and(|e| e == "clts") {
        vec![std::sync::Arc::new(Shard::open(path)?)]
    } else {
        Dataset::open(path)?.shards().to_vec()
    };
    let mut rep = VerifyReport::default();
    for s in &shards {
        // Blocks are checked in parallel; the error reported is the one of the lowest-numbered bad block.
        let first_bad = (0..s.blocks().len())
            .into_par_iter()
            .map_init(
                || BlockReader::new().ok(),
                |r, b| match r {
                    Some(r) => r.read(s, b).err(),
                    None => Some(Error::Source("cannot create a zstd decompressor".into())),
                },
            )
            .find_map_first(|e| e);
        if let Some(e) = first_bad {
            return Err(e);
        }
        rep.shards += 1;
        rep.blocks += s.blocks().len() as u64;
        rep.tokens += s.n_tokens();
        rep.bytes += std::fs::metadata(s.path())
            .map_err(|e| Error::io(s.path(), e))?
            .len();
    }
    Ok(rep)
}

/// Re-encodes the dataset at `input` into a new dataset at `output`, keeping token ids and metadata.
pub fn convert(input: &Path, output: &Path, encode: &EncodeArgs) -> Result<Manifest> {
    let ds = Dataset::open(input)?;
    let dims = ds.dims();
    let meta = ShardMeta {
        norm: None,
        ..ds.shards()[0].meta().clone()
    };
    let mut w = DatasetWriter::create(output, dims, encode.config(), meta, encode.shard_tokens)?;
    let row = dims.n_layers * dims.d_model;
    let mut r = BlockReader::new()?;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for s in ds.shards() {
        for b in 0..s.blocks().len() {
            let blk = r.read(s, b)?;
            let n = blk.n_tokens();
            x.resize(n * row, 0.0);
            y.resize(n * row, 0.0);
            blk.xy_rows(0, &mut x, &mut y);
            let t: Vec<u32> = blk.tokens().collect();
            let p: Vec<u32> = blk.positions().collect();
            let d: Vec<u64> = blk.doc_ids().collect();
            let ids = TokenIds {
                tokens: &t,
                positions: &p,
                doc_ids: &d,
            };
            w.push(&x, &y, Some(ids))?;
        }
    }
    w.finish()
}

/// Imports `sources` (all of the same dims) into a new dataset at `out`.
pub fn import(
    sources: &[ImportSource],
    out: &Path,
    encode: &EncodeArgs,
    model: &str,
) -> Result<Manifest> {
    let Some(first) = sources.first() else {
        return Err(Error::config("import.files", "no sources"));
    };
    let (dims, _) = first.dims()?;
    let meta = ShardMeta {
        model: model.to_string(),
        ..Default::default()
    };
    let mut w = DatasetWriter::create(out, dims, encode.config(), meta, encode.shard_tokens)?;
    let chunk = (encode.block_tokens * 16).max(1);
    for s in sources {
        s.copy_into(&mut w, dims, chunk)?;
    }
    w.finish()
}
