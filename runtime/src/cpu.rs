//! The CPU device: a compiled graph's kernel plan run on host memory, on all cores.
//!
//! [`CpuExec::new`] partitions a compiled graph into a kernel plan, compiles every kernel once
//! (`codegen::cpu`), and uploads the parameters once in their dtype (checkpoint weights, and
//! the constants the passes folded into `Op::Literal` nodes). [`CpuExec::run`] takes the same
//! inputs as `ir::interp::Interpreter::run` (tokens, KV caches, linear states by name) and
//! returns the graph's outputs by name, so the engine keeps one state layout for every device.
//! Each run binds the symbolic dims from the inputs' shapes, lays the intermediates out in one
//! arena (`passes::memplan`), and runs the kernels in order; each kernel's parallel extent is
//! split over a thread pool of `available_parallelism()` threads. A scan kernel (a recurrence
//! the rewrite passes kept, as with `--no-fuse`) runs its compiled body plan once per step, as
//! `ir::kernel::ScanKernel` documents: carries and captured values copied in once, each step's
//! slice of the sequences copied in, the new carries copied back, each step's outputs copied
//! to their slice.

use crate::{err, Error, Result};
use codegen::cpu::host::{load_elem, store_elem, ConcreteView};
use codegen::cpu::{compile_plan, BufPtr, CpuKernel, CpuKernelBody, CpuPlan, Launch, ParFor};
use ir::graph::Graph;
use ir::interp::ParamSource;
use ir::kernel::{BufferId, BufferKind, Kernel, KernelPlan, ScanKernel};
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
                DType::BF16 => unsafe { std::slice::from_raw_parts(self.ptr as *const u16, n) }
                    .iter()
                    .map(|&b| f32::from_bits(u32::from(b) << 16))
                    .collect(),
                _ => (0..n)
                    .map(|i| unsafe { load_elem(self.ptr, dtype, i) } as f32)
                    .collect(),
            };
            // decoded from the dtype's storage: already representable
            return Ok(Tensor::from_f32_exact(dtype, shape, vals));
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

/// Parameters uploaded once, shared by every plan of a model (prefill and decode) by name, and
/// the template kernels' f32 forms of them, converted once for all the plans.
#[derive(Default)]
pub struct ParamCache {
    loaded: HashMap<String, Arc<HostBuf>>,
    pub converted: codegen::cpu::WeightCache,
}

/// A thread pool for the kernels' parallel extents.
pub struct Pool {
    /// the workers beside the calling thread (none for one thread)
    pool: Option<rayon::ThreadPool>,
    threads: usize,
}

impl Pool {
    pub fn new(threads: usize) -> Result<Pool> {
        let threads = threads.max(1);
        // the calling thread takes a share of every parallel extent (`run`)
        let pool = match threads {
            1 => None,
            _ => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads - 1)
                    .thread_name(|i| format!("ringjit-cpu-{i}"))
                    .build()
                    .map_err(|e| Error(format!("thread pool: {e}")))?,
            ),
        };
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
        let Some(pool) = self.pool.as_ref().filter(|_| n > 1) else {
            return f(0, n);
        };
        // a few pieces per thread, so uneven pieces balance, taken in turn by the calling
        // thread and the pool's (threads - 1) workers: the caller starts at once, and a small
        // extent may be done before a worker has woken
        let pieces = (self.threads * 4).min(n);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || loop {
            let p = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if p >= pieces {
                break;
            }
            let (lo, hi) = (n * p / pieces, n * (p + 1) / pieces);
            if lo < hi {
                f(lo, hi);
            }
        };
        pool.in_place_scope(|s| {
            for _ in 1..self.threads {
                s.spawn(|_| work());
            }
            work();
        });
    }
}

/// The parameter buffers of a plan by id, and those of its scan kernels' bodies (folded
/// constants of the body graphs) by kernel index.
#[derive(Default)]
struct PlanParams {
    bufs: HashMap<BufferId, Arc<HostBuf>>,
    scans: HashMap<usize, PlanParams>,
}

impl PlanParams {
    /// Uploads the parameters of `plan` (partitioned from `graph`), from `cache` when another
    /// plan of the model loaded them, recursing into scan bodies.
    fn load(graph: &Graph, plan: &KernelPlan, weights: &dyn ParamSource, cache: &mut ParamCache) -> Result<PlanParams> {
        let specs = graph.params().map_err(Error)?;
        let mut out = PlanParams::default();
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
            out.bufs.insert(id, buf);
        }
        for (i, k) in plan.kernels.iter().enumerate() {
            let ir::kernel::KernelKind::Scan(s) = &k.kind else {
                continue;
            };
            let body = k
                .nodes
                .iter()
                .find_map(|&n| match &graph.node(n).op {
                    Op::Scan { body, .. } => Some(body),
                    _ => None,
                })
                .ok_or_else(|| Error(format!("{}: no scan node among the kernel's nodes", k.name)))?;
            out.scans.insert(i, PlanParams::load(body, &s.body, weights, cache)?);
        }
        Ok(out)
    }
}

/// Addresses of a plan's buffers during one run.
type Addrs = HashMap<BufferId, *mut u8>;

/// Copies element `i` of `src` (of `sdt`) to element `j` of `dst` (of `ddt`).
///
/// # Safety
/// Both buffers hold those elements.
unsafe fn copy_elem(src: *const u8, sdt: DType, i: usize, dst: *mut u8, ddt: DType, j: usize) {
    if sdt == ddt {
        let n = sdt.size_bytes();
        std::ptr::copy_nonoverlapping(src.add(i * n), dst.add(j * n), n);
    } else {
        store_elem(dst, ddt, j, load_elem(src, sdt, i));
    }
}

/// `view` with its `axis` fixed at `t` (the axis removed).
fn slice_at(view: &ConcreteView, axis: usize, t: usize) -> Result<ConcreteView> {
    if axis >= view.shape.len() || t >= view.shape[axis] {
        return err(format!("slice {t} of axis {axis} of a view of shape {:?}", view.shape));
    }
    let mut v = view.clone();
    v.offset += t as i64 * v.strides[axis];
    v.shape.remove(axis);
    v.strides.remove(axis);
    Ok(v)
}

/// A graph compiled for the CPU device.
pub struct CpuExec {
    plan: KernelPlan,
    compiled: CpuPlan,
    /// graph input names in `plan.inputs` order, with their declared shapes
    inputs: Vec<(String, Vec<ir::shape::Dim>)>,
    params: PlanParams,
    pool: Arc<Pool>,
    /// the arena of the last run, reused while big enough
    arena: Mutex<Option<HostBuf>>,
}

impl CpuExec {
    /// Partitions and compiles `graph` (already through `passes::compile`), uploads its
    /// parameters (from `cache` when another plan of the model loaded them).
    pub fn new(graph: &Graph, weights: &dyn ParamSource, cache: &mut ParamCache, pool: Arc<Pool>) -> Result<CpuExec> {
        let plan = passes::partition::partition(graph).map_err(|e| Error(format!("partitioning the graph: {e}")))?;
        let mut compiled = compile_plan(&plan).map_err(|e| Error(format!("cpu codegen: {e}")))?;
        compiled.share_weights(&cache.converted);
        let params = PlanParams::load(graph, &plan, weights, cache)?;
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
                BufferKind::Param => self.params.bufs[&id].ptr(),
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
        let t_setup = t_start.elapsed();
        self.run_kernels(&self.plan, &self.compiled.kernels, &self.params, &addr, &env, &syms)?;
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
        if passes::debug_level() >= 2 {
            let total = t_start.elapsed().as_secs_f64() * 1e3;
            eprintln!(
                "[cpu] run {env:?}: {total:.3} ms, of which {:.3} ms binding, arena and input upload",
                t_setup.as_secs_f64() * 1e3
            );
        }
        Ok(outs)
    }

    /// Runs `kernels` (the compiled kernels of `plan`) in order on the buffers at `addr`.
    fn run_kernels(
        &self,
        plan: &KernelPlan,
        kernels: &[CpuKernel],
        params: &PlanParams,
        addr: &Addrs,
        env: &DimEnv,
        syms: &[i64],
    ) -> Result<()> {
        let pool: &dyn ParFor = &*self.pool;
        let debug = passes::debug_level() >= 2;
        for (i, (k, ck)) in plan.kernels.iter().zip(kernels).enumerate() {
            let t0 = std::time::Instant::now();
            if let CpuKernelBody::Scan { scan, body } = &ck.body {
                let bp = params
                    .scans
                    .get(&i)
                    .ok_or_else(|| Error(format!("{}: no body parameters", k.name)))?;
                self.run_scan(plan, k, scan, body, bp, addr, env, syms)
                    .map_err(|e| Error(format!("{}: {}", k.name, e.0)))?;
            } else {
                let bufs: Vec<BufPtr> = k
                    .inputs
                    .iter()
                    .chain(&k.outputs)
                    .map(|r| BufPtr(addr[&r.buffer]))
                    .collect();
                ck.run(&Launch {
                    bufs: &bufs,
                    syms,
                    env,
                    par: pool,
                })
                .map_err(Error)?;
            }
            if debug {
                eprintln!("[cpu] {:<40} {:>9.3} ms", ck.name, t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(())
    }

    /// A scan kernel: its body plan once per step (ir::kernel::ScanKernel). The body's inputs,
    /// outputs and intermediates get memory of their own (dense, in the body's layout); values
    /// cross between the scan's views and the body's buffers by element copies.
    #[allow(clippy::too_many_arguments)]
    fn run_scan(
        &self,
        plan: &KernelPlan,
        k: &Kernel,
        s: &ScanKernel,
        body: &CpuPlan,
        params: &PlanParams,
        addr: &Addrs,
        env: &DimEnv,
        syms: &[i64],
    ) -> Result<()> {
        let bp = &*s.body;
        let (n_carry, n_seq) = (s.n_carry, s.n_seq);
        if k.inputs.len() != bp.inputs.len() || k.outputs.len() != bp.outputs.len() || n_carry + n_seq > bp.inputs.len()
        {
            return err("the scan's operands do not match its body's inputs and outputs");
        }
        let len =
            usize::try_from(s.length.eval(env).map_err(Error)?).map_err(|_| Error("negative scan length".into()))?;
        // the body's memory
        let mem = passes::memplan::plan(bp, env).map_err(Error)?;
        let arena = HostBuf::zeroed(mem.arena_peak_bytes as usize);
        let mut owned: Vec<HostBuf> = Vec::new();
        let mut baddr: Addrs = HashMap::new();
        for (i, b) in bp.buffers.iter().enumerate() {
            let id = BufferId(i as u32);
            let p = match (b.kind, mem.offset(id)) {
                (BufferKind::Param, _) => params
                    .bufs
                    .get(&id)
                    .ok_or_else(|| Error(format!("body parameter `{}` not loaded", b.name)))?
                    .ptr(),
                // SAFETY: the memory plan keeps every offset inside the arena.
                (BufferKind::Intermediate, Some(o)) => unsafe { arena.ptr().add(o as usize) },
                _ => {
                    let hb = HostBuf::zeroed(b.size_bytes(env).map_err(Error)? as usize);
                    let p = hb.ptr();
                    owned.push(hb);
                    p
                }
            };
            baddr.insert(id, p);
        }
        let numel = |b: BufferId| -> Result<usize> {
            let n = bp.buffers[b.0 as usize].numel().eval(env).map_err(Error)?;
            Ok(n.max(0) as usize)
        };
        // copies a view of an outer buffer into a dense body buffer, or back
        let gather = |r: &ir::kernel::BufferRef, view: &ConcreteView, b: BufferId| -> Result<()> {
            let (sdt, ddt) = (plan.buffers[r.buffer.0 as usize].dtype, bp.buffers[b.0 as usize].dtype);
            if view.numel() != numel(b)? {
                return err(format!(
                    "a view of {} elements for a body buffer of {}",
                    view.numel(),
                    numel(b)?
                ));
            }
            let (src, dst) = (addr[&r.buffer], baddr[&b]);
            // SAFETY: the view lies in the outer buffer; the body buffer holds numel elements.
            view.for_each(|lin, a| unsafe { copy_elem(src, sdt, a, dst, ddt, lin) });
            Ok(())
        };
        let scatter = |b: BufferId, r: &ir::kernel::BufferRef, view: &ConcreteView| -> Result<()> {
            let (sdt, ddt) = (bp.buffers[b.0 as usize].dtype, plan.buffers[r.buffer.0 as usize].dtype);
            if view.numel() != numel(b)? {
                return err(format!(
                    "a body buffer of {} elements for a view of {}",
                    numel(b)?,
                    view.numel()
                ));
            }
            let (src, dst) = (baddr[&b], addr[&r.buffer]);
            // SAFETY: as in `gather`, the other way.
            view.for_each(|lin, a| unsafe { copy_elem(src, sdt, lin, dst, ddt, a) });
            Ok(())
        };
        let views_in: Vec<ConcreteView> = k
            .inputs
            .iter()
            .map(|r| ConcreteView::new(&r.view, env).map_err(Error))
            .collect::<Result<_>>()?;
        let views_out: Vec<ConcreteView> = k
            .outputs
            .iter()
            .map(|r| ConcreteView::new(&r.view, env).map_err(Error))
            .collect::<Result<_>>()?;
        // the initial carries and the captured values, once
        for (i, (r, v)) in k.inputs.iter().zip(&views_in).enumerate() {
            if i < n_carry || i >= n_carry + n_seq {
                gather(r, v, bp.inputs[i])?;
            }
        }
        for t in 0..len {
            for ((r, v), &b) in k.inputs.iter().zip(&views_in).zip(&bp.inputs).skip(n_carry).take(n_seq) {
                gather(r, &slice_at(v, s.axis, t)?, b)?;
            }
            self.run_kernels(bp, &body.kernels, params, &baddr, env, syms)?;
            // the new carries (all read before any is written: a body may swap them)
            let mut next = Vec::with_capacity(n_carry);
            for j in 0..n_carry {
                let (o, c) = (bp.outputs[j].buffer, bp.inputs[j]);
                let (sdt, ddt) = (bp.buffers[o.0 as usize].dtype, bp.buffers[c.0 as usize].dtype);
                let n = numel(c)?;
                if numel(o)? != n {
                    return err(format!("carry {j}: a body output of {} elements for {n}", numel(o)?));
                }
                let tmp = HostBuf::zeroed(n * ddt.size_bytes());
                for e in 0..n {
                    // SAFETY: both hold n elements.
                    unsafe { copy_elem(baddr[&o], sdt, e, tmp.ptr(), ddt, e) };
                }
                next.push((c, tmp, n * ddt.size_bytes()));
            }
            for (c, tmp, bytes) in next {
                // SAFETY: the carry's buffer holds `bytes`.
                unsafe { std::ptr::copy_nonoverlapping(tmp.ptr(), baddr[&c], bytes) };
            }
            for ((o, r), v) in bp.outputs.iter().zip(&k.outputs).zip(&views_out).skip(n_carry) {
                scatter(o.buffer, r, &slice_at(v, s.axis, t)?)?;
            }
        }
        for ((&b, r), v) in bp.inputs.iter().zip(&k.outputs).zip(&views_out).take(n_carry) {
            scatter(b, r, v)?;
        }
        drop(owned);
        Ok(())
    }
}
