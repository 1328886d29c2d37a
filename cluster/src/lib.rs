//! Clusters: the hosts the controller (`backflow job run`, the daemon) reaches, how it reaches
//! each host's libvirt and starts a worker there, a check of each host, and every VM of the
//! cluster with the one host it belongs to.
//!
//! # The cluster file
//! YAML, read with `serde-saphyr` as specs and job files are: every mistake is reported as
//! `FILE:LINE:COLUMN: FIELD: expected WHAT`, an unknown field is refused, and the file must be a
//! regular file of at most [`MAX_CLUSTER_FILE_SIZE`] bytes.
//!
//! ```yaml
//! name: lab                          # required: letters, digits, -, _ and .
//! tls:                               # NBD over TLS between hosts, the client's side (each
//!   ca: /etc/backflow/pki/ca-cert.pem        #   host's server side is in its qemu.conf);
//!   cert: /etc/backflow/pki/client-cert.pem  #   all three, or no `tls` at all
//!   key: /etc/backflow/pki/client-key.pem
//! defaults:                          # what every host has unless it says otherwise
//!   ssh:
//!     user: root                     # default root
//!     port: 22                       # default 22
//!     key: /etc/backflow/ssh/id_ed25519      # default: ssh's own (agent, ~/.ssh)
//!     known_hosts: /etc/backflow/ssh/known_hosts  # default: `known_hosts` beside `key`,
//!                                    #   without a key ssh's own (~/.ssh/known_hosts)
//!   backflow: /usr/local/bin/backflow  # the binary on the hosts; default `backflow` (PATH)
//!   worker: {enabled: true, max_vms: 2}  # defaults true and 1
//! hosts:                             # at least one
//!   - name: h1                       # required, unique in the file
//!     address: 10.77.3.11            # required: an IP address or a host name, where the
//!                                    #   controller and the other hosts reach it (ssh, NBD)
//!     uri: qemu+ssh://root@10.77.3.11/system?keyfile=/etc/backflow/ssh/id_ed25519&no_verify=1&no_tty=1
//!                                    # its libvirt, as the controller opens it; default built
//!                                    #   from its ssh settings, as here ([`ssh_uri`])
//!     worker: {enabled: false}       # `ssh`, `backflow` and `worker` override the defaults
//!   - name: h2                       #   field by field: h1 keeps max_vms 2
//!     address: kvm2.example.com
//!     ssh: {port: 2222}
//! ```
//!
//! Every path is absolute: the file is read by processes in other working directories, and
//! `backflow` names a file on another machine. Settings resolve field by field: the host's own,
//! else `defaults`', else the built-in default ([`DEFAULT_SSH_USER`], [`DEFAULT_SSH_PORT`],
//! [`DEFAULT_BACKFLOW`], [`DEFAULT_MAX_VMS`], a worker enabled).
//!
//! # Layout
//! - [`file`](mod@file): the file, [`Cluster`] and its [`Host`]s, read with positions in every
//!   error ([`load`], [`parse`]).
//! - [`ssh`]: the worker access: the ssh command line to a host ([`Host::ssh_command`]),
//!   bounded in time, and `BACKFLOW --version` over it.
//! - [`check`](mod@check): `backflow cluster check`, each host's libvirt and worker access.
//! - [`discover`](mod@discover): every VM of the cluster with its host, a VM defined on several
//!   hosts resolved by UUID and state ([`discover()`]).
//! - [`error`]: [`ClusterError`] (the file) and [`HostError`] (a host).

pub mod check;
pub mod discover;
pub mod error;
pub mod file;
pub mod ssh;

/// The types of [`ClusterVm`]'s fields.
pub use backflow_libvirt::{DiskInfo, VmState};
pub use check::{DEFAULT_TIMEOUT, HostCheck, LibvirtFacts, WorkerCheck, check, reachable};
pub use discover::{
    ClusterVm, Conflict, Discovery, HostListing, UnreachableHost, discover, discover_within,
    resolve,
};
pub use error::{ClusterError, HostError};
pub use file::{
    Address, Cluster, DEFAULT_BACKFLOW, DEFAULT_MAX_VMS, DEFAULT_SSH_PORT, DEFAULT_SSH_USER, Host,
    MAX_CLUSTER_FILE_SIZE, Ssh, TlsFiles, Worker, load, parse, ssh_uri,
};
