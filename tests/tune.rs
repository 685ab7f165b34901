//! The training loop and its parts on small synthetic models: gradient checkpointing gives the
//! same gradients bit for bit in every mode; a run interrupted and resumed ends where the
//! uninterrupted run ends; quantization-aware training computes exactly what the merged,
//! re-quantized model computes; chat packing scores assistant tokens only; the CLI trains, applies
//! and merges adapters.

mod common;

use std::sync::atomic::AtomicBool;

use pare::model::backward::{MergedWeight, Trainable};
use pare::model::{Logits, Lora, LoraConfig, Model, State, Target};
use pare::train::checkpointing::{loss_and_grad, Checkpoint};
use pare::train::data::{self, Sample};
use pare::train::fake_quant::{FakeQuant, Grids, QatMode};
use pare::train::trainer::{TrainOptions, Trainer};

fn synthetic(dir: &std::path::Path, ty: &str, layers: usize) -> std::path::PathBuf {
    common::synthetic_model(dir, "llama", ty, 4, layers)
}

/// A synthetic model with its linear weights in a 3-bit asymmetric format (`q3_g32`: a scale and
/// a minimum per group, both learned by `--qat lsq`).
fn synthetic_3bit(dir: &std::path::Path, layers: usize) -> std::path::PathBuf {
    let f32_path = synthetic(dir, "f32", layers);
    let out = dir.join(format!("q3_g32-l{layers}.gguf"));
    let src = pare::convert::GgufSource::open(&f32_path).unwrap();
    let fmt = pare::quant::format::parse("q3_g32").unwrap();
    pare::convert::convert(&src, &out, &pare::convert::ConvertOptions::new(fmt), |_| {}).unwrap();
    out
}

fn load(path: &std::path::Path) -> Model {
    let mut m = Model::load(path).unwrap();
    m.exact_activations = true;
    m
}

fn lora_cfg(targets: &[Target]) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: targets.to_vec(),
        dropout: 0.0,
        rslora: false,
    }
}

/// Random adapters with non-zero B.
fn random_lora(model: &Model, cfg: LoraConfig) -> Lora {
    let mut lora = Lora::new(&model.config, cfg, 3).unwrap();
    let mut rng = pare::infer::sampling::Rng::new(8);
    for p in lora.params_mut() {
        for v in p.iter_mut() {
            *v += (rng.next_f64() as f32 - 0.5) * 0.05;
        }
    }
    lora
}

fn text_samples(model: &Model, seq: usize) -> Vec<Sample> {
    let tok = model.tokenizer().unwrap();
    let text = "It is a truth universally acknowledged, that a single man in possession of a good \
                fortune, must be in want of a wife. "
        .repeat(6);
    data::pack_text(&tok, &text, seq).unwrap()
}

fn bits(l: &Lora) -> Vec<u32> {
    l.params()
        .flat_map(|p| p.iter().map(|v| v.to_bits()))
        .collect()
}

#[test]
fn checkpointing_modes_give_bit_identical_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synthetic(dir.path(), "q8_0", 7));
    let lora = random_lora(&model, lora_cfg(&Target::ALL));
    let s = &text_samples(&model, 48)[0];
    let w = vec![1.0 / 48.0; 48];
    let mut reference: [Option<(u64, Vec<u32>)>; 2] = [None, None];
    for mode in [
        Checkpoint::None,
        Checkpoint::Every(1),
        Checkpoint::Every(4),
        Checkpoint::Sqrt,
    ] {
        for merged in [false, true] {
            let grids = Grids::of_base(&model, &Target::ALL, QatMode::Lsq).unwrap();
            let fq = FakeQuant::new(&model, &lora, QatMode::Lsq, &grids).unwrap();
            let t = Trainable {
                model: &model,
                lora: &lora,
                merged: merged.then_some(&fq as &dyn MergedWeight),
                dropout_seed: Some(1),
            };
            let mut g = Lora::zeros(&model.config, lora.config.clone());
            let st = loss_and_grad(&t, &s.tokens, &w, mode, &mut g).unwrap();
            let want_recomputed = match mode {
                Checkpoint::None => 0,
                Checkpoint::Every(1) => 6,
                Checkpoint::Every(4) => 4, // segment 0..4 recomputed; 4..7 kept
                Checkpoint::Sqrt => 6,     // ⌈√7⌉ = 3: segments 0..3, 3..6, 6..7
                _ => unreachable!(),
            };
            assert_eq!(st.recomputed_layers, want_recomputed, "{mode:?}");
            if mode != Checkpoint::None {
                let none = Checkpoint::None.activation_bytes(&model.config, 48);
                assert!(st.peak_activation_bytes < none, "{mode:?} keeps less");
            }
            let key = merged as usize;
            match &reference[key] {
                None => reference[key] = Some((st.loss.to_bits(), bits(&g))),
                Some((l, b)) => {
                    assert_eq!(*l, st.loss.to_bits(), "{mode:?} merged={merged}: loss");
                    assert!(*b == bits(&g), "{mode:?} merged={merged}: gradients differ");
                }
            }
        }
    }
}

#[test]
fn merged_training_on_a_float_base_equals_unmerged_lora() {
    // With an f32 base the fake quantizer rounds nothing, so QAT's merged forward and its
    // straight-through backward must agree with the unmerged adapters (the exact gradients,
    // checked against finite differences in tests/train_grad.rs).
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synthetic(dir.path(), "f32", 2));
    let lora = random_lora(&model, lora_cfg(&[Target::Q, Target::V, Target::Down]));
    let s = &text_samples(&model, 32)[1];
    let w = vec![1.0 / 32.0; 32];
    let grids = Grids::of_base(&model, &lora.config.targets, QatMode::Clipped).unwrap();
    let fq = FakeQuant::new(&model, &lora, QatMode::Clipped, &grids).unwrap();
    let mut out = Vec::new();
    for merged in [None, Some(&fq as &dyn MergedWeight)] {
        let t = Trainable {
            model: &model,
            lora: &lora,
            merged,
            dropout_seed: None,
        };
        let mut g = Lora::zeros(&model.config, lora.config.clone());
        let st = loss_and_grad(&t, &s.tokens, &w, Checkpoint::None, &mut g).unwrap();
        out.push((st.loss, g));
    }
    assert!(
        (out[0].0 - out[1].0).abs() < 1e-5,
        "{} vs {}",
        out[0].0,
        out[1].0
    );
    let scale = out[0]
        .1
        .params()
        .flatten()
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 1e-4);
    for (a, b) in out[0].1.params().flatten().zip(out[1].1.params().flatten()) {
        assert!((a - b).abs() <= 1e-4 * scale, "{a} vs {b}");
    }
}

fn opts(qat: QatMode, steps: usize) -> TrainOptions {
    TrainOptions {
        lora: LoraConfig {
            dropout: if qat == QatMode::None { 0.1 } else { 0.0 },
            ..lora_cfg(&[Target::Q, Target::V, Target::Up])
        },
        steps,
        seq_len: 24,
        accum: 2,
        lr: 5e-3,
        warmup: 2,
        qat,
        eval_every: 2,
        save_every: 0,
        checkpoint: Checkpoint::Every(1),
        ..TrainOptions::default()
    }
}

#[test]
fn an_interrupted_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let q8 = synthetic(dir.path(), "q8_0", 2);
    resume_check(&dir.path().join("plain"), &q8, QatMode::None);
    // lsq also carries the learned grids and their optimizer state across the interruption.
    let q3 = synthetic_3bit(dir.path(), 2);
    resume_check(&dir.path().join("lsq"), &q3, QatMode::Lsq);
}

fn resume_check(dir: &std::path::Path, base: &std::path::Path, mode: QatMode) {
    std::fs::create_dir_all(dir).unwrap();
    let model = load(base);
    let samples = text_samples(&model, 24);
    let (train, val) = data::split(samples, 0.2).unwrap();
    let never = AtomicBool::new(false);
    let straight = dir.join("straight");
    let mut a = Trainer::new(&model, opts(mode, 5), train.clone(), val.clone()).unwrap();
    a.run(&straight, "synthetic", &never, |_| {}).unwrap();
    assert!(straight.join("loss.png").exists());
    assert!(straight.join("adapter_model.safetensors").exists());
    let first = a.history[0].loss;
    let last = a.history.last().unwrap().loss;
    assert!(last < first, "training lowers the loss: {first} -> {last}");

    // Interrupted after step 2 (as Ctrl-C does), then resumed with another checkpoint mode.
    let cut = dir.join("cut");
    let stop = AtomicBool::new(false);
    let mut b = Trainer::new(&model, opts(mode, 5), train.clone(), val.clone()).unwrap();
    let r = b.run(&cut, "synthetic", &stop, |rec| {
        if rec.step == 2 {
            stop.store(true, std::sync::atomic::Ordering::Relaxed)
        }
    });
    assert!(matches!(r, Err(pare::Error::Interrupted)), "{r:?}");
    assert_eq!(b.step, 2);
    drop(b);
    let mut c = Trainer::resume(
        &model,
        &cut,
        None,
        Some(Checkpoint::None),
        train.clone(),
        val.clone(),
    )
    .unwrap();
    assert_eq!(c.step, 2);
    c.run(&cut, "synthetic", &never, |_| {}).unwrap();
    assert!(bits(&c.lora) == bits(&a.lora), "resumed adapters differ");
    assert_eq!(c.grids, a.grids, "resumed grids differ");
    let losses = |t: &Trainer| {
        t.history
            .iter()
            .map(|r| r.loss.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&c), losses(&a));
    let saved = Lora::load(&cut, &model.config).unwrap();
    assert!(bits(&saved) == bits(&a.lora));

    // Different data cannot be resumed.
    let err = Trainer::resume(&model, &cut, None, None, train[1..].to_vec(), val).err();
    assert!(
        format!("{err:?}").contains("training data differ"),
        "{err:?}"
    );
}

#[test]
fn qat_trains_what_the_merged_requantized_model_computes() {
    let dir = tempfile::tempdir().unwrap();
    let q8 = synthetic(dir.path(), "q8_0", 2);
    let q3 = synthetic_3bit(dir.path(), 2);
    for (base, mode) in [
        (&q8, QatMode::Ste),
        (&q3, QatMode::Clipped),
        (&q3, QatMode::Lsq),
        (&q8, QatMode::Lsq),
    ] {
        qat_merge_check(dir.path(), base, mode);
    }
}

fn qat_merge_check(dir: &std::path::Path, base: &std::path::Path, mode: QatMode) {
    let model = load(base);
    let samples = text_samples(&model, 24);
    let (train, val) = data::split(samples, 0.2).unwrap();
    let out = dir.join(format!("qat-{}", mode.name()));
    // A rate high enough that some adapted values cross a 3-bit rounding boundary in 4 steps.
    let o = TrainOptions {
        lr: 3e-2,
        ..opts(mode, 4)
    };
    let mut t = Trainer::new(&model, o, train, val.clone()).unwrap();
    let initial = t.grids.clone();
    t.run(&out, "synthetic", &AtomicBool::new(false), |_| {})
        .unwrap();
    if mode == QatMode::Lsq {
        assert_ne!(t.grids, initial, "lsq learned nothing");
    } else {
        assert_eq!(t.grids, initial, "{mode:?} changed the base's grid");
    }
    let trained = t.evaluate().unwrap().unwrap();
    let merged_path = dir.join(format!("merged-{}.gguf", mode.name()));
    let lora = Lora::load(&out, &model.config).unwrap();
    let qat = pare::train::fake_quant::load_state(&out).unwrap().unwrap();
    assert_eq!(qat.mode, mode);
    pare::train::merge::merge(
        base,
        &lora,
        Some(&qat),
        &merged_path,
        None,
        Default::default(),
        None,
        |_| {},
    )
    .unwrap();
    let merged = load(&merged_path);
    // Same formats as the base.
    for (a, b) in merged.weights.matrices().zip(model.weights.matrices()) {
        assert_eq!(a.ty, b.ty, "{}", a.name);
    }
    // Validation loss of the merged file, through the inference pass.
    let nv = merged.config.n_vocab;
    let (mut sum, mut count) = (0.0, 0);
    for s in &val {
        let mut st = State::new(&merged, 64).unwrap();
        let n = s.tokens.len() - 1;
        merged
            .forward(&mut st, &s.tokens[..n], Logits::All)
            .unwrap();
        for i in 0..n {
            sum += pare::eval::perplexity::nll(&st.logits[i * nv..(i + 1) * nv], s.tokens[i + 1]);
            count += 1;
        }
    }
    let merged_loss = sum / count as f64;
    assert!(
        (merged_loss - trained).abs() < 1e-4 * trained,
        "{mode:?}: merged {merged_loss} vs trained {trained}"
    );
    // The adapters did something: the merged file differs from the base.
    let base_model = load(base);
    let mut st = State::new(&base_model, 64).unwrap();
    let s = &val[0];
    base_model
        .forward(&mut st, &s.tokens[..24], Logits::All)
        .unwrap();
    let mut st2 = State::new(&merged, 64).unwrap();
    merged
        .forward(&mut st2, &s.tokens[..24], Logits::All)
        .unwrap();
    assert!(
        st.logits != st2.logits,
        "{mode:?}: the merge changed nothing"
    );
}

#[test]
fn chat_packing_scores_assistant_tokens_only() {
    let model = Model::load(common::real_model()).unwrap();
    let tok = model.tokenizer().unwrap();
    let template = model.chat_template().unwrap().unwrap();
    let jsonl = concat!(
        r#"{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}"#,
        "\n",
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Farewell."}]}"#,
        "\n"
    );
    let samples = data::pack_chat(&tok, &template, jsonl, 8).unwrap();
    let mut scored = Vec::new();
    for s in &samples {
        for (i, &b) in s.scored.iter().enumerate() {
            if b {
                scored.push(s.tokens[i + 1]);
            }
        }
    }
    let text = tok.decode(&scored).unwrap();
    // Each assistant reply and the end-of-turn marker the template closes it with.
    assert_eq!(
        text,
        "Blue.<|im_end|>\nHello!<|im_end|>\nFarewell.<|im_end|>\n"
    );
    for bad in [
        "not json",
        r#"{"messages": [{"role": "user", "content": "no reply"}]}"#,
        r#"{"text": "x"}"#,
    ] {
        assert!(data::pack_chat(&tok, &template, bad, 8).is_err(), "{bad}");
    }
}

#[test]
fn memory_budget_refuses_with_a_strategy_that_fits() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synthetic(dir.path(), "f32", 8));
    let o = TrainOptions {
        seq_len: 256,
        ..opts(QatMode::None, 1)
    };
    let none = pare::train::memory::estimate(
        &model,
        &TrainOptions {
            checkpoint: Checkpoint::None,
            ..o.clone()
        },
    );
    let sqrt = pare::train::memory::estimate(
        &model,
        &TrainOptions {
            checkpoint: Checkpoint::Sqrt,
            ..o.clone()
        },
    );
    assert!(sqrt.activations * 2 < none.activations);
    let budget = (none.total() + sqrt.total()) / 2;
    let o_none = TrainOptions {
        checkpoint: Checkpoint::None,
        ..o.clone()
    };
    let err = pare::train::memory::check_budget(&model, &o_none, budget)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--checkpoint"), "{err}");
    assert!(pare::train::memory::check_budget(&model, &o_none, none.total()).is_ok());
    let err = pare::train::memory::check_budget(&model, &o_none, 1000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nothing fits"), "{err}");
}

#[test]
fn cli_tunes_applies_and_merges_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let base = synthetic(dir.path(), "q8_0", 2);
    let data = dir.path().join("data.txt");
    std::fs::write(
        &data,
        "All the world's a stage, and all the men and women merely players. ".repeat(8),
    )
    .unwrap();
    let out = dir.path().join("adapter");
    let pare = env!("CARGO_BIN_EXE_pare");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(pare)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "pare {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let b = base.to_str().unwrap();
    let stdout = run(&[
        "tune",
        "-m",
        b,
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "3",
        "--seq-len",
        "32",
        "-o",
        out.to_str().unwrap(),
        "--qat",
        "clipped",
        "--checkpoint",
        "sqrt",
        "--targets",
        "q,k,v,o,gate,up,down",
        "--rank",
        "2",
        "--val-split",
        "0.2",
        "-t",
        "1",
    ]);
    assert!(stdout.contains("peak RSS"), "{stdout}");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "loss.png",
        "checkpoint/trainer_state.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let o = out.to_str().unwrap();
    run(&[
        "run", "-m", b, "--lora", o, "-p", "All the", "-n", "4", "--temp", "0", "-t", "1",
    ]);
    run(&[
        "perplexity",
        "-m",
        b,
        "--lora",
        o,
        "-f",
        data.to_str().unwrap(),
        "-c",
        "64",
        "-t",
        "1",
    ]);
    let merged = dir.path().join("merged.gguf");
    run(&[
        "merge",
        "-m",
        b,
        "--lora",
        o,
        "-o",
        merged.to_str().unwrap(),
        "-t",
        "1",
    ]);
    assert!(merged.exists());
    // A budget too small is refused before training, naming the estimate.
    let o2 = std::process::Command::new(pare)
        .args([
            "tune",
            "-m",
            b,
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "1",
            "--seq-len",
            "32",
            "-o",
            dir.path().join("x").to_str().unwrap(),
            "--memory-budget",
            "1MiB",
        ])
        .output()
        .unwrap();
    assert!(!o2.status.success());
    let err = String::from_utf8_lossy(&o2.stderr);
    assert!(err.contains("budget") && err.contains("MiB"), "{err}");
    assert!(!dir.path().join("x").exists());
}
