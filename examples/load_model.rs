//! Load time and memory of a model (GGUF file or Hugging Face checkpoint directory), stage by
//! stage, for BENCHMARKS.md: `cargo run --release --example load_model -- MODEL`.
//!
//! Memory comes from /proc/self/status: RssAnon is memory pare allocated, RssFile the pages of
//! mapped model files that have been touched, VmHWM the peak resident set. A loader that copies
//! the weights shows them in RssAnon; one that maps them shows them (once touched) in RssFile.

use std::time::Instant;

use pare::model::{Logits, Model, State};

fn status() -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or("?".to_string(), |kb| format!("{:.1}", kb / 1024.0))
    };
    format!(
        "RssAnon {} MiB, RssFile {} MiB, VmHWM {} MiB",
        get("RssAnon:"),
        get("RssFile:"),
        get("VmHWM:")
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: load_model MODEL (GGUF file or checkpoint directory)")?;
    println!("start: {}", status());
    let t = Instant::now();
    let model = Model::load(&path)?;
    println!(
        "load: {:.1} ms; {}",
        t.elapsed().as_secs_f64() * 1e3,
        status()
    );
    let t = Instant::now();
    let tok = model.tokenizer()?;
    println!(
        "tokenizer: {:.1} ms; {}",
        t.elapsed().as_secs_f64() * 1e3,
        status()
    );
    let ids = tok.encode(
        "The capital of France is Paris, and the capital of",
        true,
        false,
    )?;
    let mut st = State::new(&model, 64)?;
    let t = Instant::now();
    model.forward(&mut st, &ids, Logits::Last)?;
    println!(
        "forward of {} tokens: {:.1} ms; {}",
        ids.len(),
        t.elapsed().as_secs_f64() * 1e3,
        status()
    );
    Ok(())
}
