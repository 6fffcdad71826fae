//! The CPU backend: kernel IR → Cranelift IR → native code (cranelift-jit). docs/cpu-backend.md
//! explains the design; docs/kernel-abi.md the calling convention.
//!
//! [`compile_plan`] turns every kernel of a [`KernelPlan`] into a [`CpuKernel`]:
//! - a loop kernel into one generated function of the ABI signature plus its parallel extent;
//! - a template kernel into a host driver ([`template`]) around generated code: its prologues
//!   and epilogue are generated functions like loop kernels, GEMMs run the generated SIMD
//!   micro-kernel ([`gemm`]), the row-wise, attention and linear-attention templates the
//!   generated row kernels ([`vector`]);
//! - a scan kernel into the compiled plan of its body, which the runtime runs once per step.
//!
//! The runtime (`runtime::cpu`) owns memory and threads: it calls [`CpuKernel::run`] with the
//! buffer addresses, the symbol values and a [`ParFor`] that spreads a range over its threads.

pub(crate) mod expr;
pub mod gemm;
pub mod host;
mod quant;
mod rows;
mod select;
mod template;
pub mod vector;

use expr::{Jit, LoopSpec, Sink, Source};
use ir::kernel::{Kernel, KernelKind, KernelPlan, ScanKernel};
use ir::shape::{numel, Dim, DimEnv};
use std::sync::Mutex;
pub use template::{TemplateExec, WeightCache};

/// The generated function of a loop kernel or fusion (docs/kernel-abi.md, "On the CPU").
pub type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, *mut u8, i64, i64);

/// Runs `f` over pieces `[lo, hi)` covering `0..n`, possibly in parallel.
pub trait ParFor: Sync {
    fn threads(&self) -> usize;
    fn run(&self, n: usize, f: &(dyn Fn(usize, usize) + Sync));
}

/// Runs everything on the calling thread.
pub struct Serial;

impl ParFor for Serial {
    fn threads(&self) -> usize {
        1
    }
    fn run(&self, n: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        if n > 0 {
            f(0, n)
        }
    }
}

/// A buffer address handed to a kernel.
#[derive(Clone, Copy, Debug)]
pub struct BufPtr(pub *mut u8);
unsafe impl Send for BufPtr {}

/// A raw pointer to an output that parallel work items share, each writing a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) *mut T);
// SAFETY: the items that hold it write disjoint elements (each user's contract).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }

    pub(crate) fn at(&self, i: usize) -> *mut T {
        // SAFETY (callers): `i` is inside the output the pointer was made from.
        unsafe { self.0.add(i) }
    }
}
unsafe impl Sync for BufPtr {}

/// One call's arguments.
pub struct Launch<'a> {
    /// `Kernel::inputs` then `Kernel::outputs`.
    pub bufs: &'a [BufPtr],
    /// Values of `CpuPlan::symbols`.
    pub syms: &'a [i64],
    pub env: &'a DimEnv,
    pub par: &'a dyn ParFor,
}

/// A generated function with its parallel extent.
#[derive(Clone, Debug)]
pub struct LoopFn {
    pub func: KernelFn,
    pub extent: Dim,
}

impl LoopFn {
    /// Calls the function over its whole extent, split over the threads of `par`.
    pub fn call(&self, bufs: &[BufPtr], syms: &[i64], env: &DimEnv, par: &dyn ParFor) -> Result<(), String> {
        let n = self.extent.eval(env)?;
        let n = usize::try_from(n).map_err(|_| format!("negative extent {n}"))?;
        let bufs = BufArgs(bufs.as_ptr() as *const *mut u8);
        let syms = SymArgs(syms.as_ptr());
        let f = self.func;
        par.run(n, &|lo, hi| unsafe {
            f(bufs.get(), syms.get(), std::ptr::null_mut(), lo as i64, hi as i64)
        });
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct BufArgs(*const *mut u8);
unsafe impl Send for BufArgs {}
unsafe impl Sync for BufArgs {}
impl BufArgs {
    fn get(&self) -> *const *mut u8 {
        self.0
    }
}
#[derive(Clone, Copy)]
struct SymArgs(*const i64);
unsafe impl Send for SymArgs {}
unsafe impl Sync for SymArgs {}
impl SymArgs {
    fn get(&self) -> *const i64 {
        self.0
    }
}

pub enum CpuKernelBody {
    Loop(LoopFn),
    Template(Box<TemplateExec>),
    /// Run by the runtime: `body` once per step (ir::kernel::ScanKernel).
    Scan {
        scan: Box<ScanKernel>,
        body: Box<CpuPlan>,
    },
}

pub struct CpuKernel {
    pub name: String,
    pub body: CpuKernelBody,
}

impl CpuKernel {
    /// Whether the kernel runs generated code: loop kernels, GEMMs and the templates of
    /// `rows.rs`; `false` for a template that still evaluates its reference semantics.
    pub fn is_generated(&self) -> bool {
        match &self.body {
            CpuKernelBody::Loop(_) => true,
            CpuKernelBody::Template(t) => t.is_generated(),
            CpuKernelBody::Scan { .. } => false,
        }
    }

    /// Runs a loop or template kernel (scans are the runtime's: an error here).
    pub fn run(&self, l: &Launch) -> Result<(), String> {
        match &self.body {
            CpuKernelBody::Loop(f) => f.call(l.bufs, l.syms, l.env, l.par),
            CpuKernelBody::Template(t) => t.run(l),
            CpuKernelBody::Scan { .. } => Err("a scan kernel is run by the runtime, step by step".into()),
        }
        .map_err(|e| format!("{}: {e}", self.name))
    }
}

/// Keeps the generated code alive; frees it with the plan.
struct Code(Option<cranelift_jit::JITModule>);
unsafe impl Send for Code {}
unsafe impl Sync for Code {}

impl Drop for Code {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            // SAFETY: the plan that owns the code is being dropped: no function of it runs.
            unsafe { m.free_memory() };
        }
    }
}

/// Every kernel of a plan, compiled.
pub struct CpuPlan {
    /// The symbol order of `Launch::syms` (`KernelPlan::symbols()` of the top-level plan).
    pub symbols: Vec<String>,
    pub kernels: Vec<CpuKernel>,
    _code: Option<Mutex<Code>>,
}

impl CpuPlan {
    /// Shares the template kernels' parameter conversions (f32 forms of the weights) through
    /// `cache` with every other plan given the same cache (a model's prefill and decode plans):
    /// each weight is converted and held once, and the first decode step does not convert again.
    pub fn share_weights(&mut self, cache: &WeightCache) {
        for k in &mut self.kernels {
            match &mut k.body {
                CpuKernelBody::Template(t) => t.share_weights(cache),
                CpuKernelBody::Scan { body, .. } => body.share_weights(cache),
                CpuKernelBody::Loop(_) => {}
            }
        }
    }
}

/// Compiles every kernel of `plan`. A Cranelift error comes back naming the kernel.
pub fn compile_plan(plan: &KernelPlan) -> Result<CpuPlan, String> {
    let symbols = plan.symbols();
    let mut jit = Jit::new()?;
    let micro = gemm::compile_micro_kernel(&mut jit)?;
    let dot = gemm::compile_dot_kernel(&mut jit)?;
    let vec_ids = vector::compile(&mut jit)?;
    let mut pending = Vec::new();
    let mut out = compile_kernels(&mut jit, plan, &symbols, "", &mut pending)?;
    jit.module
        .finalize_definitions()
        .map_err(|e| format!("cranelift: {}", expr::describe(&e)))?;
    // SAFETY: the micro-kernel was declared with MicroKernel's signature.
    let micro: gemm::MicroKernel = unsafe { std::mem::transmute(jit.module.get_finalized_function(micro)) };
    // SAFETY: the dot kernel was declared with DotKernel's signature.
    let dot: gemm::DotKernel = unsafe { std::mem::transmute(jit.module.get_finalized_function(dot)) };
    let gk = gemm::GemmKernels { micro, dot };
    let vk = vec_ids.resolve(&jit);
    let mut fns = Vec::new();
    for id in &pending {
        // SAFETY: every pending function has the kernel ABI signature (expr::kernel_signature).
        fns.push(unsafe { std::mem::transmute::<*const u8, KernelFn>(jit.module.get_finalized_function(*id)) });
    }
    link(&mut out.kernels, &fns, gk, vk);
    out._code = Some(Mutex::new(Code(Some(jit.module))));
    Ok(out)
}

/// Functions are only addressable after the module is finalised: kernels first hold indices
/// into the list of pending functions, then [`link`] replaces them.
fn placeholder(i: usize) -> KernelFn {
    // SAFETY: never called; replaced by `link` before the plan is returned.
    unsafe { std::mem::transmute::<usize, KernelFn>(i + 1) }
}

fn resolve(f: &mut KernelFn, fns: &[KernelFn]) {
    let i = *f as usize - 1;
    *f = fns[i];
}

fn link(kernels: &mut [CpuKernel], fns: &[KernelFn], gk: gemm::GemmKernels, vk: vector::VecKernels) {
    for k in kernels {
        match &mut k.body {
            CpuKernelBody::Loop(l) => resolve(&mut l.func, fns),
            CpuKernelBody::Template(t) => t.link(&mut |f| resolve(f, fns), gk, vk),
            CpuKernelBody::Scan { body, .. } => link(&mut body.kernels, fns, gk, vk),
        }
    }
}

fn compile_kernels(
    jit: &mut Jit,
    plan: &KernelPlan,
    symbols: &[String],
    // function names: the kernel's, under the names of the scans it is nested in
    prefix: &str,
    pending: &mut Vec<cranelift_module::FuncId>,
) -> Result<CpuPlan, String> {
    let mut kernels = Vec::new();
    for k in &plan.kernels {
        let fname = format!("{prefix}{}", k.name);
        let body = compile_kernel(jit, plan, k, &fname, symbols, pending).map_err(|e| {
            if e.starts_with(&fname) {
                e
            } else {
                format!("{fname}: {e}")
            }
        })?;
        kernels.push(CpuKernel {
            name: k.name.clone(),
            body,
        });
    }
    Ok(CpuPlan {
        symbols: symbols.to_vec(),
        kernels,
        _code: None,
    })
}

/// The loads of a kernel's expressions: one source per kernel input, slot = position.
fn sources(plan: &KernelPlan, k: &Kernel) -> Result<Vec<Source>, String> {
    k.inputs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let b = plan
                .buffer(r.buffer)
                .ok_or_else(|| format!("input {i} names no buffer"))?;
            Ok(Source {
                slot: i,
                view: r.view.clone(),
                dtype: b.dtype,
            })
        })
        .collect()
}

/// How many leading axes of a domain of rank `rank` form the parallel extent.
fn parallel_axes(rank: usize, has_reduce: bool, outer: usize) -> usize {
    if has_reduce {
        outer
    } else if rank >= 2 {
        rank - 1
    } else {
        rank
    }
}

pub(crate) fn add_function(
    jit: &mut Jit,
    name: &str,
    spec: &LoopSpec,
    symbols: &[String],
    pending: &mut Vec<cranelift_module::FuncId>,
) -> Result<LoopFn, String> {
    let id = jit.compile_loop(name, spec, symbols)?;
    pending.push(id);
    Ok(LoopFn {
        func: placeholder(pending.len() - 1),
        extent: numel(&spec.domain[..spec.par]),
    })
}

fn compile_kernel(
    jit: &mut Jit,
    plan: &KernelPlan,
    k: &Kernel,
    fname: &str,
    symbols: &[String],
    pending: &mut Vec<cranelift_module::FuncId>,
) -> Result<CpuKernelBody, String> {
    match &k.kind {
        KernelKind::Loop(l) => {
            let n_in = k.inputs.len();
            let mut sinks = Vec::new();
            for (o, (r, e)) in k.outputs.iter().zip(&l.stores).enumerate() {
                let b = plan
                    .buffer(r.buffer)
                    .ok_or_else(|| format!("output {o} names no buffer"))?;
                sinks.push(Sink {
                    slot: n_in + o,
                    view: r.view.clone(),
                    dtype: b.dtype,
                    expr: *e,
                });
            }
            let spec = LoopSpec {
                domain: &l.domain,
                par: parallel_axes(l.domain.len(), l.exprs.has_reduce(), l.outer),
                exprs: &l.exprs,
                sources: sources(plan, k)?,
                result_slot: None,
                sinks,
            };
            Ok(CpuKernelBody::Loop(add_function(jit, fname, &spec, symbols, pending)?))
        }
        KernelKind::Template(t) => Ok(CpuKernelBody::Template(Box::new(TemplateExec::compile(
            jit, plan, k, t, fname, symbols, pending,
        )?))),
        KernelKind::Scan(s) => {
            let body = compile_kernels(jit, &s.body, symbols, &format!("{fname}."), pending)?;
            Ok(CpuKernelBody::Scan {
                scan: Box::new(s.clone()),
                body: Box::new(body),
            })
        }
    }
}

#[cfg(test)]
mod tests;
