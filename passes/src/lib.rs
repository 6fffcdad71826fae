//! ringjit's rewrite passes: graph in, graph out (style.md 2).
//!
//! Pipeline order: [`cleanup`] (validate, DCE, CSE, constant folding) → [`precision`] (FP8 mode
//! only: quantize/dequantize pairs around the weight GEMMs) → [`egraph`] (the graph
//! as an egg e-graph, typed) saturated by the rule families of [`rules`] → [`extract`] (a
//! DAG-aware, cost-model extraction back to a graph) → cleanup again. [`manager`] runs named
//! passes in order with timings and `--dump` files; [`compile`] is the whole thing.
//!
//! ```text
//! let opts = passes::CompileOptions { mode: passes::Mode::Decode, ..Default::default() };
//! let (fused, report) = passes::compile(&graph, &opts)?;
//! println!("{report}");
//! ```

pub mod cleanup;
pub mod copies;
pub mod egraph;
pub mod extract;
pub mod inplace;
pub mod manager;
pub mod memplan;
pub mod normgemm;
pub mod partition;
pub mod precision;
pub mod qkstep;
pub mod report;
pub(crate) mod rewire;
pub mod routegemm;
pub mod rules;
pub mod shared;
pub mod siblings;
pub mod testing;

pub use egraph::{Limits, StopReason};
pub use extract::CostModel;
pub use manager::{Pass, PassManager};
pub use precision::Precision;
pub use report::{EGraphStats, PassRecord, PassReport};
pub use rules::Family;

use ir::graph::{Graph, IrError, SrcLoc};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `RINGJIT_DEBUG` (style.md 3): `2` prints each pass's time and node counts, `3` the rules
/// fired and the extraction's costs, `6` the e-graph statistics of every saturation.
pub fn debug_level() -> u32 {
    std::env::var("RINGJIT_DEBUG")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A pass failed: which pass, on which node (and its DSL location), and why.
#[derive(Clone, Debug, PartialEq)]
pub struct PassError {
    pub pass: String,
    pub node: Option<String>,
    pub loc: Option<SrcLoc>,
    pub msg: String,
}

impl PassError {
    pub fn new(pass: &str, msg: impl Into<String>) -> PassError {
        PassError {
            pass: pass.into(),
            node: None,
            loc: None,
            msg: msg.into(),
        }
    }

    pub fn ir(pass: &str, e: IrError) -> PassError {
        PassError {
            pass: pass.into(),
            node: e.node,
            loc: e.loc,
            msg: e.msg,
        }
    }

    pub fn io(pass: &str, path: &Path, e: std::io::Error) -> PassError {
        PassError::new(pass, format!("{}: {e}", path.display()))
    }
}

impl fmt::Display for PassError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pass `{}`: ", self.pass)?;
        if let Some(l) = &self.loc {
            write!(f, "{l}: ")?;
        }
        if let Some(n) = &self.node {
            write!(f, "{n}: ")?;
        }
        f.write_str(&self.msg)
    }
}

impl std::error::Error for PassError {}

/// Which step the graph is compiled for. The graph is the same (decode binds `seq = 1`); the
/// mode sets the sizes the cost model evaluates shapes at, and later the scan family's choices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// batch 1, seq 4096, past 0
    #[default]
    Prefill,
    /// batch 1, seq 1, past 4096
    Decode,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Prefill => "prefill",
            Mode::Decode => "decode",
        }
    }

    pub fn from_name(s: &str) -> Option<Mode> {
        match s {
            "prefill" => Some(Mode::Prefill),
            "decode" => Some(Mode::Decode),
            _ => None,
        }
    }

    pub fn cost_model(self) -> CostModel {
        match self {
            Mode::Prefill => CostModel::prefill(),
            Mode::Decode => CostModel::decode(),
        }
    }
}

/// Options of [`compile`].
#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub mode: Mode,
    /// The weight GEMMs' format; `Fp8` adds the [`precision::fp8_matmuls`] pass after cleanup.
    pub precision: Precision,
    /// Run equality saturation and extraction; `false` runs the cleanup passes only.
    pub fuse: bool,
    /// The rule families to run (each still skipped when its ops are absent).
    pub families: Vec<Family>,
    pub limits: Limits,
    /// Write the graph after every pass here (`NN-after-<pass>.txt` / `.dot`).
    pub dump_dir: Option<PathBuf>,
    /// Overrides the mode's cost model (sizes, bandwidth, launch cost).
    pub cost: Option<CostModel>,
    /// Decode plans: fold each RMSNorm into the GEMM that reads it ([`normgemm`]).
    pub fold_norms: bool,
    /// Decode plans: the lightning steps norm and rotate their own q and k ([`qkstep`]); off for
    /// a backend without that kernel (the PTX backend's simple lightning kernels,
    /// `RINGJIT_ATTN=naive`).
    pub fold_qk_norms: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            mode: Mode::Prefill,
            precision: Precision::Bf16,
            fuse: true,
            families: Family::ALL.to_vec(),
            limits: Limits::default(),
            dump_dir: None,
            cost: None,
            fold_norms: true,
            fold_qk_norms: true,
        }
    }
}

/// The cleanup passes, in the order [`compile`] runs them.
pub fn cleanup_passes() -> Vec<Pass> {
    vec![
        Pass::simple("validate", cleanup::validate),
        Pass::simple("dce", cleanup::dce),
        Pass::simple("cse", cleanup::cse),
        Pass::simple("const-fold", cleanup::const_fold),
        Pass::simple("cse", cleanup::cse),
        Pass::simple("dce", cleanup::dce),
    ]
}

/// The equality-saturation pass: the graph into an e-graph, the chosen families' rules within
/// `limits`, extraction under `cost`, back to a validated graph. It never fails on a graph the
/// rules cannot improve and never hangs: a limit stops the runner, and if the extracted graph
/// were invalid or costlier than the input, the input is returned (recorded in the report).
pub fn fuse_pass(families: Vec<Family>, limits: Limits, cost: CostModel) -> Pass {
    Pass::new("fuse", move |g, report| {
        fuse_graph(g, &families, &limits, &cost, report)
    })
}

fn fuse_graph(
    g: Graph,
    families: &[Family],
    limits: &Limits,
    cost: &CostModel,
    report: &mut PassReport,
) -> Result<Graph, PassError> {
    let present: Vec<Family> = families.iter().copied().filter(|f| f.present(&g)).collect();
    let rules: Vec<egraph::Rule> = present.iter().flat_map(|f| f.rules()).collect();
    let (eg, bridge) = egraph::to_egraph(&g).map_err(|m| PassError::new("fuse", m))?;
    let (eg, sat) = egraph::saturate(eg, &rules, limits);
    let t = Instant::now();
    let roots = bridge.roots(&eg);
    let seed = bridge.original_choice(&eg);
    let ex = extract::extract(&eg, &roots, cost, Some(&seed));
    let cost_before = cost.graph_cost(&g);
    let rebuilt = egraph::to_graph(&eg, &bridge, &ex.choice);
    let extract_ms = t.elapsed().as_secs_f64() * 1e3;
    let (out, fell_back) = match rebuilt {
        Err(m) => (g, Some(format!("the extracted graph is invalid: {m}"))),
        Ok(_) if !ex.cost.is_finite() => (g, Some("no finite-cost extraction".to_string())),
        Ok(_) if ex.cost > cost_before * (1.0 + 1e-9) => (
            g,
            Some(format!("extraction ({:.1} us) is costlier than the input", ex.cost)),
        ),
        Ok(new) => (new, None),
    };
    for (k, v) in &sat.fired {
        *report.rules_fired.entry(k.clone()).or_default() += v;
    }
    for (k, v) in &sat.refused {
        *report.rules_refused.entry(k.clone()).or_default() += v;
    }
    for (k, v) in &sat.refusal_example {
        report.refusal_examples.entry(k.clone()).or_insert_with(|| v.clone());
    }
    if debug_level() >= 3 {
        eprintln!(
            "fuse: fired {:?}, refused {:?}; cost {cost_before:.1} us -> {:.1} us{}",
            sat.fired,
            sat.refused,
            ex.cost,
            fell_back
                .as_ref()
                .map(|r| format!(" (fell back: {r})"))
                .unwrap_or_default()
        );
    }
    if debug_level() >= 6 {
        eprintln!(
            "fuse: e-graph {} nodes, {} classes, {} iterations, {} ({:.1} ms); type conflicts {}",
            sat.nodes, sat.classes, sat.iterations, sat.stop_reason, sat.ms, sat.type_conflicts
        );
    }
    report.egraph = Some(EGraphStats {
        families: present.iter().map(|f| f.name().to_string()).collect(),
        rules: rules.len(),
        nodes: sat.nodes,
        classes: sat.classes,
        iterations: sat.iterations,
        stop_reason: sat.stop_reason.to_string(),
        hit_limit: sat.stop_reason.hit_limit(),
        saturate_ms: sat.ms,
        extract_ms,
        cost_before_us: cost_before,
        cost_after_us: if fell_back.is_some() { cost_before } else { ex.cost },
        extract_improvements: ex.improvements,
        type_conflicts: sat.type_conflicts,
        fell_back,
    });
    Ok(out)
}

/// Compiles `graph`: cleanup passes, then (with `opts.fuse`) equality saturation with the
/// chosen rule families and extraction, then DCE and validation. Returns the new graph and
/// what every pass did.
pub fn compile(graph: &Graph, opts: &CompileOptions) -> Result<(Graph, PassReport), PassError> {
    let mut pm = PassManager::new();
    for p in cleanup_passes() {
        pm = pm.then(p);
    }
    if opts.precision == Precision::Fp8 {
        pm = pm.then(Pass::simple("fp8-matmuls", precision::fp8_matmuls));
    }
    if opts.fuse {
        let cost = opts.cost.clone().unwrap_or_else(|| opts.mode.cost_model());
        pm = pm
            .then(fuse_pass(opts.families.clone(), opts.limits, cost))
            .then(Pass::simple("dce", cleanup::dce));
        // decode only: at M = batch the two GEMMs are weight-bandwidth bound and the merge
        // saves a launch; a 4096-token prefill measured 1.1 ms slower merged on an H100 (the
        // shared half's f32 results, 19 layers)
        if opts.mode == Mode::Decode {
            pm = pm.then(Pass::simple("merge-router-gemm", siblings::merge_router_gemms));
            pm = pm.then(Pass::simple("fold-shared-expert", shared::fold_shared_experts));
            if opts.fold_qk_norms {
                pm = pm.then(Pass::simple("fold-qk-norm-step", qkstep::fold_qk_norm_steps));
            }
            if opts.fold_norms {
                pm = pm.then(Pass::simple("fold-norm-gemm", normgemm::fold_norm_gemms));
            }
        }
        pm = pm.then(Pass::simple("validate", cleanup::validate));
    }
    if let Some(d) = &opts.dump_dir {
        pm = pm.with_dump(d);
    }
    let (g, mut report) = pm.run(graph.clone())?;
    report.mode = opts.mode.name().to_string();
    Ok((g, report))
}
