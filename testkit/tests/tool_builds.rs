//! How the tests find the object stores' binaries while `scripts/setup.sh` may still be building
//! them in the background: `testkit::s3::tool_in` against a tools directory laid out as setup
//! lays it out (`bin/NAME`, `build/NAME.{pid,log,status}`), with shell processes standing in
//! for `cargo install`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use backflow_testkit::s3::tool_in;

/// The panic message of `f`, which must panic.
fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let payload = std::panic::catch_unwind(f).expect_err("it panics");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

fn build_dir(tools: &Path) -> std::path::PathBuf {
    let build = tools.join("build");
    std::fs::create_dir_all(&build).unwrap();
    build
}

#[test]
fn a_running_build_is_waited_for() {
    let tools = tempfile::tempdir().unwrap();
    let build = build_dir(tools.path());
    // The stand-in build finishes when it reads a line: after the caller started waiting.
    let mut cargo = Command::new("sh")
        .arg("-c")
        .arg("read line; mkdir -p bin; echo built > bin/fake; echo 0 > build/fake.status")
        .current_dir(tools.path())
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(build.join("fake.pid"), cargo.id().to_string()).unwrap();

    let dir = tools.path().to_owned();
    let (said, hear) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        tool_in(&dir, "fake", &mut |line| {
            said.send(line.to_owned()).unwrap()
        })
    });
    let first = hear.recv().unwrap();
    assert!(
        first.starts_with("waiting for the background build of fake"),
        "{first}"
    );
    assert!(!tools.path().join("bin/fake").exists());
    writeln!(cargo.stdin.take().unwrap(), "go").unwrap();
    cargo.wait().unwrap();
    let found = waiter.join().expect("tool_in returns once the build ended");
    assert_eq!(found, tools.path().join("bin/fake"));
    let last = hear.recv().unwrap();
    assert!(last.starts_with("fake is built"), "{last}");
}

#[test]
fn a_failed_build_shows_its_status_and_the_end_of_its_log() {
    let tools = tempfile::tempdir().unwrap();
    let build = build_dir(tools.path());
    let log: String = (1..=100).map(|i| format!("line {i}\n")).collect();
    std::fs::write(
        build.join("fake.log"),
        format!("{log}error: linking failed\n"),
    )
    .unwrap();
    std::fs::write(build.join("fake.status"), "101\n").unwrap();
    std::fs::write(build.join("fake.pid"), "1\n").unwrap();
    let dir = tools.path().to_owned();
    let message = panic_message(move || {
        tool_in(&dir, "fake", &mut |_| {});
    });
    assert!(message.contains("exit status 101"), "{message}");
    assert!(message.contains("error: linking failed"), "{message}");
    assert!(!message.contains("line 1\n"), "the whole log: {message}");
}

#[test]
fn a_build_that_died_without_a_status_is_reported() {
    let tools = tempfile::tempdir().unwrap();
    let build = build_dir(tools.path());
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    std::fs::write(build.join("fake.pid"), gone.id().to_string()).unwrap();
    std::fs::write(build.join("fake.log"), "Compiling garage v2.5.0\n").unwrap();
    let dir = tools.path().to_owned();
    let message = panic_message(move || {
        tool_in(&dir, "fake", &mut |_| {});
    });
    assert!(message.contains("stopped without finishing"), "{message}");
    assert!(message.contains("Compiling garage"), "{message}");
}

#[test]
fn a_missing_tool_names_the_setup_script() {
    let tools = tempfile::tempdir().unwrap();
    let dir = tools.path().to_owned();
    let message = panic_message(move || {
        tool_in(&dir, "fake", &mut |_| {});
    });
    assert!(message.contains("scripts/setup.sh"), "{message}");
    assert!(message.contains("bin/fake"), "{message}");
}
