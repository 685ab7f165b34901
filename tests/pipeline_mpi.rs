//! Pipeline stages as MPI ranks (cargo feature `mpi`; needs `mpirun` from Open MPI): 2 and 3 ranks
//! on loopback and 2 ranks as two "hosts" over MPI's TCP transport give the single-worker
//! perplexity and greedy text; a wrong rank count or a dead rank ends the job with an error;
//! `pare tune` over 2 ranks trains the adapters one worker trains, with its training and
//! validation losses.
#![cfg(feature = "mpi")]

mod common;

use std::process::{Command, Output};

const CTX: &str = "64";
const CHUNKS: &str = "2";

fn pare() -> &'static str {
    env!("CARGO_BIN_EXE_pare")
}

fn model() -> String {
    common::real_model().to_str().unwrap().to_string()
}

fn text() -> String {
    common::root()
        .join("data/wikitext-2-valid.tokens.txt")
        .to_str()
        .unwrap()
        .to_string()
}

/// `mpirun` with the flags a 2-core machine running as root needs, bounded by a timeout so a hang
/// fails the test instead of the CI.
fn mpirun(np: usize, extra: &[&str], args: &[&str]) -> Output {
    let np = np.to_string();
    let mut c = Command::new("timeout");
    c.args(["180", "mpirun", "-np", &np, "--oversubscribe"])
        .args(["--mca", "mpi_yield_when_idle", "1"])
        .args(extra)
        .arg(pare())
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c.output()
        .expect("running mpirun (install Open MPI: apt-get install openmpi-bin)")
}

fn ppl_args(stages: usize) -> Vec<String> {
    let m = model();
    let f = text();
    let s = stages.to_string();
    [
        "perplexity",
        "-m",
        &m,
        "-f",
        &f,
        "--ctx",
        CTX,
        "--chunks",
        CHUNKS,
        "-t",
        "1",
        "--json",
        "--stages",
        &s,
        "--micro-batches",
        "2",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn json_ppl(out: &Output) -> f64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a JSON line");
    serde_json::from_str::<serde_json::Value>(last).unwrap()["ppl"]
        .as_f64()
        .unwrap()
}

fn single_worker_ppl() -> f64 {
    let args = ppl_args(1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // --stages 1 outside mpirun: the plain single-worker path.
    json_ppl(
        &Command::new(pare())
            .args(&args[..args.len() - 4])
            .output()
            .unwrap(),
    )
}

fn assert_close(a: f64, b: f64) {
    assert!(((a - b) / b).abs() <= 1e-5, "{a} vs {b}");
}

#[test]
fn two_and_three_ranks_equal_one_worker() {
    let want = single_worker_ppl();
    for n in [2, 3] {
        let args = ppl_args(n);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = mpirun(n, &[], &args);
        let got = json_ppl(&out);
        eprintln!("{n} ranks: {got} (one worker {want})");
        assert_close(got, want);
        if n == 3 {
            middle_rank_holds_only_its_stage(&String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The middle rank of 3 (no embeddings, no head, no logits) stays within its stage's weight bytes
/// + 64 MiB: it touched only its own tensors of the mapped file.
fn middle_rank_holds_only_its_stage(stderr: &str) {
    use pare::pipeline::partition::{partition, Costs, RunShape};
    let model = pare::model::Model::load(common::real_model()).unwrap();
    let ctx: usize = CTX.parse().unwrap();
    let shape = RunShape::new(&model, ctx, ctx, ctx);
    let plan = partition(&Costs::estimate(&model), &shape, 3, None).unwrap();
    let weights = plan.stages[1].weight_bytes as f64 / (1 << 20) as f64;
    let line = stderr
        .lines()
        .find(|l| l.contains("rank 1: layers"))
        .unwrap_or_else(|| panic!("no RSS line for rank 1 in {stderr}"));
    let rss: f64 = line
        .split("peak RSS ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("unreadable RSS line {line:?}"));
    eprintln!("rank 1: peak RSS {rss} MiB, stage weights {weights:.2} MiB");
    assert!(rss <= weights + 64.0, "{line}: weights {weights:.2} MiB");
}

#[test]
fn kl_comparison_over_ranks_equals_one_worker() {
    // Base records go from rank 0 to the last rank with each micro-batch; only the per-token
    // comparisons come back.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.kld");
    let base = base.to_str().unwrap();
    let args = ppl_args(1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let one = &args[..args.len() - 4];
    let saved = Command::new(pare())
        .args(one)
        .args(["--kl-base-out", base])
        .output()
        .unwrap();
    let want = json_ppl(&saved);
    let staged = ppl_args(2);
    let mut staged: Vec<&str> = staged.iter().map(String::as_str).collect();
    staged.extend(["--kl-base", base]);
    let out = mpirun(2, &[], &staged);
    assert_close(json_ppl(&out), want);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let kld = v["kld_mean"].as_f64().unwrap();
    assert!(kld < 1e-5, "mean KLD {kld}");
    assert!(v["same_top"].as_f64().unwrap() > 0.99, "{v}");
}

#[test]
fn two_hosts_over_tcp_equal_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("rsh");
    // mpirun starts its daemon on the "remote" host through this agent: run it here.
    std::fs::write(&agent, "#!/bin/sh\nshift\nexec sh -c \"$*\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = agent.to_str().unwrap();
    let extra = [
        "--host",
        "127.0.0.1:1,127.0.0.2:1",
        "--bind-to",
        "none",
        "--mca",
        "btl",
        "tcp,self",
        "--mca",
        "btl_tcp_if_include",
        "lo",
        "--mca",
        "plm_rsh_agent",
        agent,
    ];
    let args = ppl_args(2);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_close(json_ppl(&mpirun(2, &extra, &args)), single_worker_ppl());
}

#[test]
fn greedy_generation_over_ranks_equals_one_worker() {
    let m = model();
    let args = [
        "run",
        "-m",
        &m,
        "-p",
        "The capital of France is",
        "-n",
        "8",
        "--temp",
        "0",
        "-t",
        "1",
        "--quiet",
    ];
    let one = Command::new(pare()).args(args).output().unwrap();
    assert!(one.status.success());
    let mut staged: Vec<&str> = args.to_vec();
    staged.extend(["--stages", "2"]);
    let two = mpirun(2, &[], &staged);
    assert!(
        two.status.success(),
        "{}",
        String::from_utf8_lossy(&two.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&two.stdout),
        String::from_utf8_lossy(&one.stdout)
    );
}

#[test]
fn wrong_rank_count_is_a_clear_error() {
    let args = ppl_args(3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mpirun(2, &[], &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(124), "timed out: {err}");
    assert!(
        err.contains("mpirun started 2 ranks but the plan has 3 stages"),
        "{err}"
    );
}

#[test]
fn a_dead_rank_ends_the_job() {
    let args = ppl_args(2);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mpirun(2, &["-x", "PARE_TEST_KILL_RANK=1"], &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(124), "timed out: {err}");
    assert!(err.contains("rank 1"), "{err}");
}

/// `pare tune` on a small synthetic model: one worker with 2 sequences a step, and 2 MPI ranks
/// (one stage each, 2 micro-batches under `schedule`) must train the same adapters, with the same
/// training and validation loss at every step (validation through the stages, only rank 0
/// reading the data); so must 2 stages as threads.
#[test]
fn tuning_over_two_ranks_equals_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::synthetic_model(dir.path(), "llama", "q8_0", 4, 4);
    let data = dir.path().join("data.txt");
    std::fs::write(
        &data,
        "To be, or not to be, that is the question: whether 'tis nobler in the mind. ".repeat(8),
    )
    .unwrap();
    let tune = |out: &std::path::Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "tune",
            "-m",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "3",
            "--seq-len",
            "24",
            "--targets",
            "q,v,down",
            "--val-split",
            "0.2",
            "--eval-every",
            "1",
            "-t",
            "1",
            "-o",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let one = dir.path().join("one");
    let o = Command::new(pare())
        .args(tune(&one, &["--accum", "2"]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let loss = |o: &Output| {
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        let at = s.find("final train loss").expect("a summary line");
        s[at..].split(';').next().unwrap().to_string()
    };
    let reference = loss(&o);
    // Every step's training and validation loss, all digits, from the checkpoint's history.
    let history = |out: &std::path::Path| -> Vec<(f64, f64)> {
        let p = out.join("checkpoint").join("trainer_state.json");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        j["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["loss"].as_f64().unwrap(), r["val_loss"].as_f64().unwrap()))
            .collect()
    };
    // Every step's training and validation loss within 1e-4 of `want`'s.
    let close = |what: &str, got: &[(f64, f64)], want: &[(f64, f64)]| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (step, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g.0 - w.0).abs() <= 1e-4 * w.0.abs(),
                "{what} step {step}: loss {g:?} vs {w:?}"
            );
            assert!(
                (g.1 - w.1).abs() <= 1e-4 * w.1.abs(),
                "{what} step {step}: validation {g:?} vs {w:?}"
            );
        }
    };
    let want_history = history(&one);
    assert_eq!(want_history.len(), 3);
    let same_history = |what: &str, got: Vec<(f64, f64)>| close(what, &got, &want_history);
    // Two stages of layers 0-1 and 2-3, two micro-batches.
    let staged = |schedule| {
        [
            "--stages",
            "2",
            "--micro-batches",
            "2",
            "--stage-layers",
            "0-1,2-3",
            "--schedule",
            schedule,
        ]
    };
    let config = pare::model::Model::load(&base).unwrap().config;
    let want = pare::model::Lora::load(&one, &config).unwrap();
    for schedule in ["gpipe", "1f1b"] {
        let out = dir.path().join(schedule);
        let staged = staged(schedule);
        let args = tune(&out, &staged);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = mpirun(2, &[], &args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{schedule}: {stderr}");
        assert_eq!(loss(&o), reference, "{schedule}");
        same_history(schedule, history(&out));
        // The same stages as threads of one process.
        let threads = dir.path().join(format!("{schedule}-threads"));
        let t = Command::new(pare())
            .args(tune(&threads, &staged))
            .output()
            .unwrap();
        assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
        same_history(&format!("{schedule} threads"), history(&threads));
        assert!(stderr.contains("rank 1: layers 2-3"), "{stderr}");
        let got = pare::model::Lora::load(&out, &config).unwrap();
        for (a, b) in want.params().zip(got.params()) {
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-4 * scale.max(1e-12),
                    "{schedule}: {x} vs {y}"
                );
            }
        }
    }
    // Resuming over the ranks (rank 0 checks the data; the others read none) continues as one
    // worker resumed from its own checkpoint does.
    let resumed = |out: &std::path::Path, extra: &[&str]| -> Vec<String> {
        let mut v = tune(out, extra);
        let at = v.iter().position(|a| a == "--steps").unwrap();
        v[at + 1] = "4".into();
        v.extend(["--resume".to_string(), out.to_str().unwrap().to_string()]);
        v
    };
    let o = Command::new(pare())
        .args(resumed(&one, &["--accum", "2"]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("1f1b");
    let args = resumed(&out, &staged("1f1b"));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = mpirun(2, &[], &args);
    assert!(
        o.status.success(),
        "resume: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (want, got) = (history(&one), history(&out));
    assert_eq!((want.len(), got.len()), (4, 4));
    close("resumed", &got, &want);
}
