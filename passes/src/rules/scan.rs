//! The scan family: linear-attention scans (`scan` nodes of `lightning`, §2.4.4) → `linear_attn_chunk` (prefill, §4.3) and `linear_attn_step` (decode), and the group norm + output gate → `group_norm_gate` (§2.4.5).
//!
//! Empty for now: its engineers fill the table against the API documented in `rules/mod.rs`
//! (patterns over `crate::egraph::lang::Rl`, right-hand sides through `typed`/`tuple`, rules
//! named `scan-…`, each with a start ⇒ goal test).

use crate::egraph::Rule;

/// The scan rule table.
#[rustfmt::skip]
pub fn scan_rules() -> Vec<Rule> {
    Vec::new()
}
