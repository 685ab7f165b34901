//! Sparse FFN execution end to end on a small synthetic Llama (scripts/make_synthetic_model.py):
//! calibrate, sparsify, load, and compare with the unsparsified model.
//!
//! The transposed-group copies hold the source's own quantized values, so the sparse path with
//! every threshold 0 must give the original model's logits (same weights, same 8-bit activations)
//! up to float summation order: that checks the layout, the hot set and the kernels together.

mod common;

use pare::convert::open_source;
use pare::model::{Logits, Model, State};
use pare::plan::sparse_alloc;
use pare::plan::sparsify::{self, Criterion, SparsityPlan, WriteOptions};

struct Fixture {
    _dir: tempfile::TempDir,
    original: std::path::PathBuf,
    sparse: std::path::PathBuf,
    calib: Vec<u32>,
    plan: SparsityPlan,
}

fn original(dir: &std::path::Path, ty: &str) -> std::path::PathBuf {
    let original = dir.join(format!("llama-{ty}.gguf"));
    common::run_script(
        "make_synthetic_model.py",
        &[
            original.to_str().unwrap(),
            "--arch",
            "llama",
            "--seed",
            "3",
            "--type",
            ty,
        ],
    );
    original
}

fn calibration() -> Vec<u32> {
    (0..256u32).map(|i| (i * 97 + 13) % 256).collect()
}

fn fixture(ty: &str) -> Fixture {
    fixture_with(ty, Criterion::Activation)
}

fn fixture_with(ty: &str, criterion: Criterion) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let original = original(dir.path(), ty);
    let model = Model::load(&original).unwrap();
    let calib = calibration();
    let stats = sparsify::collect_stats(&model, &calib, 64, None, criterion, |_, _| {}).unwrap();
    assert_eq!(stats.tokens, 256);
    let src = open_source(&original).unwrap();
    let shares = sparsify::code_shares(&sparsify::copies(src.as_ref(), &model.config).unwrap());
    let plan = SparsityPlan::new(&stats, 0.25, &[0.2, 0.4, 0.6], &shares).unwrap();
    // Hot neurons first: frequencies do not increase along the permutation.
    for lp in &plan.layers {
        let f: Vec<f32> = lp.perm.iter().map(|&j| lp.freq[j as usize]).collect();
        assert!(f.windows(2).all(|w| w[0] >= w[1]));
        let mut sorted = lp.perm.clone();
        sorted.sort();
        assert_eq!(sorted, (0..lp.perm.len() as u32).collect::<Vec<_>>());
    }
    let sparse = dir.path().join(format!("llama-{ty}.sparse.gguf"));
    let opts = WriteOptions::default();
    sparsify::write_sparsified(
        src.as_ref(),
        &model.config,
        &plan,
        "synthetic",
        &sparse,
        &opts,
        |_, _| {},
    )
    .unwrap();
    Fixture {
        _dir: dir,
        original,
        sparse,
        calib,
        plan,
    }
}

/// Decoding one token at a time is the sparse path's case.
use common::decode_logits as decode;

fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs() / scale);
        }
    }
    worst
}

const PROMPT: [u32; 24] = [
    188, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 3, 9, 250, 17, 64, 65, 66, 200,
    201, 5, 77,
];

#[test]
fn sparse_path_at_zero_equals_the_original_model() {
    let f = fixture("q8_0");
    let original = Model::load(&f.original).unwrap();
    let want = decode(&original, &PROMPT);

    let mut sparse = Model::load(&f.sparse).unwrap();
    assert!(sparse.sparse.is_some());
    // Dense (S = 0): the source's own tensors, bit for bit.
    sparse.set_sparsity(0.0).unwrap();
    assert_eq!(decode(&sparse, &PROMPT), want);
    // The sparse kernels on the transposed-group copies, nothing skipped.
    sparse.set_sparse_path(0.0).unwrap();
    let got = decode(&sparse, &PROMPT);
    if pare::quant::kernels::isa() == pare::quant::kernels::Isa::Scalar {
        // Same weights, same 8-bit activations, and the scalar paths sum in the same order.
        assert_eq!(got, want);
    }
    // The SIMD paths sum in another order than the dense kernels; now and then that moves an
    // activation across an 8-bit rounding boundary, which changes that token's logits by about
    // 1% (measured: 5 of 24 tokens at 0.5-1.2%, the others bit-identical). A wrong layout or
    // kernel changes every token by far more.
    let per: Vec<f32> = (0..got.len())
        .map(|t| max_rel_diff(&got[t..t + 1], &want[t..t + 1]))
        .collect();
    let close = per.iter().filter(|&&d| d < 1e-4).count();
    assert!(
        close * 2 >= per.len() && per.iter().all(|&d| d < 0.05),
        "sparse path at S = 0 differs from dense: {per:?}"
    );
    let st = sparse.sparse.as_ref().unwrap().stats();
    assert_eq!(
        st.token_layers,
        (PROMPT.len() * sparse.config.n_layer) as u64
    );
    // Only inputs whose 8-bit activation is 0 are skipped (they contribute nothing).
    assert!(st.sparsity() < 0.05, "{}", st.sparsity());
}

/// The weight-aware rule's weights are the column norms of the source's weights (normalised to
/// a root mean square of 1), stored in the file and read back exactly; `--criterion activation`
/// files carry none (the plain |value| test, as files written before the weights existed).
#[test]
fn weighted_rule_is_stored_and_read_back() {
    let f = fixture_with("q8_0", Criterion::Weighted);
    let original = Model::load(&f.original).unwrap();
    let norms = sparsify::column_norms(&original).unwrap();
    let sparse = Model::load(&f.sparse).unwrap();
    let layers = &sparse.sparse.as_ref().unwrap().layers;
    assert_eq!(layers.len(), norms.len());
    for (sl, n) in layers.iter().zip(&norms) {
        assert_eq!(sl.rule.input_scale, n.input);
        assert_eq!(sl.rule.neuron_scale, n.neuron);
        for v in [&n.input, &n.neuron] {
            let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
            assert!((rms - 1.0).abs() < 1e-3, "{rms}");
            assert!(v.iter().any(|&x| (x - 1.0).abs() > 0.01), "all weights 1");
        }
    }
    // Column norms from the dequantized rows, directly: input j of gate/up in layer 0.
    let lw = &original.weights.layers[0];
    let mut row = vec![0f32; lw.gate.cols];
    let mut sq = vec![0f64; lw.gate.cols];
    for w in [&lw.gate, &lw.up] {
        for r in 0..w.rows {
            w.dequantize_row(r, &mut row).unwrap();
            for (a, &v) in sq.iter_mut().zip(&row) {
                *a += (v as f64).powi(2);
            }
        }
    }
    let rms = (sq.iter().sum::<f64>() / sq.len() as f64).sqrt();
    for (j, &a) in sq.iter().enumerate() {
        assert!((a.sqrt() / rms - norms[0].input[j] as f64).abs() < 1e-5);
    }
    // The sparse path applies the weighted rule as the simulation does.
    let mut sparse = sparse;
    simulation_matches_the_sparse_path(&original, &mut sparse, &f.plan);
    // A file calibrated on |value| alone carries no weights.
    let plain = fixture("q8_0");
    let m = Model::load(&plain.sparse).unwrap();
    let rule = &m.sparse.as_ref().unwrap().layers[0].rule;
    assert!(rule.input_scale.is_empty() && rule.neuron_scale.is_empty());
}

/// At every level of `plan`, decoding on the sparse path of `sparse` (written from `plan`)
/// computes what the dense-path simulation of `plan`'s rules does on `model` (up to summation
/// order, see the S = 0 test above).
fn simulation_matches_the_sparse_path(model: &Model, sparse: &mut Model, plan: &SparsityPlan) {
    let rules = sparse_alloc::rules(plan);
    for (k, &s) in plan.levels.iter().enumerate() {
        sparse.set_sparsity(s).unwrap();
        let want = decode(sparse, &PROMPT);
        let mask = pare::model::sparse_ffn::FfnMask {
            thresholds: plan
                .layers
                .iter()
                .map(|l| Some((l.input_thresholds[k], l.neuron_thresholds[k])))
                .collect(),
            rules: rules.clone(),
        };
        let mut st = State::new(model, PROMPT.len()).unwrap();
        st.ffn_mask = Some(std::sync::Arc::new(mask));
        let got: Vec<Vec<f32>> = PROMPT
            .iter()
            .map(|&t| {
                model.forward(&mut st, &[t], Logits::Last).unwrap();
                st.logits.clone()
            })
            .collect();
        let per: Vec<f32> = (0..got.len())
            .map(|t| max_rel_diff(&got[t..t + 1], &want[t..t + 1]))
            .collect();
        assert!(
            per.iter().filter(|&&d| d < 1e-4).count() * 2 >= per.len()
                && per.iter().all(|&d| d < 0.05),
            "level {s}: simulated and sparse paths differ: {per:?}"
        );
    }
}

#[test]
fn levels_skip_what_they_promise_and_change_the_output_gradually() {
    let f = fixture("q8_0");
    let mut model = Model::load(&f.sparse).unwrap();
    let dense = {
        model.set_sparse_path(0.0).unwrap();
        decode(&model, &PROMPT)
    };
    let mut last = 0.0;
    for s in [0.2f32, 0.3, 0.4, 0.6] {
        model.set_sparsity(s).unwrap();
        let sp = model.sparse.as_ref().unwrap();
        sp.reset_stats();
        // On the calibration tokens the achieved sparsity is the level (up to the histograms'
        // resolution and the change the skipping itself causes upstream).
        let mut st = State::new(&model, 64).unwrap();
        for chunk in f.calib.chunks(64) {
            st.reset();
            for &t in chunk {
                model.forward(&mut st, &[t], Logits::None).unwrap();
            }
        }
        let achieved = model.sparse.as_ref().unwrap().stats().sparsity();
        assert!(
            (achieved - s as f64).abs() < 0.06,
            "level {s}: achieved {achieved}"
        );
        let d = max_rel_diff(&decode(&model, &PROMPT), &dense);
        assert!(d > last, "level {s}: difference {d} not above {last}");
        last = d;
    }
    assert!(last < 1.0, "{last}");
}

#[test]
fn sparsity_needs_a_sparsified_model_and_a_calibrated_level() {
    let f = fixture("q8_0");
    let mut original = Model::load(&f.original).unwrap();
    original.set_sparsity(0.0).unwrap();
    let e = original.set_sparsity(0.3).unwrap_err().to_string();
    assert!(e.contains("pare sparsify"), "{e}");
    let mut sparse = Model::load(&f.sparse).unwrap();
    assert!(sparse.set_sparsity(0.7).is_err());
    assert!(sparse.set_sparsity(-0.1).is_err());
    assert!(sparse.set_sparsity(f32::NAN).is_err());
    sparse.set_sparsity(0.5).unwrap();
    assert_eq!(sparse.sparse.as_ref().unwrap().level(), Some(0.5));
    // A sparsified file is not sparsified again.
    let src = open_source(&f.sparse).unwrap();
    let stats = sparsify::collect_stats(
        &sparse,
        &f.calib,
        64,
        Some(1),
        Criterion::Activation,
        |_, _| {},
    )
    .unwrap();
    let plan =
        SparsityPlan::new(&stats, 0.1, &[0.5], &vec![(1.0, 1.0); stats.layers.len()]).unwrap();
    let out = f.sparse.with_extension("again.gguf");
    let opts = WriteOptions::default();
    let e = sparsify::write_sparsified(
        src.as_ref(),
        &sparse.config,
        &plan,
        "",
        &out,
        &opts,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already sparsified"), "{e}");
    assert!(!out.exists());
}

#[test]
fn float_ffn_weights_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let original = original(dir.path(), "f16");
    let model = Model::load(&original).unwrap();
    let stats = sparsify::collect_stats(
        &model,
        &calibration(),
        64,
        Some(1),
        Criterion::Activation,
        |_, _| {},
    )
    .unwrap();
    let plan =
        SparsityPlan::new(&stats, 0.1, &[0.5], &vec![(1.0, 1.0); stats.layers.len()]).unwrap();
    let src = open_source(&original).unwrap();
    let out = dir.path().join("out.gguf");
    let e = sparsify::write_sparsified(
        src.as_ref(),
        &model.config,
        &plan,
        "",
        &out,
        &WriteOptions::default(),
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("pq format") && e.contains("pare convert"), "{e}");
    assert!(!out.exists());
}

#[test]
fn a_file_of_the_old_layout_names_pare_sparsify() {
    let f = fixture("q8_0");
    // Rewrite the version key in place: 2 → 1 (the re-quantized layout).
    let mut bytes = std::fs::read(&f.sparse).unwrap();
    let key = b"pare.sparse.version";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // Value type (u32 = 4) then the value.
    assert_eq!(&bytes[at..at + 8], &[4, 0, 0, 0, 2, 0, 0, 0]);
    bytes[at + 4] = 1;
    let old = f.sparse.with_extension("v1.gguf");
    std::fs::write(&old, &bytes).unwrap();
    let e = match Model::load(&old) {
        Ok(_) => panic!("a layout-1 file loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("pare sparsify"), "{e}");
}

/// The measured (KL-greedy) allocation on a 4-layer synthetic model: its levels skip the bytes
/// they promise, planned and when decoding the calibration tokens on the sparse path, and at
/// every level the whole model's KL to dense on the calibration tokens (all layers skipping at
/// once, which the greedy never measured: it assumes the units' errors add) is below the uniform
/// allocation's.
#[test]
fn kl_allocation_meets_the_level_and_costs_less_than_uniform() {
    use pare::plan::sparse_alloc::Options;
    let dir = tempfile::tempdir().unwrap();
    let original = common::synthetic_model(dir.path(), "llama", "q8_0", 5, 4);
    let model = Model::load(&original).unwrap();
    let calib = calibration();
    let stats = sparsify::collect_stats(&model, &calib, 64, None, Criterion::Activation, |_, _| {})
        .unwrap();
    let src = open_source(&original).unwrap();
    let copies = sparsify::copies(src.as_ref(), &model.config).unwrap();
    let bytes = sparsify::layer_bytes(&copies);
    let levels = [0.2f32, 0.3, 0.4];
    let uniform =
        SparsityPlan::new(&stats, 0.25, &levels, &sparsify::code_shares(&copies)).unwrap();
    let mut plan = uniform.clone();
    let opts = Options {
        n_ctx: 64,
        chunks: 4,
        points: sparse_alloc::DEFAULT_POINTS.to_vec(),
        energy_interpolation: false,
    };
    let curves =
        sparse_alloc::allocate_plan(&model, &mut plan, &stats, &bytes, &calib, &opts, |_, _| {})
            .unwrap();
    assert_eq!(curves.len(), 2 * model.config.n_layer);
    assert_eq!(plan.allocation, sparse_alloc::NAME);
    // Skipping more never costs less on the hull the greedy walks, and it costs something.
    assert!(curves.iter().all(|c| *c.kl.last().unwrap() > 0.0));
    // Not uniform: the greedy found layers or matrices cheaper than others.
    let k3 = 1;
    let skips: Vec<f32> = plan.layers.iter().map(|l| l.input_skip[k3]).collect();
    assert!(
        skips.iter().any(|&f| (f - skips[0]).abs() > 0.05)
            || plan
                .layers
                .iter()
                .any(|l| (l.neuron_skip[k3] - skips[0]).abs() > 0.05),
        "{skips:?}"
    );
    let total = sparse_alloc::total_bytes(&bytes);
    for (k, &s) in levels.iter().enumerate() {
        // Planned: exactly the level (the bytes of the fractions the thresholds realise).
        let planned: f64 = plan
            .layers
            .iter()
            .zip(&bytes)
            .map(|(lp, b)| {
                lp.input_skip[k] as f64 * b.codes_in + lp.neuron_skip[k] as f64 * b.codes_down
            })
            .sum::<f64>()
            / total;
        assert!(
            (planned - s as f64).abs() < 1e-4,
            "level {s}: planned {planned}"
        );
        let kl =
            sparse_alloc::levels_kl(&model, &[(&uniform, k), (&plan, k)], &calib, 64, 4).unwrap();
        let (kl_u, kl_a) = (kl[0], kl[1]);
        assert!(
            kl_a < kl_u,
            "level {s}: allocated KL {kl_a} not below uniform {kl_u}"
        );
    }
    // Written and decoded on the sparse path: the achieved byte sparsity on the calibration
    // tokens is the level within 0.05 (histogram resolution; scales skipped with whole groups).
    let sparse = dir.path().join("llama4.sparse.gguf");
    sparsify::write_sparsified(
        src.as_ref(),
        &model.config,
        &plan,
        "synthetic",
        &sparse,
        &WriteOptions::default(),
        |_, _| {},
    )
    .unwrap();
    let mut m = Model::load(&sparse).unwrap();
    simulation_matches_the_sparse_path(&model, &mut m, &plan);
    for &s in &levels {
        m.set_sparsity(s).unwrap();
        m.sparse.as_ref().unwrap().reset_stats();
        let mut st = State::new(&m, 64).unwrap();
        for chunk in calib.chunks(64) {
            st.reset();
            for &t in chunk {
                m.forward(&mut st, &[t], Logits::None).unwrap();
            }
        }
        let achieved = m.sparse.as_ref().unwrap().stats().sparsity();
        assert!(
            (achieved - s as f64).abs() < 0.05,
            "level {s}: achieved {achieved}"
        );
    }
}

#[test]
fn levels_are_benched_side_by_side_and_count_their_bytes() {
    let f = fixture("q8_0");
    let mut sparse = Model::load(&f.sparse).unwrap();
    let rs =
        pare::eval::bench::bench_levels(&mut sparse, &[0.0, 0.2, 0.6], 8, 2, |_, _| {}).unwrap();
    assert_eq!(rs.len(), 3);
    let dense = &rs[0];
    assert_eq!(
        (dense.achieved, dense.speedup, dense.predicted),
        (0.0, 1.0, 1.0)
    );
    assert!(rs.iter().all(|r| r.tg_runs.len() == 2 && r.tg > 0.0));
    // Each level skips about what it promises, and its bytes predict a larger speedup.
    for (r, s) in rs[1..].iter().zip([0.2, 0.6]) {
        assert!(
            (r.achieved - s).abs() < 0.15,
            "S {s}: achieved {}",
            r.achieved
        );
        assert!(r.bytes_per_token < dense.bytes_per_token && r.predicted > 1.0);
    }
    assert!(rs[2].predicted > rs[1].predicted);
    // The model is left at the first level.
    assert_eq!(sparse.sparse.as_ref().unwrap().level(), None);

    // The CLI: a table of the levels, and a clear error on a model that was not sparsified.
    let pare = env!("CARGO_BIN_EXE_pare");
    let run = |m: &std::path::Path| {
        std::process::Command::new(pare)
            .args([
                "bench",
                "-m",
                m.to_str().unwrap(),
                "-p",
                "0",
                "-n",
                "4",
                "-r",
                "1",
            ])
            .args(["--levels", "0,0.4", "--json"])
            .output()
            .unwrap()
    };
    let o = run(&f.sparse);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["levels"].as_array().unwrap().len(), 2);
    let o = run(&f.original);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("pare sparsify"));
}
