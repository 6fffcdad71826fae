//! Recursive-descent parser of the model DSL (grammar in docs/dsl.md, "Syntax").
//!
//! [`parse`] turns source text into an [`ast::Program`]; every node's span is the position
//! of its first token. Errors — the lexer's included — are [`ParseError`]s that print as
//! `file:line:col: expected X, found Y` plus the source line and a caret.

use super::ast::{self, *};
use super::lexer::{lex, Tok, Token};
use std::fmt;

/// How deeply expressions, blocks and patterns may nest. Bounds the parser's recursion (and
/// that of everything walking the AST) so that no input can overflow the stack.
pub const MAX_DEPTH: usize = 128;

/// A syntax error: where it is, what the parser expected there and what it found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub file: String,
    pub line: u32,
    pub col: u32,
    /// what would have been accepted here: `` `;` ``, `an expression`, `` `,` or `)` ``
    pub expected: String,
    /// the token found instead: `` `let` ``, ``identifier `foo` ``, `end of file`, ...
    pub found: String,
    /// the source line the error is on (without its line break)
    pub source_line: String,
}

impl ParseError {
    /// An error at `span` of `src`; the source line is taken from `src`.
    pub fn new(file: &str, src: &str, span: Span, expected: impl Into<String>, found: impl Into<String>) -> ParseError {
        let source_line = src
            .lines()
            .nth((span.line as usize).saturating_sub(1))
            .unwrap_or("")
            .to_string();
        ParseError {
            file: file.to_string(),
            line: span.line,
            col: span.col,
            expected: expected.into(),
            found: found.into(),
            source_line,
        }
    }

    pub fn span(&self) -> Span {
        Span {
            line: self.line,
            col: self.col,
        }
    }
}

impl fmt::Display for ParseError {
    /// ```text
    /// model.rd:3:10: expected `;`, found `let`
    ///   3 | let x = 1
    ///     |          ^
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}:{}:{}: expected {}, found {}",
            self.file, self.line, self.col, self.expected, self.found
        )?;
        let num = self.line.to_string();
        writeln!(f, "  {num} | {}", self.source_line)?;
        // keep tabs so that the caret lines up with the source line in a terminal
        let before = (self.col as usize).saturating_sub(1);
        let mut pad: String = self
            .source_line
            .chars()
            .take(before)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let have = pad.chars().count();
        pad.extend(std::iter::repeat_n(' ', before.saturating_sub(have)));
        write!(f, "  {} | {pad}^", " ".repeat(num.len()))
    }
}

impl std::error::Error for ParseError {}

/// Inputs of at most this many tokens are parsed on the caller's thread: they cannot nest
/// deeper than this, which any stack holds.
const SMALL_INPUT_TOKENS: usize = 24;

/// Stack of the thread that parses longer inputs: enough for [`MAX_DEPTH`] levels of nesting
/// even unoptimised (about 4 MiB there; under 0.5 MiB at the workspace's opt-levels).
const PARSER_STACK_BYTES: usize = 16 << 20;

/// Parse the source text `src` of the file named `file` (used in errors only).
///
/// Inputs longer than a few tokens are parsed on a short-lived thread with a 16 MiB stack, so
/// that the deepest nesting the parser accepts cannot overflow the caller's stack (a test
/// thread has 2 MiB); if that thread cannot be started, the parse runs on the caller's thread.
pub fn parse(file: &str, src: &str) -> Result<ast::Program, ParseError> {
    let toks = lex(file, src)?;
    if toks.len() <= SMALL_INPUT_TOKENS {
        return parse_tokens(file, src, toks);
    }
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("ringjit-dsl-parse".to_string())
            .stack_size(PARSER_STACK_BYTES)
            .spawn_scoped(scope, || parse_tokens(file, src, toks));
        match spawned {
            Ok(handle) => handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            // the tokens went with the closure; lexing again is cheap
            Err(_) => parse_tokens(file, src, lex(file, src)?),
        }
    })
}

/// Parse the tokens of `src` (ending with [`Tok::Eof`]).
fn parse_tokens(file: &str, src: &str, mut toks: Vec<Token>) -> Result<ast::Program, ParseError> {
    let eof = match toks.pop() {
        Some(t) if t.kind == Tok::Eof => t,
        other => {
            // `lex` always ends with Eof; stay total anyway
            toks.extend(other);
            let end = toks.last().map_or(Span { line: 1, col: 1 }, |t| t.end);
            Token {
                kind: Tok::Eof,
                span: end,
                end,
            }
        }
    };
    let mut p = Parser {
        file,
        src,
        toks,
        eof,
        pos: 0,
        depth: 0,
    };
    p.program()
}

type R<T> = Result<T, ParseError>;

struct Parser<'a> {
    file: &'a str,
    src: &'a str,
    /// the tokens, without the final Eof
    toks: Vec<Token>,
    eof: Token,
    pos: usize,
    depth: usize,
}

/// What a statement position held: a statement, or the tail expression of a block.
enum Item {
    Stmt(Box<Stmt>),
    Tail(Expr),
}

/// Binary operators below `**`: the operator and its level (1 `||` ... 5 `*`).
fn binop(t: &Tok) -> Option<(BinOp, u8)> {
    Some(match t {
        Tok::OrOr => (BinOp::Or, 1),
        Tok::AndAnd => (BinOp::And, 2),
        Tok::EqEq => (BinOp::Eq, 3),
        Tok::Ne => (BinOp::Ne, 3),
        Tok::Lt => (BinOp::Lt, 3),
        Tok::Le => (BinOp::Le, 3),
        Tok::Gt => (BinOp::Gt, 3),
        Tok::Ge => (BinOp::Ge, 3),
        Tok::Plus => (BinOp::Add, 4),
        Tok::Minus => (BinOp::Sub, 4),
        Tok::Star => (BinOp::Mul, 5),
        Tok::Slash => (BinOp::Div, 5),
        Tok::SlashSlash => (BinOp::FloorDiv, 5),
        Tok::Percent => (BinOp::Mod, 5),
        Tok::At => (BinOp::MatMul, 5),
        _ => return None,
    })
}

const CMP_LEVEL: u8 = 3;

fn starts_expr(t: &Tok) -> bool {
    matches!(
        t,
        Tok::Int(_)
            | Tok::Float(_)
            | Tok::Str(_)
            | Tok::Ident(_)
            | Tok::True
            | Tok::False
            | Tok::LParen
            | Tok::LBracket
            | Tok::LBrace
            | Tok::If
            | Tok::Scan
            | Tok::Minus
            | Tok::Bang
    )
}

fn tick(t: &Tok) -> String {
    format!("`{}`", t.text().unwrap_or("?"))
}

impl Parser<'_> {
    // ---- token access --------------------------------------------------------------------

    fn peek_tok(&self, n: usize) -> &Token {
        self.toks.get(self.pos + n).unwrap_or(&self.eof)
    }

    fn peek(&self) -> &Tok {
        &self.peek_tok(0).kind
    }

    fn peek_at(&self, n: usize) -> &Tok {
        &self.peek_tok(n).kind
    }

    fn span(&self) -> Span {
        self.peek_tok(0).span
    }

    fn at(&self, t: &Tok) -> bool {
        self.peek() == t
    }

    fn advance(&mut self) -> Token {
        let t = self.peek_tok(0).clone();
        if self.pos < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.at(t) {
            self.advance();
            true
        } else {
            false
        }
    }

    /// An error at the current token: "expected `expected`, found <current token>".
    fn err(&self, expected: impl Into<String>) -> ParseError {
        ParseError::new(self.file, self.src, self.span(), expected, self.peek().describe())
    }

    fn expect(&mut self, t: &Tok) -> R<Token> {
        if self.at(t) {
            Ok(self.advance())
        } else {
            Err(self.err(tick(t)))
        }
    }

    /// Expect one of two tokens (`` `,` or `)` ``); returns whether it was the first.
    fn expect_either(&mut self, first: &Tok, second: &Tok) -> R<bool> {
        if self.eat(first) {
            Ok(true)
        } else if self.eat(second) {
            Ok(false)
        } else {
            Err(self.err(format!("{} or {}", tick(first), tick(second))))
        }
    }

    fn ident(&mut self, expected: &str) -> R<Ident> {
        match self.peek() {
            Tok::Ident(name) => {
                let ident = Ident {
                    name: name.clone(),
                    span: self.span(),
                };
                self.advance();
                Ok(ident)
            }
            _ => Err(self.err(expected)),
        }
    }

    fn at_ident_then(&self, t: &Tok) -> bool {
        matches!(self.peek(), Tok::Ident(_)) && self.peek_at(1) == t
    }

    /// Enter one level of nesting; fails past [`MAX_DEPTH`]. Pair with `self.depth -= 1`.
    fn enter(&mut self) -> R<()> {
        if self.depth >= MAX_DEPTH {
            return Err(self.err(format!("at most {MAX_DEPTH} levels of nesting")));
        }
        self.depth += 1;
        Ok(())
    }

    // ---- statements ----------------------------------------------------------------------

    fn program(&mut self) -> R<Program> {
        let mut stmts = Vec::new();
        while !self.at(&Tok::Eof) {
            match self.item(false)? {
                Item::Stmt(s) => stmts.push(*s),
                // `item(false)` never yields a tail; treat one as a missing `;` to stay total
                Item::Tail(_) => return Err(self.err("`;`")),
            }
        }
        Ok(Program { stmts })
    }

    /// One statement, or (in a block) the tail expression before `}`.
    fn item(&mut self, in_block: bool) -> R<Item> {
        let span = self.span();
        let stmt = |kind| Ok(Item::Stmt(Box::new(Stmt { kind, span })));
        match self.peek() {
            Tok::Config
            | Tok::Require
            | Tok::Dim
            | Tok::Input
            | Tok::State
            | Tok::Param
            | Tok::Let
            | Tok::Fn
            | Tok::For
            | Tok::Output
            | Tok::Carry => stmt(self.keyword_stmt()?),
            Tok::Ident(_) if self.peek_at(1) == &Tok::Assign => {
                let name = self.ident("a name")?;
                self.advance();
                let value = self.expr()?;
                self.expect(&Tok::Semi)?;
                stmt(StmtKind::Assign { name, value })
            }
            Tok::If | Tok::LBrace | Tok::Scan => {
                // A statement starting with a block-like expression ends with its `}`.
                let e = self.block_like()?;
                if self.eat(&Tok::Semi) {
                    stmt(StmtKind::Expr(e))
                } else if in_block && self.at(&Tok::RBrace) {
                    Ok(Item::Tail(e))
                } else {
                    stmt(StmtKind::Expr(e))
                }
            }
            t if starts_expr(t) => {
                let e = self.expr()?;
                if self.eat(&Tok::Semi) {
                    stmt(StmtKind::Expr(e))
                } else if in_block && self.at(&Tok::RBrace) {
                    Ok(Item::Tail(e))
                } else if in_block {
                    Err(self.err("`;` or `}`"))
                } else {
                    Err(self.err("`;`"))
                }
            }
            Tok::Eof if in_block => Err(self.err("`}`")),
            _ if in_block => Err(self.err("a statement or `}`")),
            _ => Err(self.err("a statement")),
        }
    }

    /// A statement that starts with a keyword (kept out of [`Parser::item`] so that the
    /// frames of nested blocks stay small).
    #[inline(never)]
    fn keyword_stmt(&mut self) -> R<StmtKind> {
        match self.peek() {
            Tok::Config => self.config(),
            Tok::Require => {
                self.advance();
                let cond = self.expr()?;
                self.expect(&Tok::Comma)?;
                let message = self.expr()?;
                self.expect(&Tok::Semi)?;
                Ok(StmtKind::Require { cond, message })
            }
            Tok::Dim => {
                self.advance();
                let mut names = vec![self.ident("a dimension name")?];
                while self.eat(&Tok::Comma) {
                    names.push(self.ident("a dimension name")?);
                }
                if !self.at(&Tok::Semi) {
                    return Err(self.err("`,` or `;`"));
                }
                self.advance();
                Ok(StmtKind::Dim { names })
            }
            Tok::Input => {
                self.advance();
                let name = self.ident("an input name")?;
                self.expect(&Tok::Colon)?;
                let ty = self.expr()?;
                self.expect(&Tok::Semi)?;
                Ok(StmtKind::Input { name, ty })
            }
            Tok::State => {
                self.advance();
                let name = self.ident("a state name")?;
                self.expect(&Tok::Colon)?;
                let ty = self.expr()?;
                self.expect(&Tok::Assign)?;
                let key = self.expr()?;
                self.expect(&Tok::Semi)?;
                Ok(StmtKind::State { name, ty, key })
            }
            Tok::Param => self.param(),
            Tok::Let => {
                self.advance();
                let pat = self.pattern()?;
                self.expect(&Tok::Assign)?;
                let value = self.expr()?;
                self.expect(&Tok::Semi)?;
                Ok(StmtKind::Let { pat, value })
            }
            Tok::Fn => self.function(),
            Tok::For => {
                self.advance();
                let var = self.ident("a loop variable")?;
                self.expect(&Tok::In)?;
                let (start, end) = self.range()?;
                let body = self.block()?;
                Ok(StmtKind::For { var, start, end, body })
            }
            Tok::Output => {
                self.advance();
                let name = self.expr()?;
                self.expect(&Tok::Assign)?;
                let value = self.expr()?;
                self.expect(&Tok::Semi)?;
                Ok(StmtKind::Output { name, value })
            }
            Tok::Carry => {
                self.advance();
                let name = self.ident("a state name")?;
                self.expect(&Tok::Assign)?;
                let value = self.expr()?;
                self.expect(&Tok::Semi)?;
                Ok(StmtKind::Carry { name, value })
            }
            _ => Err(self.err("a statement")),
        }
    }

    fn config(&mut self) -> R<StmtKind> {
        self.advance();
        let name = self.ident("a config name")?;
        self.expect(&Tok::Colon)?;
        const TYPES: [&str; 5] = ["int", "float", "bool", "str", "any"];
        let ty = match self.peek() {
            Tok::Ident(t) if TYPES.contains(&t.as_str()) => self.ident("a config type")?,
            _ => {
                return Err(self.err("a config type (`int`, `float`, `bool`, `str` or `any`)"));
            }
        };
        let default = if self.eat(&Tok::Assign) {
            Some(self.expr()?)
        } else {
            None
        };
        if !self.at(&Tok::Semi) {
            return Err(self.err(if default.is_some() { "`;`" } else { "`=` or `;`" }));
        }
        self.advance();
        Ok(StmtKind::Config { name, ty, default })
    }

    fn param(&mut self) -> R<StmtKind> {
        self.advance();
        let name = self.ident("a parameter name")?;
        self.expect(&Tok::Colon)?;
        let ty = self.expr()?;
        self.expect(&Tok::Assign)?;
        let key = self.expr()?;
        let stack = if self.eat(&Tok::For) {
            let var = self.ident("a loop variable")?;
            self.expect(&Tok::In)?;
            let (start, end) = self.range()?;
            Some(StackClause { var, start, end })
        } else {
            None
        };
        if !self.at(&Tok::Semi) {
            return Err(self.err(if stack.is_some() { "`;`" } else { "`for` or `;`" }));
        }
        self.advance();
        Ok(StmtKind::Param { name, ty, key, stack })
    }

    /// `START .. END`
    fn range(&mut self) -> R<(Expr, Expr)> {
        let start = self.expr()?;
        self.expect(&Tok::DotDot)?;
        let end = self.expr()?;
        Ok((start, end))
    }

    fn function(&mut self) -> R<StmtKind> {
        self.advance();
        let name = self.ident("a function name")?;
        self.expect(&Tok::LParen)?;
        let mut params = Vec::new();
        while !self.eat(&Tok::RParen) {
            let pname = self.ident("a parameter name or `)`")?;
            let default = if self.eat(&Tok::Assign) {
                Some(self.expr()?)
            } else {
                None
            };
            let has_default = default.is_some();
            params.push(FnParam { name: pname, default });
            if self.eat(&Tok::RParen) {
                break;
            }
            if !self.eat(&Tok::Comma) {
                return Err(self.err(if has_default { "`,` or `)`" } else { "`=`, `,` or `)`" }));
            }
        }
        let body = self.block()?;
        Ok(StmtKind::Fn { name, params, body })
    }

    fn pattern(&mut self) -> R<Pattern> {
        self.enter()?;
        let r = self.pattern_inner();
        self.depth -= 1;
        r
    }

    fn pattern_inner(&mut self) -> R<Pattern> {
        match self.peek() {
            Tok::Ident(_) => Ok(Pattern::Name(self.ident("a name")?)),
            Tok::LParen => {
                let span = self.advance().span;
                let first = self.pattern()?;
                if self.eat(&Tok::RParen) {
                    return Ok(first);
                }
                let mut items = vec![first];
                self.expect_either(&Tok::Comma, &Tok::RParen)?;
                while !self.eat(&Tok::RParen) {
                    items.push(self.pattern()?);
                    if !self.expect_either(&Tok::Comma, &Tok::RParen)? {
                        break;
                    }
                }
                Ok(Pattern::Tuple(items, span))
            }
            _ => Err(self.err("a pattern (a name or `(`)")),
        }
    }

    /// `{ STMT* [EXPR] }`
    fn block(&mut self) -> R<Block> {
        if !self.at(&Tok::LBrace) {
            return Err(self.err("`{`"));
        }
        self.enter()?;
        let r = self.block_inner();
        self.depth -= 1;
        r
    }

    fn block_inner(&mut self) -> R<Block> {
        let span = self.expect(&Tok::LBrace)?.span;
        let mut stmts = Vec::new();
        let mut tail = None;
        while !self.eat(&Tok::RBrace) {
            match self.item(true)? {
                Item::Stmt(s) => stmts.push(*s),
                Item::Tail(e) => {
                    tail = Some(Box::new(e));
                    self.expect(&Tok::RBrace)?;
                    break;
                }
            }
        }
        Ok(Block { stmts, tail, span })
    }

    // ---- expressions ---------------------------------------------------------------------

    fn expr(&mut self) -> R<Expr> {
        self.binary(1)
    }

    /// Precedence climbing over the levels of [`binop`]; comparisons do not chain.
    fn binary(&mut self, min_level: u8) -> R<Expr> {
        let span = self.span();
        let lhs = self.unary()?;
        let depth = self.depth;
        let r = self.binary_chain(lhs, span, min_level);
        self.depth = depth;
        r
    }

    /// The operators after `lhs`; each one of a chain `a + b + c` nests the tree one level
    /// deeper, which counts against [`MAX_DEPTH`].
    fn binary_chain(&mut self, mut lhs: Expr, span: Span, min_level: u8) -> R<Expr> {
        while let Some((op, level)) = binop(self.peek()).filter(|&(_, l)| l >= min_level) {
            self.enter()?;
            self.advance();
            let rhs = self.binary(level + 1)?;
            lhs = Expr {
                kind: ExprKind::Binary {
                    op,
                    lhs: Box::new(lhs),
                    rhs: Box::new(rhs),
                },
                span,
            };
            if level == CMP_LEVEL && binop(self.peek()).is_some_and(|(_, l)| l == CMP_LEVEL) {
                return Err(self.err("`&&` between comparisons (they do not chain)"));
            }
        }
        Ok(lhs)
    }

    /// Prefix `-` and `!`, then `**`.
    fn unary(&mut self) -> R<Expr> {
        self.enter()?;
        let r = self.unary_inner();
        self.depth -= 1;
        r
    }

    fn unary_inner(&mut self) -> R<Expr> {
        let span = self.span();
        let op = match self.peek() {
            Tok::Minus => Some(UnOp::Neg),
            Tok::Bang => Some(UnOp::Not),
            _ => None,
        };
        if let Some(op) = op {
            self.advance();
            let expr = self.unary()?;
            return Ok(Expr {
                kind: ExprKind::Unary {
                    op,
                    expr: Box::new(expr),
                },
                span,
            });
        }
        let base = self.postfix()?;
        if self.eat(&Tok::StarStar) {
            // right-associative, and the exponent may carry its own sign: `2 ** -1`
            let exp = self.unary()?;
            return Ok(Expr {
                kind: ExprKind::Binary {
                    op: BinOp::Pow,
                    lhs: Box::new(base),
                    rhs: Box::new(exp),
                },
                span,
            });
        }
        Ok(base)
    }

    /// A primary followed by any number of `[...]` indexings.
    fn postfix(&mut self) -> R<Expr> {
        let span = self.span();
        let e = self.primary()?;
        let depth = self.depth;
        let r = self.index_chain(e, span);
        self.depth = depth;
        r
    }

    /// The `[...]` indexings after `e`; each one nests the tree one level deeper.
    fn index_chain(&mut self, mut e: Expr, span: Span) -> R<Expr> {
        while self.at(&Tok::LBracket) {
            self.enter()?;
            self.advance();
            let mut items = Vec::new();
            loop {
                items.push(self.index_item()?);
                if !self.expect_either(&Tok::Comma, &Tok::RBracket)? {
                    break;
                }
            }
            e = Expr {
                kind: ExprKind::Index {
                    base: Box::new(e),
                    items,
                },
                span,
            };
        }
        Ok(e)
    }

    fn index_item(&mut self) -> R<IndexItem> {
        if self.eat(&Tok::Ellipsis) {
            return Ok(IndexItem::Ellipsis);
        }
        let start = if self.at(&Tok::Colon) {
            None
        } else if starts_expr(self.peek()) {
            Some(self.expr()?)
        } else {
            return Err(self.err("an index (an expression, a slice `a:b` or `...`)"));
        };
        if !self.eat(&Tok::Colon) {
            // `start` is Some here: a `:` would have been eaten
            return match start {
                Some(e) => Ok(IndexItem::Expr(e)),
                None => Err(self.err("`:`")),
            };
        }
        let end = if matches!(self.peek(), Tok::Comma | Tok::RBracket) {
            None
        } else {
            Some(self.expr()?)
        };
        Ok(IndexItem::Slice { start, end })
    }

    fn primary(&mut self) -> R<Expr> {
        let span = self.span();
        let kind = match self.peek().clone() {
            Tok::Int(v) => {
                self.advance();
                ExprKind::Int(v)
            }
            Tok::Float(v) => {
                self.advance();
                ExprKind::Float(v)
            }
            Tok::Str(s) => {
                self.advance();
                ExprKind::Str(s)
            }
            Tok::True => {
                self.advance();
                ExprKind::Bool(true)
            }
            Tok::False => {
                self.advance();
                ExprKind::Bool(false)
            }
            Tok::Ident(name) => {
                if self.peek_at(1) == &Tok::LParen {
                    return self.call();
                }
                self.advance();
                ExprKind::Name(name)
            }
            Tok::LParen => {
                self.advance();
                if self.eat(&Tok::RParen) {
                    ExprKind::Tuple(Vec::new())
                } else {
                    let first = self.expr()?;
                    if !self.expect_either(&Tok::Comma, &Tok::RParen)? {
                        return Ok(first);
                    }
                    let mut items = vec![first];
                    while !self.eat(&Tok::RParen) {
                        items.push(self.expr()?);
                        if !self.expect_either(&Tok::Comma, &Tok::RParen)? {
                            break;
                        }
                    }
                    ExprKind::Tuple(items)
                }
            }
            Tok::LBracket => {
                self.advance();
                let mut items = Vec::new();
                while !self.eat(&Tok::RBracket) {
                    items.push(self.expr()?);
                    if !self.expect_either(&Tok::Comma, &Tok::RBracket)? {
                        break;
                    }
                }
                ExprKind::List(items)
            }
            Tok::If | Tok::LBrace | Tok::Scan => return self.block_like(),
            _ => return Err(self.err("an expression")),
        };
        Ok(Expr { kind, span })
    }

    /// `NAME ( [ARG {, ARG} [,]] )` with ARG = EXPR | NAME = EXPR
    fn call(&mut self) -> R<Expr> {
        let span = self.span();
        let func = self.ident("a function name")?;
        self.expect(&Tok::LParen)?;
        let mut args = Vec::new();
        while !self.eat(&Tok::RParen) {
            let name = if self.at_ident_then(&Tok::Assign) {
                let name = self.ident("an argument name")?;
                self.advance();
                Some(name)
            } else {
                None
            };
            let value = self.expr()?;
            args.push(Arg { name, value });
            if !self.expect_either(&Tok::Comma, &Tok::RParen)? {
                break;
            }
        }
        Ok(Expr {
            kind: ExprKind::Call { func, args },
            span,
        })
    }

    /// `if ...`, `{ ... }` or `scan ...`: the expressions that end with a block.
    fn block_like(&mut self) -> R<Expr> {
        let span = self.span();
        let kind = match self.peek() {
            Tok::If => {
                self.advance();
                let cond = self.expr()?;
                let then = self.block()?;
                let els = if self.eat(&Tok::Else) {
                    match self.peek() {
                        Tok::LBrace => Some(Box::new(self.block_like()?)),
                        Tok::If => {
                            // `else if` chains nest
                            self.enter()?;
                            let els = self.block_like();
                            self.depth -= 1;
                            Some(Box::new(els?))
                        }
                        _ => return Err(self.err("`{` or `if`")),
                    }
                } else {
                    None
                };
                ExprKind::If {
                    cond: Box::new(cond),
                    then,
                    els,
                }
            }
            Tok::LBrace => ExprKind::Block(self.block()?),
            Tok::Scan => self.scan()?,
            _ => return Err(self.err("an expression")),
        };
        Ok(Expr { kind, span })
    }

    /// `scan ( [c = init {, c = init}] ; x in seq {, x in seq} [; axis = A] ) BLOCK`
    fn scan(&mut self) -> R<ExprKind> {
        self.advance();
        self.expect(&Tok::LParen)?;
        let mut carries = Vec::new();
        if !self.at(&Tok::Semi) {
            loop {
                if self.at_ident_then(&Tok::In) {
                    return Err(self.err("`;` before the scanned sequences"));
                }
                let name = self.ident("a carry name or `;`")?;
                self.expect(&Tok::Assign)?;
                let value = self.expr()?;
                carries.push(ScanBinding { name, value });
                if !self.at(&Tok::Comma) {
                    break;
                }
                self.advance();
            }
        }
        if !self.eat(&Tok::Semi) {
            return Err(self.err("`,` or `;`"));
        }
        let mut seqs = Vec::new();
        loop {
            let name = self.ident("a sequence name")?;
            self.expect(&Tok::In)?;
            let value = self.expr()?;
            seqs.push(ScanBinding { name, value });
            if !self.eat(&Tok::Comma) {
                break;
            }
        }
        let axis = if self.eat(&Tok::Semi) {
            match self.peek() {
                Tok::Ident(a) if a == "axis" => {
                    self.advance();
                }
                _ => return Err(self.err("`axis`")),
            }
            self.expect(&Tok::Assign)?;
            let axis = self.expr()?;
            self.expect(&Tok::RParen)?;
            Some(Box::new(axis))
        } else if self.eat(&Tok::RParen) {
            None
        } else {
            return Err(self.err("`,`, `;` or `)`"));
        };
        let body = self.block()?;
        Ok(ExprKind::Scan {
            carries,
            seqs,
            axis,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(src: &str) -> Program {
        match parse("t.rd", src) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    /// The error for `src` as (line, col, expected, found).
    fn perr(src: &str) -> (u32, u32, String, String) {
        match parse("t.rd", src) {
            Ok(p) => panic!("parsed: {p:?}"),
            Err(e) => {
                assert_eq!(e.file, "t.rd");
                (e.line, e.col, e.expected, e.found)
            }
        }
    }

    fn check_err(src: &str, line: u32, col: u32, expected: &str, found: &str) {
        assert_eq!(
            perr(src),
            (line, col, expected.to_string(), found.to_string()),
            "source: {src:?}"
        );
    }

    /// A compact S-expression of an expression, for precedence tests.
    fn sx(e: &Expr) -> String {
        match &e.kind {
            ExprKind::Int(v) => v.to_string(),
            ExprKind::Float(v) => format!("{v:?}"),
            ExprKind::Str(s) => format!("{s:?}"),
            ExprKind::Bool(b) => b.to_string(),
            ExprKind::Name(n) => n.clone(),
            ExprKind::Unary { op, expr } => {
                format!("({} {})", if *op == UnOp::Neg { "neg" } else { "not" }, sx(expr))
            }
            ExprKind::Binary { op, lhs, rhs } => format!("({op:?} {} {})", sx(lhs), sx(rhs)),
            ExprKind::Call { func, args } => {
                let args: Vec<String> = args
                    .iter()
                    .map(|a| match &a.name {
                        Some(n) => format!("{}={}", n.name, sx(&a.value)),
                        None => sx(&a.value),
                    })
                    .collect();
                format!("(call {} {})", func.name, args.join(" "))
            }
            ExprKind::Index { base, items } => {
                let items: Vec<String> = items
                    .iter()
                    .map(|it| match it {
                        IndexItem::Expr(x) => sx(x),
                        IndexItem::Slice { start, end } => format!(
                            "{}:{}",
                            start.as_ref().map_or(String::new(), sx),
                            end.as_ref().map_or(String::new(), sx)
                        ),
                        IndexItem::Ellipsis => "...".into(),
                    })
                    .collect();
                format!("(index {} {})", sx(base), items.join(" "))
            }
            ExprKind::List(items) => {
                format!("[{}]", items.iter().map(sx).collect::<Vec<_>>().join(" "))
            }
            ExprKind::Tuple(items) => format!("(tuple {})", items.iter().map(sx).collect::<Vec<_>>().join(" ")),
            ExprKind::If { cond, els, .. } => {
                format!(
                    "(if {}{})",
                    sx(cond),
                    els.as_ref().map_or(String::new(), |e| format!(" else {}", sx(e)))
                )
            }
            ExprKind::Block(b) => format!(
                "(block {} {})",
                b.stmts.len(),
                b.tail.as_ref().map_or("-".into(), |t| sx(t))
            ),
            ExprKind::Scan {
                carries, seqs, axis, ..
            } => format!(
                "(scan {} {} {})",
                carries.len(),
                seqs.len(),
                axis.as_ref().map_or("-".into(), |a| sx(a))
            ),
        }
    }

    /// The expression of `let _ = SRC;`, as an S-expression.
    fn ex(src: &str) -> String {
        let prog = p(&format!("let _ = {src};"));
        match &prog.stmts[0].kind {
            StmtKind::Let { value, .. } => sx(value),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(ex("-x**2"), "(neg (Pow x 2))");
        assert_eq!(ex("a - b - c"), "(Sub (Sub a b) c)");
        assert_eq!(ex("2**3**2"), "(Pow 2 (Pow 3 2))");
        assert_eq!(ex("a @ b * c"), "(Mul (MatMul a b) c)");
        assert_eq!(ex("a * b @ c"), "(MatMul (Mul a b) c)");
        assert_eq!(ex("2**-1"), "(Pow 2 (neg 1))");
        assert_eq!(ex("2**-x**2"), "(Pow 2 (neg (Pow x 2)))");
        assert_eq!(ex("(-x)**2"), "(Pow (neg x) 2)");
        assert_eq!(ex("a + b * c"), "(Add a (Mul b c))");
        assert_eq!(ex("a // b % c / d"), "(Div (Mod (FloorDiv a b) c) d)");
        assert_eq!(
            ex("a || b && c == d + e * -f"),
            "(Or a (And b (Eq c (Add d (Mul e (neg f))))))"
        );
        assert_eq!(ex("a || b || c"), "(Or (Or a b) c)");
        assert_eq!(ex("a && b || c && d"), "(Or (And a b) (And c d))");
        assert_eq!(ex("!a == b"), "(Eq (not a) b)");
        assert_eq!(ex("--x"), "(neg (neg x))");
        assert_eq!(ex("-a[0]**2"), "(neg (Pow (index a 0) 2))");
        assert_eq!(ex("(a < b) == c"), "(Eq (Lt a b) c)");
        assert_eq!(ex("a <= b + 1 && c != d"), "(And (Le a (Add b 1)) (Ne c d))");
        assert_eq!(ex("f(x)[0][1:]"), "(index (index (call f x) 0) 1:)");
        assert_eq!(ex("(a + b)[0]"), "(index (Add a b) 0)");
    }

    #[test]
    fn primaries() {
        assert_eq!(ex("()"), "(tuple )");
        assert_eq!(ex("(a)"), "a");
        assert_eq!(ex("(a,)"), "(tuple a)");
        assert_eq!(ex("(a, b,)"), "(tuple a b)");
        assert_eq!(ex("[]"), "[]");
        assert_eq!(ex("[1, 2.5, \"s\", true, false,]"), "[1 2.5 \"s\" true false]");
        assert_eq!(ex("f()"), "(call f )");
        assert_eq!(
            ex("f(a, axis = -1, keepdim = true,)"),
            "(call f a axis=(neg 1) keepdim=true)"
        );
        assert_eq!(ex("f(a == b)"), "(call f (Eq a b))");
        assert_eq!(ex("x[..., 0:r/2]"), "(index x ... 0:(Div r 2))");
        assert_eq!(ex("x[:, :2, 1:, :]"), "(index x : :2 1: :)");
        assert_eq!(ex("bf16[D, V]"), "(index bf16 D V)");
        assert_eq!(
            ex("if a { b } else if c { d } else { e }"),
            "(if a else (if c else (block 0 e)))"
        );
        assert_eq!(ex("if f(x) > 0 { 1 }"), "(if (Gt (call f x) 0))");
        assert_eq!(ex("if { a } { b } else { c }"), "(if (block 0 a) else (block 0 c))");
        assert_eq!(ex("{ let y = 1; y }"), "(block 1 y)");
        assert_eq!(ex("{}"), "(block 0 -)");
        assert_eq!(ex("scan (; x in xs) { x }"), "(scan 0 1 -)");
        assert_eq!(
            ex("scan (h = 0, c = 1; x in xs, m in ms; axis = 1) { (h, c, x) }"),
            "(scan 2 2 1)"
        );
        assert_eq!(ex("if c { a } else { b } + 1"), "(Add (if c else (block 0 b)) 1)");
        assert_eq!(ex("scan (; x in xs) { x }[0]"), "(index (scan 0 1 -) 0)");
        assert_eq!(ex("1_000 + 1e-6"), "(Add 1000 1e-6)");
    }

    #[test]
    fn statements() {
        let prog = p("x = 1; x == 1; f(y);");
        assert!(matches!(prog.stmts[0].kind, StmtKind::Assign { .. }));
        assert!(matches!(prog.stmts[1].kind, StmtKind::Expr(_)));
        assert!(matches!(prog.stmts[2].kind, StmtKind::Expr(_)));

        // block-like expressions: a statement in the middle, the tail at the end
        let prog = p("fn f() { if a { b } -x }");
        let StmtKind::Fn { body, .. } = &prog.stmts[0].kind else {
            panic!()
        };
        assert_eq!(body.stmts.len(), 1);
        assert_eq!(sx(body.tail.as_ref().unwrap()), "(neg x)");
        let prog = p("fn f() { if a { b } else { c } }");
        let StmtKind::Fn { body, .. } = &prog.stmts[0].kind else {
            panic!()
        };
        assert!(body.stmts.is_empty());
        assert_eq!(sx(body.tail.as_ref().unwrap()), "(if a else (block 0 c))");
        let prog = p("fn f() { if a { b }; }");
        let StmtKind::Fn { body, .. } = &prog.stmts[0].kind else {
            panic!()
        };
        assert_eq!((body.stmts.len(), body.tail.is_none()), (1, true));
        let prog = p("fn f() { { a } [b, c] }");
        let StmtKind::Fn { body, .. } = &prog.stmts[0].kind else {
            panic!()
        };
        assert_eq!(sx(body.tail.as_ref().unwrap()), "[b c]");
        let prog = p("if a { b } x; scan (; x in xs) { x } { y }");
        assert_eq!(prog.stmts.len(), 4);

        let prog = p("let (a, (b, c),) = t; let (d) = u; let (e,) = v;");
        let pats: Vec<&Pattern> = prog
            .stmts
            .iter()
            .map(|s| match &s.kind {
                StmtKind::Let { pat, .. } => pat,
                _ => panic!(),
            })
            .collect();
        assert!(
            matches!(pats[0], Pattern::Tuple(v, _) if v.len() == 2 && matches!(&v[1], Pattern::Tuple(w, _) if w.len() == 2))
        );
        assert!(matches!(pats[1], Pattern::Name(n) if n.name == "d"));
        assert!(matches!(pats[2], Pattern::Tuple(v, _) if v.len() == 1));

        let prog = p("param w: bf16[L, D] = \"l.{l}.w\" for l in 0..L; config eps: float = 1e-6; config n: int;");
        let StmtKind::Param { stack: Some(st), .. } = &prog.stmts[0].kind else {
            panic!()
        };
        assert_eq!(
            (st.var.name.as_str(), sx(&st.start), sx(&st.end)),
            ("l", "0".into(), "L".into())
        );
        assert!(matches!(&prog.stmts[1].kind, StmtKind::Config { default: Some(_), .. }));
        assert!(matches!(&prog.stmts[2].kind, StmtKind::Config { default: None, .. }));
        let prog = p("fn f(a, b = 2,) { a } fn g() {}");
        let StmtKind::Fn { params, .. } = &prog.stmts[0].kind else {
            panic!()
        };
        assert_eq!(params.len(), 2);
        assert!(params[1].default.is_some());
        assert!(p("").stmts.is_empty());
        assert!(p("# only a comment\n\n").stmts.is_empty());
    }

    #[test]
    fn spans_are_first_tokens() {
        let prog = p("\n  let y = (a + b) * c;\n");
        let s = &prog.stmts[0];
        assert_eq!(s.span, Span { line: 2, col: 3 });
        let StmtKind::Let {
            pat: Pattern::Name(n),
            value,
        } = &s.kind
        else {
            panic!()
        };
        assert_eq!(n.span, Span { line: 2, col: 7 });
        assert_eq!(value.span, Span { line: 2, col: 11 });
        let ExprKind::Binary { lhs, rhs, .. } = &value.kind else {
            panic!()
        };
        assert_eq!(lhs.span, Span { line: 2, col: 12 });
        assert_eq!(rhs.span, Span { line: 2, col: 21 });
        // `y[i] = 1;` is an expression followed by `=`: not an assignment
        assert!(parse("t.rd", "y[i] = 1;").is_err());
        let prog = p("for i in 0..n {\n    y = x[i];\n}");
        let StmtKind::For { body, var, .. } = &prog.stmts[0].kind else {
            panic!()
        };
        assert_eq!(var.span, Span { line: 1, col: 5 });
        assert_eq!(body.span, Span { line: 1, col: 15 });
        assert_eq!(body.stmts[0].span, Span { line: 2, col: 5 });
        let StmtKind::Assign { value, .. } = &body.stmts[0].kind else {
            panic!()
        };
        assert_eq!(value.span, Span { line: 2, col: 9 });
    }

    #[test]
    fn malformed_inputs() {
        // missing `;`
        check_err("let x = 1\nlet y = 2;", 2, 1, "`;`", "`let`");
        check_err("let x = 1", 1, 10, "`;`", "end of file");
        // unterminated string
        check_err("output \"logits = x;\n", 1, 8, "a closing `\"`", "unterminated string");
        // unknown character
        check_err("let x = a $ b;", 1, 11, "a token", "`$`");
        check_err("let x = é;", 1, 9, "a token", "`é`");
        // missing `)`
        check_err("let y = f(a, b;", 1, 15, "`,` or `)`", "`;`");
        check_err("let y = (a + b;", 1, 15, "`,` or `)`", "`;`");
        // `let` without pattern
        check_err("let = 3;", 1, 5, "a pattern (a name or `(`)", "`=`");
        // `for` without `..`
        check_err("for l in n_layers {\n}", 1, 19, "`..`", "`{`");
        // chained comparison
        check_err(
            "require a < b < c, \"x\";",
            1,
            15,
            "`&&` between comparisons (they do not chain)",
            "`<`",
        );
        check_err(
            "let t = a == b != c;",
            1,
            16,
            "`&&` between comparisons (they do not chain)",
            "`!=`",
        );
        // bad numbers
        check_err("let eps = 1e;", 1, 11, "a number", "malformed number `1e`");
        check_err("let n = 12ab;", 1, 9, "a number", "malformed number `12ab`");
        // `param` without `=`
        check_err("param w: bf16[D, V];", 1, 20, "`=`", "`;`");
        check_err(
            "param w: bf16[D] = \"w\" l in 0..3;",
            1,
            24,
            "`for` or `;`",
            "identifier `l`",
        );
        // `config` without type
        check_err("config n_layers;", 1, 16, "`:`", "`;`");
        check_err(
            "config n: = 3;",
            1,
            11,
            "a config type (`int`, `float`, `bool`, `str` or `any`)",
            "`=`",
        );
        check_err(
            "config n: integer;",
            1,
            11,
            "a config type (`int`, `float`, `bool`, `str` or `any`)",
            "identifier `integer`",
        );
        check_err("config n: int 3;", 1, 15, "`=` or `;`", "integer 3");
        // unclosed block at end of file
        check_err("fn f(x) {\n    let y = x;\n", 2, 15, "`}`", "end of file");
        check_err("if a {", 1, 7, "`}`", "end of file");
        // a keyword used as a name
        check_err("let in = 3;", 1, 5, "a pattern (a name or `(`)", "`in`");
        check_err("dim batch, for;", 1, 12, "a dimension name", "`for`");
        check_err("fn scan(x) {}", 1, 4, "a function name", "`scan`");
        check_err("let x = f(dim = 1);", 1, 11, "an expression", "`dim`");
        // scan without the `;` between carries and sequences
        check_err(
            "let y = scan (h = h0, x in xs) { h };",
            1,
            23,
            "`;` before the scanned sequences",
            "identifier `x`",
        );
        check_err(
            "let y = scan (x in xs) { x };",
            1,
            15,
            "`;` before the scanned sequences",
            "identifier `x`",
        );
        check_err(
            "let y = scan (h = h0 x in xs) { h };",
            1,
            22,
            "`,` or `;`",
            "identifier `x`",
        );
        check_err("let y = scan (; x in xs; dim = 1) { x };", 1, 26, "`axis`", "`dim`");
        check_err(
            "let y = scan (; x in xs x) { x };",
            1,
            25,
            "`,`, `;` or `)`",
            "identifier `x`",
        );
        // `fn` with a bad parameter list
        check_err("fn f(a, 1) {}", 1, 9, "a parameter name or `)`", "integer 1");
        check_err("fn f(a b) {}", 1, 8, "`=`, `,` or `)`", "identifier `b`");
        check_err("fn f(a = 1 b) {}", 1, 12, "`,` or `)`", "identifier `b`");
        check_err("fn f(a,, b) {}", 1, 8, "a parameter name or `)`", "`,`");
        check_err("fn f a {}", 1, 6, "`(`", "identifier `a`");
        // others
        check_err("let x = ;", 1, 9, "an expression", "`;`");
        check_err("fn f() { a b }", 1, 12, "`;` or `}`", "identifier `b`");
        check_err("a b", 1, 3, "`;`", "identifier `b`");
        check_err("}", 1, 1, "a statement", "`}`");
        check_err("fn f() { ) }", 1, 10, "a statement or `}`", "`)`");
        check_err("if a {} else b", 1, 14, "`{` or `if`", "identifier `b`");
        check_err("for i in 0..3 x", 1, 15, "`{`", "identifier `x`");
        check_err(
            "let y = x[];",
            1,
            11,
            "an index (an expression, a slice `a:b` or `...`)",
            "`]`",
        );
        check_err("let y = x[0;", 1, 12, "`,` or `]`", "`;`");
        check_err("let y = [1, 2;", 1, 14, "`,` or `]`", "`;`");
        check_err("output \"y\" x;", 1, 12, "`=`", "identifier `x`");
        check_err("carry \"s\" = x;", 1, 7, "a state name", "string \"s\"");
        check_err("require x \"msg\";", 1, 11, "`,`", "string \"msg\"");
        check_err("dim a b;", 1, 7, "`,` or `;`", "identifier `b`");
        check_err("input x i64[B];", 1, 9, "`:`", "identifier `i64`");
        check_err("state s: f32[B] \"k\";", 1, 17, "`=`", "string \"k\"");
        check_err("let x = 1.5 2;", 1, 13, "`;`", "integer 2");
        check_err("let (a b) = t;", 1, 8, "`,` or `)`", "identifier `b`");
        check_err("else { }", 1, 1, "a statement", "`else`");
        check_err("let x = 1 2.5;", 1, 11, "`;`", "float 2.5");
    }

    #[test]
    fn display_has_the_source_line_and_a_caret() {
        let e = parse("model.rd", "let x = 1\nlet y = 2;").unwrap_err();
        assert_eq!(
            e.to_string(),
            "model.rd:2:1: expected `;`, found `let`\n  2 | let y = 2;\n    | ^"
        );
        let src = "\n\n\n\n\n\n\n\n\n\nfn f(x) {\n    let y = (x + 1;\n}\n";
        let e = parse("m.rd", src).unwrap_err();
        assert_eq!(
            e.to_string(),
            "m.rd:12:19: expected `,` or `)`, found `;`\n  12 |     let y = (x + 1;\n     |                   ^"
        );
        let e = parse("m.rd", "\tlet x = $;").unwrap_err();
        assert_eq!(
            e.to_string(),
            "m.rd:1:10: expected a token, found `$`\n  1 | \tlet x = $;\n    | \t        ^"
        );
        let e = parse("m.rd", "let x = 1 # no semicolon\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "m.rd:1:10: expected `;`, found end of file\n  1 | let x = 1 # no semicolon\n    |          ^"
        );
        let e: Box<dyn std::error::Error> = Box::new(e);
        assert!(e.to_string().starts_with("m.rd:1:10: "));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |open: &str, mid: &str, close: &str, n: usize| {
            format!("let x = {}{}{};", open.repeat(n), mid, close.repeat(n))
        };
        // fine below the limit
        p(&deep("(", "1", ")", MAX_DEPTH / 2));
        p(&deep("[", "1", "]", MAX_DEPTH / 2));
        p(&deep("{", "1", "}", MAX_DEPTH / 2));
        p(&format!("let x = {};", vec!["a"; MAX_DEPTH / 2].join(" + ")));
        // an error, not a stack overflow, far above it
        let n = 100_000;
        for src in [
            deep("(", "1", ")", n),
            deep("[", "1", "]", n),
            deep("{", "1", "}", n),
            deep("-", "1", "", n),
            deep("!", "1", "", n),
            deep("", "1", "**1", n),
            deep("f(", "1", ")", n),
            deep("if a {} else ", "{}", "", n),
            deep("", "x", "[0]", n),
            deep("{ let y = ", "1", "; }", n),
            format!("let x = {};", vec!["a"; n].join(" + ")),
            format!("let {} = t;", "(".repeat(n)),
            format!("fn f() {}", "{".repeat(n)),
        ] {
            let e = parse("t.rd", &src).unwrap_err();
            assert_eq!(
                e.expected,
                format!("at most {MAX_DEPTH} levels of nesting"),
                "{}",
                &src[..40]
            );
        }
    }
}

#[cfg(test)]
mod doc_examples {
    use super::*;

    fn fenced_blocks(md: &str) -> Vec<String> {
        let mut blocks = Vec::new();
        let mut cur: Option<(String, String)> = None;
        for line in md.lines() {
            let body = line.trim_start();
            if body.starts_with("```") {
                match cur.take() {
                    Some((_, b)) => blocks.push(b),
                    None => cur = Some((line[..line.len() - body.len()].to_string(), String::new())),
                }
            } else if let Some((indent, b)) = &mut cur {
                b.push_str(line.strip_prefix(indent.as_str()).unwrap_or(line));
                b.push('\n');
            }
        }
        blocks
    }

    /// docs/dsl.md's opening example parses and its error example is what the parser says.
    #[test]
    fn docs_examples_hold() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dsl.md");
        let Ok(md) = std::fs::read_to_string(path) else { return };
        let blocks = fenced_blocks(&md);
        parse("docs", &blocks[0]).unwrap_or_else(|e| panic!("{e}"));
        let shown = blocks
            .iter()
            .find(|b| b.starts_with("model.ring:12:5:"))
            .expect("the error example");
        let src = format!("{}let x = 1\n    let y = x * 2;\n", "\n".repeat(10));
        assert_eq!(format!("{}\n", parse("model.ring", &src).unwrap_err()), *shown);
    }
}
