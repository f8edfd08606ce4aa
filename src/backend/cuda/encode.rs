//! Encoder wrappers: the tiled GEMM `h = x W_encᵀ + b_enc` with its JumpReLU epilogue (active and
//! near-threshold entries straight into per-token ELL lists, per-feature window sums) or its dense output
//! (for TopK / BatchTopK), the reduction of the per-tile partials, and the per-token sort.
//!
//! Five GEMM kernels compute the same thing ([`Gemm`]): `encode_mma`, bf16 tensor cores (`mma.sync`
//! m16n8k16, fp32 accumulation, 128 × 128 × 32 tiles through four `cp.async` stages), which runs
//! whenever every row it copies is 16-byte aligned (`d`, the row stride and the layer offset multiples of 8
//! elements, [`EncodeInput::tensor_core_ok`]); `encode_wgmma`, Hopper's warpgroup MMA (`wgmma.mma_async`
//! m64n256k16, 128 × 256 × 64 tiles, the same alignment rule, compute capability 9.x only),
//! `encode_wgmma_narrow` (m64n128k16, 128 × 128 × 32 tiles, two blocks an SM) and `encode_wgmma_tma`
//! (`encode_wgmma`'s tile, its operands copied by the Tensor Memory Accelerator through tensor maps, on a
//! persistent grid), chosen by [`Gemm::Wgmma`] / [`Gemm::WgmmaNarrow`] / [`Gemm::WgmmaTma`] or the device's
//! [`EncoderKernel`] until a GPU run says whether any beats `encode_mma`; and `encode_tile`, a SIMT 64 × 64
//! tile, for every other shape and as the second reference.
//!
//! CPU reference: [`crate::backend::cpu::encode::encode_layer`] with `list_near = true` (every block in
//! `BlockMode::Near`).

use super::context::{Gpu, Module, grid_1d, per_item};
use super::ffi::{
    CLT_ENC_MMA_ALIGN, CLT_ENC_MMA_STAGE_BYTES, CLT_ENC_MMA_STAGES, CLT_ENC_MMA_TB, CLT_ENC_MMA_TF,
    CLT_ENC_TB, CLT_ENC_TF, CLT_ENC_WG_STAGE_BYTES, CLT_ENC_WG_STAGES, CLT_ENC_WG_TB,
    CLT_ENC_WG_TF, CLT_ENC_WG_TK, CLT_ENC_WGN_STAGE_BYTES, CLT_ENC_WGN_STAGES, CLT_ENC_WGN_TF,
    CLT_ENC_WGT_SHARED, CLT_ENC_WGT_TF, CLT_ENC_WGT_THREADS, CLT_ENC_WGT_TK, CLT_EPI_DENSE,
    CLT_EPI_JUMPRELU, CltEncodeParams, CltEncodeTmaParams, CltReduceParams, CltSortParams,
    CltToBf16Params,
};
use super::memory::DBuf;
use super::tensor_map;
use crate::backend::EncoderKernel;
use crate::{Error, Result};
use cudarc::driver::LaunchConfig;

/// Which kernel computes the encoder's GEMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Gemm {
    /// The tensor-core kernel the device's [`EncoderKernel`] names (`encode_mma` unless set) when
    /// [`EncodeInput::tensor_core_ok`], else the SIMT one.
    #[default]
    Auto,
    /// `encode_tile`: SIMT fp32 FMA, any shape.
    Simt,
    /// `encode_mma`: bf16 tensor cores; an error when the shape does not allow it.
    TensorCore,
    /// `encode_wgmma`: bf16 tensor cores through Hopper's warpgroup MMA, 128 × 256 tiles; an error when
    /// the shape does not allow it or the device is not of compute capability 9.x.
    Wgmma,
    /// `encode_wgmma_narrow`: the same with 128 × 128 tiles, two blocks an SM.
    WgmmaNarrow,
    /// `encode_wgmma_tma`: `encode_wgmma`'s tile with its stages filled by the Tensor Memory Accelerator
    /// (a producer warp, mbarriers, the 128-byte swizzle); the same conditions.
    WgmmaTma,
}

/// Largest per-token list the sort handles (its shared memory holds `cap × 12` bytes).
pub const MAX_CAP: usize = 4096;

/// One layer's sparse codes on the device, as ELL lists: token `b` owns slots `b·cap .. b·cap + cap`, of
/// which the first `min(count[b], cap)` are filled, in increasing feature order.
pub struct DeviceCodes {
    pub n_tokens: usize,
    pub cap: usize,
    /// An upper bound on every list's length, at most `cap`: the longest list where it was measured (the
    /// encoders' read-back, [`DeviceCodes::measure`], or [`DeviceCodes::from_host`]), else `cap`.
    /// `act_grad_partial` caps its accumulator rows by it (through [`DeviceCodes::lengths`] where they are
    /// known): the encoders round `cap` up to a power of 2, up to twice the longest.
    pub longest: usize,
    /// Tokens by list length (`lengths[n]` lists of `n` entries, `n` up to `longest`) where measured (as
    /// `longest`), else empty. `act_grad_partial` gives its accumulators rows for all but the longest few
    /// lists by it ([`super::backward::ActTiling::split`]).
    pub lengths: Vec<usize>,
    pub count: DBuf<u32>,
    pub feat: DBuf<u32>,
    pub pre: DBuf<f32>,
    pub act: DBuf<f32>,
}

/// Tokens by list length: `[n]` = how many of `count` equal `n` (lengths over `longest` counted at it).
fn length_histogram(count: &[u32], longest: usize) -> Vec<usize> {
    let mut h = vec![0; longest + 1];
    for &c in count {
        h[(c as usize).min(longest)] += 1;
    }
    h
}

/// The codes copied back, in the CPU's CSR form.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostCodes {
    pub offsets: Vec<usize>,
    pub feat: Vec<u32>,
    pub pre: Vec<f32>,
    pub act: Vec<f32>,
}

impl DeviceCodes {
    /// Empty lists of capacity `cap` for `n_tokens` tokens.
    pub fn alloc(gpu: &Gpu, n_tokens: usize, cap: usize) -> Result<Self> {
        Ok(DeviceCodes {
            n_tokens,
            cap,
            longest: cap,
            lengths: Vec::new(),
            count: gpu.zeros(n_tokens)?,
            feat: gpu.zeros(n_tokens * cap)?,
            pre: gpu.zeros(n_tokens * cap)?,
            act: gpu.zeros(n_tokens * cap)?,
        })
    }

    /// Uploads CSR lists (e.g. the CPU encoder's) as ELL lists with `cap` = the longest list.
    pub fn from_host(gpu: &Gpu, h: &HostCodes) -> Result<Self> {
        let n_tokens = h.offsets.len().saturating_sub(1);
        let cap = h
            .offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
            .max(1);
        let mut count = vec![0u32; n_tokens];
        let (mut feat, mut pre, mut act) = (
            vec![0u32; n_tokens * cap],
            vec![0f32; n_tokens * cap],
            vec![0f32; n_tokens * cap],
        );
        for b in 0..n_tokens {
            let (s, e) = (h.offsets[b], h.offsets[b + 1]);
            count[b] = (e - s) as u32;
            feat[b * cap..b * cap + e - s].copy_from_slice(&h.feat[s..e]);
            pre[b * cap..b * cap + e - s].copy_from_slice(&h.pre[s..e]);
            act[b * cap..b * cap + e - s].copy_from_slice(&h.act[s..e]);
        }
        let lengths = length_histogram(&count, cap);
        Ok(DeviceCodes {
            n_tokens,
            cap,
            longest: cap,
            lengths,
            count: gpu.upload(&count)?,
            feat: gpu.upload(&feat)?,
            pre: gpu.upload(&pre)?,
            act: gpu.upload(&act)?,
        })
    }

    /// Reads the list lengths back: sets `longest` and `lengths` and returns the largest length produced
    /// (over `cap` when lists were truncated; `longest` and `lengths` are then left as they were).
    pub fn measure(&mut self, gpu: &Gpu) -> Result<usize> {
        let count = gpu.download(&self.count)?;
        let longest = count.iter().copied().max().unwrap_or(0) as usize;
        if longest <= self.cap {
            self.longest = longest;
            self.lengths = length_histogram(&count, longest);
        }
        Ok(longest)
    }

    /// Copies the lists back as CSR (entries of token b at `offsets[b]..offsets[b + 1]`).
    pub fn to_host(&self, gpu: &Gpu) -> Result<HostCodes> {
        let count = gpu.download(&self.count)?;
        let (feat, pre, act) = (
            gpu.download(&self.feat)?,
            gpu.download(&self.pre)?,
            gpu.download(&self.act)?,
        );
        let mut h = HostCodes {
            offsets: vec![0],
            ..Default::default()
        };
        for (b, &c) in count.iter().enumerate() {
            let n = (c as usize).min(self.cap);
            let r = b * self.cap..b * self.cap + n;
            h.feat.extend_from_slice(&feat[r.clone()]);
            h.pre.extend_from_slice(&pre[r.clone()]);
            h.act.extend_from_slice(&act[r]);
            h.offsets.push(h.feat.len());
        }
        Ok(h)
    }
}

/// Per feature, over the batch: `Σ ReLU(θ − h)`, the inactive near-threshold count and `Σ h` over them.
pub struct WindowStats {
    pub preact_sum: DBuf<f32>,
    pub near_count: DBuf<u32>,
    pub near_h: DBuf<f32>,
}

/// The encoder's inputs for one layer.
pub struct EncodeInput<'a> {
    /// bf16 inputs; token b's vector starts at element `x_offset + b · x_stride`.
    pub x: &'a DBuf<u16>,
    pub x_offset: usize,
    pub x_stride: usize,
    pub n_tokens: usize,
    pub d: usize,
    /// bf16 `[F][d]`.
    pub w: &'a DBuf<u16>,
    /// f32 `[F]`.
    pub bias: &'a DBuf<f32>,
    pub n_features: usize,
}

impl EncodeInput<'_> {
    fn check(&self) -> Result<()> {
        let need_x = if self.n_tokens == 0 {
            0
        } else {
            self.x_offset + (self.n_tokens - 1) * self.x_stride + self.d
        };
        if self.x.len() < need_x
            || self.w.len() != self.n_features * self.d
            || self.bias.len() != self.n_features
        {
            return Err(Error::Shape {
                what: "CUDA encoder inputs (x, W_enc, b_enc)".into(),
                expected: vec![need_x, self.n_features * self.d, self.n_features],
                got: vec![self.x.len(), self.w.len(), self.bias.len()],
            });
        }
        Ok(())
    }

    fn params(&self, gpu: &Gpu) -> CltEncodeParams {
        CltEncodeParams {
            x: self.x.ptr(gpu) + 2 * self.x_offset as u64,
            w: self.w.ptr(gpu),
            bias: self.bias.ptr(gpu),
            n_tokens: self.n_tokens as u32,
            d: self.d as u32,
            n_features: self.n_features as u32,
            x_stride: self.x_stride as u32,
            ..Default::default()
        }
    }

    /// Whether the tensor-core kernel can run: it copies rows of x and W_enc in 16-byte pieces, so `d`, the
    /// row stride and the layer offset must be multiples of 8 elements (the buffers themselves start
    /// 256-byte aligned). Tile remainders (tokens, features, K) are zero-filled, so no other rule.
    pub fn tensor_core_ok(&self) -> bool {
        let a = CLT_ENC_MMA_ALIGN as usize;
        self.d.is_multiple_of(a)
            && self.x_stride.is_multiple_of(a)
            && self.x_offset.is_multiple_of(a)
    }

    /// The kernel `gemm` resolves to on `gpu`: its module, name and (tokens, features) tile.
    fn kernel(&self, gpu: &Gpu, gemm: Gemm) -> Result<Kernel> {
        let aligned = || {
            if self.tensor_core_ok() {
                Ok(())
            } else {
                Err(Error::Unsupported(format!(
                    "the tensor-core encoders need d, the row stride and the layer offset to be multiples \
                     of {CLT_ENC_MMA_ALIGN} (got d = {}, stride {}, offset {})",
                    self.d, self.x_stride, self.x_offset
                )))
            }
        };
        let mma = Kernel {
            module: Module::Encode,
            name: "encode_mma",
            tile_b: CLT_ENC_MMA_TB as usize,
            tile_f: CLT_ENC_MMA_TF as usize,
            shared: CLT_ENC_MMA_STAGES * CLT_ENC_MMA_STAGE_BYTES,
            threads: 256,
        };
        let simt = Kernel {
            module: Module::Encode,
            name: "encode_tile",
            tile_b: CLT_ENC_TB as usize,
            tile_f: CLT_ENC_TF as usize,
            shared: 0,
            threads: 256,
        };
        let gemm = match (gemm, gpu.encoder_kernel()) {
            (Gemm::Auto, EncoderKernel::Wgmma) if self.tensor_core_ok() => Gemm::Wgmma,
            (Gemm::Auto, EncoderKernel::WgmmaNarrow) if self.tensor_core_ok() => Gemm::WgmmaNarrow,
            (Gemm::Auto, EncoderKernel::WgmmaTma) if self.tensor_core_ok() => Gemm::WgmmaTma,
            (g, _) => g,
        };
        let wgmma = |name, tile_f: u32, shared: u32, threads: u32| {
            aligned()?;
            if !gpu.has_wgmma() {
                return Err(Error::Unsupported(format!(
                    "the warpgroup-MMA encoder ({name}) needs a device of compute capability 9.x \
                     (sm_90a); this one is {}",
                    gpu.describe()
                )));
            }
            Ok(Kernel {
                module: Module::EncodeWgmma,
                name,
                tile_b: CLT_ENC_WG_TB as usize,
                tile_f: tile_f as usize,
                shared,
                threads,
            })
        };
        Ok(match gemm {
            Gemm::Auto if self.tensor_core_ok() => mma,
            Gemm::Auto | Gemm::Simt => simt,
            Gemm::TensorCore => {
                aligned()?;
                mma
            }
            Gemm::Wgmma => wgmma(
                "encode_wgmma",
                CLT_ENC_WG_TF,
                CLT_ENC_WG_STAGES * CLT_ENC_WG_STAGE_BYTES,
                256,
            )?,
            Gemm::WgmmaNarrow => wgmma(
                "encode_wgmma_narrow",
                CLT_ENC_WGN_TF,
                CLT_ENC_WGN_STAGES * CLT_ENC_WGN_STAGE_BYTES,
                256,
            )?,
            Gemm::WgmmaTma => wgmma(
                "encode_wgmma_tma",
                CLT_ENC_WGT_TF,
                CLT_ENC_WGT_SHARED,
                CLT_ENC_WGT_THREADS,
            )?,
        })
    }
}

/// A resolved encoder kernel and its tile.
#[derive(Clone, Copy, Debug)]
struct Kernel {
    module: Module,
    name: &'static str,
    tile_b: usize,
    tile_f: usize,
    /// Dynamic shared memory per block, bytes.
    shared: u32,
    /// Threads per block.
    threads: u32,
}

impl Kernel {
    fn tiles(&self, inp: &EncodeInput) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                inp.n_features.div_ceil(self.tile_f) as u32,
                inp.n_tokens.div_ceil(self.tile_b) as u32,
                1,
            ),
            block_dim: (self.threads, 1, 1),
            shared_mem_bytes: self.shared,
        }
    }

    /// Launches the kernel over `inp` with parameters `p`; `encode_wgmma_tma` gets them with the tensor
    /// maps of x (boxes of 128 tokens × 64 columns) and W_enc (256 features × 64 columns), on a persistent
    /// grid: one block an SM at most, each looping over the tiles.
    fn launch(&self, gpu: &Gpu, inp: &EncodeInput, p: CltEncodeParams) -> Result<()> {
        if self.name != "encode_wgmma_tma" || inp.n_tokens == 0 || inp.n_features == 0 {
            return gpu.launch(self.module, self.name, self.tiles(inp), &p);
        }
        let tiles = self.tiles(inp);
        let n_tiles = tiles.grid_dim.0 as usize * tiles.grid_dim.1 as usize;
        let cfg = LaunchConfig {
            grid_dim: (n_tiles.min(gpu.sm_count()?) as u32, 1, 1),
            ..tiles
        };
        const _: () = assert!(CLT_ENC_WGT_TK == CLT_ENC_WG_TK && CLT_ENC_WGT_TF == CLT_ENC_WG_TF);
        let q = CltEncodeTmaParams {
            map_x: tensor_map::bf16_sw128(
                "the encoder's inputs x",
                p.x,
                inp.n_tokens,
                inp.d,
                inp.x_stride,
                CLT_ENC_WG_TB,
                CLT_ENC_WGT_TK,
            )?,
            map_w: tensor_map::bf16_sw128(
                "W_enc",
                p.w,
                inp.n_features,
                inp.d,
                inp.d,
                CLT_ENC_WGT_TF,
                CLT_ENC_WGT_TK,
            )?,
            p,
        };
        gpu.launch(self.module, self.name, cfg, &q)
    }
}

/// JumpReLU encoding of one layer: lists of active (`h > θ`) and near-threshold (`θ − ε/2 < h ≤ θ`,
/// activation 0) entries, and the window statistics. `cap` is the first guess at the longest list; when a
/// token produces more, the encoder runs again with enough room.
pub fn jumprelu(
    gpu: &Gpu,
    inp: &EncodeInput,
    theta: &DBuf<f32>,
    half_bandwidth: f32,
    cap: usize,
) -> Result<(DeviceCodes, WindowStats)> {
    jumprelu_with(gpu, inp, theta, half_bandwidth, cap, Gemm::Auto)
}

/// [`jumprelu`] with the GEMM kernel chosen (tests and benches compare the two).
pub fn jumprelu_with(
    gpu: &Gpu,
    inp: &EncodeInput,
    theta: &DBuf<f32>,
    half_bandwidth: f32,
    cap: usize,
    gemm: Gemm,
) -> Result<(DeviceCodes, WindowStats)> {
    inp.check()?;
    let kernel = inp.kernel(gpu, gemm)?;
    if theta.len() != inp.n_features {
        return Err(Error::Shape {
            what: "CUDA encoder thresholds".into(),
            expected: vec![inp.n_features],
            got: vec![theta.len()],
        });
    }
    let (b_n, f_n) = (inp.n_tokens, inp.n_features);
    let n_tiles = b_n.div_ceil(kernel.tile_b);
    let part_preact = gpu.output::<f32>(n_tiles * f_n)?;
    let part_near = gpu.output::<u32>(n_tiles * f_n)?;
    let part_near_h = gpu.output::<f32>(n_tiles * f_n)?;
    let mut cap = cap.clamp(1, MAX_CAP);
    let codes = loop {
        let mut codes = DeviceCodes::alloc(gpu, b_n, cap)?;
        let p = CltEncodeParams {
            theta: theta.ptr(gpu),
            count: codes.count.ptr(gpu),
            feat: codes.feat.ptr(gpu),
            pre: codes.pre.ptr(gpu),
            act: codes.act.ptr(gpu),
            part_preact: part_preact.ptr(gpu),
            part_near: part_near.ptr(gpu),
            part_near_h: part_near_h.ptr(gpu),
            cap: cap as u32,
            epilogue: CLT_EPI_JUMPRELU,
            half_bandwidth,
            ..inp.params(gpu)
        };
        kernel.launch(gpu, inp, p)?;
        let longest = codes.measure(gpu)?;
        if longest <= cap {
            break codes;
        }
        if longest > MAX_CAP {
            return Err(Error::Unsupported(format!(
                "a token has {longest} active or near-threshold features in one layer; the CUDA encoder \
                 lists at most {MAX_CAP} (lower the bandwidth or raise the threshold)"
            )));
        }
        cap = longest.next_power_of_two().min(MAX_CAP);
    };
    let stats = WindowStats {
        preact_sum: gpu.output(f_n)?,
        near_count: gpu.output(f_n)?,
        near_h: gpu.output(f_n)?,
    };
    let rp = CltReduceParams {
        part_preact: part_preact.ptr(gpu),
        part_near: part_near.ptr(gpu),
        part_near_h: part_near_h.ptr(gpu),
        preact_sum: stats.preact_sum.ptr(gpu),
        near_count: stats.near_count.ptr(gpu),
        near_h: stats.near_h.ptr(gpu),
        n_tiles: n_tiles as u32,
        n_features: f_n as u32,
    };
    gpu.launch(Module::Encode, "encode_reduce", grid_1d(f_n, 256), &rp)?;
    sort_lists(gpu, &codes)?;
    // The partials are freed on return, in stream order (no sync).
    Ok((codes, stats))
}

/// Sorts every token's list by feature (the encoder fills them in tile order).
pub fn sort_lists(gpu: &Gpu, codes: &DeviceCodes) -> Result<()> {
    let p = CltSortParams {
        count: codes.count.ptr(gpu),
        feat: codes.feat.ptr(gpu),
        pre: codes.pre.ptr(gpu),
        act: codes.act.ptr(gpu),
        n_tokens: codes.n_tokens as u32,
        cap: codes.cap as u32,
    };
    let mut cfg = per_item(codes.n_tokens, 128);
    cfg.shared_mem_bytes = (codes.cap * 12) as u32;
    gpu.launch(Module::Encode, "encode_sort_lists", cfg, &p)
}

/// Dense pre-activations `[B][F]` (for TopK / BatchTopK, whose selection needs the whole row or batch).
pub fn dense(gpu: &Gpu, inp: &EncodeInput) -> Result<DBuf<f32>> {
    dense_with(gpu, inp, Gemm::Auto)
}

/// [`dense`] with the GEMM kernel chosen.
pub fn dense_with(gpu: &Gpu, inp: &EncodeInput, gemm: Gemm) -> Result<DBuf<f32>> {
    let out = gpu.output::<f32>(inp.n_tokens * inp.n_features)?;
    dense_into_with(gpu, inp, &out, 0, gemm)?;
    Ok(out)
}

/// Dense pre-activations `[B][F]` written into `out` from element `offset` (BatchTopK stacks the layers).
pub fn dense_into(gpu: &Gpu, inp: &EncodeInput, out: &DBuf<f32>, offset: usize) -> Result<()> {
    dense_into_with(gpu, inp, out, offset, Gemm::Auto)
}

/// [`dense_into`] with the GEMM kernel chosen.
pub fn dense_into_with(
    gpu: &Gpu,
    inp: &EncodeInput,
    out: &DBuf<f32>,
    offset: usize,
    gemm: Gemm,
) -> Result<()> {
    inp.check()?;
    let kernel = inp.kernel(gpu, gemm)?;
    if out.len() < offset + inp.n_tokens * inp.n_features {
        return Err(Error::Shape {
            what: "CUDA dense pre-activations".into(),
            expected: vec![offset + inp.n_tokens * inp.n_features],
            got: vec![out.len()],
        });
    }
    let p = CltEncodeParams {
        dense: out.ptr(gpu) + 4 * offset as u64,
        epilogue: CLT_EPI_DENSE,
        ..inp.params(gpu)
    };
    kernel.launch(gpu, inp, p)
}

/// f32 → bf16 on the device.
pub fn to_bf16(gpu: &Gpu, src: &DBuf<f32>) -> Result<DBuf<u16>> {
    let dst = gpu.output::<u16>(src.len())?;
    to_bf16_into(gpu, src, &dst)?;
    Ok(dst)
}

/// f32 → bf16 into an existing buffer of the same length (the resident trainer's weight copies, refreshed
/// after each update). CPU reference: [`super::memory::to_bf16_bits`].
pub fn to_bf16_into(gpu: &Gpu, src: &DBuf<f32>, dst: &DBuf<u16>) -> Result<()> {
    if src.len() != dst.len() {
        return Err(Error::Shape {
            what: "CUDA f32 -> bf16 (source, destination elements)".into(),
            expected: vec![src.len(), src.len()],
            got: vec![src.len(), dst.len()],
        });
    }
    let p = CltToBf16Params {
        src: src.ptr(gpu),
        dst: dst.ptr(gpu),
        n: src.len() as u64,
        lo: 0,
    };
    gpu.launch(Module::Encode, "to_bf16", grid_1d(src.len(), 256), &p)
}

/// f32 → two bf16 buffers, `hi = bf16(v)` and `lo = bf16(v − hi)`: `hi + lo` keeps about 16 bits of each
/// value, so a bf16 GEMM on both parts (fp32 accumulation) is within about 2⁻¹⁶ relative of an f32 one
/// (the skip connection's weight gradient, whose f32 residual the step must not round to 8 bits).
pub fn split_bf16(gpu: &Gpu, src: &DBuf<f32>) -> Result<(DBuf<u16>, DBuf<u16>)> {
    let (hi, lo) = (gpu.output::<u16>(src.len())?, gpu.output::<u16>(src.len())?);
    if src.is_empty() {
        return Ok((hi, lo));
    }
    let p = CltToBf16Params {
        src: src.ptr(gpu),
        dst: hi.ptr(gpu),
        n: src.len() as u64,
        lo: lo.ptr(gpu),
    };
    gpu.launch(Module::Encode, "to_bf16", grid_1d(src.len(), 256), &p)?;
    Ok((hi, lo))
}
