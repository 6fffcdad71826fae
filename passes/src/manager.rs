//! The pass manager: named graph-to-graph passes run in order, each timed, with an optional
//! dump of the graph after every pass (`NN-after-<pass>.txt` and `.dot`, written atomically)
//! so that a miscompile is found by diffing neighbouring files (style.md 16).

use crate::report::{PassRecord, PassReport};
use crate::PassError;
use ir::graph::Graph;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a pass runs: the graph in, the graph out; it may add to the report (rule counters,
/// e-graph statistics).
pub type PassFn = dyn Fn(Graph, &mut PassReport) -> Result<Graph, PassError> + Send + Sync;

/// A named pass.
pub struct Pass {
    name: String,
    run: Box<PassFn>,
}

impl Pass {
    pub fn new(
        name: impl Into<String>,
        run: impl Fn(Graph, &mut PassReport) -> Result<Graph, PassError> + Send + Sync + 'static,
    ) -> Pass {
        Pass {
            name: name.into(),
            run: Box::new(run),
        }
    }

    /// A pass that does not report anything beyond its timing.
    pub fn simple(name: impl Into<String>, run: fn(Graph) -> Result<Graph, PassError>) -> Pass {
        Pass::new(name, move |g, _| run(g))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn run(&self, g: Graph, report: &mut PassReport) -> Result<Graph, PassError> {
        (self.run)(g, report)
    }
}

impl std::fmt::Debug for Pass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pass({})", self.name)
    }
}

/// Passes in order, and where to dump the graph after each.
#[derive(Debug, Default)]
pub struct PassManager {
    passes: Vec<Pass>,
    dump_dir: Option<PathBuf>,
}

impl PassManager {
    pub fn new() -> PassManager {
        PassManager::default()
    }

    pub fn then(mut self, pass: Pass) -> PassManager {
        self.passes.push(pass);
        self
    }

    /// Dump `00-input` and `NN-after-<pass>` (`.txt` and `.dot`) into `dir` (created if
    /// needed).
    pub fn with_dump(mut self, dir: impl Into<PathBuf>) -> PassManager {
        self.dump_dir = Some(dir.into());
        self
    }

    pub fn pass_names(&self) -> Vec<&str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs every pass in order. The first failing pass stops the run; its error names it.
    pub fn run(&self, mut g: Graph) -> Result<(Graph, PassReport), PassError> {
        let start = Instant::now();
        let mut report = PassReport::default();
        if let Some(dir) = &self.dump_dir {
            std::fs::create_dir_all(dir).map_err(|e| PassError::io("dump", dir, e))?;
            dump(dir, "00-input", &g)?;
        }
        for (i, pass) in self.passes.iter().enumerate() {
            let nodes_before = g.node_count();
            let egraph_before = report.egraph.clone();
            let t = Instant::now();
            g = pass.run(g, &mut report)?;
            report.passes.push(PassRecord {
                name: pass.name().to_string(),
                ms: t.elapsed().as_secs_f64() * 1e3,
                nodes_before,
                nodes_after: g.node_count(),
            });
            if crate::debug_level() >= 2 {
                let r = report.passes.last().expect("just pushed");
                eprintln!(
                    "pass {:<12} {:>9.2} ms  nodes {} -> {}",
                    r.name, r.ms, r.nodes_before, r.nodes_after
                );
            }
            if let Some(dir) = &self.dump_dir {
                let stem = format!("{:02}-after-{}", i + 1, pass.name());
                dump(dir, &stem, &g)?;
                // a pass that ran an e-graph also leaves its statistics next to its graph
                if report.egraph != egraph_before {
                    let json = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
                    write_atomic(&dir.join(format!("{stem}.report.json")), &json)?;
                }
            }
        }
        report.total_ms = start.elapsed().as_secs_f64() * 1e3;
        Ok((g, report))
    }
}

/// Writes `<stem>.txt` and `<stem>.dot`, each through a temporary file and a rename.
fn dump(dir: &Path, stem: &str, g: &Graph) -> Result<(), PassError> {
    write_atomic(&dir.join(format!("{stem}.txt")), &g.to_text())?;
    write_atomic(&dir.join(format!("{stem}.dot")), &g.to_dot())
}

/// Writes `path` atomically: a temporary file in the same directory, then a rename.
pub fn write_atomic(path: &Path, contents: &str) -> Result<(), PassError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("dump");
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, contents).map_err(|e| PassError::io("dump", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| PassError::io("dump", path, e))
}
