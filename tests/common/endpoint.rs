//! A token endpoint on loopback for the refresh tests: a scriptable HTTP server on
//! 127.0.0.1 that records what it was sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the endpoint answers.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Reply { status, body: body.to_string(), headers: vec![], delay: Duration::ZERO }
    }
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub form: HashMap<String, String>,
    pub auth: Option<String>,
}

pub type Script = Box<dyn Fn(&Seen, usize) -> Reply + Send + Sync>;

/// A token endpoint on 127.0.0.1 that answers with `script(request, n)`.
pub struct Endpoint {
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Endpoint {
    pub fn start(script: Script) -> Self {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let port = server.server_addr().to_ip().unwrap().port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let server = Arc::new(server);
            while !stop2.load(Ordering::Relaxed) {
                let Ok(Some(mut req)) = server.recv_timeout(Duration::from_millis(50)) else { continue };
                let mut body = String::new();
                let _ = req.as_reader().read_to_string(&mut body);
                let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes()).into_owned().collect();
                let auth = req.headers().iter().find(|h| h.field.equiv("Authorization")).map(|h| h.value.to_string());
                let r = {
                    let mut s = s2.lock().unwrap();
                    let seen = Seen { form, auth };
                    s.push(seen.clone());
                    let n = s.len();
                    drop(s);
                    script(&seen, n)
                };
                // Answer on a thread of its own, so a slow answer does not hold up others.
                std::thread::spawn(move || {
                    std::thread::sleep(r.delay);
                    let mut resp = tiny_http::Response::from_string(r.body).with_status_code(r.status);
                    resp.add_header(tiny_http::Header::from_bytes("Content-Type", "application/json").unwrap());
                    for (k, v) in r.headers {
                        resp.add_header(tiny_http::Header::from_bytes(k, v.as_bytes()).unwrap());
                    }
                    let _ = req.respond(resp);
                });
            }
        });
        Endpoint { url: format!("http://127.0.0.1:{port}/token"), seen, stop, thread: Some(thread) }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn seen(&self, i: usize) -> Seen {
        self.seen.lock().unwrap()[i].clone()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A provider that rotates refresh tokens strictly: only the latest one is
/// accepted; answer n carries access token `at-n` and refresh token `rt-n`.
pub fn rotating(valid: Arc<Mutex<String>>) -> Script {
    Box::new(move |req, n| {
        let mut v = valid.lock().unwrap();
        if req.form.get("grant_type").map(String::as_str) != Some("refresh_token") {
            return Reply::json(400, serde_json::json!({"error": "unsupported_grant_type"}));
        }
        if req.form.get("refresh_token") != Some(&*v) {
            return Reply::json(400, serde_json::json!({"error": "invalid_grant"}));
        }
        *v = format!("rt-{n}");
        Reply::json(
            200,
            serde_json::json!({"access_token": format!("at-{n}"), "refresh_token": format!("rt-{n}"), "expires_in": 3600, "token_type": "Bearer"}),
        )
    })
}

/// A strictly rotating provider ([`rotating`], starting from `rt-0`) that answers
/// after `delay` and counts the `invalid_grant` answers it gave (a second refresher
/// with a spent refresh token).
pub fn counting_rotating(delay: Duration) -> (Endpoint, Arc<AtomicUsize>) {
    let answer = rotating(Arc::new(Mutex::new("rt-0".to_string())));
    let invalid = Arc::new(AtomicUsize::new(0));
    let inv = invalid.clone();
    let ep = Endpoint::start(Box::new(move |req, n| {
        let r = answer(req, n);
        if r.status == 400 {
            inv.fetch_add(1, Ordering::Relaxed);
        }
        Reply { delay, ..r }
    }));
    (ep, invalid)
}
