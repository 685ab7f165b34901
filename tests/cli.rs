//! The `pare` binary end to end on small inputs: machine-readable outputs, the KL divergence flow,
//! and clear errors (never a panic) on bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn pare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pare"))
        .args(args)
        .output()
        .unwrap()
}

fn last_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a clean failure, got: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.contains(needle),
        "error should mention {needle:?}: {err}"
    );
}

fn synthetic(dir: &Path) -> String {
    let p = dir.join("llama.gguf");
    common::run_script(
        "make_synthetic_model.py",
        &[
            p.to_str().unwrap(),
            "--arch",
            "llama",
            "--seed",
            "3",
            "--type",
            "q8_0",
        ],
    );
    p.to_str().unwrap().to_string()
}

#[test]
fn perplexity_json_and_kl_divergence_flow() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(dir.path());
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(8),
    )
    .unwrap();
    let text = text.to_str().unwrap();
    let base = dir.path().join("base.kld");
    let base = base.to_str().unwrap();
    let common = ["-m", &model, "-f", text, "--ctx", "64", "--json"];

    let p = last_json(&pare(
        &[&["perplexity"][..], &common, &["--kl-base-out", base]].concat(),
    ));
    assert_eq!(p["chunks"], 5);
    assert_eq!(p["tokens"], 5 * 31);
    assert!(p["ppl"].as_f64().unwrap() > 1.0 && p["ppl_stderr"].as_f64().unwrap() > 0.0);

    // The same model against its own base: no divergence. The exact path: a small one.
    let same = last_json(&pare(
        &[&["perplexity"][..], &common, &["--kl-base", base]].concat(),
    ));
    assert!(same["kld_mean"].as_f64().unwrap() < 1e-5, "{same}");
    assert_eq!(same["same_top"], 1.0);
    assert_eq!(same["ppl"], p["ppl"]);
    let exact = last_json(&pare(
        &[
            &["perplexity"][..],
            &common,
            &["--kl-base", base, "--exact-activations"],
        ]
        .concat(),
    ));
    let kld = exact["kld_mean"].as_f64().unwrap();
    assert!(kld > 1e-6 && kld < 0.05, "{exact}");
    assert!(exact["kld_p99"].as_f64().unwrap() >= kld);

    // A base computed with another context is refused by name.
    let other = pare(&[
        "perplexity",
        "-m",
        &model,
        "-f",
        text,
        "--ctx",
        "32",
        "--kl-base",
        base,
    ]);
    fails_with(&other, "context");
}

#[test]
fn bench_json_has_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(dir.path());
    let r = last_json(&pare(&[
        "bench", "-m", &model, "-p", "64", "-n", "16", "-r", "3", "--json", "-t", "2",
    ]));
    for key in ["pp64", "tg16", "threads", "peak_rss_bytes"] {
        assert!(r.get(key).is_some(), "missing {key}: {r}");
    }
    assert_eq!(r["threads"], 2);
    assert!(r["tg16"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(dir.path());
    let bytes = std::fs::read(&model).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let t = truncated.to_str().unwrap();
    fails_with(&pare(&["run", "-m", t, "-p", "hi"]), "outside the file");
    fails_with(&pare(&["inspect", "-m", t]), "truncated");
    let text = dir.path().join("not-a-model.txt");
    std::fs::write(&text, "hello").unwrap();
    let x = text.to_str().unwrap();
    fails_with(&pare(&["bench", "-m", x]), "not a GGUF file");
    fails_with(
        &pare(&["run", "-m", "/nonexistent/model.gguf", "-p", "hi"]),
        "No such file",
    );
    fails_with(
        &pare(&["perplexity", "-m", &model, "-f", x]),
        "you need at least",
    );
    fails_with(
        &pare(&["run", "-m", &model, "-p", "hi", "--top-p", "1.5"]),
        "top",
    );
    fails_with(
        &pare(&["run", "-m", &model, "-p", "hi", "--temp=-1"]),
        "temperature",
    );
    fails_with(&pare(&["run", "-m", &model]), "prompt");
}

#[test]
fn run_generates_and_stops_at_a_stop_string() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(dir.path());
    let out = pare(&[
        "run", "-m", &model, "-p", "abc", "-n", "20", "--temp", "0", "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let text = text.trim_end_matches('\n');
    assert!(!text.is_empty());
    // Stopping at the first character of the greedy continuation prints nothing before it.
    let first: String = text.chars().take(1).collect();
    let out = pare(&[
        "run", "-m", &model, "-p", "abc", "-n", "20", "--temp", "0", "--quiet", "--stop", &first,
    ]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "\n");
}
