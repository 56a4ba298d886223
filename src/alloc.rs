//! The process's memory allocator: mimalloc, called the way its fast paths
//! expect.
//!
//! mimalloc's own `GlobalAlloc` wrapper passes every allocation through
//! `mi_malloc_aligned`. In mimalloc 3 that call leaves the fast path
//! whenever the block is larger than 1 KiB, or its size class is not a power
//! of two and the current page has no free block, and then over-allocates
//! by the alignment. A proxied request makes about five such allocations
//! (read and write buffers, request futures), each several times the cost
//! of a plain one. Every block mimalloc hands out is already aligned to its
//! size up to 16 bytes, so only stricter alignments need the aligned calls.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block of at least that size already has
/// (`MI_MAX_ALIGN_SIZE` on the platforms roomgate runs on).
const NATURAL_ALIGN: usize = 16;

/// The global allocator the `roomgate` binary installs.
pub struct Allocator;

/// Whether a plain allocation of `size` bytes is aligned enough for `align`.
#[inline]
fn natural(size: usize, align: usize) -> bool {
    align <= NATURAL_ALIGN && align <= size
}

// SAFETY: every method forwards to mimalloc, which returns blocks of at
// least the requested size or null. Blocks that need a stricter alignment
// than `natural` guarantees go through the aligned entry points; `mi_free`
// and `mi_realloc` accept blocks from either family.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain FFI calls; mimalloc accepts any size.
        unsafe {
            if natural(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if natural(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's
        // contract); the alignment is kept for the new size.
        unsafe {
            if natural(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes around mimalloc's size classes and its 1 KiB small limit.
    const SIZES: [usize; 14] = [
        1,
        7,
        8,
        15,
        16,
        24,
        40,
        100,
        1000,
        1025,
        1800,
        4097,
        70_000,
        1 << 20,
    ];

    #[test]
    fn every_block_has_the_alignment_asked_for() {
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in SIZES {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: the layout is non-zero; each block is freed with it.
                unsafe {
                    let p = Allocator.alloc(layout);
                    assert!(!p.is_null(), "{size} bytes");
                    assert_eq!(p as usize % align, 0, "{size} bytes at {align}");
                    p.write_bytes(0xA5, size);
                    Allocator.dealloc(p, layout);

                    let z = Allocator.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed {size} bytes at {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0));
                    Allocator.dealloc(z, layout);
                }
            }
        }
    }

    #[test]
    fn realloc_keeps_contents_and_alignment() {
        for align in [8, 16, 64] {
            let layout = Layout::from_size_align(24, align).expect("layout");
            // SAFETY: each pointer is the latest one returned, with its size.
            unsafe {
                let mut p = Allocator.alloc(layout);
                p.copy_from_nonoverlapping(b"0123456789abcdefghijklmn".as_ptr(), 24);
                let mut size = 24;
                for new_size in [40, 1500, 70_000, 32] {
                    p = Allocator.realloc(
                        p,
                        Layout::from_size_align(size, align).expect("layout"),
                        new_size,
                    );
                    assert_eq!(p as usize % align, 0, "{new_size} bytes at {align}");
                    let kept = std::slice::from_raw_parts(p, 24);
                    assert_eq!(kept, b"0123456789abcdefghijklmn");
                    size = new_size;
                }
                Allocator.dealloc(p, Layout::from_size_align(size, align).expect("layout"));
            }
        }
    }
}
