//! The disk cache of compiled PTX: LLVM's optimisation and NVPTX code generation are most of
//! a kernel's compile time, so their output is kept by the hash of the unoptimised LLVM module,
//! the target, the optimisation level and the ringjit version. A second run of the same model
//! compiles nothing (the driver keeps its own cache of PTX → SASS).
//!
//! Where: `$RINGJIT_CACHE` (`off` disables the cache), else `$XDG_CACHE_HOME/ringjit`, else
//! `~/.cache/ringjit`; files are `ptx/<hash>.ptx`, written atomically (temp file, rename). A
//! cache that cannot be read or written is skipped silently: it only saves time.

use super::PtxOptions;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

static HITS: AtomicUsize = AtomicUsize::new(0);
static MISSES: AtomicUsize = AtomicUsize::new(0);

/// (hits, misses) of this process so far.
pub fn stats() -> (usize, usize) {
    (HITS.load(Ordering::Relaxed), MISSES.load(Ordering::Relaxed))
}

/// The cache folder, or None when disabled or no home is known.
pub fn dir() -> Option<PathBuf> {
    let base = match std::env::var_os("RINGJIT_CACHE") {
        Some(d) if d == "off" => return None,
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("XDG_CACHE_HOME") {
            Some(d) => PathBuf::from(d).join("ringjit"),
            None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/ringjit"),
        },
    };
    Some(base.join("ptx"))
}

/// Two independent 64-bit FNV-1a hashes: 128 bits, stable across builds and platforms.
fn hash128(parts: &[&[u8]]) -> String {
    let mut h = [0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4u64];
    for p in parts {
        for &b in *p {
            for (i, x) in h.iter_mut().enumerate() {
                *x ^= u64::from(b) ^ (i as u64) << 8;
                *x = x.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        // separate the parts
        for x in h.iter_mut() {
            *x = x.rotate_left(17) ^ 0xff;
        }
    }
    format!("{:016x}{:016x}", h[0], h[1])
}

/// The key of a module's PTX under `opts`.
pub fn key(llvm_ir: &str, opts: &PtxOptions) -> String {
    let target = format!("{:?} O{}", opts.target, opts.opt_level);
    hash128(&[
        env!("CARGO_PKG_VERSION").as_bytes(),
        target.as_bytes(),
        llvm_ir.as_bytes(),
    ])
}

type Memo = Mutex<HashMap<String, Arc<OnceLock<Result<String, String>>>>>;

/// `compute()`'s result for `key`, computed once per process: threads asking for a key being
/// computed wait for it (the same kernel of every layer, compiled in parallel, is one compile).
pub fn memo(key: &str, compute: impl FnOnce() -> Result<String, String>) -> Result<String, String> {
    static MEMO: OnceLock<Memo> = OnceLock::new();
    let cell = MEMO
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key.to_string())
        .or_default()
        .clone();
    let mut computed = false;
    let r = cell.get_or_init(|| {
        computed = true;
        compute()
    });
    if !computed {
        MEMO_HITS.fetch_add(1, Ordering::Relaxed);
    }
    r.clone()
}

/// How many compiles [`memo`] saved in this process so far.
pub fn memo_hits() -> usize {
    MEMO_HITS.load(Ordering::Relaxed)
}

static MEMO_HITS: AtomicUsize = AtomicUsize::new(0);

pub fn get(key: &str) -> Option<String> {
    let body = std::fs::read_to_string(dir()?.join(format!("{key}.ptx"))).ok();
    match &body {
        Some(_) => HITS.fetch_add(1, Ordering::Relaxed),
        None => MISSES.fetch_add(1, Ordering::Relaxed),
    };
    body
}

pub fn put(key: &str, ptx: &str) {
    let Some(d) = dir() else { return };
    if std::fs::create_dir_all(&d).is_err() {
        return;
    }
    let tmp = d.join(format!("{key}.{}.tmp", std::process::id()));
    if std::fs::write(&tmp, ptx).is_ok() && std::fs::rename(&tmp, d.join(format!("{key}.ptx"))).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_parts_and_options() {
        let o = PtxOptions::default();
        assert_eq!(key("a", &o), key("a", &o));
        assert_ne!(key("a", &o), key("b", &o));
        let o1 = PtxOptions {
            opt_level: 1,
            ..o.clone()
        };
        assert_ne!(key("a", &o), key("a", &o1));
        assert_ne!(hash128(&[b"ab", b"c"]), hash128(&[b"a", b"bc"]));
    }
}
