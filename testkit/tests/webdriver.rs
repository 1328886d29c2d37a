//! testkit's WebDriver client against the real headless chromium: a page served from a thread of
//! this test, a button whose script changes a text, a computed value from a script, a PNG
//! screenshot; and no chromedriver or chromium left behind, also when the test fails.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use backflow_testkit::webdriver::Browser;
use serde_json::json;

/// The page under test: a status text that the button's script changes.
const PAGE: &str = r#"<!doctype html>
<html><head><title>webdriver test</title></head>
<body>
<p id="status">idle</p>
<button id="go" data-kind="action" onclick="document.getElementById('status').textContent = 'clicked ' + (6 * 7)">Go</button>
<ul><li>one</li><li>two</li><li>three</li></ul>
</body></html>
"#;

/// How long the page may take to change after the click: a deadline, not a measurement.
const WAIT: Duration = Duration::from_secs(30);

/// Serves [`PAGE`] to every request on a port of 127.0.0.1, from a thread that lives as long as
/// the test process.
fn serve_page() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            // The request line and headers, up to the blank line; a GET has no body.
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{PAGE}",
                PAGE.len()
            );
        }
    });
    addr
}

/// Whether a process with this pid exists (and is not a zombie of ours).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim()
            .starts_with('Z')
    })
}

/// The pids of processes whose command line mentions `dir` (chromium's, given its profile).
fn processes_using(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

#[test]
fn drives_a_page_in_headless_chromium() {
    let addr = serve_page();
    let browser = Browser::start().unwrap();
    let url = format!("http://{addr}/page");
    browser.goto(&url);
    assert_eq!(browser.current_url(), url);

    let status = browser.find("#status");
    assert_eq!(browser.text(&status), "idle");
    let button = browser.find("#go");
    assert_eq!(
        browser.attribute(&button, "data-kind").as_deref(),
        Some("action")
    );
    assert_eq!(browser.attribute(&button, "data-missing"), None);
    assert_eq!(
        browser
            .find_all("li")
            .iter()
            .map(|li| browser.text(li))
            .collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    assert!(browser.find_opt("#nothing").is_none());

    browser.click(&button);
    let after = browser.wait_until("the status to change after the click", WAIT, |b| {
        b.text_of("#status").filter(|t| t != "idle")
    });
    assert_eq!(after, "clicked 42");
    assert_eq!(browser.text(&status), "clicked 42");

    // A value the page computes, with an argument passed in.
    let width = browser.execute(
        "return [window.innerWidth, document.querySelectorAll(arguments[0]).length];",
        &[json!("li")],
    );
    assert_eq!(width, json!([1280, 3]));

    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("page.png");
    browser.screenshot(&shot);
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    // The IHDR chunk comes first: width and height, big-endian, at bytes 16..24.
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!(width, 1280, "screenshot width");
    assert!(height > 500, "screenshot height {height}");
    assert!(png.len() > 2000, "a {}-byte screenshot", png.len());

    let driver = browser.driver_pid();
    let profile = browser.dir().join("profile");
    assert!(alive(driver));
    assert!(!processes_using(&profile).is_empty(), "no chromium found");
    drop(browser);
    assert!(!alive(driver), "chromedriver {driver} still runs");
    assert_eq!(
        processes_using(&profile),
        Vec::<u32>::new(),
        "chromium still runs"
    );
}

#[test]
fn a_failing_wait_says_what_it_waited_for_and_cleans_up() {
    let addr = serve_page();
    let (driver, profile, message) = {
        let browser = Browser::start().unwrap();
        browser.goto(&format!("http://{addr}/"));
        let driver = browser.driver_pid();
        let profile = browser.dir().join("profile");
        // The browser is dropped while the panic unwinds, as in a failing test.
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            browser.wait_until("a status nobody sets", Duration::from_millis(300), |b| {
                b.text_of("#status").filter(|t| t == "never")
            })
        }));
        let payload = failed.expect_err("the wait times out");
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        (driver, profile, message)
    };
    assert!(message.contains("a status nobody sets"), "{message}");
    assert!(
        message.contains("idle") && message.contains("Go"),
        "{message}"
    );
    assert!(!alive(driver), "chromedriver {driver} still runs");
    assert_eq!(
        processes_using(&profile),
        Vec::<u32>::new(),
        "chromium still runs"
    );
    assert!(!profile.exists(), "{} is left", profile.display());
}

#[test]
fn a_missing_browser_or_driver_is_a_clear_error() {
    let chromium = Path::new(backflow_testkit::webdriver::CHROMIUM);
    let missing = Path::new("/nonexistent/chromedriver");
    let error = Browser::start_with(chromium, missing)
        .err()
        .expect("it fails");
    assert_eq!(
        error.to_string(),
        "/nonexistent/chromedriver is missing (Debian's chromium-driver): run `bash scripts/setup.sh`"
    );
    // A driver that exits at once.
    let error = Browser::start_with(chromium, Path::new("/bin/false"))
        .err()
        .expect("it fails");
    assert!(
        error.to_string().starts_with(
            "/bin/false exited (exit status: 1) before it answered; run `bash scripts/setup.sh`"
        ),
        "{error}"
    );
}
