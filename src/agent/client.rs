//! A blocking client of the agent (the CLI's, and a Rust service's): one connection,
//! requests answered in order.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::protocol::{self, Encoding, FrameError, FrameReader, Request, Response, WireSecret};
use crate::error::{Error, Result};
use crate::secret::SecretBytes;

/// A connection to the agent.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    frames: FrameReader,
    socket: PathBuf,
    next_id: u64,
    /// A request failed half-way: the stream may be out of step.
    broken: bool,
}

/// The result of `get` and `get_fresh`.
#[derive(Debug, Deserialize)]
pub struct Got {
    /// Provider.
    pub provider: String,
    /// Name.
    pub name: String,
    /// The field asked for.
    pub field: Option<String>,
    /// The secret.
    pub value: WireSecret,
    /// How `value` is written.
    #[serde(default)]
    pub encoding: Encoding,
    /// The token's metadata, as `tokenguard get --json` prints it (`get` asked with
    /// [`Client::get_with_meta`] only).
    pub meta: Option<serde_json::Value>,
}

impl Got {
    /// The secret's bytes.
    pub fn secret(self) -> Result<SecretBytes> {
        self.value.decode(self.encoding).map_err(Error::InvalidInput)
    }
}

impl Client {
    /// Connects to the agent at `socket`; `timeout` bounds each request's send and
    /// answer.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Client> {
        let unavailable = |detail: String| Error::AgentUnavailable { socket: socket.into(), detail };
        let stream = UnixStream::connect(socket).map_err(|e| {
            unavailable(match e.kind() {
                std::io::ErrorKind::NotFound => "no socket there (is `tokenguard serve` running?)".into(),
                std::io::ErrorKind::ConnectionRefused => "nothing listens on the socket".into(),
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied: this user may not connect to the socket (see [agent] socket_group)".into()
                }
                _ => e.to_string(),
            })
        })?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| unavailable(e.to_string()))?;
        stream.set_write_timeout(Some(timeout)).map_err(|e| unavailable(e.to_string()))?;
        Ok(Client {
            stream,
            frames: FrameReader::new(protocol::MAX_RESPONSE),
            socket: socket.into(),
            next_id: 1,
            broken: false,
        })
    }

    fn unavailable(&self, detail: impl Into<String>) -> Error {
        Error::AgentUnavailable { socket: self.socket.clone(), detail: detail.into() }
    }

    /// Sends `req` and returns its result, or the agent's error as a library error
    /// (its exit code preserved).
    pub fn call<T: DeserializeOwned>(&mut self, mut req: Request) -> Result<T> {
        if self.broken {
            return Err(self.unavailable("this connection failed earlier; connect again"));
        }
        let id = self.next_id;
        req.id = Some(id);
        self.next_id += 1;
        // Until an answer to this request is read, a failure leaves the stream out of
        // step (a late answer would be taken for the next request's).
        self.broken = true;
        let frame = protocol::frame_of(&req).map_err(|e| Error::InvalidInput(format!("encoding a request: {e}")))?;
        drop(req);
        self.stream.write_all(&frame).map_err(|e| self.unavailable(format!("sending the request: {e}")))?;
        drop(frame);
        let frame = match self.frames.next(&mut self.stream) {
            Ok(Some(f)) => f,
            Ok(None) | Err(FrameError::Truncated) => {
                return Err(self.unavailable("it closed the connection before answering"));
            }
            Err(FrameError::Io(e)) => return Err(self.unavailable(format!("waiting for the answer: {e}"))),
            Err(FrameError::BadLength(n)) => return Err(self.unavailable(format!("an answer frame of {n} bytes"))),
        };
        let r: Response<T> = serde_json::from_slice(&frame)
            .map_err(|e| self.unavailable(format!("its answer does not parse ({})", protocol::json_problem(&e))))?;
        // An error the agent could not tie to a request (a frame it could not parse)
        // carries no id.
        let untied_error = r.id.is_none() && !r.ok;
        if r.id != Some(id) && !untied_error {
            return Err(self.unavailable("it answered another request"));
        }
        self.broken = false;
        match (r.ok, r.result, r.error) {
            (true, Some(t), _) => Ok(t),
            (false, _, Some(e)) => Err(e.into_error()),
            _ => Err(self.unavailable("its answer has neither a result nor an error")),
        }
    }

    /// `get`: one field of a token (`None`: a raw secret, or a set's access token).
    pub fn get(&mut self, provider: &str, name: &str, field: Option<&str>, allow_expired: bool) -> Result<Got> {
        self.get_inner(provider, name, field, allow_expired, false)
    }

    /// `get`, answered with the token's metadata too ([`Got::meta`]).
    pub fn get_with_meta(
        &mut self,
        provider: &str,
        name: &str,
        field: Option<&str>,
        allow_expired: bool,
    ) -> Result<Got> {
        self.get_inner(provider, name, field, allow_expired, true)
    }

    fn get_inner(
        &mut self,
        provider: &str,
        name: &str,
        field: Option<&str>,
        allow_expired: bool,
        meta: bool,
    ) -> Result<Got> {
        let mut r = Request::token("get", provider, name);
        r.field = field.map(str::to_string);
        r.allow_expired = allow_expired;
        r.meta = meta;
        self.call(r)
    }

    /// `ping`: the agent's version and whether it is locked.
    pub fn ping(&mut self) -> Result<serde_json::Value> {
        self.call(Request::new("ping"))
    }
}
