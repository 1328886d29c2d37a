//! NBD over TCP with TLS against a real `qemu-nbd` with `tls-creds-x509,verify-peer=on`, with
//! certificates made by certtool (`testkit::pki`): the bytes and block status equal what QEMU
//! wrote, and every way the TLS setup can be wrong fails with a message that says which. Two
//! handshake failures no real server produces on demand (silence after STARTTLS, bytes injected
//! before the TLS hello) are played by a scripted server on loopback. One test reads a running
//! domain's pull-mode backup that libvirt serves with TLS, on a libvirtd of its own (the
//! machine's daemon has no `backup_tls_x509_cert_dir`, and other tests share it).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use backflow_libvirt::job_xml::{DiskMode, Endpoint, JobDisk, parse_running_job, pull_backup};
use backflow_nbd::{Client, NbdError, STATE_DIRTY, STATE_HOLE, TlsSettings, Transport};
use backflow_testkit::libvirt::make_traversable;
use backflow_testkit::libvirtd::PrivateLibvirtd;
use backflow_testkit::pki::{ClientCert, Pki};
use common::*;

/// A CA with a server certificate for 127.0.0.1 and localhost, and a client certificate.
struct Certs {
    pki: Pki,
    server_dir: std::path::PathBuf,
    client: ClientCert,
}

fn certs(dir: &Path) -> Certs {
    let pki = Pki::create(&dir.join("pki"), "Backflow test CA");
    let server_dir = pki.server("server", &["127.0.0.1"], &["localhost"]);
    let client = pki.client("backflow-worker");
    Certs {
        pki,
        server_dir,
        client,
    }
}

impl Certs {
    fn settings(&self) -> TlsSettings {
        TlsSettings::new(self.pki.ca_cert(), &self.client.cert, &self.client.key)
    }
}

/// The qcow2 fixture exported on 127.0.0.1 by a qemu-nbd that requires TLS and a client
/// certificate signed by the CA (FORCEDTLS: every option but STARTTLS is refused before TLS).
fn tls_server(dir: &Path, certs: &Certs) -> QemuNbd {
    tls_server_with(dir, certs, "")
}

/// [`tls_server`] with more properties of QEMU's `tls-creds-x509` object (`,priority=...`).
fn tls_server_with(dir: &Path, certs: &Certs, properties: &str) -> QemuNbd {
    let image = qcow2_image(dir);
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on{properties}",
        certs.server_dir.display()
    );
    QemuNbd::start_tcp_with(
        dir,
        &image,
        "qcow2",
        &[
            "--read-only",
            "-x",
            "vda",
            "-B",
            "b0",
            "--object",
            &object,
            "--tls-creds",
            "tls0",
        ],
    )
}

fn addr(server: &QemuNbd) -> String {
    format!("127.0.0.1:{}", server.port)
}

/// The error of a connect that must fail.
fn connect_err(server: &QemuNbd, name: &str, tls: &TlsSettings) -> NbdError {
    match Client::connect_tcp_tls(addr(server), name, tls, "vda", &[]) {
        Ok(_) => panic!("connecting to {} as {name:?} succeeded", addr(server)),
        Err(e) => e,
    }
}

#[test]
fn whole_image_over_tls_equals_qemu_img_convert() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let server = tls_server(dir.path(), &certs);
    let mut client =
        Client::connect_tcp_tls(addr(&server), "127.0.0.1", &certs.settings(), "vda", &[]).unwrap();
    assert_eq!(client.tls_protocol().as_deref(), Some("TLSv1_3"));
    assert_eq!(client.size(), IMAGE_SIZE);
    let mut whole = vec![0x5a; IMAGE_SIZE as usize];
    client.read_at(0, &mut whole).unwrap();
    client.close().unwrap();

    let read = dir.path().join("read.raw");
    std::fs::write(&read, &whole).unwrap();
    let converted = dir.path().join("converted.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-f",
            "qcow2",
            "-O",
            "raw",
            dir.path().join("disk.qcow2").to_str().unwrap(),
            converted.to_str().unwrap(),
        ],
    );
    let cmp = Command::new("cmp")
        .arg(&read)
        .arg(&converted)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "the image read over TLS differs from qemu-img convert: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn block_status_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let server = tls_server(dir.path(), &certs);
    let mut client = Client::connect_tcp_tls(
        addr(&server),
        "localhost",
        &certs.settings(),
        "vda",
        &["base:allocation", "qemu:dirty-bitmap:b0"],
    )
    .unwrap();
    assert!(client.tls_protocol().is_some());

    // Allocation and dirtiness per 64 KiB cluster and granule, as QEMU reports them.
    let g = 64 * KIB;
    let rounded = |writes: &[(u64, u64, u8)]| {
        merged(
            writes
                .iter()
                .map(|&(o, l, _)| (o / g * g, (o + l).div_ceil(g) * g))
                .collect(),
        )
    };
    let allocation = client
        .block_status(0, IMAGE_SIZE, "base:allocation")
        .unwrap();
    assert_exact_cover(&allocation, 0, IMAGE_SIZE);
    let all: Vec<_> = BEFORE_BITMAP.iter().chain(AFTER_BITMAP).copied().collect();
    assert_eq!(
        ranges_with(&allocation, |f| f & STATE_HOLE == 0),
        rounded(&all)
    );
    let dirty = client
        .block_status(0, IMAGE_SIZE, "qemu:dirty-bitmap:b0")
        .unwrap();
    assert_exact_cover(&dirty, 0, IMAGE_SIZE);
    assert_eq!(
        ranges_with(&dirty, |f| f & STATE_DIRTY != 0),
        rounded(AFTER_BITMAP)
    );
    client.close().unwrap();
}

#[test]
fn tls_1_2_when_the_server_offers_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    // GnuTLS' priority string: its defaults without TLS 1.3.
    let server = tls_server_with(dir.path(), &certs, ",priority=NORMAL:-VERS-TLS1.3");
    let mut client = Client::connect_tcp_tls(
        addr(&server),
        "127.0.0.1",
        &certs.settings(),
        "vda",
        &["base:allocation"],
    )
    .unwrap();
    assert_eq!(client.tls_protocol().as_deref(), Some("TLSv1_2"));
    let mut part = vec![0u8; (2 * MIB) as usize];
    client.read_at(0, &mut part).unwrap();
    let (offset, len, pattern) = BEFORE_BITMAP[0];
    assert!(part[..offset as usize].iter().all(|&b| b == 0));
    assert!(
        part[offset as usize..(offset + len) as usize]
            .iter()
            .all(|&b| b == pattern)
    );
    let extents = client
        .block_status(0, IMAGE_SIZE, "base:allocation")
        .unwrap();
    assert_exact_cover(&extents, 0, IMAGE_SIZE);
    client.close().unwrap();
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let server = tls_server(dir.path(), &certs);
    let other = Pki::create(&dir.path().join("other"), "Another CA");
    let stranger = other.client("stranger");
    let tls = TlsSettings::new(certs.pki.ca_cert(), &stranger.cert, &stranger.key);
    let err = connect_err(&server, "127.0.0.1", &tls);
    let text = err.to_string();
    assert!(matches!(err, NbdError::Tls { .. }), "{err:?}");
    // QEMU checks the certificate once its handshake ended and closes the connection without an
    // alert: the client learns it on its first read inside TLS.
    assert!(
        text.contains(&format!(
            "closed the connection right after the TLS handshake: it did not accept our client certificate {}",
            stranger.cert.display()
        )),
        "{text}"
    );
}

#[test]
fn a_server_signed_by_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let server = tls_server(dir.path(), &certs);
    let other = Pki::create(&dir.path().join("other"), "Another CA");
    let mut tls = certs.settings();
    tls.ca = other.ca_cert();
    let err = connect_err(&server, "127.0.0.1", &tls);
    let text = err.to_string();
    assert!(matches!(err, NbdError::Tls { .. }), "{err:?}");
    assert!(
        text.contains(&format!(
            "not signed by the CA in {}",
            other.ca_cert().display()
        )) && text.contains(&format!("tcp:{}", addr(&server))),
        "{text}"
    );
    assert!(!err.is_retryable());
}

#[test]
fn a_server_certificate_for_another_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let server = tls_server(dir.path(), &certs);
    for name in ["10.77.3.11", "kvm1.example"] {
        let err = connect_err(&server, name, &certs.settings());
        let text = err.to_string();
        assert!(matches!(err, NbdError::Tls { .. }), "{err:?}");
        assert!(
            text.contains(&format!("not valid for {name:?}"))
                && text.contains("127.0.0.1")
                && text.contains("localhost"),
            "{text}"
        );
    }
}

#[test]
fn a_server_requiring_a_client_certificate_refuses_a_client_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let server = tls_server(dir.path(), &certs);
    let tls = TlsSettings::without_client_cert(certs.pki.ca_cert());
    let err = connect_err(&server, "127.0.0.1", &tls);
    let text = err.to_string();
    assert!(matches!(err, NbdError::Tls { .. }), "{err:?}");
    assert!(
        text.contains("requires a client certificate and none was configured"),
        "{text}"
    );
}

#[test]
fn a_plain_server_is_refused_when_tls_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let image = qcow2_image(dir.path());
    let server = QemuNbd::start_tcp_with(dir.path(), &image, "qcow2", &["--read-only"]);
    let err = connect_err(&server, "127.0.0.1", &certs.settings());
    let text = err.to_string();
    assert!(matches!(err, NbdError::StartTlsRefused { .. }), "{err:?}");
    assert!(
        text.starts_with(&format!(
            "the server at tcp:{} refused STARTTLS: NBD_REP_ERR_POLICY",
            addr(&server)
        )),
        "{text}"
    );
    // The refusal was not the end of a plain-text session: the same server still serves plain
    // clients, so the refusal came from it and not from a broken connection.
    let plain = Client::connect_tcp(addr(&server), "", &[]).unwrap();
    assert_eq!(plain.size(), IMAGE_SIZE);
}

#[test]
fn a_tls_server_refuses_a_client_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let server = tls_server(dir.path(), &certs);
    let err = Client::connect_tcp(addr(&server), "vda", &[]).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, NbdError::TlsRequired { .. }), "{err:?}");
    assert!(
        text.starts_with(&format!(
            "NBD server tcp:{} requires TLS (it answered NBD_OPT_STRUCTURED_REPLY with NBD_REP_ERR_TLS_REQD)",
            addr(&server)
        )),
        "{text}"
    );
}

/// Sends SIGCONT to a stopped process when dropped, so a failing test leaves no frozen server.
struct Continue<'a>(&'a str);

impl Drop for Continue<'_> {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", self.0]).status();
    }
}

#[test]
fn read_timeouts_apply_inside_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let server = tls_server(dir.path(), &certs);
    let transport = Transport::tcp(addr(&server), Duration::from_millis(500)).unwrap();
    // A handshake bound far above the socket's: were it left on the socket after the handshake,
    // the stalled read below would wait an hour instead of half a second.
    let mut tls = certs.settings();
    tls.handshake_timeout = Duration::from_secs(3600);
    let mut client = Client::connect_tls(transport, "127.0.0.1", &tls, "vda", &[]).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    client.read_at(0, &mut buf).unwrap();

    // A server that stops answering in the middle of the session: the read fails (the socket's
    // timeout, restored after the handshake, bounds it) instead of waiting for ever.
    run("kill", &["-STOP", server.pid()]);
    let _resume = Continue(server.pid());
    let err = client.read_at(0, &mut buf).unwrap_err();
    assert!(
        matches!(&err, NbdError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "{err:?}"
    );
    assert!(err.is_retryable(), "{err}");
    // The stream is mid-record now: the client refuses to go on with it.
    assert!(matches!(
        client.read_at(0, &mut buf),
        Err(NbdError::Broken { .. })
    ));
}

#[test]
fn missing_tls_files_are_named_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope/ca-cert.pem");
    // Nothing listens on this port: a file error must come before any connect.
    let err = Client::connect_tcp_tls(
        "127.0.0.1:1",
        "127.0.0.1",
        &TlsSettings::without_client_cert(&missing),
        "",
        &[],
    )
    .unwrap_err();
    assert!(matches!(err, NbdError::TlsSetup { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("TLS file {}: cannot read it", missing.display())),
        "{err}"
    );
}

/// A scripted server on loopback: sends the fixed newstyle greeting, reads the client flags and
/// the STARTTLS option, acknowledges it, sends `after_ack` and then holds the connection open
/// without a word until the client goes away.
fn scripted_starttls_server(after_ack: &'static [u8]) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut greeting = Vec::new();
        greeting.extend_from_slice(b"NBDMAGIC");
        greeting.extend_from_slice(b"IHAVEOPT");
        greeting.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&greeting).unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        let mut option = [0u8; 16];
        s.read_exact(&mut option).unwrap();
        assert_eq!(&option[..8], b"IHAVEOPT");
        assert_eq!(
            u32::from_be_bytes(option[8..12].try_into().unwrap()),
            5,
            "the first option is NBD_OPT_STARTTLS"
        );
        let mut ack = Vec::new();
        ack.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
        ack.extend_from_slice(&5u32.to_be_bytes());
        ack.extend_from_slice(&1u32.to_be_bytes());
        ack.extend_from_slice(&0u32.to_be_bytes());
        ack.extend_from_slice(after_ack);
        s.write_all(&ack).unwrap();
        // Swallow the client's hello and whatever follows, answering nothing, until it closes.
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    (port, thread)
}

#[test]
fn a_server_silent_after_starttls_fails_the_handshake_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let (port, server) = scripted_starttls_server(b"");
    let mut tls = certs.settings();
    tls.handshake_timeout = Duration::from_millis(500);
    let err = Client::connect_tcp_tls(("127.0.0.1", port), "127.0.0.1", &tls, "", &[]).unwrap_err();
    assert!(
        matches!(err, NbdError::TlsHandshakeTimeout { timeout, .. } if timeout == Duration::from_millis(500)),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "TLS with NBD server tcp:127.0.0.1:{port} failed: the handshake did not finish within 500ms"
        )
    );
    assert!(err.is_retryable());
    server.join().unwrap();
}

#[test]
fn bytes_before_the_tls_hello_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    // What a man in the middle would inject: a plain-text option reply after the acknowledgement.
    let (port, server) = scripted_starttls_server(b"\x00\x03\xe8\x89\x04\x55\x65\xa9injected");
    let err = Client::connect_tcp_tls(("127.0.0.1", port), "127.0.0.1", &certs.settings(), "", &[])
        .unwrap_err();
    assert!(matches!(err, NbdError::Protocol { .. }), "{err:?}");
    assert!(
        err.to_string().contains(
            "arrived after the acknowledgement of NBD_OPT_STARTTLS, before the TLS handshake"
        ),
        "{err}"
    );
    server.join().unwrap();
}

#[test]
fn a_libvirt_pull_backup_served_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    // QEMU runs as libvirt-qemu and reads its server certificate under here.
    make_traversable(dir.path());
    let certs = certs(dir.path());
    let daemon = PrivateLibvirtd::start_with_qemu_conf(&format!(
        "backup_tls_x509_cert_dir = \"{}\"\nbackup_tls_x509_verify = 1\n",
        certs.server_dir.display()
    ));
    let domain = daemon.start_domain("bf-nbd-tls", &[("vda", "64M")]);
    domain.guest_write("vda", "write -P 0xab 1M 256k");
    domain.guest_write("vda", "write -P 0xcd 40M 64k");

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
        tls: true,
    };
    let xml = pull_backup(
        &endpoint,
        &[JobDisk {
            target: "vda".into(),
            mode: DiskMode::Full,
            scratch: Some(dir.path().join("vda.scratch")),
        }],
        &[],
    );
    let xml_file = dir.path().join("backup.xml");
    std::fs::write(&xml_file, xml).unwrap();
    domain.virsh(&[
        "backup-begin",
        domain.name(),
        "--backupxml",
        xml_file.to_str().unwrap(),
    ]);
    let running = parse_running_job(&domain.virsh(&["backup-dumpxml", domain.name()])).unwrap();
    assert_eq!(running.endpoint, Some(endpoint));
    let export = running.disks[0].export.clone();

    // libvirt really asked QEMU for TLS: a plain client is refused.
    let plain = Client::connect_tcp(("127.0.0.1", port), &export, &[]).unwrap_err();
    assert!(matches!(plain, NbdError::TlsRequired { .. }), "{plain:?}");

    let mut client = Client::connect_tcp_tls(
        ("127.0.0.1", port),
        "127.0.0.1",
        &certs.settings(),
        &export,
        &["base:allocation"],
    )
    .unwrap();
    assert!(client.tls_protocol().is_some());
    let mut whole = vec![0x5a; client.size() as usize];
    client.read_at(0, &mut whole).unwrap();
    let allocation = client
        .block_status(0, client.size(), "base:allocation")
        .unwrap();
    assert_exact_cover(&allocation, 0, client.size());
    client.close().unwrap();
    domain.virsh(&["domjobabort", domain.name()]);

    let read = dir.path().join("read.raw");
    std::fs::write(&read, &whole).unwrap();
    let copy = dir.path().join("copy.raw");
    domain.copy_disk("vda", &copy);
    let cmp = Command::new("cmp").arg(&read).arg(&copy).output().unwrap();
    assert!(
        cmp.status.success(),
        "the export read over TLS differs from the disk: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    assert_eq!(whole[(1 << 20) + 5], 0xab);
    assert_eq!(whole[(40 << 20) + 5], 0xcd);
}

/// certtool writes an ECDSA key's scalar with a leading zero byte when its top bit is set (half
/// the keys libvirt's TLS guide makes): such a key loads, and one without loads as before.
#[test]
fn certtool_ecdsa_keys_load_with_or_without_the_leading_zero() {
    let dir = tempfile::tempdir().unwrap();
    let certtool = |args: &[&str]| {
        let out = Command::new("certtool").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "certtool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let template = dir.path().join("self.info");
    std::fs::write(
        &template,
        "cn = client\ntls_www_client\nsigning_key\nexpiration_days = 2\n",
    )
    .unwrap();
    let (mut padded, mut plain) = (0, 0);
    for i in 0..64 {
        let key = dir.path().join(format!("key{i}.pem"));
        let cert = dir.path().join(format!("cert{i}.pem"));
        certtool(&[
            "--generate-privkey",
            "--key-type=ecdsa",
            "--curve=secp256r1",
            "--no-text",
            "--outfile",
            key.to_str().unwrap(),
        ]);
        certtool(&[
            "--generate-self-signed",
            "--load-privkey",
            key.to_str().unwrap(),
            "--template",
            template.to_str().unwrap(),
            "--outfile",
            cert.to_str().unwrap(),
        ]);
        // The scalar's length, from `openssl asn1parse`'s first OCTET STRING.
        let parsed = Command::new("openssl")
            .args(["asn1parse", "-in"])
            .arg(&key)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&parsed.stdout);
        let line = text.lines().find(|l| l.contains("OCTET STRING")).unwrap();
        let has_zero = line.contains("l=  33");
        let settings = TlsSettings::new(&cert, &cert, &key);
        if let Err(e) = settings.client_config() {
            panic!("key {i} (leading zero: {has_zero}) does not load: {e}");
        }
        if has_zero {
            padded += 1
        } else {
            plain += 1
        }
        if padded > 0 && plain > 0 {
            return;
        }
    }
    panic!("64 keys and not both kinds: {padded} with the zero, {plain} without");
}
