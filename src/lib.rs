#![doc = include_str!("../README.md")]

pub mod audit;
pub mod backup;
mod cache;
pub mod codec;
pub mod config;
pub mod error;
pub mod guard;
pub mod oauth;
pub mod root;
pub mod seal;
pub mod secret;
pub mod store;

pub use cache::CacheLimits;
pub use config::Config;
pub use error::{Error, Result};
pub use guard::{GetOptions, GuardOptions, PutItem, PutOptions, Stats, TokenGuard, TokenInfo};
pub use seal::{Metadata, SecretKind, TokenState};
pub use secret::{DekMaterial, Secret, SecretBytes, TokenSet};
pub use store::{StoreMode, StoreOptions};
