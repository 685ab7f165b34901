use pare::format::hf::HfCheckpoint;
use pare::format::Gguf;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(short = 'm', long = "model")]
    model: std::path::PathBuf,
    /// Also list every tensor.
    #[arg(long)]
    tensors: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if HfCheckpoint::is_checkpoint_dir(&a.model) {
        return inspect_dir(&a);
    }
    let g = Gguf::open(&a.model)?;
    println!("file: {}", a.model.display());
    println!(
        "GGUF v{}, {} metadata entries, {} tensors, alignment {}, data at byte {}",
        g.version,
        g.metadata.len(),
        g.tensors.len(),
        g.alignment,
        g.data_offset
    );
    println!("\nmetadata:");
    for (k, v) in &g.metadata {
        println!("  {k} = {}", v.summary());
    }
    let mut by_type = std::collections::BTreeMap::<&str, (usize, u64, usize)>::new();
    for t in &g.tensors {
        let e = by_type.entry(t.ggml_type.name()).or_default();
        e.0 += 1;
        e.1 += t.n_elements();
        e.2 += t.n_bytes();
    }
    let params: u64 = g.tensors.iter().map(|t| t.n_elements()).sum();
    let bytes: usize = g.tensors.iter().map(|t| t.n_bytes()).sum();
    println!("\nformats:");
    for (ty, (n, p, b)) in &by_type {
        println!(
            "  {ty:6} {n:4} tensors {p:12} weights {:10.2} MiB  {:.3} bits/weight",
            *b as f64 / (1 << 20) as f64,
            *b as f64 * 8.0 / *p as f64
        );
    }
    println!(
        "  total  {} tensors {params:12} weights {:10.2} MiB  {:.3} bits/weight",
        g.tensors.len(),
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 * 8.0 / params as f64
    );
    if a.tensors {
        println!("\ntensors:");
        for t in &g.tensors {
            println!(
                "  {:32} {:6} {:?} {} bytes at {}",
                t.name,
                t.ggml_type.name(),
                t.dims,
                t.n_bytes(),
                g.data_offset + t.offset
            );
        }
    }
    Ok(())
}

/// A checkpoint directory: its configuration, weight files and tensors by dtype.
fn inspect_dir(a: &Args) -> anyhow::Result<()> {
    let ck = HfCheckpoint::open(&a.model)?;
    let config = pare::model::Config::from_hf(&ck.config, &ck.config_path())?;
    println!("directory: {}", a.model.display());
    println!("config: {config:?}");
    println!(
        "chat template: {}",
        if ck.chat_template.is_some() {
            "yes"
        } else {
            "no"
        }
    );
    println!("\nfiles:");
    for s in &ck.shards {
        println!("  {} ({} tensors)", s.path.display(), s.tensors.len());
    }
    let mut by_type = std::collections::BTreeMap::<String, (usize, usize, usize)>::new();
    for name in ck.tensor_names() {
        if let Some((_, t)) = ck.tensor(name) {
            let e = by_type.entry(t.dtype.to_string()).or_default();
            e.0 += 1;
            e.1 += t.n_elements();
            e.2 += t.len;
        }
    }
    println!("\nformats:");
    for (ty, (n, p, b)) in &by_type {
        println!(
            "  {ty:6} {n:4} tensors {p:12} weights {:10.2} MiB",
            *b as f64 / (1 << 20) as f64
        );
    }
    if a.tensors {
        println!("\ntensors:");
        for name in ck.tensor_names() {
            if let Some((file, t)) = ck.tensor(name) {
                let file = file.path.file_name().unwrap_or_default().to_string_lossy();
                println!(
                    "  {name:50} {:5} {:?} in {file}",
                    t.dtype.to_string(),
                    t.shape
                );
            }
        }
    }
    Ok(())
}
