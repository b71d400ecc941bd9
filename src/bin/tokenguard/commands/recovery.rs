//! `recovery split` and `recovery combine`: k-of-n custodians of an age escrow root
//! (the library's `recovery` module does the work).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches};
use serde_json::json;
use tokenguard::error::exit;
use tokenguard::recovery::{self, Custodian, Share};
use tokenguard::{Error, Result};

use super::print_json;
use crate::cli::{Cli, Command, RecoveryCommand};

/// The global options of the `recovery` invocation, passed on to a command after `--`.
pub struct Outer {
    pub config: Option<PathBuf>,
    pub json: bool,
}

pub fn run(c: RecoveryCommand, outer: Outer) -> Result<i32> {
    match c {
        RecoveryCommand::Split { threshold, custodians, out_dir } => {
            split(threshold, &custodians, &out_dir, outer.json)
        }
        RecoveryCommand::Combine { shares, out, command } => combine(&shares, out.as_deref(), command, outer),
        RecoveryCommand::AuthKey { identity, passphrase_source, out } => {
            let base = Path::new(".");
            let ids = tokenguard::root::age::AgeIdentity::load(&identity, passphrase_source.as_deref(), base)?;
            let [id] = ids.as_slice() else {
                return Err(Error::InvalidInput(format!(
                    "{} holds {} identities; an age root has one",
                    identity.display(),
                    ids.len()
                )));
            };
            let key = tokenguard::root::age::auth_key_of(id);
            tokenguard::recovery::write_share_file(
                &out,
                tokenguard::root::age::auth_key_text(&id.recipient(), &key).as_bytes(),
            )?;
            if outer.json {
                print_json(&json!({"recipient": id.recipient(), "auth_key_file": out}))?;
            } else {
                say!(
                    "wrote the authentication key of the age root {} to {} (mode 0600)",
                    id.recipient(),
                    out.display()
                )?;
            }
            Ok(exit::OK)
        }
    }
}

fn split(threshold: u8, custodians: &[String], out_dir: &Path, json: bool) -> Result<i32> {
    let custodians = custodians.iter().map(|c| Custodian::parse(c)).collect::<Result<Vec<_>>>()?;
    let paths: Vec<PathBuf> = custodians.iter().map(|c| out_dir.join(format!("{}.share.age", c.name))).collect();
    let auth_path = out_dir.join("escrow-auth.key");
    // Nothing is written when any file is in the way.
    if let Some(p) = paths.iter().chain([&auth_path]).find(|p| p.exists()) {
        return Err(Error::InvalidInput(format!("{} exists; share files are never overwritten", p.display())));
    }
    let s = recovery::split(threshold, &custodians)?;
    for (share, path) in s.shares.iter().zip(&paths) {
        tokenguard::recovery::write_share_file(path, &share.file)?;
    }
    tokenguard::recovery::write_share_file(
        &auth_path,
        tokenguard::root::age::auth_key_text(&s.recipient, &s.auth_key).as_bytes(),
    )?;
    let n = s.shares.len();
    if json {
        let files: Vec<_> = s
            .shares
            .iter()
            .zip(&paths)
            .map(|(sh, p)| json!({"custodian": sh.custodian, "index": sh.index, "file": p}))
            .collect();
        print_json(&json!({
            "recipient": s.recipient,
            "split": s.split_id,
            "threshold": s.threshold,
            "shares": files,
            "auth_key_file": auth_path,
        }))?;
    } else {
        say!("split {}: any {} of {n} custodians rebuild the new age identity", s.split_id, s.threshold)?;
        for (sh, p) in s.shares.iter().zip(&paths) {
            say!("  share {} for {}: {}", sh.index, sh.custodian, p.display())?;
        }
        say!("recipient: {}", s.recipient)?;
        say!("authentication key (for the service, like its PIN; it decrypts nothing): {}", auth_path.display())?;
        say!(
            "next: send each custodian their file (only their own age identity opens it); move the authentication \
             key to where the service reads its PIN; then add the root with a file holding\n  [[roots]]\n  \
             backend = \"age\"\n  recipient = \"{}\"\n  auth_key_source = \"file:/PATH/TO/escrow-auth.key\"\n\
             and `tokenguard root add --root-config FILE`",
            s.recipient
        )?;
    }
    Ok(exit::OK)
}

fn combine(paths: &[PathBuf], out: Option<&Path>, command: Vec<OsString>, outer: Outer) -> Result<i32> {
    let shares = paths.iter().map(|p| Share::read(p)).collect::<Result<Vec<_>>>()?;
    if out.is_none() && command.is_empty() {
        // Checked after the shares, so a wrong share is reported first either way.
        recovery::combine(&shares)?;
        return Err(Error::InvalidInput(
            "the shares rebuild the identity; say what to do with it: --out FILE, or -- COMMAND".into(),
        ));
    }
    let identity = recovery::combine(&shares)?;
    drop(shares);
    if let Some(path) = out {
        identity.write_new(path)?;
        if outer.json {
            print_json(&json!({"recipient": identity.recipient(), "identity_file": path}))?;
        } else {
            say!("wrote the identity of {} to {} (mode 0600)", identity.recipient(), path.display())?;
            note!("keep it offline, and delete it when the recovery is done");
        }
        return Ok(exit::OK);
    }
    let args = std::iter::once(OsString::from("tokenguard")).chain(command);
    // As main does for the outer command: clap's message may quote an argument.
    let refused =
        |e: clap::Error| Error::InvalidInput(format!("the command after --: {} (see `tokenguard help`)", e.kind()));
    let matches = Cli::command().try_get_matches_from(args).map_err(refused)?;
    let mut inner = Cli::from_arg_matches(&matches).map_err(refused)?;
    // The outer --config (or TOKENGUARD_CONFIG, which the outer parse read) holds
    // unless the command after -- names its own.
    if matches.value_source("config") != Some(clap::parser::ValueSource::CommandLine) {
        inner.config = outer.config.or(inner.config);
    }
    // One command, run once: nothing that keeps the identity in memory for longer
    // (a server, a watch loop, a child process) nor a second recovery.
    let long_lived = match &inner.command {
        Command::Recovery(_) | Command::Serve | Command::Exec(_) => true,
        Command::Refresh(a) => a.watch,
        _ => false,
    };
    if long_lived {
        return Err(Error::InvalidInput(
            "the command after -- runs once with the rebuilt identity: not `serve`, `exec`, `refresh --watch` nor \
             `recovery`"
                .into(),
        ));
    }
    inner.json |= outer.json;
    // The identity is in this process: the store is opened here, not by an agent.
    inner.direct = true;
    note!("using the identity of {} for: the command after --", identity.recipient());
    super::run_with(inner, vec![Arc::new(identity)])
}
