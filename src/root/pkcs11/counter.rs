//! The store's rollback counter in a PKCS#11 token: a private token data object
//! (`CKO_DATA`) found by `CKA_APPLICATION = "tokenguard-counter/<counter_label>"`,
//! whose value is the decimal after `=` in its `CKA_LABEL` (`"<counter_label>=<n>"`).
//! The label, because every token lets a holder of the PIN set it (SoftHSM2 refuses
//! to change a data object's `CKA_VALUE`). Only a PIN holder can create such objects,
//! and the store moves the counter only while it holds its counter lock, one step per
//! commit.
//!
//! A step never rewrites an object: it creates the object for the new value, then
//! destroys the older ones, and the counter is the highest value among its objects.
//! SoftHSM2 rewrites a changed object's file in place, so a process killed in that
//! write left no counter at all (the store then refuses to open: fail closed, but a
//! kill must not cost the store); a kill between the two steps now leaves the old
//! object, or both.
//!
//! What it is worth depends on the token: an HSM keeps the object inside; SoftHSM2
//! keeps it in a file of its token directory, so someone who can also put back an
//! older copy of that directory can roll both back together (README, Security notes).

use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::Session;

use super::lock::TokenLock;
use super::module::hw;
use super::{BACKEND, Pkcs11Root};
use crate::error::{Error, Result};
use crate::root::MonotonicCounter;

fn find_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Application(format!("tokenguard-counter/{label}").into_bytes()),
    ]
}

/// The object's label holding `value`.
fn labelled(label: &str, value: u64) -> Attribute {
    Attribute::Label(format!("{label}={value}").into_bytes())
}

/// The value in a counter object's label; `None` if it holds none.
fn parse(label: &str, bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.strip_prefix(label)?.strip_prefix('=')?.parse().ok()
}

/// The labels of every counter object for `label` (normally one).
fn labels(session: &Session, label: &str) -> std::result::Result<Vec<Vec<u8>>, cryptoki::error::Error> {
    let mut out = Vec::new();
    for h in session.find_objects(&find_template(label))? {
        for a in session.get_attributes(h, &[AttributeType::Label])? {
            if let Attribute::Label(v) = a {
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// The counter: the highest value among its objects (more than one is the moment
/// between a step's create and its destroy, or a kill in it).
fn decode(label: &str, found: Vec<Vec<u8>>) -> Result<Option<u64>> {
    if found.is_empty() {
        return Ok(None);
    }
    found.iter().filter_map(|v| parse(label, v)).max().map(Some).ok_or_else(|| Error::Hardware {
        backend: BACKEND,
        operation: "reading the rollback counter",
        detail: format!("the counter objects of {label:?} do not hold a counter in their labels"),
    })
}

/// The template of the object holding `value`.
fn object_template(label: &str, value: u64) -> Vec<Attribute> {
    let mut t = find_template(label);
    t.extend([Attribute::Private(true), Attribute::Modifiable(true), labelled(label, value)]);
    t
}

impl Pkcs11Root {
    /// Runs `f` on a logged-in session under the exclusive token lock: SoftHSM2
    /// rewrites token files when a token object is created or changed, and a process
    /// reading them meanwhile finds no token. No retry: the caller's next open or
    /// write repeats what failed.
    fn with_session_exclusive<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Session) -> std::result::Result<T, cryptoki::error::Error>,
    ) -> Result<T> {
        let (pooled, _) = self.checkout()?;
        let out = TokenLock::exclusive(&self.settings.module)
            .and_then(|_lock| f(&pooled.session).map_err(|e| hw(operation, e)));
        if out.is_ok() {
            self.checkin(pooled)
        } else {
            self.discard(pooled)
        }
        out
    }

    fn counter_label(&self) -> Result<&str> {
        self.settings.counter_label.as_deref().ok_or_else(|| Error::Config("no counter_label configured".into()))
    }
}

impl MonotonicCounter for Pkcs11Root {
    fn counter_id(&self) -> Result<String> {
        Ok(format!("pkcs11:serial={};label={}", self.token_serial, self.counter_label()?))
    }

    fn read_counter(&self) -> Result<Option<u64>> {
        let label = self.counter_label()?;
        let found = self.with_session(|s, _| labels(s, label), |e| hw("reading the rollback counter", e))?;
        decode(label, found)
    }

    fn create_counter(&self) -> Result<u64> {
        if let Some(v) = self.read_counter()? {
            return Ok(v);
        }
        let label = self.counter_label()?;
        let template = object_template(label, 1);
        self.with_session_exclusive("C_CreateObject (the rollback counter)", |s| s.create_object(&template))?;
        tracing::info!(backend = BACKEND, label, "created the rollback counter");
        self.read_counter()?.ok_or_else(|| Error::Hardware {
            backend: BACKEND,
            operation: "creating the rollback counter",
            detail: "the new data object is not found".into(),
        })
    }

    fn increment_counter(&self, from: u64) -> Result<u64> {
        let label = self.counter_label()?;
        let next = self.with_session_exclusive("C_CreateObject/C_DestroyObject (the rollback counter)", |s| {
            let mut objects = Vec::new();
            for h in s.find_objects(&find_template(label))? {
                for a in s.get_attributes(h, &[AttributeType::Label])? {
                    if let Attribute::Label(v) = a {
                        objects.push((h, parse(label, &v)));
                    }
                }
            }
            let Some(cur) = objects.iter().filter_map(|(_, v)| *v).max() else {
                return Ok(Err(if objects.is_empty() {
                    "no counter object".to_string()
                } else {
                    "no counter in the objects' labels".to_string()
                }));
            };
            if cur != from {
                return Ok(Ok(cur));
            }
            let Some(next) = cur.checked_add(1) else { return Ok(Err("the counter is at its end".into())) };
            // The new value first, in an object of its own; then the old ones go. A
            // kill in between leaves both, and the highest is the counter.
            s.create_object(&object_template(label, next))?;
            for (h, _) in objects {
                s.destroy_object(h)?;
            }
            Ok(Ok(next))
        })?;
        next.map_err(|detail| Error::Hardware {
            backend: BACKEND,
            operation: "incrementing the rollback counter",
            detail,
        })
    }
}
