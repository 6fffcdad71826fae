//! Parameter specifications: what a graph needs from a checkpoint.

use crate::dtype::DType;
use crate::graph::Graph;
use crate::op::{Op, Stack};

/// One parameter of a graph: an HF tensor name (or, when `stack` is set, a name pattern with
/// `{var}` whose members are stacked along a new leading axis), its dtype and full shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ParamSpec {
    pub name: String,
    pub stack: Option<Stack>,
    pub dtype: DType,
    /// Full shape; for a stack, `shape[0] == stack.count` and each member has `shape[1..]`.
    pub shape: Vec<usize>,
}

impl ParamSpec {
    /// The checkpoint tensor names this parameter reads, in stacking order.
    pub fn member_names(&self) -> Vec<String> {
        match &self.stack {
            None => vec![self.name.clone()],
            Some(s) => {
                let pat = format!("{{{}}}", s.var);
                (0..s.count).map(|i| self.name.replace(&pat, &i.to_string())).collect()
            }
        }
    }

    /// Shape of one checkpoint tensor (a member of the stack, or the whole parameter).
    pub fn member_shape(&self) -> &[usize] {
        if self.stack.is_some() {
            &self.shape[1..]
        } else {
            &self.shape
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Graph {
    /// Every parameter of the graph (scan bodies included), in a deterministic order.
    /// Fails if a parameter's shape is symbolic.
    pub fn params(&self) -> Result<Vec<ParamSpec>, String> {
        let mut out = Vec::new();
        self.collect_params(&mut out)?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup();
        Ok(out)
    }

    fn collect_params(&self, out: &mut Vec<ParamSpec>) -> Result<(), String> {
        for n in self.g.node_indices() {
            match &self.g[n].op {
                Op::Param {
                    name,
                    stack,
                    dtype,
                    shape,
                } => {
                    let shape = shape
                        .iter()
                        .map(|d| {
                            d.as_const()
                                .map(|c| c as usize)
                                .ok_or_else(|| format!("parameter `{name}` has a symbolic dimension {d}"))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    out.push(ParamSpec {
                        name: name.clone(),
                        stack: stack.clone(),
                        dtype: *dtype,
                        shape,
                    });
                }
                Op::Scan { body, .. } => body.collect_params(out)?,
                _ => {}
            }
        }
        Ok(())
    }
}
