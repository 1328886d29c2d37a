//! A backup job over a cluster (`cluster:` in the job file): the controller's side.
//!
//! 1. The cluster's hosts are checked (libvirt and the worker access, at once) and their VMs
//!    found ([`backflow_cluster::discover()`]): each VM on the host where it runs (or, shut off,
//!    where it is defined), once.
//! 2. The job's patterns select VMs across all hosts. A VM the job backed up before whose host
//!    does not answer now is reported failed, naming the host; the others go on.
//! 3. Each VM is placed ([`crate::placement`]) and a worker is started for it over SSH on the
//!    chosen host (`backflow worker`, [`crate::worker`]), which gets the VM's task on stdin: on its
//!    own host the disks are read through a unix socket; from another host, the VM's host serves
//!    them over NBD on TCP with TLS (the cluster file's `tls` files). VMs run in parallel, each
//!    worker within its `max_vms`.
//! 4. A worker that ends without the VM's record (it died, or its host dropped off the network)
//!    fails that attempt; the VM is tried once more on another host's worker. What each attempt
//!    came to is in the VM's record ([`VmRecord::attempts`]), with where it ran and why
//!    ([`VmRecord::placement`]).
//! 5. The job's retention runs once, after every VM.
//!
//! Cancelling the session (SIGTERM to the daemon or to `job run`) closes every worker's stdin:
//! each ends its backup job, cleans up and sends its (cancelled) record.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use backflow_cluster::{ClusterVm, Host, WorkerCheck};
use backflow_libvirt::VmInfo;
use backflow_pipeline::CancelToken;
use backflow_pipeline::spec::Override;

use crate::placement::{DEFAULT_WAIT, Decision, Placement, Placer, Transport, WorkerState};
use crate::run::{SharedRepo, Source, Verdict, VmRecord, inputs, record_for};
use crate::select::select;
use crate::worker::{Event, PROTOCOL, Task};
use crate::{Job, JobError};

/// How long ssh may take to connect to a worker's host.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The first TCP port a VM's host serves its export on for a worker of another host; each VM of
/// the session gets its own (two VMs of one host may be read from elsewhere at once).
pub const FIRST_TLS_PORT: u16 = 10810;

/// How often the placement loop looks again.
const TICK: Duration = Duration::from_millis(100);

/// How often the controller writes a heartbeat line to each worker ([`Task::heartbeat`]).
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Attempts per VM: the first, and one retry on another worker.
const ATTEMPTS: usize = 2;

/// What one attempt came to.
enum Attempt {
    /// The worker sent the VM's record.
    Record(Box<VmRecord>),
    /// No record: the worker could not be started, died, or its host dropped off the network.
    Lost(String),
}

/// One VM to back up: its selection, and where it is.
struct Pending {
    index: usize,
    source: Source,
    vm: ClusterVm,
    since: Instant,
    failed_on: Vec<String>,
    attempts: Vec<String>,
}

/// Backs up the job's VMs on the cluster; the records in selection order (VMs of unreachable hosts
/// first). `only`: just this VM.
pub(crate) fn run_cluster(
    job: &Job,
    cluster_file: &Path,
    only: Option<&str>,
    cancel: &CancelToken,
    repo: &SharedRepo,
) -> Result<Vec<VmRecord>, JobError> {
    let failed = |detail: String| JobError::Cluster {
        job: job.name.0.clone(),
        detail,
    };
    let cluster = backflow_cluster::load(cluster_file).map_err(|e| failed(e.to_string()))?;
    let tls = cluster.tls.clone();
    let checks = backflow_cluster::check(
        &cluster,
        env!("CARGO_PKG_VERSION"),
        backflow_cluster::DEFAULT_TIMEOUT,
    );
    let discovery = backflow_cluster::discover(&cluster);
    let listing = listing(&discovery);

    let mut records = Vec::new();
    // VMs whose host is down: those the job backed up before (the repository knows their names)
    // and the exact names of `vms`, when no reachable host has them.
    let unreachable: Vec<String> = discovery
        .unreachable
        .iter()
        .map(|u| format!("{}: {}", u.host, u.error))
        .collect();
    let mut job = job.clone();
    if !unreachable.is_empty() {
        let mut missing: Vec<String> = job
            .vms
            .iter()
            .filter(|p| !p.is_glob())
            .map(|p| p.0.clone())
            .collect();
        if let Ok(r) = crate::run::open(&job, repo)
            && let Ok(known) = r.list_snapshots()
        {
            missing.extend(
                known
                    .into_iter()
                    .map(|s| s.vm)
                    .filter(|vm| job.vms.iter().any(|p| p.matches(vm))),
            );
        }
        missing.sort();
        missing.dedup();
        missing.retain(|name| !listing.iter().any(|vm| &vm.name == name));
        missing.retain(|name| !job.exclude.iter().any(|p| p.matches(name)));
        for name in missing {
            let mut record = record_for(&name);
            record.result = Verdict::Failure;
            record.error = Some(format!(
                "not found on any host that answered; unreachable: {}",
                unreachable.join("; ")
            ));
            records.push(record);
        }
        // What is reported above is not asked for again.
        job.vms
            .retain(|p| p.is_glob() || listing.iter().any(|vm| vm.name == p.0));
    }
    for conflict in &discovery.conflicts {
        let mut record = record_for(&conflict.names.join(", "));
        record.result = Verdict::Failure;
        record.error = Some(format!(
            "VM {} (UUID {}) runs on {} hosts at once ({}): not backed up",
            conflict.names.join(", "),
            conflict.uuid,
            conflict.running_on.len(),
            conflict.running_on.join(", ")
        ));
        records.push(record);
    }
    let mut selected = if job.vms.is_empty() {
        Vec::new()
    } else {
        select(&job, &listing)?
    };
    if let Some(only) = only {
        selected.retain(|s| s.vm == only);
        if selected.is_empty() && records.iter().all(|r| r.vm != only) {
            return Err(JobError::NotInJob {
                job: job.name.0.clone(),
                name: only.to_owned(),
            });
        }
        records.retain(|r| r.vm == only);
    }

    let workers = cluster.hosts.iter().zip(&checks).map(|(host, check)| {
        let usable = if !host.worker.enabled {
            Err("is disabled in the cluster file".to_owned())
        } else {
            match (&check.libvirt, &check.worker) {
                (Err(e), _) => Err(format!("is unreachable (libvirt: {e})")),
                (_, WorkerCheck::Failed(e)) => Err(format!("cannot be started ({e})")),
                (_, WorkerCheck::Disabled) => Err("is disabled in the cluster file".to_owned()),
                (Ok(_), WorkerCheck::Ok { .. }) => Ok(()),
            }
        };
        WorkerState {
            host: host.name.clone(),
            usable,
            max_vms: host.worker.max_vms,
            running: 0,
        }
    });
    let mut placer = Placer::new(workers, DEFAULT_WAIT);
    let mut pending: VecDeque<Pending> = selected
        .into_iter()
        .enumerate()
        .filter_map(|(index, s)| {
            let vm = discovery.vms.iter().find(|v| v.name == s.vm)?.clone();
            Some(Pending {
                index,
                source: Source::Vm(s),
                vm,
                since: Instant::now(),
                failed_on: Vec::new(),
                attempts: Vec::new(),
            })
        })
        .collect();
    let total = pending.len();
    let mut done: Vec<(usize, VmRecord)> = Vec::new();
    let (tx, rx) = mpsc::channel::<(Pending, Placement, Attempt)>();
    std::thread::scope(|scope| {
        let mut running = 0;
        while done.len() < total {
            // Place what can start now, in selection order.
            let mut waiting = VecDeque::new();
            while let Some(p) = pending.pop_front() {
                if cancel.is_cancelled() {
                    let mut record = crate::run::skipped(&p.source);
                    record.attempts = p.attempts;
                    done.push((p.index, record));
                    continue;
                }
                match placer.place(&p.vm.host, p.since.elapsed(), &p.failed_on) {
                    Decision::Start(placement) => {
                        let host = cluster
                            .host(&placement.worker_host)
                            .expect("placed on a host of the cluster")
                            .clone();
                        let vm_host = cluster.host(&p.vm.host).cloned();
                        let task = task_for(&job, &p, &placement, vm_host.as_ref(), tls.as_ref());
                        let tx = tx.clone();
                        let cancel = cancel.clone();
                        running += 1;
                        tracing::info!(vm = %p.vm.name, worker = %placement.worker_host,
                            transport = %placement.transport, reason = %placement.reason,
                            "Starting a worker.");
                        scope.spawn(move || {
                            let attempt = match task {
                                Ok(task) => attempt(&host, &task, &cancel),
                                Err(e) => Attempt::Lost(e),
                            };
                            let _ = tx.send((p, placement, attempt));
                        });
                    }
                    Decision::Wait => waiting.push_back(p),
                    Decision::Impossible(why) => {
                        let mut record = record_for(&p.vm.name);
                        record.result = Verdict::Failure;
                        record.error = Some(why);
                        record.attempts = p.attempts;
                        done.push((p.index, record));
                    }
                }
            }
            pending = waiting;
            if running == 0 && pending.is_empty() {
                break;
            }
            let Ok((mut p, placement, outcome)) = rx.recv_timeout(TICK) else {
                continue;
            };
            running -= 1;
            placer.release(&placement.worker_host);
            match outcome {
                Attempt::Record(mut record) => {
                    record.placement = Some(placement);
                    record.attempts = p.attempts;
                    done.push((p.index, *record));
                }
                Attempt::Lost(why) => {
                    let what = format!(
                        "attempt {} on {}'s worker ({}): {why}",
                        p.attempts.len() + 1,
                        placement.worker_host,
                        placement.transport
                    );
                    tracing::warn!(vm = %p.vm.name, "{what}");
                    p.attempts.push(what);
                    p.failed_on.push(placement.worker_host.clone());
                    // A retry reads the VM through its host's libvirt: a host that dropped off
                    // the network (with the worker that ran there, often) fails the VM now,
                    // rather than after another worker's connection attempts.
                    let vm_host = cluster.host(&p.vm.host).map(|h| {
                        backflow_cluster::reachable(&h.uri, backflow_cluster::DEFAULT_TIMEOUT)
                    });
                    if let Some(Err(e)) = vm_host
                        && p.attempts.len() < ATTEMPTS
                    {
                        p.attempts.push(format!(
                            "not retried: the VM's host {} does not answer ({e})",
                            p.vm.host
                        ));
                    }
                    if p.attempts.len() < ATTEMPTS && !cancel.is_cancelled() {
                        p.since = Instant::now();
                        pending.push_front(p);
                    } else {
                        let mut record = record_for(&p.vm.name);
                        record.result = if cancel.is_cancelled() {
                            Verdict::Cancelled
                        } else {
                            Verdict::Failure
                        };
                        record.error = p.attempts.last().cloned();
                        record.placement = Some(placement);
                        record.attempts = p.attempts;
                        done.push((p.index, record));
                    }
                }
            }
        }
    });
    done.sort_by_key(|(i, _)| *i);
    records.extend(done.into_iter().map(|(_, r)| r));
    // Retention once, after every VM (several workers wrote into the repository meanwhile).
    for record in &mut records {
        crate::run::apply_retention(&job, repo, record);
    }
    Ok(records)
}

/// The VMs found, as the job's selection takes a listing.
pub(crate) fn listing(discovery: &backflow_cluster::Discovery) -> Vec<VmInfo> {
    discovery
        .vms
        .iter()
        .map(|vm| VmInfo {
            name: vm.name.clone(),
            uuid: vm.uuid.clone(),
            state: vm.state,
            persistent: true,
            host: vm.host.clone(),
            disks: vm.disks.clone(),
            definition: vm.definition.clone(),
        })
        .collect()
}

/// The task of `p` on the worker `placement` chose.
fn task_for(
    job: &Job,
    p: &Pending,
    placement: &Placement,
    vm_host: Option<&Host>,
    tls: Option<&backflow_cluster::TlsFiles>,
) -> Result<Task, String> {
    let (mut variables, mut overrides) = inputs(job, &p.source);
    if !p.attempts.is_empty() {
        // A retry: the lost attempt's backup job may still hold the VM (its worker died before
        // its cleanup, or runs on where the network does not reach); this one takes over.
        overrides.push(Override {
            stage: "libvirt".into(),
            option: "take_over".into(),
            value: "true".into(),
        });
    }
    let mut set = |k: &str, v: String| {
        variables.retain(|(key, _)| key != k);
        variables.push((k.to_owned(), v));
    };
    match placement.transport {
        // The worker runs on the VM's host.
        Transport::Local => set("uri", "qemu:///system".into()),
        Transport::NbdTls => {
            let host =
                vm_host.ok_or_else(|| format!("{} is not in the cluster file", p.vm.host))?;
            let tls = tls.ok_or_else(|| {
                format!(
                    "the cluster file has no `tls` files: a worker of another host cannot read {}'s \
                     disks (NBD between hosts is always TLS)",
                    p.vm.host
                )
            })?;
            set("uri", host.uri.clone());
            set("transport", "tls".into());
            set("host", host.address.to_string());
            // Its own port per VM and attempt: a lost attempt's worker, cut off but alive, must
            // never take the retry's job for its own (a job is known by its endpoint).
            set(
                "port",
                (FIRST_TLS_PORT as usize + (p.index * ATTEMPTS + p.attempts.len()) % 1000)
                    .to_string(),
            );
            set("tls_ca", tls.ca.display().to_string());
            set("tls_cert", tls.cert.display().to_string());
            set("tls_key", tls.key.display().to_string());
        }
    }
    let (spec_name, spec) = match &job.spec {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path)
                .map_err(|e| format!("reading the spec {}: {e}", path.display()))?,
        ),
        None => {
            let (name, text) = p.source.built_in_spec();
            (format!("{name} (built in)"), text.to_owned())
        }
    };
    let password = match job
        .password_file
        .clone()
        .or_else(|| std::env::var_os("BACKFLOW_PASSWORD_FILE").map(Into::into))
    {
        Some(path) => Some(
            std::fs::read_to_string(&path)
                .map_err(|e| format!("reading the passphrase file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    Ok(Task {
        protocol: PROTOCOL,
        job: job.name.0.clone(),
        host: placement.worker_host.clone(),
        label: p.vm.name.clone(),
        spec_name,
        spec,
        variables,
        overrides: overrides
            .into_iter()
            .map(|o| (o.stage, o.option, o.value))
            .collect(),
        env: std::env::vars()
            .filter(|(k, _)| Task::allowed_env(k))
            .collect(),
        password,
        heartbeat: Some(HEARTBEAT.as_secs()),
    })
}

/// Runs `task` on `host`'s worker: the record, or why there is none.
fn attempt(host: &Host, task: &Task, cancel: &CancelToken) -> Attempt {
    let mut cmd = host.ssh_command(CONNECT_TIMEOUT, &[&host.backflow, "worker"]);
    let mut child = match cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Attempt::Lost(format!("cannot run ssh: {e}")),
    };
    let stdin = Arc::new(Mutex::new(child.stdin.take()));
    let mut line = serde_json::to_string(task).expect("a task serialises");
    line.push('\n');
    if let Some(input) = stdin.lock().unwrap_or_else(|e| e.into_inner()).as_mut()
        && let Err(e) = input.write_all(line.as_bytes())
    {
        return finish(child, format!("handing over the task: {e}"));
    }
    // Cancelling the session closes the worker's stdin: it stops, and still sends its record.
    let stop = watch_cancel(cancel.clone(), stdin.clone());
    let stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut record = None;
    for line in stdout.lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Event>(&line) {
            Ok(Event::Record { record: r }) => {
                record = Some(r);
                break;
            }
            Ok(Event::Started { host, version }) => {
                tracing::debug!(worker = %host, version, vm = %task.label, "Worker started.");
            }
            Ok(Event::Progress { done, planned, .. }) => {
                tracing::debug!(vm = %task.label, done, planned, "Worker progress.");
            }
            Err(e) => {
                tracing::warn!(vm = %task.label, "Not an event from the worker ({e}): {line}")
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    // The session for this VM is over: closing stdin lets the worker exit.
    drop(stdin.lock().unwrap_or_else(|e| e.into_inner()).take());
    match record {
        Some(record) => {
            let _ = child.wait();
            Attempt::Record(record)
        }
        None => finish(child, "the worker ended without the VM's record".into()),
    }
}

/// Waits for a worker that sent no record and says why: `what`, ssh's or the worker's last words.
fn finish(mut child: Child, what: String) -> Attempt {
    drop(child.stdin.take());
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
    let last = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message");
    Attempt::Lost(format!("{what} ({status}: {last})"))
}

/// On a thread: writes a heartbeat line to the worker every [`HEARTBEAT`], and when `cancel` is
/// cancelled (and the attempt not over), closes the worker's stdin.
fn watch_cancel(
    cancel: CancelToken,
    stdin: Arc<Mutex<Option<ChildStdin>>>,
) -> Arc<std::sync::atomic::AtomicBool> {
    let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = over.clone();
    std::thread::spawn(move || {
        let mut beat = Instant::now();
        while !seen.load(std::sync::atomic::Ordering::SeqCst) {
            if cancel.is_cancelled() {
                drop(stdin.lock().unwrap_or_else(|e| e.into_inner()).take());
                return;
            }
            if beat.elapsed() >= HEARTBEAT {
                beat = Instant::now();
                // A write that fails (ssh gone) is noticed by the attempt, which reads the stream.
                if let Some(input) = stdin.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    let _ = input.write_all(b"\n").and_then(|()| input.flush());
                }
            }
            std::thread::sleep(TICK);
        }
    });
    over
}
