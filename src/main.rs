//! `ringjit`: compile and run the Ring-linear 2.0 models.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ir::DType;
use runtime::bench::{self, BenchConfig};
use runtime::model::{LoadedModel, ModelSpec};
use runtime::sample::{sample, Sampling};
use runtime::{Device, Engine};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

const ABOUT: &str = "ringjit: a JIT kernel compiler and graph runtime for the Ring-linear 2.0 hybrid \
linear/softmax-attention MoE models (Ring-mini-linear-2.0, Ring-flash-linear-2.0).";

const AFTER_HELP: &str = "\
Every command that computes takes either --model DIR (an HF checkpoint folder: config.json plus
model.safetensors or shards with model.safetensors.index.json) or --config NAME (random weights made
in memory from a seed; nothing is downloaded or written). Built-in configs: tiny, small,
ring-mini-linear-2.0, ring-flash-linear-2.0; NAME may also be a path to a config.json.

Examples:
  ringjit generate --config tiny --tokens 1,2,3 --max-new-tokens 16
  ringjit forward --config tiny --tokens 3,17,5 --out logits.npy
  ringjit init --config tiny --out /tmp/tiny-ckpt && ringjit forward --model /tmp/tiny-ckpt --tokens 1,2
  ringjit graph --config tiny --format dot > tiny.dot
  ringjit compile --config ring-mini-linear-2.0 --mode decode --report r.json --dump passes/
  ringjit bench --config small --device reference

Environment: RINGJIT_DEBUG=1 prints the chosen device, the model's size and unused config keys.";

#[derive(Parser)]
#[command(name = "ringjit", version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a random-weight checkpoint in the HF layout (config.json + safetensors).
    Init(InitArgs),
    /// Compute the logits of every position of a token sequence and write them to a file.
    Forward(ForwardArgs),
    /// Generate tokens after a prompt, streaming them to stdout.
    Generate(GenerateArgs),
    /// Print the model's graph IR (text or Graphviz DOT).
    Graph(GraphArgs),
    /// Run the rewrite passes and report what they did (fusions, kernels, memory).
    Compile(CompileArgs),
    /// Measure prefill and decode throughput.
    Bench(BenchArgs),
    /// Generate the PTX of every kernel of a compiled step (and check it with ptxas).
    #[command(
        long_about = "Generate the PTX of every loop and template kernel of one compiled step \
(scan bodies included), each module headed by a comment naming the graph nodes it came from and its \
launch geometry. Prints the PTX to stdout, or writes one NAME.ptx per kernel with --out DIR. \
--ptxas assembles each module with ptxas (-arch = the module's .target; found through RINGJIT_PTXAS, \
.venv/ptxas-path from scripts/setup.sh, or PATH) and prints registers, shared memory and spills per \
kernel instead of the PTX.\n\nExamples:\n  ringjit ptx --config tiny --mode decode --kernel k1_gemm_qkv\n  \
ringjit ptx --config ring-mini-linear-2.0 --mode prefill --precision fp8 --out ptx/ --ptxas"
    )]
    Ptx(PtxArgs),
}

#[derive(Args)]
struct PtxArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Which step to compile: a prefill of many tokens or a one-token decode step.
    #[arg(long, value_enum, default_value_t = ModeArg::Prefill)]
    mode: ModeArg,
    /// Format of the weight GEMMs (fp8: E4M3 with block scales).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Bf16)]
    precision: PrecisionArg,
    /// Only the kernel of this name (e.g. k1_gemm_qkv).
    #[arg(long, value_name = "NAME")]
    kernel: Option<String>,
    /// Write one NAME.ptx per kernel into DIR instead of printing.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Assemble every module with ptxas and print a table of registers, shared memory, spills.
    #[arg(long)]
    ptxas: bool,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// HF checkpoint folder: config.json + model.safetensors (or shards + index).
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    model: Option<PathBuf>,
    /// Built-in config (tiny, small, ring-mini-linear-2.0, ring-flash-linear-2.0) or a config.json
    /// path; the weights are random, seeded by --seed.
    #[arg(long, value_name = "NAME")]
    config: Option<String>,
    /// Seed of random weights (and of sampling in `generate`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override a config.json entry, e.g. --set ringjit_decay_convention=B (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Use another model definition instead of the built-in models/ring_linear.ring.
    #[arg(long, value_name = "FILE.ring")]
    model_def: Option<PathBuf>,
}

impl ModelArgs {
    fn spec(&self) -> ModelSpec {
        ModelSpec {
            dir: self.model.clone(),
            config: self.config.clone(),
            seed: self.seed,
            model_def: self.model_def.clone(),
            overrides: self.overrides.clone(),
        }
    }
}

#[derive(Args)]
struct DeviceArgs {
    /// Where to run: reference (the interpreter), cpu, cuda, or auto (the best available).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Run the graph as the DSL wrote it, without the rewrite passes' fusions.
    #[arg(long)]
    no_fuse: bool,
    /// Format of the weight GEMMs: bf16 (as stored) or fp8 (E4M3, 1x128 activation tiles and
    /// 128x128 weight blocks; router and LM head stay in higher precision).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Bf16)]
    precision: PrecisionArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Bf16,
    Fp8,
}

impl PrecisionArg {
    fn get(self) -> passes::Precision {
        match self {
            PrecisionArg::Bf16 => passes::Precision::Bf16,
            PrecisionArg::Fp8 => passes::Precision::Fp8,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum InitDType {
    F32,
    Bf16,
}

#[derive(Args)]
struct InitArgs {
    /// Built-in config name or config.json path.
    #[arg(long, value_name = "NAME")]
    config: String,
    /// Output folder (must not exist or be empty; written atomically).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage dtype of the weights (default: the config's torch_dtype).
    #[arg(long)]
    dtype: Option<InitDType>,
    /// Largest shard in MiB; larger checkpoints are sharded with model.safetensors.index.json.
    #[arg(long, default_value_t = 4096)]
    shard_size_mib: u64,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Args)]
struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Token ids, comma separated.
    #[arg(long, value_name = "IDS", value_delimiter = ',', required = true)]
    tokens: Vec<i64>,
    /// Run the first N tokens as one prefill, then the rest one at a time through the cache.
    #[arg(long, value_name = "N")]
    decode_from: Option<usize>,
    /// Output file: .npy or .safetensors (tensor `logits`), f32 [T, vocab].
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Prompt token ids, comma separated.
    #[arg(
        long,
        value_name = "IDS",
        value_delimiter = ',',
        conflicts_with = "prompt",
        required_unless_present = "prompt"
    )]
    tokens: Vec<i64>,
    /// Prompt text (needs tokenizer.json in the model folder).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = no limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep going after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Text,
    Dot,
}

#[derive(Args)]
struct GraphArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
    format: GraphFormat,
    /// Write to a file instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Prefill,
    Decode,
}

#[derive(Args)]
struct CompileArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Which step to compile: a prefill of many tokens or a one-token decode step.
    #[arg(long, value_enum, default_value_t = ModeArg::Prefill)]
    mode: ModeArg,
    /// Only the cleanup passes (no fusion).
    #[arg(long)]
    no_fuse: bool,
    /// Format of the weight GEMMs (fp8: E4M3 with block scales).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Bf16)]
    precision: PrecisionArg,
    /// Write the graph after every pass (text and DOT, numbered) into DIR.
    #[arg(long, value_name = "DIR")]
    dump: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
    /// Tokens of the step for the memory plan: prefill length, or the decode context.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Prefill lengths at batch 1 (default 4096,16384; 128,512 on the reference device).
    #[arg(long, value_delimiter = ',')]
    prefill: Vec<usize>,
    /// Decode batch sizes (default 1,64; 1,8 on the reference device).
    #[arg(long, value_delimiter = ',')]
    decode_batch: Vec<usize>,
    /// Tokens of context before decoding (default 2048; 128 on the reference device).
    #[arg(long)]
    context: Option<usize>,
    /// Timed decode steps (median reported).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Timed repetitions of each prefill.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also write the figures as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn debug_level() -> u32 {
    std::env::var("RINGJIT_DEBUG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").unwrap());
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

fn load(model: &ModelArgs, device: &DeviceArgs) -> Result<(LoadedModel, Engine)> {
    let dev = Device::parse(&device.device)?;
    let pb = spinner("loading model");
    let m = LoadedModel::load(&model.spec())?;
    if debug_level() >= 1 {
        pb.suspend(|| {
            eprintln!("ringjit: {} on device {dev}", m.source);
            if let Ok(n) = m.param_count() {
                eprintln!("ringjit: {n} parameters, {} graph nodes", m.model.graph.node_count());
            }
            if !m.model.unused_config_keys.is_empty() {
                eprintln!(
                    "ringjit: config keys not used: {}",
                    m.model.unused_config_keys.join(", ")
                );
            }
        });
    }
    pb.finish_and_clear();
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("loading weights {bar:30} {bytes}/{total_bytes} ({eta})").unwrap());
    let opts = runtime::EngineOptions {
        fuse: !device.no_fuse,
        precision: device.precision.get(),
    };
    let e = Engine::with_options(&m, dev, &opts, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    Ok((m, e))
}

/// Write `bytes` to `path` atomically: a temporary file beside it, then a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let res = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("writing {}", path.display()))
}

/// A little-endian f32 .npy file (format 1.0).
fn npy_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn safetensors_bytes(name: &str, shape: &[usize], data: &[f32]) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)?;
    Ok(safetensors::tensor::serialize([(name, view)], None)?)
}

fn cmd_init(a: InitArgs) -> Result<()> {
    let mut config = runtime::model::resolve_config(&a.config)?;
    runtime::model::apply_overrides(&mut config, &a.overrides)?;
    let dtype = match a.dtype {
        Some(InitDType::F32) => DType::F32,
        Some(InitDType::Bf16) => DType::BF16,
        None => config
            .get("torch_dtype")
            .and_then(|v| v.as_str())
            .and_then(DType::from_torch)
            .unwrap_or(DType::BF16),
    };
    if dtype == DType::F16 {
        bail!("f16 checkpoints are not written; choose --dtype f32 or bf16");
    }
    if let Some(o) = config.as_object_mut() {
        o.insert(
            "torch_dtype".into(),
            serde_json::Value::String(if dtype == DType::F32 { "float32" } else { "bfloat16" }.into()),
        );
    }
    let model = runtime::model::build_model(&config, None)?;
    let params = model.graph.params().map_err(|e| anyhow!(e))?;
    let total: u64 = params
        .iter()
        .map(|p| {
            (p.numel()
                * if p.dtype == DType::F32 && p.name.ends_with("expert_bias") {
                    4
                } else {
                    dtype.size_bytes()
                }) as u64
        })
        .sum();
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("writing {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})").unwrap(),
    );
    let mut progress = |done: u64, _total: u64| pb.set_position(done);
    ir::checkpoint::write_checkpoint(
        &a.out,
        &config,
        &params,
        a.seed,
        dtype,
        a.shard_size_mib << 20,
        &mut progress,
    )?;
    pb.finish_and_clear();
    let n: usize = params.iter().map(|p| p.numel()).sum();
    eprintln!(
        "wrote {} ({} parameters, {}, {:.1} MB)",
        a.out.display(),
        n,
        dtype,
        total as f64 / 1e6
    );
    Ok(())
}

fn cmd_forward(a: ForwardArgs) -> Result<()> {
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext != "npy" && ext != "safetensors" {
        bail!("--out {}: the file must end in .npy or .safetensors", a.out.display());
    }
    let (_m, engine) = load(&a.model, &a.device)?;
    let t0 = Instant::now();
    let logits = engine.forward(&a.tokens, a.decode_from)?;
    let secs = t0.elapsed().as_secs_f64();
    let data = logits.as_f32().expect("logits are f32");
    let bytes = if ext == "npy" {
        npy_bytes(&logits.shape, data)
    } else {
        safetensors_bytes("logits", &logits.shape, data)?
    };
    write_atomic(&a.out, &bytes)?;
    eprintln!(
        "wrote {} f32{:?} ({} tokens in {:.3} s on {})",
        a.out.display(),
        logits.shape,
        a.tokens.len(),
        secs,
        engine.device
    );
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let (m, engine) = load(&a.model, &a.device)?;
    let tokenizer = match &m.tokenizer {
        Some(p) => Some(tokenizers::Tokenizer::from_file(p).map_err(|e| anyhow!("{}: {e}", p.display()))?),
        None => None,
    };
    let prompt: Vec<i64> = match (&a.prompt, &tokenizer) {
        (Some(text), Some(tok)) => {
            let enc = tok
                .encode(text.as_str(), false)
                .map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
            enc.get_ids().iter().map(|&i| i as i64).collect()
        }
        (Some(_), None) => bail!(
            "--prompt needs a tokenizer, and {} has no tokenizer.json; give token ids with --tokens",
            m.source
        ),
        (None, _) => a.tokens.clone(),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
    };
    if !(0.0..=1.0).contains(&a.top_p) || a.top_p == 0.0 {
        bail!("--top-p must be in (0, 1]");
    }
    if a.temperature < 0.0 {
        bail!("--temperature must be >= 0");
    }
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(a.model.seed);
    let eos = if a.ignore_eos { None } else { m.eos_token() };
    let mut state = engine.new_state(1)?;
    let mut out = std::io::stdout().lock();
    let t0 = Instant::now();
    let logits = engine.step(&mut state, &prompt, prompt.len())?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let v = engine.vocab;
    let last = &logits.as_f32().unwrap()[(prompt.len() - 1) * v..];
    let mut next = sample(last, &sampling, &mut rng) as i64;
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let t1 = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        generated.push(next as u32);
        match &tokenizer {
            Some(tok) => {
                let text = tok.decode(&generated, true).unwrap_or_default();
                if text.len() > printed.len() && text.starts_with(&printed) {
                    write!(out, "{}", &text[printed.len()..])?;
                    printed = text;
                }
            }
            None => write!(out, "{}{next}", if n > 1 { " " } else { "" })?,
        }
        out.flush()?;
        if n >= a.max_new_tokens || Some(next) == eos {
            break;
        }
        let l = engine.step(&mut state, &[next], 1)?;
        next = sample(l.as_f32().unwrap(), &sampling, &mut rng) as i64;
    }
    writeln!(out)?;
    out.flush()?;
    let decode_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "prefill {} tokens in {:.3} s ({:.1} tok/s); generated {n} tokens in {:.3} s ({:.1} tok/s) on {}",
        prompt.len(),
        prefill_s,
        prompt.len() as f64 / prefill_s,
        decode_s,
        n as f64 / decode_s.max(1e-9),
        engine.device
    );
    Ok(())
}

fn cmd_graph(a: GraphArgs) -> Result<()> {
    let m = LoadedModel::load(&a.model.spec())?;
    let g = &m.model.graph;
    let text = match a.format {
        GraphFormat::Text => g.to_text(),
        GraphFormat::Dot => g.to_dot(),
    };
    match a.out {
        Some(p) => write_atomic(&p, text.as_bytes())?,
        None => print!("{text}"),
    }
    Ok(())
}

fn cmd_compile(a: CompileArgs) -> Result<()> {
    let t0 = Instant::now();
    let m = LoadedModel::load(&a.model.spec())?;
    let mode = match a.mode {
        ModeArg::Prefill => passes::Mode::Prefill,
        ModeArg::Decode => passes::Mode::Decode,
    };
    let opts = passes::CompileOptions {
        mode,
        fuse: !a.no_fuse,
        precision: a.precision.get(),
        dump_dir: a.dump.clone(),
        ..Default::default()
    };
    let (g, report) = passes::compile(&m.model.graph, &opts)?;
    // one whole step of the model: every non-view op its own kernel, against the partition of
    // the compiled graph; the arena at a representative size of the step
    let before = passes::partition::partition_unfused_count(&m.model.graph);
    let kplan = passes::partition::partition(&g).map_err(|e| anyhow!("kernel partition: {e}"))?;
    let counts = kplan.counts();
    let (seq, past) = match mode {
        passes::Mode::Prefill => (a.tokens, 0),
        passes::Mode::Decode => (1, a.tokens),
    };
    let env: ir::DimEnv = [
        ("batch".to_string(), 1),
        ("seq".to_string(), seq as i64),
        ("past".to_string(), past as i64),
    ]
    .into();
    let mem = passes::memplan::plan(&kplan, &env).map_err(|e| anyhow!("memory plan: {e}"))?;
    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
    println!(
        "{} ({} mode, {}): {} graph nodes -> {} after the passes",
        m.source,
        mode.name(),
        a.precision.get().name(),
        m.model.graph.node_count(),
        g.node_count()
    );
    println!("{:<28} {:>10} {:>8} {:>8}", "pass", "ms", "nodes", "after");
    for p in &report.passes {
        println!(
            "{:<28} {:>10.1} {:>8} {:>8}",
            p.name, p.ms, p.nodes_before, p.nodes_after
        );
    }
    if let Some(e) = &report.egraph {
        println!(
            "e-graph: {} nodes, {} classes, {} iterations, stopped: {}{}; cost {:.0} -> {:.0} us",
            e.nodes,
            e.classes,
            e.iterations,
            e.stop_reason,
            e.fell_back
                .as_ref()
                .map(|f| format!(" (fell back: {f})"))
                .unwrap_or_default(),
            e.cost_before_us,
            e.cost_after_us
        );
    }
    for fam in ["scan", "fp8", "moe", "fuse"] {
        let rules: Vec<String> = report
            .rules_fired
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{fam}-")))
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        println!(
            "{fam:<5} {}",
            if rules.is_empty() {
                "-".to_string()
            } else {
                rules.join(", ")
            }
        );
    }
    let layers = m
        .config
        .get("num_hidden_layers")
        .and_then(|v| v.as_u64())
        .unwrap_or(1)
        .max(1) as f64;
    println!(
        "kernels per step: {before} unfused -> {} ({:.1} per layer; {} loop, {} template, {} scan)",
        counts.total,
        counts.total as f64 / layers,
        counts.loops,
        counts.templates,
        counts.scans
    );
    println!(
        "arena peak: {:.2} MiB at batch 1, seq {seq}, past {past}",
        mem.arena_peak_bytes as f64 / (1u64 << 20) as f64
    );
    println!("compile time {compile_ms:.0} ms");
    if let Some(d) = &a.dump {
        std::fs::write(d.join("kernels.txt"), kplan.to_text()).with_context(|| format!("writing {}", d.display()))?;
        println!("dumped every pass into {}", d.display());
    }
    if let Some(path) = &a.report {
        let mut j = report.to_json();
        j["compile_ms"] = compile_ms.into();
        j["model"] = m.source.clone().into();
        j["nodes"] = serde_json::json!({"before": m.model.graph.node_count(), "after": g.node_count()});
        j["kernels"] = serde_json::json!({"before": before, "after": counts.total, "by_kind": counts.by_kind});
        j["arena_peak_bytes"] = mem.arena_peak_bytes.into();
        j["arena_env"] = serde_json::json!({"batch": 1, "seq": seq, "past": past});
        write_atomic(path, serde_json::to_string_pretty(&j)?.as_bytes())?;
    }
    Ok(())
}

fn cmd_ptx(a: PtxArgs) -> Result<()> {
    let m = LoadedModel::load(&a.model.spec())?;
    let mode = match a.mode {
        ModeArg::Prefill => passes::Mode::Prefill,
        ModeArg::Decode => passes::Mode::Decode,
    };
    let opts = passes::CompileOptions {
        mode,
        precision: a.precision.get(),
        ..Default::default()
    };
    let (g, _) = passes::compile(&m.model.graph, &opts)?;
    let kplan = passes::partition::partition(&g).map_err(|e| anyhow!("kernel partition: {e}"))?;
    let popts = codegen::ptx::PtxOptions {
        dump_llvm_ir: debug_level() >= 4,
        ..Default::default()
    };
    let mut kernels = codegen::ptx::compile_plan(&kplan, &popts)?;
    if let Some(name) = &a.kernel {
        kernels.retain(|k| &k.name == name);
        if kernels.is_empty() {
            bail!("no loop or template kernel named {name} (see `ringjit compile --dump DIR`, kernels.txt)");
        }
    }
    if let Some(d) = &a.out {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    for k in &kernels {
        if debug_level() >= 4 {
            if let Some(ir) = &k.llvm_ir {
                eprintln!("; ---- LLVM IR of {} ----\n{ir}", k.name);
            }
        }
        if debug_level() >= 5 {
            eprintln!("// ---- PTX of {} ----\n{}", k.name, k.ptx);
        }
        if let Some(d) = &a.out {
            write_atomic(&d.join(format!("{}.ptx", k.name)), k.ptx.as_bytes())?;
        } else if !a.ptxas {
            println!("{}", k.ptx);
        }
    }
    if a.ptxas {
        println!(
            "{:<40} {:<8} {:>5} {:>10} {:>12} {:>12}",
            "kernel", "arch", "regs", "smem", "spill st", "spill ld"
        );
        let mut bad = 0;
        for k in &kernels {
            match codegen::ptxas::check(&k.ptx) {
                Ok(r) => {
                    for e in &r.kernels {
                        println!(
                            "{:<40} {:<8} {:>5} {:>10} {:>12} {:>12}",
                            e.name, r.arch, e.registers, e.shared_bytes, e.spill_stores, e.spill_loads
                        );
                    }
                }
                Err(e) => {
                    bad += 1;
                    eprintln!("{}: {e}", k.name);
                }
            }
        }
        if bad > 0 {
            bail!("ptxas rejected {bad} of {} kernels", kernels.len());
        }
    }
    if let Some(d) = &a.out {
        println!("wrote {} kernels into {}", kernels.len(), d.display());
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let (m, engine) = load(&a.model, &a.device)?;
    let reference = engine.device == Device::Reference;
    let cfg = BenchConfig {
        prefill: if a.prefill.is_empty() {
            if reference {
                vec![128, 512]
            } else {
                vec![4096, 16384]
            }
        } else {
            a.prefill.clone()
        },
        decode_batch: if a.decode_batch.is_empty() {
            if reference {
                vec![1, 8]
            } else {
                vec![1, 64]
            }
        } else {
            a.decode_batch.clone()
        },
        context: a.context.unwrap_or(if reference { 128 } else { 2048 }),
        steps: a.steps,
        repeats: a.repeats,
        seed: a.model.seed,
    };
    let device_name = match engine.device {
        Device::Reference | Device::Cpu => bench::cpu_name(),
        Device::Cuda => "cuda".into(),
    };
    let pb = spinner("benchmark");
    let report = bench::run(&engine, &cfg, &mut |what| pb.set_message(what.to_string()))?;
    pb.finish_and_clear();
    let params = m.param_count().unwrap_or(0);
    println!(
        "ringjit bench: {} on {} [{}], {} parameters",
        m.source, engine.device, device_name, params
    );
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>14}",
        "what", "median", "min", "max", "tokens/s"
    );
    for p in &report.prefill {
        println!(
            "{:<28} {:>10.3} s {:>10.3} s {:>10.3} s {:>14.1}",
            format!("prefill {} tok, batch 1", p.tokens),
            p.seconds.median,
            p.seconds.min,
            p.seconds.max,
            p.tokens_per_s
        );
    }
    for d in &report.decode {
        println!(
            "{:<28} {:>9.2} ms {:>9.2} ms {:>9.2} ms {:>14.1}",
            format!("decode batch {} @ {} ctx", d.batch, d.context),
            d.seconds.median * 1e3,
            d.seconds.min * 1e3,
            d.seconds.max * 1e3,
            d.tokens_per_s
        );
    }
    if let Some(path) = &a.json {
        let j = serde_json::json!({
            "device": engine.device.name(),
            "device_name": device_name,
            "commit": option_env!("RINGJIT_COMMIT").unwrap_or("unknown"),
            "model": m.source,
            "parameters": params,
            "context": cfg.context,
            "prefill": report.prefill.iter().map(|p| serde_json::json!({
                "tokens": p.tokens, "batch": 1, "median_s": p.seconds.median, "min_s": p.seconds.min,
                "max_s": p.seconds.max, "runs": p.seconds.n, "tokens_per_s": p.tokens_per_s})).collect::<Vec<_>>(),
            "decode": report.decode.iter().map(|d| serde_json::json!({
                "batch": d.batch, "context": d.context, "median_ms": d.seconds.median * 1e3,
                "min_ms": d.seconds.min * 1e3, "max_ms": d.seconds.max * 1e3, "steps": d.seconds.n,
                "tokens_per_s": d.tokens_per_s})).collect::<Vec<_>>(),
        });
        write_atomic(path, serde_json::to_string_pretty(&j)?.as_bytes())?;
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Init(a) => cmd_init(a),
        Cmd::Forward(a) => cmd_forward(a),
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Graph(a) => cmd_graph(a),
        Cmd::Compile(a) => cmd_compile(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Ptx(a) => cmd_ptx(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
