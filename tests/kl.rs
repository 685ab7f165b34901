//! Saving base distributions and comparing against them, on fake models with known distributions.

use pare::eval::kl::{compare, save_base, KlBaseReader, LOG_RANGE};
use pare::eval::perplexity::{perplexity, LogitsEval, PerplexityOptions};
use pare::Result;
use std::path::Path;

/// A fake model whose row at position `p` of a chunk is `row(p, prefix)`.
struct Fake<F: Fn(usize, &[u32], &mut [f32])> {
    n_vocab: usize,
    row: F,
    fail_at_chunk: Option<usize>,
    calls: usize,
}

impl<F: Fn(usize, &[u32], &mut [f32])> LogitsEval for Fake<F> {
    fn n_vocab(&self) -> usize {
        self.n_vocab
    }
    fn eval_chunk(&mut self, tokens: &[u32], logits: &mut Vec<f32>) -> Result<()> {
        if self.fail_at_chunk == Some(self.calls) {
            return Err(pare::Error::Interrupted);
        }
        self.calls += 1;
        logits.resize(tokens.len() * self.n_vocab, 0.0);
        for p in 0..tokens.len() {
            (self.row)(
                p,
                &tokens[..=p],
                &mut logits[p * self.n_vocab..(p + 1) * self.n_vocab],
            );
        }
        Ok(())
    }
}

fn fake<F: Fn(usize, &[u32], &mut [f32])>(n_vocab: usize, row: F) -> Fake<F> {
    Fake {
        n_vocab,
        row,
        fail_at_chunk: None,
        calls: 0,
    }
}

fn text(n: usize, v: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 13 + i / 5) % v).collect()
}

fn varied(_p: usize, prefix: &[u32], out: &mut [f32]) {
    let a = *prefix.last().unwrap() as u64 + 31 * prefix.len() as u64;
    for (j, o) in out.iter_mut().enumerate() {
        let h = (a * 2_654_435_761 + j as u64 * 40_503).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        *o = ((h >> 44) % 4000) as f32 / 200.0 - 10.0; // spread of 20 nats
    }
}

fn opts(n_ctx: usize) -> PerplexityOptions {
    PerplexityOptions::new(n_ctx, Some(1))
}

#[test]
fn identical_model_has_zero_kl_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.kld");
    let v = 300;
    let tokens = text(4 * 64 + 9, v as u32);
    let base = save_base(&mut fake(v, varied), &tokens, &opts(64), &path, |_| {}).unwrap();
    let ppl = perplexity(&mut fake(v, varied), &tokens, &opts(64), |_| {}).unwrap();
    assert_eq!(base, ppl);
    let s = compare(&mut fake(v, varied), &tokens, &opts(64), &path, |_| {}).unwrap();
    assert_eq!((s.chunks, s.positions), (4, 4 * 31));
    // Bound from the module docs: delta <= R / 65534 / 2 (+ f32 rounding), nothing dropped here.
    let delta = LOG_RANGE as f64 / 65534.0 / 2.0 + 1e-5;
    let bound = ((2.0 * delta).exp() - 1.0).powi(2);
    assert!(s.kld_max <= bound, "max KL {} > bound {bound}", s.kld_max);
    assert!(s.kld_mean <= bound);
    assert_eq!(s.same_top, 1.0);
    assert!((s.ppl_base - ppl.ppl).abs() < 1e-5 * ppl.ppl);
    assert!((s.ppl_new - ppl.ppl).abs() < 1e-12 * ppl.ppl);
    assert!(s.rms_dp < 1e-6);
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("base.kld")]);
}

#[test]
fn known_kl_value() {
    // Base P = [0.7, 0.1, 0.1, 0.1], new Q uniform: KL(P||Q) = sum p ln(p/q) = 0.44593, while
    // KL(Q||P) = 0.42984, so the direction is checked too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.kld");
    let p = [0.7f32, 0.1, 0.1, 0.1];
    let base_row = move |_: usize, _: &[u32], out: &mut [f32]| {
        for (o, x) in out.iter_mut().zip(p) {
            *o = x.ln() + 3.0;
        }
    };
    let tokens = text(3 * 16, 4);
    save_base(&mut fake(4, base_row), &tokens, &opts(16), &path, |_| {}).unwrap();
    let uniform = |_: usize, _: &[u32], out: &mut [f32]| out.fill(-2.0);
    let mut progress = Vec::new();
    let s = compare(&mut fake(4, uniform), &tokens, &opts(16), &path, |p| {
        progress.push(p)
    })
    .unwrap();
    let want: f64 = p.iter().map(|&x| x as f64 * (x as f64 / 0.25).ln()).sum();
    assert!((want - 0.44593).abs() < 1e-4);
    assert!((s.kld_mean - want).abs() < 1e-4, "{} vs {want}", s.kld_mean);
    assert!((s.kld_p99 - want).abs() < 1e-4);
    assert!(s.kld_stderr < 1e-6);
    assert_eq!(s.ppl_new, 4.0);
    assert_eq!(progress.len(), 3);
    assert_eq!(progress[2].done, 3);
    // Base PPL from the stored exact NLLs of the actual tokens under P.
    let n_scored: Vec<u32> = (0..3)
        .flat_map(|c| tokens[c * 16 + 9..(c + 1) * 16].to_vec())
        .collect();
    let mean_nll = n_scored
        .iter()
        .map(|&t| -(p[t as usize] as f64).ln())
        .sum::<f64>()
        / n_scored.len() as f64;
    assert!((s.ppl_base - mean_nll.exp()).abs() < 1e-5);
    // Swapping the roles gives KL(Q||P).
    let kl_qp: f64 = p.iter().map(|&x| 0.25 * (0.25 / x as f64).ln()).sum();
    assert!((kl_qp - 0.42984).abs() < 1e-4);
    save_base(&mut fake(4, uniform), &tokens, &opts(16), &path, |_| {}).unwrap();
    let s = compare(&mut fake(4, base_row), &tokens, &opts(16), &path, |_| {}).unwrap();
    assert!(
        (s.kld_mean - kl_qp).abs() < 1e-4,
        "{} vs {kl_qp}",
        s.kld_mean
    );
}

#[test]
fn same_top_rate_counts_agreements() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.kld");
    let v = 10;
    let base_row = |p: usize, _: &[u32], out: &mut [f32]| {
        out.fill(0.0);
        out[p % 10] = 2.0;
    };
    // The new model agrees at positions divisible by 3 and otherwise prefers another token.
    let new_row = |p: usize, _: &[u32], out: &mut [f32]| {
        out.fill(0.0);
        out[p % 10] = 2.0;
        if !p.is_multiple_of(3) {
            out[(p + 1) % 10] = 2.5;
        }
    };
    let n_ctx = 40;
    let tokens = text(2 * n_ctx, v as u32);
    save_base(&mut fake(v, base_row), &tokens, &opts(n_ctx), &path, |_| {}).unwrap();
    let s = compare(&mut fake(v, new_row), &tokens, &opts(n_ctx), &path, |_| {}).unwrap();
    let scored: Vec<usize> = (n_ctx / 2..n_ctx - 1).collect();
    let agree = scored.iter().filter(|&&p| p % 3 == 0).count();
    assert_eq!(s.positions, 2 * scored.len());
    assert!(
        (s.same_top - agree as f64 / scored.len() as f64).abs() < 1e-12,
        "{}",
        s.same_top
    );
    assert!(s.kld_mean > 0.01);
}

fn expect_err(r: Result<impl std::fmt::Debug>, needle: &str) {
    let e = r.expect_err("expected an error").to_string();
    assert!(e.contains(needle), "error {e:?} lacks {needle:?}");
}

#[test]
fn mismatches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.kld");
    let v = 50;
    let tokens = text(3 * 32, v as u32);
    save_base(&mut fake(v, varied), &tokens, &opts(32), &path, |_| {}).unwrap();
    let cmp = |v: usize, toks: &[u32], o: &PerplexityOptions| {
        compare(&mut fake(v, varied), toks, o, &path, |_| {})
    };
    expect_err(cmp(51, &tokens, &opts(32)), "vocabulary of 50");
    expect_err(cmp(v, &tokens, &opts(16)), "context of 32");
    expect_err(cmp(v, &tokens, &PerplexityOptions::new(32, None)), "BOS");
    let mut other = tokens.clone();
    other[45] = (other[45] + 1) % v as u32;
    expect_err(cmp(v, &other, &opts(32)), "token 45 differs");
    expect_err(cmp(v, &tokens[..80], &opts(32)), "fewer than the 96");
    let more = PerplexityOptions {
        n_chunks: Some(4),
        ..opts(32)
    };
    expect_err(cmp(v, &tokens, &more), "base file has 3");
    // Fewer chunks than the base holds is fine.
    let fewer = PerplexityOptions {
        n_chunks: Some(2),
        ..opts(32)
    };
    assert_eq!(cmp(v, &tokens, &fewer).unwrap().chunks, 2);
    // A longer text whose prefix matches is fine too (the tail is never scored).
    let mut longer = tokens.clone();
    longer.extend_from_slice(&text(10, v as u32));
    assert_eq!(cmp(v, &longer, &opts(32)).unwrap().chunks, 3);
}

#[test]
fn damaged_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.kld");
    let v = 20;
    let tokens = text(2 * 16, v as u32);
    save_base(&mut fake(v, varied), &tokens, &opts(16), &path, |_| {}).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // 32-byte fixed header + 32 tokens + 2 chunks x 7 rows x (16 + 2*20) bytes.
    assert_eq!(bytes.len(), 32 + 4 * 32 + 2 * 7 * (16 + 40));
    KlBaseReader::open(&path).unwrap();

    let write = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let open = |p: &Path| KlBaseReader::open(p).map(|_| ());
    expect_err(open(&write("t1", &bytes[..bytes.len() - 1])), "truncated");
    expect_err(open(&write("t2", &bytes[..20])), "truncated");
    expect_err(open(&write("t3", &bytes[..100])), "truncated");
    let mut extra = bytes.clone();
    extra.push(0);
    expect_err(open(&write("t4", &extra)), "trailing data");
    let mut magic = bytes.clone();
    magic[0] = b'X';
    expect_err(open(&write("t5", &magic)), "bad magic");
    let mut version = bytes.clone();
    version[8] = 9;
    expect_err(open(&write("t6", &version)), "version 9");
    expect_err(open(&dir.path().join("missing")), "missing");
    // compare() reports the same.
    let p = write("t7", &bytes[..bytes.len() - 10]);
    expect_err(
        compare(&mut fake(v, varied), &tokens, &opts(16), &p, |_| {}),
        "truncated",
    );
}

#[test]
fn failed_save_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.kld");
    let v = 20;
    let tokens = text(3 * 16, v as u32);
    let mut m = fake(v, varied);
    m.fail_at_chunk = Some(2);
    assert!(save_base(&mut m, &tokens, &opts(16), &path, |_| {}).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // An existing base survives a failed overwrite untouched.
    save_base(&mut fake(v, varied), &tokens, &opts(16), &path, |_| {}).unwrap();
    let before = std::fs::read(&path).unwrap();
    let mut m = fake(v, |_, _, out: &mut [f32]| out.fill(0.0));
    m.fail_at_chunk = Some(1);
    assert!(save_base(&mut m, &tokens, &opts(16), &path, |_| {}).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
