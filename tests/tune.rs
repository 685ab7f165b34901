//! The training loop and its parts on small synthetic models: gradient checkpointing gives the
//! same gradients bit for bit in every mode; a run interrupted and resumed ends where the
//! uninterrupted run ends; quantization-aware training computes exactly what the merged,
//! re-quantized model computes; chat packing scores assistant tokens only; the CLI trains, applies
//! and merges adapters; a step over 2 or 3 pipeline stages (GPipe and 1F1B) equals the
//! single-worker step, and 1F1B holds at most N micro-batches' activations per stage.

mod common;

use std::sync::atomic::AtomicBool;

use pare::model::backward::{MergedWeight, Trainable};
use pare::model::{Logits, Lora, LoraConfig, Model, State, Target};
use pare::pipeline::schedule::{Schedule, Step};
use pare::train::checkpointing::{loss_and_grad, Checkpoint};
use pare::train::data::{self, Sample};
use pare::train::fake_quant::{FakeQuant, GridInit, Grids, QatMode};
use pare::train::trainer::{Stages, TrainOptions, Trainer};

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
    resume_check(&dir.path().join("plain"), &q8, QatMode::None, 0.0);
    // lsq also carries the learned grids and their optimizer state across the interruption.
    let q3 = synthetic_3bit(dir.path(), 2);
    resume_check(&dir.path().join("lsq"), &q3, QatMode::Lsq, 0.0);
    // --qat-start: cut (after step 2) before the switch at step 4 of 5, whose searched grid the
    // resumed run must make itself; and after the switch at step 2, whose grid it must load.
    resume_check(&dir.path().join("lsq-late"), &q3, QatMode::Lsq, 0.6);
    resume_check(&dir.path().join("lsq-early"), &q3, QatMode::Lsq, 0.2);
}

fn resume_check(dir: &std::path::Path, base: &std::path::Path, mode: QatMode, qat_start: f32) {
    std::fs::create_dir_all(dir).unwrap();
    let model = load(base);
    let samples = text_samples(&model, 24);
    let (train, val) = data::split(samples, 0.2).unwrap();
    let never = AtomicBool::new(false);
    let straight = dir.join("straight");
    let o = TrainOptions {
        qat_start,
        ..opts(mode, 5)
    };
    let mut a = Trainer::new(&model, o.clone(), train.clone(), val.clone()).unwrap();
    a.run(&straight, "synthetic", &never, |_| {}).unwrap();
    assert!(straight.join("loss.png").exists());
    assert!(straight.join("adapter_model.safetensors").exists());
    let first = a.history[0].loss;
    let last = a.history.last().unwrap().loss;
    assert!(last < first, "training lowers the loss: {first} -> {last}");

    // Interrupted after step 2 (as Ctrl-C does), then resumed with another checkpoint mode.
    let cut = dir.join("cut");
    let stop = AtomicBool::new(false);
    let mut b = Trainer::new(&model, o, train.clone(), val.clone()).unwrap();
    let r = b.run(&cut, "synthetic", &stop, |rec| {
        if rec.step == 2 {
            stop.store(true, std::sync::atomic::Ordering::Relaxed)
        }
    });
    assert!(matches!(r, Err(pare::Error::Interrupted)), "{r:?}");
    assert_eq!(b.step, 2);
    let b_switched = b.qat_from.is_some();
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
    assert_eq!(c.qat_from.is_some(), b_switched, "resumed switch state");
    c.run(&cut, "synthetic", &never, |_| {}).unwrap();
    assert_eq!(c.qat_from, a.qat_from);
    assert!(
        bits(&c.lora()) == bits(&a.lora()),
        "resumed adapters differ"
    );
    assert_eq!(c.grids, a.grids, "resumed grids differ");
    let losses = |t: &Trainer| {
        t.history
            .iter()
            .map(|r| r.loss.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&c), losses(&a));
    let saved = Lora::load(&cut, &model.config).unwrap();
    assert!(bits(&saved) == bits(&a.lora()));

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
    for (base, mode, qat_start) in [
        (&q8, QatMode::Ste, 0.0),
        (&q3, QatMode::Clipped, 0.0),
        (&q3, QatMode::Lsq, 0.0),
        (&q8, QatMode::Lsq, 0.0),
        // Plain LoRA for steps 1-2, then QAT (lsq from the searched grid of W + s·BA).
        (&q3, QatMode::Lsq, 0.5),
        (&q3, QatMode::Ste, 0.5),
    ] {
        qat_merge_check(dir.path(), base, mode, qat_start);
    }
}

fn qat_merge_check(dir: &std::path::Path, base: &std::path::Path, mode: QatMode, qat_start: f32) {
    let model = load(base);
    let samples = text_samples(&model, 24);
    let (train, val) = data::split(samples, 0.2).unwrap();
    let name = format!("{}-{qat_start}", mode.name());
    let out = dir.join(format!("qat-{name}"));
    // A rate high enough that some adapted values cross a 3-bit rounding boundary in 4 steps.
    let o = TrainOptions {
        lr: 3e-2,
        qat_start,
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
    let merged_path = dir.join(format!("merged-{name}.gguf"));
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

/// The loss of step `step` (0-based) of a run with options `o`, computed apart from the trainer:
/// its sequences, weighted as the trainer weights them, through `lora` and `merged`.
fn step_loss(
    model: &Model,
    o: &TrainOptions,
    train: &[Sample],
    step: usize,
    lora: &Lora,
    merged: Option<&dyn MergedWeight>,
) -> f64 {
    let picks: Vec<&Sample> = (0..o.accum)
        .map(|i| &train[data::sample_index(o.seed, train.len(), step * o.accum + i)])
        .collect();
    let total: usize = picks.iter().map(|s| s.n_scored()).sum();
    let t = Trainable {
        model,
        lora,
        merged,
        dropout_seed: None,
    };
    picks
        .iter()
        .map(|s| {
            let w: Vec<f32> = s
                .scored
                .iter()
                .map(|&b| if b { 1.0 / total as f32 } else { 0.0 })
                .collect();
            let mut g = Lora::zeros(&model.config, lora.config.clone());
            loss_and_grad(&t, &s.tokens, &w, Checkpoint::None, &mut g)
                .unwrap()
                .loss
        })
        .sum()
}

#[test]
fn qat_start_trains_plain_lora_until_the_switch_then_qat() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synthetic_3bit(dir.path(), 2));
    let (train, val) = data::split(text_samples(&model, 24), 0.2).unwrap();
    let plain_o = TrainOptions {
        lora: lora_cfg(&[Target::Q, Target::V, Target::Up]),
        ..opts(QatMode::None, 6)
    };
    for init in [GridInit::Search, GridInit::Base] {
        let o = TrainOptions {
            qat_start: 0.5,
            lsq_init: init,
            ..opts(QatMode::Lsq, 6)
        };
        assert_eq!(o.qat_start_step(), 3);
        let mut plain = Trainer::new(&model, plain_o.clone(), train.clone(), val.clone()).unwrap();
        let mut late = Trainer::new(&model, o.clone(), train.clone(), val.clone()).unwrap();
        let base_grids = late.grids.clone();
        // Steps 1-3: plain LoRA, bit for bit (losses, gradient norms, adapters, validation).
        for _ in 0..3 {
            let (a, b) = (plain.train_step().unwrap(), late.train_step().unwrap());
            assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}", a.step);
            assert_eq!(
                a.grad_norm.to_bits(),
                b.grad_norm.to_bits(),
                "step {}",
                a.step
            );
            assert!(bits(&plain.lora()) == bits(&late.lora()), "step {}", a.step);
        }
        assert_eq!(late.qat_from, None);
        assert_eq!(late.qat_mode(), QatMode::None);
        assert_eq!(
            plain.evaluate().unwrap().map(f64::to_bits),
            late.evaluate().unwrap().map(f64::to_bits)
        );
        // Step 4: the loss of the adapters fake-quantized onto the grid `init` names.
        let grid = match init {
            GridInit::Search => base_grids.searched(&model, &late.lora()).unwrap(),
            GridInit::Base => base_grids.clone(),
        };
        if init == GridInit::Search {
            assert_ne!(
                grid, base_grids,
                "the search kept the base's grid everywhere"
            );
        }
        let fq = FakeQuant::new(&model, &late.lora(), QatMode::Lsq, &grid).unwrap();
        let want = step_loss(&model, &o, &train, 3, &late.lora(), Some(&fq));
        let plain_want = step_loss(&model, &o, &train, 3, &late.lora(), None);
        let (a, b) = (plain.train_step().unwrap(), late.train_step().unwrap());
        assert_eq!(late.qat_from, Some(3));
        assert_eq!(late.qat_mode(), QatMode::Lsq);
        assert!(
            (a.loss - plain_want).abs() <= 1e-9 * plain_want,
            "{a:?} vs {plain_want}"
        );
        assert!(
            (b.loss - want).abs() <= 1e-9 * want,
            "{init:?}: {b:?} vs {want}"
        );
        assert!(a.loss != b.loss, "{init:?}: the switch changed nothing");
        // lsq learns from there: the grid moved off its starting point.
        assert_ne!(
            late.grids, grid,
            "{init:?}: lsq learned nothing after the switch"
        );
    }
    // Bad fractions are refused with what was wrong.
    for (f, says) in [(1.0, "[0, 1)"), (-0.1, "[0, 1)"), (f32::NAN, "[0, 1)")] {
        let o = TrainOptions {
            qat_start: f,
            ..opts(QatMode::Ste, 6)
        };
        let err = format!("{:?}", o.validate().err());
        assert!(err.contains(says), "{f}: {err}");
    }
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

/// Largest |a − b| over the largest |a| of one tensor (0 when both are zero).
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    if diff == 0.0 {
        0.0
    } else {
        diff / scale
    }
}

fn stages_of(ranges: &[std::ops::Range<usize>], schedule: Schedule) -> Stages {
    Stages {
        layers: ranges.to_vec(),
        threads: vec![1; ranges.len()],
        schedule,
    }
}

#[test]
fn a_pipelined_step_equals_the_single_worker_step() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synthetic(dir.path(), "q8_0", 6));
    let samples = text_samples(&model, 24);
    let (train, val) = data::split(samples, 0.2).unwrap();
    for (qat, checkpoint, dropout) in [
        (QatMode::None, Checkpoint::None, 0.1),
        (QatMode::Ste, Checkpoint::Every(1), 0.0),
        // Learned grids: their gradients count in the global norm and are stepped after the
        // stages' flush.
        (QatMode::Lsq, Checkpoint::Sqrt, 0.0),
    ] {
        let o = TrainOptions {
            lora: LoraConfig {
                dropout,
                ..lora_cfg(&[Target::Q, Target::V, Target::Down])
            },
            steps: 3,
            seq_len: 24,
            accum: 4,
            warmup: 1,
            clip: 0.05,
            qat,
            checkpoint,
            ..TrainOptions::default()
        };
        let mut one = Trainer::new(&model, o.clone(), train.clone(), val.clone()).unwrap();
        let reference: Vec<_> = (0..2)
            .map(|_| (one.train_step().unwrap(), one.grads()))
            .collect();
        for ranges in [vec![0..3, 3..6], vec![0..1, 1..4, 4..6]] {
            for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
                let mut p = Trainer::new(&model, o.clone(), train.clone(), val.clone()).unwrap();
                p.set_stages(stages_of(&ranges, schedule)).unwrap();
                for (step, (rec, grads)) in reference.iter().enumerate() {
                    let r = p.train_step().unwrap();
                    let what =
                        format!("{qat:?} {checkpoint:?} {ranges:?} {schedule:?} step {step}");
                    assert!(
                        (r.loss - rec.loss).abs() <= 1e-4 * rec.loss.abs(),
                        "{what}: loss"
                    );
                    assert!(
                        (r.grad_norm - rec.grad_norm).abs() <= 1e-4 * rec.grad_norm,
                        "{what}: norm {} vs {}",
                        r.grad_norm,
                        rec.grad_norm
                    );
                    let g = p.grads();
                    let mut nonzero = 0;
                    for (a, b) in grads.params().zip(g.params()) {
                        assert!(rel_diff(a, b) <= 1e-4, "{what}: {}", rel_diff(a, b));
                        nonzero += usize::from(a.iter().any(|&v| v != 0.0));
                    }
                    assert!(nonzero > 0, "{what}: some gradient is not zero");
                    // Every stage ran each micro-batch's forward and backward once.
                    assert_eq!(p.timeline().len(), 2 * 4 * ranges.len(), "{what}");
                }
                for (a, b) in one.lora().params().zip(p.lora().params()) {
                    assert!(rel_diff(a, b) <= 1e-4);
                }
                for (a, b) in one.grids.params().zip(p.grids.params()) {
                    assert!(rel_diff(a, b) <= 1e-4, "{qat:?}: grids {}", rel_diff(a, b));
                }
                if qat == QatMode::Lsq {
                    let fresh = Trainer::new(&model, o.clone(), train.clone(), val.clone());
                    assert_ne!(fresh.unwrap().grids, p.grids, "the grids were learned");
                }
            }
        }
    }
}

/// Validation runs through the stages like the training forward (each stage with its own layers
/// and adapters; none are gathered): after one step, its loss over 2 and 3 stages equals the
/// single worker's, with plain and fake-quantized adapters, on every validation sequence or a
/// few.
#[test]
fn validation_through_stages_equals_the_single_worker() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synthetic(dir.path(), "q8_0", 6));
    let samples = text_samples(&model, 16);
    let (train, val) = data::split(samples, 0.3).unwrap();
    assert!(val.len() >= 3, "{} validation sequences", val.len());
    for (qat, eval_samples) in [(QatMode::None, 0), (QatMode::Ste, 2)] {
        let o = TrainOptions {
            lora: lora_cfg(&[Target::Q, Target::V, Target::Down]),
            steps: 2,
            seq_len: 16,
            accum: 3,
            warmup: 1,
            qat,
            eval_samples,
            ..TrainOptions::default()
        };
        let mut one = Trainer::new(&model, o.clone(), train.clone(), val.clone()).unwrap();
        let before = one.evaluate().unwrap().unwrap();
        let rec = one.train_step().unwrap();
        let want = one.evaluate().unwrap().unwrap();
        assert!(
            (want - before).abs() > 1e-6,
            "{qat:?}: the step changed the loss"
        );
        for ranges in [vec![0..3, 3..6], vec![0..1, 1..4, 4..6]] {
            let mut p = Trainer::new(&model, o.clone(), train.clone(), val.clone()).unwrap();
            p.set_stages(stages_of(&ranges, Schedule::OneFOneB))
                .unwrap();
            let r = p.train_step().unwrap();
            let got = p.evaluate().unwrap().unwrap();
            let what = format!("{qat:?} {ranges:?}");
            assert!(
                (r.loss - rec.loss).abs() <= 1e-4 * rec.loss.abs(),
                "{what}: loss"
            );
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "{what}: validation loss {got} vs {want}"
            );
        }
    }
    // No validation sequences: no validation loss, over stages too.
    let o = TrainOptions {
        steps: 1,
        seq_len: 16,
        ..TrainOptions::default()
    };
    let mut p = Trainer::new(&model, o, train, Vec::new()).unwrap();
    p.set_stages(stages_of(&[0..2, 2..6], Schedule::GPipe))
        .unwrap();
    assert_eq!(p.evaluate().unwrap(), None);
}

#[test]
fn one_f_one_b_holds_at_most_n_micro_batches_per_stage() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synthetic(dir.path(), "q8_0", 3));
    let samples = text_samples(&model, 16);
    let (n, m) = (3, 8);
    let o = TrainOptions {
        steps: 1,
        seq_len: 16,
        accum: m,
        ..TrainOptions::default()
    };
    let run = |schedule| {
        let mut t = Trainer::new(&model, o.clone(), samples.clone(), Vec::new()).unwrap();
        t.set_stages(stages_of(&[0..1, 1..2, 2..3], schedule))
            .unwrap();
        t.train_step().unwrap();
        t
    };
    let (g, f) = (run(Schedule::GPipe), run(Schedule::OneFOneB));
    for s in 0..n {
        let (gs, fs) = (&g.last_step[s], &f.last_step[s]);
        assert_eq!(gs.peak_live, m, "GPipe holds every micro-batch");
        assert!(fs.peak_live <= n, "stage {s}: {} live", fs.peak_live);
        assert_eq!(fs.peak_live, n - s);
        // Equal-length sequences: activation bytes scale with the micro-batches held.
        assert!(
            fs.peak_activation_bytes * m <= gs.peak_activation_bytes * n,
            "stage {s}: 1F1B {} vs GPipe {} bytes",
            fs.peak_activation_bytes,
            gs.peak_activation_bytes
        );
    }
    // The timeline keeps the data dependencies: a forward follows the previous stage's, a
    // backward the next stage's, and a stage runs one step at a time.
    for t in [&g, &f] {
        let tl = t.timeline();
        let at = |stage: usize, step: Step| {
            *tl.iter()
                .find(|x| x.stage == stage && x.step == step)
                .unwrap()
        };
        for i in 0..m {
            for s in 1..n {
                assert!(at(s, Step::Forward(i)).start >= at(s - 1, Step::Forward(i)).end);
                assert!(at(s - 1, Step::Backward(i)).start >= at(s, Step::Backward(i)).end);
            }
        }
        for s in 0..n {
            let mut mine: Vec<_> = tl.iter().filter(|x| x.stage == s).collect();
            mine.sort_by(|a, b| a.start.total_cmp(&b.start));
            assert!(mine.windows(2).all(|w| w[0].end <= w[1].start));
        }
    }
}

#[test]
fn cli_tunes_over_stages_and_refuses_bad_stage_options() {
    let dir = tempfile::tempdir().unwrap();
    let base = synthetic(dir.path(), "q8_0", 4);
    let data = dir.path().join("data.txt");
    std::fs::write(
        &data,
        "Now is the winter of our discontent made glorious summer by this sun of York. ".repeat(8),
    )
    .unwrap();
    let out = dir.path().join("adapter");
    let png = dir.path().join("timeline.png");
    let pare = |extra: &[&str]| {
        let mut args = vec![
            "tune",
            "-m",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "2",
            "--seq-len",
            "24",
            "-o",
            out.to_str().unwrap(),
            "-t",
            "2",
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_pare"))
            .args(&args)
            .output()
            .unwrap()
    };
    let o = pare(&[
        "--stages",
        "2",
        "--micro-batches",
        "3",
        "--schedule",
        "gpipe",
        "--checkpoint",
        "every",
        "--timeline",
        png.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("pipeline plan: 2 stages"), "{err}");
    assert!(
        err.contains("bubble") && err.contains("theory 25.0%"),
        "{err}"
    );
    assert!(out.join("adapter_model.safetensors").exists());
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
    for (bad, says) in [
        (&["--schedule", "gpipe"][..], "give --stages"),
        (&["--micro-batches", "4"][..], "give --stages"),
        (&["--stages", "2", "--micro-batches", "0"][..], "at least 1"),
        (
            &["--stages", "2", "--schedule", "zigzag"][..],
            "unknown schedule",
        ),
        (
            &["--stages", "2", "--micro-batches", "2", "--accum", "3"][..],
            "disagree",
        ),
        (&["--stages", "9"][..], "stages"),
        // QAT's options without QAT, and a fraction out of range.
        (&["--qat-start", "0.5"][..], "needs --qat"),
        (
            &["--qat", "ste", "--lsq-init", "search"][..],
            "needs --qat lsq",
        ),
        (
            &["--qat", "lsq", "--lsq-init", "best"][..],
            "expected base or search",
        ),
        (&["--qat", "ste", "--qat-start", "1.5"][..], "[0, 1)"),
    ] {
        let o = pare(bad);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{bad:?}: {err}");
    }
}
