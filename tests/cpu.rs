//! The Cranelift CPU device end to end against the reference interpreter: whole tiny and small
//! models in f32 compute (`ringjit_compute_dtype=float32`, the f32 model tier), prefill then
//! decode through the state, without fusion (scan kernels), and greedy generation token for
//! token.

use crate::common::*;
use ir::tol::{check, Tol};
use runtime::model::{LoadedModel, ModelSpec};
use runtime::sample::argmax;
use runtime::{Device, Engine, EngineOptions};

fn load(name: &str, f32_compute: bool) -> LoadedModel {
    let overrides = if f32_compute {
        vec!["ringjit_compute_dtype=float32".to_string()]
    } else {
        Vec::new()
    };
    LoadedModel::load(&ModelSpec {
        config: Some(name.into()),
        seed: 5,
        overrides,
        ..Default::default()
    })
    .unwrap()
}

/// Logits of a prefill of `n` tokens then decode of the rest, on both devices.
fn compare(name: &str, f32_compute: bool, t: usize, n: usize, tol: f64) {
    compare_with(name, f32_compute, &EngineOptions::default(), t, n, tol);
}

/// The same with the cpu engine compiled with `opts`.
fn compare_with(name: &str, f32_compute: bool, opts: &EngineOptions, t: usize, n: usize, tol: f64) {
    let m = load(name, f32_compute);
    let cpu = Engine::with_options(&m, Device::Cpu, opts, &|_, _| {}).unwrap();
    let reference = Engine::new(&m, Device::Reference).unwrap();
    let tokens = random_tokens(7, t, cpu.vocab);
    for decode_from in [None, Some(n)] {
        let got = cpu.forward(&tokens, decode_from).unwrap();
        let want = reference.forward(&tokens, decode_from).unwrap();
        check(
            &format!("{name} cpu vs reference, {t} tokens, decode from {decode_from:?}"),
            got.as_f32().unwrap(),
            want.as_f32().unwrap(),
            tol,
        )
        .unwrap();
    }
}

#[test]
fn the_tiny_model_on_cpu_equals_the_interpreter_in_f32() {
    compare("tiny", true, 19, 13, Tol::F32.model());
}

#[test]
fn the_tiny_model_without_fusion_on_cpu_equals_the_interpreter_in_f32() {
    // `--no-fuse`: the linear-attention recurrence stays a scan (its body runs once per
    // token) and the routing stays primitive top-k kernels
    let opts = EngineOptions {
        fuse: false,
        ..Default::default()
    };
    compare_with("tiny", true, &opts, 11, 7, Tol::F32.model());
}

#[test]
fn the_small_model_on_cpu_equals_the_interpreter_in_f32() {
    compare("small", true, 9, 6, Tol::F32.model());
}

#[test]
fn greedy_generation_on_cpu_equals_the_interpreter_in_f32() {
    let m = load("tiny", true);
    let prompt = random_tokens(3, 5, 256);
    let mut outs = Vec::new();
    for device in [Device::Cpu, Device::Reference] {
        let e = Engine::new(&m, device).unwrap();
        let mut st = e.new_state(1).unwrap();
        let mut logits = e.step(&mut st, &prompt, prompt.len()).unwrap();
        let mut got = Vec::new();
        for _ in 0..12 {
            let v = logits.as_f32().unwrap();
            let last = &v[v.len() - e.vocab..];
            let next = argmax(last) as i64;
            got.push(next);
            logits = e.step(&mut st, &[next], 1).unwrap();
        }
        outs.push(got);
    }
    assert_eq!(outs[0], outs[1], "cpu vs reference greedy tokens");
}

#[test]
fn auto_picks_the_cpu_device() {
    assert_eq!(Device::parse("auto").unwrap(), Device::Cpu);
    assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
}

#[test]
fn the_cli_generates_the_same_tokens_on_cpu_and_reference() {
    let run = |device: &str| {
        let out = run_ok(ringjit().args([
            "generate",
            "--config",
            "tiny",
            "--tokens",
            "1,2,3",
            "--max-new-tokens",
            "8",
            "--device",
            device,
        ]));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run("cpu"), run("reference"));
}

/// The template kernels' f32 forms of the weights are shared between the plans of a model:
/// a second plan over the same parameter cache converts nothing (the cache does not grow) and
/// computes exactly what the first did.
#[test]
fn plans_of_one_model_share_their_converted_weights() {
    use runtime::cpu::{CpuExec, ParamCache, Pool};
    let m = load("small", false);
    let opts = passes::CompileOptions {
        mode: passes::Mode::Prefill,
        ..Default::default()
    };
    let (g, _) = passes::compile(&m.model.graph, &opts).unwrap();
    let pool = std::sync::Arc::new(Pool::all_cores().unwrap());
    let mut cache = ParamCache::default();
    let a = CpuExec::new(&g, &m.weights, &mut cache, pool.clone()).unwrap();
    let b = CpuExec::new(&g, &m.weights, &mut cache, pool).unwrap();
    let env: ir::DimEnv = [("batch", 1), ("seq", 9), ("past", 0)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let inputs = passes::testing::random_inputs(&g, &env, 3, 0.5, 200);
    assert!(cache.converted.is_empty());
    let first = a.run(&inputs).unwrap();
    let held = cache.converted.len();
    assert!(held > 0, "no weight was converted");
    let second = b.run(&inputs).unwrap();
    assert_eq!(cache.converted.len(), held, "the second plan converted weights again");
    for (name, t) in &first {
        assert_eq!(t.to_bytes(), second[name].to_bytes(), "output {name}");
    }
}

/// The GEMMs that normalise their rows first (`fold-norm-gemm`) at model widths, as the GPU
/// test runs them (`common::FOLDED_NORM_CASES`), on the cpu backend against the interpreter.
#[test]
fn folded_norm_gemms_on_cpu_match_the_interpreter() {
    use crate::common::{assert_folded_norm_outputs, folded_norm_case, FOLDED_NORM_CASES};
    use runtime::cpu::{CpuExec, ParamCache, Pool};
    let pool = std::sync::Arc::new(Pool::all_cores().unwrap());
    let empty = std::collections::HashMap::new();
    let table = crate::common::Table(&empty);
    for (n, (rows, k)) in FOLDED_NORM_CASES.into_iter().enumerate() {
        let (graph, inputs) = folded_norm_case(rows, k, 90 + n as u64);
        let what = format!("{rows} rows of {k} on cpu");
        let exec = CpuExec::new(&graph, &table, &mut ParamCache::default(), pool.clone()).unwrap();
        let got = exec.run(&inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        let want = ir::interp::Interpreter::new(&graph, &table)
            .unwrap()
            .run(&inputs)
            .unwrap();
        assert_folded_norm_outputs(&got, &want, &what);
    }
}
