//! How much memory the machine has free, for refusing up front a rank or a batch that
//! cannot fit (an allocation failure aborts the process instead of returning an error).

/// Bytes of memory available to a new allocation (Linux: `MemAvailable` of
/// `/proc/meminfo`); `None` where that is not known, and nothing is refused then.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `bytes` for a message: `3.2 GiB`, `512.0 MiB`.
pub fn human(bytes: f64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes / GIB)
    } else {
        format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
    }
}
