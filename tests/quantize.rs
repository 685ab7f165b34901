//! `pare quantize` on the shipped model: budgets are met exactly and fail clearly when infeasible,
//! the optimal plan predicts less error than any other plan of the same size, overrides and bit
//! clamps hold, saved measurements re-plan identically, the written file runs, and bad input
//! leaves nothing behind.

mod common;

use std::process::{Command, Output};
use std::sync::OnceLock;

use pare::format::gguf::Gguf;
use pare::model::{Logits, Model, State};
use pare::plan::allocate::Strategy;
use pare::plan::budget::Budget;
use pare::plan::quantize::{self, Options, Plan};
use pare::plan::{calibrate::calibrate, fisher::fisher, kl_sensitivity::mean_kl};
use pare::quant::matmul::{QMatrix, WeightBytes};
use pare::quant::{format, GgmlType};

fn pare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pare"))
        .args(args)
        .output()
        .unwrap()
}

/// Small measuring options so the suite stays fast: 2 chunks of 128 calibration tokens, 16 rows,
/// gradients on 256 tokens.
fn quick(budget: Option<Budget>) -> Options {
    Options {
        budget,
        n_ctx: 128,
        max_chunks: 2,
        sample_rows: 16,
        sensitivity_tokens: Some(256),
        ..Options::default()
    }
}

const QUICK: [&str; 8] = [
    "--ctx",
    "128",
    "--calib-chunks",
    "2",
    "--sample-rows",
    "16",
    "--sensitivity-tokens",
    "256",
];

/// One measured plan of the shipped model at 3.5 bits per weight, shared by the library tests.
fn plan35() -> &'static Plan {
    static P: OnceLock<Plan> = OnceLock::new();
    P.get_or_init(|| {
        quantize::plan(
            &common::real_model(),
            &quick(Some(Budget::BitsPerWeight(3.5))),
            None,
            |_, _, _| {},
        )
        .unwrap()
    })
}

#[test]
fn the_optimal_plan_fits_and_beats_every_uniform_format_its_size() {
    let p = plan35();
    assert!(p.bits_per_weight().unwrap() <= 3.5);
    assert!(p.bits_per_weight().unwrap() > 3.45, "budget left unused");
    // Every tensor of the model is planned: 30 blocks × 7 matrices + the tied embeddings.
    assert_eq!(p.tensors.len(), 211);
    let cands = p.candidates();
    let opt = p.allocation.error(&cands);
    let gap = p.allocation.lower_bound.map(|lb| opt - lb).unwrap();
    assert!(gap >= -1e-9 * opt && gap < 0.05 * opt, "gap {gap} of {opt}");
    for f in ["q3_g64", "q3_g32_sym", "q3_g128", "q2_g32"] {
        let f = format::parse(f).unwrap();
        let u = p.with_allocation(&Strategy::Uniform(f), None).unwrap();
        if u.bytes(&cands) <= p.allocation.bytes(&cands) {
            assert!(opt < u.error(&cands), "{f} predicts less");
        }
    }
    let t = p
        .with_allocation(
            &Strategy::Thresholds {
                high: 0.25,
                low: 0.25,
            },
            p.capacity,
        )
        .unwrap();
    assert!(t.bytes(&cands) <= p.capacity.unwrap());
    assert!(opt <= t.error(&cands));
    // A tighter budget costs error; an impossible one names the smallest feasible size.
    let tight = p
        .with_allocation(&Strategy::Optimal, Some(p.capacity.unwrap() * 3 / 4))
        .unwrap();
    assert!(tight.error(&cands) > opt);
    let e = p
        .with_allocation(&Strategy::Optimal, Some(1000))
        .unwrap_err();
    assert!(e.to_string().contains("smallest allowed"), "{e}");
}

#[test]
fn bit_clamps_and_overrides_hold() {
    let mut o = quick(Some(Budget::BitsPerWeight(5.5)));
    o.min_bits = Some(3);
    o.max_bits = Some(5);
    o.overrides = vec![
        "ffn_down=q8_0".parse().unwrap(),
        "token_embd=q6_g64".parse().unwrap(),
    ];
    let p = quantize::plan(&common::real_model(), &o, None, |_, _, _| {}).unwrap();
    for (i, t) in p.tensors.iter().enumerate() {
        let c = p.chosen(i);
        if t.name.contains("ffn_down") {
            assert_eq!(c.format, GgmlType::Q8_0, "{}", t.name);
        } else if t.name.contains("token_embd") {
            assert_eq!(format::name(c.format), "q6_g64");
        } else {
            let bits = quantize::code_bits(c.format);
            assert!((3..=5).contains(&bits), "{} got {bits} bits", t.name);
        }
    }
    assert!(p.bits_per_weight().unwrap() <= 5.5);
}

#[test]
fn quantize_writes_a_file_within_a_byte_budget_that_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (out, rep, png, meas) = (
        dir.path().join("m.gguf"),
        dir.path().join("r.json"),
        dir.path().join("f.png"),
        dir.path().join("meas.json"),
    );
    let model = common::real_model();
    let m = model.to_str().unwrap();
    let budget = 55_000_000u64;
    let b = budget.to_string();
    let mut args = vec![
        "quantize",
        "-m",
        m,
        "--budget",
        &b,
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(QUICK);
    args.extend([
        "--report",
        rep.to_str().unwrap(),
        "--plot",
        png.to_str().unwrap(),
        "--measurements",
        meas.to_str().unwrap(),
    ]);
    let o = pare(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let size = std::fs::metadata(&out).unwrap().len();
    assert!(
        size <= budget && size > budget - budget / 50,
        "{size} vs {budget}"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    assert_eq!(report["summary"]["file_bytes"].as_u64(), Some(size));
    assert_eq!(report["tensors"].as_array().unwrap().len(), 211);
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
    // The file is a GGUF whose types are the report's, and it runs.
    let g = Gguf::open(&out).unwrap();
    for t in report["tensors"].as_array().unwrap() {
        let info = g.tensor(t["name"].as_str().unwrap()).unwrap();
        assert_eq!(format::name(info.ggml_type), t["stored"].as_str().unwrap());
    }
    let o = pare(&[
        "run",
        "-m",
        out.to_str().unwrap(),
        "-p",
        "The capital of France is",
        "-n",
        "4",
        "--temp",
        "0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Re-planning from the saved measurements at the same budget gives the same file.
    let out2 = dir.path().join("m2.gguf");
    args[6] = out2.to_str().unwrap();
    let t = std::time::Instant::now();
    let o = pare(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    eprintln!(
        "re-plan from saved measurements and write: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.gguf");
    let o_s = out.to_str().unwrap();
    let model = common::real_model();
    let m = model.to_str().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--budget", "1MiB"], "infeasible"),
        (vec!["--budget", "3 parsecs"], "budget"),
        (vec![], "needs --budget"),
        (
            vec!["--budget", "3bpw", "--strategy", "greedy"],
            "unknown strategy",
        ),
        (
            vec!["--budget", "3bpw", "--min-bits", "6", "--max-bits", "4"],
            "above --max-bits",
        ),
        (
            vec!["--budget", "3bpw", "--override", "ffn_(=q4_0"],
            "bad regex",
        ),
        (
            vec!["--budget", "3bpw", "--override", "nothing_matches=q4_0"],
            "matches no tensor",
        ),
        (
            vec!["--budget", "3bpw", "--override", "ffn=q9_g7"],
            "unknown format",
        ),
        (
            vec!["--budget", "3bpw", "--calib", empty.to_str().unwrap()],
            "calibration text is empty",
        ),
        (
            vec!["--strategy", "uniform:q2_g64", "--budget", "10MB"],
            "infeasible",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["quantize", "-m", m, "-o", o_s];
        args.extend(QUICK);
        args.extend(extra.iter().copied());
        let o = pare(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "{extra:?} left files"
        );
    }
}

/// The gradient sensitivity predicts the KL a small random weight error causes: `½ Σ_r G_r Σ_j
/// imp_j ΔW_rj²` against the KL measured with the error in place, for an early and a late tensor
/// whose measured KLs differ several-fold (so a prediction in the wrong unit would fail).
#[test]
fn fisher_predicts_the_kl_of_a_small_weight_error() {
    let mut model = Model::load(common::real_model()).unwrap();
    // Exact f32 activations, so that the KL measured is the weight error's alone (8-bit
    // activations would add rounding noise of their own downstream of the change).
    model.exact_activations = true;
    let text = quantize::DEFAULT_CALIBRATION_TEXT;
    let tokens = model
        .tokenizer()
        .unwrap()
        .encode(text, false, false)
        .unwrap();
    let tokens = &tokens[..512];
    let f = fisher(&model, tokens, 256, 2, 7, |_, _| {}).unwrap();
    let cal = calibrate(&model, tokens, 256, Some(2), |_, _| {}).unwrap();
    let mut state = State::new(&model, 256).unwrap();
    let mut base = Vec::new();
    for chunk in tokens.chunks(256) {
        state.reset();
        model.forward(&mut state, chunk, Logits::All).unwrap();
        base.push(state.logits.clone());
    }
    let vocab = model.config.n_vocab;
    let mut ratios = Vec::new();
    let mut kls = Vec::new();
    for name in ["blk.2.ffn_down.weight", "blk.25.attn_v.weight"] {
        let orig = model.weights.matrices_named_mut(name)[0].clone();
        let (rows, cols) = (orig.rows, orig.cols);
        let mut w = vec![0f32; rows * cols];
        for (r, row) in w.chunks_exact_mut(cols).enumerate() {
            orig.dequantize_row(r, row).unwrap();
        }
        let rms = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        let g = f.rows[name].clone();
        let imp = cal.inputs[name].importance();
        let mut seed = 0x1234_5678u64;
        let mut predicted = 0.0f64;
        for (i, v) in w.iter_mut().enumerate() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            let d = 0.15 * rms * u;
            *v += d;
            predicted += 0.5 * g[i / cols] * imp[i % cols] as f64 * (d as f64) * (d as f64);
        }
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let q = QMatrix::new(
            name,
            GgmlType::F32,
            rows,
            cols,
            WeightBytes::from_vec(bytes),
        )
        .unwrap();
        *model.weights.matrices_named_mut(name)[0] = q;
        let mut kl = 0.0;
        for (chunk, b) in tokens.chunks(256).zip(&base) {
            state.reset();
            model.forward(&mut state, chunk, Logits::All).unwrap();
            kl += mean_kl(b, &state.logits, vocab) / 2.0;
        }
        *model.weights.matrices_named_mut(name)[0] = orig;
        ratios.push(predicted / kl);
        kls.push(kl);
    }
    for r in &ratios {
        assert!(
            (0.5..2.0).contains(r),
            "predicted/measured KL {ratios:?} (measured {kls:?})"
        );
    }
}
