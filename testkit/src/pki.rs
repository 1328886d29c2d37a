//! x509 certificates for NBD over TLS in tests and labs, made with GnuTLS' `certtool` (Debian:
//! gnutls-bin), the tool libvirt's and QEMU's TLS documentation uses.
//!
//! # Layout
//! One CA and the certificates it signed, under one directory `DIR` (the lab uses `DIR/pki`):
//! - `DIR/ca-cert.pem`, `DIR/ca-key.pem`: the CA (its key stays here, to sign more).
//! - `DIR/HOST/{ca-cert.pem, server-cert.pem, server-key.pem}`: a server, in the layout QEMU's
//!   `tls-creds-x509,endpoint=server,dir=DIR/HOST` and libvirt's `backup_tls_x509_cert_dir`
//!   read (both want the CA next to the server's certificate).
//! - `DIR/client-cert.pem`, `DIR/client-key.pem`: the client (a worker), so that `DIR` itself is
//!   a `tls-creds-x509,endpoint=client` directory too, for `qemu-img` or `nbdinfo`.
//!
//! # Why the files are world-readable
//! The QEMU that libvirt starts runs as `libvirt-qemu`, not root, and must read its server key;
//! these are throwaway keys of tests and labs, so every file and directory is readable by all
//! rather than chowned to a user that may not exist. Never use this for real keys.
//!
//! Keys are RSA 2048: what GnuTLS, QEMU and rustls all accept without options, and quick to
//! generate (a CA, a server and a client take well under a second).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::qemu::run_command;

/// How long the certificates are valid: longer than any test or lab lives.
const VALIDITY_DAYS: u32 = 365;

/// A CA in a directory, able to sign server and client certificates.
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
}

/// A client's certificate and key.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// Makes a new CA (common name `name`) in `dir`, which is created when missing.
    pub fn create(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        readable(dir);
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        let template = pki.template(
            "ca",
            &format!("cn = \"{name}\"\nca\ncert_signing_key\ncrl_signing_key\n"),
        );
        let key = dir.join("ca-key.pem");
        generate_key(&key);
        run_command(
            Command::new("certtool")
                .arg("--generate-self-signed")
                .arg("--load-privkey")
                .arg(&key)
                .arg("--template")
                .arg(&template)
                .arg("--outfile")
                .arg(dir.join("ca-cert.pem")),
        );
        readable(&dir.join("ca-cert.pem"));
        pki
    }

    /// The directory of the CA.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA's certificate, which clients verify servers against.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    /// Makes `DIR/HOST` with a server certificate for the addresses `ips` and names `dns`
    /// (subject alternative names; the first of them is also the common name) and returns the
    /// directory, ready for QEMU's `tls-creds-x509,endpoint=server,dir=...`.
    pub fn server(&self, host: &str, ips: &[&str], dns: &[&str]) -> PathBuf {
        assert!(
            !ips.is_empty() || !dns.is_empty(),
            "a server certificate needs an address or a name"
        );
        let dir = self.dir.join(host);
        std::fs::create_dir_all(&dir).unwrap();
        readable(&dir);
        let cn = ips.first().or(dns.first()).unwrap();
        let mut body = format!("organization = \"Backflow tests\"\ncn = \"{cn}\"\n");
        for ip in ips {
            body.push_str(&format!("ip_address = \"{ip}\"\n"));
        }
        for name in dns {
            body.push_str(&format!("dns_name = \"{name}\"\n"));
        }
        body.push_str("tls_www_server\nencryption_key\nsigning_key\n");
        let template = self.template(&format!("server-{host}"), &body);
        self.sign(
            &template,
            &dir.join("server-key.pem"),
            &dir.join("server-cert.pem"),
        );
        std::fs::copy(self.ca_cert(), dir.join("ca-cert.pem")).unwrap();
        readable(&dir.join("ca-cert.pem"));
        dir
    }

    /// Makes `DIR/client-cert.pem` and `DIR/client-key.pem` with the common name `name`.
    pub fn client(&self, name: &str) -> ClientCert {
        let body = format!(
            "organization = \"Backflow tests\"\ncn = \"{name}\"\ntls_www_client\nencryption_key\nsigning_key\n"
        );
        let template = self.template("client", &body);
        let cert = ClientCert {
            cert: self.dir.join("client-cert.pem"),
            key: self.dir.join("client-key.pem"),
        };
        self.sign(&template, &cert.key, &cert.cert);
        cert
    }

    /// A key at `key` and a certificate at `cert` signed by this CA, from `template`.
    fn sign(&self, template: &Path, key: &Path, cert: &Path) {
        generate_key(key);
        run_command(
            Command::new("certtool")
                .arg("--generate-certificate")
                .arg("--load-privkey")
                .arg(key)
                .arg("--load-ca-certificate")
                .arg(self.ca_cert())
                .arg("--load-ca-privkey")
                .arg(self.dir.join("ca-key.pem"))
                .arg("--template")
                .arg(template)
                .arg("--outfile")
                .arg(cert),
        );
        readable(cert);
    }

    /// Writes a certtool template `DIR/NAME.info` with `body` and the validity.
    fn template(&self, name: &str, body: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.info"));
        std::fs::write(&path, format!("{body}expiration_days = {VALIDITY_DAYS}\n")).unwrap();
        path
    }
}

fn generate_key(path: &Path) {
    run_command(
        Command::new("certtool")
            .args(["--generate-privkey", "--key-type=rsa", "--bits=2048"])
            .arg("--outfile")
            .arg(path),
    );
    readable(path);
}

/// World-readable (and traversable, for directories): see the module docs.
fn readable(path: &Path) {
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
