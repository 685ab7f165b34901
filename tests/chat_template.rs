//! SmolLM2's chat template, read from the real model file, rendered with minijinja.

mod common;

use pare::format::chat_template::{ChatTemplate, Message};
use pare::format::tokenizer::Tokenizer;
use pare::format::Gguf;

fn model() -> Gguf {
    Gguf::open(common::real_model()).expect("open model")
}

fn template() -> ChatTemplate {
    ChatTemplate::from_gguf(&model())
        .expect("compile template")
        .expect("SmolLM2 has a chat template")
}

const DEFAULT_SYSTEM: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

#[test]
fn user_message_gets_default_system_prompt() {
    let t = template();
    let out = t.apply(&[Message::new("user", "Hello!")], true).unwrap();
    assert_eq!(
        out,
        format!("{DEFAULT_SYSTEM}<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    );
    let out = t.apply(&[Message::new("user", "Hello!")], false).unwrap();
    assert_eq!(
        out,
        format!("{DEFAULT_SYSTEM}<|im_start|>user\nHello!<|im_end|>\n")
    );
}

#[test]
fn explicit_system_and_multi_turn() {
    let t = template();
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "What is 2+2?"),
        Message::new("assistant", "4"),
        Message::new("user", "And 3+3?"),
    ];
    let out = t.apply(&msgs, true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n4<|im_end|>\n\
         <|im_start|>user\nAnd 3+3?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn rendered_prompt_tokenizes_with_special_tokens() {
    let g = model();
    let t = ChatTemplate::from_gguf(&g).unwrap().unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let text = t.apply(&[Message::new("user", "hi")], true).unwrap();
    let ids = tok.encode(&text, true, true).unwrap();
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == im_end).count(), 2);
    assert_eq!(ids[0], im_start);
    assert_eq!(tok.decode(&ids).unwrap(), text);
    assert!(t.source().contains("add_generation_prompt"));
}
