//! What a compilation did: per-pass timings and node counts, rule counters, e-graph statistics
//! and extraction costs; printable as text and as JSON (`ringjit compile --report FILE.json`).

use std::collections::BTreeMap;

/// One pass's timing and effect on the node count.
#[derive(Clone, Debug, PartialEq)]
pub struct PassRecord {
    pub name: String,
    pub ms: f64,
    pub nodes_before: usize,
    pub nodes_after: usize,
}

/// Statistics of one equality-saturation run and its extraction.
#[derive(Clone, Debug, PartialEq)]
pub struct EGraphStats {
    /// the rule families run (after the "present" checks)
    pub families: Vec<String>,
    pub rules: usize,
    /// e-nodes and e-classes when the runner stopped
    pub nodes: usize,
    pub classes: usize,
    pub iterations: usize,
    /// `saturated`, `iteration limit (n)`, `node limit (n)`, `time limit (s)`
    pub stop_reason: String,
    /// whether a limit cut saturation short
    pub hit_limit: bool,
    pub saturate_ms: f64,
    pub extract_ms: f64,
    /// cost-model time of the input graph and of the extracted one (µs), see `extract`
    pub cost_before_us: f64,
    pub cost_after_us: f64,
    /// accepted local-search improvements of the DAG extractor
    pub extract_improvements: usize,
    /// e-class merges with disagreeing types (a wrong rule; 0 expected)
    pub type_conflicts: usize,
    /// Set when the pass returned its input graph instead of the extracted one, and why.
    pub fell_back: Option<String>,
}

/// The whole compilation's report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassReport {
    pub passes: Vec<PassRecord>,
    /// rule name -> instantiations that changed the e-graph
    pub rules_fired: BTreeMap<String, usize>,
    /// rule name -> instantiations refused by the typed applier (ill-typed right-hand side)
    pub rules_refused: BTreeMap<String, usize>,
    /// rule name -> why its first refused instantiation was refused
    pub refusal_examples: BTreeMap<String, String>,
    pub egraph: Option<EGraphStats>,
    /// e.g. `prefill`/`decode`, the cost model's dims
    pub mode: String,
    pub total_ms: f64,
}

impl PassReport {
    /// How often rules of `family` (the name prefix) fired.
    pub fn family_fired(&self, family: &str) -> usize {
        self.rules_fired
            .iter()
            .filter(|(k, _)| k.split('-').next() == Some(family))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn fired(&self, rule: &str) -> usize {
        self.rules_fired.get(rule).copied().unwrap_or(0)
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        json!({
            "mode": self.mode,
            "total_ms": self.total_ms,
            "passes": self.passes.iter().map(|p| json!({
                "name": p.name, "ms": p.ms, "nodes_before": p.nodes_before, "nodes_after": p.nodes_after,
            })).collect::<Vec<_>>(),
            "rules_fired": self.rules_fired,
            "rules_refused": self.rules_refused,
            "refusal_examples": self.refusal_examples,
            "egraph": self.egraph.as_ref().map(|e| json!({
                "families": e.families,
                "rules": e.rules,
                "nodes": e.nodes,
                "classes": e.classes,
                "iterations": e.iterations,
                "stop_reason": e.stop_reason,
                "hit_limit": e.hit_limit,
                "saturate_ms": e.saturate_ms,
                "extract_ms": e.extract_ms,
                "cost_before_us": e.cost_before_us,
                "cost_after_us": e.cost_after_us,
                "extract_improvements": e.extract_improvements,
                "type_conflicts": e.type_conflicts,
                "fell_back": e.fell_back,
            })),
        })
    }
}

impl std::fmt::Display for PassReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "compile ({}) in {:.1} ms", self.mode, self.total_ms)?;
        for p in &self.passes {
            writeln!(
                f,
                "  {:<16} {:>9.2} ms  nodes {} -> {}",
                p.name, p.ms, p.nodes_before, p.nodes_after
            )?;
        }
        if let Some(e) = &self.egraph {
            writeln!(
                f,
                "  e-graph [{}]: {} rules, {} nodes, {} classes, {} iterations, {} ({:.1} ms saturate, {:.1} ms extract)",
                e.families.join(","),
                e.rules,
                e.nodes,
                e.classes,
                e.iterations,
                e.stop_reason,
                e.saturate_ms,
                e.extract_ms
            )?;
            writeln!(
                f,
                "  cost {:.1} us -> {:.1} us ({} extraction improvements){}",
                e.cost_before_us,
                e.cost_after_us,
                e.extract_improvements,
                e.fell_back
                    .as_ref()
                    .map(|r| format!("; fell back to the input: {r}"))
                    .unwrap_or_default()
            )?;
        }
        for (rule, n) in &self.rules_fired {
            writeln!(f, "  fired   {rule:<28} {n}")?;
        }
        for (rule, n) in &self.rules_refused {
            writeln!(f, "  refused {rule:<28} {n}")?;
        }
        Ok(())
    }
}
