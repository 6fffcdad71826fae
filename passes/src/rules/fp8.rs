//! The fp8 family: FP8: casts to E4M3 with block scales → `quantize_fp8` / `dequantize_fp8`, matmuls of dequantized operands → `scaled_matmul_fp8` (§5.2).
//!
//! Empty for now: its engineers fill the table against the API documented in `rules/mod.rs`
//! (patterns over `crate::egraph::lang::Rl`, right-hand sides through `typed`/`tuple`, rules
//! named `fp8-…`, each with a start ⇒ goal test).

use crate::egraph::Rule;

/// The fp8 rule table.
#[rustfmt::skip]
pub fn fp8_rules() -> Vec<Rule> {
    Vec::new()
}
