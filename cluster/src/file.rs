//! The cluster file: YAML read with `serde-saphyr`, every mistake reported as
//! `FILE:LINE:COLUMN: FIELD: expected WHAT` (see the crate root for the format). Every value is
//! checked while it is read, so that its error carries its position; what needs the whole file
//! (unique host names, at least one host) is checked after, with the position `Spanned` kept.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::error::ClusterError;

/// Largest cluster file, in bytes: the limit of specs and job files
/// ([`backflow_pipeline::input::MAX_SPEC_SIZE`]); a cluster of thousands of hosts fits.
pub const MAX_CLUSTER_FILE_SIZE: u64 = backflow_pipeline::input::MAX_SPEC_SIZE;

/// The SSH user when neither the host nor `defaults` names one: libvirt's system daemon and
/// the worker's backup jobs need root on the host.
pub const DEFAULT_SSH_USER: &str = "root";

/// The SSH port when neither the host nor `defaults` names one.
pub const DEFAULT_SSH_PORT: u16 = 22;

/// The `backflow` of a host when neither the host nor `defaults` names one: found on the PATH of
/// the remote user's shell.
pub const DEFAULT_BACKFLOW: &str = "backflow";

/// VMs one host's worker backs up at once when nothing says otherwise: one, because every VM of
/// a host is read from the same storage and through the same network link, and a second backup
/// there mostly slows the first; an operator who knows the host has room says `max_vms`.
pub const DEFAULT_MAX_VMS: u32 = 1;

/// The known-hosts file used beside `ssh.key` when `ssh.known_hosts` is not given: host keys
/// learnt for a cluster stay with that cluster's key, not in the user's own `~/.ssh`.
pub const KNOWN_HOSTS_BESIDE_KEY: &str = "known_hosts";

/// A cluster: its hosts with every setting resolved (defaults merged, `uri` built).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cluster {
    pub name: String,
    /// The client side of NBD over TLS between hosts; `None`: not set up (a VM can then be read
    /// only by the worker on its own host).
    pub tls: Option<TlsFiles>,
    /// In the file's order, which is the order of preference where a choice between hosts is
    /// otherwise even (a shut-off VM defined on two hosts: see [`mod@crate::discover`]).
    pub hosts: Vec<Host>,
}

impl Cluster {
    /// The host of that name.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

/// Certificate files of the NBD client (a worker reading another host's export).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA that signed every host's server certificate.
    #[serde(deserialize_with = "tls_ca")]
    pub ca: PathBuf,
    #[serde(deserialize_with = "tls_cert")]
    pub cert: PathBuf,
    #[serde(deserialize_with = "tls_key")]
    pub key: PathBuf,
}

/// One host of the cluster, as the controller reaches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Host {
    /// Unique in the cluster: what reports, records and placement call the host.
    pub name: String,
    /// Where the controller and the other hosts reach it (SSH, NBD).
    pub address: Address,
    /// The libvirt URI of the host's daemon as the controller opens it.
    pub uri: String,
    pub ssh: Ssh,
    /// The `backflow` binary on the host: an absolute path, or a name looked up on the PATH of
    /// the remote shell.
    pub backflow: String,
    pub worker: Worker,
}

/// How the controller logs in to a host to start a worker there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ssh {
    pub user: String,
    pub port: u16,
    /// The private key; `None`: ssh's own choice (agent, `~/.ssh/id_*`).
    pub key: Option<PathBuf>,
    /// Where host keys are remembered (new ones accepted, changed ones refused); `None`: ssh's
    /// default, `~/.ssh/known_hosts`.
    pub known_hosts: Option<PathBuf>,
}

/// A host's worker settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Worker {
    /// Whether the controller may start a worker on this host; a host without one still has its
    /// VMs backed up, by a worker on another host reading over the network.
    pub enabled: bool,
    /// VMs the host's worker backs up at once, at least 1.
    pub max_vms: u32,
}

/// Where a host is reached: an IP address or a DNS name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Ip(IpAddr),
    Name(String),
}

impl Address {
    /// How a URI writes it: an IPv6 address in brackets.
    pub fn in_uri(&self) -> String {
        match self {
            Address::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(ip) => ip.fmt(f),
            Address::Name(name) => f.write_str(name),
        }
    }
}

impl Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Address {
    type Err = String;

    /// An IP address (v4 or v6), else a host name as RFC 1123 allows it: dot-separated labels
    /// of letters, digits and `-`, none starting or ending with `-`, at most 63 bytes each and
    /// 253 in all. A name whose last label is all digits is refused: it is a mistyped IPv4
    /// address (`10.0.0.300`), never a name (no top-level domain is numeric).
    fn from_str(text: &str) -> Result<Address, String> {
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Address::Ip(ip));
        }
        let name = text.strip_suffix('.').unwrap_or(text);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!("`{text}` is neither an IP address nor a host name"));
        }
        if name
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!("`{text}` is not an IP address"));
        }
        Ok(Address::Name(name.to_owned()))
    }
}

/// Reads and checks a cluster file. It must be a regular file of at most
/// [`MAX_CLUSTER_FILE_SIZE`] bytes: a FIFO or a device is refused before it is opened (it could
/// block or never end).
pub fn load(path: &Path) -> Result<Cluster, ClusterError> {
    use backflow_pipeline::input::{InputError, read_text_file};
    let text = read_text_file(path, MAX_CLUSTER_FILE_SIZE).map_err(|e| match e {
        InputError::Io(source) => ClusterError::Read {
            file: path.to_owned(),
            source,
        },
        other => ClusterError::Input {
            file: path.to_owned(),
            detail: other.to_string(),
        },
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses a cluster from text; `file` is what errors call it.
pub fn parse(text: &str, file: &str) -> Result<Cluster, ClusterError> {
    let raw: ClusterFile =
        serde_saphyr::from_str(text).map_err(|e| located(&e.to_string(), file))?;
    let at = |s: &serde_saphyr::Location| Some((s.line(), s.column()));
    if raw.hosts.value.is_empty() {
        return Err(ClusterError::invalid(
            file,
            at(&raw.hosts.referenced),
            "hosts: expected at least one host",
        ));
    }
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    for host in &raw.hosts.value {
        let line = host.name.referenced.line();
        if let Some(first) = seen.insert(&host.name.value.0, line) {
            return Err(ClusterError::invalid(
                file,
                at(&host.name.referenced),
                format!(
                    "name: expected a name no other host has; `{}` is the name of the host at \
                     line {first} too",
                    host.name.value.0
                ),
            ));
        }
    }
    let defaults = raw.defaults;
    let hosts = raw
        .hosts
        .value
        .into_iter()
        .map(|h| {
            let ssh = Ssh {
                user: h
                    .ssh
                    .user
                    .or_else(|| defaults.ssh.user.clone())
                    .unwrap_or_else(|| DEFAULT_SSH_USER.to_owned()),
                port: h.ssh.port.or(defaults.ssh.port).unwrap_or(DEFAULT_SSH_PORT),
                key: h.ssh.key.or_else(|| defaults.ssh.key.clone()),
                known_hosts: h
                    .ssh
                    .known_hosts
                    .or_else(|| defaults.ssh.known_hosts.clone()),
            };
            let ssh = Ssh {
                known_hosts: ssh.known_hosts.clone().or_else(|| {
                    let dir = ssh.key.as_deref()?.parent()?;
                    Some(dir.join(KNOWN_HOSTS_BESIDE_KEY))
                }),
                ..ssh
            };
            let uri = h.uri.unwrap_or_else(|| ssh_uri(&ssh, &h.address));
            Host {
                name: h.name.value.0,
                address: h.address,
                uri,
                backflow: h
                    .backflow
                    .or_else(|| defaults.backflow.clone())
                    .unwrap_or_else(|| DEFAULT_BACKFLOW.to_owned()),
                worker: Worker {
                    enabled: h.worker.enabled.or(defaults.worker.enabled).unwrap_or(true),
                    max_vms: h
                        .worker
                        .max_vms
                        .or(defaults.worker.max_vms)
                        .unwrap_or(DEFAULT_MAX_VMS),
                },
                ssh,
            }
        })
        .collect();
    Ok(Cluster {
        name: raw.name,
        tls: raw.tls,
        hosts,
    })
}

/// The URI of a host's libvirt when the file gives none: libvirt's ssh transport with the
/// host's SSH settings, the access a worker needs anyway. `no_verify=1` accepts a host key not
/// yet known (libvirt's transport cannot be given a known-hosts file; the worker's own ssh
/// keeps one and refuses a changed key); `no_tty=1` never asks for a password.
pub fn ssh_uri(ssh: &Ssh, address: &Address) -> String {
    let port = if ssh.port == DEFAULT_SSH_PORT {
        String::new()
    } else {
        format!(":{}", ssh.port)
    };
    let key = ssh
        .key
        .as_deref()
        .map(|k| format!("keyfile={}&", uri_escape(&k.to_string_lossy())))
        .unwrap_or_default();
    format!(
        "qemu+ssh://{}@{}{port}/system?{key}no_verify=1&no_tty=1",
        ssh.user,
        address.in_uri()
    )
}

/// Percent-encodes what a URI's query value cannot hold as it is (libvirt decodes it).
fn uri_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// serde-saphyr's message with the file named: `FILE:LINE:COLUMN: message` (then its snippet).
fn located(message: &str, file: &str) -> ClusterError {
    let (at, message) = backflow_pipeline::input::saphyr_position(message, file);
    ClusterError::invalid(file, at, message)
}

// The file as written: every setting optional where the host may take it from `defaults`.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    #[serde(deserialize_with = "cluster_name")]
    name: String,
    #[serde(default)]
    tls: Option<TlsFiles>,
    #[serde(default)]
    defaults: Settings,
    hosts: Spanned<Vec<HostFile>>,
}

/// What `defaults` may set, and each host override, field by field.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    ssh: SshFile,
    #[serde(default, deserialize_with = "backflow")]
    backflow: Option<String>,
    #[serde(default)]
    worker: WorkerFile,
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SshFile {
    #[serde(default, deserialize_with = "user")]
    user: Option<String>,
    #[serde(default, deserialize_with = "port")]
    port: Option<u16>,
    #[serde(default, deserialize_with = "key")]
    key: Option<PathBuf>,
    #[serde(default, deserialize_with = "known_hosts")]
    known_hosts: Option<PathBuf>,
}

#[derive(Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerFile {
    #[serde(default, deserialize_with = "enabled")]
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "max_vms")]
    max_vms: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    name: Spanned<HostName>,
    #[serde(deserialize_with = "address")]
    address: Address,
    #[serde(default, deserialize_with = "uri")]
    uri: Option<String>,
    #[serde(default)]
    ssh: SshFile,
    #[serde(default, deserialize_with = "backflow")]
    backflow: Option<String>,
    #[serde(default)]
    worker: WorkerFile,
}

/// A host's name, checked as [`name`] checks it (a newtype so that `Spanned` can hold it).
#[derive(Debug)]
struct HostName(String);

impl<'de> Deserialize<'de> for HostName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        name(d, "name").map(HostName)
    }
}

// Each field read with a message that names it and says what was expected; the position is
// the value's, which serde-saphyr adds.

/// What names (the cluster's, each host's) may be: they name files, records and log fields.
const NAME_EXPECTED: &str = "a name of 1 to 64 letters, digits, -, _ and .";

/// A value of type `T`, or the error `FIELD: expected EXPECTED` (serde-saphyr's own message
/// says only the type, `invalid u16`).
fn read<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    field: &str,
    expected: &str,
) -> Result<T, D::Error> {
    T::deserialize(d).map_err(|_| D::Error::custom(format!("{field}: expected {expected}")))
}

fn name<'de, D: Deserializer<'de>>(d: D, field: &str) -> Result<String, D::Error> {
    let text: String = read(d, field, NAME_EXPECTED)?;
    let ok = !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(D::Error::custom(format!(
            "{field}: expected {NAME_EXPECTED}, not `{text}`"
        )));
    }
    Ok(text)
}

fn cluster_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    name(d, "name")
}

fn address<'de, D: Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
    const EXPECTED: &str = "an IP address or a host name";
    let text: String = read(d, "address", EXPECTED)?;
    text.parse()
        .map_err(|why| D::Error::custom(format!("address: expected {EXPECTED}; {why}")))
}

fn uri<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    const EXPECTED: &str = "a libvirt URI such as qemu+ssh://root@ADDRESS/system";
    let text: String = read(d, "uri", EXPECTED)?;
    let scheme_ok = text.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if !scheme_ok || text.contains(char::is_whitespace) {
        return Err(D::Error::custom(format!(
            "uri: expected {EXPECTED}, not `{text}`"
        )));
    }
    Ok(Some(text))
}

fn user<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    const EXPECTED: &str = "a user name (letters, digits, -, _ and ., not starting with -)";
    let text: String = read(d, "user", EXPECTED)?;
    let ok = !text.is_empty()
        && !text.starts_with('-')
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(D::Error::custom(format!(
            "user: expected {EXPECTED}, not `{text}`"
        )));
    }
    Ok(Some(text))
}

fn port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    const EXPECTED: &str = "a TCP port from 1 to 65535";
    let n: u64 = read(d, "port", EXPECTED)?;
    match u16::try_from(n) {
        Ok(port) if port > 0 => Ok(Some(port)),
        _ => Err(D::Error::custom(format!(
            "port: expected {EXPECTED}, not {n}"
        ))),
    }
}

fn enabled<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    read(d, "enabled", "true or false").map(Some)
}

fn max_vms<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    const EXPECTED: &str = "a number of VMs, at least 1";
    let n: u64 = read(d, "max_vms", EXPECTED)?;
    match u32::try_from(n) {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err(D::Error::custom(format!(
            "max_vms: expected {EXPECTED}, not {n}"
        ))),
    }
}

/// The files of the controller and of the hosts are named by absolute paths: the file is read
/// by processes in other working directories, on other hosts.
fn absolute<'de, D: Deserializer<'de>>(d: D, field: &str) -> Result<PathBuf, D::Error> {
    const EXPECTED: &str = "an absolute path";
    let text: String = read(d, field, EXPECTED)?;
    if !text.starts_with('/') {
        return Err(D::Error::custom(format!(
            "{field}: expected {EXPECTED}, not `{text}`"
        )));
    }
    Ok(PathBuf::from(text))
}

fn key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    absolute(d, "key").map(Some)
}

fn known_hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    absolute(d, "known_hosts").map(Some)
}

fn tls_ca<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    absolute(d, "ca")
}

fn tls_cert<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    absolute(d, "cert")
}

fn tls_key<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    absolute(d, "key")
}

/// `backflow`: an absolute path, or a bare command name the remote shell finds on its PATH
/// (a relative path would depend on the remote user's home directory).
fn backflow<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    const EXPECTED: &str =
        "the backflow binary on the host: an absolute path, or a name found on its PATH";
    let text: String = read(d, "backflow", EXPECTED)?;
    let ok = !text.is_empty()
        && !text.contains(['\0', '\n'])
        && !text.starts_with('-')
        && (text.starts_with('/') || !text.contains('/'));
    if !ok {
        return Err(D::Error::custom(format!(
            "backflow: expected {EXPECTED}, not `{text}`"
        )));
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = "\
name: lab
tls:
  ca: /lab/pki/ca-cert.pem
  cert: /lab/pki/client-cert.pem
  key: /lab/pki/client-key.pem
defaults:
  ssh: {user: root, port: 22, key: /lab/ssh/id_ed25519}
  backflow: /opt/backflow/bin/backflow
  worker: {enabled: true, max_vms: 2}
hosts:
  - name: h1
    address: 10.77.3.11
    uri: qemu+ssh://root@10.77.3.11/system?keyfile=/lab/ssh/id_ed25519&no_verify=1&no_tty=1
    worker: {enabled: false}
  - name: h2
    address: 10.77.3.12
    ssh: {port: 2222, user: backup}
    worker: {max_vms: 4}
  - name: h3
    address: kvm3.example.com
    backflow: backflow
    ssh: {known_hosts: /etc/backflow/known_hosts}
";

    #[test]
    fn the_lab_file_reads_with_defaults_merged_field_by_field() {
        let c = parse(LAB, "/lab/cluster.yaml").unwrap();
        assert_eq!(c.name, "lab");
        assert_eq!(
            c.tls,
            Some(TlsFiles {
                ca: "/lab/pki/ca-cert.pem".into(),
                cert: "/lab/pki/client-cert.pem".into(),
                key: "/lab/pki/client-key.pem".into(),
            })
        );
        let [h1, h2, h3] = &c.hosts[..] else {
            panic!("{:?}", c.hosts)
        };
        // h1: its own uri; the worker disabled, max_vms still the defaults'.
        assert_eq!(h1.address, Address::Ip("10.77.3.11".parse().unwrap()));
        assert_eq!(
            h1.uri,
            "qemu+ssh://root@10.77.3.11/system?keyfile=/lab/ssh/id_ed25519&no_verify=1&no_tty=1"
        );
        assert_eq!(
            h1.worker,
            Worker {
                enabled: false,
                max_vms: 2
            }
        );
        assert_eq!(h1.backflow, "/opt/backflow/bin/backflow");
        // h2: port and user its own, the key the defaults'; the uri built from them.
        assert_eq!(
            h2.ssh,
            Ssh {
                user: "backup".into(),
                port: 2222,
                key: Some("/lab/ssh/id_ed25519".into()),
                known_hosts: Some("/lab/ssh/known_hosts".into()),
            }
        );
        assert_eq!(
            h2.uri,
            "qemu+ssh://backup@10.77.3.12:2222/system?keyfile=/lab/ssh/id_ed25519&no_verify=1&no_tty=1"
        );
        assert_eq!(
            h2.worker,
            Worker {
                enabled: true,
                max_vms: 4
            }
        );
        // h3: a DNS name, its own known-hosts file and a backflow on its PATH.
        assert_eq!(h3.address, Address::Name("kvm3.example.com".into()));
        assert_eq!(h3.backflow, "backflow");
        assert_eq!(
            h3.ssh.known_hosts,
            Some(PathBuf::from("/etc/backflow/known_hosts"))
        );
        assert_eq!(h3.ssh.port, 22);
        assert_eq!(c.host("h2"), Some(h2));
        assert_eq!(c.host("h4"), None);
    }

    #[test]
    fn a_minimal_file_takes_the_built_in_defaults() {
        let c = parse(
            "name: one\nhosts:\n  - {name: kvm1, address: \"fd00::11\"}\n",
            "c.yaml",
        )
        .unwrap();
        assert_eq!(c.tls, None);
        let h = &c.hosts[0];
        assert_eq!(
            h.ssh,
            Ssh {
                user: DEFAULT_SSH_USER.into(),
                port: DEFAULT_SSH_PORT,
                key: None,
                known_hosts: None,
            }
        );
        assert_eq!(h.backflow, DEFAULT_BACKFLOW);
        assert_eq!(
            h.worker,
            Worker {
                enabled: true,
                max_vms: DEFAULT_MAX_VMS
            }
        );
        assert_eq!(
            h.uri,
            "qemu+ssh://root@[fd00::11]/system?no_verify=1&no_tty=1"
        );
    }

    #[test]
    fn a_key_path_is_escaped_in_the_uri() {
        let ssh = Ssh {
            user: "root".into(),
            port: 22,
            key: Some("/srv/my keys/id&1".into()),
            known_hosts: None,
        };
        let uri = ssh_uri(&ssh, &Address::Name("kvm1".into()));
        assert_eq!(
            uri,
            "qemu+ssh://root@kvm1/system?keyfile=/srv/my%20keys/id%261&no_verify=1&no_tty=1"
        );
    }

    #[test]
    fn addresses_are_ips_or_host_names() {
        for ok in [
            "10.0.0.1",
            "::1",
            "kvm1",
            "kvm-1.example.com",
            "kvm1.example.com.",
        ] {
            assert!(ok.parse::<Address>().is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.300",
            "10.0.0",
            "-kvm1",
            "kvm_1",
            "kvm1..example",
            "a b",
            "",
            "root@kvm1",
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }

    /// Each mistake: the file, line and column of the value, the field, and what was expected.
    #[test]
    fn mistakes_name_file_line_column_field_and_what_was_expected() {
        let host = "hosts:\n  - {name: h1, address: 10.0.0.1}\n";
        let cases: Vec<(String, &str, &str)> = vec![
            (
                format!("name: lab\ncolour: blue\n{host}"),
                "c.yaml:2:1: ",
                "unknown field `colour`",
            ),
            (
                "name: lab\nhosts:\n  - {name: h1, adress: 10.0.0.1}\n".into(),
                "c.yaml:3:16: ",
                "unknown field `adress`",
            ),
            (
                format!("name: lab\ndefaults:\n  ssh: {{user: root, prot: 22}}\n{host}"),
                "c.yaml:3:21: ",
                "unknown field `prot`",
            ),
            (
                format!("name: lab\ndefaults:\n  worker: {{enable: true}}\n{host}"),
                "c.yaml:3:12: ",
                "unknown field `enable`",
            ),
            (
                format!("name: lab\ntls: {{ca: /a, cert: /b, key: /c, crl: /d}}\n{host}"),
                "c.yaml:2:34: ",
                "unknown field `crl`",
            ),
            (
                format!("name: lab\ntls: {{ca: /a, cert: /b}}\n{host}"),
                "c.yaml:2:15: ",
                "missing field `key`",
            ),
            (
                "hosts:\n  - {name: h1, address: 10.0.0.1}\n".into(),
                "c.yaml:1:1: ",
                "missing field `name`",
            ),
            ("name: lab\n".into(), "c.yaml:1:1: ", "missing field `hosts`"),
            (
                "name: lab\nhosts: []\n".into(),
                "c.yaml:2:8: ",
                "hosts: expected at least one host",
            ),
            (
                "name: lab\nhosts:\n  - {name: h1}\n".into(),
                "c.yaml:3:6: ",
                "missing field `address`",
            ),
            (
                format!("name: my lab\n{host}"),
                "c.yaml:1:7: ",
                "name: expected a name of 1 to 64 letters",
            ),
            (
                "name: lab\nhosts:\n  - {name: h1, address: 10.0.0.1}\n  - {name: h2, address: 10.0.0.2}\n  - {name: h1, address: 10.0.0.3}\n"
                    .into(),
                "c.yaml:5:12: ",
                "name: expected a name no other host has; `h1` is the name of the host at line 3",
            ),
            (
                "name: lab\nhosts:\n  - {name: [h1], address: 10.0.0.1}\n".into(),
                "c.yaml:3:12: ",
                "name: expected a name of 1 to 64",
            ),
            (
                "name: lab\nhosts:\n  - {name: h1, address: 10.0.0.256}\n".into(),
                "c.yaml:3:25: ",
                "address: expected an IP address or a host name; `10.0.0.256` is not an IP address",
            ),
            (
                "name: lab\nhosts:\n  - name: h1\n    address: kvm_1\n".into(),
                "c.yaml:4:14: ",
                "address: expected an IP address or a host name; `kvm_1` is neither",
            ),
            (
                "name: lab\nhosts:\n  - name: h1\n    address: 10.0.0.1\n    uri: /var/run/libvirt\n"
                    .into(),
                "c.yaml:5:10: ",
                "uri: expected a libvirt URI",
            ),
            (
                format!("name: lab\ndefaults:\n  worker: {{max_vms: 0}}\n{host}"),
                "c.yaml:3:21: ",
                "max_vms: expected a number of VMs, at least 1, not 0",
            ),
            (
                "name: lab\nhosts:\n  - name: h1\n    address: 10.0.0.1\n    worker: {max_vms: -2}\n"
                    .into(),
                "c.yaml:5:23: ",
                "max_vms: expected a number of VMs, at least 1",
            ),
            (
                format!("name: lab\ndefaults:\n  worker: {{enabled: maybe}}\n{host}"),
                "c.yaml:3:21: ",
                "enabled: expected true or false",
            ),
            (
                format!("name: lab\ndefaults:\n  ssh: {{port: 0}}\n{host}"),
                "c.yaml:3:15: ",
                "port: expected a TCP port from 1 to 65535, not 0",
            ),
            (
                format!("name: lab\ndefaults:\n  ssh: {{port: 70000}}\n{host}"),
                "c.yaml:3:15: ",
                "port: expected a TCP port from 1 to 65535, not 70000",
            ),
            (
                format!("name: lab\ndefaults:\n  ssh: {{port: ssh}}\n{host}"),
                "c.yaml:3:15: ",
                "port: expected a TCP port from 1 to 65535",
            ),
            (
                format!("name: lab\ndefaults:\n  ssh: {{user: -oProxyCommand=x}}\n{host}"),
                "c.yaml:3:15: ",
                "user: expected a user name",
            ),
            (
                format!("name: lab\ndefaults:\n  ssh: {{key: ssh/id_ed25519}}\n{host}"),
                "c.yaml:3:14: ",
                "key: expected an absolute path, not `ssh/id_ed25519`",
            ),
            (
                format!("name: lab\ndefaults:\n  ssh: {{known_hosts: kh}}\n{host}"),
                "c.yaml:3:22: ",
                "known_hosts: expected an absolute path, not `kh`",
            ),
            (
                format!("name: lab\ntls: {{ca: ca.pem, cert: /b, key: /c}}\n{host}"),
                "c.yaml:2:11: ",
                "ca: expected an absolute path, not `ca.pem`",
            ),
            (
                format!("name: lab\ntls: {{ca: /a, cert: b.pem, key: /c}}\n{host}"),
                "c.yaml:2:21: ",
                "cert: expected an absolute path, not `b.pem`",
            ),
            (
                format!("name: lab\ntls: {{ca: /a, cert: /b, key: c.pem}}\n{host}"),
                "c.yaml:2:30: ",
                "key: expected an absolute path, not `c.pem`",
            ),
            (
                format!("name: lab\ndefaults:\n  backflow: bin/backflow\n{host}"),
                "c.yaml:3:13: ",
                "backflow: expected the backflow binary on the host: an absolute path, or a name",
            ),
            (
                "name: lab\nhosts:\n  - name: h1\n    address: 10.0.0.1\n    ssh: {port: 22, key: [a]}\n"
                    .into(),
                "c.yaml:5:26: ",
                "key: expected an absolute path",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(text, at, what)| {
                let e = match parse(text, "c.yaml") {
                    Ok(c) => return Some(format!("{text:?} was read: {c:?}")),
                    Err(e) => e.to_string(),
                };
                let first = e.lines().next().unwrap_or_default();
                (!first.starts_with(at) || !first.contains(what))
                    .then(|| format!("{text:?}:\n  expected {at}... {what}\n  got {first}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn a_file_that_is_no_regular_file_or_too_large_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: ", dir.path().display())) && e.contains("regular file"),
            "{e}"
        );
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; MAX_CLUSTER_FILE_SIZE as usize + 1]).unwrap();
        let e = load(&big).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", big.display())), "{e}");
        let missing = dir.path().join("missing.yaml");
        let e = load(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: cannot read the cluster file",
                missing.display()
            )),
            "{e}"
        );
        let good = dir.path().join("c.yaml");
        std::fs::write(&good, LAB).unwrap();
        assert_eq!(load(&good).unwrap().hosts.len(), 3);
    }
}
