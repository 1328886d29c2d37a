//! The command line around the pipelines: built-in specs by name from any directory, the
//! repository from `BACKFLOW_REPOSITORY`, logs for a file or a machine, shell completions, the
//! manual page and the systemd unit. The real binary throughout.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// The names of the files of `specs/`, sorted.
fn spec_files() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("specs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `backflow` run in `dir`, with no repository from the environment of the test.
fn backflow_in(dir: &Path) -> Command {
    let mut cmd = backflow();
    cmd.current_dir(dir).env_remove("BACKFLOW_REPOSITORY");
    cmd
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd).stdout).unwrap()
}

#[test]
fn every_spec_file_is_built_in_and_listed_with_its_variables() {
    let elsewhere = tempfile::tempdir().unwrap();
    let listed: serde_json::Value = serde_json::from_str(&stdout(
        backflow_in(elsewhere.path()).args(["specs", "--json"]),
    ))
    .unwrap();
    let mut names: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, spec_files(), "`backflow specs` and specs/ differ");
    for spec in listed.as_array().unwrap() {
        let name = spec["name"].as_str().unwrap();
        assert!(!spec["description"].as_str().unwrap().is_empty(), "{name}");
        // `backflow specs NAME` prints the file as it is in specs/.
        let text = stdout(backflow_in(elsewhere.path()).args(["specs", name]));
        let file =
            std::fs::read_to_string(root().join("specs").join(format!("{name}.yaml"))).unwrap();
        assert_eq!(text, file, "{name}");
    }
    let backup_vm = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "backup-vm")
        .unwrap();
    let domain = &backup_vm["variables"][0];
    assert_eq!(domain["name"], "domain");
    assert!(domain["default"].is_null(), "domain is required: {domain}");
    assert!(domain["doc"].as_str().unwrap().contains("VM's name"));
    let uri = backup_vm["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "uri")
        .unwrap();
    assert_eq!(uri["default"], "qemu:///system");

    let text = stdout(backflow_in(elsewhere.path()).arg("specs"));
    for name in spec_files() {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name}  "))),
            "{name} missing from:\n{text}"
        );
    }
    assert!(text.contains("required"), "{text}");
}

#[test]
fn a_builtin_spec_runs_by_name_from_another_directory_with_the_repository_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 4 << 20, 7).unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    // No `--var repo=`: the spec's `${repo}` comes from BACKFLOW_REPOSITORY.
    run_ok(
        backflow_in(elsewhere.path())
            .env("BACKFLOW_REPOSITORY", &repo)
            .args(["run", "backup-image", "--quiet", "--var"])
            .arg(format!("source={}", image.display())),
    );
    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let out = dir.path().join("out.raw");
    run_ok(
        backflow_in(elsewhere.path())
            .env("BACKFLOW_REPOSITORY", &repo)
            .args(["restore", "--quiet", "--snapshot", &ids[0], "--to"])
            .arg(&out),
    );
    assert_same_file(&image, &out);
    // `validate` by name too; `--var repo=` wins over the environment.
    let valid = stdout(
        backflow_in(elsewhere.path())
            .env("BACKFLOW_REPOSITORY", "/nonexistent")
            .args(["validate", "backup-image", "--var", "source=x", "--var"])
            .arg(format!("repo={}", repo.display())),
    );
    assert!(valid.starts_with("backup-image: valid:"), "{valid}");
    // A spec that declares no `repo` is not given one.
    run_ok(
        backflow_in(elsewhere.path())
            .env("BACKFLOW_REPOSITORY", &repo)
            .args(["validate", "tune-dedup"]),
    );
}

#[test]
fn a_file_wins_over_the_builtin_spec_of_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tune-dedup"),
        "name: mine\nstages:\n  - kind: generate\n    size: 1M\n  - kind: discard\n",
    )
    .unwrap();
    let valid = stdout(backflow_in(dir.path()).args(["validate", "tune-dedup"]));
    assert_eq!(
        valid.trim(),
        "tune-dedup: valid: generate (generate) x1 -> discard (discard) x1"
    );
    // A directory of a built-in spec's name is not a spec file.
    std::fs::create_dir(dir.path().join("restore")).unwrap();
    let valid = stdout(
        backflow_in(dir.path()).args(["validate", "restore", "--var", "repo=r", "--var", "to=t"]),
    );
    assert!(valid.starts_with("restore: valid: repo-reader"), "{valid}");
    // Something that looks like a path is never a built-in spec.
    let out = backflow_in(dir.path())
        .args(["validate", "./tune-compress"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("./tune-compress:1:1: cannot read"));
}

/// Backs the same 1 MiB image up twice as disk0, the second time at another size: the second
/// run warns that there is no parent to compare with. Returns the second run's stderr and its
/// exit status.
fn run_with_a_warning(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    backflow_fixtures::generate_image(&image, 1 << 20, 3).unwrap();
    let repo = dir.path().join("repo");
    init_repo(&repo, "64K");
    run_ok(&mut backup_command(&image, &repo, "disk0"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let out = run_ok(backup_command(&image, &repo, "disk0").args(extra));
    String::from_utf8(out.stderr).unwrap()
}

const WARNING: &str = "size or chunk size changed since snapshot";

#[test]
fn a_warning_is_logged_once_and_without_escape_codes_off_a_terminal() {
    let stderr = run_with_a_warning(&[]);
    assert!(!stderr.contains("\x1b["), "escape codes in:\n{stderr:?}");
    assert_eq!(stderr.matches(WARNING).count(), 1, "stderr:\n{stderr}");
}

#[test]
fn log_format_json_gives_one_json_object_per_line() {
    let stderr = run_with_a_warning(&["--log-format", "json"]);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l:?}")))
        .collect();
    let warnings: Vec<_> = lines
        .iter()
        .filter(|l| l["level"] == "WARN")
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .contains(WARNING)
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
}

#[test]
fn completions_for_every_shell_know_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(backflow_in(dir.path()).args(["completions", shell]));
        // fish spells options `-l repo`.
        for word in ["snapshots", "restore", "specs", "repo", "log-format"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = backflow_in(dir.path())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_prints_a_roff_page_or_one_page_per_command() {
    let dir = tempfile::tempdir().unwrap();
    let page = stdout(backflow_in(dir.path()).arg("man"));
    assert!(
        page.starts_with(".ie \\n(.g .ds Aq") || page.starts_with(".TH"),
        "{page:.200}"
    );
    assert!(
        page.lines().any(|l| l.starts_with(".TH backflow 1")),
        "{page:.400}"
    );
    assert!(page.contains("snapshots"));
    let pages = dir.path().join("man1");
    run_ok(backflow_in(dir.path()).arg("man").arg("--dir").arg(&pages));
    for name in ["backflow.1", "backflow-restore.1", "backflow-daemon.1"] {
        let text = std::fs::read_to_string(pages.join(name)).unwrap();
        assert!(text.lines().any(|l| l.starts_with(".TH ")), "{name}");
    }
}

#[test]
fn every_repo_option_is_documented_with_its_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let help = stdout(backflow_in(dir.path()).arg("--help"));
    let commands: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect();
    assert!(commands.len() > 10, "{help}");
    let mut with_repo = 0;
    let mut helps = Vec::new();
    for command in &commands {
        let text = stdout(backflow_in(dir.path()).args([command.as_str(), "--help"]));
        if text.contains("Commands:") {
            // `job`: its subcommands.
            for sub in text
                .lines()
                .skip_while(|l| !l.starts_with("Commands:"))
                .skip(1)
                .take_while(|l| l.starts_with("  "))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|c| *c != "help")
            {
                helps.push((
                    format!("{command} {sub}"),
                    stdout(backflow_in(dir.path()).args([command.as_str(), sub, "--help"])),
                ));
            }
        }
        helps.push((command.clone(), text));
    }
    for (command, text) in helps {
        let Some(at) = text.find("--repo <") else {
            continue;
        };
        with_repo += 1;
        let option = &text[at..];
        let option = &option[..option.find("\n  -").unwrap_or(option.len())];
        assert!(
            option.contains("[env: BACKFLOW_REPOSITORY"),
            "`{command} --help`: --repo without its environment variable:\n{option}"
        );
        assert!(
            option.contains("backflow init"),
            "`{command} --help`: --repo undocumented:\n{option}"
        );
    }
    assert!(with_repo >= 8, "only {with_repo} commands take --repo");
    // `run` and `validate` say where `${repo}` comes from.
    for command in ["run", "validate"] {
        let text = stdout(backflow_in(dir.path()).args([command, "--help"]));
        assert!(text.contains("BACKFLOW_REPOSITORY"), "{command}:\n{text}");
    }
}

#[test]
fn the_systemd_unit_verifies_and_its_command_line_parses() {
    let unit = std::fs::read_to_string(root().join("dist/backflow-daemon.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut argv = exec.split_whitespace();
    let installed = argv.next().unwrap();
    let args: Vec<&str> = argv.collect();
    assert_eq!(args[0], "daemon");
    // The unit as installed, but with this build's binary: `verify` checks that it exists.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("backflow-daemon.service");
    std::fs::write(
        &copy,
        unit.replace(installed, env!("CARGO_BIN_EXE_backflow")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (package systemd; scripts/setup.sh installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings to systemd: any output is a failure here.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    for key in [
        "KillSignal=SIGTERM",
        "Restart=on-failure",
        "TimeoutStopSec=",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
    // The daemon accepts the unit's arguments: it fails on the missing jobs directory, as bad
    // input, not on its command line.
    let jobs = dir.path().join("no-jobs");
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("/etc/backflow/jobs", &jobs.display().to_string()))
        .collect();
    let out = backflow_in(dir.path()).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&jobs.display().to_string()), "{stderr}");
}
