//! The training pass against independent references on small synthetic models
//! (scripts/make_synthetic_model.py): its loss against the inference forward pass (with adapters
//! applied through the inference hook), and its gradients against central finite differences —
//! for adapter parameters in every layer and for the hidden state entering layer 0, so the
//! gradient is checked through every op of every layer; and `--qat lsq`'s step-size and minimum
//! gradients against finite differences of the forward they are the derivative of.

mod common;

use pare::model::backward::{MergedWeight, Trainable};
use pare::model::{Logits, Lora, LoraConfig, Model, State, Target};
use pare::train::fake_quant::{FakeQuant, Grids, QatMode};

fn synthetic(arch: &str, ty: &str) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = common::synthetic_model(dir.path(), arch, ty, 3, 2);
    let mut model = Model::load(&path).unwrap();
    model.exact_activations = true;
    (dir, model)
}

/// Adapters on every target with non-zero B, so that A gets a gradient too.
fn random_lora(model: &Model, rank: usize, seed: u64) -> Lora {
    let cfg = LoraConfig {
        rank,
        alpha: 2.0 * rank as f32,
        targets: Target::ALL.to_vec(),
        dropout: 0.0,
        rslora: false,
    };
    let mut lora = Lora::new(&model.config, cfg, seed).unwrap();
    let mut rng = pare::infer::sampling::Rng::new(seed + 1);
    for layer in &mut lora.layers {
        for ad in layer.iter_mut().flatten() {
            for b in &mut ad.b {
                *b = (rng.next_f64() as f32 - 0.5) * 0.2;
            }
        }
    }
    lora
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 256).collect()
}

/// Mean next-token loss over `toks` through the training pass (and its gradients when asked).
fn loss(t: &Trainable, toks: &[u32], grads: Option<&mut Lora>) -> f64 {
    let n = toks.len() - 1;
    let w = vec![1.0 / n as f32; n];
    let mut x = t.embed(&toks[..n]).unwrap();
    let layers = 0..t.model.config.n_layer;
    let tapes = t.forward_layers(layers.clone(), &mut x, true).unwrap();
    match grads {
        None => t.head_loss(&x, &toks[1..], &w, None).unwrap(),
        Some(g) => {
            let mut dx = vec![0.0; x.len()];
            let l = t.head_loss(&x, &toks[1..], &w, Some(&mut dx)).unwrap();
            t.backward_layers(layers, &tapes, &mut dx, g).unwrap();
            l
        }
    }
}

#[test]
fn training_loss_matches_the_inference_forward_with_adapters() {
    for arch in ["llama", "qwen3"] {
        let (_dir, mut model) = synthetic(arch, "f32");
        let lora = random_lora(&model, 3, 5);
        let toks = tokens(24);
        let train = Trainable {
            model: &model,
            lora: &lora,
            merged: None,
            dropout_seed: None,
        };
        let got = loss(&train, &toks, None);
        // The inference pass, adapters through its hook, scored the same way.
        model.lora = Some(std::sync::Arc::new(lora.clone()));
        let mut st = State::new(&model, 64).unwrap();
        model.forward(&mut st, &toks[..23], Logits::All).unwrap();
        let nv = model.config.n_vocab;
        let want: f64 = (0..23)
            .map(|t| pare::eval::perplexity::nll(&st.logits[t * nv..(t + 1) * nv], toks[t + 1]))
            .sum::<f64>()
            / 23.0;
        assert!(
            (got - want).abs() < 1e-4 * want.abs().max(1.0),
            "{arch}: training loss {got} vs inference {want}"
        );
        // And the adapters change the loss (the hook is not a no-op).
        model.lora = None;
        let mut st = State::new(&model, 64).unwrap();
        model.forward(&mut st, &toks[..23], Logits::All).unwrap();
        let base: f64 = (0..23)
            .map(|t| pare::eval::perplexity::nll(&st.logits[t * nv..(t + 1) * nv], toks[t + 1]))
            .sum::<f64>()
            / 23.0;
        assert!(
            (base - want).abs() > 1e-3,
            "{arch}: adapters changed nothing"
        );
    }
}

/// The head's loss is computed tile by tile of the vocabulary with a running log-sum-exp (the
/// logits are never held whole): small tiles, the last one shorter, give the one-tile loss and
/// gradient (a synthetic vocabulary of 256 fits one tile of the default size).
#[test]
fn head_loss_over_many_tiles_equals_one_tile() {
    let (_dir, model) = synthetic("llama", "q8_0");
    let lora = random_lora(&model, 2, 9);
    let t = Trainable {
        model: &model,
        lora: &lora,
        merged: None,
        dropout_seed: None,
    };
    let toks = tokens(20);
    let n = toks.len() - 1;
    // Unequal weights, one position unscored.
    let w: Vec<f32> = (0..n)
        .map(|i| if i == 3 { 0.0 } else { 0.5 + i as f32 / 19.0 })
        .collect();
    let mut x = t.embed(&toks[..n]).unwrap();
    t.forward_layers(0..model.config.n_layer, &mut x, false)
        .unwrap();
    let nv = model.config.n_vocab;
    let mut want_dx = vec![0.0; x.len()];
    let want = t
        .head_loss_tiled(&x, &toks[1..], &w, Some(&mut want_dx), nv)
        .unwrap();
    for tile in [1, 7, 100, 255] {
        let mut dx = vec![0.0; x.len()];
        let got = t
            .head_loss_tiled(&x, &toks[1..], &w, Some(&mut dx), tile)
            .unwrap();
        assert!(
            (got - want).abs() <= 1e-6 * want.abs(),
            "tile {tile}: {got} vs {want}"
        );
        let no_grad = t.head_loss_tiled(&x, &toks[1..], &w, None, tile).unwrap();
        assert_eq!(
            no_grad, got,
            "tile {tile}: the loss does not depend on the gradient"
        );
        let scale = want_dx.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        for (a, b) in dx.iter().zip(&want_dx) {
            assert!((a - b).abs() <= 1e-5 * scale, "tile {tile}: dx {a} vs {b}");
        }
        // The unscored position gets no gradient.
        let d = model.config.n_embd;
        assert!(dx[3 * d..4 * d].iter().all(|&v| v == 0.0));
    }
    assert!(t.head_loss_tiled(&x, &toks[1..], &w, None, 0).is_err());
}

/// Checks analytic against central-difference derivatives; returns the worst relative error.
fn check(what: &str, analytic: &[f64], numeric: &[f64]) {
    let scale = numeric
        .iter()
        .chain(analytic)
        .fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1e-4, "{what}: all derivatives vanish ({scale})");
    let worst = analytic
        .iter()
        .zip(numeric)
        .map(|(a, n)| (a - n).abs() / scale)
        .fold(0.0f64, f64::max);
    eprintln!(
        "{what}: {} derivatives, scale {scale:.3e}, worst error {worst:.2e} of scale",
        analytic.len()
    );
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a - n).abs();
        assert!(
            err <= 2e-2 * a.abs().max(n.abs()) + 2e-3 * scale,
            "{what}[{i}]: analytic {a} vs finite difference {n} (scale {scale})"
        );
    }
}

fn gradient_check(arch: &str, ty: &str) {
    let (_dir, model) = synthetic(arch, ty);
    let toks = tokens(20);
    let mut lora = random_lora(&model, 2, 9);
    let mut grads = Lora::zeros(&model.config, lora.config.clone());
    {
        let t = Trainable {
            model: &model,
            lora: &lora,
            merged: None,
            dropout_seed: None,
        };
        loss(&t, &toks, Some(&mut grads));
    }
    let eps = 2e-3f32;
    let n_layer = model.config.n_layer;
    let (mut an, mut nu) = (Vec::new(), Vec::new());
    for l in [0, n_layer - 1] {
        for target in Target::ALL {
            for (which, idx) in [("A", 1usize), ("B", 3)] {
                let g = grads.adapter(l, target).unwrap();
                an.push(if which == "A" { g.a[idx] } else { g.b[idx] } as f64);
                let mut at = |delta: f32| {
                    let ad = lora.layers[l][target as usize].as_mut().unwrap();
                    let p = if which == "A" {
                        &mut ad.a[idx]
                    } else {
                        &mut ad.b[idx]
                    };
                    let old = *p;
                    *p += delta;
                    let t = Trainable {
                        model: &model,
                        lora: &lora,
                        merged: None,
                        dropout_seed: None,
                    };
                    let v = loss(&t, &toks, None);
                    let ad = lora.layers[l][target as usize].as_mut().unwrap();
                    if which == "A" {
                        ad.a[idx] = old
                    } else {
                        ad.b[idx] = old
                    }
                    v
                };
                nu.push((at(eps) - at(-eps)) / (2.0 * eps as f64));
            }
        }
    }
    check(&format!("{arch} {ty} adapter gradients"), &an, &nu);

    // The gradient at the input of layer 0, through every layer.
    let t = Trainable {
        model: &model,
        lora: &lora,
        merged: None,
        dropout_seed: None,
    };
    let n = toks.len() - 1;
    let w = vec![1.0 / n as f32; n];
    let x0 = t.embed(&toks[..n]).unwrap();
    let run = |x0: &[f32], want_dx: bool| -> (f64, Vec<f32>) {
        let mut x = x0.to_vec();
        let tapes = t.forward_layers(0..n_layer, &mut x, true).unwrap();
        let mut dx = vec![0.0; x.len()];
        let l = t
            .head_loss(&x, &toks[1..], &w, want_dx.then_some(&mut dx[..]))
            .unwrap();
        if want_dx {
            let mut g = Lora::zeros(&model.config, lora.config.clone());
            t.backward_layers(0..n_layer, &tapes, &mut dx, &mut g)
                .unwrap();
        }
        (l, dx)
    };
    let (_, dx) = run(&x0, true);
    let d = model.config.n_embd;
    let (mut an, mut nu) = (Vec::new(), Vec::new());
    for i in [0, 5, d + 17, 7 * d + 3, (n - 1) * d + 40] {
        let mut xp = x0.clone();
        xp[i] += eps;
        let lp = run(&xp, false).0;
        xp[i] -= 2.0 * eps;
        let lm = run(&xp, false).0;
        an.push(dx[i] as f64);
        nu.push((lp - lm) / (2.0 * eps as f64));
    }
    check(&format!("{arch} {ty} input gradient"), &an, &nu);
}

#[test]
fn gradients_match_finite_differences_llama_f32() {
    gradient_check("llama", "f32");
}

#[test]
fn gradients_match_finite_differences_qwen3_f32() {
    gradient_check("qwen3", "f32");
}

#[test]
fn gradients_match_finite_differences_through_quantized_weights() {
    gradient_check("llama", "q8_0");
}

#[test]
fn peft_adapters_round_trip_and_use_hugging_face_row_order() {
    let (_dir, model) = synthetic("llama", "f32");
    let lora = random_lora(&model, 4, 11);
    let out = tempfile::tempdir().unwrap();
    lora.save(out.path(), "synthetic").unwrap();
    let back = Lora::load(out.path(), &model.config).unwrap();
    assert_eq!(back, lora);
    // On disk, q's B rows are in Hugging Face's split-halves order: HF row h*d + j*d/2 + i is
    // GGUF row h*d + 2i + j.
    let st = pare::format::safetensors::SafetensorsFile::open(
        out.path().join(pare::model::lora::WEIGHTS_FILE),
    )
    .unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let e = st.get(key).unwrap();
    let mut disk = vec![0.0f32; e.n_elements()];
    pare::format::safetensors::to_f32(e.dtype, st.data(e), &mut disk).unwrap();
    let ad = lora.adapter(0, Target::Q).unwrap();
    let hd = model.config.head_dim;
    let r = ad.rank;
    for h in 0..model.config.n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let hf = h * hd + j * hd / 2 + i;
                let gg = h * hd + 2 * i + j;
                assert_eq!(disk[hf * r..(hf + 1) * r], ad.b[gg * r..(gg + 1) * r]);
            }
        }
    }
    // v is not permuted.
    let e = st
        .get("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
        .unwrap();
    let mut disk = vec![0.0f32; e.n_elements()];
    pare::format::safetensors::to_f32(e.dtype, st.data(e), &mut disk).unwrap();
    assert_eq!(disk, lora.adapter(1, Target::V).unwrap().b);
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join(pare::model::lora::CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
}

/// `--qat lsq`'s reference forward, written independently of the library from the definition it
/// differentiates: each adapted weight `v = W + s·B·A` becomes `d·(clamp(u, 0, Q_p) + r) + m` with
/// `u = (v − m)/d` on its group's grid (an asymmetric 3-bit format here) and the rounding residual
/// `r = round(clamp(u₀)) − clamp(u₀)` held at its value at the grids `at` (PyTorch's
/// `(round(x) − x).detach() + x`). At `at` itself it is the fake quantizer's forward.
struct DetachedRounding<'a> {
    grids: &'a Grids,
    at: &'a Grids,
}

impl MergedWeight for DetachedRounding<'_> {
    fn effective(
        &self,
        l: usize,
        t: Target,
        w: &pare::quant::matmul::QMatrix,
        ad: &pare::model::lora::Adapter,
        s: f32,
        out: &mut Vec<f32>,
    ) -> pare::Result<()> {
        pare::model::dense::dequantize(w, out)?;
        let mut delta = vec![0.0f32; out.len()];
        ad.delta(s, &mut delta);
        let (g, g0) = (self.grids.get(l, t).unwrap(), self.at.get(l, t).unwrap());
        let qp = g.p.max_code() as f64;
        let gs = g.p.group as usize;
        let k = g.groups();
        for (r, row) in out.chunks_mut(w.cols).enumerate() {
            for (j, xg) in row.chunks_mut(gs).enumerate() {
                let i = r * k + j;
                let (d, m, d0, m0) = (g.d[i] as f64, g.m[i] as f64, g0.d[i] as f64, g0.m[i] as f64);
                for (c, x) in xg.iter_mut().enumerate() {
                    let v = *x as f64 + delta[r * w.cols + j * gs + c] as f64;
                    let c0 = ((v - m0) / d0).clamp(0.0, qp);
                    let res = c0.round() - c0;
                    *x = (d * (((v - m) / d).clamp(0.0, qp) + res) + m) as f32;
                }
            }
        }
        Ok(())
    }

    fn backward(
        &self,
        _: usize,
        _: Target,
        _: &pare::quant::matmul::QMatrix,
        _: &pare::model::lora::Adapter,
        _: f32,
        _: &mut [f32],
    ) -> pare::Result<()> {
        unreachable!("the reference is only run forward")
    }
}

#[test]
fn lsq_step_size_gradients_match_finite_differences() {
    // A tiny 3-bit model (q3_g32: a learned scale and minimum per group of 32).
    let dir = tempfile::tempdir().unwrap();
    let f32_path = common::synthetic_model(dir.path(), "llama", "f32", 3, 2);
    let path = dir.path().join("q3_g32.gguf");
    pare::convert::convert(
        &pare::convert::GgufSource::open(&f32_path).unwrap(),
        &path,
        &pare::convert::ConvertOptions::new(pare::quant::format::parse("q3_g32").unwrap()),
        |_| {},
    )
    .unwrap();
    let mut model = Model::load(&path).unwrap();
    model.exact_activations = true;
    // Large adapters, so that some merged values leave their group's range (the clipped terms).
    let mut lora = random_lora(&model, 2, 9);
    for p in lora.params_mut() {
        for v in p.iter_mut() {
            *v *= 3.0;
        }
    }
    let grids = Grids::of_base(&model, &Target::ALL, QatMode::Lsq).unwrap();
    let toks = tokens(20);
    let fq = FakeQuant::new(&model, &lora, QatMode::Lsq, &grids).unwrap();
    let mut g = Lora::zeros(&model.config, lora.config.clone());
    let trained = {
        let t = Trainable {
            model: &model,
            lora: &lora,
            merged: Some(&fq),
            dropout_seed: None,
        };
        loss(&t, &toks, Some(&mut g))
    };
    let grid_grads = fq.grid_grads();
    let at_grids = |gr: &Grids| {
        let r = DetachedRounding {
            grids: gr,
            at: &grids,
        };
        let t = Trainable {
            model: &model,
            lora: &lora,
            merged: Some(&r),
            dropout_seed: None,
        };
        loss(&t, &toks, None)
    };
    // The reference at the expansion point is the fake quantizer's forward.
    let reference = at_grids(&grids);
    assert!(
        (reference - trained).abs() < 1e-5 * trained,
        "reference forward {reference} vs fake quantizer {trained}"
    );
    // LSQ's gradient scale for groups of 32 at 3 bits (Q_p = 7).
    let scale = 1.0 / (32.0f64 * 7.0).sqrt();
    let (mut an, mut nu) = (Vec::new(), Vec::new());
    let mut clipped = 0;
    for (l, t, group) in [
        (0, Target::Q, 0),
        (0, Target::Gate, 7),
        (1, Target::V, 3),
        (1, Target::Down, 9),
        (1, Target::O, 12),
        (0, Target::Up, 30),
    ] {
        for which in ["d", "m"] {
            let gg = grid_grads.get(l, t).unwrap();
            let a = if which == "d" {
                gg.d[group]
            } else {
                gg.m[group]
            };
            an.push(a as f64 / scale);
            clipped += (a != 0.0 && which == "m") as usize;
            let base = grids.get(l, t).unwrap();
            let eps = 1e-3 * base.d[group].abs();
            let at = |delta: f32| {
                let mut gr = grids.clone();
                let gm = gr.layers[l][t as usize].as_mut().unwrap();
                if which == "d" {
                    gm.d[group] += delta
                } else {
                    gm.m[group] += delta
                }
                at_grids(&gr)
            };
            nu.push((at(eps) - at(-eps)) / (2.0 * eps as f64));
        }
    }
    // Some minimum gradients are non-zero: values outside their group's range were met.
    assert!(clipped > 0, "no clipped values: the test checks too little");
    check("lsq step size and minimum gradients", &an, &nu);
}
