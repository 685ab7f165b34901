//! The `pare` command line: argument parsing only; every job lives in the library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
