//! The tokenizer against llama.cpp's llama-tokenize on the real model
//! (fixture: tests/fixtures/tokenizer_cases.json, from scripts/gen-tokenizer-fixture).

mod common;

use std::path::PathBuf;

use pare::format::tokenizer::{TokenKind, Tokenizer};
use pare::format::Gguf;
use serde::Deserialize;

fn model_path() -> PathBuf {
    common::real_model()
}

fn tokenizer() -> Tokenizer {
    let g = Gguf::open(model_path()).expect("open model");
    Tokenizer::from_gguf(&g).expect("tokenizer from GGUF")
}

#[derive(Deserialize)]
struct Case {
    name: String,
    text: String,
    parse_special: bool,
    add_special: bool,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

fn cases() -> Vec<Case> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_cases.json");
    let s = std::fs::read_to_string(&p).expect("read fixture");
    let f: Fixture = serde_json::from_str(&s).expect("parse fixture");
    assert!(
        f.cases.len() >= 35,
        "fixture has only {} cases",
        f.cases.len()
    );
    f.cases
}

#[test]
fn ids_match_llama_cpp() {
    let tok = tokenizer();
    let mut failures = Vec::new();
    for c in cases() {
        let ids = tok
            .encode(&c.text, c.add_special, c.parse_special)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        if ids != c.ids {
            failures.push(format!(
                "{} ({:?}):\n  pare:      {:?}\n  llama.cpp: {:?}",
                c.name, c.text, ids, c.ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) differ from llama.cpp:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn decode_round_trips() {
    let tok = tokenizer();
    for c in cases() {
        // Every fixture text is valid UTF-8 and byte-level BPE loses nothing, so all round-trip,
        // special-token text included (decode renders special tokens as their text).
        let back = tok.decode(&c.ids).expect("decode");
        assert_eq!(back, c.text, "{}: decode(llama.cpp ids) != text", c.name);
    }
}

#[test]
fn stream_decoder_equals_decode_and_holds_back_partial_utf8() {
    let tok = tokenizer();
    for c in cases() {
        let mut d = tok.stream_decoder();
        let mut out = String::new();
        for &id in &c.ids {
            let piece = d.push(id).expect("push");
            out.push_str(&piece);
        }
        out.push_str(&d.finish());
        assert_eq!(out, c.text, "{}", c.name);
    }
    // "🍕" is four bytes; find a token sequence that splits it, then check nothing leaks early.
    let ids = tok.encode("🍕", false, true).unwrap();
    assert!(
        ids.len() > 1,
        "expected emoji to be split into byte tokens, got {ids:?}"
    );
    let mut d = tok.stream_decoder();
    for &id in &ids[..ids.len() - 1] {
        assert_eq!(d.push(id).unwrap(), "", "partial UTF-8 must be held back");
    }
    assert!(d.has_pending());
    assert_eq!(d.push(*ids.last().unwrap()).unwrap(), "🍕");
    assert!(!d.has_pending());
    // An incomplete sequence at the end comes out as U+FFFD.
    let mut d = tok.stream_decoder();
    assert_eq!(d.push(ids[0]).unwrap(), "");
    assert_eq!(d.finish(), "\u{fffd}");
}

#[test]
fn token_bytes_are_raw_bytes() {
    let tok = tokenizer();
    let space_the = tok.token_to_id("Ġthe").expect("Ġthe in vocab");
    assert_eq!(tok.token_bytes(space_the), b" the");
    let nl = tok.token_to_id("Ċ").expect("Ċ in vocab");
    assert_eq!(tok.token_bytes(nl), b"\n");
    assert_eq!(tok.token_bytes(2), b"<|im_end|>");
    assert!(tok.token_bytes(u32::MAX).is_empty());
    assert!(tok.decode(&[tok.vocab_size() as u32]).is_err());
}

#[test]
fn special_tokens_and_flags() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    assert!(!tok.add_bos(), "SmolLM2's GGUF says add_bos_token = false");
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("no such token"), None);
    // llama.cpp: EOG = {<|endoftext|>, <|im_end|>} (eos = <|im_end|>).
    assert_eq!(tok.eog_ids(), &[0, 2]);
    assert!(tok.is_eog(0) && tok.is_eog(2));
    assert!(!tok.is_eog(1) && !tok.is_eog(3) && !tok.is_eog(100));
    assert_eq!(tok.token_kind(1), Some(TokenKind::Control));
    assert_eq!(tok.token_kind(100), Some(TokenKind::Normal));
    assert!(tok.is_special(16) && !tok.is_special(17));
    // Since the model does not ask for BOS, add_bos=true adds nothing.
    assert_eq!(
        tok.encode("hi", true, true).unwrap(),
        tok.encode("hi", false, true).unwrap()
    );
}

fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("read fixture")).expect("parse")
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The greedy-generation fixture's prompts tokenize as llama-completion tokenized them, and its
/// generated ids decode to the text llama-completion printed.
#[test]
fn greedy_fixture_prompts_and_texts() {
    let tok = tokenizer();
    let f = fixture("llamacpp_greedy.json");
    let cases = f["cases"].as_array().expect("cases");
    assert!(cases.len() >= 3);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let prompt = c["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt, true, true).unwrap(),
            ids_of(&c["prompt_ids"]),
            "{name}: prompt ids"
        );
        let generated = ids_of(&c["generated_ids"]);
        assert_eq!(
            tok.decode(&generated).unwrap(),
            c["generated_text"].as_str().unwrap(),
            "{name}: generated text"
        );
    }
}

/// The whole perplexity text (1.1 MB of WikiText-2) tokenizes to exactly the tokens
/// llama-perplexity used: same count, same first tokens.
#[test]
fn perplexity_text_tokenizes_like_llama_cpp() {
    let f = fixture("llamacpp_perplexity.json");
    let data = common::data_file(f["data"].as_str().unwrap());
    let mut text = std::fs::read_to_string(&data)
        .unwrap_or_else(|e| panic!("{}: {e} (the repo copy in data/)", data.display()));
    // llama.cpp's -f drops one trailing newline.
    if text.ends_with('\n') {
        text.pop();
    }
    let tok = tokenizer();
    let ids = tok.encode(&text, true, false).unwrap();
    let first = ids_of(&f["first_tokens"]);
    assert_eq!(&ids[..first.len()], &first[..], "first tokens");
    assert_eq!(
        ids.len() as u64,
        f["n_tokens"].as_u64().unwrap(),
        "token count"
    );
    // FNV-1a over every id (little-endian u32 bytes), as scripts/gen-peer-fixtures computes it.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ids.iter().flat_map(|id| id.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    assert_eq!(
        format!("{h:016x}"),
        f["tokens_fnv1a64"].as_str().unwrap(),
        "hash of all token ids"
    );
}

/// Every id list `encode_pieces` hands out for `text`, cut after at least `piece_bytes` bytes.
fn pieces_of(tok: &Tokenizer, text: &str, piece_bytes: usize) -> Vec<Vec<u32>> {
    let mut pieces = Vec::new();
    tok.encode_pieces(text, true, false, piece_bytes, |p| {
        pieces.push(p.to_vec());
        Ok(())
    })
    .unwrap();
    pieces
}

/// The perplexity text tokenized a piece at a time (as `encode` does, to keep the tokenizer's
/// working memory small) gives exactly the ids of tokenizing it whole, whatever the piece size:
/// down to cutting at every place `safe_cut` allows.
#[test]
fn text_in_pieces_tokenizes_as_whole() {
    let f = fixture("llamacpp_perplexity.json");
    let data = common::data_file(f["data"].as_str().unwrap());
    let text = std::fs::read_to_string(&data).unwrap();
    let tok = tokenizer();
    let whole: Vec<u32> = pieces_of(&tok, &text, usize::MAX).concat();
    assert_eq!(whole, tok.encode(&text, true, false).unwrap());
    // (piece size, fewest pieces: the file has about 1,500 places to cut, ~730 bytes apart)
    for (piece_bytes, min) in [
        (pare::format::tokenizer::PIECE_BYTES, 10),
        (4096, 200),
        (1, 1000),
    ] {
        let pieces = pieces_of(&tok, &text, piece_bytes);
        assert!(
            pieces.len() >= min,
            "{piece_bytes}-byte pieces: only {} pieces",
            pieces.len()
        );
        assert_eq!(pieces.concat(), whole, "{piece_bytes}-byte pieces");
    }
    // Lines that start without a space, as a play's or prose's do ("Citizen:\nBefore"): the same
    // file with each paragraph's blank line and spaces around it taken off (" .\nThe").
    let text = text.replace(" \n \n ", "\n");
    let whole: Vec<u32> = pieces_of(&tok, &text, usize::MAX).concat();
    for (piece_bytes, min) in [
        (pare::format::tokenizer::PIECE_BYTES, 12),
        (4096, 150),
        (1, 500),
    ] {
        let pieces = pieces_of(&tok, &text, piece_bytes);
        assert!(
            pieces.len() >= min,
            "{piece_bytes}-byte pieces: only {} pieces",
            pieces.len()
        );
        assert_eq!(
            pieces.concat(),
            whole,
            "bare lines, {piece_bytes}-byte pieces"
        );
    }
}

/// Cut points are only line starts that tokenize the same apart; the places next to them that
/// would not are refused (the test fails if `safe_cut` allows any of them).
#[test]
fn cuts_only_where_the_split_expressions_end_a_word() {
    use pare::format::tokenizer::safe_cut;
    let tok = tokenizer();
    let enc = |s: &str| tok.encode(s, false, false).unwrap();
    let text = "a.\n\n 12 is \n = = B = = \n \n Word , \n\n\nx \r\n Yes\n Ünï 3\n  z\n b\
                Citizen:\nBefore we go,\nSpeak 4\nNo end \nMe\n\nThee\u{a0}\nHim\r\nYou";
    let mut cuts = 0;
    for p in 1..text.len() {
        if !text.is_char_boundary(p) {
            continue;
        }
        let apart = [enc(&text[..p]), enc(&text[p..])].concat();
        if safe_cut(text, p) {
            cuts += 1;
            assert_eq!(apart, enc(text), "cut at {p} ({:?})", &text[p..]);
        }
    }
    assert_eq!(
        cuts, 6,
        "the line starts ' Word', ' Yes', ' b', 'Before', 'Speak', 'No'"
    );
    // Why not every line start: a digit or '=' after the space, or a second newline, changes
    // the words on the left of the cut; so does whitespace before a bare line's newline.
    for (p, why) in [(4, "\\n 12"), (13, "\\n ="), (3, "\\n\\n")] {
        assert!(!safe_cut(text, p), "{why}");
    }
    for before in ["end \nMe", "\n\nThee", "\u{a0}\nHim", "\r\nYou"] {
        let p = text.find(before).unwrap() + before.rfind('\n').unwrap() + 1;
        assert!(!safe_cut(text, p), "{before:?}");
    }
    let p = text.find("end \nMe").unwrap() + 5;
    assert_ne!(
        [enc(&text[..p]), enc(&text[p..])].concat(),
        enc(text),
        "cutting after ' \\n' would change the ids (so the rule is needed)"
    );
    let p = text.find("\n 12").unwrap() + 1;
    assert_ne!(
        [enc(&text[..p]), enc(&text[p..])].concat(),
        enc(text),
        "cutting before ' 12' would change the ids (so the rule is needed)"
    );
}
