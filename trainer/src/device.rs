//! Device selection: the one place where a user's choice of device (the recipe's `model.device`, the inference
//! commands' `--device`: `auto`, `cpu`, `cuda` or `cuda:N`) becomes a candle [`Device`]. Everything else computes
//! on the device of its tensors or of the loaded model.
//!
//! This build has no CUDA support (there is no `cuda` cargo feature yet): `auto` is the CPU, and `cuda` /
//! `cuda:N` are refused by [`DeviceChoice::check`] with [`DeviceError::NoCuda`], before anything is loaded.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The spellings a device choice accepts, in the order messages list them.
pub const DEVICE_NAMES: [&str; 4] = ["auto", "cpu", "cuda", "cuda:N"];

/// Whether this build can compute on CUDA devices.
pub const CUDA_SUPPORT: bool = false;

/// Why a device choice was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Not one of [`DEVICE_NAMES`].
    #[error("unknown device `{0}`: expected auto, cpu, cuda or cuda:N")]
    Unknown(String),
    /// A CUDA device on a build without CUDA support.
    #[error("this build has no CUDA support: build with --features cuda")]
    NoCuda,
}

/// Where a model is loaded and computed: the recipe's `model.device` and the commands' `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The best device this build supports: the CPU on this build. The default.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA device with this ordinal (`cuda` is `cuda:0`); needs a build with CUDA support.
    Cuda(usize),
}

impl DeviceChoice {
    /// Checks that this build supports the choice, without creating the device (for validation before loading).
    pub fn check(self) -> Result<(), DeviceError> {
        match self {
            DeviceChoice::Auto | DeviceChoice::Cpu => Ok(()),
            DeviceChoice::Cuda(_) if CUDA_SUPPORT => Ok(()),
            DeviceChoice::Cuda(_) => Err(DeviceError::NoCuda),
        }
    }

    /// The device to load onto and compute on.
    pub fn resolve(self) -> Result<Device, DeviceError> {
        self.check()?;
        match self {
            DeviceChoice::Auto | DeviceChoice::Cpu => Ok(Device::Cpu),
            // Unreachable on this build: `check` refused it.
            DeviceChoice::Cuda(_) => Err(DeviceError::NoCuda),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let unknown = || DeviceError::Unknown(s.to_string());
        Ok(match s.trim() {
            "auto" => DeviceChoice::Auto,
            "cpu" => DeviceChoice::Cpu,
            "cuda" => DeviceChoice::Cuda(0),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(unknown)?;
                DeviceChoice::Cuda(n.parse().map_err(|_| unknown())?)
            }
        })
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    /// A string; anything else than [`DEVICE_NAMES`] is an "unknown variant" error listing them (which the
    /// recipe reports as `unknown value ...; expected one of auto, cpu, cuda, cuda:N`).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| serde::de::Error::unknown_variant(&s, &DEVICE_NAMES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_print_and_resolve() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(choice), "{text}");
        }
        assert_eq!(DeviceChoice::Cuda(3).to_string(), "cuda:3");
        assert_eq!("cuda:3".parse::<DeviceChoice>().map(|c| c.to_string()), Ok("cuda:3".into()));
        for bad in ["tpu", "cuda:", "cuda:x", "gpu", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert_eq!(e.to_string(), format!("unknown device `{bad}`: expected auto, cpu, cuda or cuda:N"));
        }
        assert!(DeviceChoice::default().resolve().unwrap().is_cpu());
        assert!(DeviceChoice::Cpu.resolve().unwrap().is_cpu());
        assert_eq!(DeviceChoice::Cuda(0).check(), Err(DeviceError::NoCuda));
        assert_eq!(
            DeviceChoice::Cuda(1).resolve().unwrap_err().to_string(),
            "this build has no CUDA support: build with --features cuda"
        );
    }
}
