//! The store's rollback counter in a PKCS#11 token: a private token data object
//! (`CKO_DATA`) found by `CKA_APPLICATION = "tokenguard-counter/<counter_label>"`,
//! whose value is the decimal after `=` in its `CKA_LABEL` (`"<counter_label>=<n>"`).
//! The label, because it is the one attribute every token lets a holder of the PIN
//! change (SoftHSM2 refuses to change a data object's `CKA_VALUE`, which PKCS#11 does
//! not call modifiable). Only a PIN holder can change it, and the store changes it
//! only while it holds its counter lock, so it moves forward one step per commit.
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

fn decode(label: &str, found: Vec<Vec<u8>>) -> Result<Option<u64>> {
    let bad = |detail: String| Error::Hardware { backend: BACKEND, operation: "reading the rollback counter", detail };
    match found.as_slice() {
        [] => Ok(None),
        [v] => parse(label, v)
            .map(Some)
            .ok_or_else(|| bad(format!("the counter object of {label:?} does not hold a counter in its label"))),
        more => Err(bad(format!("{} counter objects for {label:?}; there must be one", more.len()))),
    }
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
        let mut template = find_template(label);
        template.extend([Attribute::Private(true), Attribute::Modifiable(true), labelled(label, 1)]);
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
        let next = self.with_session_exclusive("C_SetAttributeValue (the rollback counter)", |s| {
            let handles = s.find_objects(&find_template(label))?;
            let [h] = handles.as_slice() else { return Ok(Err(format!("{} counter objects", handles.len()))) };
            let mut cur = None;
            for a in s.get_attributes(*h, &[AttributeType::Label])? {
                if let Attribute::Label(v) = a {
                    cur = parse(label, &v);
                }
            }
            let Some(cur) = cur else { return Ok(Err("no counter in the object's label".into())) };
            if cur != from {
                return Ok(Ok(cur));
            }
            let Some(next) = cur.checked_add(1) else { return Ok(Err("the counter is at its end".into())) };
            s.update_attributes(*h, &[labelled(label, next)])?;
            Ok(Ok(next))
        })?;
        next.map_err(|detail| Error::Hardware {
            backend: BACKEND,
            operation: "incrementing the rollback counter",
            detail,
        })
    }
}
