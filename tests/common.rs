//! Helpers shared by the integration tests.

use ir::checkpoint::RandomWeights;
use ir::interp::ParamSource;
use ir::{ParamSpec, Tensor};
use rand::{Rng, SeedableRng};
use runtime::model::{build_model, resolve_config};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the venv made by scripts/setup.sh (or RINGJIT_PYTHON). The parity tests need
/// it; its absence is a failure with instructions, not a silent skip.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("RINGJIT_PYTHON") {
        return PathBuf::from(p);
    }
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python with numpy: run ./scripts/setup.sh (or set RINGJIT_PYTHON)"
    );
    p
}

pub fn ringjit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringjit"))
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{cmd:?} should have failed");
    assert!(!stderr.contains("panicked"), "{cmd:?} panicked: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
    stderr
}

pub fn config(name: &str, overrides: &[(&str, serde_json::Value)]) -> serde_json::Value {
    let mut c = resolve_config(name).unwrap();
    for (k, v) in overrides {
        c.as_object_mut().unwrap().insert(k.to_string(), v.clone());
    }
    c
}

pub fn model(config: &serde_json::Value) -> ir::dsl::elab::Model {
    build_model(config, None).unwrap()
}

pub fn random_tokens(seed: u64, n: usize, vocab: usize) -> Vec<i64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as i64)).collect()
}

/// Random weights with some tensors replaced (e.g. a non-zero expert bias).
pub struct Patched {
    pub base: RandomWeights,
    pub replace: HashMap<String, Tensor>,
}

impl ParamSource for Patched {
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
        match self.replace.get(&spec.name) {
            Some(t) => Ok(t.clone()),
            None => self.base.load(spec).map_err(|e| e.to_string()),
        }
    }
}

/// Read a little-endian f32 .npy file (what the reference and `ringjit forward` write).
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY", "{} is not .npy", path.display());
    let (hlen, start) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(&b[start..start + hlen]).unwrap();
    assert!(header.contains("'<f4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape_txt = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = b[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    (shape, data)
}
