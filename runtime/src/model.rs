//! Finding and loading a model: the DSL definition, its config.json and its weights.

use crate::{err, Error, Result};
use ir::checkpoint::{Checkpoint, RandomWeights};
use ir::dsl::elab::{elaborate, Model};
use ir::interp::ParamSource;
use ir::{ParamSpec, Tensor};
use std::path::{Path, PathBuf};

/// The Ring-linear 2.0 definition shipped in the binary (models/ring_linear.ring).
pub const RING_LINEAR_DSL: &str = include_str!("../../models/ring_linear.ring");
pub const RING_LINEAR_FILE: &str = "models/ring_linear.ring";

/// Configs shipped in the binary, by the names `--config` accepts.
pub const BUILTIN_CONFIGS: &[(&str, &str)] = &[
    ("tiny", include_str!("../../models/configs/tiny.json")),
    ("small", include_str!("../../models/configs/small.json")),
    (
        "ring-mini-linear-2.0",
        include_str!("../../models/configs/ring-mini-linear-2.0.json"),
    ),
    (
        "ring-flash-linear-2.0",
        include_str!("../../models/configs/ring-flash-linear-2.0.json"),
    ),
];

/// What to load: a checkpoint folder, or a named config with random weights.
#[derive(Clone, Debug, Default)]
pub struct ModelSpec {
    /// An HF folder (config.json + safetensors).
    pub dir: Option<PathBuf>,
    /// A built-in config name or a path to a config.json (random weights).
    pub config: Option<String>,
    /// Seed of the random weights.
    pub seed: u64,
    /// Another model definition instead of the built-in models/ring_linear.ring.
    pub model_def: Option<PathBuf>,
    /// `key=value` overrides of config.json entries (value parsed as JSON, else a string).
    pub overrides: Vec<String>,
}

/// Weights for the interpreter: a checkpoint on disk or seeded random tensors.
pub enum Weights {
    Checkpoint(Box<Checkpoint>),
    Random(RandomWeights),
}

impl ParamSource for Weights {
    fn load(&self, spec: &ParamSpec) -> std::result::Result<Tensor, String> {
        match self {
            Weights::Checkpoint(c) => ParamSource::load(c.as_ref(), spec),
            Weights::Random(r) => ParamSource::load(r, spec),
        }
    }
}

pub struct LoadedModel {
    pub config: serde_json::Value,
    pub model: Model,
    pub weights: Weights,
    /// A human description: "random weights (seed 0) for config tiny" or the folder.
    pub source: String,
    pub tokenizer: Option<PathBuf>,
}

/// A built-in config by name, or a config.json (or a folder holding one) by path.
pub fn resolve_config(name: &str) -> Result<serde_json::Value> {
    if let Some((_, text)) = BUILTIN_CONFIGS.iter().find(|(n, _)| *n == name) {
        return serde_json::from_str(text).map_err(|e| Error(format!("built-in config {name}: {e}")));
    }
    let p = Path::new(name);
    let file = if p.is_dir() {
        p.join("config.json")
    } else {
        p.to_path_buf()
    };
    if !file.exists() {
        let names: Vec<&str> = BUILTIN_CONFIGS.iter().map(|(n, _)| *n).collect();
        return err(format!(
            "unknown config `{name}`: not a built-in ({}) and no such file",
            names.join(", ")
        ));
    }
    read_json(&file)
}

pub fn read_json(file: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(file).map_err(|e| Error(format!("{}: {e}", file.display())))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error(format!("{}: not valid JSON: {e}", file.display())))?;
    if !v.is_object() {
        return err(format!("{}: a config must be a JSON object", file.display()));
    }
    Ok(v)
}

/// Apply `key=value` overrides to a config object.
pub fn apply_overrides(config: &mut serde_json::Value, overrides: &[String]) -> Result<()> {
    for o in overrides {
        let Some((k, v)) = o.split_once('=') else {
            return err(format!("--set expects key=value, got `{o}`"));
        };
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        config
            .as_object_mut()
            .expect("configs are objects")
            .insert(k.trim().to_string(), value);
    }
    Ok(())
}

/// Elaborate the model definition against `config`.
pub fn build_model(config: &serde_json::Value, model_def: Option<&Path>) -> Result<Model> {
    Ok(match model_def {
        Some(p) => ir::dsl::elab::elaborate_file(p, config)?,
        None => elaborate(RING_LINEAR_FILE, RING_LINEAR_DSL, config)?,
    })
}

impl LoadedModel {
    /// Load what `spec` names; a checkpoint is opened (memory-mapped) and validated against
    /// every parameter the model needs, all mismatches reported at once.
    pub fn load(spec: &ModelSpec) -> Result<LoadedModel> {
        match (&spec.dir, &spec.config) {
            (Some(_), Some(_)) => err("give either --model DIR or --config NAME, not both"),
            (None, None) => {
                err("no model: give --model DIR (an HF checkpoint folder) or --config NAME (random weights; e.g. tiny)")
            }
            (Some(dir), None) => {
                let ckpt = Checkpoint::open(dir)?;
                let mut config = ckpt.config().clone();
                apply_overrides(&mut config, &spec.overrides)?;
                let model = build_model(&config, spec.model_def.as_deref())?;
                let params = model.graph.params().map_err(Error)?;
                ckpt.validate(&params)?;
                let tok = dir.join("tokenizer.json");
                Ok(LoadedModel {
                    config,
                    model,
                    weights: Weights::Checkpoint(Box::new(ckpt)),
                    source: format!("checkpoint {}", dir.display()),
                    tokenizer: tok.exists().then_some(tok),
                })
            }
            (None, Some(name)) => {
                let mut config = resolve_config(name)?;
                apply_overrides(&mut config, &spec.overrides)?;
                let model = build_model(&config, spec.model_def.as_deref())?;
                let tok = Path::new(name).join("tokenizer.json");
                let weights = Weights::Random(RandomWeights::from_config(spec.seed, &config));
                Ok(LoadedModel {
                    config,
                    model,
                    weights,
                    source: format!("random weights (seed {}) for config {name}", spec.seed),
                    tokenizer: tok.exists().then_some(tok),
                })
            }
        }
    }

    pub fn params(&self) -> Result<Vec<ParamSpec>> {
        self.model.graph.params().map_err(Error)
    }

    /// Total parameter count.
    pub fn param_count(&self) -> Result<usize> {
        Ok(self.params()?.iter().map(|p| p.numel()).sum())
    }

    pub fn vocab_size(&self) -> Option<usize> {
        self.config
            .get("vocab_size")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    }

    pub fn eos_token(&self) -> Option<i64> {
        self.config.get("eos_token_id").and_then(|v| v.as_i64())
    }
}
