//! Shared by the integration tests: where the real model and the reference Python live.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The real model, fetched by `scripts/fetch-model` (the test command runs it).
pub fn real_model() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model (scripts/test does)",
        p.display()
    );
    p
}

/// The Python with numpy and gguf that the reference scripts need: `$PARE_PYTHON` (set by
/// scripts/test), else the repo's .venv.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PARE_PYTHON") {
        return p.into();
    }
    let venv = root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python environment for the reference scripts: run scripts/test (it creates .venv)"
    );
    venv
}

/// Runs a script from scripts/ with the reference Python; panics with its stderr on failure.
pub fn run_script(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(root().join("scripts").join(script))
        .args(args)
        .output()
        .expect("starting the reference Python");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The repo's copy of an evaluation text the peer fixtures were made from (the fixture names the
/// peer's path; the file name is the same).
pub fn data_file(fixture_path: &str) -> PathBuf {
    let name = Path::new(fixture_path).file_name().expect("a file name");
    root().join("data").join(name)
}

/// Logits of the float64 numpy reference (scripts/reference_forward.py) for each case of token
/// ids: one row of n_vocab values per position.
pub fn reference_logits(model: &Path, cases: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ref.json");
    let mut args = vec![model.to_str().unwrap().to_string()];
    for c in cases {
        args.push("--tokens".into());
        args.push(
            c.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    args.push("--out".into());
    args.push(out.to_str().unwrap().into());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run_script("reference_forward.py", &args);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| serde_json::from_value(c["logits"].clone()).unwrap())
        .collect()
}

/// Logits of each token decoded one at a time (one forward call per token, `Logits::Last`).
pub fn decode_logits(model: &pare::model::Model, toks: &[u32]) -> Vec<Vec<f32>> {
    use pare::model::{Logits, State};
    let mut st = State::new(model, toks.len()).unwrap();
    toks.iter()
        .map(|&t| {
            model.forward(&mut st, &[t], Logits::Last).unwrap();
            st.logits.clone()
        })
        .collect()
}

/// Writes a small random GGUF (scripts/make_synthetic_model.py) into `dir` and returns its path.
pub fn synthetic_model(dir: &Path, arch: &str, ty: &str, seed: u64, layers: usize) -> PathBuf {
    let path = dir.join(format!("{arch}-{ty}-s{seed}-l{layers}.gguf"));
    let (seed, layers) = (seed.to_string(), layers.to_string());
    run_script(
        "make_synthetic_model.py",
        &[
            path.to_str().unwrap(),
            "--arch",
            arch,
            "--seed",
            &seed,
            "--type",
            ty,
            "--layers",
            &layers,
        ],
    );
    path
}
