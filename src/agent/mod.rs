//! The agent: one process owns the store, the hardware session and the DEK cache, and
//! serves other processes over a Unix socket, deciding every request against
//! `[[agent.allow]]` rules keyed on the caller's kernel-reported uid and groups, and
//! auditing every read (README "Agent"; `docs/PROTOCOL.md`).

mod batch;
pub mod client;
pub mod policy;
pub mod protocol;
mod server;

pub use client::Client;
pub use policy::{AgentConfig, ReadAudit};
pub use server::serve;
