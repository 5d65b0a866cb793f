//! Run checkpoints: everything needed to continue a run exactly — trainable tensors, optimizer
//! state, and a JSON state (step, data position, RNG, best eval loss, ...) — written atomically
//! (a temporary directory renamed into place) with a retention limit.
//!
//! Layout: `<dir>/step-00000120/{trainable.safetensors, optimizer.safetensors, state.json}`. A
//! checkpoint is complete when its directory has its final name; partial ones (`*.tmp`) are
//! ignored and cleaned up.
//!
//! [`replace_dir`] replaces a directory (the run's `adapter/`, `adapter-best/`) without a moment
//! where neither the old nor the new one is there; [`recover_dir`] repairs what a crash in the middle
//! of the portable fallback leaves. The old directory is moved aside under a name only this module
//! writes (`<dir>.tramontane-replaced`), so a user's own `adapter.old` (or any other sibling) is
//! never taken for crash debris.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::{Error, Result};

const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
/// Suffix of the name [`replace_by_renames`] moves the old directory to; nothing else writes it.
const REPLACED: &str = ".tramontane-replaced";

/// A checkpoint's contents.
#[derive(Debug, Clone)]
pub struct RunCheckpoint {
    /// Optimizer steps completed.
    pub step: u64,
    /// Trainable tensors by name.
    pub trainable: HashMap<String, Tensor>,
    /// Optimizer state tensors.
    pub optimizer: HashMap<String, Tensor>,
    /// Everything else, as JSON (data position, RNG state, best eval loss, ...).
    pub state: serde_json::Value,
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Complete checkpoints in `dir`, oldest first.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = parse_step(&name) {
            if entry.path().join(STATE).exists() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Writes a checkpoint into `dir` atomically and keeps only the newest `keep_last` (0 = all).
/// Returns its path.
pub fn save_checkpoint(dir: &Path, ckpt: &RunCheckpoint, keep_last: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let final_path = dir.join(step_dir_name(ckpt.step));
    let tmp = dir.join(format!("{}.tmp", step_dir_name(ckpt.step)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    candle_core::safetensors::save(&ckpt.trainable, tmp.join(TRAINABLE))?;
    candle_core::safetensors::save(&ckpt.optimizer, tmp.join(OPTIMIZER))?;
    let state = serde_json::to_string_pretty(&ckpt.state).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(tmp.join(STATE), state).map_err(|e| Error::io(tmp.join(STATE), e))?;
    for name in [TRAINABLE, OPTIMIZER, STATE] {
        let path = tmp.join(name);
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
    }
    if final_path.exists() {
        std::fs::remove_dir_all(&final_path).map_err(|e| Error::io(&final_path, e))?;
    }
    std::fs::rename(&tmp, &final_path).map_err(|e| Error::io(&final_path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    if keep_last > 0 {
        let all = list_checkpoints(dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep_last)) {
            std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
        }
    }
    Ok(final_path)
}

/// Loads one checkpoint directory.
pub fn load_checkpoint(path: &Path) -> Result<RunCheckpoint> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let step = parse_step(&name).ok_or_else(|| Error::format(path, "not a checkpoint directory (step-NNNNNNNN)"))?;
    let load = |file: &str| -> Result<HashMap<String, Tensor>> {
        let p = path.join(file);
        candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| Error::format(&p, e.to_string()))
    };
    let state_path = path.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state = serde_json::from_str(&text).map_err(|e| Error::format(&state_path, format!("invalid JSON: {e}")))?;
    Ok(RunCheckpoint { step, trainable: load(TRAINABLE)?, optimizer: load(OPTIMIZER)?, state })
}

/// The newest complete checkpoint in `dir`, if any; leftover partial ones are removed.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<RunCheckpoint>> {
    if dir.exists() {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    match list_checkpoints(dir)?.last() {
        Some((_, path)) => load_checkpoint(path).map(Some),
        None => Ok(None),
    }
}

/// `dir` with `suffix` appended to its last component (`run/adapter` -> `run/adapter.tmp`).
pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    dir.with_file_name(name)
}

fn sync_parent(dir: &Path) {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
}

/// Where [`replace_by_renames`] moves the old `dir` while the new one is renamed into place.
fn replaced(dir: &Path) -> PathBuf {
    sibling(dir, REPLACED)
}

/// Undoes what an interrupted [`replace_dir`] left of `dir`: when only `dir.tramontane-replaced`
/// exists (the old directory moved aside, the new one not yet in place), it is renamed back to `dir`;
/// when both exist (the new one in place, the old one not yet deleted), it is deleted. Only that
/// name is looked at: other siblings (a user's `dir.old`, say) are left alone. Returns whether a
/// directory was restored.
pub fn recover_dir(dir: &Path) -> Result<bool> {
    let old = replaced(dir);
    if !old.exists() {
        return Ok(false);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        return Ok(false);
    }
    std::fs::rename(&old, dir).map_err(|e| Error::io(dir, e))?;
    sync_parent(dir);
    Ok(true)
}

/// Exchanges two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); `false` where the system or
/// the file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(a), Ok(b)) =
        (std::ffi::CString::new(a.as_os_str().as_bytes()), std::ffi::CString::new(b.as_os_str().as_bytes()))
    else {
        return false;
    };
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; the syscall only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> bool {
    false
}

/// Puts the complete directory `new` in the place of `dir` (created or replaced) so that a crash at
/// any point leaves either the old or the new directory there, never none: on Linux the two are
/// exchanged atomically (`renameat2(RENAME_EXCHANGE)`) and the old one, now at `new`, is deleted;
/// elsewhere (or where the file system cannot exchange) the old one is renamed to
/// `dir.tramontane-replaced`, `new` to `dir`, then `dir.tramontane-replaced` is deleted, and
/// [`recover_dir`] (run first here, and at the start of a run) puts it back if a crash came between
/// the two renames. Once the new directory is in place, failing to delete the old one is not an
/// error.
pub fn replace_dir(new: &Path, dir: &Path) -> Result<()> {
    recover_dir(dir)?;
    if !dir.exists() {
        std::fs::rename(new, dir).map_err(|e| Error::io(dir, e))?;
        sync_parent(dir);
        return Ok(());
    }
    if exchange(new, dir) {
        sync_parent(dir);
        // The new directory is in place; the old one, now at `new`, is only garbage. If it cannot be
        // deleted the replacement still succeeded: the next save removes a stale `new` first (see
        // `save_adapter_atomic` in run.rs, which deletes `<dir>.tmp` before writing it).
        let _ = std::fs::remove_dir_all(new);
        return Ok(());
    }
    replace_by_renames(new, dir)
}

/// [`replace_dir`] without the atomic exchange: `dir` -> `dir.tramontane-replaced`, `new` -> `dir`,
/// delete `dir.tramontane-replaced`.
fn replace_by_renames(new: &Path, dir: &Path) -> Result<()> {
    let old = replaced(dir);
    std::fs::rename(dir, &old).map_err(|e| Error::io(&old, e))?;
    std::fs::rename(new, dir).map_err(|e| Error::io(dir, e))?;
    sync_parent(dir);
    // The new directory is in place; an old one left behind is deleted by the next `recover_dir`
    // (run by the next save and at the start of a run), so failing to delete it is not an error.
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(step: u64) -> RunCheckpoint {
        let t = Tensor::from_vec(vec![step as f32, 2.0], 2, &Device::Cpu).unwrap();
        RunCheckpoint {
            step,
            trainable: HashMap::from([("a".to_string(), t.clone())]),
            optimizer: HashMap::from([("exp_avg.0".to_string(), t)]),
            state: serde_json::json!({"step": step, "data": {"epoch": 0, "offset": step * 3}}),
        }
    }

    #[test]
    fn atomic_save_retention_and_latest() {
        let dir = tempfile::tempdir().unwrap();
        for s in [5, 10, 15, 20] {
            save_checkpoint(dir.path(), &ckpt(s), 2).unwrap();
        }
        let steps: Vec<u64> = list_checkpoints(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![15, 20]);
        // A partial write (killed mid-save) is ignored and cleaned up.
        let partial = dir.path().join("step-00000025.tmp");
        std::fs::create_dir_all(&partial).unwrap();
        let latest = latest_checkpoint(dir.path()).unwrap().unwrap();
        assert_eq!(latest.step, 20);
        assert_eq!(latest.state["data"]["offset"], 60);
        assert_eq!(latest.trainable["a"].to_vec1::<f32>().unwrap(), vec![20.0, 2.0]);
        assert!(!partial.exists());
    }

    fn write_dir(dir: &Path, content: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), content).unwrap();
    }

    fn content(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn replace_dir_creates_then_replaces_leaving_nothing_behind() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("adapter");
        let tmp = sibling(&dir, ".tmp");
        write_dir(&tmp, "first");
        replace_dir(&tmp, &dir).unwrap();
        assert_eq!(content(&dir), "first");
        write_dir(&tmp, "second");
        std::fs::write(dir.join("stale-file"), "x").unwrap();
        replace_dir(&tmp, &dir).unwrap();
        assert_eq!(content(&dir), "second");
        assert!(!dir.join("stale-file").exists(), "the old directory is replaced, not merged");
        assert_eq!(names(root.path()), vec!["adapter"]);
    }

    #[test]
    fn a_crash_between_the_renames_is_recovered() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("adapter-best");
        // What a crash after `dir -> dir.tramontane-replaced` and before `dir.tmp -> dir` leaves.
        write_dir(&replaced(&dir), "old");
        write_dir(&sibling(&dir, ".tmp"), "half-written");
        assert!(recover_dir(&dir).unwrap());
        assert_eq!(content(&dir), "old");
        assert!(!replaced(&dir).exists());
        // The next save also starts by recovering, and then replaces.
        std::fs::rename(&dir, replaced(&dir)).unwrap();
        let tmp = sibling(&dir, ".tmp");
        std::fs::remove_dir_all(&tmp).unwrap();
        write_dir(&tmp, "new");
        replace_dir(&tmp, &dir).unwrap();
        assert_eq!(content(&dir), "new");
        assert_eq!(names(root.path()), vec!["adapter-best"]);
        // A crash after the new directory was in place but before the old one was deleted.
        write_dir(&replaced(&dir), "old");
        assert!(!recover_dir(&dir).unwrap());
        assert_eq!(content(&dir), "new");
        assert_eq!(names(root.path()), vec!["adapter-best"]);
    }

    #[test]
    fn the_rename_fallback_replaces_too() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("adapter");
        write_dir(&dir, "old");
        let tmp = sibling(&dir, ".tmp");
        write_dir(&tmp, "new");
        replace_by_renames(&tmp, &dir).unwrap();
        assert_eq!(content(&dir), "new");
        assert_eq!(names(root.path()), vec!["adapter"]);
    }

    #[test]
    fn a_users_own_dot_old_directory_is_never_touched() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("adapter");
        let users = sibling(&dir, ".old");
        let tmp = sibling(&dir, ".tmp");
        // `mv adapter adapter.old` before the run: `adapter` is missing, `adapter.old` is the user's.
        write_dir(&users, "mine");
        assert!(!recover_dir(&dir).unwrap());
        assert!(!dir.exists(), "the user's adapter.old is not resurrected as adapter");
        write_dir(&tmp, "first");
        replace_dir(&tmp, &dir).unwrap();
        assert_eq!(content(&dir), "first");
        assert_eq!(content(&users), "mine");
        // With both there, neither recovery nor a replacement (either way) deletes it.
        assert!(!recover_dir(&dir).unwrap());
        write_dir(&tmp, "second");
        replace_dir(&tmp, &dir).unwrap();
        write_dir(&tmp, "third");
        replace_by_renames(&tmp, &dir).unwrap();
        assert_eq!(content(&dir), "third");
        assert_eq!(content(&users), "mine");
        assert_eq!(names(root.path()), vec!["adapter", "adapter.old"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn exchange_swaps_two_directories() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        write_dir(&a, "A");
        write_dir(&b, "B");
        assert!(exchange(&a, &b), "renameat2(RENAME_EXCHANGE) is unavailable here");
        assert_eq!((content(&a), content(&b)), ("B".to_string(), "A".to_string()));
        assert!(!exchange(&a, &root.path().join("missing")));
    }

    #[test]
    fn sibling_appends_to_the_name() {
        assert_eq!(sibling(Path::new("runs/x/adapter.v2"), ".old"), PathBuf::from("runs/x/adapter.v2.old"));
    }
}
