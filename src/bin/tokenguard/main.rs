//! The `tokenguard` CLI: parse, call the library, print. Logic lives in the library.

mod cli;
mod commands;
mod exec;
mod input;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, FromArgMatches};
use tokenguard::Error;
use tokenguard::error::exit;

fn main() -> ExitCode {
    quiet_engine_panics();
    harden_process();
    quiet_libtss2();
    let parsed = cli::Cli::command()
        .after_help(exit::help_text())
        .long_version(long_version())
        .try_get_matches()
        .and_then(|m| cli::Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) if echoes_a_value(e.kind()) => {
            // clap would quote the offending argument, and a stray or misplaced
            // argument is often a secret typed where it never belongs: say what is
            // wrong and where, not what it was.
            let which = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(a)) => format!(" for {a}"),
                _ => String::new(),
            };
            let what = match e.kind() {
                ErrorKind::UnknownArgument => "unexpected argument".to_string(),
                ErrorKind::InvalidSubcommand => "unknown command".to_string(),
                _ => format!("invalid value{which}"),
            };
            let _ = writeln!(
                std::io::stderr(),
                "error: {what} (not shown: it may be a secret)\n\
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
    // SIGINT/SIGTERM/SIGHUP end a command at once, except inside a login or a write
    // transaction, which finish first; `exec` passes them on to its child once it
    // runs, and `refresh --watch` stops between passes.
    if let Err(e) = tokenguard::signals::defer_termination_signals() {
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

/// clap errors whose message would quote what the user typed.
fn echoes_a_value(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::UnknownArgument
            | ErrorKind::InvalidSubcommand
            | ErrorKind::InvalidValue
            | ErrorKind::ValueValidation
            | ErrorKind::InvalidUtf8
            | ErrorKind::NoEquals
    )
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

/// Crates whose trace logs would carry secrets (HTTP headers and bodies).
const SECRET_LOGGERS: [&str; 4] = ["ureq", "ureq_proto", "rustls", "http"];

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
    // The HTTP and TLS stacks log request headers and bodies at trace level — the
    // OAuth client secret and fresh tokens among them — so they are always off,
    // whatever RUST_LOG says.
    let mut parts: Vec<String> = spec
        .split(',')
        .filter(|d| !SECRET_LOGGERS.iter().any(|t| d.trim_start().starts_with(t)))
        .map(str::to_string)
        .collect();
    parts.extend(SECRET_LOGGERS.iter().map(|t| format!("{t}=off")));
    for noisy in ["cryptoki", "tss_esapi"] {
        if !parts.iter().any(|d| d.contains(noisy)) {
            parts.push(format!("{noisy}=off"));
        }
    }
    spec = parts.join(",");
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("warn,cryptoki=off,tss_esapi=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// The storage engine answers some kinds of damage in a store file with a panic,
/// which the store layer turns into an integrity error (exit 4, with a hint): its
/// panic message is noise next to that. Any other panic is a bug and says so.
fn quiet_engine_panics() {
    std::panic::set_hook(Box::new(|info| {
        let in_engine = info.location().is_some_and(|l| l.file().contains("/redb-"));
        if !in_engine {
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            let _ = writeln!(std::io::stderr(), "error: internal error{at} (a bug in tokenguard; please report it)");
        }
    }));
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
