//! Reference semantics of causal GQA flash attention (see `super::Fused::FlashAttention`).
//!
//! Written the way a FlashAttention kernel computes it, so that the test against the plain
//! `softmax(scale · q kᵀ) v` of the unfused graph checks the algorithm: a tile of query rows
//! (the G query heads that share one KV head, times the new tokens) walks the key blocks once,
//! keeping per row a running maximum of the scores, a running sum of their exponentials and an
//! accumulator of exponential-weighted values, rescaled whenever the maximum grows ("online
//! softmax"); key blocks past the tile's last visible key are never read. Scores, exponentials
//! and accumulators are f64, so the reference itself adds no error worth counting.

use super::norm::{arity, float_out, floats, ints};
use crate::graph::TensorType;
use crate::tensor::Tensor;

/// Query rows per tile and keys per block. Small, so that tests of modest size run several
/// tiles and blocks with ragged last ones (a GPU kernel would use 64–128 of each).
const QUERY_TILE: usize = 16;
const KEY_BLOCK: usize = 16;

/// `Fused::FlashAttention`: inputs `q [b, Hkv, G, s, d]`, `k`, `v [b, Hkv, t, d]` (t = past +
/// s keys, the cache followed by the new tokens), `pos [s]` (ints). Key `j` is visible to query
/// `i` iff `j ≤ pos[i]`. Output f32 `[b, Hkv, G, s, d]`.
///
/// Data errors: a query with `pos[i] < 0` sees no key (its softmax would be empty). A position at
/// or past the end of the keys is allowed and sees every key, as the masked formulation does.
pub(super) fn flash_attention(
    scale: f64,
    args: &[&Tensor],
    out: &[(TensorType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "flash_attention";
    arity(OP, args, 4)?;
    if !scale.is_finite() {
        return Err(format!("{OP}: scale must be finite, got {scale}"));
    }
    let (qs, ks, vs, pos) = (
        floats(OP, args, 0)?,
        floats(OP, args, 1)?,
        floats(OP, args, 2)?,
        ints(OP, args, 3)?,
    );
    let (q, k) = (args[0], args[1]);
    let &[b, hkv, g, s, d] = q.shape.as_slice() else {
        return Err(format!("{OP}: q must be [b, Hkv, G, s, d], got {}", q.type_str()));
    };
    let t = match k.shape.as_slice() {
        &[kb, kh, t, kd] if [kb, kh, kd] == [b, hkv, d] && args[2].shape == k.shape => t,
        _ => {
            return Err(format!(
                "{OP}: k {} and v {} do not fit q {}",
                k.type_str(),
                args[2].type_str(),
                q.type_str()
            ))
        }
    };
    if pos.len() != s {
        return Err(format!("{OP}: {} positions for {s} queries", pos.len()));
    }
    let dtype = float_out(OP, out, 0, &q.shape)?;
    // the last key each query sees; every query must see at least key 0
    let mut last_key = Vec::with_capacity(s);
    for (i, &p) in pos.iter().enumerate() {
        if p < 0 || t == 0 {
            return Err(format!(
                "{OP}: query {i} at position {p} sees no key (of {t}): every query must see key 0"
            ));
        }
        last_key.push((p as u64).min(t as u64 - 1) as usize);
    }
    // rows of one KV head: G query heads × s tokens, row r is token r % s
    let rows_last_key: Vec<usize> = (0..g * s).map(|r| last_key[r % s]).collect();
    let mut y = vec![0f32; qs.len()];
    let (q_len, kv_len) = (g * s * d, t * d);
    for head in 0..b * hkv {
        attend_one_kv_head(
            &qs[head * q_len..(head + 1) * q_len],
            &ks[head * kv_len..(head + 1) * kv_len],
            &vs[head * kv_len..(head + 1) * kv_len],
            &rows_last_key,
            d,
            scale,
            (QUERY_TILE, KEY_BLOCK),
            &mut y[head * q_len..(head + 1) * q_len],
        );
    }
    Ok(vec![Tensor::from_f32(dtype, q.shape.clone(), y)])
}

/// Online-softmax state of one query row. Invariant after every key block: `m` is the maximum
/// score of the visible keys seen so far, `l = Σ exp(score − m)` and `acc = Σ exp(score − m) · v`
/// over those keys, so `acc / l` is the attention output restricted to them.
struct RowState {
    m: f64,
    l: f64,
    acc: Vec<f64>,
}

/// Attention of the query rows `q [rows, d]` over one KV head's keys and values `[t, d]`; row `r`
/// sees keys `0..=last_key[r]` (each `< t`). Rows are processed in tiles of `tile.0`, keys in
/// blocks of `tile.1`; the result goes to `y [rows, d]`.
#[allow(clippy::too_many_arguments)]
fn attend_one_kv_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    last_key: &[usize],
    d: usize,
    scale: f64,
    (tile_rows, block_keys): (usize, usize),
    y: &mut [f32],
) {
    let rows = last_key.len();
    let mut scores = vec![0f64; block_keys];
    for r0 in (0..rows).step_by(tile_rows) {
        let r1 = (r0 + tile_rows).min(rows);
        let mut state: Vec<RowState> = (r0..r1)
            .map(|_| RowState {
                m: f64::NEG_INFINITY,
                l: 0.0,
                acc: vec![0.0; d],
            })
            .collect();
        // causal skip: no row of the tile sees a key past this one
        let keys_end = last_key[r0..r1].iter().max().map_or(0, |&j| j + 1);
        for j0 in (0..keys_end).step_by(block_keys) {
            let j1 = (j0 + block_keys).min(keys_end);
            for (r, st) in (r0..r1).zip(&mut state) {
                // keys j0..visible_end of this block are visible to row r (the mask j ≤ last_key)
                let visible_end = j1.min(last_key[r] + 1);
                if visible_end <= j0 {
                    continue; // fully masked for this row: it leaves the state unchanged
                }
                let qr = &q[r * d..(r + 1) * d];
                let sc = &mut scores[..visible_end - j0];
                let mut block_max = f64::NEG_INFINITY;
                for (j, s) in (j0..visible_end).zip(sc.iter_mut()) {
                    let kj = &k[j * d..(j + 1) * d];
                    let dot: f64 = qr.iter().zip(kj).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                    *s = scale * dot;
                    block_max = block_max.max(*s);
                }
                // Rescale what was summed against the old maximum: factor exp(m_old − m_new) ≤ 1,
                // exactly 0 on the first visible block (m_old = −∞ while m_new is finite).
                let m_new = st.m.max(block_max);
                let alpha = (st.m - m_new).exp();
                st.l *= alpha;
                st.acc.iter_mut().for_each(|a| *a *= alpha);
                for (j, &s) in (j0..visible_end).zip(sc.iter()) {
                    let p = (s - m_new).exp(); // ≤ 1: no overflow whatever the scores' size
                    st.l += p;
                    let vj = &v[j * d..(j + 1) * d];
                    for (a, &vv) in st.acc.iter_mut().zip(vj) {
                        *a += p * f64::from(vv);
                    }
                }
                st.m = m_new;
            }
        }
        // every row saw key 0, so l ≥ 1 (its maximum contributes exp(0))
        for (r, st) in (r0..r1).zip(&state) {
            for (o, &a) in y[r * d..(r + 1) * d].iter_mut().zip(&st.acc) {
                *o = (a / st.l) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::norm::harness::*;
    use super::*;
    use crate::dtype::DType;
    use crate::fused::Fused;
    use crate::tensor::Data;
    use serde_json::json;

    /// §2.3 step 5 as models/ring_linear.ring's `softmax_attention` writes it: scores of every
    /// query against every key, the causal mask by absolute position, a plain softmax, then v.
    const ATTENTION_SRC: &str = r#"
        config scale: float;
        config dt: str;
        let X = dtype(dt);
        dim b, hkv, g, s, t, d;
        input q: X[b, hkv, g, s, d];
        input k: X[b, hkv, t, d];
        input v: X[b, hkv, t, d];
        input pos: i64[s];
        fn softmax(x, axis) {
            let m = max(x, axis = axis, keepdim = true);
            let e = exp(x - m);
            e / sum(e, axis = axis, keepdim = true)
        }
        let kt = unsqueeze(transpose(k), 2);                                  # [b, hkv, 1, d, t]
        let scores = (cast(q, f32) @ cast(kt, f32)) * scale;                  # [b, hkv, g, s, t]
        let causal = reshape(arange(t), [1, t]) <= reshape(pos, [s, 1]);      # [s, t]
        let probs = softmax(where(causal, scores, -inf), -1);
        output "o" = probs @ cast(unsqueeze(v, 2), f32);
    "#;

    struct Case {
        dt: DType,
        b: usize,
        hkv: usize,
        g: usize,
        s: usize,
        past: usize,
        d: usize,
    }

    /// Random q, k, v for `c` (entries of standard deviation `std`) and positions past..past+s.
    fn inputs(r: &mut rand_chacha::ChaCha8Rng, c: &Case, std: f32) -> [Tensor; 4] {
        let t = c.past + c.s;
        [
            randn(r, c.dt, &[c.b, c.hkv, c.g, c.s, c.d], std),
            randn(r, c.dt, &[c.b, c.hkv, t, c.d], std),
            randn(r, c.dt, &[c.b, c.hkv, t, c.d], 1.0),
            i64s((c.past as i64..(c.past + c.s) as i64).collect()),
        ]
    }

    fn unfused(c: &Case, scale: f64, x: &[Tensor; 4]) -> Tensor {
        let cfg = json!({"scale": scale, "dt": c.dt.name()});
        let ins = [("q", &x[0]), ("k", &x[1]), ("v", &x[2]), ("pos", &x[3])];
        run_dsl(ATTENTION_SRC, cfg, &ins).remove("o").unwrap()
    }

    #[test]
    fn flash_attention_matches_the_unfused_graph() {
        let mut r = rng(11);
        let case = |dt, b, hkv, g, s, past, d| Case {
            dt,
            b,
            hkv,
            g,
            s,
            past,
            d,
        };
        let cases = [
            // prefill (past = 0), MHA-like G = 1 and GQA G = 4, ragged lengths
            case(DType::F32, 1, 2, 1, 9, 0, 16),
            case(DType::F32, 2, 2, 4, 37, 0, 32),
            case(DType::BF16, 1, 1, 4, 40, 0, 64),
            // decode (s = 1) after a cache: 37 keys, G = 1 and G = 4
            case(DType::F32, 2, 2, 1, 1, 36, 8),
            case(DType::F32, 1, 2, 4, 1, 36, 16),
            case(DType::BF16, 1, 4, 4, 1, 100, 128),
            // chunked prefill after a cache: queries see the cache and part of the chunk
            case(DType::F32, 1, 2, 4, 5, 32, 16),
            case(DType::BF16, 2, 1, 2, 20, 17, 32),
        ];
        for c in cases {
            let scale = (c.d as f64).powf(-0.5);
            let x = inputs(&mut r, &c, 1.0);
            let want = unfused(&c, scale, &x);
            let y = run_fused(Fused::FlashAttention { scale }, &[&x[0], &x[1], &x[2], &x[3]]).unwrap();
            let tag = format!(
                "flash_attention {} b{} hkv{} G{} s{} past{} d{}",
                c.dt, c.b, c.hkv, c.g, c.s, c.past, c.d
            );
            // the output is f32 and both sides compute from the same stored inputs
            assert_close(&tag, &y[0], &want, tier(DType::F32));
        }
    }

    #[test]
    fn tile_and_block_sizes_do_not_change_the_result() {
        // one KV head, 2 query heads × 23 tokens after 14 cached keys: 37 keys in all
        let mut r = rng(12);
        let (rows, s, t, d) = (46, 23, 37, 8);
        let q = normal(&mut r, DType::F32, rows * d, 2.0);
        let k = normal(&mut r, DType::F32, t * d, 2.0);
        let v = normal(&mut r, DType::F32, t * d, 1.0);
        let last: Vec<usize> = (0..rows).map(|i| 14 + i % s).collect();
        let mut base = vec![0f32; rows * d];
        attend_one_kv_head(&q, &k, &v, &last, d, 0.35, (rows, t), &mut base);
        for tiles in [(1, 1), (16, 16), (5, 7), (64, 3)] {
            let mut y = vec![0f32; rows * d];
            attend_one_kv_head(&q, &k, &v, &last, d, 0.35, tiles, &mut y);
            crate::tol::check(&format!("tiles {tiles:?}"), &y, &base, crate::tol::Tol::F32.op()).unwrap();
        }
    }

    #[test]
    fn extreme_scores_give_no_nan() {
        let mut r = rng(13);
        let c = Case {
            dt: DType::F32,
            b: 1,
            hkv: 2,
            g: 2,
            s: 6,
            past: 31,
            d: 16,
        };
        // scores of order 1e8 · d: a one-hot softmax, still matched by the unfused graph
        let x = inputs(&mut r, &c, 1e4);
        let y = run_fused(Fused::FlashAttention { scale: 0.25 }, &[&x[0], &x[1], &x[2], &x[3]]).unwrap();
        assert!(all_finite(&y[0]));
        assert_close(
            "flash_attention scores ~1e8",
            &y[0],
            &unfused(&c, 0.25, &x),
            tier(DType::F32),
        );
        // scores of order 1e36 · d overflow f32 (the unfused graph's scores are ±inf and its
        // softmax NaN); the fused op stays finite, every output a convex mix of values
        let x = inputs(&mut r, &c, 1e18);
        let y = run_fused(Fused::FlashAttention { scale: 0.25 }, &[&x[0], &x[1], &x[2], &x[3]]).unwrap();
        assert!(all_finite(&y[0]));
        let vmax = x[2].as_f32().unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(y[0].as_f32().unwrap().iter().all(|o| o.abs() <= vmax * (1.0 + 1e-6)));
    }

    #[test]
    fn a_query_that_sees_no_key_is_an_error() {
        let mut r = rng(14);
        let c = Case {
            dt: DType::F32,
            b: 1,
            hkv: 1,
            g: 1,
            s: 2,
            past: 3,
            d: 4,
        };
        let mut x = inputs(&mut r, &c, 1.0);
        x[3].data = Data::I64(vec![-1, 4]);
        let e = run_fused(Fused::FlashAttention { scale: 0.5 }, &[&x[0], &x[1], &x[2], &x[3]]).unwrap_err();
        assert!(e.contains("sees no key"), "{e}");
    }
}
