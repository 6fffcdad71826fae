//! Abstract syntax of the model DSL (docs/dsl.md has the grammar).
//!
//! Every node carries the [`Span`] of its first token so that the elaborator can report
//! `file:line:col` for errors found after parsing (a missing config key, a shape mismatch).

/// 1-based line and column of a token's first character.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    pub line: u32,
    pub col: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub stmts: Vec<Stmt>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StmtKind {
    /// `config NAME: TYPE [= DEFAULT];` — TYPE is `int`, `float`, `bool`, `str` or `any`
    /// (`any` accepts any JSON value, `null` included).
    Config {
        name: Ident,
        ty: Ident,
        default: Option<Expr>,
    },
    /// `require COND, MESSAGE;`
    Require { cond: Expr, message: Expr },
    /// `dim batch, seq;` — symbolic dimensions
    Dim { names: Vec<Ident> },
    /// `input NAME: TYPE;` — a runtime input; TYPE is an expression like `i64[batch, seq]`
    Input { name: Ident, ty: Expr },
    /// `state NAME: TYPE = KEY;` — an input carried from step to step under the runtime name KEY
    State { name: Ident, ty: Expr, key: Expr },
    /// `param NAME: TYPE = KEY [for VAR in START..END];` — a checkpoint tensor (a stacked
    /// family when `for` is given)
    Param {
        name: Ident,
        ty: Expr,
        key: Expr,
        stack: Option<StackClause>,
    },
    /// `let PATTERN = EXPR;`
    Let { pat: Pattern, value: Expr },
    /// `NAME = EXPR;` — rebinds an existing variable of an enclosing scope
    Assign { name: Ident, value: Expr },
    /// `fn NAME(PARAMS) BLOCK`
    Fn {
        name: Ident,
        params: Vec<FnParam>,
        body: Block,
    },
    /// `for VAR in START..END BLOCK` — unrolled at compile time
    For {
        var: Ident,
        start: Expr,
        end: Expr,
        body: Block,
    },
    /// `output NAME = EXPR;` — NAME is a (string) expression
    Output { name: Expr, value: Expr },
    /// `carry NAME = EXPR;` — the next step's value of the state NAME
    Carry { name: Ident, value: Expr },
    /// an expression used as a statement: `EXPR;` or a block-like expression (`if`) without `;`
    Expr(Expr),
}

#[derive(Clone, Debug, PartialEq)]
pub struct StackClause {
    pub var: Ident,
    pub start: Expr,
    pub end: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Pattern {
    /// a name; `_` discards
    Name(Ident),
    Tuple(Vec<Pattern>, Span),
}

#[derive(Clone, Debug, PartialEq)]
pub struct FnParam {
    pub name: Ident,
    pub default: Option<Expr>,
}

/// `{ stmt* [tail-expr] }` — the value of a block is its tail expression (none: unit).
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    pub tail: Option<Box<Expr>>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Mod,
    MatMul,
    Pow,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    /// `Some` for a keyword argument `name = value`
    pub name: Option<Ident>,
    pub value: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub enum IndexItem {
    Expr(Expr),
    /// `start:end`, either side optional
    Slice {
        start: Option<Expr>,
        end: Option<Expr>,
    },
    /// `...`
    Ellipsis,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScanBinding {
    pub name: Ident,
    pub value: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    Name(String),
    Unary {
        op: UnOp,
        expr: Box<Expr>,
    },
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    /// `f(a, b, axis = -1)`
    Call {
        func: Ident,
        args: Vec<Arg>,
    },
    /// `x[items]` — slicing a tensor, or a tensor type when `x` is a dtype (`bf16[D, V]`)
    Index {
        base: Box<Expr>,
        items: Vec<IndexItem>,
    },
    /// `[a, b, c]`
    List(Vec<Expr>),
    /// `(a, b)`; `(a,)` is a one-element tuple, `(a)` is just `a`, `()` the empty tuple
    Tuple(Vec<Expr>),
    /// `if COND BLOCK [else (BLOCK | if ...)]`; the else branch is an Expr of kind Block or If
    If {
        cond: Box<Expr>,
        then: Block,
        els: Option<Box<Expr>>,
    },
    Block(Block),
    /// `scan (c = init, ...; x in seq, ...; axis = A) BLOCK` — the block's value is a tuple:
    /// new carries, then per-step outputs. The carry list may be empty; `axis` is optional.
    Scan {
        carries: Vec<ScanBinding>,
        seqs: Vec<ScanBinding>,
        axis: Option<Box<Expr>>,
        body: Block,
    },
}
