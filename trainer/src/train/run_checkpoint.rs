//! Run checkpoints: everything needed to continue a run exactly — trainable tensors, optimizer
//! state, and a JSON state (step, data position, RNG, best eval loss, ...) — written atomically
//! (a temporary directory renamed into place) with a retention limit.
//!
//! Layout: `<dir>/step-00000120/{trainable.safetensors, optimizer.safetensors, state.json}`. A
//! checkpoint is complete when its directory has its final name; partial ones (`*.tmp`) are
//! ignored and cleaned up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::{Error, Result};

const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

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
}
