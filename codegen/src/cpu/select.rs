//! Host drivers of the primitive selections and scatters (`ir::op`'s `TopK`, `ArgMax`,
//! `ScatterAddAlong`, as `ir::interp` defines them): a tensor is seen as `(pre, n, post)`
//! around its axis, and each line along the axis (one `(pre, post)` pair) is one parallel
//! index. The selections run the generated `argmax` kernel (`vector.rs`) once per chosen
//! element: NaN above every number, -0 equal to +0, ties to the lower index, the order of the
//! reference's stable descending sort; the scatter runs the generated scatter-add kernel,
//! which sums each destination in order of the source index (f64 for floats, rounded once by
//! the caller; wrapping i64 for integers), exactly as the reference does.

use super::{ParFor, Shared};

/// The selection kernel over one contiguous line: `select(n, values, taken)`, as
/// `vector::ArgmaxFn` (or its i64 form): the best entry not taken yet, marked taken.
pub type Select<'a, T> = &'a (dyn Fn(usize, *const T, *mut u8) -> i64 + Sync);

/// The `k` largest of every line of `x` viewed as `(pre, n, post)`, in descending order:
/// values into `vals` and indices into `ids`, both `(pre, k, post)`.
#[allow(clippy::too_many_arguments)]
pub fn topk<T: Copy + Default + Send + Sync>(
    x: &[T],
    (pre, n, post): (usize, usize, usize),
    k: usize,
    select: Select<T>,
    vals: Option<&mut [T]>,
    ids: &mut [i64],
    par: &dyn ParFor,
) -> Result<(), String> {
    if k > n {
        return Err(format!("top-{k} of a dimension of {n}"));
    }
    if x.len() != pre * n * post || ids.len() != pre * k * post {
        return Err(format!(
            "top-{k}: {} values and {} indices for ({pre}, {n}, {post})",
            x.len(),
            ids.len()
        ));
    }
    let vo = match vals {
        Some(v) if v.len() == ids.len() => Some(Shared(v.as_mut_ptr())),
        Some(v) => return Err(format!("top-{k}: {} values for {} indices", v.len(), ids.len())),
        None => None,
    };
    let io = Shared(ids.as_mut_ptr());
    par.run(pre * post, &|lo, hi| {
        let mut line = vec![T::default(); if post == 1 { 0 } else { n }];
        let mut taken = vec![0u8; n];
        for l in lo..hi {
            let (p, q) = (l / post, l % post);
            let base = p * n * post + q;
            // a line along an inner axis is strided: gathered first
            let values: &[T] = if post == 1 {
                &x[base..base + n]
            } else {
                for (i, v) in line.iter_mut().enumerate() {
                    *v = x[base + i * post];
                }
                &line
            };
            taken.fill(0);
            for r in 0..k {
                let i = select(n, values.as_ptr(), taken.as_mut_ptr());
                // k ≤ n: every selection finds an entry
                let i = i.max(0) as usize;
                let o = (p * k + r) * post + q;
                // SAFETY: output (p, r, q) belongs to line l only.
                unsafe {
                    *io.at(o) = i as i64;
                    if let Some(v) = vo {
                        *v.at(o) = values[i];
                    }
                }
            }
        }
    });
    Ok(())
}

/// The scatter kernel of one column: `scatter(m, idx, src, acc, post, n)` as
/// `vector::ScatterF64Fn` (or its i64 form).
pub type Scatter<'a, S, A> = &'a (dyn Fn(usize, *const i64, *const S, *mut A, usize, usize) -> i64 + Sync);

/// `acc[p, idx[p, j, q], q] += src[p, j, q]` with `acc` `(pre, n, post)` (holding `x`
/// already) and `idx`, `src` `(pre, m, post)`; one `(p, q)` column per parallel index (its
/// destinations are its own). An index outside `0..n` is the reference's error.
pub fn scatter_add<S: Sync, A: Send>(
    acc: &mut [A],
    idx: &[i64],
    src: &[S],
    (pre, n, m, post): (usize, usize, usize, usize),
    axis: usize,
    scatter: Scatter<S, A>,
    par: &dyn ParFor,
) -> Result<(), String> {
    if acc.len() != pre * n * post || idx.len() != pre * m * post || src.len() != idx.len() {
        return Err(format!(
            "scatter-add of {} sources at {} indices into {} values ({pre}, {n}, {m}, {post})",
            src.len(),
            idx.len(),
            acc.len()
        ));
    }
    // the reference refuses the whole op for any bad index, before adding anything
    if let Some(i) = idx.iter().find(|&&i| i < 0 || i as u64 >= n as u64) {
        return Err(format!("index {i} is out of range for axis {axis} of size {n}"));
    }
    let ao = Shared(acc.as_mut_ptr());
    par.run(pre * post, &|lo, hi| {
        for l in lo..hi {
            let (p, q) = (l / post, l % post);
            let s = p * m * post + q;
            // the column's m sources and indices (stride post) and its n destinations (stride
            // post) lie inside the slices; no other column writes them
            scatter(
                m,
                idx[s..].as_ptr(),
                src[s..].as_ptr(),
                ao.at(p * n * post + q),
                post,
                n,
            );
        }
    });
    Ok(())
}
