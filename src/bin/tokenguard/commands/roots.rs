//! The store and its roots: init, init-token, root list/add/remove, rotate-root.

use serde_json::json;
use tokenguard::Result;
use tokenguard::error::exit;

use super::{Ctx, print_json, printable};
use crate::cli::{InitTokenArgs, RootCommand};

pub fn init(ctx: &Ctx) -> Result<i32> {
    if ctx.config.store.path.exists() {
        // Idempotent, but only for the store this config opens: a wrong root or a
        // damaged store is still an error.
        let g = ctx.open()?;
        let text = format!("store {} is already initialised; nothing to do", g.path().display());
        ctx.out(json!({"store": g.path(), "roots": g.roots(), "created": false}), text)?;
        return Ok(exit::OK);
    }
    let g = ctx.config.init_guard_with(ctx.guard_options())?;
    if ctx.json {
        print_json(&json!({"store": g.path(), "roots": g.roots(), "created": true}))?;
    } else {
        say!("created store {}", g.path().display())?;
        for r in g.roots() {
            say!("  root {}: {}", r.root_id, r.description)?;
        }
    }
    Ok(exit::OK)
}

#[cfg(feature = "pkcs11")]
pub fn init_token(a: &InitTokenArgs) -> Result<i32> {
    let here = std::path::Path::new(".");
    let so = tokenguard::config::resolve_pin(&a.so_pin_source, here)?;
    let user = tokenguard::config::resolve_pin(&a.pin_source, here)?;
    let serial = tokenguard::root::pkcs11::init_token(&a.module, &a.label, &so, &user)?;
    say!("token {:?} ready (serial {serial})", a.label)?;
    Ok(exit::OK)
}

#[cfg(not(feature = "pkcs11"))]
pub fn init_token(_a: &InitTokenArgs) -> Result<i32> {
    Err(tokenguard::Error::BackendNotCompiled("pkcs11"))
}

pub fn root(ctx: &Ctx, command: RootCommand) -> Result<i32> {
    if let RootCommand::Add { root_config } = &command {
        // The new root's PIN, passphrase or key variables leave the environment
        // before any module loads, as the config's own do in `load_config`.
        let vars = tokenguard::config::Config::root_file_pin_env_vars(root_config)?;
        // SAFETY: as for `load_config`: main's thread, before the guard (and any
        // module that could read the environment) is opened; the signal thread never
        // touches the environment.
        #[allow(unsafe_code)]
        unsafe {
            tokenguard::pin::take_from_env(&vars)
        };
    }
    let g = ctx.open()?;
    match command {
        RootCommand::List => {
            let pins = g.pinned_roots()?;
            let text = pins.iter().map(|p| format!("{}\t{}", p.root_id, p.description)).collect::<Vec<_>>().join("\n");
            ctx.out(json!(pins), text)?;
        }
        RootCommand::Add { root_config } => {
            let pin = ctx.config.add_root_from_file(&g, &root_config)?;
            ctx.out(json!(pin), format!("added root {}: {}", pin.root_id, pin.description))?;
        }
        RootCommand::Remove { id } => {
            let pin = g.remove_root(id)?;
            note!(
                "removed root {}: {}; integrity key replaced and data keys rotated. Moving every record to the \
                 new keys (if this is interrupted, run `tokenguard reencrypt` and `tokenguard retire`)",
                pin.root_id,
                pin.description
            );
            // The records to the new data keys, then the old versions erased: the
            // removed root's wraps are already gone; this takes the old keys' material
            // out of the live file.
            let reports = g.reencrypt(None, tokenguard::guard::rotate::ReencryptOptions::default(), |_, _, _| {})?;
            let mut retired = Vec::new();
            let skipped: Vec<&String> = reports.iter().flat_map(|r| r.skipped.iter()).collect();
            for r in &reports {
                if !r.skipped.is_empty() {
                    // Their records stay under the old versions, which stay too.
                    continue;
                }
                match g.retire(&r.provider, r.target_version) {
                    Ok(v) if !v.is_empty() => retired.push((r.provider.clone(), v)),
                    Ok(_) | Err(tokenguard::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            let moved: u64 = reports.iter().map(|r| r.moved).sum();
            ctx.out(
                json!({"removed": pin, "reencrypted": moved, "retired": retired}),
                format!(
                    "removed root {}: {}; {moved} records re-encrypted, old data keys of {} providers retired",
                    pin.root_id,
                    pin.description,
                    retired.len()
                ),
            )?;
            if !skipped.is_empty() {
                note!(
                    "warning: records that do not open stay under the old data keys, which are kept for them: {}. \
                     Delete them, or `salvage` the store (see `tokenguard doctor`)",
                    skipped.iter().map(|s| printable(s)).collect::<Vec<_>>().join(", ")
                );
                return Ok(exit::INTEGRITY);
            }
        }
    }
    Ok(exit::OK)
}

pub fn rotate_root(ctx: &Ctx, new_key_label: Option<String>) -> Result<i32> {
    let g = ctx.open()?;
    let r = ctx.config.rotate_root(&g, new_key_label)?;
    ctx.out(json!({"added": r.added, "next": r.next}), &r.next)?;
    Ok(exit::OK)
}
