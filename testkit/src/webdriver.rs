//! A small W3C WebDriver client that drives Debian's headless chromium through chromedriver,
//! for the web console's tests. Our own code over reqwest's blocking client: the handful of
//! WebDriver commands those tests use, nothing more.
//!
//! ```text
//! let browser = Browser::start().unwrap();        // chromedriver on a free loopback port
//! browser.goto(&format!("http://{addr}/"));
//! let button = browser.find("#run");               // panics naming the selector and the page
//! browser.click(&button);
//! browser.wait_until("the session row", Duration::from_secs(30), |b| b.text_of("tr.session"));
//! browser.screenshot(&dir.join("dashboard.png"));
//! ```
//!
//! [`Browser::start`] returns an error that says to run `scripts/setup.sh` when
//! `/usr/bin/chromium` or `/usr/bin/chromedriver` (Debian's chromium and chromium-driver) is
//! missing or chromedriver does not come up. Every other method panics with what it was doing,
//! the WebDriver error and the page's address: these are test helpers, and `#[track_caller]`
//! points the panic at the test's line.
//!
//! # Processes
//! chromedriver is a child of the test process, on a port of 127.0.0.1 that was free a moment
//! before, logging to a temporary directory of this browser's own, which also holds chromium's
//! profile (`--user-data-dir`). Dropping the [`Browser`] (also while a failing test unwinds)
//! deletes the session, which makes chromedriver quit chromium, then kills chromedriver by its
//! pid and deletes the directory. A test process killed outright (SIGKILL) leaves them running.
//!
//! Use it from synchronous tests: reqwest's blocking client runs a runtime of its own and must
//! not be used inside an async one.
//!
//! # Waiting
//! Pages that update themselves (server-sent events) replace elements, and an element found
//! before an update is stale after it. [`Browser::text_of`] finds and reads in one script, so it
//! cannot see a stale element; [`Browser::wait_until`] polls any such read until it yields a
//! value, and on timeout panics with what it waited for and the page's current text. Timeouts
//! are deadlines for a loaded machine, not measurements.

use std::fmt;
use std::fs::File;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::guest::base64_decode;

/// Debian's chromium (a launcher script that reads /etc/chromium.d and execs the browser).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Debian's chromedriver (package chromium-driver), of the same version as [`CHROMIUM`].
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromium's command line: headless, no sandbox (the tests run as root, where chromium's
/// sandbox refuses to start), no GPU, and a fixed window so that screenshots have one size.
pub const CHROMIUM_ARGS: [&str; 4] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--window-size=1280,900",
];

/// How long chromedriver may take to answer its status request after it was started.
const DRIVER_READY_WAIT: Duration = Duration::from_secs(30);

/// How long one WebDriver command may take: creating a session starts chromium, which takes a
/// few seconds on a loaded machine; a navigation waits for the page to load.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// How often [`Browser::wait_until`] polls, and readiness is polled.
const POLL: Duration = Duration::from_millis(100);

/// How many lines of chromedriver's log an error shows.
const LOG_TAIL_LINES: usize = 20;

/// The key of an element reference in WebDriver's JSON (fixed by the W3C specification).
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Why the browser could not be started, or a WebDriver command failed.
pub struct Error {
    /// WebDriver's error code (`no such element`, `stale element reference`, ...) when
    /// chromedriver answered with one.
    pub code: Option<String>,
    pub message: String,
}

impl Error {
    fn new(message: impl Into<String>) -> Self {
        Error {
            code: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{code}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Debug shows the message, so that `Browser::start().unwrap()` reads well.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {}

/// An element of the current page, as WebDriver refers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element(pub String);

/// A headless chromium driven through a chromedriver of this browser's own.
pub struct Browser {
    http: reqwest::blocking::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    session: String,
    driver: Child,
    /// chromedriver's log and chromium's profile; deleted on drop, after the processes ended.
    dir: TempDir,
}

impl Browser {
    /// Starts Debian's chromedriver and a headless chromium session.
    pub fn start() -> Result<Browser, Error> {
        Browser::start_with(Path::new(CHROMIUM), Path::new(CHROMEDRIVER))
    }

    /// [`Browser::start`] with the browser and the driver given.
    pub fn start_with(chromium: &Path, chromedriver: &Path) -> Result<Browser, Error> {
        for (path, package) in [(chromium, "chromium"), (chromedriver, "chromium-driver")] {
            if !path.is_file() {
                return Err(Error::new(format!(
                    "{} is missing (Debian's {package}): run `bash scripts/setup.sh`",
                    path.display()
                )));
            }
        }
        // reqwest is built without a compiled-in TLS crypto provider; it needs one installed
        // even for plain HTTP. Another caller may have installed it already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::blocking::Client::builder()
            .timeout(COMMAND_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| Error::new(format!("cannot make an HTTP client: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix("backflow-webdriver-")
            .tempdir()
            .map_err(|e| Error::new(format!("cannot make a temporary directory: {e}")))?;
        let port = free_port()?;
        let log = dir.path().join("chromedriver.log");
        let log_file = File::create(&log)
            .map_err(|e| Error::new(format!("cannot create {}: {e}", log.display())))?;
        let log_clone = log_file
            .try_clone()
            .map_err(|e| Error::new(format!("cannot duplicate {}: {e}", log.display())))?;
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_clone)
            .spawn()
            .map_err(|e| {
                Error::new(format!(
                    "cannot start {}: {e}; run `bash scripts/setup.sh`",
                    chromedriver.display()
                ))
            })?;
        let base = format!("http://127.0.0.1:{port}");
        // From here on, a Browser owns chromedriver, so that an early return kills it.
        let mut browser = Browser {
            http,
            session: String::new(),
            driver,
            dir,
        };
        browser.wait_for_driver(chromedriver, &base)?;
        let profile = browser.dir.path().join("profile");
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| (*s).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": chromium, "args": args },
                }
            }
        });
        let created = browser
            .request(
                reqwest::Method::POST,
                &format!("{base}/session"),
                Some(capabilities),
            )
            .map_err(|e| {
                Error::new(format!(
                    "chromedriver cannot start chromium ({e}); is {} the version of {}? run \
                     `bash scripts/setup.sh`. The end of chromedriver's log:\n{}",
                    chromium.display(),
                    chromedriver.display(),
                    browser.log_tail()
                ))
            })?;
        let id = created["sessionId"].as_str().ok_or_else(|| {
            Error::new(format!(
                "chromedriver's new session has no sessionId: {created}"
            ))
        })?;
        browser.session = format!("{base}/session/{id}");
        Ok(browser)
    }

    /// chromedriver's pid.
    pub fn driver_pid(&self) -> u32 {
        self.driver.id()
    }

    /// The directory of chromedriver's log (`chromedriver.log`) and chromium's profile
    /// (`profile/`), deleted on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Loads `url` and waits for the page's load event.
    #[track_caller]
    pub fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .unwrap_or_else(|e| panic!("cannot load {url}: {e}"));
    }

    /// The address of the current page.
    #[track_caller]
    pub fn current_url(&self) -> String {
        let value = self
            .command(reqwest::Method::GET, "/url", None)
            .unwrap_or_else(|e| panic!("cannot read the current address: {e}"));
        value.as_str().unwrap_or_default().to_owned()
    }

    /// The first element that matches the CSS selector `css`; panics when there is none.
    #[track_caller]
    pub fn find(&self, css: &str) -> Element {
        match self.find_opt(css) {
            Some(element) => element,
            None => panic!(
                "no element matches {css:?} on {}; the page shows:\n{}",
                self.current_url(),
                self.page_text()
            ),
        }
    }

    /// The first element that matches `css`, or None.
    #[track_caller]
    pub fn find_opt(&self, css: &str) -> Option<Element> {
        let body = json!({ "using": "css selector", "value": css });
        match self.command(reqwest::Method::POST, "/element", Some(body)) {
            Ok(value) => Some(element_of(&value, css)),
            Err(e) if e.code.as_deref() == Some("no such element") => None,
            Err(e) => panic!("cannot look for {css:?}: {e}"),
        }
    }

    /// Every element that matches `css`, in document order.
    #[track_caller]
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        let body = json!({ "using": "css selector", "value": css });
        let value = self
            .command(reqwest::Method::POST, "/elements", Some(body))
            .unwrap_or_else(|e| panic!("cannot look for {css:?}: {e}"));
        match value.as_array() {
            Some(all) => all.iter().map(|v| element_of(v, css)).collect(),
            None => panic!("chromedriver's elements for {css:?} are no list: {value}"),
        }
    }

    /// The element's rendered text (what a user sees, as WebDriver defines it).
    #[track_caller]
    pub fn text(&self, element: &Element) -> String {
        let value = self
            .command(
                reqwest::Method::GET,
                &format!("/element/{}/text", element.0),
                None,
            )
            .unwrap_or_else(|e| panic!("cannot read the text of {element:?}: {e}"));
        value.as_str().unwrap_or_default().to_owned()
    }

    /// The rendered text (`innerText`) of the first element that matches `css`, or None when
    /// there is none; found and read in one script, so never stale.
    #[track_caller]
    pub fn text_of(&self, css: &str) -> Option<String> {
        let value = self.execute(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
            &[json!(css)],
        );
        value.as_str().map(str::to_owned)
    }

    /// The text of the whole page (`document.body.innerText`), for messages.
    #[track_caller]
    pub fn page_text(&self) -> String {
        let value = self.execute(
            "return document.body ? document.body.innerText : document.documentElement.outerHTML;",
            &[],
        );
        value.as_str().unwrap_or_default().to_owned()
    }

    /// Clicks the element (scrolled into view first, as WebDriver does).
    #[track_caller]
    pub fn click(&self, element: &Element) {
        self.command(
            reqwest::Method::POST,
            &format!("/element/{}/click", element.0),
            Some(json!({})),
        )
        .unwrap_or_else(|e| panic!("cannot click {element:?}: {e}"));
    }

    /// The element's attribute `name` (or the property, as WebDriver's Get Element Attribute
    /// falls back to for booleans), None when it has none.
    #[track_caller]
    pub fn attribute(&self, element: &Element, name: &str) -> Option<String> {
        let value = self
            .command(
                reqwest::Method::GET,
                &format!("/element/{}/attribute/{name}", element.0),
                None,
            )
            .unwrap_or_else(|e| panic!("cannot read attribute {name} of {element:?}: {e}"));
        match value {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => Some(other.to_string()),
        }
    }

    /// Runs `script` as the body of a function in the page with `args` as `arguments` and
    /// returns what it returns (an element as `{"element-6066-...": id}`).
    #[track_caller]
    pub fn execute(&self, script: &str, args: &[Value]) -> Value {
        let body = json!({ "script": script, "args": args });
        self.command(reqwest::Method::POST, "/execute/sync", Some(body))
            .unwrap_or_else(|e| panic!("the script failed: {e}\nscript: {script}"))
    }

    /// Polls `probe` until it returns a value, and returns it; panics after `timeout` with
    /// `what` it waited for, the page's address and its text.
    #[track_caller]
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&Browser) -> Option<T>,
    ) -> T {
        let started = Instant::now();
        loop {
            if let Some(value) = probe(self) {
                return value;
            }
            if started.elapsed() >= timeout {
                panic!(
                    "waited {timeout:?} for {what}, in vain; {} shows:\n{}",
                    self.current_url(),
                    self.page_text()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Writes a PNG screenshot of the window to `path`.
    #[track_caller]
    pub fn screenshot(&self, path: &Path) {
        let value = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .unwrap_or_else(|e| panic!("cannot take a screenshot: {e}"));
        let png = base64_decode(value.as_str().unwrap_or_default().as_bytes())
            .unwrap_or_else(|e| panic!("chromedriver's screenshot is not base64: {e}"));
        std::fs::write(path, png)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// Sends a command of the session (`path` after `/session/ID`).
    fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Error> {
        self.request(method, &format!("{}{path}", self.session), body)
    }

    /// Sends a WebDriver request and returns its `value`, or WebDriver's error.
    fn request(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Value>,
    ) -> Result<Value, Error> {
        let mut request = self.http.request(method.clone(), url);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .map_err(|e| Error::new(format!("{method} {url}: {e}")))?;
        let status = response.status();
        let text = response
            .text()
            .map_err(|e| Error::new(format!("{method} {url}: reading the answer: {e}")))?;
        let mut answer: Value = serde_json::from_str(&text).map_err(|e| {
            Error::new(format!(
                "{method} {url}: {status}, not JSON ({e}): {text:.500}"
            ))
        })?;
        let value = answer["value"].take();
        if status.is_success() {
            return Ok(value);
        }
        Err(Error {
            code: value["error"].as_str().map(str::to_owned),
            message: format!(
                "{method} {url}: {status}: {}",
                value["message"].as_str().unwrap_or(&text)
            ),
        })
    }

    /// Waits until chromedriver answers that it is ready, or fails with its log when it exits.
    fn wait_for_driver(&mut self, chromedriver: &Path, base: &str) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.driver.try_wait() {
                return Err(Error::new(format!(
                    "{} exited ({status}) before it answered; run `bash scripts/setup.sh`. \
                     The end of its log:\n{}",
                    chromedriver.display(),
                    self.log_tail()
                )));
            }
            let status = self.request(reqwest::Method::GET, &format!("{base}/status"), None);
            if status.is_ok_and(|s| s["ready"] == Value::Bool(true)) {
                return Ok(());
            }
            if started.elapsed() >= DRIVER_READY_WAIT {
                return Err(Error::new(format!(
                    "{} did not answer on {base} within {DRIVER_READY_WAIT:?}. The end of its \
                     log:\n{}",
                    chromedriver.display(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The last lines of chromedriver's log.
    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Quits chromium; its failure leaves nothing to do but kill chromedriver below.
            let _ = self.request(reqwest::Method::DELETE, &self.session.clone(), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A port of 127.0.0.1 that was free when asked.
fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::new(format!("cannot bind a port on 127.0.0.1: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::new(format!("cannot read the bound port: {e}")))
}

#[track_caller]
fn element_of(value: &Value, css: &str) -> Element {
    match value[ELEMENT_KEY].as_str() {
        Some(id) => Element(id.to_owned()),
        None => panic!("chromedriver's element for {css:?} has no reference: {value}"),
    }
}
