//! Weights read by memory-mapping their files instead of copying them into the heap.
//!
//! A model's weights are most of a compile's memory: a 7B model in f16 holds 13.5 GB of them,
//! and the compiler changes only the few it rewrites. External data files (and large model
//! files) are therefore mapped read-only, and each tensor's `raw_data` is a [`Bytes`] slice of
//! the mapping: nothing is read until a pass looks at a tensor, and passes that stream over
//! every weight (the fingerprint, the non-finite check, writing the artifact) hand the pages
//! back with [`release`] once done, so the process never holds more than the tensor it is
//! working on. The page cache keeps the pages; a second pass re-reads them from there.
//!
//! The cost of mapping: a source file truncated by another program while a compile runs
//! makes the next access to the lost pages a bus error, and one overwritten in place changes
//! what the compile reads. Inputs are never written by bidora itself (`provenance`), so only
//! an outside writer can do either.

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use memmap2::{Mmap, UncheckedAdvice};

/// Files at least this large are mapped rather than read (smaller ones cost a page table
/// entry and a registry slot for nothing).
pub const MAP_THRESHOLD: u64 = 1 << 20;

/// Every live mapping, by address range, so that [`release`] can tell a slice of a read-only
/// file mapping (safe to drop) from heap memory (which `MADV_DONTNEED` would zero).
static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

struct Live {
    start: usize,
    len: usize,
    map: Weak<Mmap>,
}

/// Owner of the mapping inside every [`Bytes`] cut from it; the mapping is unmapped when the
/// last slice is dropped.
struct Owner(Arc<Mmap>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Maps the whole of `file` (`size` bytes, non-zero) read-only and returns it as one
/// [`Bytes`]; slicing it (`Bytes::slice`) shares the mapping.
pub fn map(file: &File) -> io::Result<Bytes> {
    // SAFETY: the mapping is read-only and private; the module doc states what an outside
    // writer truncating the file would do.
    let map = Arc::new(unsafe { Mmap::map(file)? });
    let _ = map.advise(memmap2::Advice::Sequential);
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|l| l.map.strong_count() > 0);
    live.push(Live {
        start: map.as_ptr() as usize,
        len: map.len(),
        map: Arc::downgrade(&map),
    });
    drop(live);
    Ok(Bytes::from_owner(Owner(map)))
}

/// Hands the pages under `data` back to the kernel if `data` lies in a mapping made by
/// [`map`]; does nothing for any other memory. The bytes stay readable: the next access
/// faults them in again from the page cache or the file.
pub fn release(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let start = data.as_ptr() as usize;
    let end = start + data.len();
    let map = {
        let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.iter()
            .find(|l| l.start <= start && end <= l.start + l.len)
            .and_then(|l| l.map.upgrade())
    };
    let Some(map) = map else {
        return;
    };
    // Only whole pages inside the slice: a neighbour sharing its first or last page may be in
    // use.
    let page = page_size();
    let base = map.as_ptr() as usize;
    let first = (start - base).div_ceil(page) * page;
    let last = ((end - base) / page) * page;
    if last > first {
        // SAFETY: the range lies inside a live read-only private file mapping (checked against
        // the registry while holding a strong reference), so dropping its pages loses nothing:
        // later reads fault the same file contents back in.
        let _ =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, first, last - first) };
    }
}

fn page_size() -> usize {
    // Every platform we build for uses 4 KiB pages or a multiple of it; a smaller guess only
    // makes `release` keep a few more bytes.
    4096
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn release_keeps_mapped_bytes_readable_and_ignores_heap_memory() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let payload: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 251) as u8).collect();
        f.write_all(&payload).unwrap();
        f.flush().unwrap();
        let bytes = map(f.as_file()).unwrap();
        assert_eq!(&bytes[..], &payload[..]);
        let slice = bytes.slice(100..3 * 4096 + 10);
        release(&slice);
        assert_eq!(&slice[..], &payload[100..3 * 4096 + 10]);
        assert_eq!(&bytes[..], &payload[..]);

        // Heap memory is not in the registry: release must leave it alone.
        let heap = vec![7u8; 5 * 4096];
        release(&heap);
        assert!(heap.iter().all(|&b| b == 7));
    }

    #[test]
    fn a_mapping_outlives_its_file_handle_and_is_dropped_with_its_last_slice() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[1, 2, 3, 4]).unwrap();
        f.flush().unwrap();
        let file = File::open(f.path()).unwrap();
        let bytes = map(&file).unwrap();
        drop(file);
        let tail = bytes.slice(2..);
        drop(bytes);
        assert_eq!(&tail[..], &[3, 4]);
        let ptr = tail.as_ptr() as usize;
        drop(tail);
        let live = LIVE.lock().unwrap();
        assert!(live
            .iter()
            .all(|l| !(l.start <= ptr && ptr < l.start + l.len) || l.map.strong_count() == 0));
    }
}
