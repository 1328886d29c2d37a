//! TLS for NBD over TCP (`NBD_OPT_STARTTLS`): the settings a caller gives, the rustls client
//! configuration made from them, and the translation of rustls' failures into messages that say
//! which file, which CA and which name were involved.
//!
//! # Why rustls with ring
//! rustls is already in the workspace (the S3 client, the mailer) with the ring provider, so TLS
//! here costs no new native dependency and no second crypto library; aws-lc-rs would need cmake
//! and a long C build on every machine that builds Backflow. ring's AES-GCM and ChaCha20 run at
//! several GiB/s per core, far above what one NBD connection carries.
//!
//! # What is verified
//! - The server's certificate chain must lead to a certificate of [`TlsSettings::ca`] (only
//!   those: the system's roots are never trusted here), be valid now, and name the address or
//!   host name the caller expects (an IP address is matched against the certificate's IP SANs, a
//!   name against its DNS SANs; webpki ignores the subject's CN).
//! - The client presents [`TlsSettings::cert`] and its key when given: QEMU's
//!   `tls-creds-x509,verify-peer=on` (libvirt's `backup_tls_x509_verify = 1`, the default)
//!   refuses clients without one.
//! - TLS 1.3 or 1.2 (the NBD specification requires 1.2 at least), ring's cipher suites with
//!   AES-128-GCM preferred (see [`TlsSettings::client_config`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

use crate::error::{NbdError, Result};

/// How long the TLS handshake may take in all, from the client's hello to the server's
/// finished message. A handshake is two round trips and one signature on each side; a server
/// that has not finished after this long is stuck, not slow.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a client needs to speak TLS to an NBD server: files in PEM, as QEMU's `tls-creds-x509`
/// and `certtool` write them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The CA certificate(s) that signed the servers' certificates (`ca-cert.pem`).
    pub ca: PathBuf,
    /// The client's certificate chain (`client-cert.pem`); `None` presents none, which servers
    /// started with `verify-peer=on` refuse.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (`client-key.pem`); given exactly when `cert` is.
    pub key: Option<PathBuf>,
    /// Bound of the whole handshake ([`DEFAULT_TLS_HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
}

impl TlsSettings {
    /// Verifies servers against `ca` and presents `cert` with `key`.
    pub fn new(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsSettings {
            ca: ca.into(),
            cert: Some(cert.into()),
            key: Some(key.into()),
            handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        }
    }

    /// Verifies servers against `ca` and presents no certificate of its own.
    pub fn without_client_cert(ca: impl Into<PathBuf>) -> Self {
        TlsSettings {
            ca: ca.into(),
            cert: None,
            key: None,
            handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        }
    }

    /// Reads the files and makes the rustls configuration. Every failure names the file.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        let ca_certs = read_certs(&self.ca)?;
        for cert in ca_certs {
            roots.add(cert).map_err(|e| NbdError::TlsSetup {
                path: self.ca.clone(),
                detail: format!("a certificate cannot serve as a CA: {e}"),
            })?;
        }
        let mut provider = rustls::crypto::ring::default_provider();
        // AES-128-GCM before AES-256-GCM (ring lists the latter first; GnuTLS follows the
        // client's order): 10 AES rounds instead of 14, which took about a fifth off the CPU
        // time per byte of both the client and QEMU (benches/nbd-tls.sh), for a suite TLS 1.3
        // mandates and a key beyond any search.
        provider.cipher_suites.sort_by_key(|s| match s.suite() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 2,
            _ => 3,
        });
        let provider = Arc::new(provider);
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| NbdError::TlsSetup {
                path: self.ca.clone(),
                detail: format!("rustls refuses TLS 1.3 and 1.2 with ring: {e}"),
            })?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)?;
                let key_der =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| NbdError::TlsSetup {
                        path: key.clone(),
                        detail: format!("no private key in PEM (PKCS#1, PKCS#8 or SEC1): {e}"),
                    })?;
                let key_der = match key_der {
                    PrivateKeyDer::Sec1(sec1) => PrivateKeyDer::Sec1(
                        strip_sec1_sign_byte(sec1.secret_sec1_der())
                            .unwrap_or_else(|| sec1.secret_sec1_der().to_vec())
                            .into(),
                    ),
                    other => other,
                };
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| NbdError::TlsSetup {
                        path: key.clone(),
                        detail: format!("not a usable key for {}: {e}", cert.display()),
                    })?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), None) => {
                return Err(NbdError::TlsSetup {
                    path: cert.clone(),
                    detail: "a client certificate needs its key, and none was given".into(),
                });
            }
            (None, Some(key)) => {
                return Err(NbdError::TlsSetup {
                    path: key.clone(),
                    detail: "a client key was given without its certificate".into(),
                });
            }
        };
        Ok(Arc::new(config))
    }
}

/// A SEC1 EC private key (`-----BEGIN EC PRIVATE KEY-----`) whose private scalar carries a leading
/// zero byte, re-encoded without it; `None` when `der` is not such a key.
///
/// GnuTLS's `certtool --generate-privkey --key-type=ecdsa`, which libvirt's and QEMU's TLS guides
/// use, writes the scalar as an integer: when its top bit is set (half the keys), with a zero byte
/// before it (33 bytes for P-256). SEC1 says the octet string is exactly the curve's size, and ring
/// refuses anything else ("failed to parse private key"), so half of such keys would not load.
fn strip_sec1_sign_byte(der: &[u8]) -> Option<Vec<u8>> {
    // ECPrivateKey ::= SEQUENCE { version INTEGER (1), privateKey OCTET STRING, [0] ..., [1] ... }
    let (outer_len, header) = der_length(der.get(1..)?)?;
    let body = der.get(1 + header..)?;
    if der[0] != 0x30 || body.len() != outer_len || !body.starts_with(&[0x02, 0x01, 0x01, 0x04]) {
        return None;
    }
    let scalar_len = *body.get(4)? as usize;
    // P-256 (32), P-384 (48), P-521 (66): one more byte, and that byte a zero.
    if ![33, 49, 67].contains(&scalar_len) || *body.get(5)? != 0 {
        return None;
    }
    let rest = body.get(5 + scalar_len..)?;
    let mut inner = vec![0x02, 0x01, 0x01, 0x04, (scalar_len - 1) as u8];
    inner.extend_from_slice(body.get(6..5 + scalar_len)?);
    inner.extend_from_slice(rest);
    let mut out = vec![0x30];
    match inner.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend_from_slice(&[0x81, n as u8]),
        n => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(&inner);
    Some(out)
}

/// A DER length at the start of `bytes`: (the length, how many bytes encode it).
fn der_length(bytes: &[u8]) -> Option<(usize, usize)> {
    match *bytes.first()? {
        n if n < 0x80 => Some((n as usize, 1)),
        0x81 => Some((*bytes.get(1)? as usize, 2)),
        0x82 => Some(((*bytes.get(1)? as usize) << 8 | *bytes.get(2)? as usize, 3)),
        _ => None,
    }
}

/// Every certificate of a PEM file, at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let setup = |detail: String| NbdError::TlsSetup {
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| setup(format!("cannot read it: {e}")))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| setup(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(setup("holds no certificate (BEGIN CERTIFICATE)".into()));
    }
    Ok(certs)
}

/// The name a server's certificate must carry: an IP address or a DNS name.
pub(crate) fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_owned()).map_err(|e| {
        NbdError::InvalidArgument(format!(
            "{name:?} is neither an IP address nor a DNS name to verify a TLS server by: {e}"
        ))
    })
}

/// Why a handshake failed, in words, from the rustls error inside `err` (when there is one).
/// `settings` and `name` say what was expected.
pub(crate) fn describe_failure(err: &std::io::Error, settings: &TlsSettings, name: &str) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                "the server closed the connection during the TLS handshake".into()
            }
            _ => format!("the TLS handshake failed: {err}"),
        };
    };
    let ca = settings.ca.display();
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => {
                format!("the server's certificate is not signed by the CA in {ca} (unknown issuer)")
            }
            CertificateError::BadSignature => format!(
                "the server's certificate chain has a bad signature (checked against the CA in {ca})"
            ),
            CertificateError::NotValidForName => {
                format!("the server's certificate is not valid for {name:?}")
            }
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "the server's certificate is not valid for {name:?}; it names {}",
                if presented.is_empty() {
                    "nothing".to_string()
                } else {
                    presented.join(", ")
                }
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the server's certificate has expired ({cert:?})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("the server's certificate is not valid yet ({cert:?})")
            }
            other => format!("the server's certificate is refused: {other:?} (CA {ca})"),
        },
        rustls::Error::AlertReceived(alert) => rejected_by_alert(*alert, settings),
        other => format!("the TLS handshake failed: {other}"),
    }
}

/// The server refused the session with `alert`, during the handshake or right after it (in TLS
/// 1.3 a client learns that its certificate was refused only after its own handshake ended).
pub(crate) fn rejected_by_alert(alert: AlertDescription, settings: &TlsSettings) -> String {
    let ours = match &settings.cert {
        Some(cert) => format!(
            "our certificate {} may not be signed by the CA the server trusts",
            cert.display()
        ),
        None => "no client certificate was configured, and servers with verify-peer=on require one"
            .to_string(),
    };
    match alert {
        AlertDescription::CertificateRequired => {
            format!("the server requires a client certificate (alert certificate_required); {ours}")
        }
        AlertDescription::BadCertificate
        | AlertDescription::UnknownCA
        | AlertDescription::CertificateUnknown
        | AlertDescription::HandshakeFailure
        | AlertDescription::AccessDenied => {
            format!("the server refused the TLS session (alert {alert:?}); {ours}")
        }
        other => format!("the server ended the TLS session with alert {other:?}"),
    }
}

/// A failure on the first exchange after the handshake, described as the server refusing the
/// session: QEMU checks the client's certificate only once its handshake ended, then closes
/// the connection without an alert.
pub(crate) fn describe_after_handshake(
    err: &std::io::Error,
    settings: &TlsSettings,
) -> Option<String> {
    if let Some(rustls::Error::AlertReceived(alert)) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return Some(rejected_by_alert(*alert, settings));
    }
    use std::io::ErrorKind::*;
    if matches!(
        err.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    ) {
        let why = match &settings.cert {
            Some(cert) => format!(
                "it did not accept our client certificate {} (signed by another CA, or refused by the server's ACL)",
                cert.display()
            ),
            None => "it requires a client certificate and none was configured (QEMU's verify-peer=on, libvirt's backup_tls_x509_verify)".to_string(),
        };
        return Some(format!(
            "the server closed the connection right after the TLS handshake: {why}"
        ));
    }
    None
}
