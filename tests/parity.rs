//! The interpreter against the independent numpy reference (tests/reference/ring_ref.py, written
//! from the spec alone), on the same safetensors checkpoint, in the f32 whole-model tier.

use crate::common::*;
use ir::tol::{check, rel_err, Tol};
use runtime::model::{LoadedModel, ModelSpec};
use runtime::{Device, Engine};
use std::process::Command;

fn reference_logits(dir: &std::path::Path, tokens: &[i64], decode_from: Option<usize>) -> Vec<f32> {
    let out = dir.join(format!("ref-{}.npy", decode_from.unwrap_or(0)));
    let toks: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let mut cmd = Command::new(python());
    cmd.arg(root().join("tests/reference/ring_ref.py"))
        .arg("--model")
        .arg(dir)
        .arg("--tokens")
        .arg(toks.join(","))
        .arg("--out")
        .arg(&out);
    if let Some(n) = decode_from {
        cmd.arg("--decode-from").arg(n.to_string());
    }
    run_ok(&mut cmd);
    read_npy(&out).1
}

#[test]
fn tiny_matches_numpy_reference_in_both_decay_conventions() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = random_tokens(7, 42, 256);
    let mut full_by_conv = Vec::new();
    for conv in ["A", "B"] {
        let dir = tmp.path().join(format!("tiny-{conv}"));
        let cfg = config("tiny", &[("ringjit_decay_convention", conv.into())]);
        let params = model(&cfg).graph.params().unwrap();
        ir::checkpoint::write_checkpoint(&dir, &cfg, &params, 11, ir::DType::F32, 1 << 30, &mut |_, _| {}).unwrap();

        let m = LoadedModel::load(&ModelSpec {
            dir: Some(dir.clone()),
            ..Default::default()
        })
        .unwrap();
        let engine = Engine::new(&m, Device::Reference).unwrap();
        let ours_full = engine.forward(&tokens, None).unwrap();
        let ours_dec = engine.forward(&tokens, Some(20)).unwrap();
        let ref_full = reference_logits(&dir, &tokens, None);
        let ref_dec = reference_logits(&dir, &tokens, Some(20));

        let ours_full = ours_full.as_f32().unwrap();
        check(
            &format!("forward vs reference ({conv})"),
            ours_full,
            &ref_full,
            Tol::F32.model(),
        )
        .unwrap();
        check(
            &format!("prefill+decode vs reference ({conv})"),
            ours_dec.as_f32().unwrap(),
            &ref_dec,
            Tol::F32.model(),
        )
        .unwrap();
        check(
            &format!("reference's own paths ({conv})"),
            &ref_dec,
            &ref_full,
            Tol::F32.model(),
        )
        .unwrap();
        full_by_conv.push(ours_full.to_vec());
    }
    // the switch matters: the conventions give measurably different logits
    assert!(
        rel_err(&full_by_conv[0], &full_by_conv[1]) > 1e-3,
        "decay conventions A and B agree: the switch did nothing"
    );
}

#[test]
fn sharded_bf16_checkpoint_matches_reference() {
    // bf16 storage, several shards with an index: both implementations read the same bytes
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-bf16");
    let cfg = config("tiny", &[]);
    let params = model(&cfg).graph.params().unwrap();
    ir::checkpoint::write_checkpoint(&dir, &cfg, &params, 5, ir::DType::BF16, 200_000, &mut |_, _| {}).unwrap();
    assert!(
        dir.join("model.safetensors.index.json").exists(),
        "expected a sharded checkpoint"
    );
    let tokens = random_tokens(9, 19, 256);
    // bf16 weights, f32 activations: both implementations compute on the same weights, so the
    // f32 tier applies. (With bf16 activations a near-tie in the router can pick another expert
    // than the f64 reference does; such flips are discontinuous, no tier bounds them.)
    let m = LoadedModel::load(&ModelSpec {
        dir: Some(dir.clone()),
        overrides: vec!["ringjit_compute_dtype=float32".into()],
        ..Default::default()
    })
    .unwrap();
    let engine = Engine::new(&m, Device::Reference).unwrap();
    let ours = engine.forward(&tokens, None).unwrap();
    let reference = reference_logits(&dir, &tokens, None);
    check(
        "bf16 checkpoint vs f64 reference",
        ours.as_f32().unwrap(),
        &reference,
        Tol::F32.model(),
    )
    .unwrap();
}
