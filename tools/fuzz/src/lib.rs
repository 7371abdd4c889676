//! Helpers shared by the fuzz targets.
//!
//! - [`LimitAlloc`], the global allocator of every target: it aborts (a
//!   crash libFuzzer records, with the input) on any single Rust allocation
//!   over [`ALLOC_BYTES_MAX`], the largest one a decoder is documented to
//!   make (one frame of [`tessera::limits::FRAME_BYTES_MAX`]).
//! - [`block_on`] for futures over in-memory readers (always ready).
//! - [`reencode`], the round-trip check for postcard messages.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::io::Write;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// Largest single allocation any target may make: one frame.
pub const ALLOC_BYTES_MAX: usize = tessera::limits::FRAME_BYTES_MAX;

/// The system allocator, refusing (by aborting) any allocation over
/// [`ALLOC_BYTES_MAX`]: a decoder that sizes a buffer from an announced length
/// it did not bound shows up as a crash, not as a slow run.
pub struct LimitAlloc;

#[cold]
fn oversized(size: usize) -> ! {
    // No allocation here: we are inside the allocator.
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut n = size;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"\n==tessera-fuzz== allocation of ");
    let _ = err.write_all(&buf[i..]);
    let _ = err.write_all(b" bytes exceeds the 16 MiB frame limit\n");
    std::process::abort();
}

unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_BYTES_MAX {
            oversized(layout.size());
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_BYTES_MAX {
            oversized(layout.size());
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_BYTES_MAX {
            oversized(new_size);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Installs [`LimitAlloc`] in a target binary.
#[macro_export]
macro_rules! limit_alloc {
    () => {
        #[global_allocator]
        static ALLOC: $crate::LimitAlloc = $crate::LimitAlloc;
    };
}

/// Runs a future that never waits (reads from a slice): panics if it does.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("in-memory read returned Pending"),
    }
}

/// The canonical-form check for a decoded postcard value: its encoding
/// decodes again, and that decodes to the same encoding (postcard accepts
/// overlong varints and ignores trailing bytes, so the input bytes
/// themselves need not come back). Returns the canonical encoding.
pub fn reencode<T: Serialize + DeserializeOwned>(v: &T) -> Vec<u8> {
    let once = postcard::to_stdvec(v).expect("a decoded value encodes");
    let again: T = postcard::from_bytes(&once).expect("an encoded value decodes");
    let twice = postcard::to_stdvec(&again).expect("a decoded value encodes");
    assert_eq!(once, twice, "re-encoding is not stable");
    once
}

/// [`reencode`] plus equality of the decoded values, for types with `Eq`.
pub fn roundtrip_eq<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
    let bytes = reencode(v);
    let back: T = postcard::from_bytes(&bytes).expect("an encoded value decodes");
    assert_eq!(&back, v, "decode(encode(v)) != v");
}
