//! Test-only tools that `scripts/setup.sh` installs outside the Debian packages, and where the
//! tests find them. Each finder panics with what to run when its tool is missing: a test that
//! needs one fails, never skips.
//!
//! - [`promtool`]: Prometheus's rule and exposition checker, unpacked from Debian 12's
//!   `prometheus` package into `$BACKFLOW_TOOLS/bin/promtool` (2.42). The tests run
//!   `promtool check rules FILE`, `promtool test rules FILE` and `promtool check metrics`, which
//!   reads an exposition on stdin and exits with 0 when it is clean, 1 when it does not parse
//!   ("error while linting: text format parsing error in line N: ..."), and 3 on lint findings
//!   such as `foo_bytes counter metrics should have "_total" suffix` (this version has no
//!   `--lint` flag to turn them off; its messages go to stderr).
//! - [`schemathesis`]: schemathesis 4.32.5's `st`, in a venv at `$BACKFLOW_TOOLS/venv`. Its CLI
//!   as of that version (`st run --help`): `st run LOCATION` where LOCATION is the URL or file of
//!   the OpenAPI document, `--url BASE` (the API's base URL, needed for a file), `--checks LIST`
//!   (e.g. `all`, or `not_a_server_error,response_schema_conformance`), `--exclude-checks LIST`,
//!   `-n/--max-examples N` (cases per operation), `--phases examples,coverage,fuzzing,stateful`,
//!   `--seed N` and `--generation-deterministic`, `--max-time SECONDS`, `-H/--header NAME:VALUE`
//!   (e.g. the token), `--workers N`, `--request-timeout S`, `--wait-for-schema S`,
//!   `--no-color`, `--report junit --report-dir DIR`. It exits 0 when every check passed.
//!
//! `$BACKFLOW_TOOLS` (default `/opt/backflow-tools`, [`crate::s3::tools_dir`]) moves them, as it
//! does for setup.sh.

use std::path::{Path, PathBuf};

use crate::s3::tools_dir;

/// The `promtool` that `scripts/setup.sh` installed (`$BACKFLOW_TOOLS/bin/promtool`), else the
/// first on the `PATH`.
pub fn promtool() -> PathBuf {
    let installed = tools_dir().join("bin/promtool");
    if is_executable(&installed) {
        return installed;
    }
    on_path("promtool").unwrap_or_else(|| {
        panic!(
            "promtool is missing (neither {} nor on the PATH): run `bash scripts/setup.sh` \
             (it unpacks Debian's)",
            installed.display()
        )
    })
}

/// schemathesis's `st` in the venv that `scripts/setup.sh` made (`$BACKFLOW_TOOLS/venv/bin/st`).
pub fn schemathesis() -> PathBuf {
    let st = tools_dir().join("venv/bin/st");
    assert!(
        is_executable(&st),
        "schemathesis is missing ({} does not exist): run `bash scripts/setup.sh` (it installs \
         schemathesis from PyPI into that venv)",
        st.display()
    );
    st
}

/// The first executable file `name` in a directory of the `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a file that someone may execute.
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
