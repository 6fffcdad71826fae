//! The `ringjit` binary: every command end to end, and every kind of bad input giving a named
//! error (exit code 1, no panic).

use crate::common::*;
use ir::tol::{check, Tol};
use runtime::model::{LoadedModel, ModelSpec};
use runtime::{Device, Engine};

#[test]
fn generate_streams_tokens_on_the_tiny_config() {
    let out = run_ok(ringjit().args([
        "generate",
        "--config",
        "tiny",
        "--tokens",
        "1,2,3",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<i64> = stdout.split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(ids.len(), 8, "{stdout}");
    assert!(ids.iter().all(|&t| (0..256).contains(&t)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tok/s"), "{stderr}");

    // greedy generation is the argmax chain of the library's own forward
    let m = LoadedModel::load(&ModelSpec {
        config: Some("tiny".into()),
        ..Default::default()
    })
    .unwrap();
    let e = Engine::new(&m, Device::Reference).unwrap();
    let mut seq = vec![1i64, 2, 3];
    for &want in &ids {
        let l = e.forward(&seq, None).unwrap();
        let last = &l.as_f32().unwrap()[(seq.len() - 1) * e.vocab..];
        assert_eq!(runtime::sample::argmax(last) as i64, want);
        seq.push(want);
    }

    // sampling is seeded: same seed, same tokens
    let args = [
        "generate",
        "--config",
        "tiny",
        "--tokens",
        "5",
        "--max-new-tokens",
        "6",
        "--temperature",
        "1.0",
        "--top-k",
        "20",
        "--ignore-eos",
        "--seed",
        "4",
    ];
    let a = run_ok(ringjit().args(args));
    let b = run_ok(ringjit().args(args));
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn forward_writes_npy_and_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("l.npy");
    run_ok(
        ringjit()
            // the reference device, to compare bit for bit with the library below
            .args([
                "forward",
                "--config",
                "tiny",
                "--tokens",
                "3,17,5,9",
                "--device",
                "reference",
                "--out",
            ])
            .arg(&npy),
    );
    let (shape, data) = read_npy(&npy);
    assert_eq!(shape, vec![4, 256]);
    let m = LoadedModel::load(&ModelSpec {
        config: Some("tiny".into()),
        ..Default::default()
    })
    .unwrap();
    let e = Engine::new(&m, Device::Reference).unwrap();
    let lib = e.forward(&[3, 17, 5, 9], None).unwrap();
    assert_eq!(data, lib.as_f32().unwrap());

    let st = tmp.path().join("l.safetensors");
    run_ok(
        ringjit()
            .args([
                "forward",
                "--config",
                "tiny",
                "--tokens",
                "3,17,5,9",
                "--decode-from",
                "2",
                "--out",
            ])
            .arg(&st),
    );
    let bytes = std::fs::read(&st).unwrap();
    let f = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = f.tensor("logits").unwrap();
    assert_eq!(t.shape(), &[4, 256]);
    let dec: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    check(
        "decode-from 2 vs forward",
        &dec,
        lib.as_f32().unwrap(),
        Tol::F32.model(),
    )
    .unwrap();
}

#[test]
fn init_writes_a_checkpoint_that_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    run_ok(
        ringjit()
            .args(["init", "--config", "tiny", "--seed", "4", "--out"])
            .arg(&dir),
    );
    assert!(dir.join("config.json").exists() && dir.join("model.safetensors").exists());
    // same seed: the checkpoint computes what the in-memory random weights compute
    let a = tmp.path().join("a.npy");
    let b = tmp.path().join("b.npy");
    run_ok(
        ringjit()
            .args(["forward", "--model"])
            .arg(&dir)
            .args(["--tokens", "1,2,3", "--out"])
            .arg(&a),
    );
    run_ok(
        ringjit()
            .args([
                "forward", "--config", "tiny", "--seed", "4", "--tokens", "1,2,3", "--out",
            ])
            .arg(&b),
    );
    assert_eq!(read_npy(&a), read_npy(&b));
    // writing over an existing checkpoint is refused and loses nothing
    let e = run_err(ringjit().args(["init", "--config", "tiny", "--out"]).arg(&dir));
    assert!(e.contains("not empty") || e.contains("exists"), "{e}");
    assert!(dir.join("model.safetensors").exists());
    // bf16, sharded
    let dir2 = tmp.path().join("bf16");
    run_ok(
        ringjit()
            .args([
                "init",
                "--config",
                "tiny",
                "--dtype",
                "bf16",
                "--shard-size-mib",
                "0",
                "--out",
            ])
            .arg(&dir2),
    );
    assert!(dir2.join("model.safetensors.index.json").exists());
    run_ok(
        ringjit()
            .args(["forward", "--model"])
            .arg(&dir2)
            .args(["--tokens", "7", "--out"])
            .arg(tmp.path().join("c.npy")),
    );
}

#[test]
fn mismatched_checkpoints_name_every_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    run_ok(ringjit().args(["init", "--config", "tiny", "--out"]).arg(&dir));
    // the config now says a wider intermediate size than the weights have
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = 96.into();
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let e = run_err(
        ringjit()
            .args(["forward", "--model"])
            .arg(&dir)
            .args(["--tokens", "1", "--out"])
            .arg(tmp.path().join("x.npy")),
    );
    for name in [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ] {
        assert!(e.contains(name), "{name} not named in: {e}");
    }
    assert!(e.contains("96"), "{e}");

    // a truncated weights file
    cfg["intermediate_size"] = 128.into();
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let st = dir.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    f.set_len(len / 2).unwrap();
    let e = run_err(
        ringjit()
            .args(["forward", "--model"])
            .arg(&dir)
            .args(["--tokens", "1", "--out"])
            .arg(tmp.path().join("x.npy")),
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.npy");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["forward", "--config", "nope", "--tokens", "1"],
            "unknown config `nope`",
        ),
        (
            vec!["forward", "--config", "tiny", "--tokens", "1", "--device", "cuda"],
            "--device cuda",
        ),
        (
            vec!["forward", "--config", "tiny", "--tokens", "999"],
            "token id 999 is outside the vocabulary",
        ),
        (
            vec!["forward", "--config", "tiny", "--tokens", "1,2", "--decode-from", "3"],
            "--decode-from 3",
        ),
        (
            vec!["forward", "--config", "tiny", "--tokens", "1", "--set", "n_group=3"],
            "requirement failed",
        ),
        (
            vec!["generate", "--config", "tiny", "--prompt", "hello"],
            "needs a tokenizer",
        ),
        (
            vec!["forward", "--model", "/nonexistent/dir", "--tokens", "1"],
            "/nonexistent/dir",
        ),
    ];
    for (args, expect) in cases {
        let mut cmd = ringjit();
        cmd.args(&args);
        if args[0] == "forward" {
            cmd.arg("--out").arg(&out);
        }
        let e = run_err(&mut cmd);
        assert!(e.contains(expect), "{args:?}: expected `{expect}` in: {e}");
    }
    assert!(!out.exists(), "a failed run must not leave an output file");

    // a malformed model definition: file:line:col and a caret
    let bad = tmp.path().join("bad.ring");
    std::fs::write(&bad, "config vocab_size: int;\nlet x = (1 + ;\n").unwrap();
    let e = run_err(ringjit().args(["graph", "--config", "tiny", "--model-def"]).arg(&bad));
    assert!(e.contains(&format!("{}:2:14: expected", bad.display())), "{e}");
    assert!(e.contains('^'), "{e}");
}

#[test]
fn graph_and_bench_commands() {
    let out = run_ok(ringjit().args(["graph", "--config", "tiny"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("scan") && text.contains("output \"logits\""),
        "{}",
        &text[..text.len().min(400)]
    );
    assert!(
        text.contains("models/ring_linear.ring:"),
        "nodes carry their DSL location"
    );
    let out = run_ok(ringjit().args(["graph", "--config", "tiny", "--format", "dot"]));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("digraph"));

    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("b.json");
    let out = run_ok(
        ringjit()
            .args([
                "bench",
                "--config",
                "tiny",
                "--prefill",
                "8",
                "--decode-batch",
                "1,2",
                "--context",
                "4",
                "--steps",
                "2",
                "--repeats",
                "1",
                "--json",
            ])
            .arg(&json),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("prefill 8 tok") && table.contains("decode batch 2"),
        "{table}"
    );
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["decode"].as_array().unwrap().len(), 2);
    assert!(j["prefill"][0]["tokens_per_s"].as_f64().unwrap() > 0.0);

    let help = run_ok(ringjit().arg("--help"));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config NAME"));
}

#[test]
fn generate_with_a_tokenizer_streams_text() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    run_ok(ringjit().args(["init", "--config", "tiny", "--out"]).arg(&dir));
    // a word-level tokenizer over the tiny vocabulary: "w0" .. "w255"
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256).map(|i| (format!("w{i}"), i.into())).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok).unwrap()).unwrap();
    let out = run_ok(ringjit().args(["generate", "--model"]).arg(&dir).args([
        "--prompt",
        "w1 w2 w3",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words.len(), 5, "{text}");
    assert!(words.iter().all(|w| w.starts_with('w')), "{text}");
    // the same continuation as the token-id prompt (printed as text: the folder has a tokenizer)
    let by_ids = run_ok(ringjit().args(["generate", "--model"]).arg(&dir).args([
        "--tokens",
        "1,2,3",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
    ]));
    assert_eq!(text, String::from_utf8_lossy(&by_ids.stdout));
}

#[test]
fn compile_reports_rules_kernels_and_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("r.json");
    let dump = tmp.path().join("dump");
    for mode in ["prefill", "decode"] {
        let out = run_ok(
            ringjit()
                .args(["compile", "--config", "tiny", "--mode", mode, "--report"])
                .arg(&report)
                .arg("--dump")
                .arg(&dump),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("kernels per step") && text.contains("arena peak"),
            "{text}"
        );
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(j["mode"], mode);
        let fired = j["rules_fired"].as_object().unwrap();
        assert!(fired.keys().any(|k| k.starts_with("fuse-")), "{fired:?}");
        let (before, after) = (
            j["kernels"]["before"].as_u64().unwrap(),
            j["kernels"]["after"].as_u64().unwrap(),
        );
        assert!(
            after < before,
            "fusion must reduce the kernel count: {before} -> {after}"
        );
        assert!(j["arena_peak_bytes"].as_u64().unwrap() > 0);
        assert!(j["compile_ms"].as_f64().unwrap() > 0.0);
        // one numbered dump per pass, neighbours diffable
        assert!(dump.join("00-input.txt").exists() && dump.join("kernels.txt").exists());
    }
    // --no-fuse runs only the cleanup passes
    run_ok(
        ringjit()
            .args(["compile", "--config", "tiny", "--no-fuse", "--report"])
            .arg(&report),
    );
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(j["rules_fired"].as_object().unwrap().is_empty());
}
