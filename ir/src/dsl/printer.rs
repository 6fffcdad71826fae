//! Pretty-printer of the model DSL: [`print`] writes a program as canonical source (4-space
//! indentation, parentheses only where precedence needs them) that parses back to the same
//! AST up to spans; [`strip_spans`] makes that comparable.

use super::ast::*;
use super::lexer::quote;

const INDENT: &str = "    ";

/// Blocks whose only content is a tail expression of at most this many characters print on
/// one line: `{ x * x }`.
const INLINE_BLOCK_WIDTH: usize = 60;

/// An `if` chain whose branches are all short prints on one line when it takes at most this
/// many characters: `if a { b } else { c }`.
const INLINE_IF_WIDTH: usize = 80;

/// Canonical source text of `p`. Top-level statements are grouped: a blank line separates
/// statements of different kinds (configs, requires, dims, inputs and states, params, the
/// rest) and surrounds `fn` definitions, `for` loops and block-like expression statements.
pub fn print(p: &Program) -> String {
    let mut out = String::new();
    let mut prev: Option<u8> = None;
    for s in &p.stmts {
        let group = group(s);
        if prev.is_some_and(|g| g != group || g == ITEM) {
            out.push('\n');
        }
        out.push_str(&stmt(s, 0, false));
        out.push('\n');
        prev = Some(group);
    }
    out
}

const ITEM: u8 = 0;

fn group(s: &Stmt) -> u8 {
    match &s.kind {
        StmtKind::Config { .. } => 1,
        StmtKind::Require { .. } => 2,
        StmtKind::Dim { .. } => 3,
        StmtKind::Input { .. } | StmtKind::State { .. } => 4,
        StmtKind::Param { .. } => 5,
        StmtKind::Fn { .. } | StmtKind::For { .. } => ITEM,
        StmtKind::Expr(e) if is_block_like(e) => ITEM,
        _ => 6,
    }
}

fn is_block_like(e: &Expr) -> bool {
    matches!(e.kind, ExprKind::If { .. } | ExprKind::Block(_) | ExprKind::Scan { .. })
}

/// Precedence levels: 1 `||`, 2 `&&`, 3 comparisons, 4 `+ -`, 5 `* / // % @`, 6 prefix
/// `- !`, 7 `**`, 8 postfix and primaries.
fn level(op: BinOp) -> u8 {
    use BinOp::*;
    match op {
        Or => 1,
        And => 2,
        Eq | Ne | Lt | Le | Gt | Ge => 3,
        Add | Sub => 4,
        Mul | Div | FloorDiv | Mod | MatMul => 5,
        Pow => 7,
    }
}

const UNARY: u8 = 6;
const PRIMARY: u8 = 8;

fn prec(e: &Expr) -> u8 {
    match &e.kind {
        ExprKind::Binary { op, .. } => level(*op),
        ExprKind::Unary { .. } => UNARY,
        // not made by the parser, but they print with a sign
        ExprKind::Int(v) if *v < 0 => UNARY,
        ExprKind::Float(v) if v.is_sign_negative() => UNARY,
        _ => PRIMARY,
    }
}

/// The least precedence each operand of `op` may have without parentheses.
fn operand_levels(op: BinOp) -> (u8, u8) {
    let l = level(op);
    match op {
        // right-associative; `-x ** 2` is `-(x ** 2)` but `2 ** -1` needs no parentheses
        BinOp::Pow => (PRIMARY, UNARY),
        // comparisons do not chain
        BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => (l + 1, l + 1),
        _ => (l, l + 1),
    }
}

fn op_str(op: BinOp) -> &'static str {
    use BinOp::*;
    match op {
        Or => "||",
        And => "&&",
        Eq => "==",
        Ne => "!=",
        Lt => "<",
        Le => "<=",
        Gt => ">",
        Ge => ">=",
        Add => "+",
        Sub => "-",
        Mul => "*",
        Div => "/",
        FloorDiv => "//",
        Mod => "%",
        MatMul => "@",
        Pow => "**",
    }
}

/// Whether `e`, printed, starts with `if`, `{` or `scan` without being block-like itself. At
/// the start of a statement such an expression would end after its first block, so it is
/// printed in parentheses there.
fn starts_with_block(e: &Expr) -> bool {
    match &e.kind {
        ExprKind::If { .. } | ExprKind::Block(_) | ExprKind::Scan { .. } => true,
        ExprKind::Binary { op, lhs, .. } => prec(lhs) >= operand_levels(*op).0 && starts_with_block(lhs),
        ExprKind::Index { base, .. } => prec(base) >= PRIMARY && starts_with_block(base),
        _ => false,
    }
}

/// An expression in statement position (an expression statement or a block's tail).
fn stmt_expr(e: &Expr, indent: usize) -> String {
    let s = expr(e, indent);
    if !is_block_like(e) && starts_with_block(e) {
        format!("({s})")
    } else {
        s
    }
}

/// Statement `s` printed at indentation `indent` (the caller writes the leading indent).
/// `last_without_tail`: `s` ends a block that has no tail, so a block-like expression
/// statement needs its `;` (or it would be read back as the tail).
fn stmt(s: &Stmt, indent: usize, last_without_tail: bool) -> String {
    let e = |x: &Expr| expr(x, indent);
    match &s.kind {
        StmtKind::Config { name, ty, default } => match default {
            Some(d) => format!("config {}: {} = {};", name.name, ty.name, e(d)),
            None => format!("config {}: {};", name.name, ty.name),
        },
        StmtKind::Require { cond, message } => format!("require {}, {};", e(cond), e(message)),
        StmtKind::Dim { names } => {
            let names: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
            format!("dim {};", names.join(", "))
        }
        StmtKind::Input { name, ty } => format!("input {}: {};", name.name, e(ty)),
        StmtKind::State { name, ty, key } => {
            format!("state {}: {} = {};", name.name, e(ty), e(key))
        }
        StmtKind::Param { name, ty, key, stack } => {
            let mut out = format!("param {}: {} = {}", name.name, e(ty), e(key));
            if let Some(st) = stack {
                out.push_str(&format!(" for {} in {}..{}", st.var.name, e(&st.start), e(&st.end)));
            }
            out.push(';');
            out
        }
        StmtKind::Let { pat, value } => format!("let {} = {};", pattern(pat), e(value)),
        StmtKind::Assign { name, value } => format!("{} = {};", name.name, e(value)),
        StmtKind::Fn { name, params, body } => {
            let params: Vec<String> = params
                .iter()
                .map(|p| match &p.default {
                    Some(d) => format!("{} = {}", p.name.name, e(d)),
                    None => p.name.name.clone(),
                })
                .collect();
            format!("fn {}({}) {}", name.name, params.join(", "), block(body, indent))
        }
        StmtKind::For { var, start, end, body } => {
            format!("for {} in {}..{} {}", var.name, e(start), e(end), block(body, indent))
        }
        StmtKind::Output { name, value } => format!("output {} = {};", e(name), e(value)),
        StmtKind::Carry { name, value } => format!("carry {} = {};", name.name, e(value)),
        StmtKind::Expr(x) => {
            let s = stmt_expr(x, indent);
            if is_block_like(x) && !last_without_tail {
                s
            } else {
                s + ";"
            }
        }
    }
}

fn pattern(p: &Pattern) -> String {
    match p {
        Pattern::Name(n) => n.name.clone(),
        Pattern::Tuple(items, _) => {
            let items: Vec<String> = items.iter().map(pattern).collect();
            match items.len() {
                1 => format!("({},)", items[0]),
                _ => format!("({})", items.join(", ")),
            }
        }
    }
}

fn block(b: &Block, indent: usize) -> String {
    // the tail is printed once (printing it twice would take exponential time on nested
    // blocks); a one-line text does not depend on the indentation
    let tail = b.tail.as_ref().map(|t| stmt_expr(t, indent + 1));
    let inline = inline_block(b, tail.as_deref());
    inline.unwrap_or_else(|| multi_line_block(b, indent, tail))
}

/// `b` on one line (`{}`, `{ x * x }`), if it has no statements and a short one-line tail
/// (`tail` is its text).
fn inline_block(b: &Block, tail: Option<&str>) -> Option<String> {
    if !b.stmts.is_empty() {
        return None;
    }
    match tail {
        None => Some("{}".to_string()),
        Some(s) if !s.contains('\n') && s.chars().count() <= INLINE_BLOCK_WIDTH => Some(format!("{{ {s} }}")),
        Some(_) => None,
    }
}

/// `b` over several lines, its contents at `indent + 1` (`tail` is the tail's text).
fn multi_line_block(b: &Block, indent: usize, tail: Option<String>) -> String {
    if b.stmts.is_empty() && tail.is_none() {
        return "{}".to_string();
    }
    let inner = INDENT.repeat(indent + 1);
    let mut out = "{\n".to_string();
    let n = b.stmts.len();
    for (i, s) in b.stmts.iter().enumerate() {
        out.push_str(&inner);
        out.push_str(&stmt(s, indent + 1, i + 1 == n && b.tail.is_none()));
        out.push('\n');
    }
    if let Some(t) = tail {
        out.push_str(&inner);
        out.push_str(&t);
        out.push('\n');
    }
    out.push_str(&INDENT.repeat(indent));
    out.push('}');
    out
}

/// An `if` / `else if` / `else` chain: on one line when every branch is a short one-line
/// block and the whole fits in [`INLINE_IF_WIDTH`] characters, otherwise every branch over
/// several lines.
fn if_chain(e: &Expr, indent: usize) -> String {
    let mut conds: Vec<String> = Vec::new();
    let mut blocks: Vec<std::borrow::Cow<'_, Block>> = Vec::new();
    let mut cur = e;
    let mut has_else = false;
    while let ExprKind::If { cond, then, els } = &cur.kind {
        conds.push(expr(cond, indent));
        blocks.push(std::borrow::Cow::Borrowed(then));
        match els.as_deref() {
            None => break,
            Some(
                next @ Expr {
                    kind: ExprKind::If { .. },
                    ..
                },
            ) => cur = next,
            Some(Expr {
                kind: ExprKind::Block(b),
                ..
            }) => {
                blocks.push(std::borrow::Cow::Borrowed(b));
                has_else = true;
                break;
            }
            // not made by the parser: wrap the value in a block
            Some(other) => {
                let tail = Some(Box::new(other.clone()));
                blocks.push(std::borrow::Cow::Owned(Block {
                    stmts: Vec::new(),
                    tail,
                    span: other.span,
                }));
                has_else = true;
                break;
            }
        }
    }
    let tails: Vec<Option<String>> = blocks
        .iter()
        .map(|b| b.tail.as_ref().map(|t| stmt_expr(t, indent + 1)))
        .collect();
    let assemble = |rendered: Vec<String>| {
        let mut out = String::new();
        for (i, c) in conds.iter().enumerate() {
            if i > 0 {
                out.push_str(" else ");
            }
            out.push_str(&format!("if {c} {}", rendered[i]));
        }
        if has_else {
            out.push_str(&format!(" else {}", rendered[conds.len()]));
        }
        out
    };
    let inline: Option<Vec<String>> = blocks
        .iter()
        .zip(&tails)
        .map(|(b, t)| inline_block(b, t.as_deref()))
        .collect();
    if let Some(inline) = inline {
        let text = assemble(inline);
        if !text.contains('\n') && text.chars().count() <= INLINE_IF_WIDTH {
            return text;
        }
    }
    let multi: Vec<String> = blocks
        .iter()
        .zip(tails)
        .map(|(b, t)| multi_line_block(b, indent, t))
        .collect();
    assemble(multi)
}

fn expr(e: &Expr, indent: usize) -> String {
    expr_min(e, 0, indent)
}

/// `e`, in parentheses when its precedence is below `min`.
fn expr_min(e: &Expr, min: u8, indent: usize) -> String {
    let s = expr_bare(e, indent);
    if prec(e) < min {
        format!("({s})")
    } else {
        s
    }
}

fn list(items: &[Expr], indent: usize) -> String {
    items.iter().map(|x| expr(x, indent)).collect::<Vec<_>>().join(", ")
}

/// `a:b`, or `a + 1 : b` with spaces when a bound is not a primary (as PEP 8 has it).
fn slice(start: Option<&Expr>, end: Option<&Expr>, indent: usize) -> String {
    let spaced = start.iter().chain(end.iter()).any(|x| prec(x) < PRIMARY);
    let start = start.map_or(String::new(), |x| expr(x, indent));
    let end = end.map_or(String::new(), |x| expr(x, indent));
    match (spaced, start.is_empty(), end.is_empty()) {
        (false, _, _) => format!("{start}:{end}"),
        (true, true, _) => format!(": {end}"),
        (true, _, true) => format!("{start} :"),
        (true, false, false) => format!("{start} : {end}"),
    }
}

fn expr_bare(e: &Expr, indent: usize) -> String {
    match &e.kind {
        ExprKind::Int(v) => v.to_string(),
        // `{:?}` is the shortest text that reads back to the same f64 and always has a `.`
        // or an exponent (`1.0`, `1e-6`, `1e20`), so it lexes as a float
        ExprKind::Float(v) => format!("{v:?}"),
        ExprKind::Str(s) => quote(s),
        ExprKind::Bool(b) => b.to_string(),
        ExprKind::Name(n) => n.clone(),
        ExprKind::Unary { op, expr } => {
            let op = match op {
                UnOp::Neg => "-",
                UnOp::Not => "!",
            };
            format!("{op}{}", expr_min(expr, UNARY, indent))
        }
        ExprKind::Binary { op, lhs, rhs } => {
            let (l, r) = operand_levels(*op);
            format!(
                "{} {} {}",
                expr_min(lhs, l, indent),
                op_str(*op),
                expr_min(rhs, r, indent)
            )
        }
        ExprKind::Call { func, args } => {
            let args: Vec<String> = args
                .iter()
                .map(|a| match &a.name {
                    Some(n) => format!("{} = {}", n.name, expr(&a.value, indent)),
                    None => expr(&a.value, indent),
                })
                .collect();
            format!("{}({})", func.name, args.join(", "))
        }
        ExprKind::Index { base, items } => {
            let items: Vec<String> = items
                .iter()
                .map(|it| match it {
                    IndexItem::Expr(x) => expr(x, indent),
                    IndexItem::Slice { start, end } => slice(start.as_ref(), end.as_ref(), indent),
                    IndexItem::Ellipsis => "...".to_string(),
                })
                .collect();
            format!("{}[{}]", expr_min(base, PRIMARY, indent), items.join(", "))
        }
        ExprKind::List(items) => format!("[{}]", list(items, indent)),
        ExprKind::Tuple(items) => match items.len() {
            1 => format!("({},)", list(items, indent)),
            _ => format!("({})", list(items, indent)),
        },
        ExprKind::If { .. } => if_chain(e, indent),
        ExprKind::Block(b) => block(b, indent),
        ExprKind::Scan {
            carries,
            seqs,
            axis,
            body,
        } => {
            let bind = |b: &ScanBinding, sep: &str| format!("{}{sep}{}", b.name.name, expr(&b.value, indent));
            let carries: Vec<String> = carries.iter().map(|b| bind(b, " = ")).collect();
            let seqs: Vec<String> = seqs.iter().map(|b| bind(b, " in ")).collect();
            let mut head = if carries.is_empty() {
                format!("scan (; {}", seqs.join(", "))
            } else {
                format!("scan ({}; {}", carries.join(", "), seqs.join(", "))
            };
            if let Some(a) = axis {
                head.push_str(&format!("; axis = {}", expr(a, indent)));
            }
            format!("{head}) {}", block(body, indent))
        }
    }
}

/// A copy of `p` with every span set to the default, for comparing ASTs parsed from
/// different texts.
pub fn strip_spans(p: &Program) -> Program {
    let mut p = p.clone();
    for s in &mut p.stmts {
        strip_stmt(s);
    }
    p
}

fn strip_ident(i: &mut Ident) {
    i.span = Span::default();
}

fn strip_stmt(s: &mut Stmt) {
    s.span = Span::default();
    match &mut s.kind {
        StmtKind::Config { name, ty, default } => {
            strip_ident(name);
            strip_ident(ty);
            default.iter_mut().for_each(strip_expr);
        }
        StmtKind::Require { cond, message } => {
            strip_expr(cond);
            strip_expr(message);
        }
        StmtKind::Dim { names } => names.iter_mut().for_each(strip_ident),
        StmtKind::Input { name, ty } => {
            strip_ident(name);
            strip_expr(ty);
        }
        StmtKind::State { name, ty, key } => {
            strip_ident(name);
            strip_expr(ty);
            strip_expr(key);
        }
        StmtKind::Param { name, ty, key, stack } => {
            strip_ident(name);
            strip_expr(ty);
            strip_expr(key);
            if let Some(st) = stack {
                strip_ident(&mut st.var);
                strip_expr(&mut st.start);
                strip_expr(&mut st.end);
            }
        }
        StmtKind::Let { pat, value } => {
            strip_pattern(pat);
            strip_expr(value);
        }
        StmtKind::Assign { name, value } | StmtKind::Carry { name, value } => {
            strip_ident(name);
            strip_expr(value);
        }
        StmtKind::Fn { name, params, body } => {
            strip_ident(name);
            for p in params {
                strip_ident(&mut p.name);
                p.default.iter_mut().for_each(strip_expr);
            }
            strip_block(body);
        }
        StmtKind::For { var, start, end, body } => {
            strip_ident(var);
            strip_expr(start);
            strip_expr(end);
            strip_block(body);
        }
        StmtKind::Output { name, value } => {
            strip_expr(name);
            strip_expr(value);
        }
        StmtKind::Expr(e) => strip_expr(e),
    }
}

fn strip_pattern(p: &mut Pattern) {
    match p {
        Pattern::Name(n) => strip_ident(n),
        Pattern::Tuple(items, span) => {
            *span = Span::default();
            items.iter_mut().for_each(strip_pattern);
        }
    }
}

fn strip_block(b: &mut Block) {
    b.span = Span::default();
    b.stmts.iter_mut().for_each(strip_stmt);
    if let Some(t) = &mut b.tail {
        strip_expr(t);
    }
}

fn strip_expr(e: &mut Expr) {
    e.span = Span::default();
    match &mut e.kind {
        ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Str(_) | ExprKind::Bool(_) | ExprKind::Name(_) => {}
        ExprKind::Unary { expr, .. } => strip_expr(expr),
        ExprKind::Binary { lhs, rhs, .. } => {
            strip_expr(lhs);
            strip_expr(rhs);
        }
        ExprKind::Call { func, args } => {
            strip_ident(func);
            for a in args {
                a.name.iter_mut().for_each(strip_ident);
                strip_expr(&mut a.value);
            }
        }
        ExprKind::Index { base, items } => {
            strip_expr(base);
            for it in items {
                match it {
                    IndexItem::Expr(x) => strip_expr(x),
                    IndexItem::Slice { start, end } => {
                        start.iter_mut().for_each(strip_expr);
                        end.iter_mut().for_each(strip_expr);
                    }
                    IndexItem::Ellipsis => {}
                }
            }
        }
        ExprKind::List(items) | ExprKind::Tuple(items) => items.iter_mut().for_each(strip_expr),
        ExprKind::If { cond, then, els } => {
            strip_expr(cond);
            strip_block(then);
            if let Some(els) = els {
                strip_expr(els);
            }
        }
        ExprKind::Block(b) => strip_block(b),
        ExprKind::Scan {
            carries,
            seqs,
            axis,
            body,
        } => {
            for b in carries.iter_mut().chain(seqs.iter_mut()) {
                strip_ident(&mut b.name);
                strip_expr(&mut b.value);
            }
            if let Some(a) = axis {
                strip_expr(a);
            }
            strip_block(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dsl::parser::parse;

    /// A small hybrid linear/softmax-attention decoder that uses every construct.
    const MODEL: &str = r#"# A toy hybrid linear/softmax-attention decoder.
config vocab_size: int;
config hidden_size: int;
config num_hidden_layers: int;
config num_attention_heads: int;
config head_dim: int = 128;
config rms_norm_eps: float = 1e-6;
config rope_theta: float = 1.0e+6;
config partial_rotary_factor: float = 0.5;
config layer_group_size: int = 4;
config tie_word_embeddings: bool = false;
config model_type: str = "bailing_moe_linear";
config rope_scaling: any;

require hidden_size == num_attention_heads * head_dim, "hidden_size must be heads * head_dim";
require num_hidden_layers % layer_group_size == 0 || !tie_word_embeddings,
    "layers come in groups of {layer_group_size}";

dim batch, seq;

input input_ids: i64[batch, seq];
input positions: i64[batch, seq];
state kv_state: f32[num_hidden_layers, batch, num_attention_heads, head_dim, head_dim] = "linear_state";

param embed: bf16[vocab_size, hidden_size] = "model.word_embeddings.weight";
param qkv: bf16[num_hidden_layers, hidden_size, 3 * hidden_size] =
    "model.layers.{l}.attention.query_key_value.weight" for l in 0..num_hidden_layers;
param attn_norm: bf16[num_hidden_layers, hidden_size] = "model.layers.{l}.input_layernorm.weight"
    for l in 0..num_hidden_layers;
param norm: bf16[hidden_size] = "model.norm.weight";

let D = hidden_size;
let r = head_dim * partial_rotary_factor;
let scale = head_dim ** -0.5;

fn rms_norm(x, w, eps = rms_norm_eps) {
    let var = mean(x ** 2, axis = -1, keepdim = true);
    x * rsqrt(var + eps) * w
}

fn rope(x, pos, theta = rope_theta, rot = r,) {
    let half = rot // 2;
    let inv = 1.0 / theta ** (arange(0, half) * 2.0 / rot);
    let ang = pos[..., None] * inv;
    let (x1, x2) = (x[..., 0:r/2], x[..., r/2:r]);
    let (c, (s,),) = (cos(ang), (sin(ang),));
    concat([x1 * c - x2 * s, x1 * s + x2 * c, x[..., r:]], axis = -1)
}

fn is_softmax(l) { (l + 1) % layer_group_size == 0 }

fn nothing() {}

let h = embed[input_ids];
let aux = ();
for l in 0..num_hidden_layers {
    let x = rms_norm(h, attn_norm[l]);
    let (q, k, v) = split(x @ qkv[l], 3, axis = -1);
    let q = rope(q, positions);
    if is_softmax(l) {
        h = h + softmax_attention(q, k, v, scale = scale, causal = true);
    } else if l == 0 && seq <= 1 {
        h = h + x;
    } else if l != 1 {
        # a linear-attention recurrence over the sequence
        let (s_last, n, ys) = scan (s = kv_state[l], n = 0; qt in q, kt in k; axis = 1) {
            let decay = exp(-slope(l) * 1_000);
            let s2 = s * decay + transpose(kt) @ kt;
            (s2, n + 1, qt @ s2)
        };
        carry kv_state = set(kv_state, l, s_last);
        h = h + ys;
    } else {
        h = h - 1;
    }
    let gate = if l > 0 { sigmoid(-h ** 2) } else { 1.0 };
    h = h * gate;
    if l >= 100 && l < 200 { h = h / 2; }
}
{
    let unused = [h[0, :, :], h[:1], h[:]];
    nothing();
}
scan (; t in h) { t }
output "logits" = rms_norm(h, norm) @ transpose(embed);
output "hidden.{num_hidden_layers}" = [h, (h,), 2 ** 3 ** 2, (a - b) - (c - d), "tab\there \"q\" \\ {x}\n"];
"#;

    fn p(src: &str) -> Program {
        match parse("t.rd", src) {
            Ok(p) => p,
            Err(e) => panic!("{e}\nin:\n{src}"),
        }
    }

    /// `print` reads back to the same AST and is a fixed point.
    fn assert_round_trip(prog: &Program) -> String {
        let text = print(prog);
        let back = match parse("printed.rd", &text) {
            Ok(p) => p,
            Err(e) => panic!("printed text does not parse: {e}\n{text}"),
        };
        assert_eq!(strip_spans(&back), strip_spans(prog), "printed:\n{text}");
        assert_eq!(print(&back), text);
        text
    }

    /// Names of the statement and expression kinds, operators and index items used in `p`.
    fn constructs(p: &Program) -> std::collections::BTreeSet<String> {
        fn walk_block(b: &Block, out: &mut std::collections::BTreeSet<String>) {
            b.stmts.iter().for_each(|s| walk_stmt(s, out));
            if let Some(t) = &b.tail {
                out.insert("tail".into());
                walk(t, out);
            }
        }
        fn walk_stmt(s: &Stmt, out: &mut std::collections::BTreeSet<String>) {
            let dbg = format!("{:?}", s.kind);
            let name: String = dbg.chars().take_while(|c| c.is_alphanumeric()).collect();
            out.insert(name);
            let e = |x: &Expr, out: &mut std::collections::BTreeSet<String>| walk(x, out);
            match &s.kind {
                StmtKind::Config { default, .. } => default.iter().for_each(|x| e(x, out)),
                StmtKind::Require { cond, message } => {
                    e(cond, out);
                    e(message, out);
                }
                StmtKind::Dim { .. } => {}
                StmtKind::Input { ty, .. } => e(ty, out),
                StmtKind::State { ty, key, .. } => {
                    e(ty, out);
                    e(key, out);
                }
                StmtKind::Param { ty, key, stack, .. } => {
                    e(ty, out);
                    e(key, out);
                    if let Some(st) = stack {
                        out.insert("stack".into());
                        walk(&st.start, out);
                        walk(&st.end, out);
                    }
                }
                StmtKind::Let { pat, value } => {
                    if matches!(pat, Pattern::Tuple(v, _) if v.iter().any(|p| matches!(p, Pattern::Tuple(..)))) {
                        out.insert("nested pattern".into());
                    }
                    e(value, out)
                }
                StmtKind::Assign { value, .. } | StmtKind::Carry { value, .. } => e(value, out),
                StmtKind::Fn { params, body, .. } => {
                    if params.iter().any(|p| p.default.is_some()) {
                        out.insert("default".into());
                    }
                    walk_block(body, out);
                }
                StmtKind::For { start, end, body, .. } => {
                    walk(start, out);
                    walk(end, out);
                    walk_block(body, out);
                }
                StmtKind::Output { name, value } => {
                    e(name, out);
                    e(value, out);
                }
                StmtKind::Expr(x) => e(x, out),
            }
        }
        fn walk(e: &Expr, out: &mut std::collections::BTreeSet<String>) {
            let dbg = format!("{:?}", e.kind);
            let name: String = dbg.chars().take_while(|c| c.is_alphanumeric()).collect();
            out.insert(name);
            match &e.kind {
                ExprKind::Unary { op, expr } => {
                    out.insert(format!("{op:?}"));
                    walk(expr, out);
                }
                ExprKind::Binary { op, lhs, rhs } => {
                    out.insert(format!("{op:?}"));
                    walk(lhs, out);
                    walk(rhs, out);
                }
                ExprKind::Call { args, .. } => {
                    for a in args {
                        if a.name.is_some() {
                            out.insert("kwarg".into());
                        }
                        walk(&a.value, out);
                    }
                }
                ExprKind::Index { base, items } => {
                    walk(base, out);
                    for it in items {
                        match it {
                            IndexItem::Expr(x) => walk(x, out),
                            IndexItem::Slice { start, end } => {
                                out.insert(format!("slice {} {}", start.is_some(), end.is_some()));
                                start.iter().chain(end.iter()).for_each(|x| walk(x, out));
                            }
                            IndexItem::Ellipsis => {
                                out.insert("ellipsis".into());
                            }
                        }
                    }
                }
                ExprKind::List(v) | ExprKind::Tuple(v) => {
                    out.insert(format!("len {}", v.len().min(2)));
                    v.iter().for_each(|x| walk(x, out));
                }
                ExprKind::If { cond, then, els } => {
                    walk(cond, out);
                    walk_block(then, out);
                    if let Some(e) = els {
                        out.insert(
                            if matches!(e.kind, ExprKind::If { .. }) {
                                "else if"
                            } else {
                                "else"
                            }
                            .into(),
                        );
                        walk(e, out);
                    }
                }
                ExprKind::Block(b) => walk_block(b, out),
                ExprKind::Scan {
                    carries,
                    seqs,
                    axis,
                    body,
                } => {
                    out.insert(format!(
                        "scan {} {} {}",
                        carries.len().min(2),
                        seqs.len().min(2),
                        axis.is_some()
                    ));
                    carries.iter().chain(seqs.iter()).for_each(|b| walk(&b.value, out));
                    axis.iter().for_each(|a| walk(a, out));
                    walk_block(body, out);
                }
                _ => {}
            }
        }
        let mut out = std::collections::BTreeSet::new();
        p.stmts.iter().for_each(|s| walk_stmt(s, &mut out));
        out
    }

    #[test]
    fn realistic_program_round_trips() {
        let prog = p(MODEL);
        let used = constructs(&prog);
        for want in [
            "Config",
            "Require",
            "Dim",
            "Input",
            "State",
            "Param",
            "stack",
            "Let",
            "nested pattern",
            "Assign",
            "Fn",
            "default",
            "For",
            "Output",
            "Carry",
            "Expr",
            "tail",
            "Int",
            "Float",
            "Str",
            "Bool",
            "Name",
            "Unary",
            "Neg",
            "Not",
            "Binary",
            "Or",
            "And",
            "Eq",
            "Ne",
            "Lt",
            "Le",
            "Gt",
            "Ge",
            "Add",
            "Sub",
            "Mul",
            "Div",
            "FloorDiv",
            "Mod",
            "MatMul",
            "Pow",
            "Call",
            "kwarg",
            "Index",
            "ellipsis",
            "slice true true",
            "slice false true",
            "slice true false",
            "slice false false",
            "List",
            "Tuple",
            "len 0",
            "len 1",
            "len 2",
            "If",
            "else if",
            "else",
            "Block",
            "Scan",
            "scan 2 2 true",
            "scan 0 1 false",
        ] {
            assert!(used.contains(want), "the test model lacks {want}");
        }
        let text = assert_round_trip(&prog);
        for line in [
            "config rope_theta: float = 1000000.0;\n",
            "require num_hidden_layers % layer_group_size == 0 || !tie_word_embeddings, \"layers come in groups of {layer_group_size}\";\n",
            "param qkv: bf16[num_hidden_layers, hidden_size, 3 * hidden_size] = \"model.layers.{l}.attention.query_key_value.weight\" for l in 0..num_hidden_layers;\n",
            "\nfn rms_norm(x, w, eps = rms_norm_eps) {\n    let var = mean(x ** 2, axis = -1, keepdim = true);\n    x * rsqrt(var + eps) * w\n}\n\n",
            "    let (x1, x2) = (x[..., 0 : r / 2], x[..., r / 2 : r]);\n",
            "    let ang = pos[..., None] * inv;\n",
            "    let (c, (s,)) = (cos(ang), (sin(ang),));\n",
            "fn is_softmax(l) { (l + 1) % layer_group_size == 0 }\n",
            "fn nothing() {}\n",
            "    } else if l == 0 && seq <= 1 {\n",
            "        let (s_last, n, ys) = scan (s = kv_state[l], n = 0; qt in q, kt in k; axis = 1) {\n",
            "            let decay = exp(-slope(l) * 1000);\n",
            "            (s2, n + 1, qt @ s2)\n        };\n",
            "    let gate = if l > 0 { sigmoid(-h ** 2) } else { 1.0 };\n",
            "    if l >= 100 && l < 200 {\n        h = h / 2;\n    }\n}\n",
            "    nothing();\n}\n\nscan (; t in h) { t }\n\noutput \"logits\"",
            "[h, (h,), 2 ** 3 ** 2, a - b - (c - d), \"tab\\there \\\"q\\\" \\\\ {x}\\n\"];\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn every_statement_kind_round_trips_canonically() {
        type IsKind = fn(&StmtKind) -> bool;
        let cases: [(&str, IsKind); 17] = [
            ("config n: int;\n", |k| {
                matches!(k, StmtKind::Config { default: None, .. })
            }),
            ("config eps: float = 1e-6;\n", |k| {
                matches!(k, StmtKind::Config { default: Some(_), .. })
            }),
            ("require n % 2 == 0, \"n must be even\";\n", |k| {
                matches!(k, StmtKind::Require { .. })
            }),
            (
                "dim batch, seq;\n",
                |k| matches!(k, StmtKind::Dim { names } if names.len() == 2),
            ),
            ("input ids: i64[batch, seq];\n", |k| matches!(k, StmtKind::Input { .. })),
            ("state kv: f32[batch, H, D, D] = \"kv.{l}\";\n", |k| {
                matches!(k, StmtKind::State { .. })
            }),
            ("param w: bf16[D, V] = \"lm_head.weight\";\n", |k| {
                matches!(k, StmtKind::Param { stack: None, .. })
            }),
            ("param wq: bf16[L, D, D] = \"layers.{l}.wq\" for l in 0..L;\n", |k| {
                matches!(k, StmtKind::Param { stack: Some(_), .. })
            }),
            ("let (a, (b, c), d) = f(x);\n", |k| {
                matches!(
                    k,
                    StmtKind::Let {
                        pat: Pattern::Tuple(..),
                        ..
                    }
                )
            }),
            ("x = x + 1;\n", |k| matches!(k, StmtKind::Assign { .. })),
            ("fn f(x, eps = 1e-5) {\n    let y = x * x;\n    y + eps\n}\n", |k| {
                matches!(k, StmtKind::Fn { .. })
            }),
            ("for l in 0..n_layers - 1 {\n    h = layer(h, l);\n}\n", |k| {
                matches!(k, StmtKind::For { .. })
            }),
            ("output \"logits.{i}\" = x @ w;\n", |k| {
                matches!(k, StmtKind::Output { .. })
            }),
            ("carry kv = kv * 0.5;\n", |k| matches!(k, StmtKind::Carry { .. })),
            ("f(x, axis = 0);\n", |k| matches!(k, StmtKind::Expr(_))),
            (
                "if a {\n    x = 1;\n} else if b {\n    2\n} else {\n    x = 3;\n}\n",
                |k| {
                    matches!(
                        k,
                        StmtKind::Expr(Expr {
                            kind: ExprKind::If { .. },
                            ..
                        })
                    )
                },
            ),
            ("scan (h = h0; x in xs) {\n    let y = h + x;\n    (y, y)\n}\n", |k| {
                matches!(
                    k,
                    StmtKind::Expr(Expr {
                        kind: ExprKind::Scan { .. },
                        ..
                    })
                )
            }),
        ];
        for (src, is_kind) in cases {
            let prog = p(src);
            assert_eq!(prog.stmts.len(), 1, "{src}");
            assert!(is_kind(&prog.stmts[0].kind), "{src}: {:?}", prog.stmts[0].kind);
            assert_eq!(assert_round_trip(&prog), src);
            // and inside a block
            let nested = format!(
                "fn g() {{\n{}}}\n",
                src.lines().map(|l| format!("    {l}\n")).collect::<String>()
            );
            assert_round_trip(&p(&nested));
        }
    }

    #[test]
    fn parentheses_only_where_needed() {
        for (src, canonical) in [
            ("let _ = (a + b) * c;", "let _ = (a + b) * c;"),
            ("let _ = a - (b - c);", "let _ = a - (b - c);"),
            ("let _ = (a - b) - c;", "let _ = a - b - c;"),
            ("let _ = ((-x)) ** 2;", "let _ = (-x) ** 2;"),
            ("let _ = -(x ** 2);", "let _ = -x ** 2;"),
            ("let _ = (a ** b) ** c;", "let _ = (a ** b) ** c;"),
            ("let _ = a ** (b ** c);", "let _ = a ** b ** c;"),
            ("let _ = 2 ** (-1);", "let _ = 2 ** -1;"),
            ("let _ = (a < b) < c;", "let _ = (a < b) < c;"),
            ("let _ = a < (b < c);", "let _ = a < (b < c);"),
            ("let _ = (a == b) && (c != d);", "let _ = a == b && c != d;"),
            ("let _ = (a || b) && c;", "let _ = (a || b) && c;"),
            ("let _ = -(a + b);", "let _ = -(a + b);"),
            ("let _ = - -a;", "let _ = --a;"),
            ("let _ = !(a && b);", "let _ = !(a && b);"),
            ("let _ = (a + b)[0][1];", "let _ = (a + b)[0][1];"),
            ("let _ = (-a)[0];", "let _ = (-a)[0];"),
            ("let _ = (a @ b) * c;", "let _ = a @ b * c;"),
            ("let _ = a @ (b * c);", "let _ = a @ (b * c);"),
            ("let _ = a // (b % c);", "let _ = a // (b % c);"),
            ("let _ = (1, (2,), (), [(3)]);", "let _ = (1, (2,), (), [3]);"),
            ("let _ = x[(a:b)];", ""),
            ("let _ = f(a = (b = c));", ""),
            ("(if a { b } else { c }) + 1;", "(if a { b } else { c } + 1);"),
            ("(scan (; x in xs) { x })[0];", "(scan (; x in xs) { x }[0]);"),
            ("({ a } - 1) * 2;", "({ a } - 1) * 2;"),
            ("fn f() { ({ a })[0] }", "fn f() { ({ a }[0]) }"),
            ("fn f() { if a { b }; }", "fn f() {\n    if a { b };\n}"),
            ("fn f() { if a { b } }", "fn f() { if a { b } }"),
            ("fn f() { { { a } } }", "fn f() { { { a } } }"),
            (
                "let _ = if a { b } else { c }[0] + 1;",
                "let _ = if a { b } else { c }[0] + 1;",
            ),
            ("for i in (0)..(n + 1) {}", "for i in 0..n + 1 {}"),
            ("if if a { b } else { c } { d }", "if if a { b } else { c } { d }"),
            (
                "let _ = 1.0e+6 + 0.1 + 1e-7 + 2.5e20;",
                "let _ = 1000000.0 + 0.1 + 1e-7 + 2.5e20;",
            ),
            ("let _ = x[a+1:, :-b, -1:n, a:b];", "let _ = x[a + 1 :, : -b, -1 : n, a:b];"),
            ("let _ = if a {b} else if c {d} else {e};", "let _ = if a { b } else if c { d } else { e };"),
            (
                "let _ = if a {b} else if c {d} else {e; f};",
                "let _ = if a {\n    b\n} else if c {\n    d\n} else {\n    e;\n    f\n};",
            ),
            (
                "let _ = if a_long_condition {b_long_value} else {c_long_value_that_is_long_enough_to_wrap};",
                "let _ = if a_long_condition {\n    b_long_value\n} else {\n    c_long_value_that_is_long_enough_to_wrap\n};",
            ),
            ("let _ = if a {} else {};", "let _ = if a {} else {};"),
            ("if a { b = 1; } else {}", "if a {\n    b = 1;\n} else {}"),
        ] {
            let prog = match parse("t.rd", src) {
                Ok(prog) => prog,
                Err(_) if canonical.is_empty() => continue,
                Err(e) => panic!("{e}"),
            };
            assert_eq!(assert_round_trip(&prog), format!("{canonical}\n"), "from {src}");
        }
    }

    #[test]
    fn hand_built_asts_print_parseably() {
        let sp = Span::default();
        let e = |kind| Expr { kind, span: sp };
        let name = |n: &str| e(ExprKind::Name(n.into()));
        let block = |tail: Expr| Block {
            stmts: vec![],
            tail: Some(Box::new(tail)),
            span: sp,
        };
        let iff = e(ExprKind::If {
            cond: Box::new(name("a")),
            then: block(name("b")),
            els: None,
        });
        let sum = e(ExprKind::Binary {
            op: BinOp::Add,
            lhs: Box::new(iff.clone()),
            rhs: Box::new(name("c")),
        });
        let index = e(ExprKind::Index {
            base: Box::new(sum.clone()),
            items: vec![IndexItem::Ellipsis],
        });
        let neg = e(ExprKind::Unary {
            op: UnOp::Neg,
            expr: Box::new(index.clone()),
        });
        let fn_body = Block {
            stmts: vec![Stmt {
                kind: StmtKind::Expr(iff.clone()),
                span: sp,
            }],
            tail: Some(Box::new(sum.clone())),
            span: sp,
        };
        let prog = Program {
            stmts: vec![
                Stmt {
                    kind: StmtKind::Expr(sum),
                    span: sp,
                },
                Stmt {
                    kind: StmtKind::Expr(index),
                    span: sp,
                },
                Stmt {
                    kind: StmtKind::Expr(neg),
                    span: sp,
                },
                Stmt {
                    kind: StmtKind::Expr(iff),
                    span: sp,
                },
                Stmt {
                    kind: StmtKind::Fn {
                        name: Ident {
                            name: "f".into(),
                            span: sp,
                        },
                        params: vec![],
                        body: fn_body,
                    },
                    span: sp,
                },
            ],
        };
        let text = assert_round_trip(&prog);
        assert!(
            text.starts_with("(if a { b } + c);\n(if a { b } + c)[...];\n-(if a { b } + c)[...];\n\nif a { b }\n"),
            "{text}"
        );
    }

    /// Every prefix of the model is parsed without a panic; those that parse round-trip.
    #[test]
    fn every_prefix_parses_or_fails_cleanly() {
        let mut ok = 0;
        for (i, _) in MODEL.char_indices().chain([(MODEL.len(), ' ')]) {
            let prefix = &MODEL[..i];
            match parse("t.rd", prefix) {
                Ok(prog) => {
                    ok += 1;
                    assert_round_trip(&prog);
                }
                Err(e) => {
                    let shown = e.to_string();
                    assert!(shown.starts_with("t.rd:"), "{shown}");
                    assert!(shown.lines().count() == 3, "{shown}");
                }
            }
        }
        assert!(ok > 20, "only {ok} prefixes parsed");
        // dropping any one line fails cleanly too
        let lines: Vec<&str> = MODEL.lines().collect();
        for i in 0..lines.len() {
            let mut rest = lines.clone();
            rest.remove(i);
            if let Ok(prog) = parse("t.rd", &rest.join("\n")) {
                assert_round_trip(&prog);
            }
        }
    }

    /// A tiny deterministic generator (no dependencies).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Random token soup: never a panic; what parses round-trips.
    #[test]
    fn random_token_sequences() {
        const VOCAB: [&str; 52] = [
            "let", "x", "y", "f", "axis", "_", "=", "0", "1", "2.5", "1e-3", "\"s{l}\"", "(", ")", "[", "]", "{", "}",
            ",", ";", ":", "..", "...", "+", "-", "*", "/", "//", "%", "**", "@", "==", "!=", "<", ">=", "&&", "||",
            "!", "if", "else", "scan", "in", "fn", "for", "output", "carry", "config", "int", "dim", "param", "state",
            "require",
        ];
        let mut rng = Rng(42);
        let mut ok = 0;
        for _ in 0..30_000 {
            let n = 1 + rng.below(24);
            let src: Vec<&str> = (0..n).map(|_| VOCAB[rng.below(VOCAB.len())]).collect();
            if let Ok(prog) = parse("t.rd", &src.join(" ")) {
                ok += 1;
                assert_round_trip(&prog);
            }
        }
        assert!(ok > 0);
    }

    fn gen_name(rng: &mut Rng) -> String {
        ["a", "b", "x", "y_1", "_", "axis", "bf16"][rng.below(7)].to_string()
    }

    fn gen_ident(rng: &mut Rng) -> Ident {
        Ident {
            name: gen_name(rng),
            span: Span::default(),
        }
    }

    fn gen_expr(rng: &mut Rng, depth: u32) -> Expr {
        let kind = if depth == 0 {
            match rng.below(5) {
                0 => ExprKind::Int(rng.below(1000) as i64),
                1 => ExprKind::Float([0.5, 1e-6, 1e300, 3.25, 0.0][rng.below(5)]),
                2 => ExprKind::Str(["", "a{l}", "q\"\\\n\t"][rng.below(3)].to_string()),
                3 => ExprKind::Bool(rng.below(2) == 0),
                _ => ExprKind::Name(gen_name(rng)),
            }
        } else {
            let d = depth - 1;
            let sub = |rng: &mut Rng| {
                let d = rng.below(depth as usize) as u32;
                Box::new(gen_expr(rng, d))
            };
            match rng.below(12) {
                0 => ExprKind::Unary {
                    op: [UnOp::Neg, UnOp::Not][rng.below(2)],
                    expr: sub(rng),
                },
                1..=3 => {
                    use BinOp::*;
                    let ops = [
                        Or, And, Eq, Ne, Lt, Le, Gt, Ge, Add, Sub, Mul, Div, FloorDiv, Mod, MatMul, Pow,
                    ];
                    ExprKind::Binary {
                        op: ops[rng.below(ops.len())],
                        lhs: sub(rng),
                        rhs: sub(rng),
                    }
                }
                4 => ExprKind::Call {
                    func: gen_ident(rng),
                    args: (0..rng.below(3))
                        .map(|_| Arg {
                            name: if rng.below(2) == 0 { Some(gen_ident(rng)) } else { None },
                            value: *sub(rng),
                        })
                        .collect(),
                },
                5 => ExprKind::Index {
                    base: sub(rng),
                    items: (0..1 + rng.below(3))
                        .map(|_| match rng.below(3) {
                            0 => IndexItem::Expr(*sub(rng)),
                            1 => IndexItem::Slice {
                                start: if rng.below(2) == 0 { Some(*sub(rng)) } else { None },
                                end: if rng.below(2) == 0 { Some(*sub(rng)) } else { None },
                            },
                            _ => IndexItem::Ellipsis,
                        })
                        .collect(),
                },
                6 => ExprKind::List((0..rng.below(3)).map(|_| *sub(rng)).collect()),
                7 => ExprKind::Tuple((0..rng.below(4)).map(|_| *sub(rng)).collect()),
                8 => {
                    let els = match rng.below(3) {
                        0 => None,
                        1 => Some(Box::new(Expr {
                            kind: ExprKind::Block(gen_block(rng, d)),
                            span: Span::default(),
                        })),
                        _ => Some(Box::new(Expr {
                            kind: ExprKind::If {
                                cond: sub(rng),
                                then: gen_block(rng, d),
                                els: None,
                            },
                            span: Span::default(),
                        })),
                    };
                    ExprKind::If {
                        cond: sub(rng),
                        then: gen_block(rng, d),
                        els,
                    }
                }
                9 => ExprKind::Block(gen_block(rng, d)),
                10 => ExprKind::Scan {
                    carries: (0..rng.below(3))
                        .map(|_| ScanBinding {
                            name: gen_ident(rng),
                            value: *sub(rng),
                        })
                        .collect(),
                    seqs: (0..1 + rng.below(2))
                        .map(|_| ScanBinding {
                            name: gen_ident(rng),
                            value: *sub(rng),
                        })
                        .collect(),
                    axis: if rng.below(2) == 0 { Some(sub(rng)) } else { None },
                    body: gen_block(rng, d),
                },
                _ => return gen_expr(rng, 0),
            }
        };
        Expr {
            kind,
            span: Span::default(),
        }
    }

    fn gen_pattern(rng: &mut Rng, depth: u32) -> Pattern {
        if depth == 0 || rng.below(2) == 0 {
            Pattern::Name(gen_ident(rng))
        } else {
            Pattern::Tuple(
                (0..1 + rng.below(3)).map(|_| gen_pattern(rng, depth - 1)).collect(),
                Span::default(),
            )
        }
    }

    fn gen_stmt(rng: &mut Rng, depth: u32) -> Stmt {
        let d = depth.saturating_sub(1);
        let kind = match rng.below(14) {
            0 => StmtKind::Config {
                name: gen_ident(rng),
                ty: Ident {
                    name: "float".into(),
                    span: Span::default(),
                },
                default: if rng.below(2) == 0 {
                    Some(gen_expr(rng, d))
                } else {
                    None
                },
            },
            1 => StmtKind::Require {
                cond: gen_expr(rng, d),
                message: gen_expr(rng, d),
            },
            2 => StmtKind::Dim {
                names: (0..1 + rng.below(3)).map(|_| gen_ident(rng)).collect(),
            },
            3 => StmtKind::Input {
                name: gen_ident(rng),
                ty: gen_expr(rng, d),
            },
            4 => StmtKind::State {
                name: gen_ident(rng),
                ty: gen_expr(rng, d),
                key: gen_expr(rng, d),
            },
            5 => StmtKind::Param {
                name: gen_ident(rng),
                ty: gen_expr(rng, d),
                key: gen_expr(rng, d),
                stack: if rng.below(2) == 0 {
                    Some(StackClause {
                        var: gen_ident(rng),
                        start: gen_expr(rng, d),
                        end: gen_expr(rng, d),
                    })
                } else {
                    None
                },
            },
            6 => StmtKind::Let {
                pat: gen_pattern(rng, 2),
                value: gen_expr(rng, d),
            },
            7 => StmtKind::Assign {
                name: gen_ident(rng),
                value: gen_expr(rng, d),
            },
            8 => StmtKind::Fn {
                name: gen_ident(rng),
                params: (0..rng.below(3))
                    .map(|_| FnParam {
                        name: gen_ident(rng),
                        default: if rng.below(2) == 0 {
                            Some(gen_expr(rng, d))
                        } else {
                            None
                        },
                    })
                    .collect(),
                body: gen_block(rng, d),
            },
            9 => StmtKind::For {
                var: gen_ident(rng),
                start: gen_expr(rng, d),
                end: gen_expr(rng, d),
                body: gen_block(rng, d),
            },
            10 => StmtKind::Output {
                name: gen_expr(rng, d),
                value: gen_expr(rng, d),
            },
            11 => StmtKind::Carry {
                name: gen_ident(rng),
                value: gen_expr(rng, d),
            },
            _ => StmtKind::Expr(gen_expr(rng, depth)),
        };
        Stmt {
            kind,
            span: Span::default(),
        }
    }

    fn gen_block(rng: &mut Rng, depth: u32) -> Block {
        let n = if depth == 0 { 0 } else { rng.below(3) };
        Block {
            stmts: (0..n).map(|_| gen_stmt(rng, depth)).collect(),
            tail: if rng.below(2) == 0 {
                Some(Box::new(gen_expr(rng, depth)))
            } else {
                None
            },
            span: Span::default(),
        }
    }

    /// Random well-formed ASTs print to text that parses back to them.
    #[test]
    fn random_asts_round_trip() {
        let mut rng = Rng(7);
        for _ in 0..3000 {
            let prog = Program {
                stmts: (0..1 + rng.below(4)).map(|_| gen_stmt(&mut rng, 4)).collect(),
            };
            assert_round_trip(&prog);
        }
    }
}

#[cfg(test)]
mod model_files {
    use super::*;
    use crate::dsl::parser::parse;

    /// The repository's model files (`models/*.ring`) parse, and print back to the same AST.
    #[test]
    fn model_files_round_trip() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "ring") {
                continue;
            }
            let src = std::fs::read_to_string(&path).unwrap();
            let name = path.display().to_string();
            let prog = parse(&name, &src).unwrap_or_else(|e| panic!("{e}"));
            let text = print(&prog);
            let back = parse("printed", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(strip_spans(&back), strip_spans(&prog), "{name}");
            assert_eq!(print(&back), text, "{name}");
        }
    }
}
