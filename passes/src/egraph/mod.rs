//! The egg bridge: the graph IR as an egg language ([`lang`]), types and constants as an
//! e-class analysis ([`analysis`]), conversion both ways ([`bridge`]), the typed applier and
//! the side-condition builders rules use ([`rewrite`]), and the runner with explicit limits
//! ([`saturate`]).

pub mod analysis;
pub mod bridge;
pub mod lang;
pub mod rewrite;

pub use analysis::{Data, RlGraph, TypeAnalysis};
pub use bridge::{to_egraph, to_graph, Bridge, Choice};
pub use lang::{Attr, Rl};

use egg::{Rewrite, Runner, SimpleScheduler};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A rewrite rule of the graph language.
pub type Rule = Rewrite<Rl, TypeAnalysis>;

/// Runner limits, always explicit (style.md 7).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Stop once the e-graph holds this many e-nodes.
    pub node_limit: usize,
    /// Stop after this many iterations (one search + apply + rebuild each).
    pub iter_limit: usize,
    /// Stop after this much time.
    pub time_limit: Duration,
}

impl Default for Limits {
    /// Generous for the fuse rules (they saturate in 3–4 iterations on every Ring graph); the
    /// time limit is the compile-time budget of the whole model (issue: < 5 s).
    fn default() -> Self {
        Limits {
            node_limit: 500_000,
            iter_limit: 16,
            time_limit: Duration::from_secs(4),
        }
    }
}

/// Why the runner stopped.
#[derive(Clone, Debug, PartialEq)]
pub enum StopReason {
    Saturated,
    IterationLimit(usize),
    NodeLimit(usize),
    TimeLimit(f64),
    Other(String),
}

impl StopReason {
    /// Whether a limit cut saturation short (the e-graph may lack some rewrites).
    pub fn hit_limit(&self) -> bool {
        !matches!(self, StopReason::Saturated)
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Saturated => f.write_str("saturated"),
            StopReason::IterationLimit(n) => write!(f, "iteration limit ({n})"),
            StopReason::NodeLimit(n) => write!(f, "node limit ({n})"),
            StopReason::TimeLimit(s) => write!(f, "time limit ({s:.3} s)"),
            StopReason::Other(m) => write!(f, "stopped: {m}"),
        }
    }
}

/// What saturation did.
#[derive(Clone, Debug, PartialEq)]
pub struct Saturation {
    pub nodes: usize,
    pub classes: usize,
    pub iterations: usize,
    pub stop_reason: StopReason,
    pub ms: f64,
    /// rule name -> instantiations that changed the e-graph
    pub fired: BTreeMap<String, usize>,
    /// rule name -> instantiations refused as ill-typed
    pub refused: BTreeMap<String, usize>,
    /// rule name -> the first refusal's reason
    pub refusal_example: BTreeMap<String, String>,
    /// e-class merges with disagreeing types (a wrong rule; 0 expected)
    pub type_conflicts: usize,
}

/// Runs `rules` on `egraph` within `limits`. Always returns: a limit stops the runner, and the
/// e-graph it leaves is rebuilt (congruence restored) and still holds every original e-node,
/// so extraction can always at least rebuild the input.
pub fn saturate(egraph: RlGraph, rules: &[Rule], limits: &Limits) -> (RlGraph, Saturation) {
    let start = Instant::now();
    let runner = Runner::<Rl, TypeAnalysis, ()>::new(TypeAnalysis::default())
        .with_egraph(egraph)
        .with_node_limit(limits.node_limit)
        .with_iter_limit(limits.iter_limit)
        .with_time_limit(limits.time_limit)
        // The rules of every family are non-expansive rewrites to composite ops; the backoff
        // scheduler's bans would only add iterations.
        .with_scheduler(SimpleScheduler)
        .run(rules);
    let stop_reason = match runner.stop_reason.clone() {
        Some(egg::StopReason::Saturated) => StopReason::Saturated,
        Some(egg::StopReason::IterationLimit(n)) => StopReason::IterationLimit(n),
        Some(egg::StopReason::NodeLimit(n)) => StopReason::NodeLimit(n),
        Some(egg::StopReason::TimeLimit(s)) => StopReason::TimeLimit(s),
        Some(egg::StopReason::Other(m)) => StopReason::Other(m),
        None => StopReason::Other("no stop reason".into()),
    };
    let iterations = runner.iterations.len();
    let mut egraph = runner.egraph;
    egraph.rebuild();
    let stats = std::mem::take(&mut egraph.analysis.stats);
    let sat = Saturation {
        nodes: egraph.total_number_of_nodes(),
        classes: egraph.number_of_classes(),
        iterations,
        stop_reason,
        ms: start.elapsed().as_secs_f64() * 1e3,
        fired: stats.fired,
        refused: stats.refused,
        refusal_example: stats.refusal_example,
        type_conflicts: stats.type_conflicts,
    };
    (egraph, sat)
}
