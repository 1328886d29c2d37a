//! Who asks, and whether they may.
//!
//! A request is one of:
//! - **bearer**: `Authorization: Bearer SECRET` (scripts, Prometheus, schemathesis);
//! - **browser session**: the cookie `backflow_session` that `POST /login` set after checking a
//!   token (HttpOnly, SameSite=Strict, Secure under TLS; 12 hours);
//! - **local**: no tokens configured (loopback only): every request is the local operator.
//!
//! Unsafe methods (POST) from a browser session or a local console must carry the header
//! `X-Backflow-CSRF`, and an `Origin`, when the browser sends one, must be this server's. A page of
//! another site cannot send that header without a CORS preflight this server never allows (the
//! custom-header defence), so on a local console any value will do (`curl -H 'X-Backflow-CSRF:
//! 1'`); a browser session's value must also be the session's own, which its pages hold.
//! Bearer requests need neither (a browser never adds that header by itself). Without tokens the
//! `Host` header must name a loopback address or `localhost` (a DNS name that another site points
//! at 127.0.0.1 is refused: DNS rebinding).
//!
//! `/api/health`, `/login` and the static assets need nothing. Without a caller, every other path
//! answers 401: JSON for the API and `/metrics`, a page pointing at `/login` for the console's pages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::{ApiError, AppState};
use crate::config::{Role, Token};

/// The browser session's cookie.
pub const COOKIE: &str = "backflow_session";
/// The header unsafe browser requests carry.
pub const CSRF_HEADER: &str = "x-backflow-csrf";
/// How long a browser session lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// The most browser sessions kept (the oldest go first).
const MAX_SESSIONS: usize = 1024;

/// The connection's peer address (put into every request by the server).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// Who asks.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The token's name, or `local`.
    pub name: String,
    pub role: Role,
    /// The value unsafe requests must carry in [`CSRF_HEADER`] (`None`: a bearer request).
    pub csrf: Option<String>,
    /// The local operator of a console without tokens.
    pub local: bool,
}

impl Caller {
    /// How session records name them: `token:NAME`, or `local`.
    pub fn who(&self) -> String {
        if self.local {
            "local".into()
        } else {
            format!("token:{}", self.name)
        }
    }

    /// Refuses a read-only caller.
    pub fn operator(&self, what: &str) -> Result<(), ApiError> {
        match self.role {
            Role::Operator => Ok(()),
            Role::ReadOnly => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the read-only token {} cannot {what}", self.name),
            )),
        }
    }
}

struct BrowserSession {
    caller: Caller,
    expires: Instant,
}

/// The browser sessions, by the hash of their cookie.
#[derive(Default)]
pub struct Sessions {
    by_cookie: Mutex<HashMap<blake3::Hash, BrowserSession>>,
}

impl Sessions {
    /// A new session for `token`: the cookie value to set.
    pub fn create(&self, token: &Token) -> String {
        let cookie = random_hex(32);
        let caller = Caller {
            name: token.name.clone(),
            role: token.role,
            csrf: Some(random_hex(16)),
            local: false,
        };
        let mut map = self.by_cookie.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(
            blake3::hash(cookie.as_bytes()),
            BrowserSession {
                caller,
                expires: now + SESSION_LIFETIME,
            },
        );
        cookie
    }

    fn get(&self, cookie: &str) -> Option<Caller> {
        let map = self.by_cookie.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&blake3::hash(cookie.as_bytes()))
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.caller.clone())
    }

    /// Ends the session of `cookie`.
    pub fn remove(&self, cookie: &str) {
        let mut map = self.by_cookie.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&blake3::hash(cookie.as_bytes()));
    }
}

/// `bytes` random bytes as hex.
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token whose secret is `secret`.
pub fn token_for<'a>(tokens: &'a [Token], secret: &str) -> Option<&'a Token> {
    let hash = blake3::hash(secret.trim().as_bytes());
    // blake3::Hash compares in constant time.
    tokens.iter().find(|t| t.hash == hash)
}

/// The cookie's value in `headers`.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// Paths that need no caller.
fn is_open(path: &str) -> bool {
    path == "/api/health" || path == "/login" || path.starts_with("/assets/")
}

/// Whether a Host header names this machine's loopback.
fn loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        // `[::1]:8420`, `127.0.0.1:8420`, `localhost:8420`; a bare IPv6 address has colons too.
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The middleware: finds the caller (or answers 401/403), checks CSRF, and hands the caller on
/// in the request's extensions.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let headers = request.headers();
    if state.tokens.is_empty() {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !loopback_host(host) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "bad_host",
                format!(
                    "Host `{host}` is not this machine's loopback: a console without tokens answers \
                     only to 127.0.0.1, [::1] or localhost"
                ),
            )
            .into_response();
        }
    }
    if is_open(&path) {
        return next.run(request).await;
    }
    let caller = if state.tokens.is_empty() {
        Some(Caller {
            name: "local".into(),
            role: Role::Operator,
            csrf: Some("local".into()),
            local: true,
        })
    } else if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        value
            .strip_prefix("Bearer ")
            .and_then(|secret| token_for(&state.tokens, secret))
            .map(|t| Caller {
                name: t.name.clone(),
                role: t.role,
                csrf: None,
                local: false,
            })
    } else {
        cookie(headers).and_then(|c| state.sessions.get(c))
    };
    let Some(caller) = caller else {
        let page =
            request.method() == Method::GET && !path.starts_with("/api/") && path != "/metrics";
        if page {
            // 401 like every endpoint, with the way to the login form for a person.
            return (
                StatusCode::UNAUTHORIZED,
                axum::response::Html(
                    "<!doctype html><html lang=en><meta charset=utf-8><title>Backflow</title>\
                     <p>This console needs a token: <a href=/login>log in</a>.</p></html>",
                ),
            )
                .into_response();
        }
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid token is needed: `Authorization: Bearer SECRET`, or log in at /login",
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"backflow\""),
        );
        return response;
    };
    let unsafe_method = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if unsafe_method && let Some(expected) = &caller.csrf {
        // A local console: the header's presence is the defence; any value will do.
        let expected = if caller.local {
            None
        } else {
            Some(expected.as_str())
        };
        if let Err(e) = check_csrf(headers, expected, state.tls) {
            return e.into_response();
        }
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// An unsafe request from a browser: the CSRF header must match, and an Origin must be ours.
/// `expected`: the session's value; `None`: any value (a local console).
fn check_csrf(headers: &HeaderMap, expected: Option<&str>, tls: bool) -> Result<(), ApiError> {
    let given = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    let ok = match (given, expected) {
        (Some(v), None) => !v.is_empty(),
        (Some(v), Some(expected)) => v == expected,
        (None, _) => false,
    };
    if !ok {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf",
            format!(
                "a request that changes something needs the `{CSRF_HEADER}` header the console's pages send (or a bearer token)"
            ),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let ours = format!("{}://{host}", if tls { "https" } else { "http" });
        if origin != ours {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                format!("Origin `{origin}` is not this console ({ours})"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1:8420",
            "localhost:1",
            "[::1]:8420",
            "127.0.0.1",
            "LOCALHOST",
            "::1",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:8420",
            "10.0.0.1:8420",
            "",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; backflow_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h), Some("abc"));
    }

    #[test]
    fn csrf_needs_the_header_and_our_origin() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8420".parse().unwrap());
        assert!(check_csrf(&h, Some("x"), false).is_err());
        assert!(check_csrf(&h, None, false).is_err());
        h.insert(CSRF_HEADER, "x".parse().unwrap());
        assert!(check_csrf(&h, Some("x"), false).is_ok());
        assert!(check_csrf(&h, Some("y"), false).is_err());
        assert!(check_csrf(&h, None, false).is_ok());
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(check_csrf(&h, Some("x"), false).is_err());
        assert!(check_csrf(&h, None, false).is_err());
        h.insert(header::ORIGIN, "http://127.0.0.1:8420".parse().unwrap());
        assert!(check_csrf(&h, Some("x"), false).is_ok());
    }
}
