//! Process measurements used by benchmarks, run headers and the memory check before loading a model.

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

/// What bounds the memory available to this process (see [`memory_available_to_process`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryLimit {
    /// The kernel's `MemAvailable` (memory free or reclaimable without swapping, machine-wide).
    System,
    /// The memory limit of this process's control group (v2 `memory.max`, v1 `memory.limit_in_bytes`),
    /// minus what the group already uses (page cache it can drop, `inactive_file`, not counted as used).
    Cgroup,
    /// The address-space limit `RLIMIT_AS` (`ulimit -v`), minus this process's virtual size (`VmSize`).
    AddressSpace,
}

impl MemoryLimit {
    /// How the limit is named in messages.
    pub fn describe(self) -> &'static str {
        match self {
            MemoryLimit::System => "MemAvailable",
            MemoryLimit::Cgroup => "the cgroup memory limit",
            MemoryLimit::AddressSpace => "the address-space limit (ulimit -v)",
        }
    }
}

/// Memory this process can still allocate, in bytes, and the limit that decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AvailableMemory {
    /// Bytes available.
    pub bytes: u64,
    /// The tightest of the limits read.
    pub limited_by: MemoryLimit,
}

/// Memory this process can still allocate: the minimum of `MemAvailable`, the cgroup limit minus the
/// group's usage ([`cgroup_available_bytes`]) and `RLIMIT_AS` minus the virtual size
/// ([`address_space_available_bytes`]); `None` when none of them can be read. Only reads.
pub fn memory_available_to_process() -> Option<AvailableMemory> {
    [
        (available_memory_bytes(), MemoryLimit::System),
        (cgroup_available_bytes(), MemoryLimit::Cgroup),
        (address_space_available_bytes(), MemoryLimit::AddressSpace),
    ]
    .into_iter()
    .filter_map(|(bytes, limited_by)| bytes.map(|bytes| AvailableMemory { bytes, limited_by }))
    .min_by_key(|a| a.bytes)
}

/// `RLIMIT_AS` (`ulimit -v`) minus this process's current virtual size (`VmSize`), in bytes; `None`
/// when there is no such limit or it cannot be read. Every mapping counts against this limit, so an
/// allocation beyond it fails even with free memory.
pub fn address_space_available_bytes() -> Option<u64> {
    let limit = address_space_limit()?;
    let used = status_field("VmSize:")?;
    Some(limit.saturating_sub(used))
}

/// The soft `RLIMIT_AS` in bytes, `None` when unlimited or unreadable.
fn address_space_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit only writes the struct it is given.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rl) };
        if rc != 0 || rl.rlim_cur == libc::RLIM_INFINITY {
            return None;
        }
        #[allow(clippy::unnecessary_cast)] // `rlim_t` is not u64 everywhere.
        Some(rl.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// What this process's control group may still use, in bytes: the tightest over the group and its
/// ancestors of `limit - (usage - inactive_file)` (cgroup v2 `memory.max` / `memory.current`, or v1
/// `memory.limit_in_bytes` / `memory.usage_in_bytes`); `None` when no group sets a limit.
pub fn cgroup_available_bytes() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_available_in(std::path::Path::new("/sys/fs/cgroup"), &membership)
}

/// [`cgroup_available_bytes`] for a cgroup file system mounted at `root`, given the text of
/// `/proc/self/cgroup`.
fn cgroup_available_in(root: &std::path::Path, membership: &str) -> Option<u64> {
    let mut best: Option<u64> = None;
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        // v2: `0::/path` under root (or root/unified in hybrid layouts); v1: `N:memory:/path` under root/memory.
        let (bases, v2) = if controllers.is_empty() {
            (vec![root.to_path_buf(), root.join("unified")], true)
        } else if controllers.split(',').any(|c| c == "memory") {
            (vec![root.join("memory")], false)
        } else {
            continue;
        };
        for base in bases {
            if let Some(bytes) = group_chain_available(&base, path, v2) {
                best = Some(best.map_or(bytes, |b| b.min(bytes)));
            }
        }
    }
    best
}

/// The tightest limit over the group at `base/path` and its ancestors (a container sees its own group
/// at `base` itself, so `base` is always tried).
fn group_chain_available(base: &std::path::Path, path: &str, v2: bool) -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut dirs = vec![base.to_path_buf()];
    let mut dir = base.to_path_buf();
    for part in path.trim_matches('/').split('/').filter(|p| !p.is_empty()) {
        dir.push(part);
        dirs.push(dir.clone());
    }
    for dir in dirs {
        let (limit_file, usage_file) =
            if v2 { ("memory.max", "memory.current") } else { ("memory.limit_in_bytes", "memory.usage_in_bytes") };
        let Some(limit) = read_number(&dir.join(limit_file)) else { continue };
        // v1 writes "no limit" as a huge page-aligned number.
        if limit >= 1 << 60 {
            continue;
        }
        let usage = read_number(&dir.join(usage_file)).unwrap_or(0);
        let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
        let key = if v2 { "inactive_file" } else { "total_inactive_file" };
        let reclaimable = stat_field(&stat, key).unwrap_or(0).min(usage);
        let available = limit.saturating_sub(usage - reclaimable);
        best = Some(best.map_or(available, |b| b.min(available)));
    }
    best
}

/// A file holding one number (`max`, or unreadable, is `None`).
fn read_number(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The `key N` line of a `memory.stat` file.
fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
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

/// The system allocator, except that an allocation it refuses (a null from `malloc`) ends the process with a
/// message and exit status 1 instead of Rust's abort (`memory allocation of N bytes failed`, SIGABRT, a core
/// dump). For a binary to install as its `#[global_allocator]`; the library itself installs nothing.
///
/// Only a refused allocation is caught: under an address-space limit (`ulimit -v`, RLIMIT_AS) or strict
/// overcommit (`vm.overcommit_memory = 2`). Exceeding a cgroup's memory limit, or physical memory under the
/// default overcommit, is not a refusal: the allocation succeeds, and the kernel's OOM killer ends the process
/// later with SIGKILL, which no code in the process sees. What prevents those is the memory check before loading
/// (the estimate against [`memory_available_to_process`], which reads the cgroup limit and `MemAvailable`).
///
/// The message is written straight to stderr and the process leaves with `_exit`: nothing that could allocate
/// or take a lock runs after the failure. Code that asks for memory fallibly (`try_reserve`) gets the same
/// exit instead of an error.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExitOnOutOfMemory;

// SAFETY: every call is forwarded to `System` unchanged; a null result never returns.
unsafe impl std::alloc::GlobalAlloc for ExitOnOutOfMemory {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        checked(unsafe { std::alloc::System.alloc(layout) }, layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        checked(unsafe { std::alloc::System.alloc_zeroed(layout) }, layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        checked(unsafe { std::alloc::System.realloc(ptr, layout, new_size) }, new_size)
    }
}

fn checked(ptr: *mut u8, size: usize) -> *mut u8 {
    if ptr.is_null() {
        out_of_memory(size);
    }
    ptr
}

/// Writes the out-of-memory message without allocating and leaves with status 1.
fn out_of_memory(size: usize) -> ! {
    let mut buf = [0u8; 512];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"\nerror: out of memory: a request for ");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = size;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" bytes was refused (by the address-space limit `ulimit -v`, or by strict overcommit). Use less memory \
          (to run a model: --dtype bf16, --quantize nf4, a shorter context, a smaller --max-batch-size; to train: \
          model.dtype = \"bf16\", quantization.method = \"nf4\", a smaller train.micro_batch_size or \
          data.max_seq_len) or raise the limit.\n");
    #[cfg(unix)]
    // SAFETY: write and _exit are async-signal-safe and touch only the buffer given.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(1);
    }
    #[cfg(not(unix))]
    std::process::exit(1)
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
    fn cgroup_limits_are_read_from_v2_and_v1_layouts() {
        let root = tempfile::tempdir().unwrap();
        let write = |rel: &str, text: &str| {
            let p = root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        // v2: 1000 MiB limit, 300 MiB used of which 100 MiB is droppable page cache -> 800 MiB left.
        write("app/job/memory.max", &format!("{}\n", 1000u64 << 20));
        write("app/job/memory.current", &format!("{}\n", 300u64 << 20));
        write("app/job/memory.stat", &format!("anon 1\ninactive_file {}\nactive_file 5\n", 100u64 << 20));
        // The parent has no limit.
        write("app/memory.max", "max\n");
        write("app/memory.current", "1\n");
        assert_eq!(cgroup_available_in(root.path(), "0::/app/job\n"), Some(800 << 20));
        // A tighter ancestor wins.
        write("app/memory.max", &format!("{}\n", 500u64 << 20));
        write("app/memory.current", &format!("{}\n", 400u64 << 20));
        assert_eq!(cgroup_available_in(root.path(), "0::/app/job\n"), Some(100 << 20));
        // v1, unlimited (the kernel's huge default) and limited.
        write("memory/grp/memory.limit_in_bytes", "9223372036854771712\n");
        write("memory/grp/memory.usage_in_bytes", "4096\n");
        assert_eq!(cgroup_available_in(root.path(), "4:memory:/grp\n3:cpu:/\n"), None);
        write("memory/grp/memory.limit_in_bytes", &format!("{}\n", 2u64 << 30));
        write("memory/grp/memory.usage_in_bytes", &format!("{}\n", 1u64 << 30));
        write("memory/grp/memory.stat", &format!("cache 9\ntotal_inactive_file {}\n", 256u64 << 20));
        assert_eq!(cgroup_available_in(root.path(), "4:memory:/grp\n3:cpu:/\n"), Some((1 << 30) + (256 << 20)));
        // No memory controller line at all.
        assert_eq!(cgroup_available_in(root.path(), "3:cpu:/\n"), None);
    }

    #[test]
    fn the_available_memory_is_the_tightest_limit() {
        let all = memory_available_to_process();
        for (part, limit) in [
            (available_memory_bytes(), MemoryLimit::System),
            (cgroup_available_bytes(), MemoryLimit::Cgroup),
            (address_space_available_bytes(), MemoryLimit::AddressSpace),
        ] {
            if let (Some(part), Some(all)) = (part, all) {
                // Memory moves between the reads; within 256 MiB.
                assert!(all.bytes <= part + (256 << 20), "{all:?} vs {limit:?} {part}");
            }
        }
    }
}
