//! Tolerance tiers (design.md, "Tolerances"): the only way tests compare numbers.
//!
//! Error is `max|a − b| / max|b|` over the whole tensor, `b` being the oracle.

/// A dtype's tier; `op()` bounds a single op or kernel, `model()` whole-model logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tol {
    F32,
    BF16,
    /// E4M3 with block scales
    FP8,
}

impl Tol {
    pub fn op(self) -> f64 {
        match self {
            Tol::F32 => 1e-5,
            Tol::BF16 => 1e-2,
            Tol::FP8 => 6e-2,
        }
    }

    pub fn model(self) -> f64 {
        match self {
            Tol::F32 => 1e-4,
            Tol::BF16 => 3e-2,
            Tol::FP8 => 0.15,
        }
    }
}

/// `max|a − b| / max|b|`; `b` is the reference. Infinite when shapes differ or a value is NaN.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (x as f64 - y as f64).abs();
        if d.is_nan() {
            return f64::INFINITY;
        }
        num = num.max(d);
        den = den.max((y as f64).abs());
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        num / den
    }
}

/// Ok when `a` is within `bound` of the reference `b`; the error says by how much it is not.
pub fn check(what: &str, a: &[f32], b: &[f32], bound: f64) -> Result<f64, String> {
    let e = rel_err(a, b);
    if e <= bound {
        Ok(e)
    } else {
        Err(format!(
            "{what}: relative error {e:.3e} exceeds {bound:.0e} ({} vs {} values)",
            a.len(),
            b.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.0, 2.1], &[1.0, 2.0]) - 0.05).abs() < 1e-6);
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(rel_err(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert!(check("x", &[1.0, 2.1], &[1.0, 2.0], Tol::BF16.op()).is_err());
        assert!(check("x", &[1.0, 2.00001], &[1.0, 2.0], Tol::F32.op()).is_ok());
    }
}
