//! llama-perplexity's method on fake models whose distributions are known, checked against a
//! brute-force re-computation written independently of the library's loop.

use pare::eval::perplexity::{perplexity, ChunkProgress, LogitsEval, PerplexityOptions};
use pare::{Error, Result};

/// A fake causal model: the logits at position `p` depend only on the tokens `0..=p` of the chunk.
struct FnModel<F: Fn(&[u32], &mut [f32])> {
    n_vocab: usize,
    row: F,
    inputs: Vec<Vec<u32>>,
}

impl<F: Fn(&[u32], &mut [f32])> LogitsEval for FnModel<F> {
    fn n_vocab(&self) -> usize {
        self.n_vocab
    }
    fn eval_chunk(&mut self, tokens: &[u32], logits: &mut Vec<f32>) -> Result<()> {
        self.inputs.push(tokens.to_vec());
        logits.resize(tokens.len() * self.n_vocab, 0.0);
        for p in 0..tokens.len() {
            (self.row)(
                &tokens[..=p],
                &mut logits[p * self.n_vocab..(p + 1) * self.n_vocab],
            );
        }
        Ok(())
    }
}

fn model<F: Fn(&[u32], &mut [f32])>(n_vocab: usize, row: F) -> FnModel<F> {
    FnModel {
        n_vocab,
        row,
        inputs: Vec::new(),
    }
}

/// Deterministic pseudo-random logits from the prefix (hash of the last two tokens and the length).
fn hashed_row(prefix: &[u32], out: &mut [f32]) {
    let n = prefix.len() as u64;
    let a = *prefix.last().unwrap() as u64;
    let b = if prefix.len() > 1 {
        prefix[prefix.len() - 2] as u64
    } else {
        999
    };
    for (j, o) in out.iter_mut().enumerate() {
        let mut h = (n * 1_000_003 + a * 7919 + b * 104_729 + j as u64 * 2_654_435_761) ^ 0x9e37;
        h = h.wrapping_mul(0x2545_f491_4f6c_dd1d);
        *o = ((h >> 40) % 2000) as f32 / 250.0 - 4.0; // in [-4, 4)
    }
}

fn text(n: usize, n_vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + i / 3) % n_vocab).collect()
}

/// The method, written out plainly: chunks of n_ctx, BOS overwrite, rows n_ctx/2 ..= n_ctx-2
/// predict the next token; probabilities via a direct (unshifted) softmax in f64.
fn brute_force(
    row: impl Fn(&[u32], &mut [f32]),
    n_vocab: usize,
    tokens: &[u32],
    n_ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
) -> (f64, f64, usize, Vec<f64>) {
    let mut n_chunks = tokens.len() / n_ctx;
    if let Some(m) = max_chunks {
        n_chunks = n_chunks.min(m);
    }
    let mut nlls = Vec::new();
    let mut running = Vec::new();
    let mut buf = vec![0f32; n_vocab];
    for c in 0..n_chunks {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        for j in n_ctx / 2..n_ctx - 1 {
            row(&chunk[..=j], &mut buf);
            let z: f64 = buf.iter().map(|&x| (x as f64).exp()).sum();
            let target = tokens[c * n_ctx + j + 1];
            nlls.push(-((buf[target as usize] as f64).exp() / z).ln());
        }
        running.push((nlls.iter().sum::<f64>() / nlls.len() as f64).exp());
    }
    let n = nlls.len() as f64;
    let mean = nlls.iter().sum::<f64>() / n;
    let var = nlls.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let ppl = mean.exp();
    (ppl, ppl * (var / (n - 1.0)).sqrt(), nlls.len(), running)
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-300)
}

#[test]
fn uniform_model_gives_vocab_size() {
    for &v in &[2usize, 10, 49152] {
        let mut m = model(v, |_, out| out.fill(0.25));
        let tokens = text(3 * 64 + 17, v as u32);
        let r = perplexity(
            &mut m,
            &tokens,
            &PerplexityOptions::new(64, Some(0)),
            |_| {},
        )
        .unwrap();
        assert!(close(r.ppl, v as f64, 1e-12), "V={v}: {}", r.ppl);
        // Every NLL is ln(V): the variance is 0 up to the rounding of E[x^2] - E[x]^2.
        assert!(r.ppl_stderr < 1e-6 * r.ppl, "{}", r.ppl_stderr);
        assert_eq!(r.chunks, 3);
        assert_eq!(r.tokens_scored, 3 * (64 - 1 - 32));
    }
}

#[test]
fn matches_brute_force_with_bos() {
    let v = 50;
    let tokens = text(5 * 40 + 13, v as u32);
    let opts = PerplexityOptions::new(40, Some(1));
    let mut m = model(v, hashed_row);
    let mut seen: Vec<ChunkProgress> = Vec::new();
    let r = perplexity(&mut m, &tokens, &opts, |p| seen.push(p)).unwrap();
    let (ppl, unc, n, running) = brute_force(hashed_row, v, &tokens, 40, None, Some(1));
    assert_eq!(r.chunks, 5);
    assert_eq!(r.tokens_scored, n);
    assert_eq!(n, 5 * 19);
    assert!(close(r.ppl, ppl, 1e-9), "{} vs {ppl}", r.ppl);
    assert!(close(r.ppl_stderr, unc, 1e-6), "{} vs {unc}", r.ppl_stderr);
    assert!(close(r.nll_mean.exp(), r.ppl, 1e-12));
    assert_eq!(r.chunk_ppl.len(), 5);
    for (a, b) in r.chunk_ppl.iter().zip(&running) {
        assert!(close(*a, *b, 1e-9));
    }
    // Progress: one call per chunk, in order, with the running values.
    assert_eq!(seen.len(), 5);
    for (i, p) in seen.iter().enumerate() {
        assert_eq!(
            (p.done, p.n_chunks, p.tokens_scored),
            (i + 1, 5, (i + 1) * 19)
        );
        assert!(close(p.ppl, running[i], 1e-9));
    }
    // What the model saw: each chunk with BOS in front, the rest untouched; the tail dropped.
    assert_eq!(m.inputs.len(), 5);
    for (c, input) in m.inputs.iter().enumerate() {
        assert_eq!(input[0], 1);
        assert_eq!(&input[1..], &tokens[c * 40 + 1..(c + 1) * 40]);
    }
}

#[test]
fn bos_changes_the_result_and_none_keeps_tokens() {
    let v = 50;
    let tokens = text(3 * 30, v as u32);
    let mut with = model(v, hashed_row);
    let mut without = model(v, hashed_row);
    // `hashed_row` only looks at the last two tokens, so the scored rows never see position 0;
    // this row function also looks at the first token, so the BOS choice reaches the scores.
    let first_matters = |p: &[u32], out: &mut [f32]| {
        hashed_row(p, out);
        out[p[0] as usize % out.len()] += 3.0;
    };
    let mut a = model(v, first_matters);
    let mut b = model(v, first_matters);
    let o_bos = PerplexityOptions::new(30, Some(7));
    let o_none = PerplexityOptions::new(30, None);
    let ra = perplexity(&mut a, &tokens, &o_bos, |_| {}).unwrap();
    let rb = perplexity(&mut b, &tokens, &o_none, |_| {}).unwrap();
    assert_ne!(ra.ppl, rb.ppl);
    let (pa, _, _, _) = brute_force(first_matters, v, &tokens, 30, None, Some(7));
    let (pb, _, _, _) = brute_force(first_matters, v, &tokens, 30, None, None);
    assert!(close(ra.ppl, pa, 1e-9) && close(rb.ppl, pb, 1e-9));
    assert_eq!(b.inputs[1], tokens[30..60].to_vec());
    perplexity(&mut with, &tokens, &o_bos, |_| {}).unwrap();
    perplexity(&mut without, &tokens, &o_none, |_| {}).unwrap();
    assert_eq!(with.inputs[2][0], 7);
    assert_eq!(without.inputs[2][0], tokens[60]);
}

#[test]
fn chunk_limit_and_odd_context() {
    let v = 17;
    let tokens = text(10 * 9 + 5, v as u32);
    let opts = PerplexityOptions {
        n_ctx: 9,
        n_chunks: Some(4),
        bos: Some(0),
    };
    let mut m = model(v, hashed_row);
    let r = perplexity(&mut m, &tokens, &opts, |_| {}).unwrap();
    // n_ctx 9: first = 4, rows 4..=7 score tokens 5..=8: 4 per chunk.
    let (ppl, unc, n, _) = brute_force(hashed_row, v, &tokens, 9, Some(4), Some(0));
    assert_eq!((r.chunks, r.tokens_scored, n), (4, 16, 16));
    assert!(close(r.ppl, ppl, 1e-9));
    assert!(close(r.ppl_stderr, unc, 1e-6));
    assert_eq!(m.inputs.len(), 4);
}

#[test]
fn a_perfect_model_scores_one() {
    // Predicts the next token of `text` with certainty from the current one.
    let v = 23u32;
    let tokens: Vec<u32> = (0..200).map(|i| (i * 5) % v).collect();
    let mut m = model(v as usize, move |p: &[u32], out: &mut [f32]| {
        out.fill(-1e4);
        out[((p.last().unwrap() + 5) % v) as usize] = 0.0;
    });
    let r = perplexity(&mut m, &tokens, &PerplexityOptions::new(20, None), |_| {}).unwrap();
    assert!(close(r.ppl, 1.0, 1e-12), "{}", r.ppl);
}

#[test]
fn too_short_text_is_refused_like_llama_cpp() {
    let mut m = model(10, |_, out| out.fill(0.0));
    let tokens = text(1023, 10);
    let e = perplexity(
        &mut m,
        &tokens,
        &PerplexityOptions::new(512, Some(1)),
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)));
    let msg = e.to_string();
    assert!(
        msg.contains("you need at least 1024 tokens to evaluate perplexity with a context of 512")
            && msg.contains("1023"),
        "{msg}"
    );
    assert!(m.inputs.is_empty());
    // Exactly 2 * n_ctx is enough.
    let r = perplexity(
        &mut m,
        &text(1024, 10),
        &PerplexityOptions::new(512, Some(1)),
        |_| {},
    );
    assert_eq!(r.unwrap().chunks, 2);
}

#[test]
fn bad_model_output_and_tokens_are_errors() {
    struct Short;
    impl LogitsEval for Short {
        fn n_vocab(&self) -> usize {
            4
        }
        fn eval_chunk(&mut self, tokens: &[u32], logits: &mut Vec<f32>) -> Result<()> {
            logits.resize(tokens.len() * 4 - 1, 0.0);
            Ok(())
        }
    }
    let e = perplexity(
        &mut Short,
        &text(40, 4),
        &PerplexityOptions::new(10, None),
        |_| {},
    );
    assert!(e.unwrap_err().to_string().contains("expected 40"));
    let mut m = model(4, |_, out| out.fill(0.0));
    let mut tokens = text(40, 4);
    tokens[13] = 4;
    let e = perplexity(&mut m, &tokens, &PerplexityOptions::new(10, None), |_| {});
    assert!(e.unwrap_err().to_string().contains("position 13"));
}
