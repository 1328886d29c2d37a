//! What a job session did: the summary a notification reports.

use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// How a session, or one VM of it, ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Backed up, nothing to report.
    Success,
    /// Backed up, but something deserves a look (a VM shut off mid-way, a full backup instead of
    /// an incremental one, a slow stage).
    Warning,
    /// Not backed up.
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Warning => "warning",
            Outcome::Failure => "failure",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One run of a job over its VMs.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// The job's name, as its file states it.
    pub job: String,
    /// Unix seconds.
    pub started: u64,
    /// Unix seconds.
    pub ended: u64,
    /// One row per VM the job covers, in the job's order, backed up or not.
    pub vms: Vec<VmReport>,
}

/// What the session did with one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmReport {
    pub vm: String,
    pub result: Outcome,
    /// The restore point written, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Bytes read from the VM's disks (changed blocks only for an incremental backup).
    pub bytes_read: u64,
    /// Bytes added to the repository after deduplication and compression.
    pub bytes_written: u64,
    #[serde(rename = "duration_secs", serialize_with = "secs")]
    pub duration: Duration,
    pub warnings: Vec<String>,
    /// What is worth knowing without being wrong (a crash-consistent backup): listed in the
    /// message, never counted as warnings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Why the VM was not backed up (`result: failure`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The stage that limited throughput, from the pipeline's summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bottleneck: Option<String>,
}

fn secs<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

impl VmReport {
    /// A row with nothing read yet: callers fill in what they know.
    pub fn new(vm: impl Into<String>, result: Outcome) -> Self {
        VmReport {
            vm: vm.into(),
            result,
            snapshot: None,
            bytes_read: 0,
            bytes_written: 0,
            duration: Duration::ZERO,
            warnings: Vec::new(),
            notes: Vec::new(),
            error: None,
            bottleneck: None,
        }
    }
}

impl Session {
    /// Failure when any VM failed, warning when any warned, success otherwise. A session that
    /// covered no VM at all is a warning: a job that backs up nothing is most likely misconfigured.
    pub fn outcome(&self) -> Outcome {
        self.vms
            .iter()
            .map(|vm| vm.result)
            .max()
            .unwrap_or(Outcome::Warning)
    }

    /// How many VMs ended with `result`.
    pub fn count(&self, result: Outcome) -> usize {
        self.vms.iter().filter(|vm| vm.result == result).count()
    }
}

impl Serialize for Session {
    /// The fields, plus the derived `outcome`, so a JSON or YAML report says it without
    /// its reader recomputing it.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            job: &'a str,
            started: u64,
            ended: u64,
            outcome: Outcome,
            vms: &'a [VmReport],
        }
        View {
            job: &self.job,
            started: self.started,
            ended: self.ended,
            outcome: self.outcome(),
            vms: &self.vms,
        }
        .serialize(serializer)
    }
}
