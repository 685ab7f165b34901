//! Perplexity on the first 20 chunks of WikiText-2 (valid) at context 512 is within 1% of
//! llama-perplexity's on the same file and settings (tests/fixtures/llamacpp_perplexity.json),
//! through the `pare perplexity` command itself (its --json line).

mod common;

use std::process::Command;

#[test]
fn perplexity_matches_llama_cpp_within_one_percent() {
    let fixture: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::root().join("tests/fixtures/llamacpp_perplexity.json")).unwrap(),
    )
    .unwrap();
    let data = common::data_file(fixture["data"].as_str().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_pare"))
        .args(["perplexity", "-m"])
        .arg(common::real_model())
        .arg("-f")
        .arg(&data)
        .args(["--ctx", "512", "--chunks", "20", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let ppl = last["ppl"].as_f64().unwrap();
    let want = fixture["ppl"].as_f64().unwrap();
    let rel = (ppl - want).abs() / want;
    eprintln!("pare {ppl:.4} vs llama.cpp {want:.4}: {:.3}%", 100.0 * rel);
    assert_eq!(last["chunks"], 20);
    assert_eq!(last["tokens"], 20 * 255);
    assert!(
        rel < 0.01,
        "pare PPL {ppl} vs llama.cpp {want}: {:.2}% apart",
        100.0 * rel
    );
    let stderr = last["ppl_stderr"].as_f64().unwrap();
    let want_stderr = fixture["ppl_stderr"].as_f64().unwrap();
    assert!(
        (stderr - want_stderr).abs() / want_stderr < 0.05,
        "stderr {stderr} vs {want_stderr}"
    );
}
