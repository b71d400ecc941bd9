//! The `tokenguard` CLI: parse, call the library, print. Logic lives in the library.

mod cli;
mod commands;
mod input;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use tokenguard::error::exit;

fn main() -> ExitCode {
    harden_process();
    quiet_libtss2();
    let parsed = cli::Cli::command()
        .after_help(exit::help_text())
        .try_get_matches()
        .and_then(|m| cli::Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { exit_code(exit::USAGE) } else { ExitCode::SUCCESS };
        }
    };
    init_logging();
    let json = cli.json;
    match commands::run(cli) {
        Ok(code) => exit_code(code),
        Err(e) => {
            let mut err = std::io::stderr().lock();
            if json {
                let v = serde_json::json!({
                    "error": e.to_string(),
                    "hint": e.hint(),
                    "exit_code": e.exit_code(),
                });
                let _ = writeln!(err, "{v}");
            } else {
                let _ = writeln!(err, "error: {e}");
                if let Some(h) = e.hint() {
                    let _ = writeln!(err, "hint: {h}");
                }
            }
            exit_code(e.exit_code())
        }
    }
}

/// A process exit code from the table in `tokenguard::error::exit` (all fit in a byte).
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("warn,cryptoki=off,tss_esapi=off"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

/// libtss2 logs every TPM error to stderr itself, including the expected "no object
/// at this handle" of a first start; the guard reports errors its own way. An
/// explicit TSS2_LOG from the user still wins.
#[allow(unsafe_code)]
fn quiet_libtss2() {
    if std::env::var_os("TSS2_LOG").is_none() {
        // SAFETY: first thing in main, before any other thread exists.
        unsafe { std::env::set_var("TSS2_LOG", "all+NONE") };
    }
}

/// No core dumps and no ptrace by other processes of the same user: a core file or a
/// debugger attach would expose unwrapped DEKs and the secret being printed.
#[allow(unsafe_code)]
fn harden_process() {
    let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit and prctl take plain values and a pointer to a local struct;
    // they touch no memory of ours beyond it.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}
