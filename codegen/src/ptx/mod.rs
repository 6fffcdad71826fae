//! PTX through LLVM's NVPTX backend (inkwell, LLVM 19 linked statically).
//!
//! This module owns the LLVM side: the target machine for `nvptx64-nvidia-cuda`, the kernel
//! calling convention, the special registers, and the lowering of a finished LLVM module to PTX
//! text. Kernel bodies are built by the kernel generators on top: [`loops`] for loop kernels,
//! [`templates`] for template kernels, both through the builder of [`emit`] and the expression
//! emitter of [`expr`]. The entry points are [`compile_kernel`] and [`compile_plan`]; the
//! calling convention is docs/kernel-abi.md, the design docs/ptx-codegen.md.

pub mod cache;
mod emit;
mod expr;
mod loops;
mod templates;

use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple};
use inkwell::types::BasicMetadataTypeEnum;
use inkwell::values::{FunctionValue, IntValue};
use inkwell::{AddressSpace, OptimizationLevel};
use ir::kernel::{Kernel, KernelKind, KernelPlan, LaunchGeometry};
use ir::Dim;
use std::fmt;

/// `PTX_Kernel` in LLVM's calling-convention numbering: makes a function a `.entry`.
pub const PTX_KERNEL_CC: u32 = 71;
/// Global memory address space on NVPTX.
pub const GLOBAL: u16 = 1;
/// Shared memory address space on NVPTX.
pub const SHARED: u16 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuTarget {
    /// SM version: 90 for Hopper.
    pub sm: u32,
    /// `sm_90a`: the arch-specific features (wgmma, setmaxnreg).
    pub arch_specific: bool,
    /// PTX ISA version times ten (80 = PTX 8.0; LLVM 19 prints 7.8 without it).
    pub ptx: u32,
}

impl Default for GpuTarget {
    fn default() -> Self {
        GpuTarget {
            sm: 90,
            arch_specific: false,
            ptx: 80,
        }
    }
}

impl GpuTarget {
    pub fn cpu(&self) -> String {
        format!("sm_{}{}", self.sm, if self.arch_specific { "a" } else { "" })
    }
}

/// Why a kernel could not be compiled (the kernel's name first).
#[derive(Debug, Clone, PartialEq)]
pub struct CodegenError(pub String);

impl fmt::Display for CodegenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodegenError {}

fn target_machine(t: &GpuTarget) -> Result<TargetMachine, CodegenError> {
    // once per process: LLVM's target registration is not safe to race, and the runtime
    // compiles kernels on several threads
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| Target::initialize_nvptx(&InitializationConfig::default()));
    let triple = TargetTriple::create("nvptx64-nvidia-cuda");
    let target = Target::from_triple(&triple).map_err(|e| CodegenError(format!("NVPTX target: {e}")))?;
    target
        .create_target_machine(
            &triple,
            &t.cpu(),
            &format!("+ptx{}", t.ptx),
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| CodegenError(format!("LLVM could not create a target machine for {}", t.cpu())))
}

/// Verify, optimise (O3) and print `module` as PTX.
pub fn module_to_ptx(module: &Module, t: &GpuTarget) -> Result<String, CodegenError> {
    module_to_ptx_at(module, t, 3, &mut |_| {})
}

/// [`module_to_ptx`] at LLVM pass level `opt` (0..=3); `ir` receives the LLVM IR after the
/// passes (for `dump_llvm_ir`).
fn module_to_ptx_at(
    module: &Module,
    t: &GpuTarget,
    opt: u8,
    ir: &mut dyn FnMut(String),
) -> Result<String, CodegenError> {
    let tm = target_machine(t)?;
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    module.verify().map_err(|e| {
        CodegenError(format!(
            "invalid LLVM IR in {}: {}",
            module.get_name().to_string_lossy(),
            e
        ))
    })?;
    module
        .run_passes(&format!("default<O{}>", opt.min(3)), &tm, PassBuilderOptions::create())
        .map_err(|e| CodegenError(format!("LLVM optimisation failed: {e}")))?;
    ir(module.print_to_string().to_string());
    let buf = tm
        .write_to_memory_buffer(module, FileType::Assembly)
        .map_err(|e| CodegenError(format!("PTX emission failed: {e}")))?;
    String::from_utf8(buf.as_slice().to_vec()).map_err(|e| CodegenError(format!("PTX is not UTF-8: {e}")))
}

/// Options of [`compile_kernel`].
#[derive(Clone, Debug, PartialEq)]
pub struct PtxOptions {
    pub target: GpuTarget,
    /// LLVM optimisation level, 0..=3.
    pub opt_level: u8,
    /// Keep the optimised LLVM IR of each kernel in [`PtxKernel::llvm_ir`].
    pub dump_llvm_ir: bool,
    /// The plan runs many tokens a step (prefill): templates include their many-row paths
    /// (the tensor-core flash attention). A decode plan (one token a step) sets it false and
    /// gets kernels without them, which need fewer registers.
    pub prefill: bool,
}

impl Default for PtxOptions {
    fn default() -> Self {
        PtxOptions {
            target: GpuTarget::default(),
            opt_level: 3,
            dump_llvm_ir: false,
            prefill: true,
        }
    }
}

/// The `.entry` name every kernel is generated under. [`PtxKernel::ptx`] carries the kernel's
/// own name instead; [`PtxKernel::body`] keeps this one, so kernels that differ only in name (the
/// same kernel in each layer) are one LLVM compile and one driver module.
pub const ENTRY: &str = "ringjit_entry";

/// One compiled kernel: a whole PTX module with one `.entry`, and how to launch it.
#[derive(Clone, Debug, PartialEq)]
pub struct PtxKernel {
    /// `Kernel::name`, the `.entry` name.
    pub name: String,
    /// The PTX module, headed by a comment naming the graph nodes the kernel came from.
    pub ptx: String,
    /// The same module without the comment and with the `.entry` named [`ENTRY`]: equal for
    /// kernels that differ only in name (what the runtime loads, once per distinct body).
    pub body: std::sync::Arc<str>,
    /// `sm_90` or `sm_90a`: the module's `.target` (pass it to ptxas as `-arch`).
    pub arch: String,
    /// Grid (big extent on x), block, and the *dynamic* shared memory to pass at launch
    /// (0 except for the bf16 GEMM's tensor-core tiles, `templates/fastgemm.rs`).
    pub launch: LaunchGeometry,
    /// Per-launch scratch bytes (the last parameter): the decode attention's split-K partials
    /// and counters, the prefill grouped down projection's per-(token, slot) rows and arrival
    /// counters; 0 for every other kernel.
    pub scratch_bytes: Dim,
    /// Leading bytes of the scratch that must be zero when the kernel starts: the runtime
    /// zeroes them (stream-ordered) before each launch. 0 for kernels that need no zeroing
    /// (the decode attention resets its own counters).
    pub scratch_zero: Dim,
    /// The whole scratch is arrival counters that must be zero when the kernel starts and that
    /// the kernel leaves at zero (the lightning kernel with the folded group norm): the runtime
    /// serves it from a buffer of its own, zeroed once when allocated, that no other kind of
    /// scratch shares, so no launch needs a memset (a node of its own in a CUDA graph).
    pub scratch_counters: bool,
    /// Inputs + outputs + 2 (the symbol array and the scratch pointer).
    pub n_params: usize,
    /// The optimised LLVM IR when `PtxOptions::dump_llvm_ir`.
    pub llvm_ir: Option<String>,
}

/// Whether the lightning step kernels norm and rotate their own q and k
/// (`passes::CompileOptions::fold_qk_norms`): the register-state kernel does, the simple
/// kernels that `RINGJIT_ATTN=naive` forces do not.
pub fn folds_qk_norms() -> bool {
    !templates::attention::naive_forced()
}

/// The most rows (tokens) a GEMM runs as a GEMV; more take the tensor-core paths.
pub const GEMV_ROWS: i64 = templates::fastgemm::GEMV_ROWS;

/// Compile one loop or template kernel of `plan` (docs/kernel-abi.md). A scan is a host loop:
/// compile its body's kernels instead ([`compile_plan`] does).
pub fn compile_kernel(plan: &KernelPlan, kernel: &Kernel, opts: &PtxOptions) -> Result<PtxKernel, CodegenError> {
    compile_inner(plan, kernel, opts).map_err(|e| CodegenError(format!("{}: {}", kernel.name, e.0)))
}

fn compile_inner(plan: &KernelPlan, kernel: &Kernel, opts: &PtxOptions) -> Result<PtxKernel, CodegenError> {
    let ctx = Context::create();
    let mut em = emit::Em::new(&ctx, plan, kernel)?;
    em.prefill = opts.prefill;
    em.pdl = opts.target.sm >= 90;
    em.grid_dependency()?;
    let launch = match &kernel.kind {
        KernelKind::Loop(l) => loops::emit(&mut em, l)?,
        KernelKind::Template(t) => templates::emit(&mut em, t)?,
        KernelKind::Scan(_) => {
            return Err(CodegenError(
                "a scan kernel is a host loop: compile the kernels of its body".into(),
            ))
        }
    };
    let mut llvm_ir = None;
    // LLVM's optimisation and code generation are most of the compile time: their output is
    // kept by the hash of the unoptimised module, which names the entry `ENTRY` whatever the
    // kernel's name: once per process for kernels alike (the same kernel in every layer), and
    // on disk across runs (see `cache`)
    let body: String = if opts.dump_llvm_ir {
        module_to_ptx_at(&em.module, &opts.target, opts.opt_level, &mut |s| {
            llvm_ir = Some(s.replace(ENTRY, &kernel.name))
        })?
    } else {
        let key = cache::key(&em.module.print_to_string().to_string(), opts);
        cache::memo(&key, || match cache::get(&key) {
            Some(body) => Ok(body),
            None => {
                let body = module_to_ptx_at(&em.module, &opts.target, opts.opt_level, &mut |_| {}).map_err(|e| e.0)?;
                cache::put(&key, &body);
                Ok(body)
            }
        })
        .map_err(CodegenError)?
    };
    let nodes: Vec<String> = kernel.nodes.iter().map(|n| format!("%{}", n.index())).collect();
    let ptx = format!(
        "// ringjit kernel {} ({}), graph nodes {}\n// launch {}\n{}",
        kernel.name,
        kernel.kind_name(),
        nodes.join(" "),
        launch,
        body.replace(ENTRY, &kernel.name)
    );
    Ok(PtxKernel {
        name: kernel.name.clone(),
        ptx,
        body: body.into(),
        arch: opts.target.cpu(),
        launch,
        scratch_bytes: em.scratch_bytes.clone(),
        scratch_zero: em.scratch_zero.clone(),
        scratch_counters: em.scratch_counters,
        n_params: kernel.inputs.len() + kernel.outputs.len() + 2,
        llvm_ir,
    })
}

/// Every loop and template kernel of `plan`, scan bodies included (their kernels keep their
/// own names), in plan order.
pub fn compile_plan(plan: &KernelPlan, opts: &PtxOptions) -> Result<Vec<PtxKernel>, CodegenError> {
    let mut out = Vec::new();
    collect(plan, opts, &mut out)?;
    Ok(out)
}

fn collect(plan: &KernelPlan, opts: &PtxOptions, out: &mut Vec<PtxKernel>) -> Result<(), CodegenError> {
    for k in &plan.kernels {
        match &k.kind {
            KernelKind::Scan(s) => collect(&s.body, opts, out)?,
            _ => out.push(compile_kernel(plan, k, opts)?),
        }
    }
    Ok(())
}

/// Declare a kernel (`.visible .entry`) taking `params`.
pub fn add_kernel<'c>(
    ctx: &'c Context,
    module: &Module<'c>,
    name: &str,
    params: &[BasicMetadataTypeEnum<'c>],
) -> FunctionValue<'c> {
    let f = module.add_function(name, ctx.void_type().fn_type(params, false), None);
    f.set_call_conventions(PTX_KERNEL_CC);
    f
}

/// Read a PTX special register such as `tid.x`, `ctaid.x`, `ntid.x`.
pub fn sreg<'c>(ctx: &'c Context, module: &Module<'c>, b: &Builder<'c>, reg: &str) -> IntValue<'c> {
    let name = format!("llvm.nvvm.read.ptx.sreg.{reg}");
    let f = module
        .get_function(&name)
        .unwrap_or_else(|| module.add_function(&name, ctx.i32_type().fn_type(&[], false), None));
    b.build_call(f, &[], reg)
        .expect("call")
        .try_as_basic_value()
        .expect_basic("an i32")
        .into_int_value()
}

/// `y[i] = a * x[i] + y[i]` for `i < n`: the smallest real kernel, used to prove the whole chain
/// (LLVM → PTX → ptxas → driver → launch) on a new machine.
pub fn axpy_ptx(t: &GpuTarget) -> Result<String, CodegenError> {
    let ctx = Context::create();
    let module = ctx.create_module("ringjit_axpy");
    let f32t = ctx.f32_type();
    let i32t = ctx.i32_type();
    let gptr = ctx.ptr_type(AddressSpace::from(GLOBAL));
    let f = add_kernel(
        &ctx,
        &module,
        "axpy",
        &[f32t.into(), gptr.into(), gptr.into(), i32t.into()],
    );
    let b = ctx.create_builder();
    let entry = ctx.append_basic_block(f, "entry");
    let body = ctx.append_basic_block(f, "body");
    let exit = ctx.append_basic_block(f, "exit");
    b.position_at_end(entry);
    let tid = sreg(&ctx, &module, &b, "tid.x");
    let bid = sreg(&ctx, &module, &b, "ctaid.x");
    let bdim = sreg(&ctx, &module, &b, "ntid.x");
    let err = |e: inkwell::builder::BuilderError| CodegenError(format!("building axpy: {e}"));
    let i = b
        .build_int_add(b.build_int_mul(bid, bdim, "base").map_err(err)?, tid, "i")
        .map_err(err)?;
    let n = f.get_nth_param(3).unwrap().into_int_value();
    let inside = b
        .build_int_compare(inkwell::IntPredicate::SLT, i, n, "inside")
        .map_err(err)?;
    b.build_conditional_branch(inside, body, exit).map_err(err)?;
    b.position_at_end(body);
    let a = f.get_nth_param(0).unwrap().into_float_value();
    let x = f.get_nth_param(1).unwrap().into_pointer_value();
    let y = f.get_nth_param(2).unwrap().into_pointer_value();
    let idx = b.build_int_s_extend(i, ctx.i64_type(), "idx").map_err(err)?;
    // SAFETY (of the generated code): i < n, and the caller passes buffers of n floats.
    let px = unsafe { b.build_in_bounds_gep(f32t, x, &[idx], "px") }.map_err(err)?;
    let py = unsafe { b.build_in_bounds_gep(f32t, y, &[idx], "py") }.map_err(err)?;
    let xv = b.build_load(f32t, px, "x").map_err(err)?.into_float_value();
    let yv = b.build_load(f32t, py, "y").map_err(err)?.into_float_value();
    let r = b
        .build_float_add(b.build_float_mul(a, xv, "ax").map_err(err)?, yv, "r")
        .map_err(err)?;
    b.build_store(py, r).map_err(err)?;
    b.build_unconditional_branch(exit).map_err(err)?;
    b.position_at_end(exit);
    b.build_return(None).map_err(err)?;
    module_to_ptx(&module, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axpy_emits_an_entry_for_sm90() {
        let ptx = axpy_ptx(&GpuTarget::default()).unwrap();
        assert!(ptx.contains(".version 8.0"), "{ptx}");
        assert!(ptx.contains(".target sm_90"), "{ptx}");
        assert!(ptx.contains(".visible .entry axpy("), "{ptx}");
        assert!(ptx.contains("fma.rn.f32") || ptx.contains("mul.rn.f32"), "{ptx}");
        // accepted by the real assembler
        match crate::ptxas::check(&ptx) {
            Ok(r) => assert_eq!(r.kernels[0].spill_stores, 0, "{r:?}"),
            Err(e) => panic!("{e}"),
        }
    }
}

#[cfg(test)]
mod model_tests;
