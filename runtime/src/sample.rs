//! Token sampling: greedy, temperature, top-k and top-p (nucleus).

use rand::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy
    pub temperature: f32,
    /// keep the smallest set of tokens whose probability reaches top_p (1 = all)
    pub top_p: f32,
    /// keep the k most likely tokens (0 = all)
    pub top_k: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        }
    }
}

/// Index of the largest logit; ties go to the lower index (deterministic).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best
}

/// Pick the next token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> usize {
    if s.temperature <= 0.0 || s.top_k == 1 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let m = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - m) / s.temperature as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= t);
    }
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[i];
        }
    }
    *idx.last().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_and_filters() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let l = [0.5, 3.0, 3.0, -1.0];
        assert_eq!(sample(&l, &Sampling::default(), &mut rng), 1);
        // top_k = 2 never yields tokens 0 or 3
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 2,
        };
        for _ in 0..200 {
            let t = sample(&l, &s, &mut rng);
            assert!(t == 1 || t == 2);
        }
        // a tiny top_p keeps only the best token
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.01,
            top_k: 0,
        };
        let l2 = [0.0, 5.0, 1.0];
        for _ in 0..50 {
            assert_eq!(sample(&l2, &s, &mut rng), 1);
        }
        // high temperature reaches every token
        let s = Sampling {
            temperature: 100.0,
            top_p: 1.0,
            top_k: 0,
        };
        let mut seen = [false; 4];
        for _ in 0..400 {
            seen[sample(&l, &s, &mut rng)] = true;
        }
        assert!(seen.iter().all(|&x| x));
    }
}
