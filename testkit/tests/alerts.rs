//! The example alert rules in dist/ are valid Prometheus rules, and their unit tests
//! (dist/backflow-alerts.test.yml) pass under the real promtool: VM web1 backed up 30 hours ago
//! and a VM never backed up fire `BackflowVmBackupMissing`, db1 backed up 2 hours ago does not.
//! A copy whose expectation is wrong must fail, so that a passing run means something.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backflow_testkit::tools::promtool;

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

/// Runs promtool with `args` in `dir` (rule files name each other relative to it).
fn run(dir: &Path, args: &[&str]) -> Output {
    let promtool = promtool();
    Command::new(&promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_rules_are_valid() {
    let output = run(&dist(), &["check", "rules", "backflow-alerts.yml"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("SUCCESS: 2 rules found"),
        "{}",
        text(&output)
    );
}

#[test]
fn the_rules_pass_their_unit_tests() {
    let output = run(&dist(), &["test", "rules", "backflow-alerts.test.yml"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("SUCCESS"), "{}", text(&output));
}

#[test]
fn a_wrong_expectation_fails() {
    let scratch = tempfile::tempdir().unwrap();
    std::fs::copy(
        dist().join("backflow-alerts.yml"),
        scratch.path().join("backflow-alerts.yml"),
    )
    .unwrap();
    let tests = std::fs::read_to_string(dist().join("backflow-alerts.test.yml")).unwrap();
    // The 40h evaluation expects web1 and mail1; expecting mail1 alone (no alert for web1, whose
    // backup is 30 hours old) must fail.
    let web1 = "          - exp_labels:\n              severity: critical\n              backflow_job: nightly\n              vm: web1\n";
    let start = tests
        .find(web1)
        .expect("the test file expects an alert for web1");
    let end = start
        + web1.len()
        + tests[start + web1.len()..]
            .find("          - exp_labels:")
            .expect("another alert follows web1's");
    let altered = format!("{}{}", &tests[..start], &tests[end..]);
    assert!(!altered.contains("vm: web1"));
    std::fs::write(scratch.path().join("backflow-alerts.test.yml"), altered).unwrap();

    let output = run(
        scratch.path(),
        &["test", "rules", "backflow-alerts.test.yml"],
    );
    assert!(!output.status.success(), "{}", text(&output));
    let said = text(&output);
    assert!(said.contains("FAILED"), "{said}");
    // promtool shows what fired: web1's alert, with the age humanized.
    assert!(
        said.contains(r#"vm="web1""#) && said.contains("was 1d 6h 0m 0s ago"),
        "{said}"
    );
}
