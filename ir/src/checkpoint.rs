//! HF checkpoints: reading a model folder (`config.json` plus `model.safetensors`, or shards
//! listed in `model.safetensors.index.json`), checking it against the parameters a graph needs,
//! loading parameters as [`Tensor`]s, and making seeded random weights — in memory
//! ([`RandomWeights`]) or written to disk in the HF layout ([`write_checkpoint`]).
//!
//! Reading memory-maps every file and parses and checks its safetensors header, but never reads
//! the tensor data until a parameter is loaded, so opening a checkpoint costs the same whatever
//! its size. Every malformed input gives a [`CheckpointError`] naming the file or tensor, never
//! a panic.
//!
//! The safetensors format: an 8-byte little-endian header length `n`, `n` bytes of JSON
//! (`{"__metadata__": {...}, NAME: {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}}`,
//! padded with spaces), then the tensors' bytes, little-endian and row-major, with
//! `data_offsets` relative to the end of the header. The tensors tile the data exactly: no gaps,
//! no overlaps, nothing after the last one.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::Deserialize;
use serde_json::Value;

use crate::dtype::DType;
use crate::param::ParamSpec;
use crate::tensor::{Data, Tensor};

/// The model configuration file of an HF model folder.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint (`weight_map`: tensor name → shard file).
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// What can go wrong reading, checking, loading or writing a checkpoint. The messages are
/// meant to be printed as they are by the CLI.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{dir}: no such directory")]
    NoDirectory { dir: PathBuf },
    #[error("{dir}: not an HF model folder: it has no config.json")]
    NoConfig { dir: PathBuf },
    #[error("{dir}: no weights: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    BadJson { path: PathBuf, msg: String },
    #[error("{index}: names shard {shard} (for {count} tensors, {example} among them), but {shard} does not exist")]
    MissingShard {
        index: PathBuf,
        shard: String,
        count: usize,
        example: String,
    },
    #[error("{index}: maps tensor {tensor} to {shard}, but {shard} has no such tensor")]
    NotInShard {
        index: PathBuf,
        tensor: String,
        shard: String,
    },
    #[error("tensor {tensor} is stored twice, in {first} and in {second}")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{file}: truncated: the file has {size} bytes, its header needs {needed}")]
    Truncated { file: PathBuf, needed: u64, size: u64 },
    #[error("{file}: truncated or corrupt header length: it says {header_len} bytes of header, but the file has only {size} bytes")]
    HeaderPastEof { file: PathBuf, header_len: u64, size: u64 },
    #[error("{file}: corrupt safetensors header: {msg}")]
    CorruptHeader { file: PathBuf, msg: String },
    #[error("{file}: tensor {tensor}: {msg}")]
    BadTensor { file: PathBuf, tensor: String, msg: String },
    #[error("{}", mismatch_message(.dir, .problems))]
    Mismatch { dir: PathBuf, problems: Vec<String> },
    #[error("{dir}: no tensor named {tensor}")]
    NotFound { dir: PathBuf, tensor: String },
    #[error("tensor {tensor} has dtype {found}; only F32, BF16 and F16 weights can be loaded")]
    UnsupportedDType { tensor: String, found: String },
    #[error("tensor {tensor} has dtype {found}, which ringjit has no type for")]
    UnknownDType { tensor: String, found: String },
    #[error("parameter {name}: {msg}")]
    BadSpec { name: String, msg: String },
    #[error("{dir} exists and is not empty; refusing to write a checkpoint over it")]
    OutputExists { dir: PathBuf },
    #[error("cannot write a checkpoint in {dtype}: use f32, bf16 or f16")]
    BadOutputDType { dtype: DType },
    #[error("the model config must be a JSON object, not {found}")]
    BadConfig { found: String },
}

fn mismatch_message(dir: &Path, problems: &[String]) -> String {
    let n = problems.len();
    let mut s = format!(
        "checkpoint {} does not match the model ({n} problem{}):",
        dir.display(),
        if n == 1 { "" } else { "s" }
    );
    for p in problems {
        s.push_str("\n  ");
        s.push_str(p);
    }
    s
}

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---- safetensors dtypes ----------------------------------------------------------------------

/// Every dtype tag of the safetensors format with its size in bits, in the order of the
/// library's `Dtype` enum (increasing alignment), which is also the order its writer uses:
/// later entries are written first.
const ST_DTYPES: [(&str, usize); 22] = [
    ("BOOL", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("U8", 8),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3", 8),
    ("F8_E8M0", 8),
    ("F8_E4M3FNUZ", 8),
    ("F8_E5M2FNUZ", 8),
    ("I16", 16),
    ("U16", 16),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U32", 32),
    ("F32", 32),
    ("C64", 64),
    ("F64", 64),
    ("I64", 64),
    ("U64", 64),
];

/// A safetensors dtype, as an index into [`ST_DTYPES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct StDType(usize);

impl StDType {
    fn from_tag(tag: &str) -> Option<StDType> {
        ST_DTYPES.iter().position(|(t, _)| *t == tag).map(StDType)
    }

    fn of(dtype: DType) -> StDType {
        // Every DType has a safetensors tag, so this always finds one.
        StDType::from_tag(dtype.safetensors_name()).unwrap_or(StDType(0))
    }

    fn tag(self) -> &'static str {
        ST_DTYPES[self.0].0
    }

    fn bits(self) -> usize {
        ST_DTYPES[self.0].1
    }

    /// The ringjit dtype, if ringjit has one.
    fn dtype(self) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.safetensors_name() == self.tag())
    }

    /// Lower-case ringjit name where there is one ("bf16"), else the safetensors tag.
    fn display(self) -> String {
        self.dtype()
            .map_or_else(|| self.tag().to_string(), |d| d.name().to_string())
    }
}

fn shape_str(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

// ---- reading ---------------------------------------------------------------------------------

/// One memory-mapped safetensors file.
#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

/// Where one tensor lives: `map[start..end]` of `files[file]`.
#[derive(Debug)]
struct Entry {
    file: usize,
    dtype: StDType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The JSON header entry of one tensor.
#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// A tensor of a parsed safetensors file, before it is given its file index.
struct Parsed {
    name: String,
    dtype: StDType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Memory-maps `path` and checks its safetensors header (see [`parse_safetensors`]).
fn map_safetensors(path: &Path) -> Result<(Mmap, Vec<Parsed>)> {
    let file = File::open(path).map_err(io_err(path))?;
    let size = file.metadata().map_err(io_err(path))?.len();
    if size < 8 {
        // Too short to hold the header length (and mapping an empty file can fail).
        return Err(CheckpointError::Truncated {
            file: path.to_path_buf(),
            needed: 8,
            size,
        });
    }
    // SAFETY: the map is only read. As with every memory-mapped file, another process
    // truncating the file while it is mapped would make later reads fault; checkpoints are
    // not modified in place (they are written atomically into a fresh directory).
    let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    let parsed = parse_safetensors(path, &map)?;
    Ok((map, parsed))
}

/// Checks the safetensors file `bytes` (read from `path`, named in errors): the header length,
/// the JSON, each tensor's dtype and byte length, and that the tensors tile the data exactly.
/// Reads only the header. The ranges returned are within `bytes`.
fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<Vec<Parsed>> {
    let size = bytes.len() as u64;
    let truncated = |needed: u64| CheckpointError::Truncated {
        file: path.to_path_buf(),
        needed,
        size,
    };
    let corrupt = |msg: String| CheckpointError::CorruptHeader {
        file: path.to_path_buf(),
        msg,
    };
    let bad = |tensor: &str, msg: String| CheckpointError::BadTensor {
        file: path.to_path_buf(),
        tensor: tensor.to_string(),
        msg,
    };
    if size < 8 {
        return Err(truncated(8));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > size - 8 {
        return Err(CheckpointError::HeaderPastEof {
            file: path.to_path_buf(),
            header_len,
            size,
        });
    }
    let data_start = 8 + header_len as usize;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| corrupt(format!("not a JSON object: {e}")))?;

    let mut tensors = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            if !value.is_object() {
                return Err(corrupt("`__metadata__` is not an object".into()));
            }
            continue;
        }
        let entry: HeaderEntry =
            serde_json::from_value(value).map_err(|e| bad(&name, format!("bad header entry: {e}")))?;
        let dtype =
            StDType::from_tag(&entry.dtype).ok_or_else(|| bad(&name, format!("unknown dtype \"{}\"", entry.dtype)))?;
        let [begin, end] = entry.data_offsets;
        if end < begin {
            return Err(bad(&name, format!("data_offsets [{begin}, {end}] run backwards")));
        }
        let bits = entry
            .shape
            .iter()
            .try_fold(dtype.bits() as u64, |acc, &d| acc.checked_mul(d as u64))
            .filter(|bits| bits % 8 == 0)
            .ok_or_else(|| {
                bad(
                    &name,
                    format!(
                        "shape {} of {} is not a whole number of bytes",
                        shape_str(&entry.shape),
                        dtype.tag()
                    ),
                )
            })?;
        if end - begin != bits / 8 {
            return Err(bad(
                &name,
                format!(
                    "holds {} bytes, but shape {} of {} needs {}",
                    end - begin,
                    shape_str(&entry.shape),
                    dtype.tag(),
                    bits / 8
                ),
            ));
        }
        // Offsets are checked against the file below; until then keep them as u64.
        tensors.push((name, dtype, entry.shape, begin, end));
    }

    // The tensors must tile [0, data length) in offset order: no overlap, no gap.
    tensors.sort_by_key(|t| (t.3, t.4));
    let mut covered = 0u64;
    let mut previous: Option<&str> = None;
    for (name, _, _, begin, end) in &tensors {
        if *begin != covered {
            let what = if *begin < covered {
                "overlaps"
            } else {
                "leaves a gap after"
            };
            let prev = previous.map_or("the start of the data".to_string(), |p| format!("tensor {p}"));
            return Err(bad(
                name,
                format!("data_offsets [{begin}, {end}] {what} {prev} (which ends at {covered})"),
            ));
        }
        covered = *end;
        previous = Some(name);
    }
    let data_len = size - 8 - header_len;
    if covered > data_len {
        return Err(truncated(8 + header_len + covered));
    }
    if covered < data_len {
        return Err(corrupt(format!(
            "the tensors end {covered} bytes into the data, but the file has {} bytes of data after the header",
            data_len
        )));
    }
    Ok(tensors
        .into_iter()
        .map(|(name, dtype, shape, begin, end)| Parsed {
            name,
            dtype,
            shape,
            // Both are at most the file size, which fits in memory.
            start: data_start + begin as usize,
            end: data_start + end as usize,
        })
        .collect())
}

/// A checkpoint folder in the HF layout, memory-mapped. Tensor data is read only by
/// [`Checkpoint::load`] and [`Checkpoint::raw`].
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: Value,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, Entry>,
    total_bytes: u64,
}

impl Checkpoint {
    /// Opens the model folder `dir`: `config.json`, then `model.safetensors` or, failing that,
    /// `model.safetensors.index.json` and the shards it names. Every file's header is checked;
    /// the data is mapped but not read.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            return Err(CheckpointError::NoDirectory { dir: dir.to_path_buf() });
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(CheckpointError::NoConfig { dir: dir.to_path_buf() });
        }
        let config = read_json(&config_path)?;

        let mut ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            files: Vec::new(),
            tensors: BTreeMap::new(),
            total_bytes: 0,
        };
        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        if single.is_file() {
            ckpt.add_file(&single)?;
        } else if index_path.is_file() {
            ckpt.add_shards(&index_path)?;
        } else {
            return Err(CheckpointError::NoWeights { dir: dir.to_path_buf() });
        }
        Ok(ckpt)
    }

    /// Maps one safetensors file and records its tensors; returns its file index.
    fn add_file(&mut self, path: &Path) -> Result<usize> {
        let (map, parsed) = map_safetensors(path)?;
        let file = self.files.len();
        for p in parsed {
            if let Some(prev) = self.tensors.get(&p.name) {
                return Err(CheckpointError::DuplicateTensor {
                    tensor: p.name,
                    first: self.files[prev.file].path.clone(),
                    second: path.to_path_buf(),
                });
            }
            self.total_bytes += (p.end - p.start) as u64;
            let entry = Entry {
                file,
                dtype: p.dtype,
                shape: p.shape,
                start: p.start,
                end: p.end,
            };
            self.tensors.insert(p.name, entry);
        }
        self.files.push(MappedFile {
            path: path.to_path_buf(),
            map,
        });
        Ok(file)
    }

    fn add_shards(&mut self, index_path: &Path) -> Result<()> {
        let bad_index = |msg: String| CheckpointError::BadJson {
            path: index_path.to_path_buf(),
            msg,
        };
        let index = read_json(index_path)?;
        let weight_map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad_index("no `weight_map` object".into()))?;
        // shard file name -> tensors the index puts there
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in weight_map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad_index(format!("weight_map entry for {tensor} is not a file name")))?;
            if shard.is_empty() || shard.contains(['/', '\\']) || shard == "." || shard == ".." {
                return Err(bad_index(format!(
                    "weight_map puts {tensor} in \"{shard}\", which is not a file name in the folder"
                )));
            }
            shards.entry(shard).or_default().push(tensor);
        }
        for (shard, tensors) in shards {
            let path = self.dir.join(shard);
            if !path.is_file() {
                return Err(CheckpointError::MissingShard {
                    index: index_path.to_path_buf(),
                    shard: shard.to_string(),
                    count: tensors.len(),
                    example: tensors[0].to_string(),
                });
            }
            let file = self.add_file(&path)?;
            for tensor in tensors {
                if self.tensors.get(tensor).is_none_or(|e| e.file != file) {
                    return Err(CheckpointError::NotInShard {
                        index: index_path.to_path_buf(),
                        tensor: tensor.to_string(),
                        shard: shard.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The folder this checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json`, as parsed.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// The safetensors files, in the order they were opened.
    pub fn files(&self) -> impl ExactSizeIterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// Every tensor name in the checkpoint, sorted.
    pub fn tensor_names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Bytes of tensor data over all files (headers not counted).
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// One tensor as stored: dtype, shape and its little-endian bytes (borrowed from the map).
    pub fn raw(&self, name: &str) -> Result<(DType, &[usize], &[u8])> {
        let e = self.entry(name)?;
        let dtype = e.dtype.dtype().ok_or_else(|| CheckpointError::UnknownDType {
            tensor: name.to_string(),
            found: e.dtype.tag().to_string(),
        })?;
        Ok((dtype, &e.shape, self.bytes(e)))
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| CheckpointError::NotFound {
            dir: self.dir.clone(),
            tensor: name.to_string(),
        })
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        &self.files[e.file].map[e.start..e.end]
    }

    /// Checks the checkpoint against the parameters a model needs and reports every problem
    /// at once, one line per tensor: missing tensors, unexpected tensors (other than the ones
    /// the Ring loaders skip, see [`skipped_by_loaders`]), wrong shapes and wrong dtypes.
    /// Stacked parameters are checked member by member.
    pub fn validate(&self, specs: &[ParamSpec]) -> Result<()> {
        let mut problems = Vec::new();
        let mut needed = HashSet::new();
        for spec in specs {
            let (names, member_shape) = match spec_members(spec) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            for name in names {
                match self.tensors.get(&name) {
                    None => problems.push(format!(
                        "missing tensor {name} (expected {} {})",
                        spec.dtype,
                        shape_str(member_shape)
                    )),
                    Some(e) => {
                        if e.shape != member_shape {
                            problems.push(format!(
                                "wrong shape for {name}: expected {}, found {}",
                                shape_str(member_shape),
                                shape_str(&e.shape)
                            ));
                        }
                        if e.dtype != StDType::of(spec.dtype) {
                            problems.push(format!(
                                "wrong dtype for {name}: expected {}, found {}",
                                spec.dtype,
                                e.dtype.display()
                            ));
                        }
                    }
                }
                needed.insert(name);
            }
        }
        for (name, e) in &self.tensors {
            if !needed.contains(name) && !skipped_by_loaders(name) {
                problems.push(format!(
                    "unexpected tensor {name} ({} {})",
                    e.dtype.display(),
                    shape_str(&e.shape)
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::Mismatch {
                dir: self.dir.clone(),
                problems,
            })
        }
    }

    /// One parameter as a tensor of `spec.dtype` (a stack's members stacked along a new leading
    /// axis), converted from the stored F32, BF16 or F16 and rounded to `spec.dtype`.
    pub fn load(&self, spec: &ParamSpec) -> Result<Tensor> {
        self.load_counting(spec, &mut |_| {})
    }

    /// Loads every parameter, in spec order, calling `progress(done_bytes, total_bytes)` at the
    /// start and after each checkpoint tensor (bytes as stored).
    pub fn load_all(&self, specs: &[ParamSpec], progress: &mut dyn FnMut(u64, u64)) -> Result<Vec<Tensor>> {
        let total: u64 = specs
            .iter()
            .flat_map(ParamSpec::member_names)
            .filter_map(|n| self.tensors.get(&n))
            .map(|e| (e.end - e.start) as u64)
            .sum();
        let mut done = 0u64;
        progress(0, total);
        specs
            .iter()
            .map(|spec| {
                self.load_counting(spec, &mut |bytes| {
                    done += bytes;
                    progress(done, total);
                })
            })
            .collect()
    }

    fn load_counting(&self, spec: &ParamSpec, loaded: &mut dyn FnMut(u64)) -> Result<Tensor> {
        if !spec.dtype.is_float() {
            return Err(CheckpointError::BadSpec {
                name: spec.name.clone(),
                msg: format!("only float parameters can be loaded, not {}", spec.dtype),
            });
        }
        let (names, member_shape) = spec_members(spec)?;
        let member_numel: usize = member_shape.iter().product();
        let mut data = vec![0f32; member_numel * names.len()];
        for (i, name) in names.iter().enumerate() {
            let out = &mut data[i * member_numel..(i + 1) * member_numel];
            let e = self.entry(name)?;
            if e.shape != member_shape {
                return Err(CheckpointError::Mismatch {
                    dir: self.dir.clone(),
                    problems: vec![format!(
                        "wrong shape for {name}: expected {}, found {}",
                        shape_str(member_shape),
                        shape_str(&e.shape)
                    )],
                });
            }
            let stored = e
                .dtype
                .dtype()
                .filter(|d| matches!(d, DType::F32 | DType::BF16 | DType::F16));
            let Some(stored) = stored else {
                return Err(CheckpointError::UnsupportedDType {
                    tensor: name.clone(),
                    found: e.dtype.tag().to_string(),
                });
            };
            let bytes = self.bytes(e);
            decode_floats(stored, bytes, out);
            if stored != spec.dtype && spec.dtype != DType::F32 {
                for x in out.iter_mut() {
                    *x = spec.dtype.round(*x);
                }
            }
            loaded(bytes.len() as u64);
        }
        Ok(Tensor {
            dtype: spec.dtype,
            shape: spec.shape.clone(),
            data: Data::F32(data),
        })
    }
}

/// Names the Ring loaders (SGLang, vLLM, mlx) skip, so [`Checkpoint::validate`] does not report
/// them as unexpected: the MTP layers (`model.mtp.*`), rotary `inv_freq` buffers and ALiBi-style
/// `slope` buffers.
pub fn skipped_by_loaders(name: &str) -> bool {
    name.starts_with("model.mtp.") || name.contains("inv_freq") || name.contains("slope")
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&text).map_err(|e| CheckpointError::BadJson {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}

/// The member names of a parameter and the shape of each, after checking that the spec is
/// consistent (a stack's leading dimension is its count, sizes do not overflow).
fn spec_members(spec: &ParamSpec) -> Result<(Vec<String>, &[usize])> {
    let bad = |msg: String| CheckpointError::BadSpec {
        name: spec.name.clone(),
        msg,
    };
    if let Some(stack) = &spec.stack {
        if spec.shape.first() != Some(&stack.count) {
            return Err(bad(format!(
                "a stack of {} over `{}` needs shape [{}, ...], not {}",
                stack.count,
                stack.var,
                stack.count,
                shape_str(&spec.shape)
            )));
        }
    }
    let bytes = spec
        .shape
        .iter()
        .try_fold(4usize, |acc, &d| acc.checked_mul(d))
        .filter(|&b| isize::try_from(b).is_ok());
    if bytes.is_none() {
        return Err(bad(format!("shape {} is too large", shape_str(&spec.shape))));
    }
    Ok((spec.member_names(), spec.member_shape()))
}

/// Decodes little-endian F32, BF16 or F16 `bytes` into `out` (same element count).
fn decode_floats(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        _ => unreachable!("decode_floats({dtype})"),
    }
}

/// Appends `values` to `out` as little-endian F32, BF16 or F16 (rounding to nearest even).
fn encode_floats(dtype: DType, values: &[f32], out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => values.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|&x| out.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|&x| out.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes())),
        _ => unreachable!("encode_floats({dtype})"),
    }
}

// ---- random weights --------------------------------------------------------------------------

/// Seeded random weights made in memory; the same values [`write_checkpoint`] writes to disk
/// with the same seed (when the checkpoint's dtype is the parameters' dtype).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomWeights {
    pub seed: u64,
    /// The HF config's `initializer_range`: the standard deviation of every matrix (Linear and
    /// Embedding weights), as HF initialises (and the model authors trained) these models.
    /// `None`: no range known, the fan-in initialisation of [`random_tensor`].
    pub initializer_range: Option<f32>,
}

impl RandomWeights {
    /// Weights without a known `initializer_range` (matrices N(0, 1/fan_in)).
    pub fn new(seed: u64) -> RandomWeights {
        RandomWeights {
            seed,
            initializer_range: None,
        }
    }

    /// Weights initialised as the HF `config` says: its `initializer_range` when present.
    pub fn from_config(seed: u64, config: &Value) -> RandomWeights {
        RandomWeights {
            seed,
            initializer_range: initializer_range(config),
        }
    }

    /// The parameter `spec` filled by [`random_tensor`].
    pub fn load(&self, spec: &ParamSpec) -> Result<Tensor> {
        if !spec.dtype.is_float() {
            return Err(CheckpointError::BadSpec {
                name: spec.name.clone(),
                msg: format!("only float parameters have random weights, not {}", spec.dtype),
            });
        }
        spec_members(spec)?;
        Ok(random_tensor_init(spec, self.seed, self.initializer_range))
    }
}

impl RandomWeights {
    /// The (mean, std) of the distribution parameter `spec` is drawn from (None: zeros), as
    /// [`random_tensor`] documents: for making equivalent random weights elsewhere (on a GPU).
    pub fn moments(&self, spec: &ParamSpec) -> Option<(f32, f32)> {
        init_std(&spec.name, spec.member_shape(), self.initializer_range)
    }
}

/// The `initializer_range` of an HF config, when it holds a positive number.
pub fn initializer_range(config: &Value) -> Option<f32> {
    config
        .get("initializer_range")
        .and_then(Value::as_f64)
        .filter(|&r| r > 0.0 && r.is_finite())
        .map(|r| r as f32)
}

/// 64-bit FNV-1a: a fixed hash, so random weights are the same in every run and on every
/// platform (std's `DefaultHasher` is randomly keyed).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// How a checkpoint tensor is initialised (see [`random_tensor`]).
fn init_std(name: &str, shape: &[usize], range: Option<f32>) -> Option<(f32, f32)> {
    if name.ends_with("expert_bias") {
        None
    } else if name.ends_with("norm.weight") {
        Some((1.0, 0.1))
    } else if let (Some(r), true) = (range, shape.len() >= 2) {
        // HF's `_init_weights`: Linear and Embedding weights alike
        Some((0.0, r))
    } else if name == "model.word_embeddings.weight" {
        Some((0.0, 1.0))
    } else if shape.len() >= 2 {
        let fan_in = shape[shape.len() - 1].max(1);
        Some((0.0, 1.0 / (fan_in as f32).sqrt()))
    } else {
        Some((0.0, 0.1))
    }
}

/// The random value stream of one checkpoint tensor (one stack member, or an unstacked
/// parameter), rounded to `dtype`; filling in pieces gives the same values as all at once.
struct Sampler {
    /// None for a tensor of zeros.
    rng: Option<ChaCha8Rng>,
    mean: f32,
    std: f32,
    dtype: DType,
}

impl Sampler {
    fn new(name: &str, shape: &[usize], dtype: DType, seed: u64, range: Option<f32>) -> Sampler {
        let (rng, (mean, std)) = match init_std(name, shape, range) {
            None => (None, (0.0, 0.0)),
            Some(ms) => {
                let key = fnv1a(&[&seed.to_le_bytes(), name.as_bytes()]);
                (Some(ChaCha8Rng::seed_from_u64(key)), ms)
            }
        };
        Sampler { rng, mean, std, dtype }
    }

    fn fill(&mut self, out: &mut [f32]) {
        let Some(rng) = &mut self.rng else {
            out.fill(0.0);
            return;
        };
        for x in out.iter_mut() {
            let z: f32 = rng.sample(StandardNormal);
            *x = self.dtype.round(self.mean + self.std * z);
        }
    }
}

/// Seeded random values for a parameter, rounded to `spec.dtype`. Every checkpoint tensor
/// (each stack member separately) has its own generator, ChaCha8 seeded with the FNV-1a hash
/// of `seed` and the tensor's full name, so a stack equals its members made one by one, and a
/// checkpoint written by [`write_checkpoint`] holds the same values (for a config without an
/// `initializer_range`; [`random_tensor_init`] is the same with one).
///
/// Distributions, by name:
/// - `*expert_bias` → 0 (a freshly initialised router bias is zero);
/// - `*norm.weight` (every RMSNorm weight: `*layernorm.weight`, `g_norm`, `model.norm`) →
///   1 + N(0, 0.1²): not exactly 1, so a test notices a norm weight that is misapplied or
///   applied to the wrong tensor;
/// - `model.word_embeddings.weight` → N(0, 1), so the first RMSNorm sees unit-scale input;
/// - every other matrix → N(0, 1/fan_in), fan_in its last dimension (weights are
///   `[out, in]`), which keeps activations at unit scale through the layers (and makes a
///   deep random model chaotic: use the config's `initializer_range` where there is one);
/// - any other vector (Ring has none) → N(0, 0.1²).
///
/// Parameters that are not floats come back as zeros. Panics if the spec is inconsistent
/// (a stack whose leading dimension is not its count); [`RandomWeights::load`] reports that
/// as an error instead.
pub fn random_tensor(spec: &ParamSpec, seed: u64) -> Tensor {
    random_tensor_init(spec, seed, None)
}

/// [`random_tensor`] with an HF `initializer_range` (`Some(r)`): then every matrix, the
/// embedding and the LM head included, is N(0, r²) instead (norm weights and the expert bias
/// as in [`random_tensor`]). Ring-linear's configs say 0.02; with it the residual stream grows
/// slowly through the layers, as in the trained models, where the fan-in initialisation makes
/// a random model chaotic (a perturbation grows ×1.5–2 per layer).
pub fn random_tensor_init(spec: &ParamSpec, seed: u64, range: Option<f32>) -> Tensor {
    if !spec.dtype.is_float() {
        return Tensor::zeros(spec.dtype, spec.shape.clone());
    }
    let (names, member_shape) = spec_members(spec).unwrap_or_else(|e| panic!("{e}"));
    let member_numel: usize = member_shape.iter().product();
    let mut data = vec![0f32; member_numel * names.len()];
    for (i, name) in names.iter().enumerate() {
        let out = &mut data[i * member_numel..(i + 1) * member_numel];
        Sampler::new(name, member_shape, spec.dtype, seed, range).fill(out);
    }
    Tensor {
        dtype: spec.dtype,
        shape: spec.shape.clone(),
        data: Data::F32(data),
    }
}

// ---- writing ---------------------------------------------------------------------------------

/// One checkpoint tensor to write.
struct Planned {
    name: String,
    shape: Vec<usize>,
    /// The parameter's dtype: the random values are rounded to it first.
    spec_dtype: DType,
    /// The dtype written.
    dtype: DType,
    bytes: u64,
}

/// The safetensors header for `tensors`, in the given (data) order, exactly as the Python
/// `safetensors` library writes it: compact JSON, `__metadata__` first, padded with spaces to a
/// multiple of 8 bytes.
fn safetensors_header(tensors: &[&Planned]) -> Vec<u8> {
    let mut s = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0u64;
    for t in tensors {
        let dims: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        let _ = write!(
            s,
            r#",{}:{{"dtype":"{}","shape":[{}],"data_offsets":[{},{}]}}"#,
            Value::String(t.name.clone()),
            t.dtype.safetensors_name(),
            dims.join(","),
            offset,
            offset + t.bytes
        );
        offset += t.bytes;
    }
    s.push('}');
    let mut bytes = s.into_bytes();
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    bytes
}

/// The tensors to write, sorted by name, after checking the specs.
fn plan(specs: &[ParamSpec], dtype: DType) -> Result<Vec<Planned>> {
    let mut planned = Vec::new();
    for spec in specs {
        if !spec.dtype.is_float() {
            return Err(CheckpointError::BadSpec {
                name: spec.name.clone(),
                msg: format!("only float parameters can be written, not {}", spec.dtype),
            });
        }
        let (names, member_shape) = spec_members(spec)?;
        let out = if spec.dtype == DType::F32 && spec.name.ends_with("expert_bias") {
            DType::F32
        } else {
            dtype
        };
        let bytes = (member_shape.iter().product::<usize>() * out.size_bytes()) as u64;
        for name in names {
            planned.push(Planned {
                name,
                shape: member_shape.to_vec(),
                spec_dtype: spec.dtype,
                dtype: out,
                bytes,
            });
        }
    }
    planned.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = planned.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(CheckpointError::BadSpec {
            name: w[0].name.clone(),
            msg: "two parameters write this tensor".into(),
        });
    }
    Ok(planned)
}

/// Splits the name-sorted tensors into shards of at most `max_bytes` (a bigger tensor gets a
/// shard of its own), as `transformers` does.
fn split_shards(planned: &[Planned], max_bytes: u64) -> Vec<Vec<&Planned>> {
    let mut shards: Vec<Vec<&Planned>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in planned {
        let current = shards.len() - 1;
        if !shards[current].is_empty() && size + t.bytes > max_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += t.bytes;
        let current = shards.len() - 1;
        shards[current].push(t);
    }
    shards
}

/// Writes a random checkpoint (the values of [`RandomWeights::from_config`]`(seed, config)`: the
/// config's `initializer_range` when it has one, else [`random_tensor`]'s) into the new folder
/// `dir` in the HF layout: `config.json` (`config` with `torch_dtype` set to match `dtype`) and
/// the parameters' tensors under their HF names, stacks as their members, stored in `dtype`
/// except F32 `*expert_bias` tensors, which stay F32. One `model.safetensors` if the tensors
/// total at most `max_shard_bytes`, else `model-0000i-of-0000N.safetensors` shards and
/// `model.safetensors.index.json`. Within a file the tensors are in name order, the wider dtype
/// first (the order of the `safetensors` library, which keeps every tensor aligned).
///
/// The folder appears atomically: everything is written into `DIR.tmp-<pid>` beside it, which
/// is renamed to `dir` at the end and removed on failure. `dir` must not exist or be empty.
/// Tensors are generated and written one at a time (several generated in parallel), never the
/// whole model at once. `progress(done_bytes, total_bytes)` is called at the start and after
/// each tensor.
pub fn write_checkpoint(
    dir: &Path,
    config: &Value,
    specs: &[ParamSpec],
    seed: u64,
    dtype: DType,
    max_shard_bytes: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => return Err(CheckpointError::BadOutputDType { dtype }),
    };
    let mut config = config.clone();
    let Some(obj) = config.as_object_mut() else {
        let found = match config {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        };
        return Err(CheckpointError::BadConfig { found: found.into() });
    };
    obj.insert("torch_dtype".into(), Value::String(torch_dtype.into()));
    let planned = plan(specs, dtype)?;

    if dir.exists() {
        let empty = dir.is_dir() && fs::read_dir(dir).map_err(io_err(dir))?.next().is_none();
        if !empty {
            return Err(CheckpointError::OutputExists { dir: dir.to_path_buf() });
        }
    }
    let Some(file_name) = dir.file_name() else {
        return Err(CheckpointError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a folder name"),
        });
    };
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = parent.join(tmp_name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;

    let init = RandomWeights::from_config(seed, &config);
    let written = write_files(&tmp, &config, &planned, init, max_shard_bytes, progress)
        .and_then(|()| fs::rename(&tmp, dir).map_err(io_err(dir)));
    if written.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    } else if let Ok(d) = File::open(parent) {
        // Make the rename durable; not every platform can sync a directory.
        let _ = d.sync_all();
    }
    written
}

fn write_files(
    dir: &Path,
    config: &Value,
    planned: &[Planned],
    init: RandomWeights,
    max_shard_bytes: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let config_path = dir.join(CONFIG_FILE);
    let mut text = serde_json::to_string_pretty(config).unwrap_or_default();
    text.push('\n');
    fs::write(&config_path, text).map_err(io_err(&config_path))?;

    let total: u64 = planned.iter().map(|t| t.bytes).sum();
    let mut done = 0u64;
    progress(0, total);
    if total <= max_shard_bytes {
        let all: Vec<&Planned> = planned.iter().collect();
        return write_safetensors(&dir.join(SINGLE_FILE), all, init, &mut |b| {
            done += b;
            progress(done, total);
        });
    }

    let shards = split_shards(planned, max_shard_bytes);
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file_name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for t in &shard {
            weight_map.insert(t.name.clone(), Value::String(file_name.clone()));
        }
        write_safetensors(&dir.join(&file_name), shard, init, &mut |b| {
            done += b;
            progress(done, total);
        })?;
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    let index_path = dir.join(INDEX_FILE);
    let mut text = serde_json::to_string_pretty(&index).unwrap_or_default();
    text.push('\n');
    fs::write(&index_path, text).map_err(io_err(&index_path))
}

/// Writes one safetensors file, generating the tensors' values a batch at a time (one tensor
/// per thread) and streaming them to disk.
fn write_safetensors(
    path: &Path,
    mut tensors: Vec<&Planned>,
    init: RandomWeights,
    written: &mut dyn FnMut(u64),
) -> Result<()> {
    tensors.sort_by(|a, b| {
        StDType::of(b.dtype)
            .cmp(&StDType::of(a.dtype))
            .then(a.name.cmp(&b.name))
    });
    let header = safetensors_header(&tensors);
    let file = File::create(path).map_err(io_err(path))?;
    let mut w = BufWriter::with_capacity(1 << 22, file);
    let io = io_err(path);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    let result = (|| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for batch in tensors.chunks(threads) {
            let encoded: Vec<Vec<u8>> = if batch.len() == 1 {
                vec![random_bytes(batch[0], init)]
            } else {
                std::thread::scope(|s| {
                    let handles: Vec<_> = batch.iter().map(|&t| s.spawn(move || random_bytes(t, init))).collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                        .collect()
                })
            };
            for bytes in encoded {
                w.write_all(&bytes)?;
                written(bytes.len() as u64);
            }
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    result.map_err(io)
}

/// The stored bytes of one planned tensor's random values, generated in pieces so that only
/// the stored form of the whole tensor is held.
fn random_bytes(t: &Planned, init: RandomWeights) -> Vec<u8> {
    let mut sampler = Sampler::new(&t.name, &t.shape, t.spec_dtype, init.seed, init.initializer_range);
    let mut left: usize = t.shape.iter().product();
    let mut out = Vec::with_capacity(left * t.dtype.size_bytes());
    let mut piece = vec![0f32; left.min(1 << 16)];
    while left > 0 {
        let n = left.min(piece.len());
        sampler.fill(&mut piece[..n]);
        encode_floats(t.dtype, &piece[..n], &mut out);
        left -= n;
    }
    out
}

impl crate::interp::ParamSource for Checkpoint {
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
        Checkpoint::load(self, spec).map_err(|e| e.to_string())
    }
}

impl crate::interp::ParamSource for RandomWeights {
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
        RandomWeights::load(self, spec).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Stack;
    use serde_json::json;

    fn spec(name: &str, dtype: DType, shape: &[usize]) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            stack: None,
            dtype,
            shape: shape.to_vec(),
        }
    }

    fn stacked(name: &str, var: &str, dtype: DType, shape: &[usize]) -> ParamSpec {
        let stack = Some(Stack {
            var: var.into(),
            count: shape[0],
        });
        ParamSpec {
            name: name.into(),
            stack,
            dtype,
            shape: shape.to_vec(),
        }
    }

    const EXPERTS: &str = "model.layers.1.mlp.experts.{e}.gate_proj.weight";

    /// A small model: every kind of tensor (embedding, norms, matrices, an F32 expert bias and
    /// a stack of experts).
    fn tiny_specs(dtype: DType) -> Vec<ParamSpec> {
        vec![
            spec("model.word_embeddings.weight", dtype, &[16, 8]),
            spec("model.norm.weight", dtype, &[8]),
            spec("model.layers.0.attention.g_norm.weight", dtype, &[8]),
            spec("model.layers.0.attention.query_key_value.weight", dtype, &[24, 8]),
            spec("model.layers.1.mlp.gate.expert_bias", DType::F32, &[4]),
            stacked(EXPERTS, "e", dtype, &[4, 6, 8]),
            spec("lm_head.weight", dtype, &[16, 8]),
        ]
    }

    fn config() -> Value {
        json!({"model_type": "bailing_moe_linear", "hidden_size": 8, "torch_dtype": "float64"})
    }

    fn write(dir: &Path, specs: &[ParamSpec], dtype: DType, max_shard_bytes: u64) -> Result<()> {
        write_checkpoint(dir, &config(), specs, 7, dtype, max_shard_bytes, &mut |_, _| {})
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn values(t: &Tensor) -> &[f32] {
        t.as_f32().unwrap()
    }

    fn round_trip(dtype: DType) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let specs = tiny_specs(dtype);
        let mut calls = Vec::new();
        write_checkpoint(&dir, &config(), &specs, 7, dtype, u64::MAX, &mut |d, t| {
            calls.push((d, t))
        })
        .unwrap();
        assert_eq!(entries(tmp.path()), ["ckpt"], "temporary folder left behind");
        assert_eq!(entries(&dir), [CONFIG_FILE, SINGLE_FILE]);

        let size = dtype.size_bytes() as u64;
        let total = (16 * 8 * 2 + 8 * 2 + 24 * 8 + 4 * 6 * 8) * size + 4 * 4;
        assert_eq!(calls.first(), Some(&(0, total)));
        assert_eq!(calls.last(), Some(&(total, total)));
        assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));

        let ck = Checkpoint::open(&dir).unwrap();
        let torch = if dtype == DType::F32 { "float32" } else { "bfloat16" };
        assert_eq!(ck.config()["torch_dtype"], torch);
        assert_eq!(ck.config()["hidden_size"], 8);
        assert_eq!(ck.total_bytes(), total);
        assert_eq!(ck.tensor_names().len(), 10);
        assert!(ck.contains("model.layers.1.mlp.experts.3.gate_proj.weight"));
        ck.validate(&specs).unwrap();

        let (bias_dtype, bias_shape, bias_bytes) = ck.raw("model.layers.1.mlp.gate.expert_bias").unwrap();
        assert_eq!(
            (bias_dtype, bias_shape, bias_bytes),
            (DType::F32, &[4][..], &[0u8; 16][..])
        );
        let (emb_dtype, emb_shape, emb_bytes) = ck.raw("model.word_embeddings.weight").unwrap();
        assert_eq!(
            (emb_dtype, emb_shape, emb_bytes.len()),
            (dtype, &[16, 8][..], 128 * dtype.size_bytes())
        );

        let random = RandomWeights::new(7);
        for s in &specs {
            let t = ck.load(s).unwrap();
            assert_eq!(t, random_tensor(s, 7), "{}", s.name);
            assert_eq!(t, random.load(s).unwrap(), "{}", s.name);
            assert_eq!((t.dtype, &t.shape), (s.dtype, &s.shape));
        }

        let mut seen = Vec::new();
        let all = ck.load_all(&specs, &mut |d, t| seen.push((d, t))).unwrap();
        assert_eq!(all.len(), specs.len());
        assert_eq!(all[5], random_tensor(&specs[5], 7));
        assert_eq!(seen.first(), Some(&(0, total)));
        assert_eq!(seen.last(), Some(&(total, total)));
        assert_eq!(seen.len(), 11);
    }

    #[test]
    fn round_trip_f32() {
        round_trip(DType::F32);
    }

    #[test]
    fn round_trip_bf16() {
        round_trip(DType::BF16);
    }

    #[test]
    fn sharded_checkpoint_loads_back_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let specs = tiny_specs(DType::BF16);
        let single = tmp.path().join("single");
        let sharded = tmp.path().join("sharded");
        write(&single, &specs, DType::BF16, u64::MAX).unwrap();
        write(&sharded, &specs, DType::BF16, 200).unwrap();

        let files = entries(&sharded);
        let n = files.iter().filter(|f| f.ends_with(".safetensors")).count();
        assert!(n > 3, "{files:?}");
        assert!(files.contains(&format!("model-00001-of-{n:05}.safetensors")));
        assert!(files.contains(&format!("model-{n:05}-of-{n:05}.safetensors")));
        assert!(files.contains(&INDEX_FILE.to_string()));
        assert!(!files.contains(&SINGLE_FILE.to_string()));

        let a = Checkpoint::open(&single).unwrap();
        let b = Checkpoint::open(&sharded).unwrap();
        assert_eq!(b.files().len(), n);
        assert_eq!(a.total_bytes(), b.total_bytes());
        assert!(a.tensor_names().eq(b.tensor_names()));
        b.validate(&specs).unwrap();
        for s in &specs {
            assert_eq!(a.load(s).unwrap(), b.load(s).unwrap(), "{}", s.name);
        }

        let index: Value = serde_json::from_slice(&fs::read(sharded.join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], b.total_bytes());
        let weight_map = index["weight_map"].as_object().unwrap();
        assert!(weight_map.keys().map(String::as_str).eq(b.tensor_names()));
        // Every shard but a lone oversized tensor's stays within the limit.
        for f in b.files() {
            let (_, parsed) = map_safetensors(f).unwrap();
            let bytes: usize = parsed.iter().map(|p| p.end - p.start).sum();
            assert!(bytes <= 200 || parsed.len() == 1, "{}: {bytes}", f.display());
        }
    }

    #[test]
    fn header_is_what_python_safetensors_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let specs = [
            spec("a.weight", DType::BF16, &[2, 2]),
            spec("b.expert_bias", DType::F32, &[2]),
        ];
        write(&dir, &specs, DType::BF16, u64::MAX).unwrap();
        let bytes = fs::read(dir.join(SINGLE_FILE)).unwrap();
        // F32 before BF16 (widest dtype first), then by name.
        let json = r#"{"__metadata__":{"format":"pt"},"b.expert_bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a.weight":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]}}"#;
        let n = json.len().next_multiple_of(8);
        assert_eq!(bytes[..8], (n as u64).to_le_bytes());
        assert_eq!(&bytes[8..8 + json.len()], json.as_bytes());
        assert!(bytes[8 + json.len()..8 + n].iter().all(|&b| b == b' '));
        assert_eq!(bytes.len(), 8 + n + 16);
        assert_eq!(bytes[8 + n..8 + n + 8], [0; 8]);

        let config: Value = serde_json::from_slice(&fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], "bfloat16");
        assert!(fs::read_to_string(dir.join(CONFIG_FILE))
            .unwrap()
            .contains("\n  \"hidden_size\": 8"));
    }

    #[test]
    fn load_converts_and_rounds_to_the_spec_dtype() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let f32_specs = tiny_specs(DType::F32);
        write(&dir, &f32_specs, DType::F32, u64::MAX).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        for (s32, s16) in f32_specs.iter().zip(tiny_specs(DType::BF16)) {
            let t = ck.load(&s16).unwrap();
            assert_eq!(t.dtype, s16.dtype);
            let want: Vec<f32> = values(&random_tensor(s32, 7))
                .iter()
                .map(|&x| s16.dtype.round(x))
                .collect();
            assert_eq!(values(&t), &want[..], "{}", s16.name);
        }
        // A bf16 checkpoint read into f32 parameters is exact.
        let dir16 = tmp.path().join("ckpt16");
        write(&dir16, &tiny_specs(DType::BF16), DType::BF16, u64::MAX).unwrap();
        let ck16 = Checkpoint::open(&dir16).unwrap();
        let emb = &tiny_specs(DType::BF16)[0];
        assert_eq!(
            values(&ck16.load(&f32_specs[0]).unwrap()),
            values(&random_tensor(emb, 7))
        );
        // Mismatched shapes are refused.
        let wrong = spec("model.norm.weight", DType::BF16, &[9]);
        let err = ck16.load(&wrong).unwrap_err().to_string();
        assert!(
            err.contains("wrong shape for model.norm.weight: expected [9], found [8]"),
            "{err}"
        );
        let err = ck16
            .load(&spec("model.nope", DType::BF16, &[1]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no tensor named model.nope"), "{err}");
    }

    #[test]
    fn random_stack_equals_its_members() {
        let stack = stacked(EXPERTS, "e", DType::BF16, &[5, 3, 4]);
        let whole = random_tensor(&stack, 11);
        let mut members = Vec::new();
        for name in stack.member_names() {
            let t = random_tensor(&spec(&name, DType::BF16, &[3, 4]), 11);
            members.extend_from_slice(values(&t));
        }
        assert_eq!(values(&whole), &members[..]);
        assert_eq!(whole.shape, [5, 3, 4]);
        // Members differ from each other.
        assert_ne!(values(&whole)[..12], values(&whole)[12..24]);
    }

    #[test]
    fn random_weights_are_seeded_and_shaped_by_name() {
        let m = spec("model.layers.0.mlp.down_proj.weight", DType::F32, &[256, 64]);
        let a = random_tensor(&m, 1);
        assert_eq!(a, random_tensor(&m, 1));
        assert_ne!(a, random_tensor(&m, 2));
        assert!(values(&a).iter().any(|&x| x != 0.0));
        let std =
            |v: &[f32], mean: f32| (v.iter().map(|&x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32).sqrt();
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((std(values(&a), 0.0) - 0.125).abs() < 0.01, "1/sqrt(64)");

        let emb = random_tensor(&spec("model.word_embeddings.weight", DType::F32, &[128, 64]), 1);
        assert!((std(values(&emb), 0.0) - 1.0).abs() < 0.05);

        for name in [
            "model.norm.weight",
            "model.layers.0.attention.g_norm.weight",
            "model.layers.2.input_layernorm.weight",
        ] {
            let t = random_tensor(&spec(name, DType::BF16, &[4096]), 1);
            let v = values(&t);
            assert!((mean(v) - 1.0).abs() < 0.01, "{name}");
            assert!((std(v, 1.0) - 0.1).abs() < 0.01, "{name}");
            assert!(v.iter().any(|&x| x != 1.0));
            assert!(v.iter().all(|&x| DType::BF16.round(x) == x), "{name}: rounded to bf16");
        }

        let bias = RandomWeights::new(3)
            .load(&spec("model.layers.1.mlp.gate.expert_bias", DType::F32, &[256]))
            .unwrap();
        assert!(values(&bias).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn random_weights_follow_the_configs_initializer_range() {
        let std =
            |v: &[f32], mean: f32| (v.iter().map(|&x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32).sqrt();
        let hf = RandomWeights::from_config(1, &json!({"initializer_range": 0.02, "hidden_size": 64}));
        assert_eq!(hf.initializer_range, Some(0.02));
        assert_eq!(RandomWeights::from_config(1, &config()), RandomWeights::new(1));
        assert_eq!(
            RandomWeights::from_config(1, &json!({"initializer_range": null})).initializer_range,
            None
        );
        // every matrix: Linear weights, the router, the embedding and the LM head
        for (name, shape) in [
            ("model.layers.0.mlp.down_proj.weight", &[256, 64][..]),
            ("model.layers.1.mlp.gate.weight", &[64, 256]),
            ("model.word_embeddings.weight", &[128, 64]),
            ("lm_head.weight", &[128, 64]),
        ] {
            let t = hf.load(&spec(name, DType::F32, shape)).unwrap();
            let s = std(values(&t), 0.0);
            assert!((s - 0.02).abs() < 0.001, "{name}: std {s}");
        }
        let experts = hf.load(&stacked(EXPERTS, "e", DType::BF16, &[4, 64, 64])).unwrap();
        assert!((std(values(&experts), 0.0) - 0.02).abs() < 0.001);
        // norm weights stay near 1, the expert bias 0, whatever the range
        let norm = hf.load(&spec("model.norm.weight", DType::F32, &[4096])).unwrap();
        assert!((std(values(&norm), 1.0) - 0.1).abs() < 0.01);
        let bias = hf
            .load(&spec("model.layers.1.mlp.gate.expert_bias", DType::F32, &[256]))
            .unwrap();
        assert!(values(&bias).iter().all(|&x| x == 0.0));
        // a checkpoint written with that config holds the same values
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let mut cfg = config();
        cfg["initializer_range"] = json!(0.02);
        let specs = tiny_specs(DType::BF16);
        write_checkpoint(&dir, &cfg, &specs, 7, DType::BF16, u64::MAX, &mut |_, _| {}).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        let hf7 = RandomWeights::from_config(7, &cfg);
        for s in &specs {
            assert_eq!(ck.load(s).unwrap(), hf7.load(s).unwrap(), "{}", s.name);
        }
        let emb = ck.load(&specs[0]).unwrap();
        assert_ne!(emb, random_tensor(&specs[0], 7), "the range was applied");
    }

    #[test]
    fn validate_reports_every_mismatch_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let mut written = tiny_specs(DType::BF16);
        written.push(spec("model.mtp.layers.0.weight", DType::BF16, &[2]));
        written.push(spec("model.layers.0.attention.rotary_emb.inv_freq", DType::BF16, &[2]));
        written.push(spec("model.layers.0.attention.slope", DType::BF16, &[2]));
        write(&dir, &written, DType::BF16, u64::MAX).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();

        let mut wanted = tiny_specs(DType::BF16);
        wanted[1].shape = vec![9]; // model.norm.weight: wrong shape
        wanted[3].dtype = DType::F32; // query_key_value: wrong dtype
        wanted[5] = stacked(EXPERTS, "e", DType::BF16, &[5, 6, 8]); // expert 4 missing
        wanted.remove(6); // lm_head.weight: unexpected
        wanted.push(spec("model.layers.0.attention.dense.weight", DType::BF16, &[8, 8])); // missing

        let err = ck.validate(&wanted).unwrap_err();
        let CheckpointError::Mismatch { problems, .. } = &err else {
            panic!("{err}")
        };
        let expected = [
            "wrong shape for model.norm.weight: expected [9], found [8]",
            "wrong dtype for model.layers.0.attention.query_key_value.weight: expected f32, found bf16",
            "missing tensor model.layers.1.mlp.experts.4.gate_proj.weight (expected bf16 [6, 8])",
            "missing tensor model.layers.0.attention.dense.weight (expected bf16 [8, 8])",
            "unexpected tensor lm_head.weight (bf16 [16, 8])",
        ];
        assert_eq!(problems, &expected, "{err}");
        let msg = err.to_string();
        assert!(msg.starts_with(&format!(
            "checkpoint {} does not match the model (5 problems):",
            dir.display()
        )));
        for line in expected {
            assert!(msg.contains(&format!("\n  {line}")), "{msg}");
        }

        let bad_stack = ParamSpec {
            shape: vec![3, 6, 8],
            ..stacked(EXPERTS, "e", DType::BF16, &[4, 6, 8])
        };
        let err = ck.validate(&[bad_stack]).unwrap_err().to_string();
        assert!(
            err.contains("a stack of 4 over `e` needs shape [4, ...], not [3, 6, 8]"),
            "{err}"
        );
    }

    // ---- malformed input ----------------------------------------------------------------------

    /// A valid one-file checkpoint; returns its folder and weights file.
    fn small_checkpoint(tmp: &Path) -> (PathBuf, PathBuf) {
        let dir = tmp.join("ckpt");
        write(&dir, &tiny_specs(DType::BF16), DType::BF16, u64::MAX).unwrap();
        let file = dir.join(SINGLE_FILE);
        (dir, file)
    }

    /// A checkpoint folder whose weights file has the given header JSON and `data_len` bytes.
    fn crafted(tmp: &Path, header: &str, data_len: usize) -> Result<Checkpoint> {
        let dir = tmp.join("crafted");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(CONFIG_FILE), "{}").unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        fs::write(dir.join(SINGLE_FILE), bytes).unwrap();
        Checkpoint::open(&dir)
    }

    #[test]
    fn truncated_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, file) = small_checkpoint(tmp.path());
        let len = fs::metadata(&file).unwrap().len();
        for cut in [len - 1, len - 100, 5] {
            File::options().write(true).open(&file).unwrap().set_len(cut).unwrap();
            let err = Checkpoint::open(&dir).unwrap_err();
            assert!(
                matches!(&err, CheckpointError::Truncated { file: f, size, .. } if *f == file && *size == cut),
                "{err}"
            );
            let msg = err.to_string();
            assert!(msg.contains("model.safetensors: truncated"), "{msg}");
        }
    }

    #[test]
    fn corrupt_header() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, file) = small_checkpoint(tmp.path());
        let mut bytes = fs::read(&file).unwrap();
        bytes[8..20].copy_from_slice(b"garbage{{::]");
        fs::write(&file, &bytes).unwrap();
        let err = Checkpoint::open(&dir).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::CorruptHeader { file: f, .. } if *f == file),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("model.safetensors: corrupt safetensors header: not a JSON object"),
            "{err}"
        );
    }

    #[test]
    fn header_length_past_eof() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, file) = small_checkpoint(tmp.path());
        let mut bytes = fs::read(&file).unwrap();
        for header_len in [bytes.len() as u64 - 7, u64::MAX] {
            bytes[..8].copy_from_slice(&header_len.to_le_bytes());
            fs::write(&file, &bytes).unwrap();
            let err = Checkpoint::open(&dir).unwrap_err();
            assert!(
                matches!(&err, CheckpointError::HeaderPastEof { file: f, header_len: n, .. } if *f == file && *n == header_len),
                "{err}"
            );
            assert!(
                err.to_string().contains("truncated or corrupt header length: it says"),
                "{err}"
            );
        }
    }

    #[test]
    fn bad_tensor_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let t = |dtype: &str, shape: &str, offsets: &str| {
            format!(r#""x":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}"#)
        };
        let cases = [
            (
                format!("{{{}}}", t("Q7", "[2]", "[0,8]")),
                8,
                "tensor x: unknown dtype \"Q7\"",
            ),
            (
                format!("{{{}}}", t("F32", "[3]", "[0,8]")),
                8,
                "tensor x: holds 8 bytes, but shape [3] of F32 needs 12",
            ),
            (
                format!("{{{}}}", t("F32", "[2]", "[8,0]")),
                8,
                "tensor x: data_offsets [8, 0] run backwards",
            ),
            (
                format!("{{{}}}", t("F4", "[3]", "[0,1]")),
                8,
                "tensor x: shape [3] of F4 is not a whole number of bytes",
            ),
            (
                format!("{{{}}}", t("F32", "[4611686018427387904, 8]", "[0,8]")),
                8,
                "is not a whole number of bytes",
            ),
            (
                format!("{{{}}}", t("F32", "[2]", "[0]")),
                8,
                "tensor x: bad header entry",
            ),
            (
                format!("{{{}}}", t("F32", "[-2]", "[0,8]")),
                8,
                "tensor x: bad header entry",
            ),
            (
                format!(
                    r#"{{{},"y":{{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}}}"#,
                    t("F32", "[2]", "[0,8]")
                ),
                12,
                "tensor y: data_offsets [4, 12] overlaps tensor x (which ends at 8)",
            ),
            (
                format!(
                    r#"{{{},"y":{{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}}}"#,
                    t("F32", "[2]", "[0,8]")
                ),
                16,
                "tensor y: data_offsets [12, 16] leaves a gap after tensor x",
            ),
            (
                format!("{{{}}}", t("F32", "[2]", "[0,8]")),
                12,
                "the tensors end 8 bytes into the data, but the file has 12",
            ),
            (
                format!("{{{}}}", t("F32", "[2]", "[0,8]")),
                4,
                "truncated: the file has",
            ),
            ("[1, 2]".to_string(), 0, "corrupt safetensors header: not a JSON object"),
            (
                r#"{"__metadata__": 3}"#.to_string(),
                0,
                "`__metadata__` is not an object",
            ),
            ("{\"\u{1F600}\": 3}".to_string(), 0, "bad header entry"),
        ];
        for (header, data_len, want) in cases {
            let err = crafted(tmp.path(), &header, data_len).unwrap_err().to_string();
            assert!(err.contains("crafted/model.safetensors"), "{err}");
            assert!(err.contains(want), "{header}: {err}");
        }
        // An empty checkpoint and tensors with no elements are fine.
        let empty = r#"{"x":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]}}"#;
        let ck = crafted(tmp.path(), empty, 0).unwrap();
        assert_eq!(ck.raw("x").unwrap(), (DType::F32, &[0, 3][..], &[][..]));
        assert_eq!(crafted(tmp.path(), "{}", 0).unwrap().tensor_names().len(), 0);
    }

    #[test]
    fn missing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let nowhere = tmp.path().join("nowhere");
        let err = Checkpoint::open(&nowhere).unwrap_err().to_string();
        assert_eq!(err, format!("{}: no such directory", nowhere.display()));

        let dir = tmp.path().join("empty");
        fs::create_dir(&dir).unwrap();
        let err = Checkpoint::open(&dir).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("{}: not an HF model folder: it has no config.json", dir.display())
        );

        fs::write(dir.join(CONFIG_FILE), "{\"a\": ").unwrap();
        let err = Checkpoint::open(&dir).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: not valid JSON", dir.join(CONFIG_FILE).display())),
            "{err}"
        );

        fs::write(dir.join(CONFIG_FILE), "{}").unwrap();
        let err = Checkpoint::open(&dir).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: no weights: expected model.safetensors or model.safetensors.index.json",
                dir.display()
            )
        );
    }

    #[test]
    fn broken_shards() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        write(&dir, &tiny_specs(DType::BF16), DType::BF16, 200).unwrap();
        let index_path = dir.join(INDEX_FILE);
        let index_text = fs::read_to_string(&index_path).unwrap();
        let mut index: Value = serde_json::from_str(&index_text).unwrap();
        let n = fs::read_dir(&dir).unwrap().count() - 2;
        let last = format!("model-{n:05}-of-{n:05}.safetensors");

        // A tensor the index lists but its shard lacks.
        index["weight_map"]["model.fake.weight"] = json!(format!("model-00001-of-{n:05}.safetensors"));
        fs::write(&index_path, serde_json::to_string(&index).unwrap()).unwrap();
        let err = Checkpoint::open(&dir).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::NotInShard { tensor, .. } if tensor == "model.fake.weight"),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!(
                "maps tensor model.fake.weight to model-00001-of-{n:05}.safetensors, but"
            )),
            "{err}"
        );

        // A shard file missing.
        fs::write(&index_path, &index_text).unwrap();
        fs::remove_file(dir.join(&last)).unwrap();
        let err = Checkpoint::open(&dir).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::MissingShard { shard, .. } if *shard == last),
            "{err}"
        );
        assert!(err.to_string().contains(&format!("but {last} does not exist")), "{err}");

        // A shard name that leaves the folder, and an index without a weight map.
        fs::write(&index_path, r#"{"weight_map": {"a": "../x.safetensors"}}"#).unwrap();
        let err = Checkpoint::open(&dir).unwrap_err().to_string();
        assert!(err.contains("not a file name in the folder"), "{err}");
        fs::write(&index_path, r#"{"metadata": {}}"#).unwrap();
        let err = Checkpoint::open(&dir).unwrap_err().to_string();
        assert!(err.contains("no `weight_map` object"), "{err}");
    }

    #[test]
    fn refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("keep.txt"), "precious").unwrap();
        let err = write(&dir, &tiny_specs(DType::BF16), DType::BF16, u64::MAX).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} exists and is not empty; refusing to write a checkpoint over it",
                dir.display()
            )
        );
        assert_eq!(entries(&dir), ["keep.txt"]);
        assert_eq!(entries(tmp.path()), ["ckpt"]);

        // An existing empty folder is filled.
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        write(&empty, &tiny_specs(DType::BF16), DType::BF16, u64::MAX).unwrap();
        Checkpoint::open(&empty)
            .unwrap()
            .validate(&tiny_specs(DType::BF16))
            .unwrap();

        // A failure part-way (here: the folder fills up before the final rename) leaves nothing.
        let late = tmp.path().join("late");
        fs::create_dir(&late).unwrap();
        let mut intrude = |_, _| {
            let _ = fs::write(late.join("intruder"), "x");
        };
        let specs = tiny_specs(DType::BF16);
        let err = write_checkpoint(&late, &config(), &specs, 7, DType::BF16, 200, &mut intrude);
        let err = err.unwrap_err();
        assert!(
            matches!(&err, CheckpointError::Io { path, .. } if *path == late),
            "{err}"
        );
        assert_eq!(entries(&late), ["intruder"]);
        assert_eq!(entries(tmp.path()), ["ckpt", "empty", "late"]);

        // Bad arguments fail before anything is written.
        let other = tmp.path().join("other");
        let err = write(&other, &tiny_specs(DType::BF16), DType::I32, u64::MAX).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot write a checkpoint in i32: use f32, bf16 or f16"
        );
        let err = write_checkpoint(&other, &json!([1]), &[], 0, DType::F32, 1, &mut |_, _| {}).unwrap_err();
        assert_eq!(err.to_string(), "the model config must be a JSON object, not an array");
        let dup = [spec("a", DType::F32, &[1]), spec("a", DType::F32, &[1])];
        let err = write(&other, &dup, DType::F32, u64::MAX).unwrap_err();
        assert_eq!(err.to_string(), "parameter a: two parameters write this tensor");
        assert_eq!(entries(tmp.path()), ["ckpt", "empty", "late"]);
    }

    #[test]
    fn no_corruption_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, file) = small_checkpoint(tmp.path());
        let good = fs::read(&file).unwrap();
        let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        assert!(parse_safetensors(&file, &good).is_ok());
        // Every truncation, and a few values at every header byte: errors, never panics.
        for cut in 0..good.len() {
            assert!(parse_safetensors(&file, &good[..cut]).is_err(), "cut at {cut}");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for pos in 0..header_end {
            for byte in [0u8, 0xff, b'0', b'9', b'"', b'[', b'}', b',', rng.random()] {
                let mut bytes = good.clone();
                bytes[pos] = byte;
                if let Ok(parsed) = parse_safetensors(&file, &bytes) {
                    assert!(parsed.iter().all(|p| p.start <= p.end && p.end <= bytes.len()));
                }
            }
        }
        // A sample through the whole checkpoint: open, validate, load.
        for _ in 0..50 {
            let mut bytes = good.clone();
            bytes[rng.random_range(8..header_end)] = rng.random_range(b' '..=b'~');
            fs::write(&file, &bytes).unwrap();
            if let Ok(ck) = Checkpoint::open(&dir) {
                let _ = ck.validate(&tiny_specs(DType::BF16));
                for s in tiny_specs(DType::BF16) {
                    let _ = ck.load(&s);
                }
            }
        }
    }

    /// Writes a ~1 GB bf16 checkpoint (shards of 300 MB) and times opening and validating it.
    /// `cargo test --release -- --ignored --nocapture bench_open_validate_1gb`
    #[test]
    #[ignore]
    fn bench_open_validate_1gb() {
        use std::time::Instant;
        let mut specs = vec![
            spec("model.word_embeddings.weight", DType::BF16, &[32768, 2048]),
            spec("lm_head.weight", DType::BF16, &[32768, 2048]),
            spec("model.norm.weight", DType::BF16, &[2048]),
        ];
        for l in 0..8 {
            for p in ["gate_proj", "up_proj", "down_proj"] {
                let name = format!("model.layers.{l}.mlp.experts.{{e}}.{p}.weight");
                specs.push(stacked(&name, "e", DType::BF16, &[32, 512, 1024]));
            }
            let bias = format!("model.layers.{l}.mlp.gate.expert_bias");
            specs.push(spec(&bias, DType::F32, &[32]));
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let t = Instant::now();
        write_checkpoint(&dir, &config(), &specs, 1, DType::BF16, 300 << 20, &mut |_, _| {}).unwrap();
        let write_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let ck = Checkpoint::open(&dir).unwrap();
        let open_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        ck.validate(&specs).unwrap();
        let validate_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let all = ck.load_all(&specs, &mut |_, _| {}).unwrap();
        let load_s = t.elapsed().as_secs_f64();
        assert_eq!(all.len(), specs.len());
        println!(
            "1 GB bf16 checkpoint: {:.3} GB in {} files, {} tensors; write {write_s:.2} s, \
             open {:.1} ms, validate {:.1} ms (open + validate {:.1} ms), load_all {load_s:.2} s",
            ck.total_bytes() as f64 / 1e9,
            ck.files().len(),
            ck.tensor_names().len(),
            open_s * 1e3,
            validate_s * 1e3,
            (open_s + validate_s) * 1e3,
        );
    }
}
