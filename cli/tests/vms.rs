//! `backflow vms` against libvirt's in-process test driver (`test:///default`: no daemon), and against
//! URIs where no libvirt answers.

mod common;

use common::{backflow, run_ok};

#[test]
fn vms_json_lists_the_test_drivers_running_domain() {
    let out = run_ok(backflow().args(["vms", "--uri", "test:///default", "--json"]));
    let vms: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms = vms.as_array().expect("a JSON array");
    let test = vms
        .iter()
        .find(|v| v["name"] == "test")
        .expect("the test driver's domain `test`");
    assert_eq!(test["state"], "running");
    assert_eq!(test["uuid"], "6695eb01-f6a4-8304-79aa-97f2502e193f");
    assert!(test["host"].as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(test["disks"][0]["target"], "vda");
    assert_eq!(test["disks"][0]["source"]["path"], "/guest/diskimage1");
    assert!(test.get("definition").is_none());
}

#[test]
fn vms_table_shows_state_host_and_disks() {
    let out = run_ok(backflow().args(["vms", "--uri", "test:///default"]));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("name"), "{text}");
    assert!(header.ends_with("disks"), "{text}");
    let row = lines
        .find(|l| l.starts_with("test "))
        .unwrap_or_else(|| panic!("no row for `test`:\n{text}"));
    assert!(row.contains(" running "), "{row}");
    assert!(row.ends_with("vda: ? ? /guest/diskimage1"), "{row}");
}

#[test]
fn vms_on_a_uri_where_no_libvirtd_answers_exits_1_naming_it() {
    let uri = "qemu+unix:///system?socket=/nonexistent/backflow-cli-test.sock";
    let out = backflow().args(["vms", "--uri", uri]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("backflow: libvirtd does not answer at {uri}")),
        "{stderr}"
    );
}

#[test]
fn vms_on_a_bad_uri_exits_1_naming_it() {
    let uri = "test:///nonexistent/backflow-cli-test.xml";
    let out = backflow().args(["vms", "--uri", uri]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    // libxml2 may print its own warning first; our line is the last.
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("backflow: cannot connect to libvirt at {uri}: ")),
        "{stderr}"
    );
}
