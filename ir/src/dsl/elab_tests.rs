//! Elaboration: compile-time evaluation, graph construction and located errors.

use super::*;
use crate::interp::{Interpreter, ParamSource};
use crate::tensor::Tensor;
use crate::ParamSpec;

struct NoParams;
impl ParamSource for NoParams {
    fn load(&self, spec: &ParamSpec) -> Result<Tensor, String> {
        Err(format!("no parameter {}", spec.name))
    }
}

fn cfg() -> serde_json::Value {
    serde_json::json!({"n": 4, "eps": 1e-6, "name": "x", "flag": true, "extra_key": [1, 2]})
}

fn elab(src: &str) -> Result<Model, DslError> {
    elaborate("t.ring", src, &cfg())
}

fn err_of(src: &str) -> String {
    match elab(src) {
        Ok(_) => panic!("expected an error for:\n{src}"),
        Err(e) => e.to_string(),
    }
}

fn run1(src: &str, inputs: Vec<(&str, Tensor)>) -> Tensor {
    let m = elab(src).unwrap_or_else(|e| panic!("{e}"));
    let it = Interpreter::new(&m.graph, &NoParams).unwrap();
    let inputs = inputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let mut out = it.run(&inputs).unwrap();
    out.remove("y").unwrap()
}

#[test]
fn compile_time_arithmetic_and_control_flow() {
    let src = r#"
        config n: int;
        dim batch;
        input x: f32[batch, n];
        fn twice(v, k = 2) { v * k }
        let total = 0;
        for i in 0..n { total = total + i; }           # 0+1+2+3 = 6
        let s = if total == 6 && n // 3 == 1 && 7 % 4 == 3 && 2 ** 3 == 8 { 1.0 } else { 100.0 };
        output "y" = twice(x, k = total) + s + min(3, n) / 2;   # x*6 + 1 + 1.5
    "#;
    let x = Tensor::from_f32(DType::F32, vec![2, 4], vec![1., 2., 3., 4., 5., 6., 7., 8.]);
    let y = run1(src, vec![("x", x)]);
    let want: Vec<f32> = (1..=8).map(|v| v as f32 * 6.0 + 2.5).collect();
    assert_eq!(y.as_f32().unwrap(), want.as_slice());
    assert_eq!(y.shape, vec![2, 4]);
}

#[test]
fn slicing_scan_and_labels() {
    // cumulative sum along axis 1 with a scan; x[..., 1:3] slicing; labels on nodes
    let src = r#"
        dim batch, seq;
        input x: f32[batch, seq, 4];
        let mid = x[..., 1:3];
        let (last, sums) = scan (acc = mid[:, 0, :] * 0.0; xt in mid; axis = 1) {
            let nxt = acc + xt;
            (nxt, nxt)
        };
        output "y" = sums;
        output "last" = last;
    "#;
    let m = elab(src).unwrap();
    assert!(
        m.graph.to_text().contains("# mid @ t.ring:4:19"),
        "{}",
        m.graph.to_text()
    );
    let x = Tensor::from_f32(DType::F32, vec![1, 3, 4], (0..12).map(|v| v as f32).collect());
    let y = run1(src, vec![("x", x)]);
    assert_eq!(y.shape, vec![1, 3, 2]);
    assert_eq!(y.as_f32().unwrap(), &[1., 2., 6., 8., 15., 18.]);
}

#[test]
fn symbolic_dims_become_values() {
    let src = r#"
        dim batch, seq, past;
        input x: i64[batch, seq];
        input cache: f32[batch, past];
        output "y" = cast(x, f32) * 0.0 + cast(arange(seq) + past, f32);
        output "c" = concat([cache, cast(x, f32)], axis = 1);
    "#;
    let m = elab(src).unwrap();
    let c = m.graph.output("c").unwrap();
    assert_eq!(
        crate::shape::shape_str(&m.graph.ty(c.value).shape),
        "[batch, past + seq]"
    );
    let y = run1(
        src,
        vec![
            ("x", Tensor::from_i64(DType::I64, vec![1, 3], vec![5, 6, 7])),
            ("cache", Tensor::from_f32(DType::F32, vec![1, 2], vec![1., 2.])),
        ],
    );
    assert_eq!(y.as_f32().unwrap(), &[2., 3., 4.]);
}

#[test]
fn errors_carry_file_line_col_and_a_caret() {
    let cases: &[(&str, &str)] = &[
        ("let a = b;", "t.ring:1:9: `b` is not defined"),
        (
            "config missing: int;",
            "t.ring:1:8: config.json has no `missing` (a required int)",
        ),
        (
            "config name: int;",
            "t.ring:1:8: config.json's `name` must be an integer, found \"x\"",
        ),
        (
            "config n: int;\nrequire n > 5, \"n is {n}\";",
            "t.ring:2:9: requirement failed: n is 4",
        ),
        (
            "dim b;\ninput x: f32[b, 3];\ninput y: f32[b, 4];\noutput \"o\" = x @ y;",
            "t.ring:4:14: matmul inner dimensions differ",
        ),
        (
            "dim b;\ninput x: f32[b, 3];\noutput \"o\" = reshape(x, [b, 4]);",
            "t.ring:3:14: cannot reshape [b, 3] into [b, 4]",
        ),
        (
            "dim b;\nparam w: f32[b] = \"w\";",
            "t.ring:2:7: parameter shapes are fixed by the config",
        ),
        (
            "dim b;\ninput x: f32[b];\nlet y = x;\ncarry y = x;",
            "t.ring:4:7: `y` is not a state",
        ),
        (
            "dim b;\ninput x: f32[b];\nstate s: f32[b] = \"s\";\noutput \"o\" = x;",
            "t.ring:3:1: state `s` (\"s\") is never carried",
        ),
        (
            "dim b;\ninput x: f32[b];\noutput \"o\" = sum(x, axis = 3);",
            "t.ring:3:21: axis 3 is out of range for rank 1",
        ),
        (
            "dim b;\ninput x: f32[b];\noutput \"o\" = sum(x, axs = 0);",
            "t.ring:3:21: `sum` has no argument `axs`",
        ),
        ("fn f(a) { f(a) }\nlet x = f(1);", "calls nested deeper than 64"),
        (
            "dim b;\ninput x: f32[b];\nlet y = if x { 1 } else { 2 };",
            "t.ring:3:12: `if` decides at compile time",
        ),
        (
            "let x = 1;\nlet (a, b) = x;",
            "t.ring:2:5: cannot destructure an integer into 2 names",
        ),
        (
            "param w: f32[2] = \"a.{e}\" for e in 0..3;",
            "t.ring:1:7: stacked parameter's leading dim 2 must equal its count 3",
        ),
        (
            "param w: f32[2] = \"a.{q}\";",
            "t.ring:1:19: `q` in \"a.{q}\" is not defined",
        ),
        (
            "dim b;\ninput x: f32[b];\noutput \"o\" = x;\noutput \"o\" = x;",
            "t.ring:4:1: output \"o\" is written twice",
        ),
        ("let x = 1 / 0;", "t.ring:1:9: division by zero"),
    ];
    for (src, want) in cases {
        let e = err_of(src);
        assert!(e.contains(want), "for {src:?}\n  got:  {e}\n  want: {want}");
        if e.starts_with("t.ring:") {
            assert!(e.contains("\n  ") && e.contains('^'), "no caret line: {e}");
        }
    }
    // parse errors come through with their location too
    let e = err_of("let x = ;");
    assert!(e.starts_with("t.ring:1:9: expected"), "{e}");
}

#[test]
fn unused_config_keys_are_reported_not_rejected() {
    let m = elab("config n: int;\ndim b;\ninput x: f32[b];\noutput \"o\" = x;").unwrap();
    assert_eq!(m.unused_config_keys, vec!["eps", "extra_key", "flag", "name"]);
}

#[test]
fn stacked_params_are_one_node() {
    let src = r#"
        config n: int;
        dim b;
        input x: f32[b, 2];
        for l in 0..2 {
            param w: f32[n, 2, 2] = "layers.{l}.experts.{e}.w" for e in 0..n;
            output "o{l}" = x @ w;
        }
    "#;
    let m = elab(src).unwrap();
    let params = m.graph.params().unwrap();
    assert_eq!(params.len(), 2);
    assert_eq!(params[0].name, "layers.0.experts.{e}.w");
    assert_eq!(params[0].member_names()[3], "layers.0.experts.3.w");
    assert_eq!(params[0].shape, vec![4, 2, 2]);
}
