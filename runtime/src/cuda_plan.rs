//! A kernel plan on the GPU: every kernel compiled to PTX (`codegen::ptx`), loaded once through
//! a module cache, parameters uploaded once, intermediates in one arena laid out by
//! `passes::memplan`, launches on one stream (docs/kernel-abi.md says how a kernel is called).
//!
//! Carried states (KV caches, linear-attention states) stay on the device between steps
//! ([`DeviceStates`]); only the data inputs go up and the non-state outputs (logits) come back.

use crate::cuda::Gpu;
use crate::paged::PagedCache;
use crate::{err, Error, Result};
use codegen::ptx::{PtxKernel, PtxOptions};
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use ir::kernel::{BufferId, BufferKind, Kernel, KernelKind, KernelPlan, LaunchGeometry};
use ir::shape::{eval_shape, Dim, DimEnv};
use ir::{Graph, Op, Tensor};
use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

/// Device memory holding one buffer (or the arena), with its raw address.
pub struct DeviceBuf {
    slice: CudaSlice<u8>,
    pub bytes: usize,
}

impl DeviceBuf {
    pub fn ptr(&self, gpu: &Gpu) -> u64 {
        let (p, _sync) = self.slice.device_ptr(&gpu.stream);
        p
    }

    /// Copies `bytes` to offset `at`.
    pub fn write_at(&mut self, gpu: &Gpu, at: usize, bytes: &[u8]) -> Result<()> {
        if at + bytes.len() > self.bytes {
            return err(format!(
                "writing {} bytes at {at} of a {}-byte buffer",
                bytes.len(),
                self.bytes
            ));
        }
        let mut view = self.slice.slice_mut(at..at + bytes.len());
        gpu.stream
            .memcpy_htod(bytes, &mut view)
            .map_err(|e| Error(format!("copying to the GPU: {e}")))
    }
}

/// Allocates `bytes` (at least 1) of zeroed device memory; out of memory says how much was
/// asked for, for what, and how much is free.
pub fn alloc(gpu: &Gpu, bytes: usize, what: &str) -> Result<DeviceBuf> {
    // At least 256 bytes: a kernel may issue a load it then discards (the unselected branch of
    // a concat reading an empty KV cache at its base address), which must stay inside an
    // allocation (compute-sanitizer found exactly that on a 0-token cache).
    let slice = gpu.stream.alloc_zeros::<u8>(bytes.max(256)).map_err(|e| {
        let (free, total) = gpu.ctx.mem_get_info().unwrap_or((0, 0));
        Error(format!(
            "out of GPU memory? allocating {} for {what} failed: {e} ({} free of {})",
            mib(bytes as u64),
            mib(free as u64),
            mib(total as u64)
        ))
    })?;
    Ok(DeviceBuf { slice, bytes })
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Uploads a host tensor in its storage layout.
pub fn upload(gpu: &Gpu, t: &Tensor, what: &str) -> Result<DeviceBuf> {
    let bytes = t.to_bytes();
    let mut d = alloc(gpu, bytes.len(), what)?;
    if !bytes.is_empty() {
        gpu.stream
            .memcpy_htod(&bytes, &mut d.slice.slice_mut(0..bytes.len()))
            .map_err(|e| Error(format!("copying {what} to the GPU: {e}")))?;
    }
    Ok(d)
}

/// Downloads `shape` elements of `dtype` from the start of `d`.
pub fn download(gpu: &Gpu, d: &DeviceBuf, dtype: ir::DType, shape: Vec<usize>, what: &str) -> Result<Tensor> {
    let n: usize = shape.iter().product::<usize>() * dtype.size_bytes();
    let mut host = vec![0u8; n];
    if n > d.bytes {
        return err(format!("{what}: the device buffer holds {} bytes, {n} asked", d.bytes));
    }
    if n > 0 {
        gpu.stream
            .memcpy_dtoh(&d.slice.slice(0..n), &mut host)
            .map_err(|e| Error(format!("copying {what} from the GPU: {e}")))?;
    }
    Tensor::from_bytes(dtype, shape, &host).ok_or_else(|| Error(format!("{what}: the device buffer is too small")))
}

/// The model's weights on one GPU, by parameter name (a stacked family's pattern name holds
/// the whole stack). Shared by the prefill and the decode plans, so every weight is on the
/// device once.
pub struct GpuWeights {
    gpu: Arc<Gpu>,
    bufs: HashMap<String, Arc<DeviceBuf>>,
    pub bytes: u64,
}

impl GpuWeights {
    /// Uploads every parameter of `specs` from `source`, telling `progress(done, total)` in
    /// bytes.
    pub fn upload(
        gpu: Arc<Gpu>,
        specs: &[ir::ParamSpec],
        source: &dyn ir::interp::ParamSource,
        progress: &dyn Fn(u64, u64),
    ) -> Result<GpuWeights> {
        let total: u64 = specs.iter().map(|p| (p.numel() * p.dtype.size_bytes()) as u64).sum();
        let mut bufs = HashMap::new();
        let mut done = 0u64;
        for spec in specs {
            let t = source
                .load(spec)
                .map_err(|e| Error(format!("parameter {}: {e}", spec.name)))?;
            let d = upload(&gpu, &t, &spec.name)?;
            done += d.bytes as u64;
            progress(done, total);
            bufs.insert(spec.name.clone(), Arc::new(d));
        }
        Ok(GpuWeights { gpu, bufs, bytes: done })
    }

    /// Seeded random weights made on the GPU itself (benchmarks of full-size models, where
    /// making billions of values on the host would take minutes): parameter `spec` gets
    /// `mean + std · u` with unit-variance uniform `u`, `(mean, std)` from `moments` (None:
    /// zeros). Floats of f32 or bf16 only.
    pub fn random(
        gpu: Arc<Gpu>,
        specs: &[ir::ParamSpec],
        seed: u64,
        moments: &dyn Fn(&ir::ParamSpec) -> Option<(f32, f32)>,
        progress: &dyn Fn(u64, u64),
    ) -> Result<GpuWeights> {
        let ptx =
            codegen::fill::fill_random_ptx(&codegen::ptx::GpuTarget::default()).map_err(|e| Error(e.to_string()))?;
        let module = gpu.load_ptx(&ptx)?;
        let total: u64 = specs.iter().map(|p| (p.numel() * p.dtype.size_bytes()) as u64).sum();
        let mut bufs = HashMap::new();
        let mut done = 0u64;
        for (i, spec) in specs.iter().enumerate() {
            let bytes = spec.numel() * spec.dtype.size_bytes();
            let d = alloc(&gpu, bytes, &spec.name)?;
            if let Some((mean, std)) = moments(spec) {
                let entry = match spec.dtype {
                    ir::DType::F32 => codegen::fill::FILL_F32,
                    ir::DType::BF16 => codegen::fill::FILL_BF16,
                    other => return err(format!("parameter {}: no random fill for {other}", spec.name)),
                };
                let f = module
                    .load_function(entry)
                    .map_err(|e| Error(format!("{entry}: {e}")))?;
                let n = spec.numel() as u64;
                let blocks = n.div_ceil(u64::from(codegen::fill::FILL_BLOCK));
                let cfg = LaunchConfig {
                    grid_dim: (
                        u32::try_from(blocks).map_err(|_| Error(format!("{} is too large", spec.name)))?,
                        1,
                        1,
                    ),
                    block_dim: (codegen::fill::FILL_BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                };
                let ptr = d.ptr(&gpu);
                let key = seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let mut b = gpu.stream.launch_builder(&f);
                b.arg(&ptr).arg(&n).arg(&key).arg(&std).arg(&mean);
                // SAFETY: the kernel writes n elements of the parameter's dtype at `ptr`, which
                // holds exactly that many.
                unsafe { b.launch(cfg) }.map_err(|e| Error(format!("filling {}: {e}", spec.name)))?;
            }
            done += bytes as u64;
            progress(done, total);
            bufs.insert(spec.name.clone(), Arc::new(d));
        }
        gpu.stream
            .synchronize()
            .map_err(|e| Error(format!("making random weights on the GPU: {e}")))?;
        Ok(GpuWeights { gpu, bufs, bytes: done })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<DeviceBuf>> {
        self.bufs.get(name)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

/// Carried states on the device, by state name.
#[derive(Default)]
pub struct DeviceStates {
    /// states in the plain row-major layout of their shapes
    pub bufs: HashMap<String, DeviceBuf>,
    /// KV caches the in-place decode step keeps in its capacity layout, paged by the GPU's
    /// virtual memory (`crate::paged`); a state is in `bufs` or here, not both
    pub paged: HashMap<String, PagedCache>,
}

impl DeviceStates {
    pub fn new(bufs: HashMap<String, DeviceBuf>) -> DeviceStates {
        DeviceStates {
            bufs,
            paged: HashMap::new(),
        }
    }

    /// Physical bytes the states hold on the GPU.
    pub fn bytes(&self) -> usize {
        self.bufs.values().map(|b| b.bytes).sum::<usize>()
            + self.paged.values().map(PagedCache::mapped_bytes).sum::<usize>()
    }
}

/// A paged cache's valid tokens in a new buffer of the plain layout (stream-ordered).
fn plain_copy(gpu: &Gpu, pc: &PagedCache, name: &str) -> Result<DeviceBuf> {
    let dst = alloc(gpu, pc.rows * pc.tokens * pc.inner, name)?;
    pc.copy_out(dst.ptr(gpu))?;
    Ok(dst)
}

impl std::fmt::Debug for DeviceStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceStates({} tensors, {} paged, {} bytes on the GPU)",
            self.bufs.len(),
            self.paged.len(),
            self.bytes()
        )
    }
}

struct Loaded {
    func: CudaFunction,
    launch: LaunchGeometry,
    scratch: Dim,
    /// leading scratch bytes zeroed before each launch (`PtxKernel::scratch_zero`)
    scratch_zero: Dim,
    /// its scratch is arrival counters it needs at zero and leaves at zero
    /// (`PtxKernel::scratch_counters`): served from the counters buffer, never memset
    counters: bool,
    /// its PTX waits for the kernel before it (`griddepcontrol.wait` at the entry): it may be
    /// launched as a programmatic dependent ([`pdl_enabled`])
    pdl: bool,
    _module: Arc<CudaModule>,
}

/// Whether kernels whose PTX waits for their predecessor are launched as programmatic
/// dependents (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`): the driver may then
/// start launching a kernel while the one before it runs, and the kernel's `griddepcontrol.wait`
/// holds it until its predecessor has completed and its writes are visible. On by default;
/// `RINGJIT_PDL=0` (or `off`, `false`) launches every kernel in plain stream order (A/B timing).
pub fn pdl_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("RINGJIT_PDL")
            .map(|v| !matches!(v.as_str(), "0" | "off" | "false"))
            .unwrap_or(true)
    })
}

/// Bytes of shared scratch and of counters that `kernels` need under `env`.
fn scratch_needs<'l>(kernels: impl Iterator<Item = &'l Loaded>, env: &DimEnv) -> Result<(usize, usize)> {
    let mut need = (0usize, 0usize);
    for l in kernels {
        let n = l.scratch.eval(env).map_err(Error)? as usize;
        let slot = if l.counters { &mut need.1 } else { &mut need.0 };
        *slot = (*slot).max(n);
    }
    Ok(need)
}

/// The scratch pointers of a launch (docs/kernel-abi.md): the buffer every kernel shares, and
/// the zeroed one of the kernels whose scratch is self-resetting counters.
#[derive(Clone, Copy, Default)]
struct Scratch {
    shared: u64,
    counters: u64,
}

/// Modules loaded in this process, by the hash of their PTX.
type ModuleCache = Mutex<HashMap<u64, Arc<CudaModule>>>;

fn module_cache() -> &'static ModuleCache {
    static CACHE: OnceLock<ModuleCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The PTX of `kernel` (`codegen::ptx` keeps its own disk cache of LLVM's output).
fn ptx_of(plan: &KernelPlan, kernel: &Kernel, opts: &PtxOptions) -> Result<PtxKernel> {
    codegen::ptx::compile_kernel(plan, kernel, opts).map_err(|e| Error(e.to_string()))
}

/// Counters of the module cache, for `RINGJIT_DEBUG` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// modules the driver loaded (one per distinct kernel body)
    pub compiled: usize,
    /// kernels whose module was loaded already (by an earlier plan of this process, or for a
    /// kernel alike but for its name)
    pub memory_hits: usize,
}

/// Medians of a timed step (milliseconds).
#[derive(Clone, Debug, Default)]
pub struct StepTiming {
    /// the whole step, kernels launched back to back
    pub step_ms: f64,
    /// each kernel alone, in plan order
    pub kernels: Vec<(String, f64)>,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A kernel plan ready to run on one GPU.
pub struct CudaPlan {
    gpu: Arc<Gpu>,
    plan: KernelPlan,
    symbols: Vec<String>,
    kernels: Vec<Loaded>,
    params: HashMap<BufferId, Arc<DeviceBuf>>,
    arena: RefCell<Option<DeviceBuf>>,
    scratch: RefCell<Option<DeviceBuf>>,
    /// the self-resetting counters' scratch (zeroed when allocated; see [`Scratch`])
    counters: RefCell<Option<DeviceBuf>>,
    /// the symbols' values of the step being run (the kernels read them through a pointer)
    syms: RefCell<Option<DeviceBuf>>,
    /// fixed-address buffers and captured CUDA graphs of the steps of one batch (decode)
    fixed: RefCell<Option<Fixed>>,
    /// whether [`CudaPlan::run`] may use fixed buffers and CUDA graphs (see [`CudaPlan::set_graphs`])
    graphs: std::cell::Cell<bool>,
    /// why this plan cannot run with fixed buffers (None: it can)
    not_fixable: Option<String>,
    /// the in-place variant the fixed-buffer steps run ([`CudaPlan::for_decode`])
    inplace: Option<InPlace>,
    opts: PtxOptions,
    pub cache: CacheStats,
    debug: u32,
    /// how many times fixed buffers were laid out (for tests and the benchmark)
    layouts: std::cell::Cell<usize>,
}

/// Fixed-address buffers for the steps of one (batch, seq) up to a capacity of `past + seq`
/// tokens, and the CUDA graphs captured over them. With the caches in place the capacity is the
/// paged caches' (`crate::paged`: 64K tokens by default, so one layout serves a whole
/// generation); otherwise it is `past + seq` rounded up with room for 256 more. The arena is
/// laid out for the capacity (every buffer's size only grows with `past`, and liveness does
/// not depend on it, so the layout holds for every smaller `past`); carried states that are not
/// paged alternate between sets of buffers sized for the capacity (the step reads one set and
/// writes another), so each direction is one graph, replayed with only the symbols and the
/// tokens copied in before it.
struct Fixed {
    batch: i64,
    seq: i64,
    /// the most `past + seq` tokens these buffers hold
    cap: i64,
    cap_env: DimEnv,
    addr_intermediate: Vec<Option<u64>>,
    _arena: Option<DeviceBuf>,
    scratch: Scratch,
    _scratch_bufs: (Option<DeviceBuf>, Option<DeviceBuf>),
    inputs: HashMap<BufferId, DeviceBuf>,
    outputs: HashMap<BufferId, DeviceBuf>,
    /// spare sets of state buffers (by state name), each sized for the capacity
    pool: Vec<HashMap<String, DeviceBuf>>,
    /// addresses of the state buffers made here (in the pool or handed out as a step's states)
    ours: std::collections::HashSet<u64>,
    graphs: HashMap<Vec<u64>, cudarc::driver::CudaGraph>,
    /// the graph the last step replayed
    last: Option<Vec<u64>>,
    /// the plan's carried outputs in buffers of their own ([`state_outputs`]), and which
    /// buffers the plan refers to ([`used_buffers`]): fixed per plan, not per step
    state_out: HashMap<BufferId, String>,
    used: Vec<bool>,
    /// each kernel's grid at the capacity
    grids: Vec<[u64; 3]>,
}

/// A plan with its loaded kernels and symbol order, as the fixed-buffer step runs it.
struct Exe<'a> {
    plan: &'a KernelPlan,
    kernels: &'a [Loaded],
    symbols: &'a [String],
    /// the caches it updates in place
    inplace: &'a [passes::inplace::InPlaceState],
}

/// The decode plan with its KV caches updated in place (`passes::inplace`), for the
/// fixed-buffer steps.
struct InPlace {
    plan: KernelPlan,
    kernels: Vec<Loaded>,
    symbols: Vec<String>,
    states: Vec<passes::inplace::InPlaceState>,
}

/// The plan's carried-state outputs written into buffers of their own: buffer → state name.
fn state_outputs(plan: &KernelPlan) -> HashMap<BufferId, String> {
    plan.outputs
        .iter()
        .filter(|o| o.kind == ir::op::InputKind::State && plan.buffers[o.buffer.0 as usize].kind == BufferKind::Output)
        .map(|o| (o.buffer, o.name.clone()))
        .collect()
}

/// Which buffers a kernel or an output of `plan` refers to.
fn used_buffers(plan: &KernelPlan) -> Vec<bool> {
    let mut used = vec![false; plan.buffers.len()];
    for k in &plan.kernels {
        for r in k.inputs.iter().chain(&k.outputs) {
            used[r.buffer.0 as usize] = true;
        }
    }
    for o in &plan.outputs {
        used[o.buffer.0 as usize] = true;
    }
    used
}

/// The most graphs kept per batch size (one per direction of each sequence being decoded).
const MAX_GRAPHS: usize = 8;

fn debug_level() -> u32 {
    std::env::var("RINGJIT_DEBUG")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl CudaPlan {
    /// Compiles and loads every kernel of `plan` (partitioned from `graph`) and uploads its
    /// parameters: weights from `params` (by buffer name), folded constants from the graph.
    pub fn new(weights: &GpuWeights, graph: &Graph, plan: KernelPlan, opts: &PtxOptions) -> Result<CudaPlan> {
        let gpu = weights.gpu.clone();
        let mut cache = CacheStats::default();
        let kernels = load_kernels(&gpu, &plan, opts, &mut cache)?;
        let mut dev_params = HashMap::new();
        for (i, b) in plan.buffers.iter().enumerate() {
            if b.kind != BufferKind::Param {
                continue;
            }
            let d = match &graph.node(b.value.node).op {
                Op::Literal { value } => Arc::new(upload(&gpu, value, &b.name)?),
                _ => weights
                    .get(&b.name)
                    .cloned()
                    .ok_or_else(|| Error(format!("parameter {} is not on the GPU", b.name)))?,
            };
            let want = b.size_bytes(&DimEnv::new()).map_err(Error)? as usize;
            if d.bytes != want {
                return err(format!(
                    "parameter {}: {} bytes on the GPU, the plan's {} {} needs {want}",
                    b.name,
                    d.bytes,
                    b.dtype,
                    ir::shape::shape_str(&b.shape)
                ));
            }
            dev_params.insert(BufferId(i as u32), d);
        }
        let symbols = plan.symbols();
        let not_fixable = fixable(&plan, &kernels).err();
        Ok(CudaPlan {
            gpu,
            plan,
            symbols,
            kernels,
            params: dev_params,
            arena: RefCell::new(None),
            scratch: RefCell::new(None),
            counters: RefCell::new(None),
            syms: RefCell::new(None),
            fixed: RefCell::new(None),
            graphs: std::cell::Cell::new(false),
            not_fixable,
            inplace: None,
            opts: opts.clone(),
            cache,
            debug: debug_level(),
            layouts: std::cell::Cell::new(0),
        })
    }

    /// Lets [`CudaPlan::run`] keep fixed buffers for a batch size and replay the step as a
    /// CUDA graph (the decode plan: same batch, one token, a growing `past`). Off by default;
    /// `RINGJIT_CUDA_GRAPH=0` and `RINGJIT_DEBUG` ≥ 1 keep it off. Returns whether it is on.
    pub fn set_graphs(&self, on: bool) -> bool {
        let env_off = std::env::var("RINGJIT_CUDA_GRAPH").is_ok_and(|v| v.trim() == "0");
        let on = on && !env_off && self.debug == 0 && self.not_fixable.is_none();
        self.graphs.set(on);
        if !on {
            *self.fixed.borrow_mut() = None;
        }
        on
    }

    /// The decode plan: also compiles the variant that updates the KV caches in place
    /// (`passes::inplace`), which the fixed-buffer steps run, and turns graphs on (see
    /// [`CudaPlan::set_graphs`]). A plan that does not fit the pattern keeps its functional
    /// caches (`RINGJIT_DEBUG=1` says why).
    pub fn for_decode(mut self) -> Result<CudaPlan> {
        match passes::inplace::append_in_place(&self.plan) {
            Ok((plan, states)) => {
                let mut cache = self.cache;
                let kernels = load_kernels(&self.gpu, &plan, &self.opts, &mut cache)?;
                match fixable(&plan, &kernels) {
                    Ok(()) => {
                        self.cache = cache;
                        self.inplace = Some(InPlace {
                            symbols: plan.symbols(),
                            plan,
                            kernels,
                            states,
                        });
                    }
                    Err(e) if self.debug >= 1 => eprintln!("[ringjit] KV caches not in place: {e}"),
                    Err(_) => {}
                }
            }
            Err(e) if self.debug >= 1 => eprintln!("[ringjit] KV caches not in place: {e}"),
            Err(_) => {}
        }
        self.set_graphs(true);
        Ok(self)
    }

    /// Whether the fixed-buffer steps update the KV caches in place.
    pub fn caches_in_place(&self) -> bool {
        self.inplace.is_some()
    }

    /// Why the plan cannot use fixed buffers and graphs, if it cannot.
    pub fn graph_blocker(&self) -> Option<&str> {
        self.not_fixable.as_deref()
    }

    /// The median GPU time (CUDA events, ms) of replaying the last step's graph `repeats`
    /// times: what the step costs the GPU, without the host's part (tokens up, logits down).
    /// The replay is idempotent (states are read from one buffer set and written to another;
    /// the caches get the same token at the same place). None when the last step was not a
    /// replay.
    pub fn replay_ms(&self, repeats: usize) -> Result<Option<f64>> {
        let slot = self.fixed.borrow();
        let Some(fx) = slot.as_ref() else { return Ok(None) };
        let Some(g) = fx.last.as_ref().and_then(|k| fx.graphs.get(k)) else {
            return Ok(None);
        };
        let gpu = &*self.gpu;
        let ev = || {
            gpu.ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| Error(format!("CUDA event: {e}")))
        };
        let (a, b) = (ev()?, ev()?);
        let mut t = Vec::with_capacity(repeats);
        for _ in 0..repeats.max(1) {
            a.record(&gpu.stream).map_err(|e| Error(e.to_string()))?;
            g.launch()
                .map_err(|e| Error(format!("replaying the step's CUDA graph: {e}")))?;
            b.record(&gpu.stream).map_err(|e| Error(e.to_string()))?;
            b.synchronize().map_err(|e| Error(e.to_string()))?;
            t.push(f64::from(a.elapsed_ms(&b).map_err(|e| Error(e.to_string()))?));
        }
        Ok(Some(median(&mut t)))
    }

    /// How many times the fixed buffers of the decode step were laid out (a new batch size, or
    /// caches outgrowing their reserved range): each time the step's CUDA graphs are captured
    /// anew.
    pub fn layouts_made(&self) -> usize {
        self.layouts.get()
    }

    /// How many CUDA graphs are captured now (for tests and the benchmark).
    pub fn graph_count(&self) -> usize {
        self.fixed.borrow().as_ref().map_or(0, |f| f.graphs.len())
    }

    pub fn plan(&self) -> &KernelPlan {
        &self.plan
    }

    /// The plan a timed or fixed-buffer step runs: the in-place one where it was made (the
    /// kernels of [`StepTiming::kernels`]).
    pub fn step_plan(&self) -> &KernelPlan {
        self.exe().plan
    }

    /// Runs one step under `env`: `inputs` are the data inputs by name (host), `states` the
    /// carried states (device), replaced by the step's new values. Returns the other outputs.
    pub fn run(
        &self,
        env: &DimEnv,
        inputs: &HashMap<String, Tensor>,
        states: &mut DeviceStates,
    ) -> Result<HashMap<String, Tensor>> {
        self.run_inner(env, inputs, states, None)
    }

    /// [`CudaPlan::run`], with the step's kernels launched `repeats` more times after a first
    /// warm-up run and timed with CUDA events: the median time of the whole step and of each
    /// kernel. (The step is idempotent on its bound buffers: states are read from one buffer
    /// and written to another.)
    pub fn run_timed(
        &self,
        env: &DimEnv,
        inputs: &HashMap<String, Tensor>,
        states: &mut DeviceStates,
        repeats: usize,
    ) -> Result<(HashMap<String, Tensor>, StepTiming)> {
        let mut t = StepTiming::default();
        let out = self.run_inner(env, inputs, states, Some((repeats.max(1), &mut t)))?;
        Ok((out, t))
    }

    /// Times `kernels` (launched by `launch(i)`): `repeats` back-to-back runs of all of them
    /// (what a CUDA graph replays), then `repeats` runs with an event between every two
    /// launches; the medians.
    fn time_launches(
        &self,
        kernels: &[Kernel],
        repeats: usize,
        launch: impl Fn(usize) -> Result<()>,
    ) -> Result<StepTiming> {
        let gpu = &*self.gpu;
        let ev = || {
            gpu.ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| Error(format!("CUDA event: {e}")))
        };
        let n = kernels.len();
        let marks: Vec<_> = (0..=n).map(|_| ev()).collect::<Result<_>>()?;
        let mut per: Vec<Vec<f64>> = vec![Vec::with_capacity(repeats); n];
        let mut whole = Vec::with_capacity(repeats);
        let (a, b) = (ev()?, ev()?);
        for _ in 0..repeats {
            a.record(&gpu.stream).map_err(|e| Error(e.to_string()))?;
            for i in 0..n {
                launch(i)?;
            }
            b.record(&gpu.stream).map_err(|e| Error(e.to_string()))?;
            b.synchronize().map_err(|e| Error(e.to_string()))?;
            whole.push(f64::from(a.elapsed_ms(&b).map_err(|e| Error(e.to_string()))?));
        }
        for _ in 0..repeats {
            for (i, m) in marks.iter().take(n).enumerate() {
                m.record(&gpu.stream).map_err(|e| Error(e.to_string()))?;
                launch(i)?;
            }
            marks[n].record(&gpu.stream).map_err(|e| Error(e.to_string()))?;
            marks[n].synchronize().map_err(|e| Error(e.to_string()))?;
            for (i, p) in per.iter_mut().enumerate() {
                p.push(f64::from(
                    marks[i].elapsed_ms(&marks[i + 1]).map_err(|e| Error(e.to_string()))?,
                ));
            }
        }
        Ok(StepTiming {
            step_ms: median(&mut whole),
            kernels: kernels
                .iter()
                .zip(per.iter_mut())
                .map(|(k, p)| (k.name.clone(), median(p)))
                .collect(),
        })
    }

    fn run_inner(
        &self,
        env: &DimEnv,
        inputs: &HashMap<String, Tensor>,
        states: &mut DeviceStates,
        timing: Option<(usize, &mut StepTiming)>,
    ) -> Result<HashMap<String, Tensor>> {
        // timed steps of a decode plan run what serving runs: the caches updated in place
        if (timing.is_none() && self.graphs.get()) || (timing.is_some() && self.inplace.is_some()) {
            return self.run_fixed(env, inputs, states, timing);
        }
        self.plain_states(states)?;
        let gpu = &*self.gpu;
        let mem = passes::memplan::plan(&self.plan, env).map_err(Error)?;
        self.ensure(&self.arena, mem.arena_peak_bytes as usize, "the activation arena")?;
        let arena_ptr = self.arena.borrow().as_ref().map(|a| a.ptr(gpu)).unwrap_or(0);
        let scratch_ptr = self.scratch_for(self.kernels.iter(), env)?;

        // every buffer's address
        let mut owned: HashMap<BufferId, DeviceBuf> = HashMap::new();
        let mut addr = vec![0u64; self.plan.buffers.len()];
        for (i, b) in self.plan.buffers.iter().enumerate() {
            let id = BufferId(i as u32);
            addr[i] = match b.kind {
                BufferKind::Param => self.params[&id].ptr(gpu),
                BufferKind::Intermediate => {
                    arena_ptr
                        + mem
                            .offset(id)
                            .ok_or_else(|| Error(format!("buffer {} has no place in the arena", b.name)))?
                }
                BufferKind::Input => {
                    let t = inputs
                        .get(&b.name)
                        .ok_or_else(|| Error(format!("input `{}` was not given", b.name)))?;
                    let d = upload(gpu, t, &b.name)?;
                    let p = d.ptr(gpu);
                    owned.insert(id, d);
                    p
                }
                BufferKind::State => states
                    .bufs
                    .get(&b.name)
                    .ok_or_else(|| Error(format!("state `{}` is not on the GPU", b.name)))?
                    .ptr(gpu),
                BufferKind::Output => {
                    let bytes = b.size_bytes(env).map_err(Error)? as usize;
                    let d = alloc(gpu, bytes, &b.name)?;
                    let p = d.ptr(gpu);
                    owned.insert(id, d);
                    p
                }
            };
        }
        let syms = self.put_syms(&self.symbols, env)?;

        for (k, l) in self.plan.kernels.iter().zip(&self.kernels) {
            self.launch(k, l, env, &addr, syms, scratch_ptr)?;
        }
        if let Some((repeats, t)) = timing {
            *t = self.time_launches(&self.plan.kernels, repeats, |i| {
                self.launch(&self.plan.kernels[i], &self.kernels[i], env, &addr, syms, scratch_ptr)
            })?;
        }
        gpu.stream.synchronize().map_err(|e| {
            Error(format!(
                "a kernel failed during the step: {e} (RINGJIT_DEBUG=1 synchronises after every launch and names it)"
            ))
        })?;

        // hand out the outputs: states stay on the device, the rest comes back
        let mut out = HashMap::new();
        for o in &self.plan.outputs {
            let b = &self.plan.buffers[o.buffer.0 as usize];
            let shape = eval_shape(&o.shape, env).map_err(Error)?;
            if o.kind == ir::op::InputKind::State {
                let d = match owned.remove(&o.buffer) {
                    Some(d) => d,
                    // a state passed through unchanged, or an output living elsewhere: copy it
                    None => {
                        let bytes = b.size_bytes(env).map_err(Error)? as usize;
                        let mut d = alloc(gpu, bytes, &o.name)?;
                        let src = self.buffer_slice(o.buffer, &addr, bytes)?;
                        gpu.stream
                            .memcpy_dtod(&src, &mut d.slice)
                            .map_err(|e| Error(format!("copying state {}: {e}", o.name)))?;
                        d
                    }
                };
                states.bufs.insert(o.name.clone(), d);
            } else {
                let t = match owned.get(&o.buffer) {
                    Some(d) => download(gpu, d, b.dtype, shape, &o.name)?,
                    None => {
                        let bytes = b.size_bytes(env).map_err(Error)? as usize;
                        let src = self.buffer_slice(o.buffer, &addr, bytes)?;
                        let mut host = vec![0u8; bytes];
                        gpu.stream
                            .memcpy_dtoh(&src.slice(0..bytes), &mut host)
                            .map_err(|e| Error(format!("copying {} from the GPU: {e}", o.name)))?;
                        Tensor::from_bytes(b.dtype, shape, &host)
                            .ok_or_else(|| Error(format!("output {}: size mismatch", o.name)))?
                    }
                };
                out.insert(o.name.clone(), t);
            }
        }
        Ok(out)
    }

    /// The plan the fixed-buffer steps run: the in-place one where it was made.
    fn exe(&self) -> Exe<'_> {
        match &self.inplace {
            Some(ip) => Exe {
                plan: &ip.plan,
                kernels: &ip.kernels,
                symbols: &ip.symbols,
                inplace: &ip.states,
            },
            None => Exe {
                plan: &self.plan,
                kernels: &self.kernels,
                symbols: &self.symbols,
                inplace: &[],
            },
        }
    }

    /// Buffers for steps of `batch` × `seq` tokens holding up to `cap` tokens in all.
    fn make_fixed(&self, exe: &Exe, env: &DimEnv, batch: i64, seq: i64, cap: i64) -> Result<Fixed> {
        let gpu = &*self.gpu;
        self.layouts.set(self.layouts.get() + 1);
        let mut cap_env = env.clone();
        if exe.symbols.iter().any(|s| s == "past") {
            cap_env.insert("past".to_string(), cap - seq);
        }
        if exe.symbols.iter().any(|s| s == passes::inplace::CAP) {
            cap_env.insert(passes::inplace::CAP.to_string(), cap);
        }
        let mem = passes::memplan::plan(exe.plan, &cap_env).map_err(Error)?;
        let arena = match mem.arena_peak_bytes {
            0 => None,
            n => Some(alloc(gpu, n as usize, "the activation arena")?),
        };
        let arena_ptr = arena.as_ref().map_or(0, |a| a.ptr(gpu));
        let mut addr_intermediate = vec![None; exe.plan.buffers.len()];
        let mut inputs = HashMap::new();
        let mut outputs = HashMap::new();
        let state_out = state_outputs(exe.plan);
        let used = used_buffers(exe.plan);
        for (i, b) in exe.plan.buffers.iter().enumerate() {
            let id = BufferId(i as u32);
            if !used[i] {
                continue; // the functional caches' outputs of an in-place plan
            }
            let bytes = || -> Result<usize> { Ok(b.size_bytes(&cap_env).map_err(Error)? as usize) };
            match b.kind {
                BufferKind::Intermediate => addr_intermediate[i] = mem.offset(id).map(|o| arena_ptr + o),
                BufferKind::Input => {
                    inputs.insert(id, alloc(gpu, bytes()?, &b.name)?);
                }
                BufferKind::Output if !state_out.contains_key(&id) => {
                    outputs.insert(id, alloc(gpu, bytes()?, &b.name)?);
                }
                _ => {}
            }
        }
        let need = scratch_needs(exe.kernels.iter(), &cap_env)?;
        let mut grids = Vec::with_capacity(exe.kernels.len());
        for (k, l) in exe.plan.kernels.iter().zip(exe.kernels) {
            grids.push(l.launch.eval(&cap_env).map_err(|e| Error(format!("{}: {e}", k.name)))?);
        }
        let some = |n: usize, what: &str| -> Result<Option<DeviceBuf>> {
            match n {
                0 => Ok(None),
                n => alloc(gpu, n, what).map(Some),
            }
        };
        let bufs = (
            some(need.0, "kernel scratch space")?,
            some(need.1, "kernel arrival counters")?,
        );
        let ptr = |b: &Option<DeviceBuf>| b.as_ref().map_or(0, |d| d.ptr(gpu));
        Ok(Fixed {
            batch,
            seq,
            cap,
            scratch: Scratch {
                shared: ptr(&bufs.0),
                counters: ptr(&bufs.1),
            },
            _scratch_bufs: bufs,
            cap_env,
            addr_intermediate,
            _arena: arena,
            inputs,
            outputs,
            pool: Vec::new(),
            ours: Default::default(),
            graphs: HashMap::new(),
            last: None,
            state_out,
            used,
            grids,
        })
    }

    /// Where an in-place cache's rows lie: (rows, bytes per token) of state `name` under `env`.
    fn cache_rows(&self, name: &str, axis: usize, env: &DimEnv) -> Result<(usize, usize)> {
        let b = self
            .plan
            .buffers
            .iter()
            .find(|b| b.kind == BufferKind::State && b.name == name)
            .ok_or_else(|| Error(format!("internal: no state {name} in the plan")))?;
        let shape = eval_shape(&b.shape, env).map_err(Error)?;
        let rows = shape[..axis].iter().product();
        let inner = shape[axis + 1..].iter().product::<usize>() * b.dtype.size_bytes();
        Ok((rows, inner))
    }

    /// Every paged cache of `states` back in its plain layout (for the functional plan and for
    /// reading it back).
    fn plain_states(&self, states: &mut DeviceStates) -> Result<()> {
        // one cache at a time, each leaving its pages only once its copy exists: an error (out
        // of memory) leaves every cache whole, in one place or the other
        let names: Vec<String> = states.paged.keys().cloned().collect();
        for name in names {
            let dst = plain_copy(&self.gpu, &states.paged[&name], &name)?;
            states.paged.remove(&name);
            states.bufs.insert(name, dst);
        }
        Ok(())
    }

    /// [`CudaPlan::run`] over fixed buffers, replaying a captured CUDA graph where the states
    /// come from an earlier such step (see [`Fixed`]); KV caches are updated in place when the
    /// in-place plan was made.
    fn run_fixed(
        &self,
        env: &DimEnv,
        inputs: &HashMap<String, Tensor>,
        states: &mut DeviceStates,
        timing: Option<(usize, &mut StepTiming)>,
    ) -> Result<HashMap<String, Tensor>> {
        let gpu = &*self.gpu;
        let exe = self.exe();
        let val = |n: &str| env.get(n).copied().unwrap_or(0);
        let (batch, seq, past) = (val("batch"), val("seq"), val("past"));
        let tokens = (past + seq) as usize;
        // the in-place caches, paged (see `crate::paged`): every row laid out for `cap` tokens
        let mut rows_inner = Vec::with_capacity(exe.inplace.len());
        for st in exe.inplace {
            rows_inner.push(self.cache_rows(&st.name, st.axis, env)?);
        }
        let cap = if exe.inplace.is_empty() {
            // no caches in place: the capacity of the fixed buffers, while they hold the step;
            // else room for 256 more tokens past the next multiple of 256
            match self.fixed.borrow().as_ref() {
                Some(f) if f.batch == batch && f.seq == seq && past + seq <= f.cap => f.cap as usize,
                _ => (((past + seq + 255) / 256) * 256 + 256) as usize,
            }
        } else {
            let cur = exe
                .inplace
                .iter()
                .filter_map(|st| states.paged.get(&st.name).map(PagedCache::cap))
                .max();
            match cur {
                Some(c) if tokens <= c => c,
                // a new capacity only when the caches are new or full (the driver's page size
                // is asked then, not every step)
                _ => {
                    let at_least = match cur {
                        Some(c) => tokens.max(2 * c),
                        None => tokens.max(crate::paged::reserve_tokens()?),
                    };
                    let inners: Vec<usize> = rows_inner.iter().map(|&(_, i)| i).collect();
                    crate::paged::cap_for(at_least, &inners, crate::paged::granularity(gpu)?)
                }
            }
        };
        for (st, &(rows, inner)) in exe.inplace.iter().zip(&rows_inner) {
            if let Some(pc) = states.paged.get_mut(&st.name) {
                if (pc.rows, pc.inner, pc.tokens) != (rows, inner, past as usize) {
                    return err(format!(
                        "state `{}` holds {} tokens in {} rows of {} bytes, the step expects {past} in {rows} of {inner}",
                        st.name, pc.tokens, pc.rows, pc.inner
                    ));
                }
                pc.set_cap(cap)?;
                pc.ensure(tokens)?;
                continue;
            }
            // a cache in the plain layout (from a prefill, or new) moves into pages once
            let src = states
                .bufs
                .get(&st.name)
                .ok_or_else(|| Error(format!("state `{}` is not on the GPU", st.name)))?;
            let width = past as usize * inner;
            if src.bytes < rows * width {
                return err(format!(
                    "state `{}` holds {} bytes on the GPU, the step needs {}",
                    st.name,
                    src.bytes,
                    rows * width
                ));
            }
            let mut pc = PagedCache::new(gpu, rows, inner, cap)?;
            pc.ensure(tokens)?;
            pc.copy_in(src.ptr(gpu), past as usize)?;
            states.bufs.remove(&st.name);
            states.paged.insert(st.name.clone(), pc);
        }
        let cap = cap as i64;
        let fits = self
            .fixed
            .borrow()
            .as_ref()
            .is_some_and(|f| f.batch == batch && f.seq == seq && f.cap == cap);
        if !fits {
            // free the old buffers first
            *self.fixed.borrow_mut() = None;
            *self.fixed.borrow_mut() = Some(self.make_fixed(&exe, env, batch, seq, cap)?);
        }
        let mut slot = self.fixed.borrow_mut();
        let fx = slot
            .as_mut()
            .ok_or_else(|| Error("internal: no fixed buffers".into()))?;
        let mut env = env.clone();
        if exe.symbols.iter().any(|s| s == passes::inplace::CAP) {
            env.insert(passes::inplace::CAP.to_string(), fx.cap);
        }
        let mut out_set = match fx.pool.pop() {
            Some(set) => set,
            None => {
                let mut set = HashMap::new();
                for (id, name) in &fx.state_out {
                    let b = &exe.plan.buffers[id.0 as usize];
                    let d = alloc(gpu, b.size_bytes(&fx.cap_env).map_err(Error)? as usize, name)?;
                    fx.ours.insert(d.ptr(gpu));
                    set.insert(name.clone(), d);
                }
                set
            }
        };

        // every buffer's address
        let mut addr = vec![0u64; exe.plan.buffers.len()];
        let mut from_pool = true;
        for (i, b) in exe.plan.buffers.iter().enumerate() {
            let id = BufferId(i as u32);
            if !fx.used[i] {
                continue;
            }
            addr[i] = match b.kind {
                BufferKind::Param => self.params[&id].ptr(gpu),
                BufferKind::Intermediate => fx.addr_intermediate[i]
                    .ok_or_else(|| Error(format!("buffer {} has no place in the arena", b.name)))?,
                BufferKind::Input => {
                    let t = inputs
                        .get(&b.name)
                        .ok_or_else(|| Error(format!("input `{}` was not given", b.name)))?;
                    let bytes = t.to_bytes();
                    let d = fx
                        .inputs
                        .get_mut(&id)
                        .ok_or_else(|| Error(format!("internal: no buffer for input {}", b.name)))?;
                    d.write_at(gpu, 0, &bytes)
                        .map_err(|e| Error(format!("input `{}`: {e}", b.name)))?;
                    d.ptr(gpu)
                }
                BufferKind::State => {
                    if let Some(pc) = states.paged.get(&b.name) {
                        // a paged cache: its address stays while it grows
                        pc.ptr()
                    } else {
                        let d = states
                            .bufs
                            .get(&b.name)
                            .ok_or_else(|| Error(format!("state `{}` is not on the GPU", b.name)))?;
                        let need = b.size_bytes(&env).map_err(Error)? as usize;
                        if d.bytes < need {
                            return err(format!(
                                "state `{}` holds {} bytes on the GPU, the step needs {need}",
                                b.name, d.bytes
                            ));
                        }
                        let p = d.ptr(gpu);
                        from_pool &= fx.ours.contains(&p);
                        p
                    }
                }
                BufferKind::Output => match fx.state_out.get(&id) {
                    Some(name) => out_set
                        .get(name)
                        .ok_or_else(|| Error(format!("internal: no buffer for state {name}")))?
                        .ptr(gpu),
                    None => fx
                        .outputs
                        .get(&id)
                        .ok_or_else(|| Error(format!("internal: no buffer for output {}", b.name)))?
                        .ptr(gpu),
                },
            };
        }
        let syms = self.put_syms(exe.symbols, &env)?;

        if let Some((repeats, t)) = timing {
            // launched one by one: once for the step, then timed (idempotent: the caches get
            // the same new tokens at the same places, the linear states go to other buffers)
            fx.last = None;
            let scratch = fx.scratch;
            let launch = |i: usize| self.launch(&exe.plan.kernels[i], &exe.kernels[i], &env, &addr, syms, scratch);
            for i in 0..exe.plan.kernels.len() {
                launch(i)?;
            }
            *t = self.time_launches(&exe.plan.kernels, repeats, launch)?;
        } else if from_pool {
            // a step between two sets of our buffers: replay (capture the first time)
            if !fx.graphs.contains_key(&addr) {
                if fx.graphs.len() >= MAX_GRAPHS {
                    fx.graphs.clear();
                }
                let mode = cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
                gpu.stream
                    .begin_capture(mode)
                    .map_err(|e| Error(format!("starting a CUDA graph capture: {e}")))?;
                let mut launched = Ok(());
                for ((k, l), grid) in exe.plan.kernels.iter().zip(exe.kernels).zip(&fx.grids) {
                    let zero = l.scratch_zero.eval(&fx.cap_env).map_err(Error);
                    launched = zero.and_then(|z| self.launch_grid(k, l, *grid, &addr, syms, (fx.scratch, z as u64)));
                    if launched.is_err() {
                        break;
                    }
                }
                let graph = gpu
                    .stream
                    .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                    .map_err(|e| Error(format!("capturing the step as a CUDA graph: {e}")));
                launched?;
                let graph = graph?.ok_or_else(|| Error("the CUDA graph capture recorded nothing".into()))?;
                fx.graphs.insert(addr.clone(), graph);
            }
            fx.graphs[&addr]
                .launch()
                .map_err(|e| Error(format!("replaying the step's CUDA graph: {e}")))?;
            fx.last = Some(addr.clone());
        } else {
            fx.last = None;
            for (k, l) in exe.plan.kernels.iter().zip(exe.kernels) {
                self.launch(k, l, &env, &addr, syms, fx.scratch)?;
            }
        }
        gpu.stream.synchronize().map_err(|e| {
            Error(format!(
                "a kernel failed during the step: {e} (RINGJIT_DEBUG=1 synchronises after every launch and names it)"
            ))
        })?;

        let mut out = HashMap::new();
        for o in &exe.plan.outputs {
            if o.kind == ir::op::InputKind::State {
                continue;
            }
            let b = &exe.plan.buffers[o.buffer.0 as usize];
            let shape = eval_shape(&o.shape, &env).map_err(Error)?;
            let d = fx
                .outputs
                .get(&o.buffer)
                .ok_or_else(|| Error(format!("internal: no buffer for output {}", o.name)))?;
            let bytes = b.size_bytes(&env).map_err(Error)? as usize;
            let t = if b.dtype == ir::DType::F32 {
                // straight into the f32s (the logits: 0.6 MB a sequence)
                let mut host = vec![0f32; bytes / 4];
                // SAFETY: a f32 slice viewed as its bytes (any bit pattern is a valid f32).
                let raw = unsafe { std::slice::from_raw_parts_mut(host.as_mut_ptr().cast::<u8>(), bytes) };
                gpu.stream
                    .memcpy_dtoh(&d.slice.slice(0..bytes), raw)
                    .map_err(|e| Error(format!("copying {} from the GPU: {e}", o.name)))?;
                Tensor::from_f32(ir::DType::F32, shape, host)
            } else {
                let mut host = vec![0u8; bytes];
                gpu.stream
                    .memcpy_dtoh(&d.slice.slice(0..bytes), &mut host)
                    .map_err(|e| Error(format!("copying {} from the GPU: {e}", o.name)))?;
                Tensor::from_bytes(b.dtype, shape, &host)
                    .ok_or_else(|| Error(format!("output {}: size mismatch", o.name)))?
            };
            out.insert(o.name.clone(), t);
        }
        // the caches grew in place
        for st in exe.inplace {
            if let Some(pc) = states.paged.get_mut(&st.name) {
                pc.tokens += seq as usize;
            }
        }
        // the new states in, the old ones back to the pool when they are ours and whole
        let mut old = HashMap::new();
        for (name, d) in out_set.drain() {
            if let Some(prev) = states.bufs.insert(name.clone(), d) {
                old.insert(name, prev);
            }
        }
        let reusable = old.len() == fx.state_out.len()
            && old.iter().all(|(name, d)| {
                fx.ours.contains(&d.ptr(gpu))
                    && fx.state_out.iter().any(|(id, n)| {
                        n == name
                            && exe.plan.buffers[id.0 as usize]
                                .size_bytes(&fx.cap_env)
                                .is_ok_and(|want| want as usize == d.bytes)
                    })
            });
        if reusable && fx.pool.len() < MAX_GRAPHS {
            fx.pool.push(old);
        } else {
            for d in old.values() {
                fx.ours.remove(&d.ptr(gpu));
            }
        }
        Ok(out)
    }

    /// A copy of a non-owned buffer's bytes on the device (a parameter, a state or an arena
    /// slice handed out as an output).
    fn buffer_slice(&self, id: BufferId, addr: &[u64], bytes: usize) -> Result<CudaSlice<u8>> {
        let gpu = &*self.gpu;
        let b = &self.plan.buffers[id.0 as usize];
        let d = alloc(gpu, bytes, &b.name)?;
        let src = addr[id.0 as usize];
        // SAFETY: `src` is the address of a live allocation of at least `bytes` bytes (a
        // parameter, a state, or the arena), and `d` holds `bytes`.
        unsafe {
            let (dst, _s) = d.slice.device_ptr(&gpu.stream);
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, gpu.stream.cu_stream())
                .map_err(|e| Error(format!("copying {}: {e}", b.name)))?;
        }
        Ok(d.slice)
    }

    /// Runs kernel `index` alone (a kernel test): every buffer it reads or writes is uploaded
    /// from `mem` (zeros where absent; parameters are the plan's own), and the buffers it
    /// writes are returned.
    pub fn run_kernel(
        &self,
        index: usize,
        env: &DimEnv,
        mem: &HashMap<BufferId, Tensor>,
    ) -> Result<HashMap<BufferId, Tensor>> {
        let gpu = &*self.gpu;
        let k = &self.plan.kernels[index];
        let l = &self.kernels[index];
        let mut owned: HashMap<BufferId, DeviceBuf> = HashMap::new();
        let mut addr = vec![0u64; self.plan.buffers.len()];
        for r in k.inputs.iter().chain(&k.outputs) {
            let id = r.buffer;
            if owned.contains_key(&id) {
                continue;
            }
            let b = &self.plan.buffers[id.0 as usize];
            if b.kind == BufferKind::Param {
                addr[id.0 as usize] = self.params[&id].ptr(gpu);
                continue;
            }
            let d = match mem.get(&id) {
                Some(t) => upload(gpu, t, &b.name)?,
                None => alloc(gpu, b.size_bytes(env).map_err(Error)? as usize, &b.name)?,
            };
            addr[id.0 as usize] = d.ptr(gpu);
            owned.insert(id, d);
        }
        let scratch_ptr = self.scratch_for(std::iter::once(l), env)?;
        let syms = self.put_syms(&self.symbols, env)?;
        self.launch(k, l, env, &addr, syms, scratch_ptr)?;
        gpu.stream
            .synchronize()
            .map_err(|e| Error(format!("{}: failed: {e}", k.name)))?;
        let mut out = HashMap::new();
        for r in &k.outputs {
            let b = &self.plan.buffers[r.buffer.0 as usize];
            let shape = eval_shape(&b.shape, env).map_err(Error)?;
            out.insert(r.buffer, download(gpu, &owned[&r.buffer], b.dtype, shape, &b.name)?);
        }
        Ok(out)
    }

    /// The symbols' values in the kernels' parameter order (docs/kernel-abi.md).
    fn sym_values(symbols: &[String], env: &DimEnv) -> Result<Vec<u64>> {
        symbols
            .iter()
            .map(|s| {
                env.get(s)
                    .map(|&v| v as u64)
                    .ok_or_else(|| Error(format!("symbolic dimension `{s}` has no value")))
            })
            .collect()
    }

    /// Copies the symbols' values under `env` into the plan's symbol array on the device
    /// (stream-ordered: kernels launched before still see their own values) and returns its
    /// address.
    fn put_syms(&self, symbols: &[String], env: &DimEnv) -> Result<u64> {
        let vals = Self::sym_values(symbols, env)?;
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        // one fixed allocation: captured graphs keep its address
        if bytes.len() > 256 {
            return err(format!("{} symbolic dims: at most 32 are supported", vals.len()));
        }
        self.ensure(&self.syms, 256, "the symbol array")?;
        let mut slot = self.syms.borrow_mut();
        let d = slot.as_mut().ok_or_else(|| Error("no symbol array".into()))?;
        if !bytes.is_empty() {
            d.write_at(&self.gpu, 0, &bytes)?;
        }
        Ok(d.ptr(&self.gpu))
    }

    fn ensure(&self, slot: &RefCell<Option<DeviceBuf>>, bytes: usize, what: &str) -> Result<()> {
        let small = slot.borrow().as_ref().is_none_or(|a| a.bytes < bytes);
        if small && bytes > 0 {
            *slot.borrow_mut() = None; // free the old one first
            *slot.borrow_mut() = Some(alloc(&self.gpu, bytes, what)?);
        }
        Ok(())
    }

    /// Both scratch buffers, large enough for `kernels` under `env`.
    fn scratch_for<'l>(&self, kernels: impl Iterator<Item = &'l Loaded>, env: &DimEnv) -> Result<Scratch> {
        let need = scratch_needs(kernels, env)?;
        self.ensure(&self.scratch, need.0, "kernel scratch space")?;
        self.ensure(&self.counters, need.1, "kernel arrival counters")?;
        let ptr = |slot: &RefCell<Option<DeviceBuf>>, n: usize| match n {
            0 => 0,
            _ => slot.borrow().as_ref().map(|a| a.ptr(&self.gpu)).unwrap_or(0),
        };
        Ok(Scratch {
            shared: ptr(&self.scratch, need.0),
            counters: ptr(&self.counters, need.1),
        })
    }

    fn launch(&self, k: &Kernel, l: &Loaded, env: &DimEnv, addr: &[u64], syms: u64, scratch: Scratch) -> Result<()> {
        let grid = l.launch.eval(env).map_err(|e| Error(format!("{}: {e}", k.name)))?;
        let zero = l
            .scratch_zero
            .eval(env)
            .map_err(|e| Error(format!("{}: {e}", k.name)))? as u64;
        self.launch_grid(k, l, grid, addr, syms, (scratch, zero))
    }

    /// Launches `k` on `grid`; `scratch` holds the scratch pointers (the kernel gets the
    /// counters' when its scratch is counters) and `zero` how many leading bytes of the shared
    /// one to zero first (stream-ordered, so a captured graph replays it too).
    fn launch_grid(
        &self,
        k: &Kernel,
        l: &Loaded,
        grid: [u64; 3],
        addr: &[u64],
        syms: u64,
        (scratch, zero): (Scratch, u64),
    ) -> Result<()> {
        if grid.contains(&0) {
            return Ok(()); // nothing to do under this binding (e.g. an empty cache)
        }
        let scratch = if l.counters { scratch.counters } else { scratch.shared };
        if zero > 0 && scratch != 0 && !l.counters {
            // SAFETY: the scratch allocation holds at least `l.scratch` bytes under this
            // binding, and `scratch_zero` never exceeds `scratch`.
            unsafe { cudarc::driver::result::memset_d8_async(scratch, 0, zero as usize, self.gpu.stream.cu_stream()) }
                .map_err(|e| Error(format!("{}: zeroing scratch: {e}", k.name)))?;
        }
        let to_u32 =
            |g: u64| u32::try_from(g).map_err(|_| Error(format!("{}: a grid of {g} blocks is too large", k.name)));
        let cfg = LaunchConfig {
            grid_dim: (to_u32(grid[0])?, to_u32(grid[1])?, to_u32(grid[2])?),
            block_dim: (l.launch.block[0], l.launch.block[1], l.launch.block[2]),
            shared_mem_bytes: l.launch.shared_bytes,
        };
        let mut args: Vec<u64> = Vec::with_capacity(k.inputs.len() + k.outputs.len() + 2);
        args.extend(k.inputs.iter().map(|r| addr[r.buffer.0 as usize]));
        args.extend(k.outputs.iter().map(|r| addr[r.buffer.0 as usize]));
        args.push(syms);
        args.push(scratch);
        let t0 = (self.debug >= 2).then(std::time::Instant::now);
        // SAFETY: the kernel follows docs/kernel-abi.md: it reads and writes only the buffers
        // whose addresses it is given, within their sizes under `env`, which the arena plan and
        // the allocations above provide; a programmatic dependent waits for its predecessor
        // before its first access to any of them (`griddepcontrol.wait` at its entry).
        if l.pdl && pdl_enabled() {
            unsafe { self.launch_dependent(l, &cfg, &mut args) }
        } else {
            let mut b = self.gpu.stream.launch_builder(&l.func);
            for a in &args {
                b.arg(a);
            }
            unsafe { b.launch(cfg) }.map(|_| ())
        }
        .map_err(|e| Error(format!("{}: launch failed: {e}", k.name)))?;
        if self.debug >= 1 {
            self.gpu
                .stream
                .synchronize()
                .map_err(|e| Error(format!("{}: failed: {e}", k.name)))?;
            match t0 {
                Some(t0) => eprintln!(
                    "[ringjit] launch {} grid {:?} block {:?}: {:.1} µs",
                    k.name,
                    cfg.grid_dim,
                    cfg.block_dim,
                    t0.elapsed().as_secs_f64() * 1e6
                ),
                None => eprintln!(
                    "[ringjit] launch {} grid {:?} block {:?}",
                    k.name, cfg.grid_dim, cfg.block_dim
                ),
            }
        }
        Ok(())
    }

    /// `cuLaunchKernelEx` of `l` with programmatic stream serialization allowed (its 64-bit
    /// arguments `args`, as the plain launch passes them).
    ///
    /// # Safety
    /// As for any launch: `args` must be what the kernel's ABI expects.
    unsafe fn launch_dependent(
        &self,
        l: &Loaded,
        cfg: &LaunchConfig,
        args: &mut [u64],
    ) -> std::result::Result<(), cudarc::driver::DriverError> {
        use cudarc::driver::sys;
        self.gpu.ctx.bind_to_thread()?;
        let mut params: Vec<*mut std::ffi::c_void> = args
            .iter_mut()
            .map(|a| a as *mut u64 as *mut std::ffi::c_void)
            .collect();
        // SAFETY: a plain-old-data C struct, all zeros is a valid value
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.gpu.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: `config`, `attr` and `params` outlive the call; the function handle is kept
        // alive by `l`'s module; the caller vouches for the arguments
        unsafe {
            sys::cuLaunchKernelEx(&config, l.func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result()
        }
    }
}

/// `f(0) .. f(n - 1)` on up to `threads` threads, each taking the next index as it finishes,
/// results in index order.
fn par_map<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    std::thread::scope(|sc| {
        for _ in 0..threads.min(n) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(slot) = slots.get(i) else { break };
                *slot.lock().expect("a result slot") = Some(f(i));
            });
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .expect("a result slot")
                .expect("every index is taken once")
        })
        .collect()
}

/// Compiles (through the PTX caches) and loads every kernel of `plan`.
fn load_kernels(gpu: &Arc<Gpu>, plan: &KernelPlan, opts: &PtxOptions, cache: &mut CacheStats) -> Result<Vec<Loaded>> {
    let mut kernels = Vec::with_capacity(plan.kernels.len());
    for k in &plan.kernels {
        if let KernelKind::Scan(_) = k.kind {
            return err(format!(
                "{}: a recurrence the rewrite passes did not replace runs only on the cpu and reference \
                     devices (compile with fusion on: drop --no-fuse)",
                k.name
            ));
        }
    }
    // LLVM compiles kernels independently (a context per kernel): spread them over the cores
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(16);
    let compiled_all = par_map(plan.kernels.len(), threads, |i| ptx_of(plan, &plan.kernels[i], opts));
    let compiled = compiled_all.into_iter().collect::<Result<Vec<PtxKernel>>>()?;
    // kernels alike but for their names (the same kernel in every layer) share a module: the
    // driver loads each distinct body once, the distinct ones in parallel (its PTX → SASS
    // compile is most of a cold start)
    let keys: Vec<u64> = compiled
        .iter()
        .map(|c| {
            let mut h = DefaultHasher::new();
            c.body.hash(&mut h);
            h.finish()
        })
        .collect();
    let mut todo: Vec<(u64, usize)> = Vec::new();
    {
        let have = module_cache().lock().expect("module cache");
        let mut seen = std::collections::HashSet::new();
        for (i, &key) in keys.iter().enumerate() {
            if !have.contains_key(&key) && seen.insert(key) {
                todo.push((key, i));
            }
        }
    }
    let loaded_all = par_map(todo.len(), threads, |j| {
        let i = todo[j].1;
        gpu.load_ptx(&compiled[i].body)
            .map_err(|e| Error(format!("{}: {e}", plan.kernels[i].name)))
    });
    for (&(key, _), m) in todo.iter().zip(loaded_all) {
        module_cache().lock().expect("module cache").insert(key, m?);
    }
    cache.compiled += todo.len();
    cache.memory_hits += plan.kernels.len() - todo.len();
    for ((k, compiled), key) in plan.kernels.iter().zip(compiled).zip(keys) {
        let module = module_cache()
            .lock()
            .expect("module cache")
            .get(&key)
            .cloned()
            .ok_or_else(|| Error(format!("internal: {}: no module", k.name)))?;
        let func = module.load_function(codegen::ptx::ENTRY).map_err(|e| {
            Error(format!(
                "{}: no entry `{}` in its PTX: {e}",
                k.name,
                codegen::ptx::ENTRY
            ))
        })?;
        // past 48 KB of shared memory a block (dynamic, as the launch asks, plus the kernel's
        // static arrays) the kernel must opt in to its dynamic size
        let static_bytes = func
            .shared_size_bytes()
            .map_err(|e| Error(format!("{}: its static shared memory: {e}", k.name)))?;
        if compiled.launch.shared_bytes > 0 && compiled.launch.shared_bytes as u64 + static_bytes as u64 > 48 * 1024 {
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                compiled.launch.shared_bytes as i32,
            )
            .map_err(|e| {
                Error(format!(
                    "{}: asks for {} bytes of shared memory: {e}",
                    k.name, compiled.launch.shared_bytes
                ))
            })?;
        }
        kernels.push(Loaded {
            func,
            launch: compiled.launch,
            scratch: compiled.scratch_bytes,
            scratch_zero: compiled.scratch_zero,
            counters: compiled.scratch_counters,
            pdl: compiled.body.contains("griddepcontrol.wait"),
            _module: module,
        });
    }
    Ok(kernels)
}

/// Whether `plan` can run over fixed buffers sized for a capacity (and so as a CUDA graph):
/// every carried state and other output is written by a kernel into a buffer of its own, and
/// a kernel whose grid grows with a symbol other than `batch`/`seq` is a loop kernel (loop
/// kernels skip work past their extent, so a grid made for the capacity is safe).
fn fixable(plan: &KernelPlan, kernels: &[Loaded]) -> std::result::Result<(), String> {
    let mut states_in: Vec<&str> = plan
        .buffers
        .iter()
        .filter(|b| b.kind == BufferKind::State)
        .map(|b| b.name.as_str())
        .collect();
    let mut states_out = Vec::new();
    for o in &plan.outputs {
        let b = &plan.buffers[o.buffer.0 as usize];
        let in_place = o.kind == ir::op::InputKind::State && b.kind == BufferKind::State && b.name == o.name;
        if b.kind != BufferKind::Output && !in_place {
            return Err(format!("output {} is not written by a kernel of its own", o.name));
        }
        if o.kind == ir::op::InputKind::State {
            states_out.push(o.name.as_str());
        }
    }
    states_in.sort_unstable();
    states_out.sort_unstable();
    if states_in != states_out {
        return Err("the carried states in and out differ".into());
    }
    for (k, l) in plan.kernels.iter().zip(kernels) {
        let grows = l
            .launch
            .grid
            .iter()
            .any(|g| g.extent.symbols().any(|s| s != "batch" && s != "seq"));
        if grows && !matches!(k.kind, KernelKind::Loop(_)) {
            return Err(format!("{}: its grid grows with the context", k.name));
        }
    }
    Ok(())
}

/// A model on one GPU: the prefill and the decode plans over one copy of the weights.
pub struct CudaModel {
    pub weights: GpuWeights,
    prefill: CudaPlan,
    decode: CudaPlan,
    /// The decode plan of batches up to [`crate::cuda::FOLD_BATCH`], when it differs
    /// ([`crate::cuda::FoldNorms::SmallBatches`]: norms folded into their GEMMs).
    decode_small: Option<CudaPlan>,
}

/// The graphs a cuda model runs, compiled for the device: prefill, decode, and (under
/// [`crate::cuda::FoldNorms::SmallBatches`], when the graph has norms to fold) the decode graph
/// of batches up to [`crate::cuda::FOLD_BATCH`] with the norms folded into their GEMMs.
pub struct CudaGraphs {
    pub prefill: Graph,
    pub decode: Graph,
    pub decode_small: Option<Graph>,
    /// the passes' reports of `prefill` and `decode`
    pub reports: Vec<passes::PassReport>,
}

impl CudaGraphs {
    /// Runs the passes as the cuda device wants them (`RINGJIT_FOLD_NORM`, and the q/k fold
    /// only where the PTX step kernels have it).
    pub fn compile(graph: &Graph, fuse: bool, precision: passes::Precision) -> Result<CudaGraphs> {
        let compile = |mode, fold_norms| {
            let co = passes::CompileOptions {
                mode,
                fuse,
                precision,
                fold_norms,
                fold_qk_norms: codegen::ptx::folds_qk_norms(),
                ..Default::default()
            };
            passes::compile(graph, &co).map_err(|e| Error(format!("compiling the model: {e}")))
        };
        let (prefill, rp) = compile(passes::Mode::Prefill, crate::cuda::fold_norms())?;
        let (decode, rd) = compile(passes::Mode::Decode, crate::cuda::fold_norms())?;
        let decode_small = match fuse && crate::cuda::fold_small_batches() {
            true => Some(compile(passes::Mode::Decode, true)?.0).filter(|g| {
                g.g.node_weights()
                    .any(|n| matches!(n.op, Op::Fused(ir::fused::Fused::NormMatmul { .. })))
            }),
            false => None,
        };
        Ok(CudaGraphs {
            prefill,
            decode,
            decode_small,
            reports: vec![rp, rd],
        })
    }
}

impl CudaModel {
    /// Partitions and loads the compiled graphs.
    pub fn new(weights: GpuWeights, graphs: &CudaGraphs, opts: &PtxOptions) -> Result<CudaModel> {
        let part = |g: &Graph| passes::partition::partition(g).map_err(|e| Error(format!("kernel partition: {e}")));
        let prefill = CudaPlan::new(&weights, &graphs.prefill, part(&graphs.prefill)?, opts)?;
        let dopts = PtxOptions {
            prefill: false,
            ..opts.clone()
        };
        let decode_plan = |g: &Graph| CudaPlan::new(&weights, g, part(g)?, &dopts)?.for_decode();
        let decode_small = graphs.decode_small.as_ref().map(decode_plan).transpose()?;
        let decode = decode_plan(&graphs.decode)?;
        Ok(CudaModel {
            weights,
            prefill,
            decode,
            decode_small,
        })
    }

    /// Turns the decode steps' CUDA graphs on or off (on by default; see
    /// [`CudaPlan::set_graphs`]); returns whether they are on.
    pub fn set_graphs(&self, on: bool) -> bool {
        if let Some(p) = &self.decode_small {
            p.set_graphs(on);
        }
        self.decode.set_graphs(on)
    }

    /// The decode plan of batches above [`crate::cuda::FOLD_BATCH`] (of every batch when there
    /// is no second plan), for tests and the benchmark.
    pub fn decode_plan(&self) -> &CudaPlan {
        &self.decode
    }

    /// The prefill plan (for the benchmark).
    pub fn prefill_plan(&self) -> &CudaPlan {
        &self.prefill
    }

    /// The decode plan a step of `batch` sequences runs.
    pub fn decode_plan_for(&self, batch: usize) -> &CudaPlan {
        match &self.decode_small {
            Some(p) if batch <= crate::cuda::FOLD_BATCH => p,
            _ => &self.decode,
        }
    }

    /// Fresh device states from host tensors (zeros for a new sequence).
    pub fn states(&self, host: &HashMap<String, Tensor>) -> Result<DeviceStates> {
        let mut bufs = HashMap::new();
        for (name, t) in host {
            bufs.insert(name.clone(), upload(self.weights.gpu(), t, name)?);
        }
        Ok(DeviceStates::new(bufs))
    }

    /// One step of `seq` tokens per sequence for `batch` sequences holding `past` tokens.
    /// The states are replaced by the step's new ones; returns the non-state outputs.
    pub fn step(
        &self,
        states: &mut DeviceStates,
        tokens: Tensor,
        batch: usize,
        seq: usize,
        past: usize,
    ) -> Result<HashMap<String, Tensor>> {
        let env: DimEnv = [
            ("batch".to_string(), batch as i64),
            ("seq".to_string(), seq as i64),
            ("past".to_string(), past as i64),
        ]
        .into();
        let plan = if seq == 1 {
            self.decode_plan_for(batch)
        } else {
            &self.prefill
        };
        let inputs: HashMap<String, Tensor> = [("tokens".to_string(), tokens)].into();
        plan.run(&env, &inputs, states)
    }

    /// The states back on the host (for tests and for moving a sequence off the GPU).
    pub fn download_states(
        &self,
        states: &DeviceStates,
        specs: &[(String, ir::DType, Vec<usize>)],
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, dtype, shape) in specs {
            let gpu = self.weights.gpu();
            let t = match states.paged.get(name) {
                // a paged cache: its valid tokens, row by row
                Some(pc) => download(gpu, &plain_copy(gpu, pc, name)?, *dtype, shape.clone(), name)?,
                None => {
                    let d = states
                        .bufs
                        .get(name)
                        .ok_or_else(|| Error(format!("state `{name}` is not on the GPU")))?;
                    download(gpu, d, *dtype, shape.clone(), name)?
                }
            };
            out.insert(name.clone(), t);
        }
        Ok(out)
    }
}
