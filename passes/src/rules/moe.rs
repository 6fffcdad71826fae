//! The moe family: MoE gating (§2.6): the group-limited top-k → `route_topk`, the dense all-experts product → `grouped_matmul_swiglu` / `grouped_matmul_combine` over the chosen experts only.
//!
//! Empty for now: its engineers fill the table against the API documented in `rules/mod.rs`
//! (patterns over `crate::egraph::lang::Rl`, right-hand sides through `typed`/`tuple`, rules
//! named `moe-…`, each with a start ⇒ goal test).

use crate::egraph::Rule;

/// The moe rule table.
#[rustfmt::skip]
pub fn moe_rules() -> Vec<Rule> {
    Vec::new()
}
