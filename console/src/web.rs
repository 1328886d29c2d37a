//! The web console: pages and assets compiled into the binary (no CDN, nothing fetched).
//!
//! Login: `GET /login` shows a form for a token; `POST /login` checks it and sets the session
//! cookie ([`crate::auth`]); `POST /logout` ends the session. Without tokens (loopback) there is
//! nothing to log in to.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::api::AppState;
use crate::auth::{COOKIE, SESSION_LIFETIME, cookie, token_for};

/// The console's routes (pages, assets, login).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(dashboard))
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

async fn dashboard() -> Html<&'static str> {
    Html("<!doctype html><title>Backflow</title><h1>Backflow</h1>")
}

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
    let (value, _) = state.sessions.create(token);
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
