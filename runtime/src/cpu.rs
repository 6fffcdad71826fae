//! The CPU device: a compiled graph's kernel plan run on host memory, on all cores.
//!
//! [`CpuExec::new`] partitions a compiled graph into a kernel plan, compiles every kernel once
//! (`codegen::cpu`), and uploads the parameters once in their dtype (checkpoint weights, and
//! the constants the passes folded into `Op::Literal` nodes). [`CpuExec::run`] takes the same
//! inputs as `ir::interp::Interpreter::run` (tokens, KV caches, linear states by name) and
//! returns the graph's outputs by name, so the engine keeps one state layout for every device.
//! Each run binds the symbolic dims from the inputs' shapes, lays the intermediates out in one
//! arena (`passes::memplan`), and runs the kernels in order; each kernel's parallel extent is
//! split over a thread pool of `available_parallelism()` threads.

use crate::{err, Error, Result};
use codegen::cpu::host::{load_elem, store_elem};
use codegen::cpu::{compile_plan, BufPtr, CpuKernelBody, CpuPlan, Launch, ParFor};
use ir::graph::Graph;
use ir::interp::ParamSource;
use ir::kernel::{BufferId, BufferKind, KernelPlan};
use ir::op::Op;
use ir::shape::DimEnv;
use ir::{DType, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Heap memory aligned to 256 bytes (docs/kernel-abi.md, "Memory"), zeroed.
pub struct HostBuf {
    ptr: *mut u8,
    len: usize,
}

unsafe impl Send for HostBuf {}
unsafe impl Sync for HostBuf {}

const ALIGN: usize = 256;

impl HostBuf {
    pub fn zeroed(len: usize) -> HostBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), ALIGN).expect("buffer layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        HostBuf { ptr, len }
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// A tensor's elements in `dtype`.
    pub fn from_tensor(t: &Tensor, dtype: DType) -> HostBuf {
        if let (Some(f), true) = (t.as_f32(), dtype == DType::F32) {
            let b = HostBuf::zeroed(f.len() * 4);
            // SAFETY: the buffer holds f.len() f32s.
            unsafe { std::ptr::copy_nonoverlapping(f.as_ptr(), b.ptr as *mut f32, f.len()) };
            return b;
        }
        if let (Some(f), true) = (t.as_f32(), dtype == DType::BF16) {
            let b = HostBuf::zeroed(f.len() * 2);
            for (i, x) in f.iter().enumerate() {
                // SAFETY: the buffer holds f.len() bf16s.
                unsafe { *(b.ptr as *mut u16).add(i) = half::bf16::from_f32(*x).to_bits() };
            }
            return b;
        }
        let data = t.to_f64_vec();
        let b = HostBuf::zeroed(data.len() * dtype.size_bytes());
        for (i, x) in data.iter().enumerate() {
            // SAFETY: the buffer holds data.len() elements of dtype.
            unsafe { store_elem(b.ptr, dtype, i, *x) };
        }
        b
    }

    /// The first `n` elements as a tensor of `shape`.
    fn to_tensor(&self, dtype: DType, shape: Vec<usize>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n * dtype.size_bytes() > self.len {
            return err(format!("a buffer of {} bytes read as {n} x {dtype}", self.len));
        }
        if dtype.is_float() {
            // SAFETY: checked just above.
            let vals: Vec<f32> = match dtype {
                DType::F32 => unsafe { std::slice::from_raw_parts(self.ptr as *const f32, n) }.to_vec(),
                _ => (0..n)
                    .map(|i| unsafe { load_elem(self.ptr, dtype, i) } as f32)
                    .collect(),
            };
            return Ok(Tensor::from_f32(dtype, shape, vals));
        }
        // SAFETY: checked just above.
        let vals: Vec<f64> = (0..n).map(|i| unsafe { load_elem(self.ptr, dtype, i) }).collect();
        Ok(ir::kernel_eval::tensor(dtype, shape, &vals))
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(1), ALIGN).expect("buffer layout");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Parameters uploaded once, shared by every plan of a model (prefill and decode) by name.
#[derive(Default)]
pub struct ParamCache {
    loaded: HashMap<String, Arc<HostBuf>>,
}

/// A thread pool for the kernels' parallel extents.
pub struct Pool {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl Pool {
    pub fn new(threads: usize) -> Result<Pool> {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ringjit-cpu-{i}"))
            .build()
            .map_err(|e| Error(format!("thread pool: {e}")))?;
        Ok(Pool { pool, threads })
    }

    /// One thread per core the process may use.
    pub fn all_cores() -> Result<Pool> {
        Pool::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }
}

impl ParFor for Pool {
    fn threads(&self) -> usize {
        self.threads
    }

    fn run(&self, n: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        if n == 0 {
            return;
        }
        if n == 1 || self.threads == 1 {
            return f(0, n);
        }
        // a few pieces per thread, so uneven pieces balance
        let pieces = (self.threads * 4).min(n);
        self.pool.scope(|s| {
            for p in 0..pieces {
                let (lo, hi) = (n * p / pieces, n * (p + 1) / pieces);
                if lo < hi {
                    s.spawn(move |_| f(lo, hi));
                }
            }
        });
    }
}

/// A graph compiled for the CPU device.
pub struct CpuExec {
    plan: KernelPlan,
    compiled: CpuPlan,
    /// graph input names in `plan.inputs` order, with their declared shapes
    inputs: Vec<(String, Vec<ir::shape::Dim>)>,
    params: HashMap<BufferId, Arc<HostBuf>>,
    pool: Arc<Pool>,
    /// the arena of the last run, reused while big enough
    arena: Mutex<Option<HostBuf>>,
}

impl CpuExec {
    /// Partitions and compiles `graph` (already through `passes::compile`), uploads its
    /// parameters (from `cache` when another plan of the model loaded them).
    pub fn new(graph: &Graph, weights: &dyn ParamSource, cache: &mut ParamCache, pool: Arc<Pool>) -> Result<CpuExec> {
        let plan = passes::partition::partition(graph).map_err(|e| Error(format!("partitioning the graph: {e}")))?;
        let compiled = compile_plan(&plan).map_err(|e| Error(format!("cpu codegen: {e}")))?;
        if let Some(k) = compiled
            .kernels
            .iter()
            .find(|k| matches!(k.body, CpuKernelBody::Scan { .. }))
        {
            return err(format!(
                "{}: scan kernels (recurrences the rewrite passes kept) do not run on the cpu device yet; \
                 compile with fusion on, or use --device reference",
                k.name
            ));
        }
        let specs = graph.params().map_err(Error)?;
        let mut params = HashMap::new();
        for (i, b) in plan.buffers.iter().enumerate() {
            if b.kind != BufferKind::Param {
                continue;
            }
            let id = BufferId(i as u32);
            let node = graph.node(b.value.node);
            let buf = if let Op::Literal { value } = &node.op {
                Arc::new(HostBuf::from_tensor(value, b.dtype))
            } else if let Some(hb) = cache.loaded.get(&b.name) {
                hb.clone()
            } else {
                let spec = specs
                    .iter()
                    .find(|s| s.name == b.name)
                    .ok_or_else(|| Error(format!("parameter `{}` is not among the graph's parameters", b.name)))?;
                let t = weights.load(spec).map_err(Error)?;
                let hb = Arc::new(HostBuf::from_tensor(&t, b.dtype));
                cache.loaded.insert(b.name.clone(), hb.clone());
                hb
            };
            params.insert(id, buf);
        }
        let mut inputs = Vec::new();
        for &n in &graph.inputs {
            if let Op::Input { name, shape, .. } = &graph.node(n).op {
                inputs.push((name.clone(), shape.clone()));
            }
        }
        Ok(CpuExec {
            plan,
            compiled,
            inputs,
            params,
            pool,
            arena: Mutex::new(None),
        })
    }

    pub fn plan(&self) -> &KernelPlan {
        &self.plan
    }

    /// The symbolic dims from the inputs' shapes: a declared dim that is one symbol binds it.
    fn bind(&self, inputs: &HashMap<String, Tensor>) -> Result<DimEnv> {
        let mut env = DimEnv::new();
        for (name, shape) in &self.inputs {
            let t = inputs
                .get(name)
                .ok_or_else(|| Error(format!("missing input `{name}`")))?;
            if t.shape.len() != shape.len() {
                return err(format!(
                    "input `{name}` has rank {}, expected {}",
                    t.shape.len(),
                    shape.len()
                ));
            }
            for (d, &n) in shape.iter().zip(&t.shape) {
                if let Some(s) = d.as_sym() {
                    if let Some(&old) = env.get(s) {
                        if old != n as i64 {
                            return err(format!("input `{name}` binds `{s}` to {n}, but it is {old}"));
                        }
                    }
                    env.insert(s.to_string(), n as i64);
                }
            }
        }
        for (name, shape) in &self.inputs {
            let want = ir::shape::eval_shape(shape, &env).map_err(Error)?;
            if want != inputs[name].shape {
                return err(format!(
                    "input `{name}` has shape {:?}, expected {want:?}",
                    inputs[name].shape
                ));
            }
        }
        Ok(env)
    }

    /// Runs the plan on `inputs` (by graph input name); returns every graph output by name.
    pub fn run(&self, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        let t_start = std::time::Instant::now();
        let env = self.bind(inputs)?;
        let syms: Vec<i64> = self
            .compiled
            .symbols
            .iter()
            .map(|s| {
                env.get(s)
                    .copied()
                    .ok_or_else(|| Error(format!("symbol `{s}` has no value")))
            })
            .collect::<Result<_>>()?;
        let mem = passes::memplan::plan(&self.plan, &env).map_err(Error)?;
        let mut arena_guard = self.arena.lock().map_err(|e| Error(e.to_string()))?;
        let need = mem.arena_peak_bytes as usize;
        if arena_guard.as_ref().is_none_or(|a| a.len < need) {
            *arena_guard = Some(HostBuf::zeroed(need));
        }
        let arena = arena_guard.as_ref().expect("arena").ptr();
        let mut owned: HashMap<BufferId, HostBuf> = HashMap::new();
        let mut addr: HashMap<BufferId, *mut u8> = HashMap::new();
        for (&b, (name, _)) in self.plan.inputs.iter().zip(&self.inputs) {
            let dtype = self.plan.buffers[b.0 as usize].dtype;
            let hb = HostBuf::from_tensor(&inputs[name], dtype);
            addr.insert(b, hb.ptr());
            owned.insert(b, hb);
        }
        for (i, b) in self.plan.buffers.iter().enumerate() {
            let id = BufferId(i as u32);
            if addr.contains_key(&id) {
                continue;
            }
            let p = match b.kind {
                BufferKind::Param => self.params[&id].ptr(),
                BufferKind::Intermediate => match mem.offset(id) {
                    // SAFETY: the memory plan keeps every offset inside the arena.
                    Some(o) => unsafe { arena.add(o as usize) },
                    None => {
                        let hb = HostBuf::zeroed(b.size_bytes(&env).map_err(Error)? as usize);
                        let p = hb.ptr();
                        owned.insert(id, hb);
                        p
                    }
                },
                _ => {
                    let hb = HostBuf::zeroed(b.size_bytes(&env).map_err(Error)? as usize);
                    let p = hb.ptr();
                    owned.insert(id, hb);
                    p
                }
            };
            addr.insert(id, p);
        }
        let pool: &dyn ParFor = &*self.pool;
        let debug = passes::debug_level() >= 2;
        let t_setup = t_start.elapsed();
        for (k, ck) in self.plan.kernels.iter().zip(&self.compiled.kernels) {
            let bufs: Vec<BufPtr> = k
                .inputs
                .iter()
                .chain(&k.outputs)
                .map(|r| BufPtr(addr[&r.buffer]))
                .collect();
            let t0 = std::time::Instant::now();
            ck.run(&Launch {
                bufs: &bufs,
                syms: &syms,
                env: &env,
                par: pool,
            })
            .map_err(Error)?;
            if debug {
                eprintln!("[cpu] {:<40} {:>9.3} ms", ck.name, t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let mut outs = HashMap::new();
        for o in &self.plan.outputs {
            let b = &self.plan.buffers[o.buffer.0 as usize];
            let shape = ir::shape::eval_shape(&o.shape, &env).map_err(Error)?;
            let t = match owned.get(&o.buffer) {
                Some(hb) => hb.to_tensor(b.dtype, shape)?,
                None => {
                    // an output held in the arena or a parameter: copy it out
                    let n: usize = shape.iter().product();
                    let p = addr[&o.buffer];
                    // SAFETY: the buffer holds n elements of its dtype.
                    let vals: Vec<f64> = (0..n).map(|i| unsafe { load_elem(p, b.dtype, i) }).collect();
                    ir::kernel_eval::tensor(b.dtype, shape, &vals)
                }
            };
            outs.insert(o.name.clone(), t);
        }
        if debug {
            let total = t_start.elapsed().as_secs_f64() * 1e3;
            eprintln!(
                "[cpu] run {env:?}: {total:.3} ms, of which {:.3} ms binding, arena and input upload",
                t_setup.as_secs_f64() * 1e3
            );
        }
        Ok(outs)
    }
}
