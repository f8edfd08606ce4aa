//! The CUDA backend: hand-written kernels (`kernels/*.cu`, PTX embedded at build time) driven through cudarc.
//!
//! Nothing here needs a CUDA library to build or link: the driver (`libcuda.so`) is opened at run time, and
//! [`Gpu::open`] checks for it before anything else, so a machine without a driver gets
//! [`crate::Error::BackendUnavailable`] ("no CUDA driver found (libcuda.so); ...") instead of a panic.
//!
//! One module per concern: [`context`] (driver check, context, lazy module loading, launches), [`memory`]
//! (device buffers), [`ffi`] (the kernels' parameter structs, generated from `ffi/clt_params.h`), and one
//! wrapper per kernel family with its launch configuration: [`encode`], [`decode`], [`backward`], [`topk`],
//! [`adam`], [`dequant`] ([`tensor_map`]: the TMA's tensor maps for `encode_wgmma_tma`); [`step`] chains them into a training step's loss and gradient, and [`resident`]
//! into the whole training loop on the device (parameters and Adam resident, batches staged through pinned
//! memory on a second stream; its gradients packed for the replicas' all-reduce by [`gradsum`]); [`dense`]
//! is the dense cuBLAS step the
//! sparse one is benchmarked against, and [`bench`](mod@bench) times every kernel (`clt bench --cuda`); [`tune`] resolves a run's `auto` kernels by
//! timing the candidates on its first batch. Each wrapper names its CPU reference; `tests/cuda.rs` compares them.

pub mod adam;
pub mod backward;
pub mod bench;
pub mod context;
pub mod decode;
pub mod dense;
pub mod dequant;
pub mod encode;
pub mod ffi;
pub mod gradsum;
pub mod memory;
pub mod resident;
pub mod skip;
pub mod step;
pub mod tensor_map;
pub mod topk;
pub mod tune;

pub use context::{Gpu, driver_present};
pub use memory::DBuf;
