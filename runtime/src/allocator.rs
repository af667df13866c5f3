//! The process allocator around loading: long-lived blocks mapped on their own.
//!
//! glibc serves a block of at least its mmap threshold with its own mapping, unmapped on free;
//! smaller ones come from the heap, whose freed memory is rarely returned to the system. The
//! threshold starts at 128 KiB and rises to the size of each mapped block freed, up to
//! 32 MiB. Optimising a tract plan allocates and frees copies of the weights (packing,
//! constant folding) between longer-lived ones, so after the first plans those copies came
//! from the heap and left it fragmented: the quickstart's RSS grew with every plan to 0.7 GB
//! (with the constant pool; 1.0 GB before it) where the live data was about 0.35 GB.
//!
//! [`loading`] maps every block of 256 KiB or more while a program is read or a plan is
//! optimised, so what loading frees goes back to the system and what it keeps (weights,
//! packed operands) sits outside the heap. Runs keep the heap and a high threshold:
//! activations are freed and reused every step, and mapping them would fault their pages in
//! anew each time (a fixed 256 KiB threshold made the quickstart's steps 1.5× slower).

/// Blocks at least this large are mapped on their own while loading.
pub const LOADING_MMAP_THRESHOLD: i32 = 256 * 1024;
/// glibc's own upper bound for its dynamic threshold (64-bit), kept outside loading.
pub const RUNNING_MMAP_THRESHOLD: i32 = 32 * 1024 * 1024;

/// Runs `f` with the loading threshold. Programs load one at a time (the trainer and the
/// backends load from one thread), so the global setting is not raced in practice; if it
/// were, a block would only land on the other side of the threshold.
pub fn loading<T>(f: impl FnOnce() -> T) -> T {
    set_threshold(LOADING_MMAP_THRESHOLD);
    let out = f();
    set_threshold(RUNNING_MMAP_THRESHOLD);
    out
}

fn set_threshold(bytes: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes an allocator parameter.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}
