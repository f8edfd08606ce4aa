//! Tensor maps for the Tensor Memory Accelerator: the driver's `cuTensorMapEncodeTiled` for a row-major bf16
//! matrix in device memory, as the [`CltTensorMap`] a kernel's parameter struct carries (`encode_wgmma_tma`
//! reads x and W_enc through two of them). Encoding is a host call (no device work), cheap enough to do at
//! every launch.

use super::ffi::CltTensorMap;
use crate::{Error, Result};
use cudarc::driver::sys;

// The driver writes a CUtensorMap; ours is the same 128 bytes with the same alignment.
const _: () =
    assert!(std::mem::size_of::<CltTensorMap>() == std::mem::size_of::<sys::CUtensorMap>());
const _: () =
    assert!(std::mem::align_of::<CltTensorMap>() >= std::mem::align_of::<sys::CUtensorMap>());

/// The map of a bf16 matrix of `rows` rows of `cols` elements, consecutive rows `stride` elements apart,
/// starting at device address `ptr`, read in boxes of `box_rows` rows × `box_cols` elements that land in
/// shared memory with the 128-byte swizzle (so `box_cols · 2` must be at most 128). Elements outside the
/// matrix read as zeros. The driver checks the rest (`ptr` and the stride 16-byte aligned, sides at most
/// 256) and its refusal is an error naming `what`.
pub fn bf16_sw128(
    what: &str,
    ptr: u64,
    rows: usize,
    cols: usize,
    stride: usize,
    box_rows: u32,
    box_cols: u32,
) -> Result<CltTensorMap> {
    let mut map = CltTensorMap::default();
    let dims = [cols as u64, rows as u64];
    let strides = [2 * stride as u64];
    let boxes = [box_cols, box_rows];
    let element_strides = [1u32, 1];
    // SAFETY: the driver writes the 128 bytes of `map` (size and alignment asserted above) and reads the
    // four arrays (rank 2: two dims, one stride, two box sides, two element strides), all alive for the
    // call; it only records `ptr`, which the kernel reads later under the launch's own checks.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut CltTensorMap).cast::<sys::CUtensorMap>(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Cuda {
            what: format!(
                "encoding the tensor map of {what} ({rows} × {cols} bf16, stride {stride}, box {box_rows} × {box_cols})"
            ),
            reason: format!("{r:?}"),
        });
    }
    Ok(map)
}
