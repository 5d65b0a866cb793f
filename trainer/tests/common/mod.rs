//! Shared helpers of the trainer's integration tests: fixture paths, goldens, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// `tests/fixtures/models/<name>` at the workspace root.
pub fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
}

/// A golden file written by tests/fixtures/models/generate.py (transformers 5).
pub struct Golden {
    pub tensors: HashMap<String, Tensor>,
    pub json: serde_json::Value,
}

impl Golden {
    pub fn load(name: &str) -> Golden {
        Golden::load_from(&model_dir("golden"), name)
    }

    /// `<dir>/<name>.safetensors` and `<dir>/<name>.json`.
    pub fn load_from(base: &std::path::Path, name: &str) -> Golden {
        let tensors = candle_core::safetensors::load(base.join(format!("{name}.safetensors")), &Device::Cpu).unwrap();
        let text = std::fs::read_to_string(base.join(format!("{name}.json"))).unwrap();
        Golden { tensors, json: serde_json::from_str(&text).unwrap() }
    }

    pub fn tensor(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("golden has no `{key}`"))
    }

    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.tensor(key).flatten_all().unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
    }

    pub fn i64s(&self, key: &str) -> Vec<i64> {
        self.tensor(key).flatten_all().unwrap().to_vec1::<i64>().unwrap()
    }

    /// The tensors whose names start with `prefix`, without it.
    pub fn prefixed(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone()))).collect()
    }

    pub fn f64(&self, key: &str) -> f64 {
        self.json[key].as_f64().unwrap_or_else(|| panic!("golden json has no number `{key}`"))
    }
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap();
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Largest absolute value.
pub fn max_abs(a: &Tensor) -> f32 {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.abs()).fold(0.0, f32::max)
}
