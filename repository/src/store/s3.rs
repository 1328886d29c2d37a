//! A repository in an S3 bucket (AWS S3, Garage, Ceph RGW, MinIO, …): `s3://BUCKET/PREFIX`, each key an
//! object under the prefix.
//!
//! **Client.** `object_store`'s S3 client (signing, retries with exponential backoff and jitter on 503/SlowDown,
//! 429, other 5xx, timeouts and refused connections, for [`S3Settings::retry_time`] per request), driven from
//! the repository's plain threads through a small tokio runtime the store owns (`block_on`; the repository
//! crate has no async code). A semaphore bounds the requests in flight per store handle
//! (`BACKFLOW_S3_MAX_REQUESTS`). Settings come from the standard AWS variables and files (see
//! [`S3Settings`]); plain `http://` only to a loopback endpoint unless `AWS_ALLOW_HTTP=true`.
//!
//! **Writes.** Small objects are one PUT; files above [`MULTIPART_THRESHOLD`] are multipart uploads with a few
//! parts in flight. S3 makes an object visible whole or not at all, and durable when the PUT (or
//! CompleteMultipartUpload) is acknowledged. [`PutMode::Create`] is a HEAD, then a PUT with
//! `If-None-Match: *` (a 412 is `AlreadyExists`); the header is advisory: Garage 2.5 ignores it, and a
//! multipart upload cannot carry it, so a race between two creators of one key can let the second replace
//! the first. The format never relies on it: keys a session creates carry fresh random bits.
//!
//! **Reads.** Packs (`*.pack`) are read with ranged GETs of [`READ_AHEAD`]-aligned windows, kept in one cache
//! for the process (least recently used out, at most [`READ_AHEAD_BUDGET`] bytes, so that many open packs do not
//! grow the memory); a read past the middle of a window fetches the next one in the background (restores read
//! packs front to back). When the budget is all in windows being fetched, reads fetch exactly what is asked.
//! Every other object (index files, manifests, the gc's lists: many small positioned reads) is
//! fetched whole at open into an unlinked file in the scratch root, with `If-Match` on its ETag so that an
//! object replaced during the download is fetched again rather than spliced.
//!
//! **Leases.** Locks and registrations are objects: `locks/NAME/{shared|exclusive}-HOST-PID-RANDOM-BOUNDs` and
//! `PREFIX/HOST-PID-RANDOM-BOUNDs`, with a JSON body (host, pid, `held_by`, time written, bound). Taking a lock writes
//! the lease, then lists `locks/NAME/`: a conflicting live lease means deleting ours and failing with
//! [`RepoError::Locked`]. This needs only read-after-write consistency: of two racing writers, the one that
//! lists second sees the other (both may see each other and both fail; never both succeed). A background
//! thread per store rewrites every lease it holds each bound/4 ([`S3Settings::lease_bound`],
//! `BACKFLOW_LEASE_SECONDS`); a lease counts as gone when its `LastModified` is older than the bound.
//! [`Lease::is_held`] turns false once a lease went unrenewed for 3/4 of the bound, and stays false (the lease
//! is deleted, since another process may already have taken the lock). The bound is its holder's, written in
//! the lease's name (`-60s`, `lease_bound_of`), not the reader's: processes on different hosts may run with
//! different `BACKFLOW_LEASE_SECONDS`, and a gc judging a backup's registration by a shorter bound than the one
//! it is renewed for would take a live backup for a dead one and sweep chunks it is about to commit. A name
//! without the suffix (written by an earlier release) is judged by the reader's bound.
//!
//! **Clocks.** Liveness compares `LastModified` (the store's clock) with the store's "now", estimated as this
//! host's clock plus the skew measured when the store handle first writes a lease (`LastModified` of the fresh
//! object against the local time around its PUT, with `LastModified`'s one-second resolution). The
//! assumptions: the skew stays within [`S3Settings::max_clock_skew`] (`BACKFLOW_MAX_CLOCK_SKEW_SECONDS`; above
//! it the store refuses to take leases), both clocks advance at the same rate for the length of a lease, and
//! the skew plus one second stays well under a quarter of the bound (the margin between a holder ceasing to
//! trust its lease and others counting it gone). A lease is counted live one second longer than the bound
//! (the resolution), so uncertainty errs towards exclusion.
//!
//! **Scratch** is local: `$BACKFLOW_SCRATCH_DIR` (default `/var/tmp/backflow`), one directory per repository,
//! `s3-BUCKET-HASH` (HASH of endpoint, bucket and prefix), created at open.

mod config;

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use tracing::{debug, warn};

pub use config::S3Settings;

use super::{Entry, Lease, LockMode, Object, PutMode, Stat, Store};
use crate::error::{RepoError, Result};
use crate::store::{Location, S3Location};

/// Files larger than this are uploaded in parts: one PUT of a large pack would restart from zero on any
/// failure, and parts go up in parallel.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Size of a multipart upload's parts (S3's minimum is 5 MiB); with [`MULTIPART_PARALLEL`] parts in flight,
/// an upload holds at most 32 MiB.
pub const PART_SIZE: usize = 8 << 20;
/// Parts of one upload in flight at once (each also takes one of the store's request permits).
pub const MULTIPART_PARALLEL: usize = 4;
/// Ranged GETs of a pack fetch windows of this size, aligned to it: restores read packs front to back, and
/// one GET per chunk would spend the time in round trips (and costs a store that keeps objects in blocks,
/// as Garage does in 1 MiB ones, a block read per GET: a restore's Garage CPU time fell tenfold when its
/// GETs went from one per chunk to one per window, `benches/e2e-s3.sh`).
pub const READ_AHEAD: usize = 2 << 20;
/// Read-ahead windows held at once in the whole process (16 windows: a window being read and the next one
/// for each of a restore's few active packs), well under the 128 MiB a restore may use.
pub const READ_AHEAD_BUDGET: usize = 32 << 20;
/// Objects fetched whole are downloaded in ranges of this size, so that a large index file never sits in
/// memory.
pub const WHOLE_PIECE: u64 = 8 << 20;
/// Connecting to the store takes at most this long before the attempt counts as failed (and is retried).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One request (a whole part upload or ranged GET) takes at most this long before it is retried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// `LastModified` has one-second resolution (HTTP dates): leases count live this much longer.
pub const MODIFIED_RESOLUTION: Duration = Duration::from_secs(1);
/// How often a whole-object download restarts when the object is replaced while it is fetched.
const WHOLE_ATTEMPTS: usize = 3;

/// The S3 backend; cheap to share, safe to call from many threads (never from inside an async runtime).
pub struct S3Store {
    location: Location,
    inner: Arc<Inner>,
}

struct Inner {
    rt: tokio::runtime::Runtime,
    client: AmazonS3,
    /// The prefix without slashes at either end; empty for the bucket's root.
    root: String,
    /// `s3://BUCKET[/PREFIX]`.
    display_root: String,
    /// The endpoint and `display_root`: where a key of this store is, for the process's read-ahead windows.
    origin: String,
    scratch: PathBuf,
    permits: Arc<tokio::sync::Semaphore>,
    max_requests: usize,
    lease_bound: Duration,
    max_skew: Duration,
    /// Store clock minus local clock in milliseconds, measured at the first lease.
    skew_ms: OnceLock<i64>,
    skew_lock: Mutex<()>,
    host: String,
    leases: Mutex<Vec<Arc<LeaseState>>>,
    renewer: Arc<RenewerStop>,
}

#[derive(Default)]
struct RenewerStop {
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Drop for Inner {
    fn drop(&mut self) {
        *self.renewer.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.renewer.wake.notify_all();
    }
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.inner.display_root)
            .field("scratch", &self.inner.scratch)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display_root)
    }
}

impl S3Store {
    /// Opens `s3://BUCKET/PREFIX` with the settings of the environment ([`S3Settings::from_env`]).
    pub fn open(loc: &S3Location) -> Result<S3Store> {
        let settings = S3Settings::from_env().map_err(|e| match e {
            RepoError::InvalidArgument(detail) => RepoError::StoreSettings {
                location: Location::S3(loc.clone()).to_string(),
                detail,
            },
            other => other,
        })?;
        S3Store::open_with(loc, &settings)
    }

    /// Opens `s3://BUCKET/PREFIX` with `settings`. Contacts the store only when first used.
    pub fn open_with(loc: &S3Location, settings: &S3Settings) -> Result<S3Store> {
        // reqwest is built without a compiled-in crypto provider (object_store's default one, aws-lc, needs
        // a C build we avoid); ring is the process default unless the program chose another.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let display_root = Location::S3(loc.clone()).to_string();
        let invalid = |detail: String| RepoError::StoreSettings {
            location: display_root.clone(),
            detail,
        };

        let endpoint = if settings.virtual_hosted && !settings.is_aws {
            // Virtual-hosted style against a custom endpoint: the bucket is part of the host name.
            let (scheme, rest) = settings.endpoint.split_once("://").ok_or_else(|| {
                invalid(format!("endpoint {:?} has no scheme", settings.endpoint))
            })?;
            Some(format!("{scheme}://{}.{rest}", loc.bucket))
        } else if settings.is_aws {
            None
        } else {
            Some(settings.endpoint.clone())
        };
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            // Bounded by time rather than count.
            max_retries: usize::MAX,
            retry_timeout: settings.retry_time,
        };
        let options = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_allow_http(settings.allow_http);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&loc.bucket)
            .with_region(&settings.region)
            .with_access_key_id(&settings.access_key_id)
            .with_secret_access_key(&settings.secret_access_key)
            .with_virtual_hosted_style_request(settings.virtual_hosted)
            .with_allow_http(settings.allow_http)
            .with_unsigned_payload(settings.unsigned_payload)
            .with_retry(retry)
            .with_client_options(options);
        if let Some(token) = &settings.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let client = builder
            .build()
            .map_err(|e| invalid(format!("cannot set up the S3 client: {e}")))?;

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("backflow-s3")
            .enable_all()
            .build()
            .map_err(|e| RepoError::io("start the S3 client's runtime for", &display_root, e))?;

        let digest = blake3::hash(
            format!("{}\n{}\n{}", settings.endpoint, loc.bucket, loc.prefix).as_bytes(),
        );
        let scratch =
            settings
                .scratch_dir
                .join(format!("s3-{}-{}", loc.bucket, &digest.to_hex()[..12]));
        std::fs::create_dir_all(&scratch).map_err(|e| RepoError::io("create", &scratch, e))?;

        let renewer = Arc::new(RenewerStop::default());
        let inner = Arc::new(Inner {
            rt,
            client,
            root: loc.prefix.trim_matches('/').to_owned(),
            origin: format!("{} {display_root}", settings.endpoint),
            display_root,
            scratch,
            permits: Arc::new(tokio::sync::Semaphore::new(settings.max_requests)),
            max_requests: settings.max_requests,
            lease_bound: settings.lease_bound,
            max_skew: settings.max_clock_skew,
            skew_ms: OnceLock::new(),
            skew_lock: Mutex::new(()),
            host: host_name(),
            leases: Mutex::new(Vec::new()),
            renewer: renewer.clone(),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("backflow-s3-leases".into())
            .spawn(move || renew_leases(weak, renewer))
            .map_err(|e| RepoError::io("start the lease renewer for", &inner.display_root, e))?;
        Ok(S3Store {
            location: Location::S3(loc.clone()),
            inner,
        })
    }

    /// The measured difference between the store's clock and this host's (store minus local), once a lease
    /// was written.
    pub fn clock_skew(&self) -> Option<Duration> {
        self.inner
            .skew_ms
            .get()
            .map(|ms| Duration::from_millis(ms.unsigned_abs()))
    }
}

impl Inner {
    fn path(&self, key: &str) -> ObjectPath {
        if self.root.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.root))
        }
    }

    fn display_key(&self, key: &str) -> PathBuf {
        if key.is_empty() {
            PathBuf::from(&self.display_root)
        } else {
            PathBuf::from(format!("{}/{key}", self.display_root))
        }
    }

    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> RepoError {
        RepoError::io(op, self.display_key(key), io_error(e))
    }

    /// Runs one request on the runtime, within the bound of requests in flight.
    fn run<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(async {
            let _permit = self
                .permits
                .acquire()
                .await
                .expect("the semaphore is never closed");
            f.await
        })
    }

    fn head(&self, key: &str) -> Result<Option<object_store::ObjectMeta>> {
        match self.run(self.client.head(&self.path(key))) {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("look up", key, e)),
        }
    }

    /// [`Inner::head`] of an object that must exist: a missing one is a `NotFound` error of `open`.
    fn head_existing(&self, key: &str) -> Result<object_store::ObjectMeta> {
        self.head(key)?.ok_or_else(|| {
            RepoError::io(
                "open",
                self.display_key(key),
                io::ErrorKind::NotFound.into(),
            )
        })
    }

    fn put(&self, key: &str, bytes: Vec<u8>, mode: PutMode) -> Result<()> {
        if mode == PutMode::Create && self.head(key)?.is_some() {
            return Err(exists(self, key));
        }
        let opts = PutOptions {
            mode: match mode {
                PutMode::Create => object_store::PutMode::Create,
                PutMode::Replace => object_store::PutMode::Overwrite,
            },
            ..PutOptions::default()
        };
        let payload = PutPayload::from(bytes);
        match self.run(self.client.put_opts(&self.path(key), payload, opts)) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err("write", key, e)),
        }
    }

    fn multipart(&self, local: &Path, key: &str, size: u64) -> Result<()> {
        let path = self.path(key);
        let mut file = File::open(local).map_err(|e| RepoError::io("open", local, e))?;
        // The parts in flight each count against the store's bound on requests.
        let parallel = MULTIPART_PARALLEL.min(self.max_requests) as u32;
        let _permits = self
            .rt
            .block_on(self.permits.acquire_many(parallel))
            .expect("the semaphore is never closed");
        let upload = self
            .rt
            .block_on(
                self.client
                    .put_multipart_opts(&path, PutMultipartOptions::default()),
            )
            .map_err(|e| self.err("start uploading", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut buf = vec![0u8; PART_SIZE];
        let mut sent = 0u64;
        let outcome = loop {
            let n = match read_full(&mut file, &mut buf) {
                Ok(n) => n,
                Err(e) => break Err(RepoError::io("read", local, e)),
            };
            if n == 0 {
                break Ok(());
            }
            if let Err(e) = self
                .rt
                .block_on(writer.wait_for_capacity(parallel as usize - 1))
            {
                break Err(self.err("upload", key, e));
            }
            // Spawns the part's upload: needs the runtime as the current one.
            let _enter = self.rt.enter();
            writer.write(&buf[..n]);
            sent += n as u64;
        };
        if let Err(e) = outcome {
            if let Err(abort) = self.rt.block_on(writer.abort()) {
                warn!(object = %self.display_key(key).display(), error = %abort,
                    "Cannot abort a failed multipart upload; the store's lifecycle rules must remove its parts.");
            }
            return Err(e);
        }
        if sent != size {
            let _ = self.rt.block_on(writer.abort());
            return Err(RepoError::io(
                "upload",
                local,
                io::Error::other(format!(
                    "the file changed while it was uploaded ({size} bytes, then {sent})"
                )),
            ));
        }
        self.rt
            .block_on(writer.finish())
            .map_err(|e| self.err("complete the upload of", key, e))?;
        Ok(())
    }

    fn list_raw(&self, prefix: &str) -> Result<object_store::ListResult> {
        let path = self.path(prefix.trim_end_matches('/'));
        self.run(self.client.list_with_delimiter(Some(&path)))
            .map_err(|e| self.err("list", prefix, e))
    }

    /// The part of a listed location after `prefix`.
    fn relative(&self, prefix: &str, location: &ObjectPath) -> Option<String> {
        let full = self.path(prefix.trim_end_matches('/'));
        let full = full.as_ref();
        let loc = location.as_ref();
        let rest = if full.is_empty() {
            loc
        } else {
            loc.strip_prefix(full)?.strip_prefix('/')?
        };
        (!rest.is_empty()).then(|| rest.to_owned())
    }

    fn delete(&self, key: &str) -> Result<()> {
        match self.run(self.client.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    /// The store's clock minus ours, measured by writing an object (`probe` if no lease was written yet).
    fn measure_skew(&self, key: &str, write: impl FnOnce() -> Result<()>) -> Result<i64> {
        let before = SystemTime::now();
        write()?;
        let after = SystemTime::now();
        let meta = self.head(key)?.ok_or_else(|| {
            RepoError::io(
                "look up",
                self.display_key(key),
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the object just written is missing",
                ),
            )
        })?;
        let modified = meta.last_modified.timestamp_millis();
        let (before, after) = (unix_ms(before), unix_ms(after));
        // The store wrote it in [modified, modified + 1 s) by its clock, we in [before, after] by ours.
        let resolution = MODIFIED_RESOLUTION.as_millis() as i64;
        let low = modified - after;
        let high = modified + resolution - before;
        Ok((low + high) / 2)
    }

    /// Records the skew measured by a lease just written; refuses when it is above the bound.
    fn check_skew(&self, key: &str, skew: i64) -> Result<()> {
        let _ = self.skew_ms.set(skew);
        let skew = *self.skew_ms.get().expect("set above");
        if skew.unsigned_abs() > self.max_skew.as_millis() as u64 {
            return Err(RepoError::InvalidArgument(format!(
                "the clock of {} differs from this host's by {:.1} s (LastModified of {} against local time), \
                 more than BACKFLOW_MAX_CLOCK_SKEW_SECONDS={}: leases would expire early or late; \
                 synchronise the clocks (NTP)",
                self.display_root,
                skew as f64 / 1000.0,
                self.display_key(key).display(),
                self.max_skew.as_secs()
            )));
        }
        Ok(())
    }

    /// The skew, measured with a probe object when no lease was written yet.
    fn skew(&self) -> Result<i64> {
        if let Some(s) = self.skew_ms.get() {
            return Ok(*s);
        }
        let _guard = self.skew_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = self.skew_ms.get() {
            return Ok(*s);
        }
        let key = format!("locks/clock-probe/{}", self.unique_name());
        let skew = self.measure_skew(&key, || self.put(&key, Vec::new(), PutMode::Replace));
        self.delete(&key)?;
        let skew = skew?;
        self.check_skew(&key, skew)?;
        Ok(skew)
    }

    /// Whether the lease `name`, last written at `modified` (store clock), is live now: younger than its
    /// holder's bound ([`lease_bound_of`]).
    fn is_live(&self, name: &str, modified: Option<SystemTime>, skew_ms: i64) -> bool {
        let Some(modified) = modified else {
            return true;
        };
        let bound = lease_bound_of(name).unwrap_or(self.lease_bound);
        let store_now = unix_ms(SystemTime::now()) + skew_ms;
        let age = store_now - unix_ms(modified);
        age < (bound + MODIFIED_RESOLUTION).as_millis() as i64
    }

    /// A fresh lease name: [`Inner::unique_name`] and this process's bound (`HOST-PID-RANDOM-60s`).
    fn lease_name(&self) -> String {
        format!("{}-{}s", self.unique_name(), self.lease_bound.as_secs())
    }

    fn unique_name(&self) -> String {
        format!(
            "{}-{}-{:016x}",
            self.host,
            std::process::id(),
            rand::random::<u64>()
        )
    }

    fn lease_body(&self, held_by: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "host": self.host,
            "pid": std::process::id(),
            "held_by": held_by,
            "written_unix_ms": unix_ms(SystemTime::now()),
            "bound_seconds": self.lease_bound.as_secs(),
        }))
        .expect("a JSON object of strings and numbers serialises")
    }

    /// Writes a lease object and measures the skew with it if not done yet.
    fn write_lease(&self, key: &str, held_by: &str) -> Result<Instant> {
        let started = Instant::now();
        let body = self.lease_body(held_by);
        if self.skew_ms.get().is_some() {
            self.put(key, body, PutMode::Replace)?;
            return Ok(started);
        }
        let _guard = self.skew_lock.lock().unwrap_or_else(|e| e.into_inner());
        let skew = self.measure_skew(key, || self.put(key, body, PutMode::Replace))?;
        if let Err(e) = self.check_skew(key, skew) {
            let _ = self.delete(key);
            return Err(e);
        }
        Ok(started)
    }

    /// The time within which a lease must have been renewed to be trusted by its holder.
    fn held_window(&self) -> Duration {
        self.lease_bound - self.lease_bound / 4
    }
}

/// The bound a lease's holder renews it for, from the `-Ns` at the end of its name ([`Inner::lease_name`]);
/// `None` for a name without it (an earlier release's, which ends in the 16 hex digits of its random part:
/// never `s`; only the part after the last `-` is read, so a host name with dashes changes nothing).
fn lease_bound_of(name: &str) -> Option<Duration> {
    let (_, last) = name.rsplit_once('-')?;
    let secs = last.strip_suffix('s')?;
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    secs.parse().ok().map(Duration::from_secs)
}

fn exists(inner: &Inner, key: &str) -> RepoError {
    RepoError::io(
        "create",
        inner.display_key(key),
        io::Error::new(io::ErrorKind::AlreadyExists, "the object exists"),
    )
}

/// Milliseconds since the Unix epoch (negative before it).
fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The host name as it may appear in a key.
fn host_name() -> String {
    let raw = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "host".into());
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// An `object_store` error as an `io::Error` of the kind the repository's retry policy understands. Errors
/// that reach here were already retried for the retry time when transient: those become `TimedOut`.
fn io_error(e: object_store::Error) -> io::Error {
    use object_store::Error as E;
    let kind = match &e {
        E::NotFound { .. } => io::ErrorKind::NotFound,
        E::AlreadyExists { .. } | E::Precondition { .. } | E::NotModified { .. } => {
            io::ErrorKind::AlreadyExists
        }
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        _ => transient_kind(&e).unwrap_or(io::ErrorKind::Other),
    };
    io::Error::new(kind, e)
}

fn transient_kind(e: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(http) = err.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind as K;
            return match http.kind() {
                K::Connect | K::Request | K::Timeout | K::Interrupted => {
                    Some(io::ErrorKind::TimedOut)
                }
                K::Decode | K::Unknown => None,
                _ => None,
            };
        }
        cur = err.source();
    }
    // A server error or throttling the retries did not outlast: the status is only in the message.
    let text = e.to_string();
    let status = text
        .split("status code: ")
        .nth(1)
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(429) | Some(500..=599) => Some(io::ErrorKind::TimedOut),
        _ => None,
    }
}

impl Store for S3Store {
    fn location(&self) -> &Location {
        &self.location
    }

    fn display_key(&self, key: &str) -> PathBuf {
        self.inner.display_key(key)
    }

    fn scratch_root(&self) -> &Path {
        &self.inner.scratch
    }

    fn open(&self, key: &str) -> Result<Arc<dyn Object>> {
        let inner = &self.inner;
        if key.ends_with(".pack") {
            let meta = inner.head_existing(key)?;
            return Ok(Arc::new(RangedObject {
                inner: inner.clone(),
                id: format!(
                    "{}\n{key}\n{}\n{}",
                    inner.origin,
                    meta.size,
                    meta.e_tag.as_deref().unwrap_or("")
                )
                .into(),
                key: key.to_owned(),
                path: inner.path(key),
                len: meta.size,
            }));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match fetch_whole(inner, key) {
                Err(FetchError::Replaced) if attempt < WHOLE_ATTEMPTS => {
                    debug!(object = %inner.display_key(key).display(), "Replaced while fetched; fetching again.");
                }
                Err(FetchError::Replaced) => {
                    return Err(RepoError::io(
                        "read",
                        inner.display_key(key),
                        io::Error::new(
                            io::ErrorKind::Interrupted,
                            format!(
                                "the object was replaced during each of {WHOLE_ATTEMPTS} downloads"
                            ),
                        ),
                    ));
                }
                Err(FetchError::Repo(e)) => return Err(e),
                Ok(object) => return Ok(Arc::new(object)),
            }
        }
    }

    fn read(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let inner = &self.inner;
        let got = inner.run(async {
            let r = inner.client.get(&inner.path(key)).await?;
            r.bytes().await
        });
        match got {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(inner.err("read", key, e)),
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.inner.head(key)?.is_some())
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let listed = self.inner.list_raw(prefix)?;
        let mut entries: Vec<Entry> = listed
            .objects
            .into_iter()
            .filter_map(|m| {
                Some(Entry {
                    name: self.inner.relative(prefix, &m.location)?,
                    size: m.size,
                    modified: Some(m.last_modified.into()),
                })
            })
            .filter(|e| !e.name.contains('/'))
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let listed = self.inner.list_raw(prefix)?;
        let mut dirs: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| self.inner.relative(prefix, p))
            .map(|d| d.trim_end_matches('/').to_owned())
            .collect();
        dirs.sort();
        dirs.dedup();
        Ok(dirs)
    }

    fn publish(&self, local: &Path, key: &str, mode: PutMode) -> Result<()> {
        let outcome = publish(&self.inner, local, key, mode);
        if let Err(e) = std::fs::remove_file(local)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(file = %local.display(), error = %e, "Cannot remove the uploaded scratch file.");
        }
        outcome
    }

    fn put(&self, key: &str, bytes: &[u8], mode: PutMode) -> Result<()> {
        self.inner.put(key, bytes.to_vec(), mode)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }

    fn stat(&self, key: &str) -> Result<Option<Stat>> {
        Ok(self.inner.head(key)?.map(|meta| Stat {
            size: meta.size,
            modified: Some(meta.last_modified.into()),
            // The ETag changes when the object is replaced, even with the same size in the same second.
            identity: meta.e_tag.map_or(0, |tag| {
                let h = blake3::hash(tag.as_bytes());
                u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
            }),
        }))
    }

    fn delete_many(&self, keys: &[String]) -> Result<()> {
        use futures_util::{StreamExt, TryStreamExt};
        let inner = &self.inner;
        // DeleteObjects: a thousand keys per request rather than one.
        let paths: Vec<object_store::Result<ObjectPath>> =
            keys.iter().map(|k| Ok(inner.path(k))).collect();
        let outcomes: Vec<object_store::Result<ObjectPath>> = inner.run(
            inner
                .client
                .delete_stream(futures_util::stream::iter(paths).boxed())
                .into_stream()
                .collect(),
        );
        for (key, outcome) in keys.iter().zip(outcomes) {
            match outcome {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(inner.err("delete", key, e)),
            }
        }
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let inner = &self.inner;
        inner
            .run(inner.client.copy(&inner.path(from), &inner.path(to)))
            .map_err(|e| inner.err("copy", from, e))?;
        inner.delete(from)
    }

    fn lock(&self, name: &str, mode: LockMode, held_by: &str) -> Result<Box<dyn Lease>> {
        let inner = &self.inner;
        let dir = format!("locks/{}/", name.trim_matches('/'));
        let kind = match mode {
            LockMode::Shared => "shared",
            LockMode::Exclusive => "exclusive",
        };
        let lease_name = format!("{kind}-{}", inner.lease_name());
        let key = format!("{dir}{lease_name}");
        let written = inner.write_lease(&key, held_by)?;
        let skew = inner.skew()?;
        let listed = match self.list(&dir) {
            Ok(l) => l,
            Err(e) => {
                let _ = inner.delete(&key);
                return Err(e);
            }
        };
        let conflict = listed.into_iter().find(|e| {
            e.name != lease_name
                && inner.is_live(&e.name, e.modified, skew)
                && (mode == LockMode::Exclusive || e.name.starts_with("exclusive-"))
        });
        if let Some(other) = conflict {
            inner.delete(&key)?;
            let holder = self
                .read(&format!("{dir}{}", other.name))
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            let describe = |field: &str| {
                holder
                    .as_ref()
                    .and_then(|h| h.get(field))
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .unwrap_or_else(|| "?".into())
            };
            let how = if other.name.starts_with("exclusive-") {
                "exclusively"
            } else {
                "shared"
            };
            return Err(RepoError::Locked {
                path: inner.display_key(&dir),
                detail: format!(
                    "{name} is held {how} by {} (host {}, pid {}; lease {})",
                    describe("held_by"),
                    describe("host"),
                    describe("pid"),
                    other.name
                ),
            });
        }
        Ok(self.hold(key, lease_name, held_by, written))
    }

    fn register(&self, prefix: &str) -> Result<Box<dyn Lease>> {
        let inner = &self.inner;
        let name = inner.lease_name();
        let key = format!("{prefix}{name}");
        let written = inner.write_lease(&key, "")?;
        Ok(self.hold(key, name, "", written))
    }

    fn live(&self, prefix: &str) -> Result<Vec<String>> {
        let skew = self.inner.skew()?;
        Ok(self
            .list(prefix)?
            .into_iter()
            .filter(|e| self.inner.is_live(&e.name, e.modified, skew))
            .map(|e| e.name)
            .collect())
    }
}

impl S3Store {
    fn hold(&self, key: String, name: String, held_by: &str, written: Instant) -> Box<dyn Lease> {
        let state = Arc::new(LeaseState {
            key,
            name,
            held_by: held_by.to_owned(),
            renewed: Mutex::new(written),
            lost: AtomicBool::new(false),
        });
        self.inner
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(state.clone());
        Box::new(S3Lease {
            inner: self.inner.clone(),
            state,
        })
    }
}

fn publish(inner: &Inner, local: &Path, key: &str, mode: PutMode) -> Result<()> {
    let size = std::fs::metadata(local)
        .map_err(|e| RepoError::io("read", local, e))?
        .len();
    if size <= MULTIPART_THRESHOLD {
        let bytes = std::fs::read(local).map_err(|e| RepoError::io("read", local, e))?;
        return inner.put(key, bytes, mode);
    }
    if mode == PutMode::Create && inner.head(key)?.is_some() {
        return Err(exists(inner, key));
    }
    inner.multipart(local, key, size)
}

enum FetchError {
    Replaced,
    Repo(RepoError),
}

impl From<RepoError> for FetchError {
    fn from(e: RepoError) -> FetchError {
        FetchError::Repo(e)
    }
}

/// Downloads `key` into an unlinked scratch file.
fn fetch_whole(inner: &Inner, key: &str) -> std::result::Result<WholeObject, FetchError> {
    let meta = inner.head_existing(key)?;
    let scratch = inner
        .scratch
        .join(format!("fetch-{:016x}", rand::random::<u64>()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&scratch)
        .map_err(|e| RepoError::io("create", &scratch, e))?;
    // Unlinked at once: nothing to clean up whatever happens next.
    std::fs::remove_file(&scratch).map_err(|e| RepoError::io("remove", &scratch, e))?;
    let path = inner.path(key);
    let mut offset = 0u64;
    while offset < meta.size {
        let end = (offset + WHOLE_PIECE).min(meta.size);
        let options = GetOptions {
            if_match: meta.e_tag.clone(),
            range: Some(GetRange::Bounded(offset..end)),
            ..GetOptions::default()
        };
        let got = inner.run(async {
            let r = inner.client.get_opts(&path, options).await?;
            r.bytes().await
        });
        let bytes = match got {
            Ok(b) => b,
            Err(object_store::Error::Precondition { .. }) => return Err(FetchError::Replaced),
            Err(e) => return Err(inner.err("read", key, e).into()),
        };
        if bytes.len() as u64 != end - offset {
            return Err(FetchError::Replaced);
        }
        file.write_all(&bytes)
            .map_err(|e| RepoError::io("write", &scratch, e))?;
        offset = end;
    }
    Ok(WholeObject {
        file,
        len: meta.size,
        name: inner.display_key(key),
    })
}

/// An object fetched whole into an unlinked local file.
struct WholeObject {
    file: File,
    len: u64,
    name: PathBuf,
}

impl fmt::Debug for WholeObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (fetched, {} bytes)", self.name.display(), self.len)
    }
}

impl Object for WholeObject {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }
}

/// A pack read by ranged GETs through read-ahead windows: the pack's [`READ_AHEAD`]-aligned pieces, kept in
/// the process's [`WINDOWS`] cache.
struct RangedObject {
    inner: Arc<Inner>,
    /// Names this object's windows in [`WINDOWS`]: the origin, the key, the length and the ETag, so that
    /// every handle of one pack shares them (a restore's reader workers open their own) and a replaced
    /// object never reads another's windows (packs are created once under a fresh name, but the cache need
    /// not rely on it).
    id: Arc<str>,
    key: String,
    path: ObjectPath,
    len: u64,
}

impl fmt::Debug for RangedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} bytes)",
            self.inner.display_key(&self.key).display(),
            self.len
        )
    }
}

/// The read-ahead windows of every open pack in the process, least recently used first out, holding at
/// most [`READ_AHEAD_BUDGET`] bytes. One cache for the process, not one window per object: the restore's
/// reader workers share a pack (two workers taking turns on one window made it ping-pong between their
/// offsets), and packs that a reader finished stay open in the repository's pack cache (their windows,
/// charged until the pack was closed, used up the budget and turned every later read into one GET per
/// chunk). Windows are aligned so that the workers reading neighbouring chunks agree on them, and a
/// window being fetched is waited for rather than fetched twice.
static WINDOWS: Mutex<Windows> = Mutex::new(Windows {
    entries: Vec::new(),
    bytes: 0,
    tick: 0,
});
/// Signalled whenever a window being fetched arrives or is given up.
static WINDOW_DONE: Condvar = Condvar::new();

fn lock_windows() -> std::sync::MutexGuard<'static, Windows> {
    WINDOWS.lock().unwrap_or_else(|e| e.into_inner())
}

struct Windows {
    entries: Vec<WindowEntry>,
    /// Bytes of all entries, those being fetched included.
    bytes: usize,
    /// Use counter for the LRU order.
    tick: u64,
}

struct WindowEntry {
    object: Arc<str>,
    start: u64,
    size: usize,
    /// `None` while its GET runs.
    data: Option<bytes::Bytes>,
    used: u64,
}

impl Windows {
    fn find(&mut self, object: &str, start: u64) -> Option<&mut WindowEntry> {
        self.entries
            .iter_mut()
            .find(|e| &*e.object == object && e.start == start)
    }

    /// Makes room for `size` bytes by dropping the least recently used windows that have arrived, and
    /// records a window being fetched. False (nothing recorded) when the windows being fetched alone leave
    /// no room.
    fn reserve(&mut self, object: &Arc<str>, start: u64, size: usize) -> bool {
        while self.bytes + size > READ_AHEAD_BUDGET {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.data.is_some())
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            else {
                return false;
            };
            let gone = self.entries.swap_remove(oldest);
            self.bytes -= gone.size;
        }
        self.tick += 1;
        self.bytes += size;
        self.entries.push(WindowEntry {
            object: object.clone(),
            start,
            size,
            data: None,
            used: self.tick,
        });
        true
    }

    /// The GET of a reserved window ended: keeps its bytes, or drops the entry when it failed.
    fn arrive(&mut self, object: &str, start: u64, got: Option<bytes::Bytes>) {
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| &*e.object == object && e.start == start && e.data.is_none())
        {
            match got {
                Some(data) if data.len() == self.entries[i].size => {
                    self.entries[i].data = Some(data)
                }
                _ => {
                    let gone = self.entries.swap_remove(i);
                    self.bytes -= gone.size;
                }
            }
        }
        WINDOW_DONE.notify_all();
    }
}

/// Removes a reserved window's entry if its prefetch ends without arriving (the runtime shutting down drops
/// the task), so that the budget it holds is not lost.
struct PendingWindow {
    object: Arc<str>,
    start: u64,
}

impl PendingWindow {
    fn arrive(self, got: Option<bytes::Bytes>) {
        lock_windows().arrive(&self.object, self.start, got);
        std::mem::forget(self);
    }
}

impl Drop for PendingWindow {
    fn drop(&mut self) {
        lock_windows().arrive(&self.object, self.start, None);
    }
}

impl RangedObject {
    /// The window `[start, start + READ_AHEAD)` (shorter at the end of the object).
    fn window_size(&self, start: u64) -> usize {
        (self.len - start).min(READ_AHEAD as u64) as usize
    }

    /// Fetches the window at `start` in the background unless it is cached, being fetched, or does not fit.
    fn prefetch(&self, start: u64) {
        if start >= self.len {
            return;
        }
        let size = self.window_size(start);
        {
            let mut windows = lock_windows();
            if windows.find(&self.id, start).is_some() || !windows.reserve(&self.id, start, size) {
                return;
            }
        }
        let client = self.inner.client.clone();
        let permits = self.inner.permits.clone();
        let path = self.path.clone();
        let pending = PendingWindow {
            object: self.id.clone(),
            start,
        };
        self.inner.rt.spawn(async move {
            // The whole guard, not its fields (closures capture fields separately).
            let pending = pending;
            let got = match permits.acquire_owned().await {
                Ok(_permit) => client
                    .get_range(&path, start..start + size as u64)
                    .await
                    .ok(),
                Err(_) => None,
            };
            pending.arrive(got);
        });
    }

    /// Copies `buf.len()` bytes at `offset`, all inside the window at `start`, fetching it if needed.
    fn read_window(&self, start: u64, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.window_size(start);
        let from = (offset - start) as usize;
        let mut windows = lock_windows();
        loop {
            windows.tick += 1;
            let tick = windows.tick;
            match windows.find(&self.id, start) {
                Some(e) => match &e.data {
                    Some(data) => {
                        e.used = tick;
                        buf.copy_from_slice(&data[from..from + buf.len()]);
                        return Ok(());
                    }
                    None => {
                        windows = WINDOW_DONE.wait(windows).unwrap_or_else(|e| e.into_inner());
                    }
                },
                None => {
                    if !windows.reserve(&self.id, start, size) {
                        // Every byte of the budget is being fetched: read exactly what is asked.
                        drop(windows);
                        let data = self.get(offset, buf.len())?;
                        buf.copy_from_slice(&data);
                        return Ok(());
                    }
                    drop(windows);
                    let got = self.get(start, size);
                    let mut windows = lock_windows();
                    match got {
                        Ok(data) => {
                            buf.copy_from_slice(&data[from..from + buf.len()]);
                            windows.arrive(&self.id, start, Some(data));
                            return Ok(());
                        }
                        Err(e) => {
                            windows.arrive(&self.id, start, None);
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    /// One ranged GET of exactly `len` bytes at `offset`.
    fn get(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        let data = self
            .inner
            .run(
                self.inner
                    .client
                    .get_range(&self.path, offset..offset + len as u64),
            )
            .map_err(io_error)?;
        if data.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: {len} bytes at {offset} asked, {} returned (the object shrank?)",
                    self.inner.display_key(&self.key).display(),
                    data.len()
                ),
            ));
        }
        Ok(data)
    }
}

impl Object for RangedObject {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_stream(
        &self,
        offset: u64,
        len: usize,
        each: &mut dyn FnMut(bytes::Bytes) -> io::Result<()>,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(len as u64)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        // On this (a pipeline worker's) thread: `each` may block on the channel after this stage, which
        // holds back the body (TCP flow control) rather than buffering it.
        self.inner.run(async {
            let options = GetOptions {
                range: Some(GetRange::Bounded(offset..end)),
                ..Default::default()
            };
            let mut body = self
                .inner
                .client
                .get_opts(&self.path, options)
                .await
                .map_err(io_error)?
                .into_stream();
            let mut got = 0;
            while let Some(piece) = futures_util::StreamExt::next(&mut body).await {
                let piece = piece.map_err(io_error)?;
                got += piece.len();
                if got > len {
                    break;
                }
                each(piece)?;
            }
            if got != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: {len} bytes at {offset} asked, {got} returned (the object changed?)",
                        self.inner.display_key(&self.key).display()
                    ),
                ));
            }
            Ok(())
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min((self.len - offset) as usize);
        if want > READ_AHEAD {
            // Larger than a window: one GET of exactly that, not cached.
            let data = self.get(offset, want)?;
            buf[..want].copy_from_slice(&data);
            return Ok(want);
        }
        let step = READ_AHEAD as u64;
        let end = offset + want as u64;
        let mut at = offset;
        while at < end {
            let start = at / step * step;
            let upto = end.min(start + step);
            let piece = &mut buf[(at - offset) as usize..(upto - offset) as usize];
            self.read_window(start, piece, at)?;
            at = upto;
        }
        // Past the middle of a window, its successor is likely next (restores read packs front to back):
        // fetch it while this one is consumed.
        let last = (end - 1) / step * step;
        if end - last > step / 2 {
            self.prefetch(last + step);
        }
        Ok(want)
    }
}

/// A lease this handle holds and renews.
struct LeaseState {
    key: String,
    name: String,
    held_by: String,
    /// When the last successful write of the lease began.
    renewed: Mutex<Instant>,
    /// Once set, never cleared: the lease lapsed and another process may hold the lock.
    lost: AtomicBool,
}

struct S3Lease {
    inner: Arc<Inner>,
    state: Arc<LeaseState>,
}

impl fmt::Debug for S3Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lease {}",
            self.inner.display_key(&self.state.key).display()
        )
    }
}

impl Lease for S3Lease {
    fn name(&self) -> &str {
        &self.state.name
    }

    fn is_held(&self) -> bool {
        !self.state.lost.load(Ordering::Acquire)
            && self
                .state
                .renewed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed()
                < self.inner.held_window()
    }
}

impl Drop for S3Lease {
    fn drop(&mut self) {
        self.state.lost.store(true, Ordering::Release);
        self.inner
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| !Arc::ptr_eq(s, &self.state));
        if let Err(e) = self.inner.delete(&self.state.key) {
            warn!(object = %self.inner.display_key(&self.state.key).display(), error = %e,
                "Cannot delete a released lease; it counts as gone once older than the lease bound.");
        }
    }
}

/// The renewer thread: rewrites every held lease each quarter of the bound until the store is dropped.
fn renew_leases(inner: Weak<Inner>, stop: Arc<RenewerStop>) {
    loop {
        let Some(store) = inner.upgrade() else {
            return;
        };
        let tick = store.lease_bound / 4;
        let leases: Vec<Arc<LeaseState>> = store
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for lease in leases {
            if lease.lost.load(Ordering::Acquire) {
                continue;
            }
            let last = *lease.renewed.lock().unwrap_or_else(|e| e.into_inner());
            let started = Instant::now();
            if started.duration_since(last) >= store.held_window() {
                lapse(&store, &lease);
                continue;
            }
            let renewed = store.put(
                &lease.key,
                store.lease_body(&lease.held_by),
                PutMode::Replace,
            );
            if lease.lost.load(Ordering::Acquire) {
                // Dropped while the renewal was on its way: the renewal may have written the object again
                // after the drop deleted it, and it must not exclude others until it expires.
                let _ = store.delete(&lease.key);
                continue;
            }
            match renewed {
                // Landed in time only if the previous write was still trusted when this one returned:
                // otherwise there was a moment in which others could count the lease gone.
                Ok(()) if last.elapsed() < store.held_window() => {
                    *lease.renewed.lock().unwrap_or_else(|e| e.into_inner()) = started;
                }
                Ok(()) => lapse(&store, &lease),
                Err(e) => {
                    warn!(object = %store.display_key(&lease.key).display(), error = %e,
                        "Cannot renew a lease; trying again at the next renewal.");
                }
            }
        }
        drop(store);
        let stopped = stop.stop.lock().unwrap_or_else(|e| e.into_inner());
        let (stopped, _) = stop
            .wake
            .wait_timeout_while(stopped, tick, |s| !*s)
            .unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return;
        }
    }
}

/// A lease that went unrenewed too long: no longer trusted, and deleted so that it stops excluding others.
fn lapse(store: &Inner, lease: &LeaseState) {
    if lease.lost.swap(true, Ordering::AcqRel) {
        return;
    }
    warn!(object = %store.display_key(&lease.key).display(),
        "A lease was not renewed within the bound; its holder can no longer rely on it.");
    let _ = store.delete(&lease.key);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_name_carries_its_holders_bound() {
        assert_eq!(
            lease_bound_of("shared-vm-123-00000000000000ab-60s"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            lease_bound_of("host.example-9-0123456789abcdef-2s"),
            Some(Duration::from_secs(2))
        );
        // An earlier release's names: the random part last.
        assert_eq!(lease_bound_of("vm-123-0123456789abcdef"), None);
        assert_eq!(lease_bound_of("exclusive-vm-123-00000000000000bs"), None);
        assert_eq!(lease_bound_of("vm-123-s"), None);
    }
}
