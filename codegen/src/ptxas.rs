//! Checking PTX with NVIDIA's assembler, `ptxas`, without a GPU: validity, registers, shared
//! memory and spills per kernel.
//!
//! ptxas is found, in order, through `RINGJIT_PTXAS`, the file `.venv/ptxas-path` written by
//! `scripts/setup.sh` (looked for in the current directory and its parents, then in this source
//! tree), and `ptxas` on `PATH`.

use crate::ptx::CodegenError;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub shared_bytes: u64,
    pub spill_stores: u64,
    pub spill_loads: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PtxasReport {
    pub arch: String,
    pub kernels: Vec<KernelResources>,
}

fn from_file(p: &Path) -> Option<PathBuf> {
    let s = std::fs::read_to_string(p).ok()?;
    let exe = PathBuf::from(s.trim());
    exe.exists().then_some(exe)
}

/// Where ptxas is, or why it could not be found.
pub fn find_ptxas() -> Result<PathBuf, CodegenError> {
    if let Ok(p) = std::env::var("RINGJIT_PTXAS") {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(CodegenError(format!("RINGJIT_PTXAS={} does not exist", p.display())))
        };
    }
    let mut dirs: Vec<PathBuf> = std::env::current_dir()
        .ok()
        .into_iter()
        .flat_map(|d| d.ancestors().map(Path::to_path_buf).collect::<Vec<_>>())
        .collect();
    dirs.push(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")));
    for d in dirs {
        if let Some(p) = from_file(&d.join(".venv/ptxas-path")) {
            return Ok(p);
        }
    }
    if Command::new("ptxas")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        return Ok(PathBuf::from("ptxas"));
    }
    Err(CodegenError(
        "ptxas not found: run ./scripts/setup.sh (it installs the nvidia-cuda-nvcc-cu12 wheel) or set RINGJIT_PTXAS"
            .into(),
    ))
}

/// The `-arch` a PTX file asks for (its `.target`).
pub fn target_of(ptx: &str) -> Option<String> {
    ptx.lines()
        .find_map(|l| l.trim().strip_prefix(".target "))
        .map(|t| t.split([',', ' ']).next().unwrap_or("").to_string())
}

/// Assemble `ptx` with `-arch` matching its `.target`; the per-kernel resource report, or the
/// assembler's log as the error.
pub fn check(ptx: &str) -> Result<PtxasReport, CodegenError> {
    let exe = find_ptxas()?;
    let arch = target_of(ptx).ok_or_else(|| CodegenError("the PTX has no .target line".into()))?;
    let dir = std::env::temp_dir().join(format!("ringjit-ptxas-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).map_err(|e| CodegenError(format!("{}: {e}", dir.display())))?;
    let file = dir.join("kernel.ptx");
    std::fs::write(&file, ptx).map_err(|e| CodegenError(format!("{}: {e}", file.display())))?;
    let out = Command::new(&exe)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&file)
        .arg("-o")
        .arg(dir.join("kernel.cubin"))
        .output()
        .map_err(|e| CodegenError(format!("running {}: {e}", exe.display())));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(CodegenError(format!("ptxas rejected the PTX (-arch={arch}):\n{log}")));
    }
    Ok(PtxasReport {
        arch,
        kernels: parse_log(&log),
    })
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Parse `ptxas -v` output: "Compiling entry function 'k'", "Used R registers, ... S bytes smem",
/// "N bytes spill stores, M bytes spill loads".
pub fn parse_log(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let num_before = |line: &str, unit: &str| -> Option<u64> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            out.push(KernelResources {
                name: rest.split('\'').next().unwrap_or("").to_string(),
                ..Default::default()
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("spill stores") {
                k.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            }
            if line.contains("Used") && line.contains("registers") {
                k.registers = num_before(line, "registers").unwrap_or(0) as u32;
                k.shared_bytes = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_ptxas_log() {
        let log = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'axpy' for 'sm_90'\n\
                   ptxas info    : Function properties for axpy\n    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
                   ptxas info    : Used 10 registers, 384 bytes smem, 380 bytes cmem[0]\n";
        let k = &parse_log(log)[0];
        assert_eq!(
            (
                k.name.as_str(),
                k.registers,
                k.shared_bytes,
                k.spill_stores,
                k.spill_loads
            ),
            ("axpy", 10, 384, 4, 4)
        );
        assert_eq!(target_of("//\n.version 8.0\n.target sm_90a\n"), Some("sm_90a".into()));
    }

    #[test]
    fn bad_ptx_is_rejected_with_the_log() {
        let e = check(".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry k() { bogus; }\n").unwrap_err();
        assert!(e.0.contains("ptxas rejected"), "{e}");
    }
}
