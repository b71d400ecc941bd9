#![doc = include_str!("../README.md")]

pub mod agent;
pub mod audit;
pub mod backup;
mod cache;
pub mod clock;
pub(crate) mod codec;
pub mod compose;
pub mod config;
mod crypto;
pub mod error;
mod files;
#[cfg(feature = "postgres")]
pub mod fleet;
pub mod guard;
pub mod oauth;
pub mod pin;
pub mod recovery;
pub mod root;
pub mod seal;
pub mod secret;
pub mod signals;
pub mod store;
mod sync;
pub mod token_response;
pub mod tty;

pub use cache::CacheLimits;
pub use clock::now;
pub use config::Config;
pub use error::{Error, Result};
pub use guard::{
    Condition, FleetWrites, GetOptions, GuardOptions, JournalStatus, ListReport, PutItem, PutOptions, Stats,
    TokenGuard, TokenInfo,
};
pub use seal::{Metadata, SecretKind, TokenState};
pub use secret::{DekMaterial, Secret, SecretBytes, TokenSet};
pub use store::{StoreMode, StoreOptions};
