//! The scalar-expression emitter: one [`ExprGraph`] node at a time, with the semantics of
//! `ir::kernel_eval` (every float result rounded to its node's dtype). Shared by loop kernels
//! and by the prologue / epilogue fusions of templates.

use super::emit::{err, is_f, provably_in, Ck, Em, Val, R};
use inkwell::values::IntValue;
use inkwell::{FloatPredicate, IntPredicate};
use ir::kernel::{ExprGraph, ExprId, IndexExpr, IndexVar, ScalarOp};
use ir::op::{BinaryOp, UnaryOp};
use ir::{DType, Dim};
use std::collections::HashMap;

/// What the expressions of one evaluation point see.
#[derive(Default)]
pub(crate) struct Scope<'c> {
    /// Loop variable values (domain axes, then reduction variables).
    pub vars: HashMap<u32, IntValue<'c>>,
    /// Loop variable extents (for proving loads in range).
    pub extents: HashMap<u32, Dim>,
    /// Values already computed at this point (reductions precomputed per row included).
    pub memo: HashMap<ExprId, Val<'c>>,
    /// The template's result at this point, in the Result node's dtype (epilogues).
    pub result: Option<Val<'c>>,
}

impl<'c> Scope<'c> {
    pub fn with_vars(vars: &[IntValue<'c>], extents: &[Dim]) -> Scope<'c> {
        Scope {
            vars: vars.iter().enumerate().map(|(i, v)| (i as u32, *v)).collect(),
            extents: extents.iter().enumerate().map(|(i, d)| (i as u32, d.clone())).collect(),
            ..Default::default()
        }
    }
}

impl<'c> Em<'c, '_> {
    pub(crate) fn index(&self, g: &ExprGraph, sc: &mut Scope<'c>, i: &IndexExpr) -> R<IntValue<'c>> {
        let mut v = self.dim(&i.offset)?;
        for (var, c) in &i.terms {
            let x = match var {
                IndexVar::Loop(l) => *sc
                    .vars
                    .get(l)
                    .ok_or_else(|| super::CodegenError(format!("loop variable i{l} is not bound here")))?,
                IndexVar::Data(e) => {
                    let d = self.expr(g, sc, *e)?;
                    self.as_i(d)?
                }
            };
            let term = if *c == Dim::constant(1) {
                x
            } else {
                self.mul(x, self.dim(c)?)?
            };
            v = self.add(v, term)?;
        }
        Ok(v)
    }

    /// The value of node `e` (in its dtype's register kind).
    pub(crate) fn expr(&self, g: &ExprGraph, sc: &mut Scope<'c>, e: ExprId) -> R<Val<'c>> {
        if let Some(v) = sc.memo.get(&e) {
            return Ok(*v);
        }
        let node = g
            .get(e)
            .ok_or_else(|| super::CodegenError(format!("expression {e} does not exist")))?;
        let dt = node.dtype;
        let dtype_of = |a: ExprId| g.get(a).map(|n| n.dtype).unwrap_or(DType::F32);
        let v = match &node.op {
            ScalarOp::Load { input, index } => {
                let r = self
                    .kernel
                    .inputs
                    .get(*input)
                    .ok_or_else(|| super::CodegenError(format!("load of missing input {input}")))?;
                let buf = self
                    .plan
                    .buffer(r.buffer)
                    .ok_or_else(|| super::CodegenError(format!("missing buffer {}", r.buffer)))?;
                if index.len() != r.view.rank() {
                    return err(format!(
                        "load of in{input} with {} indices for a rank-{} view",
                        index.len(),
                        r.view.rank()
                    ));
                }
                let mut idx = Vec::with_capacity(index.len());
                let mut check = Vec::with_capacity(index.len());
                for (d, i) in index.iter().enumerate() {
                    idx.push(self.index(g, sc, i)?);
                    check.push(!provably_in(i, &r.view.shape[d], &sc.extents));
                }
                let v = self.load_view(self.inputs[*input], &r.view, &idx, &check, buf.dtype)?;
                self.convert(v, buf.dtype, dt)?
            }
            ScalarOp::Result { .. } => sc
                .result
                .ok_or_else(|| super::CodegenError("a result read outside an epilogue".into()))?,
            ScalarOp::Const(c) => {
                if is_f(dt) {
                    Val::F(self.round(self.f32c(c.get()), dt)?)
                } else if dt == DType::Bool {
                    Val::I(self.i64c(i64::from(c.get() != 0.0)))
                } else {
                    Val::I(self.int_wrap(self.i64c(c.get() as i64), dt)?)
                }
            }
            ScalarOp::Index(i) => {
                let x = self.index(g, sc, i)?;
                self.convert(Val::I(x), DType::I64, dt)?
            }
            ScalarOp::Unary(u, a) => {
                let x = self.expr(g, sc, *a)?;
                self.unary(*u, x, dtype_of(*a), dt)?
            }
            ScalarOp::Binary(op, a, b) => {
                let (x, y) = (self.expr(g, sc, *a)?, self.expr(g, sc, *b)?);
                self.binary(*op, x, y, dtype_of(*a), dt)?
            }
            ScalarOp::Where(c, a, b) => {
                let cv = self.expr(g, sc, *c)?;
                let (x, y) = (self.expr(g, sc, *a)?, self.expr(g, sc, *b)?);
                let x = self.convert(x, dtype_of(*a), dt)?;
                let y = self.convert(y, dtype_of(*b), dt)?;
                let c = match cv {
                    Val::I(i) => self.icmp(IntPredicate::NE, i, self.i64c(0))?,
                    Val::F(f) => self.fcmp(FloatPredicate::UNE, f, self.f32c(0.0))?,
                };
                match (x, y) {
                    (Val::F(x), Val::F(y)) => Val::F(self.select_f(c, x, y)?),
                    (Val::I(x), Val::I(y)) => Val::I(self.select_i(c, x, y)?),
                    _ => return err("where of mixed kinds"),
                }
            }
            ScalarOp::Cast(a) => {
                let x = self.expr(g, sc, *a)?;
                self.convert(x, dtype_of(*a), dt)?
            }
            ScalarOp::Reduce { .. } => {
                return err(format!(
                    "reduction {e} is not computed at this point (a reduction inside a template fusion, or one \
                     depending on an inner axis)"
                ))
            }
        };
        sc.memo.insert(e, v);
        Ok(v)
    }

    fn unary(&self, u: UnaryOp, x: Val<'c>, _from: DType, dt: DType) -> R<Val<'c>> {
        if let (UnaryOp::Not, Val::I(i)) = (u, x) {
            let z = self.icmp(IntPredicate::EQ, i, self.i64c(0))?;
            return Ok(Val::I(self.bool_to_i64(z)?));
        }
        if let (UnaryOp::Neg | UnaryOp::Abs, Val::I(i)) = (u, x) {
            let n = self.b.build_int_neg(i, "").ck()?;
            let r = match u {
                UnaryOp::Neg => n,
                _ => self.imax(i, n)?,
            };
            return self.convert(Val::I(r), DType::I64, dt);
        }
        let x = self.as_f(x)?;
        let one = self.f32c(1.0);
        let r = match u {
            UnaryOp::Neg => self.b.build_float_neg(x, "").ck()?,
            UnaryOp::Exp => self.exp(x)?,
            UnaryOp::Log => self.log(x)?,
            UnaryOp::Sqrt => self.sqrt(x)?,
            UnaryOp::Rsqrt => self.fdiv(one, self.sqrt(x)?)?,
            UnaryOp::Recip => self.fdiv(one, x)?,
            UnaryOp::Sigmoid => self.sigmoid(x)?,
            UnaryOp::Tanh => self.tanh(x)?,
            UnaryOp::Sin => self.sincos(x, false)?,
            UnaryOp::Cos => self.sincos(x, true)?,
            UnaryOp::Abs => self.fabs(x)?,
            UnaryOp::Not => {
                let z = self.fcmp(FloatPredicate::OEQ, x, self.f32c(0.0))?;
                return Ok(Val::I(self.bool_to_i64(z)?));
            }
        };
        self.convert(Val::F(r), DType::F32, dt)
    }

    fn binary(&self, op: BinaryOp, x: Val<'c>, y: Val<'c>, from: DType, dt: DType) -> R<Val<'c>> {
        let bool_of = |c: IntValue<'c>| -> R<Val<'c>> { Ok(Val::I(self.bool_to_i64(c)?)) };
        match (x, y) {
            (Val::I(a), Val::I(b)) => {
                let r = match op {
                    BinaryOp::Add => self.add(a, b)?,
                    BinaryOp::Sub => self.sub(a, b)?,
                    BinaryOp::Mul => self.mul(a, b)?,
                    BinaryOp::Div | BinaryOp::Mod => {
                        // floor semantics (Python): adjust truncating division when the
                        // remainder is nonzero and the signs differ
                        let safe = self.icmp(IntPredicate::EQ, b, self.i64c(0))?;
                        let bb = self.select_i(safe, self.i64c(1), b)?;
                        let q = self.div(a, bb)?;
                        let r = self.rem(a, bb)?;
                        let nz = self.icmp(IntPredicate::NE, r, self.i64c(0))?;
                        let rs = self.icmp(IntPredicate::SLT, r, self.i64c(0))?;
                        let bs = self.icmp(IntPredicate::SLT, bb, self.i64c(0))?;
                        let differ = self.b.build_xor(rs, bs, "").ck()?;
                        let adj = self.and(nz, differ)?;
                        if op == BinaryOp::Div {
                            let q1 = self.sub(q, self.i64c(1))?;
                            self.select_i(adj, q1, q)?
                        } else {
                            let r1 = self.add(r, bb)?;
                            self.select_i(adj, r1, r)?
                        }
                    }
                    BinaryOp::Max => self.imax(a, b)?,
                    BinaryOp::Min => self.imin(a, b)?,
                    BinaryOp::Pow => {
                        let (fa, fb) = (self.sitofp(a)?, self.sitofp(b)?);
                        let p = self.pow(fa, fb)?;
                        let r = self.nvvm_rint(p)?;
                        self.fptosi(r)?
                    }
                    BinaryOp::Lt => return bool_of(self.icmp(IntPredicate::SLT, a, b)?),
                    BinaryOp::Le => return bool_of(self.icmp(IntPredicate::SLE, a, b)?),
                    BinaryOp::Gt => return bool_of(self.icmp(IntPredicate::SGT, a, b)?),
                    BinaryOp::Ge => return bool_of(self.icmp(IntPredicate::SGE, a, b)?),
                    BinaryOp::Eq => return bool_of(self.icmp(IntPredicate::EQ, a, b)?),
                    BinaryOp::Ne => return bool_of(self.icmp(IntPredicate::NE, a, b)?),
                    BinaryOp::And | BinaryOp::Or => {
                        let p = self.icmp(IntPredicate::NE, a, self.i64c(0))?;
                        let q = self.icmp(IntPredicate::NE, b, self.i64c(0))?;
                        let r = if op == BinaryOp::And {
                            self.and(p, q)?
                        } else {
                            self.b.build_or(p, q, "").ck()?
                        };
                        return bool_of(r);
                    }
                };
                let _ = from;
                self.convert(Val::I(r), DType::I64, dt)
            }
            _ => {
                let (a, b) = (self.as_f(x)?, self.as_f(y)?);
                let cmp = |p| -> R<Val<'c>> { bool_of(self.fcmp(p, a, b)?) };
                let r = match op {
                    BinaryOp::Add => self.fadd(a, b)?,
                    BinaryOp::Sub => self.fsub(a, b)?,
                    BinaryOp::Mul => self.fmul(a, b)?,
                    BinaryOp::Div => self.fdiv(a, b)?,
                    BinaryOp::Max => self.fmax(a, b)?,
                    BinaryOp::Min => self.fmin(a, b)?,
                    BinaryOp::Pow => self.pow(a, b)?,
                    BinaryOp::Mod => {
                        let q = self.nvvm_floor(self.fdiv(a, b)?)?;
                        self.fsub(a, self.fmul(b, q)?)?
                    }
                    BinaryOp::Lt => return cmp(FloatPredicate::OLT),
                    BinaryOp::Le => return cmp(FloatPredicate::OLE),
                    BinaryOp::Gt => return cmp(FloatPredicate::OGT),
                    BinaryOp::Ge => return cmp(FloatPredicate::OGE),
                    BinaryOp::Eq => return cmp(FloatPredicate::OEQ),
                    BinaryOp::Ne => return cmp(FloatPredicate::UNE),
                    BinaryOp::And | BinaryOp::Or => {
                        let p = self.fcmp(FloatPredicate::UNE, a, self.f32c(0.0))?;
                        let q = self.fcmp(FloatPredicate::UNE, b, self.f32c(0.0))?;
                        let r = if op == BinaryOp::And {
                            self.and(p, q)?
                        } else {
                            self.b.build_or(p, q, "").ck()?
                        };
                        return bool_of(r);
                    }
                };
                self.convert(Val::F(r), DType::F32, dt)
            }
        }
    }

    fn nvvm_rint(&self, x: inkwell::values::FloatValue<'c>) -> R<inkwell::values::FloatValue<'c>> {
        let f = self.ctx.f32_type();
        Ok(self
            .call("llvm.rint.f32", f.into(), &[f.into()], &[x.into()])?
            .into_float_value())
    }
    fn nvvm_floor(&self, x: inkwell::values::FloatValue<'c>) -> R<inkwell::values::FloatValue<'c>> {
        let f = self.ctx.f32_type();
        Ok(self
            .call("llvm.floor.f32", f.into(), &[f.into()], &[x.into()])?
            .into_float_value())
    }
}
