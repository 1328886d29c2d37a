//! Actions on restore points, asked for through the API: each runs as a task, the `backflow`
//! binary itself as a child process (so the console runs exactly what the command line runs,
//! with its checks, its cleanup and its errors), and is recorded when it ends as a session of
//! job `console` in the repository, with who asked ([`backflow_jobs::ActionRecord`]).
//!
//! - verify: `backflow run verify-restore-point` (reads, decodes and checks every chunk);
//! - forget: `backflow forget --snapshot ID`;
//! - restore: `backflow restore --to RESTORE_DIR/NAME/` (a new directory; never over anything);
//! - instant-restore: `backflow instant-restore --name NAME`.
//!
//! A task's output keeps its last [`OUTPUT_LINES`] lines. The task list is in memory (the
//! records in the repositories are what lasts); at most [`MAX_TASKS`] are kept.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use axum::Json;
use axum::http::StatusCode;
use backflow_jobs::{ActionRecord, SessionRecord, Verdict};
use backflow_repository::{Location, Repository};
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::{
    Accepted, ApiError, AppState, ImageFormat, InstantRestoreRequest, RestoreRequest, blocking,
};
use crate::auth::Caller;
use crate::data::Data;

/// Lines of output a task keeps.
pub const OUTPUT_LINES: usize = 40;
/// Tasks kept in memory.
pub const MAX_TASKS: usize = 200;
/// The job name of action records.
pub const ACTION_JOB: &str = "console";

/// What to do with a restore point.
#[derive(Clone, Debug)]
pub enum Action {
    Verify,
    Forget,
    Restore {
        name: String,
        disk: Option<String>,
        format: String,
    },
    Instant {
        name: String,
        no_network: bool,
    },
}

impl Action {
    pub fn restore(r: RestoreRequest) -> Result<Action, ApiError> {
        check_name("name", &r.name)?;
        if let Some(disk) = &r.disk {
            backflow_repository::check_disk_name(disk)
                .map_err(|e| ApiError::bad_request(format!("disk: {e}")))?;
        }
        let format = match r.format {
            None | Some(ImageFormat::Raw) => "raw",
            Some(ImageFormat::Qcow2) => "qcow2",
        }
        .to_owned();
        Ok(Action::Restore {
            name: r.name,
            disk: r.disk,
            format,
        })
    }

    pub fn instant(r: InstantRestoreRequest) -> Result<Action, ApiError> {
        check_name("name", &r.name)?;
        Ok(Action::Instant {
            name: r.name,
            no_network: r.no_network,
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Action::Verify => "verify",
            Action::Forget => "forget",
            Action::Restore { .. } => "restore",
            Action::Instant { .. } => "instant-restore",
        }
    }
}

/// A directory or domain name: 1 to 64 of letters, digits, `.`, `_`, `-`, not starting with
/// `.` or `-`.
fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{field}: `{name}`: expected 1 to 64 letters, digits, `.`, `_` or `-`, not starting with `.` or `-`"
        )))
    }
}

/// A task as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TaskInfo {
    pub id: u64,
    /// `verify`, `forget`, `restore` or `instant-restore`.
    pub kind: String,
    pub snapshot: String,
    pub vm: String,
    pub repository: String,
    /// Where a restore writes; the name of an instant recovery.
    pub target: Option<String>,
    pub requested_by: String,
    /// Unix seconds.
    pub started: i64,
    pub ended: Option<i64>,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    /// The last lines it printed.
    pub output: String,
    pub error: Option<String>,
    /// The session that records it, once it ended.
    pub session: Option<String>,
}

/// The tasks.
#[derive(Default)]
pub struct Tasks {
    list: Mutex<VecDeque<TaskInfo>>,
}

impl Tasks {
    /// Newest first.
    pub fn list(&self) -> Vec<TaskInfo> {
        self.lock().iter().rev().cloned().collect()
    }

    pub fn get(&self, id: u64) -> Option<TaskInfo> {
        self.lock().iter().find(|t| t.id == id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<TaskInfo>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, mut task: TaskInfo) -> TaskInfo {
        let mut list = self.lock();
        // Ids increase: one more than the newest kept (1 for the first).
        task.id = list.back().map_or(1, |t| t.id + 1);
        list.push_back(task.clone());
        while list.len() > MAX_TASKS {
            list.pop_front();
        }
        task
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut TaskInfo)) {
        if let Some(task) = self.lock().iter_mut().find(|t| t.id == id) {
            f(task);
        }
    }
}

/// Starts `action` on restore point `id`: answers 202 with the task at once.
pub async fn start(
    state: AppState,
    caller: Caller,
    id: String,
    repository: Option<String>,
    action: Action,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let task =
        blocking(move || begin(&state, &caller, &id, repository.as_deref(), action)).await??;
    Ok((StatusCode::ACCEPTED, Json(Accepted { task })))
}

fn begin(
    state: &AppState,
    caller: &Caller,
    id: &str,
    repository: Option<&str>,
    action: Action,
) -> Result<TaskInfo, ApiError> {
    let point = crate::api::find_point(state, id, repository)?;
    let location: Location = point
        .repository
        .parse()
        .map_err(|e| ApiError::internal(format!("repository {}: {e}", point.repository)))?;
    let target = match &action {
        Action::Restore { name, .. } => {
            let dir = state.options.restore_dir.join(name);
            if dir.exists() {
                return Err(ApiError::conflict(format!(
                    "{} exists: a restore writes into a new directory",
                    dir.display()
                )));
            }
            Some(dir.display().to_string())
        }
        Action::Instant { name, .. } => Some(name.clone()),
        _ => None,
    };
    let task = state.tasks.add(TaskInfo {
        id: 0,
        kind: action.kind().into(),
        snapshot: point.id.clone(),
        vm: point.vm.clone(),
        repository: point.repository.clone(),
        target,
        requested_by: caller.who(),
        started: backflow_jobs::run::now(),
        ended: None,
        state: "running".into(),
        output: String::new(),
        error: None,
        session: None,
    });
    let (tasks, data, restore_dir) = (
        std::sync::Arc::clone(&state.tasks),
        std::sync::Arc::clone(&state.data),
        state.options.restore_dir.clone(),
    );
    let info = task.clone();
    std::thread::Builder::new()
        .name(format!("task {}", task.id))
        .spawn(move || run(&tasks, &data, &info, &location, &action, &restore_dir))
        .map_err(|e| ApiError::internal(format!("cannot start the task: {e}")))?;
    Ok(task)
}

/// The child's arguments.
fn arguments(
    action: &Action,
    task: &TaskInfo,
    repo: &str,
    restore_dir: &std::path::Path,
) -> Vec<String> {
    let snapshot = task.snapshot.clone();
    let mut args: Vec<String> = match action {
        Action::Verify => vec![
            "run".into(),
            "verify-restore-point".into(),
            "--var".into(),
            format!("repo={repo}"),
            "--var".into(),
            format!("snapshot={snapshot}"),
        ],
        Action::Forget => vec![
            "forget".into(),
            "--repo".into(),
            repo.into(),
            "--snapshot".into(),
            snapshot,
        ],
        Action::Restore { name, disk, format } => {
            let mut a = vec![
                "restore".into(),
                "--repo".into(),
                repo.into(),
                "--snapshot".into(),
                snapshot,
                "--to".into(),
                restore_dir.join(name).display().to_string(),
                "--format".into(),
                format.clone(),
            ];
            if let Some(disk) = disk {
                a.extend(["--disk".into(), disk.clone()]);
            }
            a
        }
        Action::Instant { name, no_network } => {
            let mut a = vec![
                "instant-restore".into(),
                "--repo".into(),
                repo.into(),
                "--snapshot".into(),
                snapshot,
                "--name".into(),
                name.clone(),
            ];
            if *no_network {
                a.push("--no-network".into());
            }
            a
        }
    };
    if matches!(action, Action::Verify | Action::Restore { .. }) {
        args.push("--quiet".into());
    }
    args
}

fn run(
    tasks: &Tasks,
    data: &Data,
    task: &TaskInfo,
    location: &Location,
    action: &Action,
    restore_dir: &std::path::Path,
) {
    let started = Instant::now();
    let repo = location.to_string();
    let result = (|| -> Result<String, (String, String)> {
        if let Action::Restore { name, .. } = action {
            let dir = restore_dir.join(name);
            std::fs::create_dir_all(restore_dir)
                .and_then(|()| std::fs::create_dir(&dir))
                .map_err(|e| (String::new(), format!("{}: {e}", dir.display())))?;
        }
        let exe: PathBuf = std::env::current_exe()
            .map_err(|e| (String::new(), format!("the backflow binary: {e}")))?;
        let mut command = Command::new(exe);
        command
            .args(arguments(action, task, &repo, restore_dir))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(file) = backflow_repository::keys::password_file_for(&repo) {
            command.env(backflow_repository::keys::PASSWORD_FILE_ENV, file);
        }
        let mut child = command
            .spawn()
            .map_err(|e| (String::new(), format!("cannot start backflow: {e}")))?;
        let output = Mutex::new(VecDeque::<String>::new());
        let keep = |line: String| {
            let mut o = output.lock().unwrap_or_else(|e| e.into_inner());
            o.push_back(line);
            while o.len() > OUTPUT_LINES {
                o.pop_front();
            }
            let text = o.iter().cloned().collect::<Vec<_>>().join("\n");
            tasks.update(task.id, |t| t.output = text);
        };
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        std::thread::scope(|s| {
            if let Some(err) = stderr {
                s.spawn(|| {
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        keep(line);
                    }
                });
            }
            if let Some(out) = stdout {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    keep(line);
                }
            }
        });
        let status = child
            .wait()
            .map_err(|e| (String::new(), format!("waiting for backflow: {e}")))?;
        let text = output
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_iter()
            .collect::<Vec<_>>()
            .join("\n");
        if status.success() {
            Ok(text)
        } else {
            let why = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output")
                .to_owned();
            Err((text, format!("{} failed ({status}): {why}", task.kind)))
        }
    })();
    let (output, error) = match result {
        Ok(text) => (text, None),
        Err((text, e)) => (text, Some(e)),
    };
    let record = ActionRecord {
        kind: task.kind.clone(),
        job: None,
        snapshot: Some(task.snapshot.clone()),
        vm: Some(task.vm.clone()),
        target: task.target.clone(),
        seconds: started.elapsed().as_secs_f64(),
        output: output.clone(),
        error: error.clone(),
    };
    let session = record_action(data, location, &task.requested_by, record).ok();
    tasks.update(task.id, |t| {
        t.ended = Some(backflow_jobs::run::now());
        t.state = if error.is_none() {
            "succeeded"
        } else {
            "failed"
        }
        .into();
        t.output = output;
        t.error = error;
        t.session = session;
    });
    tracing::info!(task = task.id, kind = %task.kind, snapshot = %task.snapshot, by = %task.requested_by, "Task ended.");
}

/// Records `action`, asked by `who`, as a session of job [`ACTION_JOB`] in the repository at
/// `location`; returns the session's id.
pub fn record_action(
    data: &Data,
    location: &Location,
    who: &str,
    action: ActionRecord,
) -> Result<String, ApiError> {
    let ended = backflow_jobs::run::now();
    let started = ended - action.seconds.round() as i64;
    let result = if action.error.is_some() {
        Verdict::Failure
    } else {
        Verdict::Success
    };
    let record = SessionRecord {
        id: Repository::new_session_id(started),
        job: ACTION_JOB.into(),
        started,
        ended,
        result,
        vms: Vec::new(),
        error: action.error.clone(),
        notified: None,
        health_check: None,
        gc: None,
        copy: None,
        verify_boot: None,
        requested_by: Some(who.to_owned()),
        action: Some(action),
    };
    let repo = data
        .repository(location)
        .map_err(|e| ApiError::internal(format!("recording the action in {location}: {e}")))?;
    repo.record_session(
        &record.id,
        &serde_json::to_value(&record).expect("a session record serialises"),
    )
    .map_err(|e| ApiError::internal(format!("recording the action in {location}: {e}")))?;
    data.invalidate(location);
    Ok(record.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("name", "web1-restore.2").is_ok());
        for bad in ["", "../x", "a/b", "-x", ".x", &"a".repeat(65), "a b"] {
            assert!(check_name("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_restore_goes_into_its_own_directory() {
        let action = Action::restore(RestoreRequest {
            name: "r1".into(),
            disk: Some("vda".into()),
            format: None,
        })
        .unwrap();
        let task = TaskInfo {
            id: 1,
            kind: "restore".into(),
            snapshot: "S".into(),
            vm: "v".into(),
            repository: "/r".into(),
            target: None,
            requested_by: "local".into(),
            started: 0,
            ended: None,
            state: "running".into(),
            output: String::new(),
            error: None,
            session: None,
        };
        let args = arguments(&action, &task, "/r", std::path::Path::new("/restores"));
        assert_eq!(
            args.join(" "),
            "restore --repo /r --snapshot S --to /restores/r1 --format raw --disk vda --quiet"
        );
        assert!(
            Action::restore(RestoreRequest {
                name: "r1".into(),
                disk: Some("../vda".into()),
                format: None,
            })
            .is_err()
        );
    }
}
