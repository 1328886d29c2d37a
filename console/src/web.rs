//! The web console: pages and assets compiled into the binary (no CDN, nothing fetched).
//!
//! # How it is built, and why
//! Each page is a small HTML shell rendered here (title, navigation, the caller's name and
//! role, the CSRF value in `<meta name="csrf">`, empty sections with stable ids), and one
//! hand-written ES module, `assets/console.js`, fills the sections from the JSON API
//! ([`crate::api`]) and keeps them current: the dashboard polls every few seconds, the live
//! view listens to the server-sent events of `/api/pipelines/events` (the browser's own
//! `EventSource`), a restore point's action polls its task. No framework and no build step:
//! nothing to install in CI, no third-party code to audit or to keep up to date, and the pages
//! show exactly what the API answers (what scripts and the OpenAPI document see too). Every
//! value from the API reaches the page as text (`textContent`, text nodes, attributes), never
//! as HTML.
//!
//! The pages carry a Content-Security-Policy that allows scripts, styles and connections to
//! this origin only, and no framing. Assets are served under `/assets/` (open, like `/login`)
//! with their content type, an `ETag`, and, when asked for by the versioned address the pages
//! link to (`?v=HASH` of their content), a year's `immutable` caching.
//!
//! A read-only caller sees every page; the buttons that change something are not shown to it
//! (the API refuses it anyway).
//!
//! Login: `GET /login` shows a form for a token; `POST /login` checks it and sets the session
//! cookie ([`crate::auth`]); `POST /logout` ends the session (sent by the pages' script, with
//! the CSRF header). Without tokens (loopback) there is nothing to log in to.
//!
//! # Pages
//! - `/`: the dashboard: VMs with the age and outcome of their last backup, jobs with their
//!   next runs and buttons to run, enable and disable them, recent sessions, repositories, and
//!   a link to the live view while pipelines run.
//! - `/sessions/{id}`: a session with every VM's result.
//! - `/vms/{name}`: a VM's restore points, with verify, forget and restore.
//! - `/pipelines`: the live view: each running (or just ended) pipeline as its stages joined
//!   by channels, with throughput, items, utilisation, queue fill and the bottleneck.

use std::sync::LazyLock;

use axum::Extension;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::api::AppState;
use crate::auth::{COOKIE, Caller, SESSION_LIFETIME, cookie, token_for};
use crate::config::Role;

/// The console's routes (pages, assets, login).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(dashboard))
        .route("/sessions/{id}", get(session_page))
        .route("/vms/{name}", get(vm_page))
        .route("/pipelines", get(pipelines_page))
        .route("/assets/{file}", get(asset))
        .route("/login", get(login_page).post(login))
        .route("/logout", axum::routing::post(logout))
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Assets

/// One file compiled in.
pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
    /// The first 16 hex digits of its BLAKE3 hash: its version in the pages' links and its ETag.
    pub version: String,
}

/// Every asset.
pub static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    [
        (
            "console.css",
            "text/css; charset=utf-8",
            include_bytes!("../assets/console.css").as_slice(),
        ),
        (
            "console.js",
            "text/javascript; charset=utf-8",
            include_bytes!("../assets/console.js").as_slice(),
        ),
        (
            "favicon.svg",
            "image/svg+xml",
            include_bytes!("../assets/favicon.svg").as_slice(),
        ),
    ]
    .into_iter()
    .map(|(name, content_type, body)| Asset {
        name,
        content_type,
        body,
        version: blake3::hash(body).to_hex()[..16].to_owned(),
    })
    .collect()
});

/// The versioned address of asset `name` (`/assets/NAME?v=HASH`).
fn asset_url(name: &str) -> String {
    let version = ASSETS
        .iter()
        .find(|a| a.name == name)
        .map_or("", |a| a.version.as_str());
    format!("/assets/{name}?v={version}")
}

async fn asset(Path(file): Path<String>, uri: Uri, headers: HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == file) else {
        return crate::api::ApiError::not_found(format!("no asset {file}")).into_response();
    };
    let etag = format!("\"{}\"", asset.version);
    // The versioned address never changes content: cached for a year. The bare one is
    // revalidated (by its ETag) each time.
    let versioned = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == format!("v={}", asset.version)));
    let cache = if versioned {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let common = [
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, cache.to_owned()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
    ];
    if matches {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, asset.content_type)],
        asset.body,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Pages

/// What every page's response carries besides its HTML.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// A page: the shell around `main` (HTML, escaped by the caller), for `caller`. `page` names
/// the page for the script (`data-page`), `data` are further `data-` attributes of `<body>`.
fn page(caller: &Caller, page: &str, title: &str, data: &[(&str, &str)], main: &str) -> Response {
    let role = match caller.role {
        Role::Operator => "operator",
        Role::ReadOnly => "read-only",
    };
    let mut attributes = String::new();
    for (name, value) in data {
        attributes.push_str(&format!(" data-{name}=\"{}\"", escape(value)));
    }
    let logout = if caller.local {
        String::new()
    } else {
        "<button type=button id=logout class=link>Log out</button>".to_owned()
    };
    let html = format!(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width, initial-scale=1\">\
         <meta name=csrf content=\"{csrf}\"><meta name=role content=\"{role}\">\
         <title>{title} · Backflow</title>\
         <link rel=icon href=\"{icon}\" type=\"image/svg+xml\">\
         <link rel=stylesheet href=\"{css}\">\
         <script type=module src=\"{js}\"></script></head>\
         <body data-page=\"{page}\"{attributes}>\
         <header><a class=brand href=\"/\">Backflow</a><nav><a href=\"/\">Dashboard</a>\
         <a href=\"/pipelines\">Live pipelines</a></nav>\
         <span class=who id=who>{who} <span class=role>{role}</span></span>{logout}</header>\
         <div id=flash role=status></div><main><h1 id=title>{title}</h1>\
         <noscript><p class=error>The console needs JavaScript; the same data is at \
         <a href=\"/api/openapi.json\">the API</a>.</p></noscript>{main}</main></body></html>",
        csrf = escape(caller.csrf.as_deref().unwrap_or("")),
        title = escape(title),
        icon = asset_url("favicon.svg"),
        css = asset_url("console.css"),
        js = asset_url("console.js"),
        page = escape(page),
        who = escape(&caller.name),
    );
    (
        [
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("same-origin"),
            ),
        ],
        Html(html),
    )
        .into_response()
}

/// A section: a heading and an element the script fills (`id`), saying it is loading.
fn section(id: &str, heading: &str) -> String {
    format!(
        "<section id=\"{id}-section\"><h2>{}</h2><div id=\"{id}\" class=loading>Loading…</div></section>",
        escape(heading)
    )
}

async fn dashboard(Extension(caller): Extension<Caller>) -> Response {
    let main = [
        "<p id=live-link hidden></p><p class=updated>Updated <span id=updated>…</span></p>"
            .to_owned(),
        section("vms", "VMs"),
        section("jobs", "Jobs"),
        section("sessions", "Recent sessions"),
        section("repositories", "Repositories"),
    ]
    .concat();
    page(&caller, "dashboard", "Dashboard", &[], &main)
}

async fn session_page(Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Response {
    let main = [
        "<dl id=summary class=loading>Loading…</dl>".to_owned(),
        section("results", "VMs"),
    ]
    .concat();
    page(
        &caller,
        "session",
        &format!("Session {id}"),
        &[("id", &id)],
        &main,
    )
}

async fn vm_page(Extension(caller): Extension<Caller>, Path(name): Path<String>) -> Response {
    let main = [
        "<dl id=summary class=loading>Loading…</dl>".to_owned(),
        section("points", "Restore points"),
        section("tasks", "Actions"),
        "<dialog id=confirm><form method=dialog><p id=confirm-text></p>\
         <label id=confirm-label hidden>Directory <input id=confirm-input autocomplete=off \
         pattern=\"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\"></label>\
         <menu><button value=cancel formnovalidate>Cancel</button> \
         <button id=confirm-ok value=ok class=primary>OK</button></menu></form></dialog>"
            .to_owned(),
    ]
    .concat();
    page(
        &caller,
        "vm",
        &format!("VM {name}"),
        &[("vm", &name)],
        &main,
    )
}

async fn pipelines_page(Extension(caller): Extension<Caller>) -> Response {
    let main = "<p class=updated><span id=stream-state>Connecting…</span></p>\
                <div id=runs class=loading>Loading…</div>";
    page(&caller, "pipelines", "Live pipelines", &[], main)
}

// ---------------------------------------------------------------------------------------------
// Login

async fn login_page(State(state): State<AppState>) -> Response {
    if state.tokens.is_empty() {
        return Redirect::to("/").into_response();
    }
    Html(
        "<!doctype html><html lang=en><meta charset=utf-8><title>Backflow: log in</title>\
         <form method=post action=/login><label>Token <input type=password name=token \
         autocomplete=off autofocus></label> <button>Log in</button></form></html>",
    )
    .into_response()
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<axum::Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if state.tokens.is_empty() {
        return Redirect::to("/").into_response();
    }
    // A login from another site's page (login CSRF) is refused by its Origin.
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let ours = format!("{}://{host}", if state.tls { "https" } else { "http" });
        if origin != ours {
            return (StatusCode::FORBIDDEN, "login from another site refused").into_response();
        }
    }
    let Ok(axum::Form(form)) = form else {
        return (StatusCode::BAD_REQUEST, "expected a form with `token`").into_response();
    };
    let Some(token) = token_for(&state.tokens, &form.token) else {
        return (
            StatusCode::UNAUTHORIZED,
            Html("<!doctype html><title>Backflow</title><p>Unknown token. <a href=/login>Try again</a>"),
        )
            .into_response();
    };
    let value = state.sessions.create(token);
    let cookie = format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFETIME.as_secs(),
        if state.tls { "; Secure" } else { "" }
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(c) = cookie(&headers) {
        state.sessions.remove(c);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}
