//! Helpers shared by the integration tests.

use ir::checkpoint::RandomWeights;
use ir::interp::ParamSource;
use ir::{ParamSpec, Tensor};
use rand::{Rng, SeedableRng};
use runtime::model::{build_model, resolve_config};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the venv made by scripts/setup.sh (or RINGJIT_PYTHON). The parity tests need
/// it; its absence is a failure with instructions, not a silent skip.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("RINGJIT_PYTHON") {
        return PathBuf::from(p);
    }
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python with numpy: run ./scripts/setup.sh (or set RINGJIT_PYTHON)"
    );
    p
}

pub fn ringjit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringjit"))
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{cmd:?} should have failed");
    assert!(!stderr.contains("panicked"), "{cmd:?} panicked: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
    stderr
}

pub fn config(name: &str, overrides: &[(&str, serde_json::Value)]) -> serde_json::Value {
    let mut c = resolve_config(name).unwrap();
    for (k, v) in overrides {
        c.as_object_mut().unwrap().insert(k.to_string(), v.clone());
    }
    c
}

pub fn model(config: &serde_json::Value) -> ir::dsl::elab::Model {
    build_model(config, None).unwrap()
}

pub fn random_tokens(seed: u64, n: usize, vocab: usize) -> Vec<i64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as i64)).collect()
}

/// Random weights with some tensors replaced (e.g. a non-zero expert bias).
pub struct Patched {
    pub base: RandomWeights,
    pub replace: HashMap<String, Tensor>,
}

impl ParamSource for Patched {
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
        match self.replace.get(&spec.name) {
            Some(t) => Ok(t.clone()),
            None => self.base.load(spec).map_err(|e| e.to_string()),
        }
    }
}

/// Read a little-endian f32 .npy file (what the reference and `ringjit forward` write).
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY", "{} is not .npy", path.display());
    let (hlen, start) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(&b[start..start + hlen]).unwrap();
    assert!(header.contains("'<f4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape_txt = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = b[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    (shape, data)
}

/// A compiled model's kernel plan evaluated kernel by kernel by the reference evaluator
/// (`ir::kernel_eval`), on random weights and random inputs: for each kernel, the buffers it
/// reads and writes just before it runs, and the buffers it writes just after. A backend's
/// kernel test feeds it `before[i]`, runs kernel `i` alone and compares with `after[i]`.
pub struct Trace {
    pub graph: ir::Graph,
    pub plan: ir::kernel::KernelPlan,
    pub env: ir::DimEnv,
    /// weights and literals by name (as the plan's parameter buffers name them)
    pub params: HashMap<String, Tensor>,
    pub before: Vec<HashMap<ir::kernel::BufferId, Tensor>>,
    pub after: Vec<HashMap<ir::kernel::BufferId, Tensor>>,
}

impl Trace {
    /// What kernel `i` must write given the backend's own results `got`: `after[i]`, except
    /// that a GEMM's folded route is the evaluator's route of the backend's router logits
    /// (`Eval::route_tail`; logits within their tier may still flip a near tie).
    pub fn expected(
        &self,
        i: usize,
        got: &HashMap<ir::kernel::BufferId, Tensor>,
    ) -> HashMap<ir::kernel::BufferId, Tensor> {
        use ir::kernel::BufferKind;
        let k = &self.plan.kernels[i];
        let mut want = self.after[i].clone();
        if !k.routes() {
            return want;
        }
        let mut mem = ir::kernel_eval::Memory::new();
        for r in &k.inputs {
            let b = self.plan.buffer(r.buffer).unwrap();
            // parameters and literals by name, the rest as the trace saw them
            let v = match b.kind {
                BufferKind::Param => self.params[&b.name].to_f64_vec(),
                _ => self.before[i][&r.buffer].to_f64_vec(),
            };
            mem.insert(r.buffer, v);
        }
        let y = k.outputs[0].buffer;
        mem.insert(y, got[&y].to_f64_vec());
        let none = HashMap::new();
        let eval = ir::kernel_eval::Eval {
            env: &self.env,
            params: &none,
        };
        eval.route_tail(&self.plan, k, &mut mem)
            .unwrap_or_else(|e| panic!("{}: {e}", k.name));
        for r in &k.outputs[k.outputs.len() - 2..] {
            let b = self.plan.buffer(r.buffer).unwrap();
            let shape = ir::shape::eval_shape(&b.shape, &self.env).unwrap();
            want.insert(r.buffer, ir::kernel_eval::tensor(b.dtype, shape, &mem[&r.buffer]));
        }
        want
    }
}

/// The trace of the plan partitioned with `fold_routes` (`passes::partition::partition_with`).
pub fn trace_with(
    config: &serde_json::Value,
    opts: &passes::CompileOptions,
    (batch, seq, past): (i64, i64, i64),
    seed: u64,
    fold_routes: bool,
) -> Trace {
    use ir::kernel::{BufferId, BufferKind};
    use ir::kernel_eval::{tensor, Eval, Memory};
    use ir::op::{InputKind, Op};
    let m = model(config);
    let (graph, _) = passes::compile(&m.graph, opts).unwrap();
    let plan = passes::partition::partition_with(&graph, fold_routes).unwrap();
    let env: ir::DimEnv = [("batch", batch), ("seq", seq), ("past", past)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let weights = RandomWeights::new(seed);
    let mut params = HashMap::new();
    let mut params64 = HashMap::new();
    for spec in graph.params().unwrap() {
        let t = ParamSource::load(&weights, &spec).unwrap();
        params64.insert(spec.name.clone(), t.to_f64_vec());
        params.insert(spec.name.clone(), t);
    }
    for b in &plan.buffers {
        if let Op::Literal { value } = &graph.node(b.value.node).op {
            params64.insert(b.name.clone(), value.to_f64_vec());
            // (by name beside the weights: `Trace::expected` reads a kernel's parameters here)
            params.entry(b.name.clone()).or_insert_with(|| value.as_ref().clone());
        }
    }
    // random data inputs and states
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut mem = Memory::new();
    let vocab = config["vocab_size"].as_i64().unwrap();
    for (&n, &b) in graph.inputs.iter().zip(&plan.inputs) {
        let Op::Input { kind, dtype, shape, .. } = &graph.node(n).op else {
            unreachable!()
        };
        let len: usize = ir::shape::eval_shape(shape, &env).unwrap().iter().product();
        let data: Vec<f64> = match kind {
            InputKind::Data => (0..len).map(|_| rng.random_range(0..vocab) as f64).collect(),
            InputKind::State => (0..len)
                .map(|_| f64::from(dtype.round(rng.random_range(-1.0f32..1.0))))
                .collect(),
        };
        mem.insert(b, data);
    }
    for (i, b) in plan.buffers.iter().enumerate() {
        if b.kind == BufferKind::Param {
            mem.insert(BufferId(i as u32), params64[&b.name].clone());
        }
    }
    let eval = Eval {
        env: &env,
        params: &params64,
    };
    let as_tensor = |id: BufferId, data: &Vec<f64>| {
        let b = plan.buffer(id).unwrap();
        let shape = ir::shape::eval_shape(&b.shape, &env).unwrap();
        tensor(b.dtype, shape, data)
    };
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for k in &plan.kernels {
        let mut bf = HashMap::new();
        for r in k.inputs.iter().chain(&k.outputs) {
            if plan.buffer(r.buffer).unwrap().kind == BufferKind::Param {
                continue;
            }
            if let Some(d) = mem.get(&r.buffer) {
                bf.insert(r.buffer, as_tensor(r.buffer, d));
            }
        }
        eval.kernel(&plan, k, &mut mem)
            .unwrap_or_else(|e| panic!("{}: {e}", k.name));
        let af = k
            .outputs
            .iter()
            .map(|r| (r.buffer, as_tensor(r.buffer, &mem[&r.buffer])))
            .collect();
        before.push(bf);
        after.push(af);
    }
    Trace {
        graph,
        plan,
        env,
        params,
        before,
        after,
    }
}

/// The tolerance tier of a kernel: that of the narrowest float dtype among its buffers.
pub fn kernel_tier(plan: &ir::kernel::KernelPlan, k: &ir::kernel::Kernel) -> ir::tol::Tol {
    use ir::DType;
    let mut tier = ir::tol::Tol::F32;
    for r in k.inputs.iter().chain(&k.outputs) {
        match plan.buffer(r.buffer).unwrap().dtype {
            DType::F8E4M3 | DType::F8E5M2 => tier = ir::tol::Tol::FP8,
            DType::BF16 | DType::F16 if tier == ir::tol::Tol::F32 => tier = ir::tol::Tol::BF16,
            _ => {}
        }
    }
    tier
}

/// Parameters from a table by name.
pub struct Table<'a>(pub &'a HashMap<String, Tensor>);

impl ParamSource for Table<'_> {
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
        self.0
            .get(&spec.name)
            .cloned()
            .ok_or_else(|| format!("no parameter {}", spec.name))
    }
}

/// The decode GEMMs that normalise their rows first (`Fused::NormMatmul`, `fold-norm-gemm`):
/// the residual sum read from memory, a bf16 GEMM without the rows stored and the router-like
/// f32 GEMM of a computed B that stores them. The cases: 1..16 rows (the GEMV), 17..130 rows
/// (tensor cores, a partial tile and a second one), K of Ring-mini (2048 = the GEMV's staged
/// chunk), Ring-flash (4096: two chunks, one statistic) and 64.
pub const FOLDED_NORM_CASES: [(usize, usize); 7] = [
    (1, 2048),
    (3, 2048),
    (16, 4096),
    (17, 2048),
    (40, 4096),
    (130, 64),
    (5, 64),
];

/// The graph of one [`FOLDED_NORM_CASES`] case and its random inputs; outputs `q`, `router`,
/// `rows` (the stored normalised rows) and `sum`.
pub fn folded_norm_case(
    rows: usize,
    k: usize,
    seed: u64,
) -> (ir::graph::Graph, std::collections::HashMap<String, ir::Tensor>) {
    use ir::fused::Fused;
    let mut graph = ir::graph::Graph::new();
    let mut inputs = std::collections::HashMap::new();
    let mut rng = passes::testing::SplitMix(seed);
    let bf = ir::DType::BF16;
    let mut input = |graph: &mut ir::graph::Graph, name: &str, shape: &[usize], scale: f32| {
        let dims = shape.iter().map(|&x| ir::Dim::constant(x as i64)).collect();
        let numel: usize = shape.iter().product();
        let data = (0..numel)
            .map(|_| scale * (rng.unit() + 0.1f32.copysign(rng.unit())))
            .collect();
        inputs.insert(name.to_string(), ir::Tensor::from_f32(bf, shape.to_vec(), data));
        graph.add_input(name, ir::op::InputKind::Data, bf, dims)
    };
    let h = input(&mut graph, "h", &[rows, k], 1.0);
    let a = input(&mut graph, "a", &[rows, k], 1.0);
    let w = input(&mut graph, "w", &[k], 1.0);
    // HF layouts [N, K], used transposed
    let wq = input(&mut graph, "wq", &[96, k], 0.05);
    let wr = input(&mut graph, "wr", &[40, k], 0.05);
    let mut add = |op: ir::Op, args: &[ir::graph::Value]| graph.add(op, args, None).unwrap();
    let s = add(ir::Op::Binary(ir::op::BinaryOp::Add), &[h, a])[0];
    let bq = add(ir::Op::Permute { perm: vec![1, 0] }, &[wq])[0];
    let br = add(ir::Op::Permute { perm: vec![1, 0] }, &[wr])[0];
    let br = add(ir::Op::Cast { to: ir::DType::F32 }, &[br])[0];
    let fold = |emit_norm| ir::Op::Fused(Fused::NormMatmul { eps: 1e-6, emit_norm });
    let c1 = add(fold(false), &[s, bq, w])[0];
    let c2 = add(fold(true), &[s, br, w]);
    for (name, v) in [("q", c1), ("router", c2[0]), ("rows", c2[1]), ("sum", s)] {
        graph.add_output(name, v, ir::op::InputKind::Data);
    }
    (graph, inputs)
}

/// Every output of a [`folded_norm_case`] within the bf16 tier of the interpreter's.
pub fn assert_folded_norm_outputs(
    got: &std::collections::HashMap<String, ir::Tensor>,
    want: &std::collections::HashMap<String, ir::Tensor>,
    what: &str,
) {
    for name in ["q", "router", "rows", "sum"] {
        let (a, b) = (got[name].to_f64_vec(), want[name].to_f64_vec());
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.iter().map(|&x| x as f32).collect(),
            b.iter().map(|&x| x as f32).collect(),
        );
        let e = ir::tol::rel_err(&a, &b);
        assert!(e <= ir::tol::Tol::BF16.op(), "{what}: {name} rel err {e:.3e}");
    }
}
