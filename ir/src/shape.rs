//! Shapes with symbolic dimensions.
//!
//! A [`Dim`] is a polynomial with integer coefficients over named symbols (`batch`, `seq`,
//! `past`, ...): enough for `past + seq` (a KV cache after concat) and `batch * seq` (tokens
//! flattened for routing). Two dims are equal when their normalised polynomials are equal.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Values of the symbolic dimensions for one run.
pub type DimEnv = HashMap<String, i64>;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dim {
    /// monomial (sorted symbol names, empty = constant) -> coefficient; no zero coefficients
    terms: BTreeMap<Vec<String>, i64>,
}

impl Dim {
    pub fn constant(c: i64) -> Dim {
        let mut terms = BTreeMap::new();
        if c != 0 {
            terms.insert(Vec::new(), c);
        }
        Dim { terms }
    }

    pub fn sym(name: &str) -> Dim {
        let mut terms = BTreeMap::new();
        terms.insert(vec![name.to_string()], 1);
        Dim { terms }
    }

    /// The value when the dim has no symbols.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    /// The symbol name when the dim is exactly one symbol (`seq`, not `seq + 1`).
    pub fn as_sym(&self) -> Option<&str> {
        if self.terms.len() == 1 {
            let (m, c) = self.terms.iter().next().unwrap();
            if *c == 1 && m.len() == 1 {
                return Some(&m[0]);
            }
        }
        None
    }

    /// The monomials and their coefficients (symbol names sorted; empty = the constant term):
    /// what a code generator needs to evaluate the polynomial from the symbols' values.
    pub fn terms(&self) -> impl Iterator<Item = (&[String], i64)> {
        self.terms.iter().map(|(m, c)| (m.as_slice(), *c))
    }

    pub fn is_symbolic(&self) -> bool {
        self.as_const().is_none()
    }

    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms.keys().flat_map(|m| m.iter().map(|s| s.as_str()))
    }

    pub fn eval(&self, env: &DimEnv) -> Result<i64, String> {
        let mut total = 0i64;
        for (m, c) in &self.terms {
            let mut v = *c;
            for s in m {
                v *= env
                    .get(s)
                    .ok_or_else(|| format!("symbolic dimension `{s}` has no value"))?;
            }
            total += v;
        }
        Ok(total)
    }

    fn normalise(mut self) -> Dim {
        self.terms.retain(|_, c| *c != 0);
        self
    }

    pub fn add(&self, o: &Dim) -> Dim {
        let mut r = self.clone();
        for (m, c) in &o.terms {
            *r.terms.entry(m.clone()).or_insert(0) += c;
        }
        r.normalise()
    }

    pub fn neg(&self) -> Dim {
        Dim {
            terms: self.terms.iter().map(|(m, c)| (m.clone(), -c)).collect(),
        }
    }

    pub fn sub(&self, o: &Dim) -> Dim {
        self.add(&o.neg())
    }

    pub fn mul(&self, o: &Dim) -> Dim {
        let mut r = Dim::constant(0);
        for (m1, c1) in &self.terms {
            for (m2, c2) in &o.terms {
                let mut m: Vec<String> = m1.iter().chain(m2.iter()).cloned().collect();
                m.sort();
                *r.terms.entry(m).or_insert(0) += c1 * c2;
            }
        }
        r.normalise()
    }

    /// Exact division by a constant; None when some coefficient is not divisible.
    pub fn div_const(&self, k: i64) -> Option<Dim> {
        if k == 0 || self.terms.values().any(|c| c % k != 0) {
            return None;
        }
        Some(Dim {
            terms: self.terms.iter().map(|(m, c)| (m.clone(), c / k)).collect(),
        })
    }
}

impl From<i64> for Dim {
    fn from(c: i64) -> Dim {
        Dim::constant(c)
    }
}

impl From<usize> for Dim {
    fn from(c: usize) -> Dim {
        Dim::constant(c as i64)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        // highest-degree terms first, constant last: `past + seq + 1`
        let mut terms: Vec<_> = self.terms.iter().collect();
        terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        for (i, (m, c)) in terms.iter().enumerate() {
            let c = **c;
            let neg = c < 0;
            if i > 0 {
                f.write_str(if neg { " - " } else { " + " })?;
            } else if neg {
                f.write_str("-")?;
            }
            let a = c.abs();
            if m.is_empty() {
                write!(f, "{a}")?;
            } else {
                if a != 1 {
                    write!(f, "{a}*")?;
                }
                f.write_str(&m.join("*"))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Shape of a tensor, outermost dimension first.
pub type Shape = Vec<Dim>;

pub fn shape_str(s: &[Dim]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// Concrete shape under `env`.
pub fn eval_shape(s: &[Dim], env: &DimEnv) -> Result<Vec<usize>, String> {
    s.iter()
        .map(|d| {
            let v = d.eval(env)?;
            usize::try_from(v).map_err(|_| format!("dimension {d} evaluates to {v} < 0"))
        })
        .collect()
}

/// Product of the dims (element count) as a Dim.
pub fn numel(s: &[Dim]) -> Dim {
    s.iter().fold(Dim::constant(1), |acc, d| acc.mul(d))
}

/// Numpy-style broadcast of two shapes (right-aligned; a dim broadcasts when it is 1).
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let n = a.len().max(b.len());
    let one = Dim::constant(1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.len() >= n { &a[i + a.len() - n] } else { &one };
        let db = if i + b.len() >= n { &b[i + b.len() - n] } else { &one };
        if da == db || *db == one {
            out.push(da.clone());
        } else if *da == one {
            out.push(db.clone());
        } else {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_normalise_and_print() {
        let past = Dim::sym("past");
        let seq = Dim::sym("seq");
        let total = past.add(&seq);
        assert_eq!(total, seq.add(&past));
        assert_eq!(total.to_string(), "past + seq");
        assert_eq!(total.sub(&seq), past);
        let flat = Dim::sym("batch").mul(&seq);
        assert_eq!(flat.to_string(), "batch*seq");
        let env: DimEnv = [("batch".into(), 2), ("seq".into(), 5)].into();
        assert_eq!(flat.eval(&env).unwrap(), 10);
        assert!(past.eval(&env).is_err());
        assert_eq!(Dim::constant(12).div_const(4), Some(Dim::constant(3)));
        assert_eq!(Dim::constant(3).sub(&seq).to_string(), "-seq + 3");
    }

    #[test]
    fn broadcasting() {
        let s = |v: &[i64]| v.iter().map(|&x| Dim::constant(x)).collect::<Vec<_>>();
        assert_eq!(broadcast(&s(&[4, 1, 3]), &s(&[5, 1])), Some(s(&[4, 5, 3])));
        assert_eq!(broadcast(&s(&[2, 3]), &s(&[4, 3])), None);
        let t = vec![Dim::sym("seq"), Dim::constant(1)];
        assert_eq!(broadcast(&t, &s(&[8])).unwrap()[0], Dim::sym("seq"));
    }
}
