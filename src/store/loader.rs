//! The shuffling shard loader: an [`ActivationSource`] over a whole dataset of shards.
//!
//! **Order.** Each epoch `e` permutes the list of all blocks of all shards (seeded by `(seed, e)`); in partition mode
//! rank `r` of `W` keeps the blocks at positions `p ≡ r (mod W)` of that permutation, so the ranks read disjoint
//! blocks that together cover the dataset once per epoch. The rank's blocks are cut into windows of
//! `window_blocks` consecutive blocks, and the tokens of each window are permuted (seeded by `(seed, e, r, w)`).
//! The stream is the windows in order, epoch after epoch; a batch may span windows and epochs. Everything is a pure
//! function of the seed, the dataset and `(rank, world, window_blocks)`, never of the number of workers or of
//! timing, so the stream is deterministic and [`position`](ActivationSource::position) — `(epoch, window,
//! cursor)` — restores it exactly.
//!
//! **Pipeline.** With `workers > 0`, background threads prepare whole windows (window `g` of the stream on worker
//! `g mod workers`): they decompress each block once into a pooled buffer, checking both checksums, and compute the
//! window's row order; the windows travel over bounded channels (`prefetch` windows per worker). One more thread
//! assembles batches from them: it dequantises each row straight from its decompressed block into the batch (one
//! fused pass, no intermediate f32 copy; the batch's rows split among `workers` scoped threads) and queues up to
//! `prefetch` batches, so that the caller only swaps buffers
//! (served batches' buffers go back to it for reuse). Batches are assembled for the size last asked for; a call with
//! another size, or a restore, restarts assembly at the caller's position. With `workers = 0` the caller's thread
//! decompresses and dequantises. Memory held: about `(workers × (prefetch + 1) + 2) × window_blocks` decompressed
//! blocks (the codec's size, not f32) and, with workers, `prefetch + 2` batches of f32.
//!
//! **Coded batches.** When every shard is int8 or every shard int4, [`ActivationSource::next_coded`] serves
//! the same rows still quantised ([`CodedBatch`]: each row's scale and codes copied out of its block as
//! they are), for a trainer that decodes them on the device; both kinds of call advance the one stream.
//!
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::codec::Codec;
use super::format::BlockLayout;
use super::reader::{Block, BlockReader, Dataset};
use crate::data::{ActDims, ActivationSource, Batch, CodedBatch};
use crate::{Error, Result};

/// Loader settings. The stream depends on `seed`, `window_blocks`, `rank` and `world` only.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoaderConfig {
    /// Seed of every permutation.
    pub seed: u64,
    /// Blocks per shuffle window (rows are shuffled within a window).
    pub window_blocks: usize,
    /// Background decoding threads (0: decode on the caller's thread).
    pub workers: usize,
    /// Decompressed windows queued per worker, and assembled batches queued (`workers > 0`).
    pub prefetch: usize,
    /// This rank in partition mode (0 when not partitioned).
    pub rank: usize,
    /// Number of ranks sharing the dataset (1 when not partitioned).
    pub world: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            seed: 0,
            window_blocks: 16,
            workers: 2,
            prefetch: 2,
            rank: 0,
            world: 1,
        }
    }
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The splitmix64 finaliser (a stable, dependency-free mixing function: the stream must not change with a crate
/// upgrade, or restored checkpoints would see other data).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn seed_of(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x5eed_u64, |h, &p| mix64(h ^ mix64(p.wrapping_add(GOLDEN))))
}

/// Fisher–Yates shuffle driven by splitmix64 (multiply-shift range reduction; its bias is below 2^-32 here).
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut s = seed;
    for i in (1..v.len()).rev() {
        s = s.wrapping_add(GOLDEN);
        let j = ((mix64(s) as u128 * (i as u128 + 1)) >> 64) as usize;
        v.swap(i, j);
    }
}

/// The blocks of one epoch for this rank, cut into windows.
struct EpochPlan {
    epoch: u64,
    /// Global block ids of each window.
    windows: Vec<Vec<u32>>,
}

/// Immutable description of the dataset's blocks shared by the loader and its workers.
struct Plan {
    ds: Arc<Dataset>,
    /// (shard, block, tokens) of every block, in dataset order.
    blocks: Vec<(u32, u32, u32)>,
    cfg: LoaderConfig,
    n_windows: u64,
    row: usize,
    /// The codec of every shard when it is int8 or int4 throughout (batches can then be served coded).
    coded: Option<Codec>,
    /// Decompression buffers returned by served windows, reused by the next ones.
    pool: Mutex<Vec<Vec<u8>>>,
}

impl Plan {
    fn epoch(&self, epoch: u64) -> EpochPlan {
        let mut order: Vec<u32> = (0..self.blocks.len() as u32).collect();
        shuffle(&mut order, seed_of(&[self.cfg.seed, epoch]));
        let mine: Vec<u32> = order
            .into_iter()
            .skip(self.cfg.rank)
            .step_by(self.cfg.world)
            .collect();
        EpochPlan {
            epoch,
            windows: mine
                .chunks(self.cfg.window_blocks)
                .map(<[u32]>::to_vec)
                .collect(),
        }
    }

    /// Decompresses the blocks of window `g` of the stream (checking their checksums) and computes its row order.
    fn decode(
        &self,
        g: u64,
        plan: &mut Option<EpochPlan>,
        reader: &mut BlockReader,
    ) -> Result<Window> {
        let (e, w) = (g / self.n_windows, (g % self.n_windows) as usize);
        if plan.as_ref().is_none_or(|p| p.epoch != e) {
            *plan = Some(self.epoch(e));
        }
        let ids = &plan.as_ref().unwrap().windows[w];
        let mut blocks = Vec::with_capacity(ids.len());
        // (block in window, token in block) of each source token, in window order.
        let mut owner = Vec::new();
        for (j, &b) in ids.iter().enumerate() {
            let (si, bi, nt) = self.blocks[b as usize];
            let mut buf = self
                .pool
                .lock()
                .ok()
                .and_then(|mut p| p.pop())
                .unwrap_or_default();
            let layout = reader
                .read_into(&self.ds.shards()[si as usize], bi as usize, &mut buf)?
                .layout;
            blocks.push((layout, buf));
            owner.extend((0..nt).map(|t| (j as u32, t)));
        }
        let mut perm: Vec<u32> = (0..owner.len() as u32).collect();
        shuffle(
            &mut perm,
            seed_of(&[self.cfg.seed, e, self.cfg.rank as u64, w as u64]),
        );
        let src = perm.into_iter().map(|s| owner[s as usize]).collect();
        Ok(Window {
            g,
            n: owner.len(),
            blocks,
            src,
        })
    }

    /// Returns a window's buffers to the pool.
    fn recycle(&self, w: Window) {
        if let Ok(mut p) = self.pool.lock() {
            let cap = (self.cfg.workers + 1) * (self.cfg.prefetch + 2) * self.cfg.window_blocks;
            for (_, buf) in w.blocks {
                if p.len() < cap {
                    p.push(buf);
                }
            }
        }
    }
}

/// A window of decompressed blocks and the order in which its rows are served.
struct Window {
    g: u64,
    n: usize,
    blocks: Vec<(BlockLayout, Vec<u8>)>,
    /// Output row `i` is token `src[i].1` of block `src[i].0`.
    src: Vec<(u32, u32)>,
}

struct Pipeline {
    start: u64,
    rx: Vec<Receiver<Result<Window>>>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Pipeline {
    fn spawn(plan: &Arc<Plan>, start: u64) -> Result<Pipeline> {
        let k = plan.cfg.workers as u64;
        let stop = Arc::new(AtomicBool::new(false));
        let mut rx = Vec::new();
        let mut handles = Vec::new();
        for i in 0..k {
            let (tx, r): (SyncSender<Result<Window>>, _) = sync_channel(plan.cfg.prefetch.max(1));
            let (plan, stop) = (plan.clone(), stop.clone());
            let h = std::thread::Builder::new()
                .name(format!("clt-store-loader-{i}"))
                .spawn(move || {
                    let mut reader = match BlockReader::new() {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let mut ep = None;
                    let mut g = start + i;
                    while !stop.load(Ordering::Relaxed) {
                        let r = plan.decode(g, &mut ep, &mut reader);
                        let failed = r.is_err();
                        if tx.send(r).is_err() || failed {
                            return;
                        }
                        g += k;
                    }
                })
                .map_err(|e| Error::Source(format!("cannot start loader thread: {e}")))?;
            rx.push(r);
            handles.push(h);
        }
        Ok(Pipeline {
            start,
            rx,
            stop,
            handles,
        })
    }

    fn recv(&self, g: u64) -> Result<Window> {
        let i = ((g - self.start) % self.rx.len() as u64) as usize;
        let w = self.rx[i]
            .recv()
            .map_err(|_| Error::Source("loader worker stopped unexpectedly".into()))??;
        debug_assert_eq!(w.g, g);
        Ok(w)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers unblocks workers waiting to send; then they see `stop` or a closed channel.
        self.rx.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The codec of every shard of `ds` if it is the same int8 or int4 for all (the codecs whose rows are a
/// scale and codes, nothing else, and so can be served as they are).
fn coded_codec(ds: &Dataset) -> Option<Codec> {
    let first = ds.shards().first()?.header().codec;
    let same = ds.shards().iter().all(|s| s.header().codec == first);
    (same && matches!(first, Codec::Int8 | Codec::Int4)).then_some(first)
}

/// Serves shuffled batches from a dataset of shards; see the module documentation for the order.
pub struct ShardLoader {
    plan: Arc<Plan>,
    /// The consumer's position: the window and row of the stream after the last batch served.
    g: u64,
    cursor: usize,
    /// `workers = 0`: the stream served on the caller's thread (started at the first batch).
    stream: Option<Stream>,
    /// `workers > 0`: batches assembled ahead on a background thread (started at the first batch).
    ahead: Option<Assembler>,
}

impl ShardLoader {
    /// Opens the dataset at `path` (a directory or its `manifest.json`) and builds a loader over it.
    pub fn open(path: impl AsRef<std::path::Path>, cfg: LoaderConfig) -> Result<Self> {
        Self::new(Arc::new(Dataset::open(path)?), cfg)
    }

    /// A loader over an open dataset, positioned at the start of epoch 0.
    pub fn new(ds: Arc<Dataset>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(Error::config(
                "loader.rank",
                format!("rank {} is not below world size {}", cfg.rank, cfg.world),
            ));
        }
        if cfg.window_blocks == 0 {
            return Err(Error::config("loader.window_blocks", "must be positive"));
        }
        let mut blocks = Vec::new();
        for (si, s) in ds.shards().iter().enumerate() {
            for (bi, b) in s.blocks().iter().enumerate() {
                blocks.push((si as u32, bi as u32, b.n_tokens));
            }
        }
        if blocks.len() > u32::MAX as usize {
            return Err(Error::Unsupported(
                "datasets of more than 2^32 blocks".into(),
            ));
        }
        if blocks.len() < cfg.world {
            return Err(Error::config(
                "loader.world",
                format!(
                    "{} ranks but the dataset has only {} blocks",
                    cfg.world,
                    blocks.len()
                ),
            ));
        }
        let mine = (blocks.len() - cfg.rank).div_ceil(cfg.world);
        let dims = ds.dims();
        let plan = Plan {
            n_windows: mine.div_ceil(cfg.window_blocks) as u64,
            row: dims.n_layers * dims.d_model,
            coded: coded_codec(&ds),
            pool: Mutex::new(Vec::new()),
            ds,
            blocks,
            cfg,
        };
        Ok(ShardLoader {
            plan: Arc::new(plan),
            g: 0,
            cursor: 0,
            stream: None,
            ahead: None,
        })
    }

    /// The dataset served.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.plan.ds
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.g / self.plan.n_windows
    }

    /// Tokens this rank serves in `epoch` (the whole dataset when not partitioned).
    pub fn epoch_tokens(&self, epoch: u64) -> u64 {
        self.plan
            .epoch(epoch)
            .windows
            .iter()
            .flatten()
            .map(|&b| self.plan.blocks[b as usize].2 as u64)
            .sum()
    }

    /// Tokens of window `g` of the stream.
    fn window_tokens(&self, g: u64) -> usize {
        let (e, w) = (g / self.plan.n_windows, (g % self.plan.n_windows) as usize);
        self.plan.epoch(e).windows[w]
            .iter()
            .map(|&b| self.plan.blocks[b as usize].2 as usize)
            .sum()
    }

    /// Global ids `(shard, block)` of the blocks this rank reads in `epoch`, in stream order.
    pub fn epoch_blocks(&self, epoch: u64) -> Vec<(usize, usize)> {
        self.plan
            .epoch(epoch)
            .windows
            .iter()
            .flatten()
            .map(|&b| {
                let (s, i, _) = self.plan.blocks[b as usize];
                (s as usize, i as usize)
            })
            .collect()
    }

    /// Serves the next `n_tokens` rows into `out` (f32 or coded: the same rows, the same position after).
    fn serve(&mut self, n_tokens: usize, out: Out<'_>) -> Result<()> {
        if self.plan.cfg.workers == 0 {
            let stream = self
                .stream
                .get_or_insert_with(|| Stream::at(&self.plan, self.g, self.cursor));
            let r = stream.fill(n_tokens, out, 1);
            match r {
                Ok(()) => (self.g, self.cursor) = (stream.g, stream.cursor),
                // The next call starts afresh from the unchanged position.
                Err(_) => self.stream = None,
            }
            return r;
        }
        let coded = matches!(out, Out::Coded(_));
        if self
            .ahead
            .as_ref()
            .is_some_and(|a| a.n_tokens != n_tokens || a.coded != coded)
        {
            // Another batch size or kind: batches assembled ahead are dropped and assembly restarts from here.
            self.ahead = None;
        }
        if self.ahead.is_none() {
            self.ahead = Some(Assembler::spawn(
                &self.plan,
                self.g,
                self.cursor,
                n_tokens,
                coded,
            )?);
        }
        let ahead = self.ahead.as_ref().unwrap();
        match ahead.recv() {
            Ok((mut b, g, cursor)) => {
                match (out, &mut b) {
                    (Out::F32(o), Served::F32(s)) => std::mem::swap(o, s),
                    (Out::Coded(o), Served::Coded(s)) => std::mem::swap(o, s),
                    _ => unreachable!("the assembler serves the kind it was started for"),
                }
                let _ = ahead.recycle.as_ref().unwrap().try_send(b);
                (self.g, self.cursor) = (g, cursor);
                Ok(())
            }
            Err(e) => {
                // The thread stops at an error; a later call starts afresh from the unchanged position.
                self.ahead = None;
                Err(e)
            }
        }
    }
}

/// The serving state of the stream: the window being served, the next row in it, and where windows come from
/// (the workers' pipeline, or this thread).
struct Stream {
    plan: Arc<Plan>,
    g: u64,
    cursor: usize,
    current: Option<Window>,
    pipeline: Option<Pipeline>,
    sync_reader: Option<BlockReader>,
    sync_epoch: Option<EpochPlan>,
}

impl Stream {
    /// A stream positioned at row `cursor` of window `g` (which it fetches when it first serves).
    fn at(plan: &Arc<Plan>, g: u64, cursor: usize) -> Stream {
        Stream {
            plan: plan.clone(),
            g,
            cursor,
            current: None,
            pipeline: None,
            sync_reader: None,
            sync_epoch: None,
        }
    }

    fn fetch(&mut self, g: u64) -> Result<Window> {
        if self.plan.cfg.workers == 0 {
            if self.sync_reader.is_none() {
                self.sync_reader = Some(BlockReader::new()?);
            }
            return self
                .plan
                .decode(g, &mut self.sync_epoch, self.sync_reader.as_mut().unwrap());
        }
        if self.pipeline.is_none() {
            self.pipeline = Some(Pipeline::spawn(&self.plan, g)?);
        }
        self.pipeline.as_ref().unwrap().recv(g)
    }

    /// Takes the next `n_tokens` rows of the stream: the windows they come from (finished ones, then the
    /// current one) and, per row, its window and (block, token) in it. The finished windows go back to the
    /// pool through [`Plan::recycle`] once the rows are copied out.
    fn take(&mut self, n_tokens: usize) -> Result<(Vec<Window>, Vec<RowSource>)> {
        let mut done: Vec<Window> = Vec::new();
        let mut rows: Vec<RowSource> = Vec::with_capacity(n_tokens);
        while rows.len() < n_tokens {
            if self.current.is_none() {
                self.current = Some(self.fetch(self.g)?);
            }
            let w = self.current.as_ref().unwrap();
            let k = (w.n - self.cursor).min(n_tokens - rows.len());
            let wi = done.len();
            rows.extend(w.src[self.cursor..self.cursor + k].iter().map(|&s| (wi, s)));
            self.cursor += k;
            if self.cursor == w.n {
                done.push(self.current.take().unwrap());
                self.cursor = 0;
                self.g += 1;
            }
        }
        Ok((done, rows))
    }

    /// Fills `out` with the next `n_tokens` rows, the rows split among `threads` scoped threads (each
    /// row's copy is independent of the others', so the batch does not depend on `threads`): f32 rows
    /// dequantised straight from their decompressed block, or coded rows copied as they are. After an
    /// error the stream's state is unspecified: the caller drops it and starts another at its position.
    fn fill(&mut self, n_tokens: usize, out: Out<'_>, threads: usize) -> Result<()> {
        let dims = self.plan.ds.dims();
        let (done, rows) = self.take(n_tokens)?;
        let wins: Vec<&Window> = done.iter().chain(self.current.as_ref()).collect();
        let per = n_tokens.div_ceil(threads.max(1)).max(1);
        let split = threads > 1 && n_tokens > per;
        match out {
            Out::F32(batch) => {
                batch.resize(dims, n_tokens);
                let row = self.plan.row;
                let decode = |rows: &[RowSource], x: &mut [f32], y: &mut [f32]| {
                    let out = x.chunks_exact_mut(row).zip(y.chunks_exact_mut(row));
                    for (&(wi, (j, t)), (xr, yr)) in rows.iter().zip(out) {
                        let (layout, raw) = &wins[wi].blocks[j as usize];
                        Block::from_parts(*layout, raw, dims.n_layers).xy_rows(t as usize, xr, yr);
                    }
                };
                if !split {
                    decode(&rows, &mut batch.x, &mut batch.y);
                } else {
                    std::thread::scope(|sc| {
                        let parts = rows
                            .chunks(per)
                            .zip(batch.x.chunks_mut(per * row))
                            .zip(batch.y.chunks_mut(per * row));
                        for ((r, x), y) in parts {
                            sc.spawn(move || decode(r, x, y));
                        }
                    });
                }
            }
            Out::Coded(batch) => {
                let codec = self.plan.coded.ok_or_else(|| {
                    Error::Unsupported(
                        "serving still-quantised batches from a dataset not all int8 or all int4"
                            .into(),
                    )
                })?;
                batch.resize(codec, dims, n_tokens);
                // Per token: its L scales and its L rows of codes, each contiguous in its block and in the
                // batch (the section layout: scales first, then codes).
                let (l_n, rb) = (dims.n_layers, codec.row_code_bytes(dims.d_model));
                let at = batch.codes_offset();
                let copy = |rows: &[RowSource], s: [&mut [u8]; 2], c: [&mut [u8]; 2]| {
                    let [sx, sy] = s;
                    let [cx, cy] = c;
                    for (i, &(wi, (j, t))) in rows.iter().enumerate() {
                        let (layout, raw) = &wins[wi].blocks[j as usize];
                        let ranges = layout.ranges();
                        let block_rows = layout.section.rows;
                        let t = t as usize;
                        for (k, (s_out, c_out)) in [(&mut *sx, &mut *cx), (&mut *sy, &mut *cy)]
                            .into_iter()
                            .enumerate()
                        {
                            let sec = &raw[ranges[k].clone()];
                            s_out[4 * i * l_n..4 * (i + 1) * l_n]
                                .copy_from_slice(&sec[4 * t * l_n..4 * (t + 1) * l_n]);
                            let codes = &sec[4 * block_rows..];
                            c_out[i * l_n * rb..(i + 1) * l_n * rb]
                                .copy_from_slice(&codes[t * l_n * rb..(t + 1) * l_n * rb]);
                        }
                    }
                };
                let (xs, xc) = batch.x.split_at_mut(at);
                let (ys, yc) = batch.y.split_at_mut(at);
                if !split {
                    copy(&rows, [xs, ys], [xc, yc]);
                } else {
                    std::thread::scope(|sc| {
                        let parts = rows
                            .chunks(per)
                            .zip(xs.chunks_mut(4 * per * l_n))
                            .zip(ys.chunks_mut(4 * per * l_n))
                            .zip(xc.chunks_mut(per * l_n * rb))
                            .zip(yc.chunks_mut(per * l_n * rb));
                        for ((((r, xs), ys), xc), yc) in parts {
                            sc.spawn(move || copy(r, [xs, ys], [xc, yc]));
                        }
                    });
                }
            }
        }
        for w in done {
            self.plan.recycle(w);
        }
        Ok(())
    }
}

/// Where a served row comes from: a window of the batch (finished ones first, then the current one) and
/// (block, token) in it.
type RowSource = (usize, (u32, u32));

/// Where [`Stream::fill`] writes.
enum Out<'a> {
    F32(&'a mut Batch),
    Coded(&'a mut CodedBatch),
}

/// A batch as the assembly thread serves it.
enum Served {
    F32(Batch),
    Coded(CodedBatch),
}

impl Served {
    fn out(&mut self) -> Out<'_> {
        match self {
            Served::F32(b) => Out::F32(b),
            Served::Coded(b) => Out::Coded(b),
        }
    }
}

/// A batch assembled ahead, with the stream's position after it.
type Assembled = Result<(Served, u64, usize)>;

/// A background thread that fills batches of a fixed size and kind (f32, or coded) from its own [`Stream`]
/// (fed by the workers; rows copied out by `workers` scoped threads), so that dequantising the rows overlaps
/// the caller's work; `prefetch` batches queue, and served batches' buffers come back for reuse.
struct Assembler {
    n_tokens: usize,
    coded: bool,
    rx: Option<Receiver<Assembled>>,
    recycle: Option<SyncSender<Served>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Assembler {
    fn spawn(
        plan: &Arc<Plan>,
        g: u64,
        cursor: usize,
        n_tokens: usize,
        coded: bool,
    ) -> Result<Assembler> {
        let (tx, rx) = sync_channel::<Assembled>(plan.cfg.prefetch.max(1));
        let (recycle, spare) = sync_channel::<Served>(plan.cfg.prefetch.max(1) + 1);
        let stop = Arc::new(AtomicBool::new(false));
        let mut stream = Stream::at(plan, g, cursor);
        let (halt, threads) = (stop.clone(), plan.cfg.workers);
        let handle = std::thread::Builder::new()
            .name("clt-store-batches".into())
            .spawn(move || {
                while !halt.load(Ordering::Relaxed) {
                    let mut b = spare.try_recv().unwrap_or_else(|_| {
                        if coded {
                            Served::Coded(CodedBatch::default())
                        } else {
                            Served::F32(Batch::default())
                        }
                    });
                    let r = stream
                        .fill(n_tokens, b.out(), threads)
                        .map(|()| (b, stream.g, stream.cursor));
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Source(format!("cannot start loader thread: {e}")))?;
        Ok(Assembler {
            n_tokens,
            coded,
            rx: Some(rx),
            recycle: Some(recycle),
            stop,
            handle: Some(handle),
        })
    }

    fn recv(&self) -> Assembled {
        self.rx
            .as_ref()
            .unwrap()
            .recv()
            .map_err(|_| Error::Source("loader batch thread stopped unexpectedly".into()))?
    }
}

impl Drop for Assembler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks the thread if it waits to send; it then stops, and its stream's pipeline
        // stops the workers.
        self.rx = None;
        self.recycle = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl ActivationSource for ShardLoader {
    fn dims(&self) -> ActDims {
        self.plan.ds.dims()
    }

    fn next_batch(&mut self, n_tokens: usize, batch: &mut Batch) -> Result<()> {
        self.serve(n_tokens, Out::F32(batch))
    }

    fn coded(&self) -> Option<Codec> {
        self.plan.coded
    }

    fn next_coded(&mut self, n_tokens: usize, batch: &mut CodedBatch) -> Result<()> {
        self.serve(n_tokens, Out::Coded(batch))
    }

    fn position(&self) -> serde_json::Value {
        let c = &self.plan.cfg;
        serde_json::json!({
            "kind": "shard-loader",
            "version": 1,
            "seed": c.seed,
            "window_blocks": c.window_blocks,
            "rank": c.rank,
            "world": c.world,
            "dataset_tokens": self.plan.ds.n_tokens(),
            "epoch": self.g / self.plan.n_windows,
            "window": self.g % self.plan.n_windows,
            "cursor": self.cursor,
        })
    }

    fn restore(&mut self, position: &serde_json::Value) -> Result<()> {
        let bad = |why: &str| {
            Error::Source(format!(
                "cannot restore shard-loader position {position}: {why}"
            ))
        };
        let get = |k: &str| {
            position
                .get(k)
                .and_then(|v| v.as_u64())
                .ok_or_else(|| bad(&format!("missing `{k}`")))
        };
        if position.get("kind").and_then(|v| v.as_str()) != Some("shard-loader")
            || get("version")? != 1
        {
            return Err(bad("not a version-1 shard-loader position"));
        }
        let c = &self.plan.cfg;
        let expect = [
            ("seed", c.seed),
            ("window_blocks", c.window_blocks as u64),
            ("rank", c.rank as u64),
            ("world", c.world as u64),
            ("dataset_tokens", self.plan.ds.n_tokens()),
        ];
        for (k, v) in expect {
            if get(k)? != v {
                return Err(bad(&format!("`{k}` differs from this loader's {v}")));
            }
        }
        let (e, w, cursor) = (get("epoch")?, get("window")?, get("cursor")? as usize);
        if w >= self.plan.n_windows {
            return Err(bad("window out of range"));
        }
        let g = e
            .checked_mul(self.plan.n_windows)
            .and_then(|x| x.checked_add(w))
            .ok_or_else(|| bad("epoch out of range"))?;
        let tokens = self.window_tokens(g);
        if cursor >= tokens.max(1) {
            return Err(bad("cursor beyond its window"));
        }
        self.stream = None;
        self.ahead = None;
        self.g = g;
        self.cursor = cursor;
        Ok(())
    }
}
