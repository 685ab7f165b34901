//! Kernel throughput on SmolLM2-135M's matrix shapes, as effective GB/s of weight bytes read.
//!
//! Decode is memory bound, so a matrix-vector product should approach the machine's read
//! bandwidth, which `read_bandwidth` measures the same way (2 threads summing a 256 MiB buffer).
//! Groups:
//! - `matvec_t2/FORMAT/ROWSxCOLS`: 1 token, 2 threads, through `matmul` as the forward pass calls it;
//! - `matvec_t1/FORMAT/ROWSxCOLS`: 1 token, the kernel alone on the calling thread;
//! - `matmul64_t2/FORMAT/ROWSxCOLS`: 64 tokens (prompt processing), 2 threads;
//! - `sparse_t1/FORMAT/ROWSxCOLS/{warm,cold}-{100,50,25}`: the sparse FFN's product on a
//!   transposed-group copy with that percentage of the inputs active, beside `dense` (the
//!   row-major kernel on the same weights, all inputs), 1 thread; `warm` repeats one matrix
//!   (in cache), `cold` cycles through 128 copies (~70 MiB, from memory as in decoding).
//!   Throughput counts the bytes each reads;
//! - `read_bandwidth/256MiB_t2`.
//!
//! `cargo bench --bench kernels -- matvec_t2/q4_g32/` runs a subset (criterion filters by name).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pare::quant::activation::Q8Acts;
use pare::quant::kernels;
use pare::quant::matmul::{matmul, Input, QMatrix, WeightBytes};
use pare::quant::quantize::{quantize_row, Options};
use pare::quant::{GgmlType, Pq};

const THREADS: usize = 2;
/// (rows, cols): attention projections, FFN up/gate, FFN down, the output head.
const SHAPES: [(usize, usize); 4] = [(576, 576), (1536, 576), (576, 1536), (49152, 576)];

fn formats() -> Vec<GgmlType> {
    let mut v = vec![
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
    ];
    for bits in [1, 2, 3, 4, 5, 6, 8] {
        for group in [32, 64, 128] {
            v.push(GgmlType::Pq(Pq::new(bits, group, false).unwrap()));
        }
    }
    for (bits, group) in [(1, 128), (2, 64), (3, 64), (4, 32), (4, 128), (8, 32)] {
        v.push(GgmlType::Pq(Pq::new(bits, group, true).unwrap()));
    }
    v
}

/// Pseudo-random weight bytes with finite, normal scales (and minimums) in every group header, so
/// that no denormal or NaN arithmetic skews the timing.
fn weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let Some(p) = Pq::of_ggml(ty) else {
        // Float weights: small values in [-0.5, 0.5).
        let x: Vec<f32> = (0..cols)
            .map(|j| (j * 7919 % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let rb = ty.row_bytes(cols).unwrap();
        let mut row = vec![0u8; rb];
        quantize_row(ty, &x, &Options::default(), &mut row).unwrap();
        return row.repeat(rows);
    };
    let rb = p.row_bytes(cols);
    let mut s = 0x9E3779B97F4A7C15u64;
    let mut w: Vec<u8> = (0..rows * rb)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    let (hb, cb, g) = (p.header_bytes(), p.chunk_bytes(), p.group as usize);
    for row in w.chunks_exact_mut(rb) {
        let mut off = 0;
        for g0 in (0..cols).step_by(g) {
            let n = (cols - g0).min(g);
            row[off..off + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            if !p.sym {
                row[off + 2..off + 4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
            }
            off += hb + n.div_ceil(32) * cb;
        }
    }
    w
}

fn activations(n: usize, cols: usize) -> (Vec<f32>, Q8Acts) {
    let x: Vec<f32> = (0..n * cols)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
        .collect();
    let mut q8 = Q8Acts::default();
    q8.quantize(&x, n, cols);
    (x, q8)
}

fn kernels_bench(c: &mut Criterion) {
    assert!(pare::parallel::set_threads(THREADS));
    let isa = kernels::isa();
    eprintln!("kernels on {} with {THREADS} threads", isa.name());
    for ty in formats() {
        let name = ty.name();
        for (rows, cols) in SHAPES {
            let w = weights(ty, rows, cols);
            let n_bytes = w.len() as u64;
            let m = QMatrix::new("w", ty, rows, cols, WeightBytes::from_vec(w)).unwrap();
            let shape = format!("{rows}x{cols}");
            let id = BenchmarkId::new(name, &shape);

            let (x, q8) = activations(1, cols);
            let input = Input {
                x: &x,
                q8: Some(&q8),
                n: 1,
            };
            let mut out = vec![0.0f32; rows];
            let mut g = c.benchmark_group("matvec_t2");
            short(&mut g).throughput(Throughput::Bytes(n_bytes));
            g.bench_function(id.clone(), |b| {
                b.iter(|| matmul(&m, black_box(&input), &mut out))
            });
            g.finish();

            if cols == 576 && rows >= 1536 {
                let xs = [q8.row(0)];
                let mut g = c.benchmark_group("matvec_t1");
                short(&mut g).throughput(Throughput::Bytes(n_bytes));
                let rb = ty.row_bytes(cols).unwrap();
                g.bench_function(id.clone(), |b| {
                    b.iter(|| {
                        // SAFETY: `out` has `rows` elements, written once each (token 0, ldo = rows).
                        unsafe {
                            if kernels::has_float_kernel(ty) {
                                kernels::gemm_tile_float(
                                    isa,
                                    ty,
                                    black_box(m.bytes()),
                                    cols,
                                    &x,
                                    out.as_mut_ptr(),
                                    rows,
                                )
                            } else {
                                kernels::gemm_tile(
                                    isa,
                                    ty,
                                    black_box(m.bytes()),
                                    rb,
                                    &xs,
                                    out.as_mut_ptr(),
                                    rows,
                                )
                            }
                        }
                    })
                });
                g.finish();
            }

            if rows == 1536 || rows == 49152 && ty == GgmlType::Q4_0 {
                // Prompt processing: 64 tokens share each unpacked weight chunk, 4 at a time.
                let n = 64;
                let (x, q8) = activations(n, cols);
                let input = Input {
                    x: &x,
                    q8: Some(&q8),
                    n,
                };
                let mut out = vec![0.0f32; n * rows];
                let mut g = c.benchmark_group("matmul64_t2");
                short(&mut g).throughput(Throughput::Bytes(n_bytes));
                g.bench_function(id, |b| b.iter(|| matmul(&m, black_box(&input), &mut out)));
                g.finish();
            }
        }
    }
}

fn short<'a, 'b>(
    g: &'a mut criterion::BenchmarkGroup<'b, criterion::measurement::WallTime>,
) -> &'a mut criterion::BenchmarkGroup<'b, criterion::measurement::WallTime> {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600))
}

/// Sums a 256 MiB buffer of u64 on the pool's threads: the read bandwidth the kernels compete with.
fn read_bandwidth(c: &mut Criterion) {
    assert!(pare::parallel::set_threads(THREADS));
    let words = 256 << 20 >> 3;
    let buf: Vec<u64> = (0..words as u64).collect();
    let parts = 64;
    let per = words / parts;
    let sums: Vec<std::sync::atomic::AtomicU64> = (0..parts)
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    let mut g = c.benchmark_group("read_bandwidth");
    short(&mut g).throughput(Throughput::Bytes((words * 8) as u64));
    g.bench_function("256MiB_t2", |b| {
        b.iter(|| {
            pare::parallel::for_each(parts, &|i| {
                // Four independent sums so the adds keep up with the loads.
                let mut s = [0u64; 4];
                for c in buf[i * per..(i + 1) * per].chunks_exact(4) {
                    for k in 0..4 {
                        s[k] = s[k].wrapping_add(c[k]);
                    }
                }
                sums[i].store(
                    s.iter().fold(0, |a, &v| a.wrapping_add(v)),
                    std::sync::atomic::Ordering::Relaxed,
                );
            });
            black_box(&sums);
        })
    });
    g.finish();
}

/// The sparse FFN's product against the dense kernel on FFN shapes (see the module docs).
fn sparse_bench(c: &mut Criterion) {
    use pare::quant::kernels::sparse::{bytes_read, product, Active};
    use pare::quant::transposed::{Layout, TgMatrix};
    let isa = kernels::isa();
    for ty in [GgmlType::Q4_1, GgmlType::Pq(Pq::new(3, 64, false).unwrap())] {
        let p = Pq::of_ggml(ty).unwrap();
        for (rows, cols) in [(1536, 576), (576, 1536)] {
            let shape = format!("{rows}x{cols}");
            let rb = ty.row_bytes(cols).unwrap();
            let w = weights(ty, rows, cols);
            let layout = Layout::new(p, rows, cols).unwrap();
            let tg = layout.from_rows(&w).unwrap();
            for (temp, copies) in [("warm", 1usize), ("cold", 128)] {
                let dense: Vec<Vec<u8>> = (0..copies).map(|_| w.clone()).collect();
                let tgs: Vec<TgMatrix> = (0..copies)
                    .map(|_| TgMatrix::new("w", layout, WeightBytes::from_vec(tg.clone())).unwrap())
                    .collect();
                let (_, q8) = activations(1, cols);
                let xs = [q8.row(0)];
                let mut out = vec![0.0f32; rows];
                let mut g = c.benchmark_group("sparse_t1");
                short(&mut g).throughput(Throughput::Bytes(w.len() as u64));
                let mut k = 0;
                g.bench_function(
                    BenchmarkId::new(ty.name(), format!("{shape}/{temp}-dense")),
                    |b| {
                        b.iter(|| {
                            k = (k + 1) % copies;
                            // SAFETY: `out` has `rows` elements, written once each.
                            unsafe {
                                kernels::gemm_tile(
                                    isa,
                                    ty,
                                    black_box(&dense[k]),
                                    rb,
                                    &xs,
                                    out.as_mut_ptr(),
                                    rows,
                                )
                            }
                        })
                    },
                );
                for pct in [100usize, 50, 25] {
                    let mut act = Active::default();
                    // Every (100 / pct)-th input by a hash, so the active ones are spread.
                    act.build(&q8.row(0), cols, |j| (j * 2654435761) % 100 < pct);
                    g.throughput(Throughput::Bytes(bytes_read(&layout, &act) as u64));
                    g.bench_function(
                        BenchmarkId::new(ty.name(), format!("{shape}/{temp}-{pct}")),
                        |b| {
                            b.iter(|| {
                                k = (k + 1) % copies;
                                product(isa, &tgs[k], black_box(&act), 0..rows, &mut out)
                            })
                        },
                    );
                }
                g.finish();
            }
        }
    }
}

criterion_group!(benches, read_bandwidth, kernels_bench, sparse_bench);
criterion_main!(benches);
