//! Device buffers: allocation, uploads, downloads, raw addresses for the parameter structs, bf16 packing.

use super::context::{Gpu, cuda_err};
use crate::Result;
use cudarc::driver::{
    CudaSlice, CudaStream, CudaViewMut, DevicePtr, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};

/// A device buffer of `len` elements (at least one element is allocated, so empty buffers have an address).
pub struct DBuf<T> {
    slice: CudaSlice<T>,
    len: usize,
}

impl<T: DeviceRepr> DBuf<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address, for a kernel's parameter struct.
    pub fn ptr(&self, gpu: &Gpu) -> u64 {
        let (p, _sync) = self.slice.device_ptr(gpu.stream());
        p
    }

    /// The buffer's `len` elements as cudarc's mutable view (for libraries that take one: NCCL).
    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice.slice_mut(0..self.len)
    }

    /// Elements `range` as cudarc's mutable view (NCCL on one part of a buffer). Panics when the range
    /// is not inside the buffer, as slicing does.
    pub fn range_mut(&mut self, range: std::ops::Range<usize>) -> CudaViewMut<'_, T> {
        assert!(range.end <= self.len, "device buffer range out of bounds");
        self.slice.slice_mut(range)
    }
}

impl Gpu {
    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr + Copy + Default>(&self, host: &[T]) -> Result<DBuf<T>> {
        let slice = if host.is_empty() {
            self.stream().clone_htod(&[T::default()][..])
        } else {
            self.stream().clone_htod(host)
        }
        .map_err(cuda_err(format!(
            "copying {} elements to the device",
            host.len()
        )))?;
        Ok(DBuf {
            slice,
            len: host.len(),
        })
    }

    /// A zeroed device buffer.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<DBuf<T>> {
        let slice = self
            .stream()
            .alloc_zeros::<T>(len.max(1))
            .map_err(cuda_err(format!("allocating {len} elements")))?;
        Ok(DBuf { slice, len })
    }

    /// A buffer for a kernel to fill completely: zeroed, or poisoned with 0xFF bytes when
    /// [`Gpu::set_poison`] is on.
    pub fn output<T: DeviceRepr + ValidAsZeroBits + bytemuck::Pod>(
        &self,
        len: usize,
    ) -> Result<DBuf<T>> {
        let buf = self.zeros::<T>(len)?;
        if self.poisoned() {
            let p = buf.ptr(self);
            // SAFETY: `p` is the live allocation just made on this stream, at least `len.max(1)` elements
            // long; T is plain data (Pod), valid for any bit pattern, so 0xFF bytes are a valid T.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    p,
                    0xff,
                    len * std::mem::size_of::<T>(),
                    self.stream().cu_stream(),
                )
            }
            .map_err(cuda_err("poisoning an output buffer"))?;
        }
        Ok(buf)
    }

    /// A device buffer filled with `value` (tests poison outputs with NaN or `u32::MAX`).
    pub fn filled<T: DeviceRepr + Copy + Default>(&self, len: usize, value: T) -> Result<DBuf<T>> {
        self.upload(&vec![value; len])
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr + Copy + Default>(&self, buf: &DBuf<T>) -> Result<Vec<T>> {
        let mut v = self
            .stream()
            .clone_dtoh(&buf.slice)
            .map_err(cuda_err(format!(
                "copying {} elements to the host",
                buf.len
            )))?;
        v.truncate(buf.len);
        Ok(v)
    }

    /// Copies elements `start .. start + dst.len()` of a device buffer into `dst` (waits for the stream).
    pub fn download_into<T: DeviceRepr + Copy + Default>(
        &self,
        buf: &DBuf<T>,
        start: usize,
        dst: &mut [T],
    ) -> Result<()> {
        let end = start + dst.len();
        if end > buf.len {
            return Err(crate::Error::Shape {
                what: "device download (buffer elements, end of the range)".into(),
                expected: vec![buf.len],
                got: vec![end],
            });
        }
        if dst.is_empty() {
            return Ok(());
        }
        self.stream()
            .memcpy_dtoh(&buf.slice.slice(start..end), dst)
            .map_err(cuda_err(format!(
                "copying {} elements to the host",
                dst.len()
            )))?;
        self.sync()
    }

    /// Copies `src` into the start of `dst` on the device (queued on the stream).
    pub fn copy<T: DeviceRepr>(&self, src: &DBuf<T>, dst: &mut DBuf<T>) -> Result<()> {
        if dst.len < src.len {
            return Err(crate::Error::Shape {
                what: "device copy (source, destination elements)".into(),
                expected: vec![src.len, src.len],
                got: vec![src.len, dst.len],
            });
        }
        // The slices hold `len.max(1)` elements each, so the destination's is at least the source's.
        self.stream()
            .memcpy_dtod(&src.slice, &mut dst.slice)
            .map_err(cuda_err("copying on the device"))
    }

    /// Zeroes a buffer (queued on the stream).
    pub fn clear<T: DeviceRepr + ValidAsZeroBits>(&self, buf: &mut DBuf<T>) -> Result<()> {
        self.stream()
            .memset_zeros(&mut buf.slice)
            .map_err(cuda_err("clearing a buffer"))
    }

    /// Uploads f32 values as bf16 (round to nearest even, as the kernels' `__float2bfloat16_rn`).
    pub fn upload_bf16(&self, host: &[f32]) -> Result<DBuf<u16>> {
        self.upload(&to_bf16_bits(host))
    }
}

/// Page-locked (pinned) host memory of `len` elements: the staging buffers the resident trainer fills with
/// the next batch and copies to the device asynchronously on its copy stream (see `resident.rs`).
/// Write-combined: fast for the host to write and the device to read, slow for the host to read.
pub struct Pinned<T> {
    slice: PinnedHostSlice<T>,
    len: usize,
}

impl<T: DeviceRepr + ValidAsZeroBits> Pinned<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host elements, for writing; first waits until every copy queued from this buffer has finished
    /// reading it (cudarc records an event on the copy's stream after each copy).
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        let len = self.len;
        let s = self
            .slice
            .as_mut_slice()
            .map_err(cuda_err("waiting for a pinned buffer's copies"))?;
        Ok(&mut s[..len])
    }
}

impl Gpu {
    /// Allocates `len` elements of pinned, write-combined host memory, zeroed.
    pub fn pinned<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<Pinned<T>> {
        // SAFETY: the allocation is uninitialised; it is zeroed below through the raw pointer before any
        // reference to its elements exists, and T is ValidAsZeroBits, so every element is then a valid T.
        let mut slice = unsafe { self.context().alloc_pinned::<T>(len.max(1)) }.map_err(
            cuda_err(format!("allocating {len} elements of pinned host memory")),
        )?;
        let p = slice
            .as_mut_ptr()
            .map_err(cuda_err("waiting for a new pinned buffer"))?;
        // SAFETY: `p` points to `len.max(1)` elements just allocated above, owned by `slice` and not yet
        // referenced anywhere else; writing zero bytes over them is in bounds.
        unsafe { std::ptr::write_bytes(p, 0, len.max(1)) };
        Ok(Pinned { slice, len })
    }

    /// Queues on `stream` the copy of the pinned buffer `src` into `dst` (same length). The copy is
    /// asynchronous: the caller orders it against the compute stream with events, and [`Pinned::as_mut_slice`]
    /// waits for it before the host writes `src` again.
    pub fn copy_pinned_on<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        stream: &std::sync::Arc<CudaStream>,
        src: &Pinned<T>,
        dst: &mut DBuf<T>,
    ) -> Result<()> {
        if src.len != dst.len {
            return Err(crate::Error::Shape {
                what: "pinned host-to-device copy (source, destination elements)".into(),
                expected: vec![src.len, src.len],
                got: vec![src.len, dst.len],
            });
        }
        // Both sides hold `len.max(1)` elements (the allocations above), which cudarc's length check needs.
        stream
            .memcpy_htod(&src.slice, &mut dst.slice)
            .map_err(cuda_err(format!(
                "copying {} pinned elements to the device",
                src.len
            )))
    }
}

/// f32 → bf16 bits, round to nearest even.
pub fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|x| half::bf16::from_f32(*x).to_bits())
        .collect()
}

/// Rounds f32 values through bf16 (what the device sees of an f32 uploaded as bf16).
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect()
}
