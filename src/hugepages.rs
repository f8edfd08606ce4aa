//! Large zeroed `f32` buffers that ask the kernel for transparent huge pages.
//!
//! The sparse training step reads rows of the decoder, of its gradient and of the step's residual in an order
//! no prefetcher can guess. With 4 KiB pages each of those ~3–20 KiB rows costs several TLB misses, and page
//! walks are dear in a virtual machine; with 2 MiB pages they mostly vanish (`docs/perf.md`: the gather phases
//! ran ~15–25% faster with huge pages). Most Linux systems give huge pages only to ranges that ask for them
//! (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`), so the buffers that matter ask here. Elsewhere,
//! or when the system refuses, the buffers are ordinary zeroed vectors.

/// Below this size a buffer cannot hold an aligned 2 MiB page worth asking for.
const MIN_BYTES: usize = 4 << 20;

/// `vec![0.0; n]`, with the kernel asked to back it with huge pages. The request is made before any page is
/// touched (a large zeroed allocation is fresh, untouched memory), so the first touch faults in huge pages.
pub fn zeroed(n: usize) -> Vec<f32> {
    let v = vec![0.0f32; n];
    advise(&v);
    v
}

#[cfg(target_os = "linux")]
fn advise(v: &[f32]) {
    const PAGE: usize = 4096;
    let bytes = std::mem::size_of_val(v);
    if bytes < MIN_BYTES {
        return;
    }
    let start = v.as_ptr() as usize;
    let (lo, hi) = (start.next_multiple_of(PAGE), (start + bytes) / PAGE * PAGE);
    if hi > lo {
        // SAFETY: `[lo, hi)` lies inside `v`'s allocation and is page-aligned. MADV_HUGEPAGE changes only how
        // the kernel backs those pages, never their contents or their validity; a refusal (huge pages off, a
        // kernel without them, another page size) returns an error that is ignored, since this is a hint.
        unsafe {
            libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_v: &[f32]) {}

#[cfg(test)]
mod tests {
    #[test]
    fn zeroed_buffers_are_zero_and_writable() {
        for n in [0, 1, 1000, (5 << 20) / 4 + 3] {
            let mut v = super::zeroed(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|x| *x == 0.0));
            v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
            assert!(v.iter().enumerate().all(|(i, x)| *x == i as f32));
        }
    }
}
