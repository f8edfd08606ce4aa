//! Sharded checkpoints: one file pair per rank and a manifest, loadable into any number of ranks.
//!
//! A sharded checkpoint is a directory `checkpoints/step_NNNNNNNN/` holding
//! - `shard_RRRRR.safetensors`: rank R's parameters (its features of every layer, named as in a native
//!   transcoder, with `n_features` the shard's size, plus the replicated `b_dec`/`W_skip`) and Adam's moments
//!   (`adam.m.*`, `adam.v.*`);
//! - `shard_RRRRR.json`: its feature range and dead-feature clocks;
//! - `manifest.json` (rank 0): format and version, the number of ranks and each shard's range and files, the
//!   run configuration, the normalisation scalars, the step, Adam's step, the RNG and the data position.
//!
//! Each file is written atomically into a temporary directory `.step_NNNNNNNN.tmp`; when every rank has
//! written its shard, rank 0 writes the manifest, renames the directory and replaces `LATEST`, so a run that
//! dies while checkpointing leaves the previous checkpoint named by `LATEST`, complete.
//!
//! Loading takes a feature range: the features of every shard that overlaps it are copied out, so a
//! checkpoint written by N ranks loads into M ranks; the full range gives the single-process transcoder
//! ([`load_transcoder`]), which the exporters take. A native single-process checkpoint loads the same way.

use super::shard::{copy_features, local_config};
use crate::backend::KernelChoice;
use crate::clt::checkpoint::{
    TensorFile, params_out, read_json, read_params, write_atomic, write_tensors,
};
use crate::clt::{CltConfig, NormScales, Params, Transcoder};
use crate::rng::Rng;
use crate::train::{DataConfig, RunConfig};
use crate::{Error, Result};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "clt-sharded-checkpoint";
pub const VERSION: u32 = 1;
const SHARD_FORMAT: &str = "clt-checkpoint-shard";

/// One rank's entry in the manifest.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardEntry {
    pub rank: usize,
    pub start: usize,
    pub end: usize,
    /// The tensors (`shard_RRRRR.safetensors`).
    pub tensors: String,
    /// The range and dead-feature clocks (`shard_RRRRR.json`).
    pub state: String,
}

/// `manifest.json`: everything but the shards' tensors.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub world: usize,
    pub step: u64,
    pub adam_t: u64,
    pub tokens_seen: u64,
    pub rng: Rng,
    pub source_position: serde_json::Value,
    pub norms: NormScales,
    pub run: RunConfig,
    pub shards: Vec<ShardEntry>,
    /// The kernels the CUDA step ran: what `auto` settings resolved to (absent before the first step, and
    /// in checkpoints of earlier versions).
    #[serde(default)]
    pub kernels: Option<KernelChoice>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ShardState {
    format: String,
    rank: usize,
    start: usize,
    end: usize,
    last_fired: Vec<Vec<u64>>,
}

/// The state a rank trains from: its features' parameters, Adam moments and dead-feature clocks.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardData {
    pub params: Params,
    pub m: Params,
    pub v: Params,
    pub last_fired: Vec<Vec<u64>>,
}

/// The files of rank `rank`'s shard.
pub fn shard_files(rank: usize) -> (String, String) {
    (
        format!("shard_{rank:05}.safetensors"),
        format!("shard_{rank:05}.json"),
    )
}

/// Writes rank `rank`'s shard (features `range` of the model `cfg`) into `dir`, each file atomically.
pub fn write_shard(
    dir: &Path,
    cfg: &CltConfig,
    rank: usize,
    range: &Range<usize>,
    data: &ShardData,
) -> Result<ShardEntry> {
    let local = local_config(cfg, range);
    let (tensors, state) = shard_files(rank);
    let mut out = params_out(&data.params, &local, "");
    out.extend(params_out(&data.m, &local, "adam.m."));
    out.extend(params_out(&data.v, &local, "adam.v."));
    write_tensors(&dir.join(&tensors), &out, None)?;
    let s = ShardState {
        format: SHARD_FORMAT.into(),
        rank,
        start: range.start,
        end: range.end,
        last_fired: data.last_fired.clone(),
    };
    write_json(&dir.join(&state), &s)?;
    Ok(ShardEntry {
        rank,
        start: range.start,
        end: range.end,
        tensors,
        state,
    })
}

/// Writes `manifest.json` into `dir` (atomically).
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    write_json(&dir.join(MANIFEST), m)
}

fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    let json = serde_json::to_vec_pretty(v).map_err(|e| Error::Checkpoint {
        path: path.into(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &json)
}

/// Whether `dir` is a sharded checkpoint.
pub fn is_sharded(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// A checkpoint directory (sharded or native) from a path that is one or a run directory, whose
/// `checkpoints/LATEST` names one.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if is_sharded(path) || path.join("config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("checkpoints").join("LATEST");
    let name = std::fs::read_to_string(&latest).map_err(|e| Error::io(&latest, e))?;
    let dir = path.join("checkpoints").join(name.trim());
    if !is_sharded(&dir) && !dir.join("config.json").is_file() {
        return Err(Error::Checkpoint {
            path: dir,
            reason: "named by LATEST but incomplete or missing".into(),
        });
    }
    Ok(dir)
}

/// Reads and checks a sharded checkpoint's manifest: its shards must cover every feature once, in order.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let m: Manifest = read_json(&path)?;
    let bad = |reason: String| Error::Checkpoint {
        path: path.clone(),
        reason,
    };
    if m.format != FORMAT || m.version != VERSION {
        return Err(bad(format!(
            "format {} v{} is not {FORMAT} v{VERSION}",
            m.format, m.version
        )));
    }
    m.run.validate()?;
    let l_n = m.run.model.n_layers;
    if m.norms.input.len() != l_n || m.norms.target.len() != l_n {
        return Err(bad(format!("norms must have {l_n} entries per side")));
    }
    if m.shards.len() != m.world {
        return Err(bad(format!(
            "{} shards listed for {} ranks",
            m.shards.len(),
            m.world
        )));
    }
    let mut next = 0;
    for (r, s) in m.shards.iter().enumerate() {
        if s.rank != r || s.start != next || s.end <= s.start {
            return Err(bad(format!(
                "shard {r} covers features {}..{} (rank {}), expected to start at {next}",
                s.start, s.end, s.rank
            )));
        }
        next = s.end;
    }
    if next != m.run.model.n_features {
        return Err(bad(format!(
            "the shards cover {next} of {} features",
            m.run.model.n_features
        )));
    }
    Ok(m)
}

/// The state of the features `range` from a sharded checkpoint: the tensors of every shard that overlaps
/// it, the replicated tensors from shard 0.
pub fn load_range(dir: &Path, m: &Manifest, range: &Range<usize>) -> Result<ShardData> {
    let cfg = &m.run.model;
    let local = local_config(cfg, range);
    let mut data = ShardData {
        params: Params::zeros(&local),
        m: Params::zeros(&local),
        v: Params::zeros(&local),
        last_fired: vec![vec![0; range.len()]; cfg.n_layers],
    };
    for s in &m.shards {
        let overlaps = s.start < range.end && range.start < s.end;
        if !overlaps && s.rank != 0 {
            continue;
        }
        let src_range = s.start..s.end;
        let src_cfg = local_config(cfg, &src_range);
        let spath = dir.join(&s.state);
        let st: ShardState = read_json(&spath)?;
        if st.format != SHARD_FORMAT || st.rank != s.rank || st.start != s.start || st.end != s.end
        {
            return Err(Error::Checkpoint {
                path: spath,
                reason: format!(
                    "shard {} of features {}..{} does not match the manifest's rank {} of {}..{}",
                    st.rank, st.start, st.end, s.rank, s.start, s.end
                ),
            });
        }
        if st.last_fired.len() != cfg.n_layers
            || st.last_fired.iter().any(|l| l.len() != src_range.len())
        {
            return Err(Error::Checkpoint {
                path: spath,
                reason: "last_fired has the wrong shape".into(),
            });
        }
        let mut file = TensorFile::read(&dir.join(&s.tensors))?;
        let p = read_params(&mut file, &src_cfg, "")?;
        let am = read_params(&mut file, &src_cfg, "adam.m.")?;
        let av = read_params(&mut file, &src_cfg, "adam.v.")?;
        let rep = s.rank == 0;
        copy_features(cfg, &p, &src_range, &mut data.params, range, rep);
        copy_features(cfg, &am, &src_range, &mut data.m, range, rep);
        copy_features(cfg, &av, &src_range, &mut data.v, range, rep);
        let lo = src_range.start.max(range.start);
        let hi = src_range.end.min(range.end);
        for (dst, src) in data.last_fired.iter_mut().zip(&st.last_fired) {
            if lo < hi {
                dst[lo - range.start..hi - range.start]
                    .copy_from_slice(&src[lo - src_range.start..hi - src_range.start]);
            }
        }
    }
    Ok(data)
}

/// `state.json` of a native (single-process) training checkpoint, as `train::trainer` writes it.
#[derive(serde::Deserialize)]
struct NativeState {
    step: u64,
    adam_t: u64,
    tokens_seen: u64,
    rng: Rng,
    source_position: serde_json::Value,
    last_fired: Vec<Vec<u64>>,
    run: RunConfig,
    #[serde(default)]
    kernels: Option<KernelChoice>,
}

/// The training state of the features `range` from either kind of checkpoint directory (a native one reads
/// as a manifest of one shard).
pub fn load_state(dir: &Path, range: &Range<usize>) -> Result<(Manifest, ShardData)> {
    if is_sharded(dir) {
        let m = read_manifest(dir)?;
        check_range(dir, &m.run.model, range)?;
        let data = load_range(dir, &m, range)?;
        return Ok((m, data));
    }
    let st: NativeState = read_json(&dir.join("state.json"))?;
    let t = crate::clt::checkpoint::load_transcoder(dir)?;
    let cfg = &t.cfg;
    if *cfg != st.run.model {
        return Err(Error::Checkpoint {
            path: dir.into(),
            reason: "config.json and state.json disagree on the model".into(),
        });
    }
    check_range(dir, cfg, range)?;
    if st.last_fired.len() != cfg.n_layers
        || st.last_fired.iter().any(|l| l.len() != cfg.n_features)
    {
        return Err(Error::Checkpoint {
            path: dir.join("state.json"),
            reason: "last_fired has the wrong shape".into(),
        });
    }
    let mut opt = TensorFile::read(&dir.join("optimizer.safetensors"))?;
    let am = read_params(&mut opt, cfg, "adam.m.")?;
    let av = read_params(&mut opt, cfg, "adam.v.")?;
    let full = 0..cfg.n_features;
    let data = ShardData {
        params: super::shard::slice(cfg, &t.params, range),
        m: super::shard::slice(cfg, &am, range),
        v: super::shard::slice(cfg, &av, range),
        last_fired: st
            .last_fired
            .iter()
            .map(|l| l[range.clone()].to_vec())
            .collect(),
    };
    let m = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        world: 1,
        step: st.step,
        adam_t: st.adam_t,
        tokens_seen: st.tokens_seen,
        rng: st.rng,
        source_position: st.source_position,
        norms: t.norms,
        run: st.run,
        shards: vec![ShardEntry {
            rank: 0,
            start: full.start,
            end: full.end,
            tensors: "model.safetensors".into(),
            state: "state.json".into(),
        }],
        kernels: st.kernels,
    };
    Ok((m, data))
}

fn check_range(dir: &Path, cfg: &CltConfig, range: &Range<usize>) -> Result<()> {
    if range.end > cfg.n_features || range.is_empty() {
        return Err(Error::Checkpoint {
            path: dir.into(),
            reason: format!(
                "features {}..{} requested of a model with {}",
                range.start, range.end, cfg.n_features
            ),
        });
    }
    Ok(())
}

/// The whole transcoder of a checkpoint of either kind (a checkpoint or run directory): a sharded one is
/// assembled from its shards.
pub fn load_transcoder(path: &Path) -> Result<Transcoder> {
    let dir = resolve(path)?;
    if !is_sharded(&dir) {
        return crate::clt::checkpoint::load_transcoder(&dir);
    }
    let m = read_manifest(&dir)?;
    let data = load_range(&dir, &m, &(0..m.run.model.n_features))?;
    Ok(Transcoder {
        cfg: m.run.model,
        params: data.params,
        norms: m.norms,
    })
}

/// The file in which a checkpoint derived from a run's (`clt convert-batchtopk`'s output, which has no
/// training state) keeps the data configuration of that run.
pub const SOURCE_DATA: &str = "source_data.json";

/// Records in a derived checkpoint `dir` the data its source run trained on (see [`data_config`]).
pub fn write_source_data(dir: &Path, data: &DataConfig) -> Result<()> {
    let path = dir.join(SOURCE_DATA);
    let json = serde_json::to_vec_pretty(data).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&path, &json)
}

/// The data the transcoder of a checkpoint (or run directory) was trained on: its run's, for a training
/// checkpoint of either kind; for a derived one, what [`write_source_data`] recorded; `None` when nothing
/// records it (a `clt import`ed transcoder).
pub fn data_config(path: &Path) -> Result<Option<DataConfig>> {
    let dir = resolve(path)?;
    if is_sharded(&dir) || dir.join("state.json").is_file() {
        return run_config(&dir).map(|r| Some(r.data));
    }
    let path = dir.join(SOURCE_DATA);
    if !path.is_file() {
        return Ok(None);
    }
    read_json(&path).map(Some)
}

/// The run configuration of a checkpoint of either kind (a checkpoint or run directory).
pub fn run_config(path: &Path) -> Result<RunConfig> {
    let dir = resolve(path)?;
    if is_sharded(&dir) {
        Ok(read_manifest(&dir)?.run)
    } else {
        crate::train::trainer::run_config_of(&dir)
    }
}
