//! Throughput measurement: prefill tokens/s at batch 1 and decode ms/step per batch size.
//! A benchmark, never a test: it prints figures, it asserts nothing.

use crate::engine::{Engine, State};
use crate::Result;
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub prefill: Vec<usize>,
    pub decode_batch: Vec<usize>,
    pub context: usize,
    pub steps: usize,
    /// timed repetitions of each prefill
    pub repeats: usize,
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    pub fn of(mut xs: Vec<f64>) -> Stats {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let median = if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        };
        Stats {
            median,
            min: xs[0],
            max: xs[n - 1],
            n,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PrefillResult {
    pub tokens: usize,
    /// seconds per prefill
    pub seconds: Stats,
    pub tokens_per_s: f64,
}

#[derive(Clone, Debug)]
pub struct DecodeResult {
    pub batch: usize,
    pub context: usize,
    /// seconds per decode step
    pub seconds: Stats,
    pub tokens_per_s: f64,
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub prefill: Vec<PrefillResult>,
    pub decode: Vec<DecodeResult>,
}

fn random_tokens(rng: &mut impl Rng, n: usize, vocab: usize) -> Vec<i64> {
    (0..n).map(|_| rng.random_range(0..vocab as i64)).collect()
}

/// Run the benchmark; `progress` is told what is being measured.
pub fn run(engine: &Engine, cfg: &BenchConfig, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut prefill = Vec::new();
    for &t in &cfg.prefill {
        progress(&format!("prefill {t} tokens"));
        let tokens = random_tokens(&mut rng, t, engine.vocab);
        // one warm-up run, then the timed ones
        let mut times = Vec::new();
        for rep in 0..=cfg.repeats.max(1) {
            let mut st = engine.new_state(1)?;
            let t0 = Instant::now();
            engine.step(&mut st, &tokens, t)?;
            if rep > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let seconds = Stats::of(times);
        prefill.push(PrefillResult {
            tokens: t,
            tokens_per_s: t as f64 / seconds.median,
            seconds,
        });
    }
    let mut decode = Vec::new();
    for &b in &cfg.decode_batch {
        progress(&format!("decode batch {b} after {} tokens of context", cfg.context));
        let mut st: State = engine.new_state(b)?;
        if cfg.context > 0 {
            let ctx = random_tokens(&mut rng, b * cfg.context, engine.vocab);
            engine.step(&mut st, &ctx, cfg.context)?;
        }
        let mut times = Vec::new();
        for i in 0..cfg.steps.max(1) + 2 {
            let toks = random_tokens(&mut rng, b, engine.vocab);
            let t0 = Instant::now();
            engine.step(&mut st, &toks, 1)?;
            if i >= 2 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let seconds = Stats::of(times);
        decode.push(DecodeResult {
            batch: b,
            context: cfg.context,
            tokens_per_s: b as f64 / seconds.median,
            seconds,
        });
    }
    Ok(BenchReport { prefill, decode })
}

/// The CPU's model name and core count, for benchmark tables.
pub fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{model} ({cores} cores)")
}
