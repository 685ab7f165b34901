use pare::format::Gguf;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (GGUF).
    #[arg(short = 'm', long = "model")]
    model: std::path::PathBuf,
    /// Also list every tensor.
    #[arg(long)]
    tensors: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
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
