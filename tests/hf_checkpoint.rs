//! Hugging Face checkpoint directories in and out: synthetic checkpoints (scripts/make_synthetic_hf.py,
//! sharded) against the numpy reference forward, the real model exported to f32 and loaded back
//! against the GGUF, tokenizer.json ids against llama.cpp's, and malformed directories.

mod common;

use std::path::{Path, PathBuf};

use pare::eval::model_eval::ModelEval;
use pare::eval::perplexity::{perplexity, PerplexityOptions};
use pare::export::{export_hf, ExportOptions};
use pare::format::safetensors::Dtype;
use pare::model::{KvType, Logits, Model, RopeStyle, State};

fn logits(model: &Model, cases: &[Vec<u32>]) -> Vec<Vec<f32>> {
    cases
        .iter()
        .map(|toks| {
            let mut st = State::new(model, toks.len()).unwrap();
            model.forward(&mut st, toks, Logits::All).unwrap();
            st.logits.clone()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// The float64 numpy reference's logits (flattened per case) for a model file or directory.
fn reference(model: &Path, cases: &[Vec<u32>]) -> Vec<Vec<f32>> {
    common::reference_logits(model, cases)
        .into_iter()
        .map(|rows| rows.concat())
        .collect()
}

/// Writes a synthetic checkpoint with the repo's script.
fn synthetic(dir: &Path, arch: &str, dtype: &str, shards: usize) -> PathBuf {
    let out = dir.join(format!("{arch}-{dtype}-{shards}"));
    common::run_script(
        "make_synthetic_hf.py",
        &[
            out.to_str().unwrap(),
            "--arch",
            arch,
            "--seed",
            "3",
            "--dtype",
            dtype,
            "--shards",
            &shards.to_string(),
        ],
    );
    out
}

fn synthetic_cases() -> Vec<Vec<u32>> {
    vec![
        vec![
            257, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 258,
        ],
        (0..40).map(|i| (i * 37 + 11) % 259).collect(),
    ]
}

fn check_synthetic(arch: &str, dtype: &str, shards: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = synthetic(tmp.path(), arch, dtype, shards);
    let mut model = Model::load(&dir).unwrap();
    // Compared with float64 at rounding level: keys and values kept in f32 too.
    model.kv_type = KvType::F32;
    assert_eq!(model.config.rope_style, RopeStyle::Neox);
    let cases = synthetic_cases();
    let want = reference(&dir, &cases);
    // f32/f16/bf16 weights are computed in f32 (no activation quantization): rounding only.
    let d = max_abs_diff(&logits(&model, &cases), &want);
    eprintln!("synthetic {arch} {dtype} {shards} shard(s): max |Δ logits| vs float64 = {d}");
    assert!(d < 1e-3, "{arch} {dtype}: max |Δ| {d}");
}

#[test]
fn synthetic_qwen3_sharded_matches_reference() {
    check_synthetic("qwen3", "f32", 2);
    check_synthetic("qwen3", "bf16", 2);
}

#[test]
fn synthetic_llama_tied_matches_reference_through_neox_rope() {
    // The reference permutes the q/k rows as llama.cpp's converter does and uses adjacent-pair
    // RoPE; pare uses NEOX RoPE on the rows as stored. Same model, same logits.
    check_synthetic("llama", "f16", 1);
    check_synthetic("llama", "f32", 3);
}

#[test]
fn synthetic_export_round_trips_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for (arch, dtype, st) in [("qwen3", "bf16", Dtype::BF16), ("llama", "f16", Dtype::F16)] {
        let src = synthetic(tmp.path(), arch, dtype, 2);
        let a = Model::load(&src).unwrap();
        let out = tmp.path().join(format!("{arch}-export"));
        let r = export_hf(
            &a,
            &out,
            &ExportOptions {
                dtype: st,
                // Small shards: the index is written and read back.
                max_shard_bytes: 40_000,
                overwrite: false,
            },
        )
        .unwrap();
        assert!(r.files.iter().any(|f| f == "model.safetensors.index.json"));
        let b = Model::load(&out).unwrap();
        assert_eq!(a.config, b.config);
        assert_eq!(a.weights.tied_output(), b.weights.tied_output());
        let cases = synthetic_cases();
        assert_eq!(logits(&a, &cases), logits(&b, &cases), "{arch} {dtype}");
        // Same tokenizer and chat template.
        let (ta, tb) = (a.tokenizer().unwrap(), b.tokenizer().unwrap());
        let text = "<|im_start|>user\nhello, world<|im_end|>";
        assert_eq!(
            ta.encode(text, true, true).unwrap(),
            tb.encode(text, true, true).unwrap()
        );
        assert_eq!(ta.eos(), tb.eos());
        assert!(tb.is_eog(258));
        let msgs = [pare::format::chat_template::Message::new("user", "hi")];
        assert_eq!(
            a.chat_template()
                .unwrap()
                .unwrap()
                .apply(&msgs, true)
                .unwrap(),
            b.chat_template()
                .unwrap()
                .unwrap()
                .apply(&msgs, true)
                .unwrap()
        );
        // No temporary directory is left beside the output.
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("pare-tmp"))
            .collect();
        assert!(left.is_empty());
        // GGUF metadata for the checkpoint: GPT-2 pre-tokenizer, explicit head size for Qwen3.
        let meta = b.gguf_metadata().unwrap();
        let get = |k: &str| {
            meta.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("tokenizer.ggml.pre").unwrap().as_str(), Some("gpt-2"));
        assert_eq!(
            get("tokenizer.ggml.tokens")
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            259
        );
        if arch == "qwen3" {
            assert_eq!(
                get("qwen3.attention.key_length").unwrap().as_u64(),
                Some(24)
            );
        }
        // An existing directory is refused unless overwriting.
        let e = export_hf(&a, &out, &ExportOptions::default()).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }
}

#[derive(serde::Deserialize)]
struct TokCase {
    name: String,
    text: String,
    parse_special: bool,
    add_special: bool,
    ids: Vec<u32>,
}

/// The real model exported to f32 and loaded back: same logits as the GGUF on its exact f32
/// path, same perplexity, and tokenizer.json gives llama.cpp's ids on the foundation's strings.
#[test]
fn real_model_f32_export_matches_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gguf = Model::load(common::real_model()).unwrap();
    gguf.exact_activations = true;
    let out = tmp.path().join("smollm2-f32");
    let t0 = std::time::Instant::now();
    export_hf(&gguf, &out, &ExportOptions::default()).unwrap();
    eprintln!("export: {:.2} s", t0.elapsed().as_secs_f64());
    let mut hf = Model::load(&out).unwrap();
    // As the exact GGUF path keeps them: keys and values in f32.
    hf.kv_type = KvType::F32;
    assert_eq!(hf.config.rope_style, RopeStyle::Neox);
    assert_eq!(gguf.config.rope_style, RopeStyle::Normal);
    assert!(hf.weights.tied_output());
    let mut c = hf.config.clone();
    c.rope_style = RopeStyle::Normal;
    assert_eq!(c, gguf.config);

    // Logits: the same dequantized f32 weights; only the order of the sums over a head's
    // dimensions differs (the q/k rows are permuted), so the difference is float rounding.
    let cases = vec![
        vec![504, 3575, 282, 4649, 314],
        vec![1, 4093, 198, 19556, 905, 30, 2, 198, 1, 520, 9531, 198],
    ];
    let (a, b) = (logits(&gguf, &cases), logits(&hf, &cases));
    let d = max_abs_diff(&a, &b);
    eprintln!("SmolLM2 GGUF (exact) vs f32 export: max |Δ logits| = {d}");
    assert!(d < 1e-3, "max |Δ logits| {d}");

    // Perplexity over a few short chunks of the evaluation text.
    let text =
        std::fs::read_to_string(common::root().join("data/wikitext-2-valid.tokens.txt")).unwrap();
    let tok_g = gguf.tokenizer().unwrap();
    let tok_h = hf.tokenizer().unwrap();
    let prefix: String = text.chars().take(4000).collect();
    let tokens = tok_g.encode(&prefix, true, false).unwrap();
    assert_eq!(tokens, tok_h.encode(&prefix, true, false).unwrap());
    let opts = PerplexityOptions {
        n_chunks: Some(2),
        ..PerplexityOptions::new(128, None)
    };
    let ppl = |m: &Model| {
        let mut e = ModelEval::new(m, 128).unwrap();
        perplexity(&mut e, &tokens, &opts, |_| {}).unwrap().ppl
    };
    let (pg, ph) = (ppl(&gguf), ppl(&hf));
    eprintln!("perplexity (2 chunks of 128): GGUF {pg:.6}, f32 export {ph:.6}");
    assert!((pg - ph).abs() / pg < 1e-5, "{pg} vs {ph}");

    // tokenizer.json against llama.cpp's ids on the foundation's strings.
    let f: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::root().join("tests/fixtures/tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    let cases: Vec<TokCase> = serde_json::from_value(f["cases"].clone()).unwrap();
    for c in &cases {
        let ids = tok_h
            .encode(&c.text, c.add_special, c.parse_special)
            .unwrap();
        assert_eq!(ids, c.ids, "{}: {:?}", c.name, c.text);
        assert_eq!(tok_h.decode(&ids).unwrap(), c.text, "{}", c.name);
    }
    assert_eq!(tok_g.bos(), tok_h.bos());
    assert_eq!(tok_g.eos(), tok_h.eos());
    assert_eq!(tok_g.add_bos(), tok_h.add_bos());
    assert_eq!(tok_g.eog_ids(), tok_h.eog_ids());
    assert_eq!(tok_g.vocab_size(), tok_h.vocab_size());
    // GGUF metadata built from the directory equals what the GGUF carries.
    let built = hf.gguf_metadata().unwrap();
    let get = |k: &str| {
        built
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    // The model keeps its file opened lean (no tokenizer arrays): compare against a full parse.
    let g = pare::format::Gguf::open(&gguf.gguf().unwrap().path).unwrap();
    for key in [
        "general.architecture",
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ] {
        let (want, got) = (g.get(key), get(key));
        let want = want.unwrap_or_else(|| panic!("GGUF lacks {key}"));
        let got = got.unwrap_or_else(|| panic!("built metadata lacks {key}"));
        // Integer widths may differ (llama.cpp writes some as u32, some as i32).
        let same = match (want.as_array(), got.as_array()) {
            (Some(a), Some(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(x, y)| x == y || (x.as_i64().is_some() && x.as_i64() == y.as_i64()))
            }
            _ => *want == got || (want.as_f64().is_some() && want.as_f64() == got.as_f64()),
        };
        assert!(
            same,
            "{key}: GGUF {} vs built {}",
            want.summary(),
            got.summary()
        );
    }
    assert!(hf.qk_rows_need_gguf_permutation());
    assert!(!gguf.qk_rows_need_gguf_permutation());

    let msgs = [
        pare::format::chat_template::Message::new("system", "Be brief."),
        pare::format::chat_template::Message::new("user", "Hi"),
    ];
    assert_eq!(
        gguf.chat_template()
            .unwrap()
            .unwrap()
            .apply(&msgs, true)
            .unwrap(),
        hf.chat_template()
            .unwrap()
            .unwrap()
            .apply(&msgs, true)
            .unwrap()
    );
}

// ---- malformed directories -------------------------------------------------------------------

/// Rewrites a safetensors file's JSON header (keeping the data).
fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut h);
    let hs = serde_json::to_vec(&h).unwrap();
    let mut out = (hs.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hs);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn malformed_directories_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let good = synthetic(tmp.path(), "qwen3", "f32", 2);
    Model::load(&good).unwrap();
    const SHARD1: &str = "model-00001-of-00002.safetensors";
    const SHARD2: &str = "model-00002-of-00002.safetensors";
    type Break = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Break, &[&str])> = vec![
        (
            "missing config",
            Box::new(|d| std::fs::remove_file(d.join("config.json")).unwrap()),
            &["config.json", "missing"],
        ),
        (
            "config not JSON",
            Box::new(|d| std::fs::write(d.join("config.json"), "{ not json").unwrap()),
            &["config.json", "not valid JSON"],
        ),
        (
            "config missing a size",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c.as_object_mut().unwrap().remove("num_hidden_layers");
                })
            }),
            &["config.json", "num_hidden_layers is missing"],
        ),
        (
            "inconsistent heads",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c["num_key_value_heads"] = 3.into()
                })
            }),
            &["config.json", "not a multiple of num_key_value_heads 3"],
        ),
        (
            "tensor shape disagrees with config",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c["intermediate_size"] = 96.into()
                })
            }),
            &[
                "mlp.gate_proj.weight",
                "has shape [128, 64]",
                "implies [96, 64]",
            ],
        ),
        (
            "unknown architecture",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c["architectures"] = serde_json::json!(["MambaForCausalLM"])
                })
            }),
            &["config.json", "MambaForCausalLM", "not supported"],
        ),
        (
            "unknown dtype",
            Box::new(|d| {
                edit_header(&d.join(SHARD1), |h| {
                    h["model.embed_tokens.weight"]["dtype"] = "Q4".into()
                })
            }),
            &[SHARD1, "model.embed_tokens.weight", "unknown dtype \"Q4\""],
        ),
        (
            "unsupported dtype",
            Box::new(|d| {
                edit_header(&d.join(SHARD1), |h| {
                    h["model.embed_tokens.weight"]["dtype"] = "I32".into()
                })
            }),
            &[SHARD1, "model.embed_tokens.weight", "dtype I32"],
        ),
        (
            "dtype disagrees with bytes",
            Box::new(|d| {
                edit_header(&d.join(SHARD1), |h| {
                    h["model.embed_tokens.weight"]["dtype"] = "F16".into()
                })
            }),
            &[SHARD1, "model.embed_tokens.weight", "needs", "bytes"],
        ),
        (
            "truncated header",
            Box::new(|d| {
                let p = d.join(SHARD2);
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..40]).unwrap();
            }),
            &[SHARD2, "truncated"],
        ),
        (
            "truncated data",
            Box::new(|d| {
                let p = d.join(SHARD2);
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() - 100]).unwrap();
            }),
            &[SHARD2, "outside", "truncated"],
        ),
        (
            "oversized header",
            Box::new(|d| {
                let p = d.join(SHARD1);
                let mut b = std::fs::read(&p).unwrap();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                std::fs::write(&p, b).unwrap();
            }),
            &[SHARD1, "header length 1099511627776", "limit"],
        ),
        (
            "file shorter than the header length",
            Box::new(|d| std::fs::write(d.join(SHARD1), [1u8, 2, 3]).unwrap()),
            &[SHARD1, "too short"],
        ),
        (
            "shard named by the index is missing",
            Box::new(|d| std::fs::remove_file(d.join(SHARD2)).unwrap()),
            &["model.safetensors.index.json", SHARD2, "lacks"],
        ),
        (
            "index names a tensor the shard lacks",
            Box::new(|d| {
                edit_json(&d.join("model.safetensors.index.json"), |i| {
                    i["weight_map"]["model.norm.weight"] = SHARD1.into()
                })
            }),
            &[
                "model.safetensors.index.json",
                "model.norm.weight",
                "no such tensor",
            ],
        ),
        (
            "no weights",
            Box::new(|d| {
                for f in [SHARD1, SHARD2, "model.safetensors.index.json"] {
                    std::fs::remove_file(d.join(f)).unwrap();
                }
            }),
            &["model.safetensors", "no weights"],
        ),
        (
            "missing lm_head without tied embeddings",
            Box::new(|d| {
                edit_header(&d.join(SHARD2), |h| {
                    h.as_object_mut().unwrap().remove("lm_head.weight");
                });
                edit_json(&d.join("model.safetensors.index.json"), |i| {
                    i["weight_map"]
                        .as_object_mut()
                        .unwrap()
                        .remove("lm_head.weight");
                })
            }),
            &["lm_head.weight is missing", "tie_word_embeddings"],
        ),
        (
            "rope scaling",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
                })
            }),
            &["config.json", "rope scaling \"yarn\""],
        ),
    ];
    for (i, (name, breaker, want)) in cases.iter().enumerate() {
        let d = tmp.path().join(format!("bad{i}"));
        copy_dir(&good, &d);
        breaker(&d);
        let e = match Model::load(&d) {
            Ok(_) => panic!("{name}: loaded a malformed directory"),
            Err(e) => e.to_string(),
        };
        eprintln!("{name}: {e}");
        for w in *want {
            assert!(e.contains(w), "{name}: error {e:?} does not mention {w:?}");
        }
    }
    // A directory without tokenizer.json loads (weights only) but has no tokenizer.
    let d = tmp.path().join("no-tokenizer");
    copy_dir(&good, &d);
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let m = Model::load(&d).unwrap();
    let e = m.tokenizer().unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
}

#[test]
fn cli_runs_and_exports_a_checkpoint_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synthetic(tmp.path(), "qwen3", "f16", 2);
    let bin = env!("CARGO_BIN_EXE_pare");
    let out = tmp.path().join("exported");
    let o = std::process::Command::new(bin)
        .args(["export", "-m", src.to_str().unwrap(), "-o"])
        .arg(&out)
        .args(["--dtype", "bf16"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = std::process::Command::new(bin)
        .args([
            "run",
            "-m",
            out.to_str().unwrap(),
            "--chat",
            "-p",
            "hi",
            "-n",
            "4",
        ])
        .args(["--temp", "0", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = std::process::Command::new(bin)
        .args(["inspect", "-m", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("BF16"));
    // Exporting onto an existing directory is refused with a clear message.
    let o = std::process::Command::new(bin)
        .args(["export", "-m", src.to_str().unwrap(), "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
}

/// Checkpoint → GGUF in one command: the shipped model exported as an f32 checkpoint and
/// converted back with `pare convert -m DIR --format f32` gives every tensor of the original,
/// bit for bit (Llama q/k rows back in llama.cpp's order), and runs.
#[test]
fn convert_takes_a_checkpoint_directory() {
    let bin = env!("CARGO_BIN_EXE_pare");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let gguf = tmp.path().join("back.gguf");
    let real = common::real_model();
    let ok = |args: &[&str]| {
        let o = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ok(&[
        "export",
        "-m",
        real.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    ok(&[
        "convert",
        "-m",
        dir.to_str().unwrap(),
        "--format",
        "f32",
        "-o",
        gguf.to_str().unwrap(),
    ]);
    let a = pare::format::Gguf::open(&real).unwrap();
    let b = pare::format::Gguf::open(&gguf).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for t in &a.tensors {
        let u = b
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(t.dims, u.dims, "{}", t.name);
        let x = pare::quant::dequant::dequantize_tensor(&a, t).unwrap();
        let y = pare::quant::dequant::dequantize_tensor(&b, u).unwrap();
        assert!(x == y, "{} differs", t.name);
    }
    for key in [
        "general.architecture",
        "llama.block_count",
        "tokenizer.ggml.pre",
    ] {
        assert_eq!(a.get(key), b.get(key), "{key}");
    }
    ok(&[
        "run",
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        "The capital of France is",
        "-n",
        "4",
        "--temp",
        "0",
    ]);
}
