//! Pretty-printer of the model DSL: [`print`] writes a program as canonical source (4-space
//! indentation, parentheses only where precedence needs them) that parses back to the same
//! AST up to spans; [`strip_spans`] makes that comparable.

use super::ast::*;
use super::lexer::quote;

const INDENT: &str = "    ";

/// Blocks whose only content is a tail expression of at most this many characters print on
/// one line: `{ x * x }`.
const INLINE_BLOCK_WIDTH: usize = 60;

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
    if b.stmts.is_empty() {
        match &b.tail {
            None => return "{}".to_string(),
            Some(t) => {
                let s = stmt_expr(t, indent);
                if !s.contains('\n') && s.chars().count() <= INLINE_BLOCK_WIDTH {
                    return format!("{{ {s} }}");
                }
            }
        }
    }
    let inner = INDENT.repeat(indent + 1);
    let mut out = "{\n".to_string();
    let n = b.stmts.len();
    for (i, s) in b.stmts.iter().enumerate() {
        out.push_str(&inner);
        out.push_str(&stmt(s, indent + 1, i + 1 == n && b.tail.is_none()));
        out.push('\n');
    }
    if let Some(t) = &b.tail {
        out.push_str(&inner);
        out.push_str(&stmt_expr(t, indent + 1));
        out.push('\n');
    }
    out.push_str(&INDENT.repeat(indent));
    out.push('}');
    out
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
                    IndexItem::Slice { start, end } => format!(
                        "{}:{}",
                        start.as_ref().map_or(String::new(), |x| expr(x, indent)),
                        end.as_ref().map_or(String::new(), |x| expr(x, indent)),
                    ),
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
        ExprKind::If { cond, then, els } => {
            let mut out = format!("if {} {}", expr(cond, indent), block(then, indent));
            if let Some(els) = els {
                out.push_str(" else ");
                match &els.kind {
                    ExprKind::If { .. } => out.push_str(&expr(els, indent)),
                    ExprKind::Block(b) => out.push_str(&block(b, indent)),
                    // not made by the parser: wrap the value in a block
                    _ => {
                        let b = Block {
                            stmts: Vec::new(),
                            tail: Some(els.clone()),
                            span: els.span,
                        };
                        out.push_str(&block(&b, indent));
                    }
                }
            }
            out
        }
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
