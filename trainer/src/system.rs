//! Process measurements used by benchmarks and run headers.

/// Peak resident set size of this process in bytes (`VmHWM`), if the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_field("VmHWM:")
}

/// Current resident set size of this process in bytes (`VmRSS`), if the OS reports it.
pub fn rss_bytes() -> Option<u64> {
    status_field("VmRSS:")
}

/// Resets the peak resident set size to the current one (Linux: `5` into `/proc/self/clear_refs`), so
/// that a later [`peak_rss_bytes`] measures one phase; false when the OS refuses.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn status_field(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}
