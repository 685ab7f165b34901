//! Greedy decoding against llama.cpp's (tests/fixtures/llamacpp_greedy.json, written by
//! scripts/gen-peer-fixtures from llama-completion's saved session: 4 prompts, 32 tokens each).
//!
//! Both implementations quantize activations to 8 bits, but round differently (llama.cpp also
//! keeps K/V in f16 and accumulates flash attention in f16), so where two tokens are nearly tied
//! the argmax may differ; exact float64 maths differs from llama.cpp at such near-ties too. The
//! test therefore feeds llama.cpp's own continuation through pare (teacher forcing) and requires
//! pare's top token to equal llama.cpp's at every position, except where llama.cpp's token is
//! within `NEAR_TIE` logits of pare's top; such positions are printed and at most three per prompt
//! are allowed. Free-running greedy decoding must then reproduce llama.cpp's 32 tokens exactly on
//! every prompt without a near-tie, up to a first divergence that is itself a near-tie on the
//! decode path (which sums in another order than the one-pass teacher forcing). (Measured on the
//! AVX-512 path: 0.20 logits at most, and two prompts reproduced exactly; the scalar path sums in
//! another order: up to 0.29.)

mod common;

use pare::infer::generate::{generate, GenerateOptions};
use pare::infer::sampling::SamplingParams;
use pare::model::{Logits, Model, State};

const NEAR_TIE: f32 = 0.4;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn greedy_decoding_follows_llama_cpp() {
    let model = Model::load(common::real_model()).unwrap();
    let tok = model.tokenizer().unwrap();
    let fixture: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::root().join("tests/fixtures/llamacpp_greedy.json")).unwrap(),
    )
    .unwrap();
    let v = model.config.n_vocab;
    let mut exact_matches = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_ids"]);
        assert_eq!(
            tok.encode(case["prompt"].as_str().unwrap(), true, true)
                .unwrap(),
            prompt,
            "{name}: prompt tokens"
        );
        let want = ids(&case["generated_ids"]);
        assert_eq!(want.len(), 32);

        // Teacher forcing: llama.cpp's sequence through pare in one pass.
        let all: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        let mut st = State::new(&model, all.len()).unwrap();
        model.forward(&mut st, &all, Logits::All).unwrap();
        let mut ties = 0;
        for (i, &w) in want.iter().enumerate() {
            let row = &st.logits[(prompt.len() - 1 + i) * v..][..v];
            let top = pare::infer::sampling::argmax(row);
            if top as u32 != w {
                let margin = row[top] - row[w as usize];
                assert!(
                    margin < NEAR_TIE,
                    "{name} token {i}: pare prefers {top} over llama.cpp's {w} by {margin} logits"
                );
                eprintln!("{name} token {i}: near-tie, pare {top} vs llama.cpp {w} ({margin:.4})");
                ties += 1;
            }
        }
        assert!(ties <= 3, "{name}: {ties} near-ties in 32 tokens");

        // Free running.
        let opts = GenerateOptions {
            n_predict: want.len(),
            sampling: SamplingParams::greedy(),
            stop: vec![],
            n_ctx: None,
        };
        let mut text = String::new();
        let (got, _) = generate(&model, &tok, &prompt, &opts, |p| {
            text.push_str(p);
            Ok(())
        })
        .unwrap();
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!("{name}: free-running greedy equals llama.cpp for {same}/32 tokens: {text:?}");
        if ties == 0 && got != want {
            // Decoding token by token sums in another order than the one-pass teacher forcing
            // above (8-bit activations of one row, not of a batch), so a position that was not
            // a near-tie there may be one here: the first divergence must be a near-tie on the
            // decode path itself.
            let i = same;
            let mut st = State::new(&model, prompt.len() + i + 1).unwrap();
            model.forward(&mut st, &prompt, Logits::Last).unwrap();
            for &t in &want[..i] {
                model.forward(&mut st, &[t], Logits::Last).unwrap();
            }
            let row = &st.logits[..v];
            assert_eq!(pare::infer::sampling::argmax(row) as u32, got[i]);
            let margin = row[got[i] as usize] - row[want[i] as usize];
            eprintln!(
                "{name} token {i}: decoding near-tie, pare {} vs llama.cpp {} ({margin:.4})",
                got[i], want[i]
            );
            assert!(
                margin < NEAR_TIE,
                "{name}: no near-tie in teacher forcing, yet decoding prefers {} over llama.cpp's \
                 {} at token {i} by {margin} logits",
                got[i],
                want[i]
            );
        }
        if got == want {
            assert_eq!(
                text,
                case["generated_text"].as_str().unwrap(),
                "{name}: text"
            );
        }
        if got == want {
            exact_matches += 1;
        }
    }
    // pare's SIMD kernels accumulate in ggml's order (8 f32 lanes per block, scaled per block);
    // the scalar reference sums differently, which moves near-ties, so only require a
    // token-for-token reproduction on the SIMD paths.
    if pare::quant::kernels::isa() != pare::quant::kernels::Isa::Scalar {
        assert!(
            exact_matches >= 1,
            "no prompt reproduced llama.cpp's continuation exactly"
        );
    }
}
