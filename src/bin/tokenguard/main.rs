//! The `tokenguard` CLI: parse, call the library, print. Logic lives in the library.

mod cli;
mod commands;
mod exec;
mod input;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches};
use tokenguard::Error;
use tokenguard::error::exit;

fn main() -> ExitCode {
    harden_process();
    quiet_libtss2();
    let parsed = cli::Cli::command()
        .after_help(exit::help_text())
        .long_version(long_version())
        .try_get_matches()
        .and_then(|m| cli::Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::UnknownArgument => {
            // clap would quote the stray argument, and a stray argument is often a
            // secret typed where it never belongs: say what is wrong, not what it was.
            let _ = writeln!(
                std::io::stderr(),
                "error: unexpected argument (not shown: it may be a secret)\n\
                 hint: secrets are read from stdin or --from-file, never from the command line; \
                 see `tokenguard help`"
            );
            return exit_code(exit::USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { exit_code(exit::USAGE) } else { ExitCode::SUCCESS };
        }
    };
    init_logging(cli.verbose, cli.quiet);
    // `exec` forwards signals to its child and `refresh --watch` stops between
    // passes; every other command lets SIGINT/SIGTERM/SIGHUP end it at once, except
    // inside a login or a write transaction, which finish first.
    let own_signals =
        matches!(&cli.command, cli::Command::Exec(_)) || matches!(&cli.command, cli::Command::Refresh(a) if a.watch);
    if !own_signals && let Err(e) = tokenguard::signals::defer_termination_signals() {
        let _ = writeln!(std::io::stderr(), "error: {e}");
        return exit_code(e.exit_code());
    }
    let json = cli.json;
    match commands::run(cli) {
        Ok(code) => exit_code(code),
        Err(e) if is_closed_stdout(&e) => exit_code(exit::CLOSED_PIPE),
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

/// The reader of stdout went away (`tokenguard list | head -1`): stop quietly, as
/// `ls | head` does.
fn is_closed_stdout(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
}

/// A process exit code from the table in `tokenguard::error::exit` (all fit in a byte).
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `--version`: the version, the commit and the cargo features built in.
fn long_version() -> &'static str {
    let features: Vec<&str> = [("pkcs11", cfg!(feature = "pkcs11")), ("tpm", cfg!(feature = "tpm"))]
        .into_iter()
        .filter_map(|(f, on)| on.then_some(f))
        .collect();
    let text = format!(
        "{} (commit {}; features: {})",
        env!("CARGO_PKG_VERSION"),
        env!("TOKENGUARD_COMMIT"),
        if features.is_empty() { "none".to_string() } else { features.join(", ") }
    );
    Box::leak(text.into_boxed_str())
}

/// Log filter: RUST_LOG when set, else the level -v/-q ask for. The PKCS#11 and TPM
/// libraries' own logs are off unless RUST_LOG names them: cryptoki logs an ERROR for
/// every mechanism type it does not know while listing a token's mechanisms. Colour
/// only on a terminal.
fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let mut spec = std::env::var("RUST_LOG").unwrap_or_else(|_| {
        match (quiet, verbose) {
            (true, _) => "error",
            (false, 0) => "warn",
            (false, 1) => "info",
            (false, 2) => "debug",
            _ => "trace",
        }
        .to_string()
    });
    for noisy in ["cryptoki", "tss_esapi"] {
        if !spec.contains(noisy) {
            spec.push_str(&format!(",{noisy}=off"));
        }
    }
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("warn,cryptoki=off,tss_esapi=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
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
