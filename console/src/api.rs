//! The JSON endpoints, under `/api/`, and their OpenAPI document (`/api/openapi.json`, generated
//! from the handlers' annotations by utoipa, so it cannot drift from the code).
//!
//! Every error is JSON, `{"error": {"code": "...", "message": "..."}}`, with the status: 400 bad
//! input (`bad_request`), 401 no valid token (`unauthorized`), 403 a read-only token asking to
//! change something (`forbidden`) or a browser request without its CSRF header (`csrf`), 404
//! (`not_found`), 409 (`conflict`: a job already running, a restore target that exists), 500
//! (`internal`). No response ever holds a secret: job files' passwords and key files are
//! never shown, only that they are set.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use backflow_jobs::{JobKind, SessionRecord};
use backflow_pipeline::{LivePipelines, LiveRun, LiveStage};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::auth::{Caller, Sessions};
use crate::config::Token;
use crate::data::{Data, VmSummary};
use crate::tasks::{TaskInfo, Tasks};
use crate::{Control, ControlError, HttpOptions, JobState};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub control: Arc<dyn Control>,
    pub live: Arc<LivePipelines>,
    pub tokens: Arc<Vec<Token>>,
    pub sessions: Arc<Sessions>,
    pub data: Arc<Data>,
    pub tasks: Arc<Tasks>,
    pub options: Arc<HttpOptions>,
    /// Whether the console is served over TLS (cookies are then `Secure`).
    pub tls: bool,
}

impl AppState {
    pub fn new(
        options: HttpOptions,
        tokens: Vec<Token>,
        control: Arc<dyn Control>,
        live: Arc<LivePipelines>,
        tls: bool,
    ) -> AppState {
        AppState {
            control,
            live,
            tokens: Arc::new(tokens),
            sessions: Arc::new(Sessions::default()),
            data: Arc::new(Data::default()),
            tasks: Arc::new(Tasks::default()),
            options: Arc::new(options),
            tls,
        }
    }
}

/// An error as the API answers it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The body of every error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `bad_request`, `unauthorized`, `forbidden`, `csrf`, `bad_host`, `not_found`, `conflict`
    /// or `internal`.
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        match e {
            ControlError::UnknownJob(_) => ApiError::not_found(e.to_string()),
            ControlError::Running(_) | ControlError::Stopping => ApiError::conflict(e.to_string()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> ApiError {
        ApiError::bad_request(format!("the path: {e}"))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> ApiError {
        ApiError::bad_request(format!("the query: {e}"))
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Runs blocking reads off the request threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("a read failed: {e}")))
}

/// A JSON body, whose rejection is an [`ApiError`] (the extractor's own would be text).
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the JSON body: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Types

/// The service answers.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    pub version: String,
}

/// A job with its state.
#[derive(Serialize, ToSchema)]
pub struct JobInfo {
    pub name: String,
    /// `backup`, `health-check`, `gc`, `copy` or `verify-boot`.
    pub kind: String,
    pub repository: String,
    /// The cluster file of a cluster job.
    pub cluster: Option<String>,
    /// VM names or globs (backup jobs).
    pub vms: Vec<String>,
    /// Cron expressions, UTC.
    pub schedule: Vec<String>,
    /// The next three scheduled runs, unix seconds (none when disabled).
    pub next_runs: Vec<i64>,
    pub enabled: bool,
    pub running: bool,
    /// A run asked for and not started yet: who asked.
    pub requested_by: Option<String>,
    /// Whether its repository's passphrase comes from a file (never the file's content).
    pub encrypted_repository: bool,
    pub last_session: Option<SessionSummary>,
}

/// A session in a list.
#[derive(Clone, Serialize, ToSchema)]
pub struct SessionSummary {
    pub id: String,
    pub job: String,
    pub repository: String,
    /// Unix seconds.
    pub started: i64,
    pub ended: i64,
    /// `success`, `warning`, `cancelled` or `failure`.
    pub result: String,
    /// `schedule`, `token:NAME`, `local`; none for runs from the command line.
    pub requested_by: Option<String>,
    pub error: Option<String>,
    pub vms: usize,
    pub vms_failed: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// For an action's record: `verify`, `forget`, `restore`, `instant-restore`, `enable`,
    /// `disable`.
    pub action: Option<String>,
    /// `backup`, `health-check`, `gc`, `copy`, `verify-boot` or `action`.
    pub kind: String,
}

/// One VM's result in a session.
#[derive(Serialize, ToSchema)]
pub struct VmResult {
    pub vm: String,
    pub result: String,
    pub snapshot: Option<String>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
    pub error: Option<String>,
    pub bottleneck: Option<String>,
    /// In a cluster job: the host whose worker backed it up.
    pub worker_host: Option<String>,
}

/// A session with every VM's result and the whole record.
#[derive(Serialize, ToSchema)]
pub struct SessionDetail {
    pub session: SessionSummary,
    pub vms: Vec<VmResult>,
    /// The record as the repository stores it (health check, gc, copy, verify-boot and action
    /// details included).
    #[schema(value_type = Object)]
    pub record: serde_json::Value,
}

/// A restore point.
#[derive(Serialize, ToSchema)]
pub struct RestorePoint {
    pub id: String,
    pub vm: String,
    pub repository: String,
    /// Unix seconds.
    pub time: i64,
    pub time_utc: String,
    /// Its disks' sizes together.
    pub size: u64,
    pub hostname: String,
    pub source: String,
    pub disks: Vec<RestorePointDisk>,
}

#[derive(Serialize, ToSchema)]
pub struct RestorePointDisk {
    pub name: String,
    pub size: u64,
}

/// A repository.
#[derive(Serialize, ToSchema)]
pub struct RepositoryInfo {
    pub location: String,
    pub jobs: Vec<String>,
    pub snapshots: u64,
    /// The restore points' disks' sizes together.
    pub logical_bytes: u64,
    /// The pack files' size.
    pub stored_bytes: u64,
    pub packs: u64,
    pub chunks: u64,
    /// Logical over stored bytes.
    pub deduplication_ratio: f64,
    pub last_gc: Option<MaintenanceRun>,
    pub last_health_check: Option<MaintenanceRun>,
    /// Why it could not be read.
    pub error: Option<String>,
}

/// The last gc or health check of a repository.
#[derive(Serialize, ToSchema)]
pub struct MaintenanceRun {
    pub session: String,
    pub job: String,
    pub ended: i64,
    pub result: String,
    /// gc: bytes deleted; health check: damaged chunks.
    pub amount: u64,
    pub error: Option<String>,
}

/// A cluster of the jobs.
#[derive(Serialize, ToSchema)]
pub struct ClusterInfo {
    pub name: String,
    pub file: String,
    pub jobs: Vec<String>,
    pub hosts: Vec<HostInfo>,
    /// Why the cluster file could not be read.
    pub error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct HostInfo {
    pub name: String,
    pub address: String,
    pub uri: String,
    pub worker_enabled: bool,
    pub max_vms: u32,
}

/// What an action answers at once: the task that runs it.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    pub task: TaskInfo,
}

/// What enable, disable and run answer.
#[derive(Serialize, ToSchema)]
pub struct JobAction {
    pub job: String,
    /// `run`, `enable`, `disable`.
    pub action: String,
    pub requested_by: String,
}

/// A restore of a restore point's disks into the console's restore directory.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The directory to create under the daemon's restore directory (`--restore-dir`): letters,
    /// digits, `.`, `_`, `-`; it must not exist.
    #[schema(
        pattern = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub name: String,
    /// Only this disk.
    #[serde(default)]
    #[schema(
        pattern = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$",
        min_length = 1,
        max_length = 128
    )]
    pub disk: Option<String>,
    /// The images' format (default raw).
    #[serde(default)]
    pub format: Option<ImageFormat>,
}

/// A restored image's format.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

/// An instant recovery: the restore point running as a new VM.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstantRestoreRequest {
    /// The new domain's name.
    #[schema(
        pattern = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub name: String,
    /// Without network interfaces.
    #[serde(default)]
    pub no_network: bool,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionQuery {
    /// Only this job's sessions.
    pub job: Option<String>,
    /// At most this many, newest first (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PointQuery {
    /// Only this VM's restore points.
    pub vm: Option<String>,
    /// Only in this repository (as the jobs name it).
    pub repository: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RepoQuery {
    /// The repository (as the jobs name it), when the id could be in several.
    pub repository: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The document

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Backflow",
        description = "The Backflow daemon's API: jobs, sessions, VMs, restore points, repositories, clusters and running pipelines. Every endpoint but /api/health needs a token (`Authorization: Bearer SECRET`) unless the daemon listens on loopback without tokens.",
    ),
    paths(
        health, openapi_json, list_jobs, get_job, run_job, enable_job, disable_job, list_sessions,
        get_session, list_vms, list_restore_points, get_restore_point, verify_point, forget_point,
        restore_point, instant_restore_point, list_tasks, get_task, list_repositories,
        list_clusters, list_pipelines, get_pipeline, pipeline_events, crate::metrics::metrics,
    ),
    components(schemas(
        ErrorBody, ErrorDetail, Health, JobInfo, SessionSummary, SessionDetail, VmResult,
        RestorePoint, RestorePointDisk, RepositoryInfo, MaintenanceRun, ClusterInfo, HostInfo,
        Accepted, JobAction, RestoreRequest, InstantRestoreRequest, TaskInfo, VmSummary, LiveRun,
        LiveStage,
    )),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes: the API, `/metrics`, the console's pages; every one behind [`crate::auth`].
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/health", get(health))
        .route("/api/openapi.json", get(openapi_json))
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{name}", get(get_job))
        .route("/api/jobs/{name}/run", post(run_job))
        .route("/api/jobs/{name}/enable", post(enable_job))
        .route("/api/jobs/{name}/disable", post(disable_job))
        .route("/api/sessions", get(list_sessions))
        .route("/api/sessions/{id}", get(get_session))
        .route("/api/vms", get(list_vms))
        .route("/api/restore-points", get(list_restore_points))
        .route("/api/restore-points/{id}", get(get_restore_point))
        .route("/api/restore-points/{id}/verify", post(verify_point))
        .route("/api/restore-points/{id}/forget", post(forget_point))
        .route("/api/restore-points/{id}/restore", post(restore_point))
        .route(
            "/api/restore-points/{id}/instant-restore",
            post(instant_restore_point),
        )
        .route("/api/tasks", get(list_tasks))
        .route("/api/tasks/{id}", get(get_task))
        .route("/api/repositories", get(list_repositories))
        .route("/api/clusters", get(list_clusters))
        .route("/api/pipelines", get(list_pipelines))
        .route("/api/pipelines/events", get(pipeline_events))
        .route("/api/pipelines/{id}", get(get_pipeline))
        .route("/metrics", get(crate::metrics::metrics));
    api.merge(crate::web::routes())
        .fallback(|| async { ApiError::not_found("no such page or endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::authenticate,
        ))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Handlers

/// Whether the daemon answers; needs no token.
#[utoipa::path(get, path = "/api/health", security(()), responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", responses(
    (status = 200, description = "The OpenAPI 3.1 document", body = Object),
    (status = 401, body = ErrorBody),
))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

fn kind_name(job: &backflow_jobs::Job) -> &'static str {
    match job.kind() {
        JobKind::Backup { .. } => "backup",
        JobKind::HealthCheck(_) => "health-check",
        JobKind::Gc(_) => "gc",
        JobKind::Copy(_) => "copy",
        JobKind::VerifyBoot(_) => "verify-boot",
    }
}

pub fn session_summary(repository: &str, s: &SessionRecord) -> SessionSummary {
    let kind = if s.action.is_some() {
        "action"
    } else if s.health_check.is_some() {
        "health-check"
    } else if s.gc.is_some() {
        "gc"
    } else if s.copy.is_some() {
        "copy"
    } else if s.verify_boot.is_some() {
        "verify-boot"
    } else {
        "backup"
    };
    SessionSummary {
        id: s.id.clone(),
        job: s.job.clone(),
        repository: repository.to_owned(),
        started: s.started,
        ended: s.ended,
        result: s.result.to_string(),
        requested_by: s.requested_by.clone(),
        error: s
            .error
            .clone()
            .or_else(|| s.action.as_ref().and_then(|a| a.error.clone())),
        vms: s.vms.len(),
        vms_failed: s
            .vms
            .iter()
            .filter(|v| v.result == backflow_jobs::Verdict::Failure)
            .count(),
        bytes_read: s.vms.iter().map(|v| v.bytes_read).sum(),
        bytes_written: s.vms.iter().map(|v| v.bytes_written).sum(),
        action: s.action.as_ref().map(|a| a.kind.clone()),
        kind: kind.into(),
    }
}

fn job_info(state: &JobState, data: &Data) -> JobInfo {
    let job = &state.job;
    let view = data.view(&job.repository);
    let last = view
        .sessions
        .iter()
        .rev()
        .find(|s| s.job == job.name.0 && s.action.is_none())
        .map(|s| session_summary(&view.location, s));
    let next_runs = match state.next_run {
        Some(first) => {
            let mut runs = vec![first];
            for s in &job.schedule {
                runs.extend(backflow_jobs::schedule::next_times(s, first, 3));
            }
            runs.sort();
            runs.dedup();
            runs.truncate(3);
            runs
        }
        None => Vec::new(),
    };
    JobInfo {
        name: job.name.0.clone(),
        kind: kind_name(job).into(),
        repository: job.repository.to_string(),
        cluster: job.cluster.as_ref().map(|p| p.display().to_string()),
        vms: job.vms.iter().map(|p| p.0.clone()).collect(),
        schedule: job.schedule.iter().map(|s| s.text.clone()).collect(),
        next_runs,
        enabled: state.enabled,
        running: state.running,
        requested_by: state.requested_by.clone(),
        encrypted_repository: job.password_file.is_some(),
        last_session: last,
    }
}

/// Every job, with its state and last session.
#[utoipa::path(get, path = "/api/jobs", responses(
    (status = 200, body = Vec<JobInfo>), (status = 401, body = ErrorBody),
))]
pub async fn list_jobs(State(state): State<AppState>) -> ApiResult<Vec<JobInfo>> {
    let jobs = state.control.jobs();
    let data = Arc::clone(&state.data);
    blocking(move || Json(jobs.iter().map(|j| job_info(j, &data)).collect())).await
}

fn find_job(state: &AppState, name: &str) -> Result<JobState, ApiError> {
    state
        .control
        .jobs()
        .into_iter()
        .find(|j| j.job.name.0 == name)
        .ok_or_else(|| ApiError::not_found(format!("no job named {name}")))
}

/// One job.
#[utoipa::path(get, path = "/api/jobs/{name}", params(("name" = String, Path, description = "The job's name")), responses(
    (status = 200, body = JobInfo), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn get_job(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<JobInfo> {
    let Path(name) = name?;
    let job = find_job(&state, &name)?;
    let data = Arc::clone(&state.data);
    blocking(move || Json(job_info(&job, &data))).await
}

/// Runs the job now (it starts within a second, or when its VMs are free). Operator.
#[utoipa::path(post, path = "/api/jobs/{name}/run", params(("name" = String, Path, description = "The job's name")), responses(
    (status = 202, body = JobAction), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
))]
pub async fn run_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<JobAction>), ApiError> {
    let Path(name) = name?;
    caller.operator("run jobs")?;
    let who = caller.who();
    state.control.run_now(&name, &who)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(JobAction {
            job: name,
            action: "run".into(),
            requested_by: who,
        }),
    ))
}

async fn set_enabled(
    state: AppState,
    caller: Caller,
    name: String,
    enabled: bool,
) -> ApiResult<JobAction> {
    let action = if enabled { "enable" } else { "disable" };
    caller.operator(&format!("{action} jobs"))?;
    let who = caller.who();
    let job = find_job(&state, &name)?;
    state.control.set_enabled(&name, enabled, &who)?;
    let data = Arc::clone(&state.data);
    let (who2, action2) = (who.clone(), action.to_owned());
    // Recorded in the job's repository with who asked; a repository that cannot be written
    // does not undo the change (the daemon's log has it too).
    let recorded = blocking(move || {
        crate::tasks::record_action(
            &data,
            &job.job.repository,
            &who2,
            backflow_jobs::ActionRecord {
                kind: action2,
                job: Some(job.job.name.0.clone()),
                snapshot: None,
                vm: None,
                target: None,
                seconds: 0.0,
                output: String::new(),
                error: None,
            },
        )
    })
    .await?;
    if let Err(e) = recorded {
        tracing::warn!(job = %name, error = %e.message, "The change was made but not recorded.");
    }
    Ok(Json(JobAction {
        job: name,
        action: action.into(),
        requested_by: who,
    }))
}

/// Enables the job's schedule. Operator.
#[utoipa::path(post, path = "/api/jobs/{name}/enable", params(("name" = String, Path, description = "The job's name")), responses(
    (status = 200, body = JobAction), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn enable_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<JobAction> {
    let Path(name) = name?;
    set_enabled(state, caller, name, true).await
}

/// Disables the job's schedule (asking still runs it). Operator.
#[utoipa::path(post, path = "/api/jobs/{name}/disable", params(("name" = String, Path, description = "The job's name")), responses(
    (status = 200, body = JobAction), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn disable_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<JobAction> {
    let Path(name) = name?;
    set_enabled(state, caller, name, false).await
}

/// Sessions of every repository, newest first.
#[utoipa::path(get, path = "/api/sessions", params(SessionQuery), responses(
    (status = 200, body = Vec<SessionSummary>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
))]
pub async fn list_sessions(
    State(state): State<AppState>,
    query: Result<Query<SessionQuery>, QueryRejection>,
) -> ApiResult<Vec<SessionSummary>> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(100) as usize;
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit: expected 1 to 1000"));
    }
    let jobs = state.control.jobs();
    let data = Arc::clone(&state.data);
    blocking(move || {
        let views = crate::data::views(&jobs, &data);
        Json(
            crate::data::newest_first(&views)
                .into_iter()
                .filter(|(_, s)| query.job.as_ref().is_none_or(|j| &s.job == j))
                .take(limit)
                .map(|(repo, s)| session_summary(repo, s))
                .collect(),
        )
    })
    .await
}

/// One session, with every VM's result.
#[utoipa::path(get, path = "/api/sessions/{id}", params(("id" = String, Path, description = "The session's id")), responses(
    (status = 200, body = SessionDetail), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn get_session(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<SessionDetail> {
    let Path(id) = id?;
    let jobs = state.control.jobs();
    let data = Arc::clone(&state.data);
    blocking(move || {
        let views = crate::data::views(&jobs, &data);
        let (repo, s) = views
            .iter()
            .find_map(|v| {
                v.sessions
                    .iter()
                    .find(|s| s.id == id)
                    .map(|s| (v.location.as_str(), s))
            })
            .ok_or_else(|| ApiError::not_found(format!("no session {id}")))?;
        Ok(Json(SessionDetail {
            session: session_summary(repo, s),
            vms: s
                .vms
                .iter()
                .map(|v| VmResult {
                    vm: v.vm.clone(),
                    result: v.result.to_string(),
                    snapshot: v.snapshot.clone(),
                    bytes_read: v.bytes_read,
                    bytes_written: v.bytes_written,
                    seconds: v.seconds,
                    warnings: v.warnings.clone(),
                    notes: v.notes.clone(),
                    error: v.error.clone(),
                    bottleneck: v.bottleneck.clone(),
                    worker_host: v.placement.as_ref().map(|p| p.worker_host.clone()),
                })
                .collect(),
            record: serde_json::to_value(s).unwrap_or_default(),
        }))
    })
    .await?
}

/// Every VM of every backup job, with its last backup.
#[utoipa::path(get, path = "/api/vms", responses(
    (status = 200, body = Vec<VmSummary>), (status = 401, body = ErrorBody),
))]
pub async fn list_vms(State(state): State<AppState>) -> ApiResult<Vec<VmSummary>> {
    let jobs = state.control.jobs();
    let data = Arc::clone(&state.data);
    blocking(move || Json(crate::data::vms(&jobs, &data))).await
}

fn points(
    jobs: &[JobState],
    data: &Data,
    vm: Option<&str>,
    repository: Option<&str>,
) -> Vec<RestorePoint> {
    let mut out = Vec::new();
    for location in crate::data::repositories(jobs) {
        let name = location.to_string();
        if repository.is_some_and(|r| r != name) {
            continue;
        }
        let view = data.view(&location);
        for s in view.snapshots.iter().rev() {
            if vm.is_some_and(|vm| vm != s.vm) {
                continue;
            }
            out.push(RestorePoint {
                id: s.id.clone(),
                vm: s.vm.clone(),
                repository: name.clone(),
                time: s.time,
                time_utc: s.time_utc.clone(),
                size: s.size,
                hostname: s.hostname.clone(),
                source: s.source.clone(),
                disks: s
                    .disks
                    .iter()
                    .map(|d| RestorePointDisk {
                        name: d.name.clone(),
                        size: d.size,
                    })
                    .collect(),
            });
        }
    }
    out
}

/// Restore points of every repository, newest first.
#[utoipa::path(get, path = "/api/restore-points", params(PointQuery), responses(
    (status = 200, body = Vec<RestorePoint>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
))]
pub async fn list_restore_points(
    State(state): State<AppState>,
    query: Result<Query<PointQuery>, QueryRejection>,
) -> ApiResult<Vec<RestorePoint>> {
    let Query(query) = query?;
    let jobs = state.control.jobs();
    let data = Arc::clone(&state.data);
    blocking(move || {
        Json(points(
            &jobs,
            &data,
            query.vm.as_deref(),
            query.repository.as_deref(),
        ))
    })
    .await
}

/// The one restore point `id` names (exactly), in `repository` when given.
pub fn find_point(
    state: &AppState,
    id: &str,
    repository: Option<&str>,
) -> Result<RestorePoint, ApiError> {
    let jobs = state.control.jobs();
    let mut found: Vec<RestorePoint> = points(&jobs, &state.data, None, repository)
        .into_iter()
        .filter(|p| p.id == id)
        .collect();
    match found.len() {
        0 => Err(ApiError::not_found(format!("no restore point {id}"))),
        1 => Ok(found.remove(0)),
        _ => Err(ApiError::bad_request(format!(
            "restore point {id} is in several repositories: say which with ?repository="
        ))),
    }
}

/// One restore point.
#[utoipa::path(get, path = "/api/restore-points/{id}", params(("id" = String, Path, description = "The restore point's id"), RepoQuery), responses(
    (status = 200, body = RestorePoint), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn get_restore_point(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<RepoQuery>, QueryRejection>,
) -> ApiResult<RestorePoint> {
    let (Path(id), Query(query)) = (id?, query?);
    blocking(move || find_point(&state, &id, query.repository.as_deref()).map(Json)).await?
}

/// Reads every chunk of the restore point and checks it against its digest (a task). Operator.
#[utoipa::path(post, path = "/api/restore-points/{id}/verify", params(("id" = String, Path, description = "The restore point's id"), RepoQuery), responses(
    (status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn verify_point(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<RepoQuery>, QueryRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let (Path(id), Query(query)) = (id?, query?);
    caller.operator("verify restore points")?;
    crate::tasks::start(
        state,
        caller,
        id,
        query.repository,
        crate::tasks::Action::Verify,
    )
    .await
}

/// Forgets the restore point (its chunks go at the next gc). Operator.
#[utoipa::path(post, path = "/api/restore-points/{id}/forget", params(("id" = String, Path, description = "The restore point's id"), RepoQuery), responses(
    (status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn forget_point(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<RepoQuery>, QueryRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let (Path(id), Query(query)) = (id?, query?);
    caller.operator("forget restore points")?;
    crate::tasks::start(
        state,
        caller,
        id,
        query.repository,
        crate::tasks::Action::Forget,
    )
    .await
}

/// Restores the restore point's disks into a new directory of the restore directory. Operator.
#[utoipa::path(post, path = "/api/restore-points/{id}/restore", params(("id" = String, Path, description = "The restore point's id"), RepoQuery), request_body = RestoreRequest, responses(
    (status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
))]
pub async fn restore_point(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<RepoQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let (Path(id), Query(query)) = (id?, query?);
    caller.operator("restore")?;
    let request: RestoreRequest = json_body(&body)?;
    let action = crate::tasks::Action::restore(request)?;
    crate::tasks::start(state, caller, id, query.repository, action).await
}

/// Starts the restore point as a new VM running from the repository (instant recovery). Operator.
#[utoipa::path(post, path = "/api/restore-points/{id}/instant-restore", params(("id" = String, Path, description = "The restore point's id"), RepoQuery), request_body = InstantRestoreRequest, responses(
    (status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn instant_restore_point(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<RepoQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let (Path(id), Query(query)) = (id?, query?);
    caller.operator("restore")?;
    let request: InstantRestoreRequest = json_body(&body)?;
    let action = crate::tasks::Action::instant(request)?;
    crate::tasks::start(state, caller, id, query.repository, action).await
}

/// Actions asked for since the daemon started, newest first.
#[utoipa::path(get, path = "/api/tasks", responses(
    (status = 200, body = Vec<TaskInfo>), (status = 401, body = ErrorBody),
))]
pub async fn list_tasks(State(state): State<AppState>) -> Json<Vec<TaskInfo>> {
    Json(state.tasks.list())
}

/// One task.
#[utoipa::path(get, path = "/api/tasks/{id}", params(("id" = u64, Path, description = "The task's id")), responses(
    (status = 200, body = TaskInfo), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn get_task(
    State(state): State<AppState>,
    id: Result<Path<u64>, PathRejection>,
) -> ApiResult<TaskInfo> {
    let Path(id) = id?;
    state
        .tasks
        .get(id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))
}

/// The jobs' repositories: usage, deduplication, last gc and health check.
#[utoipa::path(get, path = "/api/repositories", responses(
    (status = 200, body = Vec<RepositoryInfo>), (status = 401, body = ErrorBody),
))]
pub async fn list_repositories(State(state): State<AppState>) -> ApiResult<Vec<RepositoryInfo>> {
    let jobs = state.control.jobs();
    let data = Arc::clone(&state.data);
    blocking(move || Json(repositories(&jobs, &data))).await
}

/// What a maintenance record says: an amount and an error.
type Pick = dyn Fn(&SessionRecord) -> Option<(u64, Option<String>)>;

/// Each repository's usage and maintenance (also what `/metrics` shows).
pub fn repositories(jobs: &[JobState], data: &Data) -> Vec<RepositoryInfo> {
    crate::data::repositories(jobs)
        .into_iter()
        .map(|location| {
            let name = location.to_string();
            let view = data.view(&location);
            let usage = data.usage(&location);
            let last = |pick: &Pick| {
                view.sessions.iter().rev().find_map(|s| {
                    pick(s).map(|(amount, error)| MaintenanceRun {
                        session: s.id.clone(),
                        job: s.job.clone(),
                        ended: s.ended,
                        result: s.result.to_string(),
                        amount,
                        error,
                    })
                })
            };
            let last_gc = last(&|s| {
                s.gc.as_ref().map(|g| {
                    (
                        g.report.as_ref().map_or(0, |r| r.bytes_deleted),
                        g.error.clone(),
                    )
                })
            });
            let last_health_check = last(&|s| {
                s.health_check
                    .as_ref()
                    .map(|h| (h.damaged_chunks, h.error.clone()))
            });
            let u = usage.as_ref().ok().copied().unwrap_or_default();
            RepositoryInfo {
                jobs: jobs
                    .iter()
                    .filter(|j| j.job.repository.to_string() == name)
                    .map(|j| j.job.name.0.clone())
                    .collect(),
                location: name,
                snapshots: u.snapshots,
                logical_bytes: u.logical_bytes,
                stored_bytes: u.stored_bytes,
                packs: u.packs,
                chunks: u.chunks,
                deduplication_ratio: u.deduplication_ratio(),
                last_gc,
                last_health_check,
                error: view.error.clone().or(usage.err()),
            }
        })
        .collect()
}

/// The clusters of the jobs, with their hosts.
#[utoipa::path(get, path = "/api/clusters", responses(
    (status = 200, body = Vec<ClusterInfo>), (status = 401, body = ErrorBody),
))]
pub async fn list_clusters(State(state): State<AppState>) -> ApiResult<Vec<ClusterInfo>> {
    let jobs = state.control.jobs();
    blocking(move || {
        let mut out: Vec<ClusterInfo> = Vec::new();
        for j in &jobs {
            let Some(file) = &j.job.cluster else { continue };
            let shown = file.display().to_string();
            if let Some(c) = out.iter_mut().find(|c| c.file == shown) {
                c.jobs.push(j.job.name.0.clone());
                continue;
            }
            let info = match backflow_cluster::file::load(file) {
                Ok(cluster) => ClusterInfo {
                    name: cluster.name.clone(),
                    file: shown,
                    jobs: vec![j.job.name.0.clone()],
                    hosts: cluster
                        .hosts
                        .iter()
                        .map(|h| HostInfo {
                            name: h.name.clone(),
                            address: h.address.in_uri(),
                            uri: h.uri.clone(),
                            worker_enabled: h.worker.enabled,
                            max_vms: h.worker.max_vms,
                        })
                        .collect(),
                    error: None,
                },
                Err(e) => ClusterInfo {
                    name: String::new(),
                    file: shown,
                    jobs: vec![j.job.name.0.clone()],
                    hosts: Vec::new(),
                    error: Some(e.to_string()),
                },
            };
            out.push(info);
        }
        Json(out)
    })
    .await
}

/// Pipelines running now, and those that ended in the last ten minutes.
#[utoipa::path(get, path = "/api/pipelines", responses(
    (status = 200, body = Vec<LiveRun>), (status = 401, body = ErrorBody),
))]
pub async fn list_pipelines(State(state): State<AppState>) -> Json<Vec<LiveRun>> {
    Json(state.live.list())
}

/// One pipeline run.
#[utoipa::path(get, path = "/api/pipelines/{id}", params(("id" = u64, Path, description = "The run's id")), responses(
    (status = 200, body = LiveRun), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn get_pipeline(
    State(state): State<AppState>,
    id: Result<Path<u64>, PathRejection>,
) -> ApiResult<LiveRun> {
    let Path(id) = id?;
    state
        .live
        .get(id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no pipeline run {id}")))
}

/// Server-sent events: the list of pipeline runs (as `/api/pipelines` answers it), sent at once
/// and again at every change, at most twice a second (event `pipelines`).
#[utoipa::path(get, path = "/api/pipelines/events", responses(
    (status = 200, description = "text/event-stream of `pipelines` events, each data a JSON array of runs", content_type = "text/event-stream", body = String),
    (status = 401, body = ErrorBody),
))]
pub async fn pipeline_events(State(state): State<AppState>) -> impl IntoResponse {
    let live = Arc::clone(&state.live);
    let stream = futures_util::stream::unfold((live, None::<u64>), |(live, seen)| async move {
        loop {
            let version = live.version();
            if seen != Some(version) {
                let data = serde_json::to_string(&live.list()).unwrap_or_else(|_| "[]".into());
                let event = Event::default().event("pipelines").data(data);
                return Some((
                    Ok::<_, std::convert::Infallible>(event),
                    (live, Some(version)),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
