//! The device: the driver check, the context and its stream, lazily loaded PTX modules, kernel launches.
//!
//! All launches go to one stream in order, so cudarc's per-buffer event tracking is switched off: kernels
//! receive raw device addresses inside their parameter structs, and ordering comes from the stream alone.
//! The one exception is the resident trainer's copy stream ([`Gpu::new_stream`], `resident.rs`): its
//! host-to-device copies are ordered against the compute stream by explicit events ([`Gpu::new_event`]).

use super::backward::ActTiling;
use super::dense::Blas;
use crate::backend::{EncoderKernel, SparseKernels};
use crate::{Error, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUmemPool_attribute};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Dynamic shared memory a kernel may use without opting in (bytes).
const DEFAULT_DYNAMIC_SHARED: u32 = 48 * 1024;

/// The PTX of every kernel file, embedded at build time (`OUT_DIR/kernels.rs`, written by build.rs).
pub mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The kernel files, one PTX module each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Encode,
    /// `encode_wgmma`, compiled for `sm_90a`: loadable on a device of compute capability 9.x only.
    EncodeWgmma,
    Decode,
    Backward,
    Topk,
    Adam,
    Dequant,
    Dense,
}

impl Module {
    fn ptx(self) -> &'static str {
        match self {
            Module::Encode => ptx::ENCODE,
            Module::EncodeWgmma => ptx::ENCODE_WGMMA,
            Module::Decode => ptx::DECODE,
            Module::Backward => ptx::BACKWARD,
            Module::Topk => ptx::TOPK,
            Module::Adam => ptx::ADAM,
            Module::Dequant => ptx::DEQUANT,
            Module::Dense => ptx::DENSE,
        }
    }
}

/// Whether the CUDA driver library can be opened on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda.so (or nvcuda.dll) and closes it again; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The error for a machine without a driver.
pub fn no_driver() -> Error {
    Error::BackendUnavailable {
        backend: "cuda".into(),
        reason: "no CUDA driver found (libcuda.so); this machine has no NVIDIA driver or GPU. Use \
                 `--backend cpu`, or run on a machine with an NVIDIA GPU and driver"
            .into(),
    }
}

/// The number of CUDA devices, or why there are none to count (no driver).
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(no_driver());
    }
    cudarc::driver::result::init().map_err(cuda_err("initialising the CUDA driver"))?;
    let n = cudarc::driver::result::device::get_count()
        .map_err(cuda_err("counting the CUDA devices"))?;
    Ok(n.max(0) as usize)
}

/// A CUDA error with what was being done.
pub fn cuda_err(what: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    let what = what.into();
    move |e| Error::Cuda {
        what,
        reason: e.to_string(),
    }
}

/// An open device with one stream.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    poison: AtomicBool,
    /// The step's sparse kernels are the tiled ones ([`SparseKernels`]).
    tiled: AtomicBool,
    /// How `act_grad_partial` divides its shared memory.
    act_tiling: Mutex<ActTiling>,
    /// The encoder's tensor-core GEMM ([`EncoderKernel`]).
    encoder: Mutex<EncoderKernel>,
    /// cuBLAS on the compute stream, opened on first use ([`Gpu::blas`]).
    blas: OnceLock<Blas>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .finish()
    }
}

/// The device's default memory pool, where it has memory pools (`None` otherwise: cudarc then allocates
/// with `cuMemAlloc`). `ordinal` names the device in errors.
fn default_pool(
    ctx: &CudaContext,
    ordinal: usize,
) -> Result<Option<cudarc::driver::sys::CUmemoryPool>> {
    let pools = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
        .map_err(cuda_err(format!(
            "asking whether CUDA device {ordinal} has memory pools"
        )))?;
    if pools == 0 {
        return Ok(None);
    }
    // SAFETY: the device handle is the context's own, a device the driver returned.
    let pool = unsafe { cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device()) }
        .map_err(cuda_err(format!(
            "getting CUDA device {ordinal}'s default memory pool"
        )))?;
    Ok(Some(pool))
}

/// Keeps the memory that the backend frees in the device's default pool instead of handing it back to
/// the driver. Every buffer here is allocated and freed in stream order (`cuMemAllocAsync`,
/// `cuMemFreeAsync`) from that pool, and a step allocates and frees its temporaries (at the 1B shape, ŷ and
/// the residual alone are 2 GB each). The pool's release threshold is 0 by default: at each
/// synchronisation (every step downloads its losses) the driver unmaps all the pool's free memory, and the
/// next step's allocations must map it again. With the threshold at `u64::MAX` the pool keeps what it
/// has, and a step's allocations reuse the last step's memory, as a caching allocator would.
fn keep_freed_memory(ctx: &CudaContext, ordinal: usize) -> Result<()> {
    set_release_threshold(ctx, ordinal, u64::MAX)
}

/// Sets the release threshold of the device's default memory pool (bytes of free memory it keeps at a
/// synchronisation); nothing where the device has no memory pools.
fn set_release_threshold(ctx: &CudaContext, ordinal: usize, bytes: u64) -> Result<()> {
    let Some(pool) = default_pool(ctx, ordinal)? else {
        return Ok(());
    };
    let mut value = bytes;
    // SAFETY: `pool` is the device's default pool; the release threshold is a cuuint64_t, which `value`
    // is, and the driver only reads it.
    unsafe {
        cudarc::driver::result::mem_pool::set_attribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut value as *mut u64).cast(),
        )
    }
    .map_err(cuda_err(format!(
        "setting the release threshold of CUDA device {ordinal}'s memory pool"
    )))
}

impl Gpu {
    /// Opens device `ordinal`, or explains why not (no driver, no device, context creation failed).
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !driver_present() {
            return Err(no_driver());
        }
        // cudarc panics where the driver misbehaves (a missing symbol); turn that into an error too.
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::BackendUnavailable {
                backend: "cuda".into(),
                reason: "the CUDA driver library was found but could not be used (too old for CUDA 13.0?)"
                    .into(),
            })?
            .map_err(|e| Error::BackendUnavailable {
                backend: "cuda".into(),
                reason: format!("cannot open CUDA device {ordinal}: {e}"),
            })?;
        // SAFETY: every launch and copy of this backend goes through the one stream below, in order, so
        // the events cudarc records per buffer to order work across streams are not needed.
        unsafe { ctx.disable_event_tracking() };
        // (A driver without memory pools' entry points would make cudarc panic: an error as above.)
        std::panic::catch_unwind(|| keep_freed_memory(&ctx, ordinal)).map_err(|_| {
            Error::BackendUnavailable {
                backend: "cuda".into(),
                reason:
                    "the CUDA driver library lacks the memory pool calls (too old for CUDA 13.0?)"
                        .into(),
            }
        })??;
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            poison: AtomicBool::new(false),
            tiled: AtomicBool::new(false),
            act_tiling: Mutex::new(ActTiling::default()),
            encoder: Mutex::new(EncoderKernel::Mma),
            blas: OnceLock::new(),
        })
    }

    /// The device's name and compute capability, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown device".into());
        match self.ctx.compute_capability() {
            Ok((a, b)) => format!("{name} (sm_{a}{b})"),
            Err(_) => name,
        }
    }

    /// Whether the device runs Hopper's warpgroup MMA (`wgmma`, compute capability 9.x: the `sm_90a`
    /// module of `encode_wgmma`, `encode_wgmma_narrow` and `encode_wgmma_tma`).
    pub fn has_wgmma(&self) -> bool {
        matches!(self.ctx.compute_capability(), Ok((9, _)))
    }

    /// Sets the release threshold of the device's default memory pool: the bytes of free memory it keeps
    /// at a synchronisation ([`Gpu::open`] sets `u64::MAX`: all; the driver's default is 0). The bench
    /// times the resident step both ways. Nothing where the device has no memory pools.
    pub fn set_pool_release_threshold(&self, bytes: u64) -> Result<()> {
        set_release_threshold(&self.ctx, self.ctx.ordinal(), bytes)
    }

    /// The release threshold of the device's default memory pool, in bytes (`u64::MAX` once
    /// [`Gpu::open`] has set it: see `keep_freed_memory`); `None` where the device has no memory pools.
    pub fn pool_release_threshold(&self) -> Result<Option<u64>> {
        let Some(pool) = default_pool(&self.ctx, self.ctx.ordinal())? else {
            return Ok(None);
        };
        let mut value: u64 = 0;
        // SAFETY: `pool` is the device's default pool, valid for the context's life; the release
        // threshold is a cuuint64_t, which `value` is, and the call writes only that.
        unsafe {
            cudarc::driver::result::mem_pool::get_attribute(
                pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut value as *mut u64).cast(),
            )
        }
        .map_err(cuda_err("reading the memory pool's release threshold"))?;
        Ok(Some(value))
    }

    /// The device's multiprocessors (the grid of a persistent kernel, `encode_wgmma_tma`).
    pub fn sm_count(&self) -> Result<usize> {
        let n = self
            .ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cuda_err("reading the device's multiprocessor count"))?;
        Ok(n.max(1) as usize)
    }

    /// With `on`, every kernel output buffer is filled with 0xFF bytes (NaN, `u32::MAX`) before the kernel
    /// runs, so that tests catch elements a kernel forgot to write.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Whether outputs are poisoned.
    pub fn poisoned(&self) -> bool {
        self.poison.load(Ordering::Relaxed)
    }

    /// Which sparse kernels the step runs from now on (the gathers until set, and for `auto`).
    pub fn set_sparse_kernels(&self, kernels: SparseKernels) {
        self.tiled
            .store(kernels == SparseKernels::Tiled, Ordering::Relaxed);
    }

    /// Which sparse kernels the step runs.
    pub fn sparse_kernels(&self) -> SparseKernels {
        if self.tiled.load(Ordering::Relaxed) {
            SparseKernels::Tiled
        } else {
            SparseKernels::Gather
        }
    }

    /// Which tensor-core encoder `encode::Gemm::Auto` runs from now on (`encode_mma` until set); refuses
    /// the `wgmma` kernels on a device without them. `auto` (for the trainer to resolve) runs `encode_mma`.
    pub fn set_encoder_kernel(&self, kernel: EncoderKernel) -> Result<()> {
        let kernel = match kernel {
            EncoderKernel::Auto => EncoderKernel::Mma,
            k => k,
        };
        if kernel != EncoderKernel::Mma && !self.has_wgmma() {
            return Err(Error::Unsupported(format!(
                "encoder_kernel = \"{}\" needs a device of compute capability 9.x (Hopper's warpgroup \
                 MMA); this one is {}: use \"mma\"",
                kernel.name(),
                self.describe()
            )));
        }
        *self.encoder.lock().unwrap_or_else(|p| p.into_inner()) = kernel;
        Ok(())
    }

    /// Which tensor-core encoder `encode::Gemm::Auto` runs.
    pub fn encoder_kernel(&self) -> EncoderKernel {
        *self.encoder.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How `act_grad_partial` divides its shared memory from now on (the default until set); refuses a
    /// setting it cannot run ([`ActTiling::check`]).
    pub fn set_act_tiling(&self, tiling: ActTiling) -> Result<()> {
        tiling.check()?;
        *self.act_tiling.lock().unwrap_or_else(|p| p.into_inner()) = tiling;
        Ok(())
    }

    /// How `act_grad_partial` divides its shared memory.
    pub fn act_tiling(&self) -> ActTiling {
        *self.act_tiling.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device's UUID (distinct for every GPU and MIG instance): how ranks find out whether they share
    /// a device, which NCCL does not allow within one communicator.
    pub fn uuid(&self) -> Result<[u8; 16]> {
        let id = self
            .ctx
            .uuid()
            .map_err(cuda_err("reading the device's UUID"))?;
        Ok(id.bytes.map(|b| b as u8))
    }

    /// cuBLAS on the compute stream (opened on the first call; an error, each time, where `libcublas.so`
    /// cannot be loaded).
    pub fn blas(&self) -> Result<&Blas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let b = Blas::new(self)?;
        Ok(self.blas.get_or_init(|| b))
    }

    /// The stream every launch and copy goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context (for the memory module's pinned allocations).
    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A second stream (non-blocking: it does not synchronise implicitly with the compute stream, which is
    /// the context's default stream). Work on it must be ordered against the compute stream with events.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx
            .new_stream()
            .map_err(cuda_err("creating a second stream"))
    }

    /// An event without timing (for ordering work across streams).
    pub fn new_event(&self) -> Result<CudaEvent> {
        self.ctx
            .new_event(None)
            .map_err(cuda_err("creating an event"))
    }

    /// A kernel of a module, loading the module's PTX on first use.
    pub fn function(&self, module: Module, name: &str) -> Result<CudaFunction> {
        let m = {
            let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match mods.get(&module) {
                Some(m) => m.clone(),
                None => {
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_src(module.ptx()))
                        .map_err(cuda_err(format!("loading the PTX of {module:?}")))?;
                    mods.insert(module, m.clone());
                    m
                }
            }
        };
        m.load_function(name)
            .map_err(cuda_err(format!("kernel {name} in {module:?}")))
    }

    /// Launches `name` with its parameter struct.
    pub fn launch<P: DeviceRepr>(
        &self,
        module: Module,
        name: &str,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 || cfg.grid_dim.2 == 0 {
            return Ok(()); // nothing to do (an empty batch)
        }
        let f = self.function(module, name)?;
        if cfg.shared_mem_bytes > DEFAULT_DYNAMIC_SHARED {
            // Over 48 KiB a kernel must opt in. The attribute belongs to the function; setting it at every
            // such launch is one cheap driver call and covers a handle loaded afresh.
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.shared_mem_bytes as i32,
            )
            .map_err(cuda_err(format!(
                "allowing {name} {} bytes of dynamic shared memory",
                cfg.shared_mem_bytes
            )))?;
        }
        let mut b = self.stream.launch_builder(&f);
        b.arg(params);
        // SAFETY: every kernel takes exactly one argument, its parameter struct from ffi/clt_params.h, whose
        // Rust mirror is checked against the C layout; the wrappers build the struct from live buffers of
        // the lengths the kernel indexes (see each wrapper's checks), and they stay alive until the stream
        // is synchronised by the download that reads the result.
        unsafe { b.launch(cfg) }.map_err(cuda_err(format!("launching {name}")))?;
        Ok(())
    }

    /// Milliseconds of device time that `work` queues on the stream, between two CUDA events.
    pub fn time_ms(&self, work: impl FnOnce() -> Result<()>) -> Result<f32> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .ctx
            .new_event(flags)
            .map_err(cuda_err("creating an event"))?;
        let end = self
            .ctx
            .new_event(flags)
            .map_err(cuda_err("creating an event"))?;
        start
            .record(&self.stream)
            .map_err(cuda_err("recording an event"))?;
        work()?;
        end.record(&self.stream)
            .map_err(cuda_err("recording an event"))?;
        start.elapsed_ms(&end).map_err(cuda_err("timing events"))
    }

    /// Waits for all queued work.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronising"))
    }
}

/// A 1-D launch of `n` threads in blocks of `block`.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(block as usize) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `block` threads per item.
pub fn per_item(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}
