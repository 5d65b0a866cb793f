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

/// Memory the kernel estimates is available to start new work without swapping (`MemAvailable`), in
/// bytes, if the OS reports it.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&text, "MemAvailable:")
}

fn status_field(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&text, key)
}

/// The `key: N kB` line of a /proc file, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Process-wide settings for tensor work; call once at startup, before other threads start.
///
/// - glibc's allocator: buffers of any size come from the heap and freed memory stays there (no
///   `munmap` + page faults + zeroing for every large tensor, which otherwise costs several percent of
///   a training step). Peak RSS is unchanged: freed memory is reused, not returned.
/// - `RAYON_NUM_THREADS`, when unset, is set to the thread count candle picks: without it candle 0.11
///   re-reads the CPU list from `/proc` on every matrix product.
pub fn tune_process() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
}

/// Returns the allocator's free memory to the OS (after loading, whose temporary buffers
/// [`tune_process`] would otherwise keep resident). A no-op off glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields_as_bytes() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(kib_field(meminfo, "MemAvailable:"), Some(20_000_000 * 1024));
        assert_eq!(kib_field(meminfo, "SwapTotal:"), None);
        assert_eq!(kib_field("MemAvailable: lots kB\n", "MemAvailable:"), None);
    }

    #[test]
    fn the_default_activation_budget_is_a_quarter_of_the_available_memory() {
        let budget = crate::train::default_activation_budget();
        match available_memory_bytes() {
            // Memory moves between the two reads; a quarter of it, within 1 GiB.
            Some(available) => {
                assert!((budget as i64 - (available / 4) as i64).abs() < 1 << 30, "{budget} vs {available}")
            }
            None => assert_eq!(budget, 0),
        }
    }
}
