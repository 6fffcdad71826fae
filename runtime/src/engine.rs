//! Running a model step by step with per-sequence inference state.
//!
//! The graph's symbolic dims are `batch`, `seq` (new tokens this step) and `past` (tokens
//! already in the state). Its `state` inputs (KV caches of softmax layers, [H, d, d] f32 states
//! of linear layers) are fed from [`State`] and replaced by the step's carried outputs.

use crate::cpu::{CpuExec, ParamCache, Pool};
use crate::cuda_plan::{CudaGraphs, CudaModel, DeviceStates, GpuWeights};
use crate::model::LoadedModel;
use crate::{err, Error, Result};
use ir::interp::{Interpreter, ParamSource};
use ir::op::{InputKind, Op};
use ir::{DType, DimEnv, Shape, Tensor};
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// One compiled step graph on its device.
enum Exec {
    Reference(Interpreter),
    Cpu(Box<CpuExec>),
    /// The step runs in the engine's [`CudaModel`] (both plans share its weights).
    Cuda,
}

impl Exec {
    fn run(&self, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        match self {
            Exec::Reference(i) => Ok(i.run(inputs)?),
            Exec::Cpu(c) => c.run(inputs),
            Exec::Cuda => err("internal: a cuda step reached the host executor"),
        }
    }
}

/// Random weights with more parameters than this are made on the GPU itself (same
/// distributions, different values than the host's generator; making billions of values on
/// the host would take minutes).
pub const GPU_RANDOM_ABOVE: usize = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// `ir::interp`: plain loops in f32, the oracle.
    Reference,
    /// Cranelift-compiled CPU kernels (issue: CPU backend).
    Cpu,
    /// PTX kernels on an NVIDIA GPU (issue: PTX codegen + CUDA runtime).
    Cuda,
}

impl Device {
    /// Parse `--device`. `auto` picks the fastest backend available: the GPU where a CUDA
    /// driver and a GPU are present, else the Cranelift CPU backend.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "reference" | "ref" => Ok(Device::Reference),
            "auto" => Ok(if crate::cuda::gpu_present() {
                Device::Cuda
            } else {
                Device::Cpu
            }),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => {
                if !crate::cuda::driver_present() {
                    return err(
                        "--device cuda: no CUDA driver on this machine (libcuda.so could not be loaded); \
                         use --device cpu (or auto)",
                    );
                }
                Ok(Device::Cuda)
            }
            other => err(format!(
                "unknown device `{other}`: expected reference, cpu, cuda or auto"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Device::Reference => "reference",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

struct StateSpec {
    name: String,
    dtype: DType,
    shape: Shape,
}

/// Whether `graph`'s logits are the last position's only (`ringjit_logits = "last"`): their
/// position axis (the one before the vocabulary) is a constant 1, not `seq`.
pub fn logits_last_only(graph: &ir::Graph) -> bool {
    graph.output("logits").is_some_and(|o| {
        let shape = &graph.ty(o.value).shape;
        shape.len() >= 2 && shape[shape.len() - 2].as_const() == Some(1)
    })
}

/// A parameter source that reports how many bytes have been loaded.
struct Counting<'a> {
    inner: &'a dyn ParamSource,
    done: Cell<u64>,
    total: u64,
    progress: &'a dyn Fn(u64, u64),
}

impl ParamSource for Counting<'_> {
    fn load(&self, spec: &ir::ParamSpec) -> std::result::Result<Tensor, String> {
        let t = self.inner.load(spec)?;
        self.done
            .set(self.done.get() + (spec.numel() * spec.dtype.size_bytes()) as u64);
        (self.progress)(self.done.get(), self.total);
        Ok(t)
    }
}

/// Inference state of a batch of sequences that all hold `past` tokens.
#[derive(Clone, Debug)]
pub struct State {
    pub batch: usize,
    pub past: usize,
    /// The states on the host (reference and cpu devices).
    pub tensors: HashMap<String, Tensor>,
    /// The states on the GPU (cuda device); a clone shares them.
    pub gpu: Option<Arc<std::sync::Mutex<DeviceStates>>>,
}

/// How the engine compiles the model's graph before running it.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Run the rewrite passes (fusion); `false` runs the graph as the DSL wrote it.
    pub fuse: bool,
    /// The weight GEMMs' format (fp8: E4M3 with block scales, spec §5.2).
    pub precision: passes::Precision,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            fuse: true,
            precision: passes::Precision::Bf16,
        }
    }
}

/// A model ready to run: one compiled graph per step kind (a prefill of many tokens and a
/// decode step of one token per sequence may choose different kernels, e.g. the chunked or
/// the stepwise linear attention).
pub struct Engine {
    prefill: Exec,
    decode: Exec,
    cuda: Option<CudaModel>,
    states: Vec<StateSpec>,
    pub device: Device,
    pub vocab: usize,
    /// whether a step gives logits for its last position only (`ringjit_logits = "last"`:
    /// [batch, 1, vocab]), not for every position ([batch, seq, vocab])
    pub last_logits_only: bool,
    /// the compile reports of the prefill and decode graphs
    pub reports: Vec<passes::PassReport>,
}

impl Engine {
    pub fn new(m: &LoadedModel, device: Device) -> Result<Engine> {
        Self::with_options(m, device, &EngineOptions::default(), &|_, _| {})
    }

    /// [`Engine::new`] with options, telling `progress(bytes_loaded, bytes_total)` as the
    /// weights load.
    pub fn with_options(
        m: &LoadedModel,
        device: Device,
        opts: &EngineOptions,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Engine> {
        let graph = &m.model.graph;
        let mut states = Vec::new();
        let mut has_tokens = false;
        for &n in &graph.inputs {
            if let Op::Input {
                name,
                kind,
                dtype,
                shape,
            } = &graph.node(n).op
            {
                match kind {
                    InputKind::State => states.push(StateSpec {
                        name: name.clone(),
                        dtype: *dtype,
                        shape: shape.clone(),
                    }),
                    InputKind::Data if name == "tokens" => has_tokens = true,
                    InputKind::Data => {
                        return err(format!(
                            "the model needs an input `{name}` that the runtime does not provide"
                        ))
                    }
                }
            }
        }
        if !has_tokens {
            return err("the model has no `tokens` input");
        }
        let logits = graph
            .output("logits")
            .ok_or_else(|| Error("the model has no `logits` output".into()))?;
        let last_logits_only = logits_last_only(graph);
        let vocab = graph
            .ty(logits.value)
            .shape
            .last()
            .and_then(|d| d.as_const())
            .ok_or_else(|| Error("the logits' last dimension (vocabulary) must be fixed".into()))?
            as usize;
        let params = m.params()?;
        if device == Device::Cuda {
            let graphs = CudaGraphs::compile(graph, opts.fuse, opts.precision)?;
            let gpu = Arc::new(crate::cuda::Gpu::open(0)?);
            let n_params: usize = params.iter().map(|p| p.numel()).sum();
            let weights = match &m.weights {
                crate::model::Weights::Random(r) if n_params > GPU_RANDOM_ABOVE => {
                    GpuWeights::random(gpu, &params, r.seed, &|p| r.moments(p), progress)?
                }
                w => GpuWeights::upload(gpu, &params, w, progress)?,
            };
            let cuda = CudaModel::new(weights, &graphs, &codegen::ptx::PtxOptions::default())?;
            return Ok(Engine {
                prefill: Exec::Cuda,
                decode: Exec::Cuda,
                cuda: Some(cuda),
                states,
                device,
                vocab,
                last_logits_only,
                reports: graphs.reports,
            });
        }
        // the cpu and reference devices: both plans with the norms folded into their GEMMs
        let mut reports = Vec::new();
        let mut compiled = Vec::new();
        for mode in [passes::Mode::Prefill, passes::Mode::Decode] {
            let co = passes::CompileOptions {
                mode,
                fuse: opts.fuse,
                precision: opts.precision,
                ..Default::default()
            };
            let (g, report) = passes::compile(graph, &co).map_err(|e| Error(format!("compiling the model: {e}")))?;
            compiled.push(g);
            reports.push(report);
        }
        // the prefill and decode plans (interpreters or cpu plans) share one copy of the weights
        let total: u64 = params
            .iter()
            .map(|p| (p.numel() * p.dtype.size_bytes()) as u64)
            .sum::<u64>();
        let counting = Counting {
            inner: &m.weights,
            done: Cell::new(0),
            total,
            progress,
        };
        let (prefill, decode) = match device {
            Device::Cpu => {
                let pool = Arc::new(Pool::all_cores()?);
                let mut cache = ParamCache::default();
                let p = CpuExec::new(&compiled[0], &counting, &mut cache, pool.clone())?;
                let d = CpuExec::new(&compiled[1], &counting, &mut cache, pool)?;
                (Exec::Cpu(Box::new(p)), Exec::Cpu(Box::new(d)))
            }
            _ => {
                let mut shared = HashMap::new();
                (
                    Exec::Reference(Interpreter::with_shared(&compiled[0], &counting, &mut shared)?),
                    Exec::Reference(Interpreter::with_shared(&compiled[1], &counting, &mut shared)?),
                )
            }
        };
        Ok(Engine {
            prefill,
            decode,
            cuda: None,
            states,
            device,
            vocab,
            last_logits_only,
            reports,
        })
    }

    /// Fresh state for `batch` sequences: zero linear-attention states, empty KV caches.
    pub fn new_state(&self, batch: usize) -> Result<State> {
        let env: DimEnv = [("batch".to_string(), batch as i64), ("past".to_string(), 0)].into();
        let mut tensors = HashMap::new();
        for s in &self.states {
            let shape = ir::shape::eval_shape(&s.shape, &env).map_err(|e| {
                Error(format!(
                    "state `{}`: {e} (states may use only `batch` and `past`)",
                    s.name
                ))
            })?;
            tensors.insert(s.name.clone(), Tensor::zeros(s.dtype, shape));
        }
        if let Some(cuda) = &self.cuda {
            let dev = cuda.states(&tensors)?;
            return Ok(State {
                batch,
                past: 0,
                tensors: HashMap::new(),
                gpu: Some(Arc::new(std::sync::Mutex::new(dev))),
            });
        }
        Ok(State {
            batch,
            past: 0,
            tensors,
            gpu: None,
        })
    }

    /// Run `seq` new tokens per sequence (`tokens` is [batch, seq] row-major) and advance the
    /// state; returns the logits [batch, seq, vocab] ([batch, 1, vocab], the last position's,
    /// when [`Engine::last_logits_only`]).
    pub fn step(&self, state: &mut State, tokens: &[i64], seq: usize) -> Result<Tensor> {
        if tokens.len() != state.batch * seq {
            return err(format!(
                "{} tokens given for batch {} x {seq}",
                tokens.len(),
                state.batch
            ));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t < 0 || t as usize >= self.vocab) {
            return err(format!("token id {t} is outside the vocabulary (0..{})", self.vocab));
        }
        if let Some(cuda) = &self.cuda {
            let dev = state
                .gpu
                .as_ref()
                .ok_or_else(|| Error("this state was not made for the cuda device (Engine::new_state)".into()))?;
            let mut dev = dev
                .lock()
                .map_err(|_| Error("the GPU state is poisoned by an earlier failure".into()))?;
            let toks = Tensor::from_i64(DType::I64, vec![state.batch, seq], tokens.to_vec());
            let mut outs = cuda.step(&mut dev, toks, state.batch, seq, state.past)?;
            state.past += seq;
            return outs
                .remove("logits")
                .ok_or_else(|| Error("the step produced no logits".into()));
        }
        let mut inputs = std::mem::take(&mut state.tensors);
        inputs.insert(
            "tokens".into(),
            Tensor::from_i64(DType::I64, vec![state.batch, seq], tokens.to_vec()),
        );
        let interp = if seq == 1 { &self.decode } else { &self.prefill };
        let result = interp.run(&inputs);
        inputs.remove("tokens");
        let mut outs = match result {
            Ok(o) => o,
            Err(e) => {
                state.tensors = inputs; // nothing lost on failure
                return Err(e);
            }
        };
        for s in &self.states {
            let t = outs
                .remove(&s.name)
                .ok_or_else(|| Error(format!("the step did not carry state `{}`", s.name)))?;
            inputs.insert(s.name.clone(), t);
        }
        state.tensors = inputs;
        state.past += seq;
        outs.remove("logits")
            .ok_or_else(|| Error("the step produced no logits".into()))
    }

    /// Logits [T, vocab] of every position of one sequence. With `decode_from = Some(n)`, the
    /// first n tokens run as one prefill and the rest one at a time through the state.
    pub fn forward(&self, tokens: &[i64], decode_from: Option<usize>) -> Result<Tensor> {
        let t = tokens.len();
        if t == 0 {
            return err("no tokens");
        }
        if self.last_logits_only {
            return err("this model was loaded with ringjit_logits = \"last\" (logits of the last position only); a forward needs every position's");
        }
        let n = decode_from.unwrap_or(t);
        if n == 0 || n > t {
            return err(format!("--decode-from {n} must be in 1..={t}"));
        }
        let mut state = self.new_state(1)?;
        let mut data = Vec::with_capacity(t * self.vocab);
        let first = self.step(&mut state, &tokens[..n], n)?;
        data.extend_from_slice(first.as_f32().expect("logits are f32"));
        for &tok in &tokens[n..] {
            let l = self.step(&mut state, &[tok], 1)?;
            data.extend_from_slice(l.as_f32().expect("logits are f32"));
        }
        Ok(Tensor::from_f32(DType::F32, vec![t, self.vocab], data))
    }
}
