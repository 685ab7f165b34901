//! `pare convert` on the shipped model: a round trip through q8_0 keeps perplexity; llama.cpp loads
//! the standard-type files pare writes and measures the same perplexity on them as pare
//! (tests/fixtures/llamacpp_convert.json, made by scripts/gen-convert-fixtures); the `gguf` package
//! dequantizes them as pare does; pq files run; and failures leave nothing at the output path.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pare::convert::{convert, ConvertOptions, GgufSource, Role};
use pare::eval::model_eval::ModelEval;
use pare::eval::perplexity::{perplexity, read_text, PerplexityOptions};
use pare::format::gguf::{Gguf, Value};
use pare::model::Model;
use pare::quant::dequant::dequantize_tensor;
use pare::quant::quantize::Method;
use pare::quant::{format, GgmlType};
use sha2::{Digest, Sha256};

fn pare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pare"))
        .args(args)
        .output()
        .unwrap()
}

fn wikitext() -> PathBuf {
    common::root().join("data/wikitext-2-valid.tokens.txt")
}

/// Perplexity of `path` on the first `chunks` chunks of WikiText-2 at context 512, as
/// `pare perplexity` measures it.
fn ppl(path: &Path, chunks: usize) -> f64 {
    let model = Model::load(path).unwrap();
    let tok = model.tokenizer().unwrap();
    let tokens = tok
        .encode(&read_text(&wikitext()).unwrap(), true, false)
        .unwrap();
    let bos = if tok.add_bos() { tok.bos() } else { None };
    let opts = PerplexityOptions {
        n_chunks: Some(chunks),
        ..PerplexityOptions::new(512, bos)
    };
    let mut eval = ModelEval::new(&model, 512).unwrap();
    let r = perplexity(&mut eval, &tokens, &opts, |_| {}).unwrap();
    assert_eq!(r.chunks, chunks);
    r.ppl
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn q8_0_and_back_to_q4_1_keeps_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let (q8, q41) = (dir.path().join("q8_0.gguf"), dir.path().join("q4_1.gguf"));
    // q8_0 by round-to-nearest, as ggml quantizes Q8_0 (the error-minimising search clips the
    // largest weight of a group, which costs more perplexity at 8 bits than its lower mean square
    // error saves); back to q4_1 by the default search.
    let opts = ConvertOptions {
        method: Method::Rtn,
        ..ConvertOptions::new(GgmlType::Q8_0)
    };
    let src = GgufSource::open(common::real_model()).unwrap();
    let r = convert(&src, &q8, &opts, |_| {}).unwrap();
    assert!((r.linear_bits_per_weight() - 8.5).abs() < 1e-9);
    // The shipped model keeps its token embeddings at Q8_0; so does the round trip.
    let opts = ConvertOptions {
        embeddings: Some(GgmlType::Q8_0),
        ..ConvertOptions::new(GgmlType::Q4_1)
    };
    let r = convert(&GgufSource::open(&q8).unwrap(), &q41, &opts, |_| {}).unwrap();
    assert!((r.linear_bits_per_weight() - 5.0).abs() < 1e-9);

    // Every linear weight and the embeddings took the format; norms were copied as stored.
    let g = Gguf::open(&q41).unwrap();
    for t in &r.tensors {
        let ty = g.tensor(&t.spec.name).unwrap().ggml_type;
        match t.role {
            Role::Linear => assert_eq!(ty, GgmlType::Q4_1, "{}", t.spec.name),
            Role::Embeddings => assert_eq!(ty, GgmlType::Q8_0, "{}", t.spec.name),
            Role::Keep => assert_eq!(ty, GgmlType::F32, "{}", t.spec.name),
        }
    }
    assert_eq!(g.get("general.file_type"), Some(&Value::U32(3)));
    assert_eq!(g.get_str("pare.format"), Some("q4_1"));
    assert_eq!(g.get("pare.format_version"), Some(&Value::U32(1)));

    let chunks = 4;
    let base = ppl(&common::real_model(), chunks);
    for (name, path) in [("q8_0", &q8), ("back to q4_1", &q41)] {
        let p = ppl(path, chunks);
        let rel = (p - base).abs() / base;
        eprintln!("{name}: PPL {p:.4} vs {base:.4}: {:.3}%", 100.0 * rel);
        assert!(
            rel < 0.005,
            "{name}: PPL {p} vs {base} moved {:.2}%",
            100.0 * rel
        );
    }
}

#[test]
fn llama_cpp_measures_the_same_perplexity_on_pare_files() {
    let fixture: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::root().join("tests/fixtures/llamacpp_convert.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.gguf"));
        let mut args = vec![
            "convert".to_string(),
            "-m".into(),
            common::real_model().to_str().unwrap().into(),
        ];
        for a in case["convert_args"].as_array().unwrap() {
            args.push(a.as_str().unwrap().into());
        }
        args.extend(["-o".into(), out.to_str().unwrap().into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = pare(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            sha256(&out),
            case["sha256"].as_str().unwrap(),
            "{name}: pare no longer writes the file llama.cpp measured \
             (rerun scripts/gen-convert-fixtures if the change is intended)"
        );
        let chunks = case["n_chunks"].as_u64().unwrap() as usize;
        let ours = ppl(&out, chunks);
        let theirs = case["ppl"].as_f64().unwrap();
        let rel = (ours - theirs).abs() / theirs;
        eprintln!(
            "{name}: pare {ours:.4} vs llama.cpp {theirs:.4}: {:.3}%",
            100.0 * rel
        );
        assert!(rel < 0.01, "{name}: pare {ours} vs llama.cpp {theirs}");

        // An independent reader: the gguf package dequantizes pare's file as pare does.
        let names = [
            "token_embd.weight",
            "blk.0.attn_q.weight",
            "blk.0.ffn_down.weight",
            "blk.0.attn_norm.weight",
        ];
        let py = dir.path().join(format!("{name}-py"));
        let mut py_args = vec![out.to_str().unwrap(), py.to_str().unwrap()];
        py_args.extend(names);
        common::run_script("gguf_py_dequant.py", &py_args);
        let g = Gguf::open(&out).unwrap();
        for n in names {
            let theirs = std::fs::read(py.join(format!("{n}.f32"))).unwrap();
            let ours: Vec<u8> = dequantize_tensor(&g, g.tensor(n).unwrap())
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            assert!(
                ours == theirs,
                "{name}: {n} differs from gguf's dequantization"
            );
        }
    }
}

#[test]
fn pq_files_run_and_report_their_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q3.gguf");
    let model = common::real_model();
    let o = pare(&[
        "convert",
        "-m",
        model.to_str().unwrap(),
        "--format",
        "q3_g64",
        "--embeddings",
        "q8_0",
        "--method",
        "rtn",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("bits per weight"), "{stdout}");
    let g = Gguf::open(&out).unwrap();
    // 576-wide rows are 9 groups of 64; 1536-wide rows 24.
    let q3 = format::parse("q3_g64").unwrap();
    assert_eq!(g.tensor("blk.0.attn_q.weight").unwrap().ggml_type, q3);
    assert_eq!(g.tensor("blk.0.ffn_down.weight").unwrap().ggml_type, q3);
    assert_eq!(
        g.tensor("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert_eq!(g.get("general.file_type"), None);
    assert_eq!(g.get_str("pare.format"), Some("q3_g64"));

    let path = out.to_str().unwrap();
    let o = pare(&[
        "run",
        "-m",
        path,
        "-p",
        "The capital of France is",
        "-n",
        "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = pare(&[
        "bench", "-m", path, "-p", "16", "-n", "2", "-r", "1", "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn fails_cleanly(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected a clean failure: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.contains(needle),
        "error should mention {needle:?}: {err}"
    );
}

fn no_temp_files(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn bad_input_gives_a_clean_error_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::real_model();
    let model = model.to_str().unwrap();
    let out = dir.path().join("out.gguf");
    let o_str = out.to_str().unwrap();

    let o = pare(&["convert", "-m", model, "--format", "q9_g32", "-o", o_str]);
    fails_cleanly(&o, "unknown format \"q9_g32\"");
    let o = pare(&[
        "convert",
        "-m",
        model,
        "--format",
        "q4_0",
        "--embeddings",
        "q4_k",
        "-o",
        o_str,
    ]);
    fails_cleanly(&o, "unknown format \"q4_k\"");
    let missing = dir.path().join("missing.gguf");
    let o = pare(&[
        "convert",
        "-m",
        missing.to_str().unwrap(),
        "--format",
        "q4_0",
        "-o",
        o_str,
    ]);
    fails_cleanly(&o, "missing.gguf");
    assert!(!out.exists());

    // An output in a directory that does not exist, or under a regular file.
    let nodir = dir.path().join("no/such/dir/out.gguf");
    let o = pare(&[
        "convert",
        "-m",
        model,
        "--format",
        "q4_0",
        "--method",
        "rtn",
        "-o",
        nodir.to_str().unwrap(),
    ]);
    fails_cleanly(&o, "no/such/dir");
    let under_file = dir.path().join("missing.gguf.d");
    std::fs::write(&under_file, b"x").unwrap();
    let o = pare(&[
        "convert",
        "-m",
        model,
        "--format",
        "q4_0",
        "--method",
        "rtn",
        "-o",
        under_file.join("out.gguf").to_str().unwrap(),
    ]);
    fails_cleanly(&o, "missing.gguf.d");
    // A directory as the output.
    let o = pare(&[
        "convert",
        "-m",
        model,
        "--format",
        "q4_0",
        "-o",
        dir.path().to_str().unwrap(),
    ]);
    fails_cleanly(&o, "is a directory");

    // An existing output survives every failure untouched.
    std::fs::write(&out, b"precious").unwrap();
    let o = pare(&["convert", "-m", model, "--format", "bogus", "-o", o_str]);
    fails_cleanly(&o, "bogus");
    let o = pare(&[
        "convert",
        "-m",
        missing.to_str().unwrap(),
        "--format",
        "q4_0",
        "-o",
        o_str,
    ]);
    fails_cleanly(&o, "missing.gguf");
    // The input is not a GGUF file.
    let o = pare(&[
        "convert",
        "-m",
        under_file.to_str().unwrap(),
        "--format",
        "q4_0",
        "-o",
        o_str,
    ]);
    fails_cleanly(&o, "missing.gguf.d");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    no_temp_files(dir.path());
}

#[test]
fn an_interrupted_conversion_leaves_the_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    std::fs::write(&out, b"precious").unwrap();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let opts = ConvertOptions {
        method: Method::Rtn,
        cancel: Some(&cancel),
        ..ConvertOptions::new(GgmlType::Q4_0)
    };
    let src = GgufSource::open(common::real_model()).unwrap();
    // Ctrl-C arrives after the fifth tensor.
    let r = convert(&src, &out, &opts, |p| {
        if p.done == 5 {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    assert!(matches!(r, Err(pare::Error::Interrupted)), "{:?}", r.err());
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    no_temp_files(dir.path());

    // The real signal, through the CLI: SIGINT once the temporary file exists.
    let child = Command::new(env!("CARGO_BIN_EXE_pare"))
        .args(["convert", "-m"])
        .arg(common::real_model())
        .args(["--format", "q4_0", "-o"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let tmp = dir.path().join(format!(".out.gguf.tmp-{}", child.id()));
    let t0 = std::time::Instant::now();
    while !tmp.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(tmp.exists(), "no temporary file appeared");
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    fails_cleanly(&o, "interrupted");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    no_temp_files(dir.path());
}
