//! The built-in OAuth 2.0 client: the refresh-token grant (RFC 6749 §6) and token
//! revocation (RFC 7009), over TLS with ureq + rustls (no OpenSSL).
//!
//! Responses are classified for the refresh engine: `invalid_grant` means the
//! refresh token is dead and a human must re-authorise (no retries); timeouts,
//! connection failures, 5xx, 429 (with `Retry-After`) and unparseable bodies are
//! transient; other 4xx (`invalid_client`, `unauthorized_client`, …) are failures
//! that retrying will not fix. Plain `http://` is accepted only for loopback hosts
//! (tests, local token proxies); every other endpoint must be `https://`.

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::guard::refresh::{RefreshError, RefreshedTokens, Refresher};
use crate::secret::{SecretBytes, TokenSet, field};

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with the urlencoded client id and secret (the RFC's MUST).
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
}

/// One provider's OAuth settings (`[providers.NAME]` in the config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// Token endpoint.
    pub token_url: String,
    /// Client id (not secret).
    pub client_id: String,
    /// Client authentication method.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// Scopes to request on refresh (empty: the original grant's).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// RFC 7009 revocation endpoint, called by `revoke` when set.
    pub revocation_url: Option<String>,
    /// Request timeout in milliseconds (default 10000).
    pub timeout_ms: Option<u64>,
}

/// Where the client secret of `provider` is stored, sealed, in the guard.
pub const CLIENT_SECRET_PROVIDER: &str = "oauth-client";

/// An OAuth 2.0 client for one provider.
pub struct OAuthClient {
    config: OAuthConfig,
    client_secret: Option<SecretBytes>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthClient")
            .field("token_url", &self.config.token_url)
            .field("client_id", &self.config.client_id)
            .field("client_auth", &self.config.client_auth)
            .field("has_client_secret", &self.client_secret.is_some())
            .finish_non_exhaustive()
    }
}

/// Accepts `https://`, or `http://` to a loopback host only.
pub fn check_endpoint(url: &str) -> Result<()> {
    if url.starts_with("https://") {
        return Ok(());
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host =
            host.rsplit_once(':').map_or(host, |(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host });
        let loopback = matches!(host, "localhost" | "[::1]")
            || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
        if loopback {
            return Ok(());
        }
    }
    Err(Error::Config(format!("OAuth endpoint {url:?} must use https:// (plain http is allowed only to loopback)")))
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: Option<String>,
}

fn retry_after(v: Option<&ureq::http::HeaderValue>) -> Option<Duration> {
    let s = v?.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let when = httpdate_secs(s)?;
    let now = crate::clock::now();
    Some(Duration::from_secs(when.saturating_sub(now).min(3600)))
}

/// `Retry-After` as an HTTP date (IMF-fixdate), via humantime's RFC 3339 parser on
/// a rewritten string; unparseable dates are ignored (the backoff still applies).
fn httpdate_secs(s: &str) -> Option<u64> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, mon, year, time, "GMT"] = parts.as_slice() else { return None };
    let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let m = months.iter().position(|x| x == mon)? + 1;
    let t = humantime::parse_rfc3339(&format!("{year}-{m:02}-{day:0>2}T{time}Z")).ok()?;
    t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

impl OAuthClient {
    /// A client for `config`, with the client secret (if the provider issued one).
    pub fn new(config: OAuthConfig, client_secret: Option<SecretBytes>) -> Result<Self> {
        check_endpoint(&config.token_url)?;
        if let Some(r) = &config.revocation_url {
            check_endpoint(r)?;
        }
        let timeout = Duration::from_millis(config.timeout_ms.unwrap_or(10_000));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            // A token endpoint answers; it does not redirect. Following a 302 would
            // turn the POST into a GET and take any 200 as a token response.
            .max_redirects(0)
            .user_agent(concat!("tokenguard/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(OAuthClient { config, client_secret, agent })
    }

    fn post<'a>(
        &'a self,
        url: &str,
        mut form: Vec<(&'a str, &'a str)>,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut req = self.agent.post(url).header("Accept", "application/json");
        let secret = self.client_secret.as_ref().and_then(SecretBytes::expose_str);
        match (self.config.client_auth, secret) {
            (ClientAuth::ClientSecretBasic, Some(secret)) => {
                let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let creds = zeroize::Zeroizing::new(format!("{}:{}", enc(&self.config.client_id), enc(secret)));
                let b64 = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(creds.as_bytes()));
                req = req.header("Authorization", format!("Basic {}", b64.as_str()));
            }
            (ClientAuth::ClientSecretPost, Some(secret)) => {
                form.push(("client_id", &self.config.client_id));
                form.push(("client_secret", secret));
            }
            (_, None) => form.push(("client_id", &self.config.client_id)),
        }
        req.send_form(form)
    }

    /// RFC 7009 revocation of `token` (best effort; providers answer 200 for unknown
    /// tokens). Returns whether the endpoint accepted it.
    pub fn revoke(&self, token: &SecretBytes, hint: &str) -> Result<bool> {
        let Some(url) = &self.config.revocation_url else { return Ok(false) };
        let t = token.expose_str().ok_or_else(|| Error::InvalidInput("token is not UTF-8".into()))?;
        match self.post(url, vec![("token", t), ("token_type_hint", hint)]) {
            Ok(r) => Ok(r.status().is_success()),
            Err(e) => Err(Error::Hardware { backend: "oauth", operation: "revocation request", detail: e.to_string() }),
        }
    }
}

impl Refresher for OAuthClient {
    fn refresh(
        &self,
        _provider: &str,
        _name: &str,
        current: &TokenSet,
    ) -> std::result::Result<RefreshedTokens, RefreshError> {
        let rt = current
            .get(field::REFRESH_TOKEN)
            .and_then(SecretBytes::expose_str)
            .ok_or_else(|| RefreshError::Failed("the token set has no refresh_token".into()))?;
        let scope = self.config.scopes.join(" ");
        let mut form = vec![("grant_type", "refresh_token"), ("refresh_token", rt)];
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        let resp = self.post(&self.config.token_url, form).map_err(|e| match e {
            ureq::Error::Timeout(_) => {
                RefreshError::Transient { detail: "token endpoint timed out".into(), retry_after: None }
            }
            other => {
                RefreshError::Transient { detail: format!("token endpoint unreachable: {other}"), retry_after: None }
            }
        })?;
        let status = resp.status().as_u16();
        let ra = retry_after(resp.headers().get("retry-after"));
        let mut body = resp.into_body();
        let text = zeroize::Zeroizing::new(body.with_config().limit(1 << 20).read_to_string().map_err(|e| {
            RefreshError::Transient { detail: format!("reading the response: {e}"), retry_after: None }
        })?);
        match status {
            200 => {
                let not_a_response = || RefreshError::Transient {
                    detail: "token endpoint answered 200 with a body that is not a token response".into(),
                    retry_after: None,
                };
                let now = crate::clock::now();
                let r = crate::token_response::parse(text.as_bytes(), now)
                    .map_err(|_| not_a_response())?
                    .ok_or_else(not_a_response)?;
                if r.tokens.get(field::ACCESS_TOKEN).is_none() {
                    return Err(RefreshError::Transient {
                        detail: "token response has no access_token".into(),
                        retry_after: None,
                    });
                }
                Ok(RefreshedTokens {
                    tokens: r.tokens,
                    expires_in: r.expires_at.map(|at| at.saturating_sub(now)),
                    token_type: r.token_type,
                    scopes: r.scopes,
                })
            }
            429 => Err(RefreshError::Transient { detail: "rate limited (429)".into(), retry_after: ra }),
            500..=599 => {
                Err(RefreshError::Transient { detail: format!("token endpoint error {status}"), retry_after: ra })
            }
            _ => {
                let code = serde_json::from_str::<ErrorResponse>(&text).ok().and_then(|e| e.error).unwrap_or_default();
                if code == "invalid_grant" {
                    Err(RefreshError::InvalidGrant(format!("{status} invalid_grant")))
                } else {
                    // The error code is a fixed token from RFC 6749 §5.2; the body is
                    // not echoed (it might quote what we sent).
                    let code: String =
                        code.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect();
                    Err(RefreshError::Failed(format!("token endpoint refused the refresh: {status} {code}")))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_tls_except_loopback() {
        assert!(check_endpoint("https://oauth2.googleapis.com/token").is_ok());
        assert!(check_endpoint("http://127.0.0.1:8080/token").is_ok());
        assert!(check_endpoint("http://localhost/token").is_ok());
        assert!(check_endpoint("http://example.com/token").is_err());
        assert!(check_endpoint("http://127.0.0.1.evil.example/token").is_err());
        assert!(check_endpoint("ftp://x").is_err());
    }

    #[test]
    fn http_dates() {
        assert_eq!(httpdate_secs("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(httpdate_secs("soon"), None);
    }
}
