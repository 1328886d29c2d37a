//! One NBD export read whole by `backflow-nbd`'s client over three transports in the same run:
//! a unix socket (a local read: the VM's host reads its own export), TCP on loopback, and TCP
//! with TLS (`NBD_OPT_STARTTLS`, rustls with ring, TLS 1.3, QEMU's GnuTLS with `verify-peer=on`
//! and certificates from `testkit::pki`): what a worker on another host pays to read over the
//! cluster's fallback. Run by `bash benches/nbd-tls.sh [MIB]`.
//!
//! The image is MIB of pseudo-random data (incompressible, no zeros, so every byte crosses the
//! transport and nothing is skipped as a hole) in a qcow2 in the page cache, served read-only by
//! one `qemu-nbd` per transport. Each read is one connection (connect and handshakes included)
//! reading the export front to back in 256 MiB calls, each split into 32 MiB requests with 8 in
//! flight (the client's default). One warm-up round checks the bytes against the raw image; then
//! REPEAT rounds, transports interleaved. Prints a Markdown table: median seconds, MiB/s, the CPU
//! seconds (user + system, from /proc/PID/stat) of the client and of that transport's qemu-nbd,
//! and the ratio to the unix socket.
//!
//! Not a criterion benchmark: criterion's sampling would read a GiB dozens of times per case, and
//! the point is the ratio between transports measured side by side.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use backflow_nbd::{Client, TlsSettings};
use backflow_testkit::pki::Pki;

/// Rounds measured after the warm-up; the median is reported.
const REPEAT: usize = 3;

/// Bytes asked for per `read_at` call: split by the client into 32 MiB requests, 8 in flight.
const CALL: usize = 256 << 20;

/// Linux reports process CPU time in clock ticks of 1/100 s (USER_HZ) on every architecture
/// Backflow runs on.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Unix,
    Tcp,
    TcpTls,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Unix => "unix socket (local read)",
            Transport::Tcp => "TCP, loopback",
            Transport::TcpTls => "TCP + TLS 1.3, loopback",
        }
    }
}

/// A `qemu-nbd --fork` stopped by its pid on drop.
struct Server {
    pid: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is required (Debian: qemu-utils, gnutls-bin): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_server(dir: &Path, name: &str, image: &Path, listen: &[&str], extra: &[&str]) -> Server {
    let pid_file = dir.join(format!("{name}.pid"));
    let mut args = vec![
        "--read-only",
        "--persistent",
        "--fork",
        "--format",
        "qcow2",
        "--pid-file",
        pid_file.to_str().unwrap(),
    ];
    args.extend_from_slice(listen);
    args.extend_from_slice(extra);
    args.push(image.to_str().unwrap());
    run("qemu-nbd", &args);
    Server {
        pid: std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .to_owned(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `bytes` of xorshift64* output: incompressible, never a zero block, the same each run.
fn write_pseudo_random(path: &Path, bytes: u64) {
    let file = std::fs::File::create(path).unwrap();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for at in (0..bytes).step_by(block.len()) {
        for word in block.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        file.write_all_at(&block, at).unwrap();
    }
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    process_cpu_seconds("self")
}

/// User + system CPU seconds of process `pid` (or `self`) so far.
fn process_cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based in proc(5)).
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / TICKS_PER_SECOND
}

struct Setup {
    /// The pid of each transport's server, in [`Transport`] order.
    server_pids: Vec<String>,
    socket: PathBuf,
    tcp_port: u16,
    tls_port: u16,
    tls: TlsSettings,
}

fn connect(setup: &Setup, transport: Transport) -> Client {
    match transport {
        Transport::Unix => Client::connect_unix(&setup.socket, "", &[]),
        Transport::Tcp => Client::connect_tcp(("127.0.0.1", setup.tcp_port), "", &[]),
        Transport::TcpTls => Client::connect_tcp_tls(
            ("127.0.0.1", setup.tls_port),
            "127.0.0.1",
            &setup.tls,
            "",
            &[],
        ),
    }
    .unwrap()
}

/// Seconds of one read: wall, the client's CPU, the server's CPU.
#[derive(Clone, Copy)]
struct Times {
    wall: f64,
    client: f64,
    server: f64,
}

/// Reads the whole export once; with `check`, compares every byte with `raw`.
fn read_whole(setup: &Setup, transport: Transport, buf: &mut [u8], check: Option<&Path>) -> Times {
    let raw = check.map(|p| std::fs::File::open(p).unwrap());
    let mut expected = check.map(|_| vec![0u8; buf.len()]);
    let server_pid = &setup.server_pids[transport as usize];
    let server_cpu = process_cpu_seconds(server_pid);
    let cpu = cpu_seconds();
    let start = Instant::now();
    let mut client = connect(setup, transport);
    let size = client.size();
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        client.read_at(at, &mut buf[..n]).unwrap();
        if let (Some(raw), Some(expected)) = (&raw, &mut expected) {
            raw.read_exact_at(&mut expected[..n], at).unwrap();
            assert!(
                buf[..n] == expected[..n],
                "{transport:?} read other bytes than the image holds at {at}"
            );
        }
        at += n as u64;
    }
    client.close().unwrap();
    Times {
        wall: start.elapsed().as_secs_f64(),
        client: cpu_seconds() - cpu,
        server: process_cpu_seconds(server_pid) - server_cpu,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; the size in MiB is the first other argument.
    let mib: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(|a| a.parse().expect("the size is a number of MiB"))
        .unwrap_or(1024);
    let base = std::env::var_os("BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    std::fs::create_dir_all(&base).unwrap();
    let work = tempfile::Builder::new()
        .prefix("backflow-nbd-transport-")
        .tempdir_in(&base)
        .unwrap();
    let dir = work.path();

    eprintln!("writing a {mib} MiB pseudo-random image, converting it to qcow2");
    let raw = dir.join("disk.raw");
    write_pseudo_random(&raw, mib << 20);
    let image = dir.join("disk.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );
    let _ = std::fs::read(&image);

    let pki = Pki::create(&dir.join("pki"), "Backflow bench CA");
    let server_dir = pki.server("server", &["127.0.0.1"], &[]);
    let client = pki.client("backflow-bench");
    let mut setup = Setup {
        server_pids: Vec::new(),
        socket: dir.join("nbd.sock"),
        tcp_port: free_port(),
        tls_port: free_port(),
        tls: TlsSettings::new(pki.ca_cert(), client.cert, client.key),
    };
    let tcp_port = setup.tcp_port.to_string();
    let tls_port = setup.tls_port.to_string();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
        server_dir.display()
    );
    let servers = [
        start_server(
            dir,
            "unix",
            &image,
            &["--socket", setup.socket.to_str().unwrap()],
            &[],
        ),
        start_server(
            dir,
            "tcp",
            &image,
            &["--bind", "127.0.0.1", "--port", &tcp_port],
            &[],
        ),
        start_server(
            dir,
            "tls",
            &image,
            &["--bind", "127.0.0.1", "--port", &tls_port],
            &["--object", &object, "--tls-creds", "tls0"],
        ),
    ];

    setup.server_pids = servers.iter().map(|s| s.pid.clone()).collect();
    let transports = [Transport::Unix, Transport::Tcp, Transport::TcpTls];
    let mut buf = vec![0u8; CALL.min((mib << 20) as usize)];
    let suite = connect(&setup, Transport::TcpTls)
        .tls_cipher_suite()
        .unwrap_or_default();
    eprintln!("warming up (and checking every byte)");
    for t in transports {
        read_whole(&setup, t, &mut buf, Some(&raw));
    }
    let mut times: Vec<Vec<Times>> = vec![Vec::new(); transports.len()];
    for round in 1..=REPEAT {
        for (i, t) in transports.iter().enumerate() {
            let r = read_whole(&setup, *t, &mut buf, None);
            eprintln!(
                "run {round}: {t:?} {:.3} s, CPU client {:.2} s, server {:.2} s",
                r.wall, r.client, r.server
            );
            times[i].push(r);
        }
    }

    let medians: Vec<Times> = times
        .iter()
        .map(|runs| Times {
            wall: median(runs.iter().map(|r| r.wall).collect()),
            client: median(runs.iter().map(|r| r.client).collect()),
            server: median(runs.iter().map(|r| r.server).collect()),
        })
        .collect();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "Export: {mib} MiB of pseudo-random data (qcow2, page cache), one qemu-nbd per transport, read whole by one backflow-nbd connection (32 MiB requests, 8 in flight). TLS: {suite}. Machine: {cores} cores, {cpu_model}. Median of {REPEAT}, interleaved."
    );
    println!();
    println!("| transport | median | MiB/s | CPU: client | CPU: qemu-nbd | time vs unix socket |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (t, m) in transports.iter().zip(&medians) {
        println!(
            "| {} | {:.3} s | {:.0} | {:.2} s | {:.2} s | {:.2}x |",
            t.label(),
            m.wall,
            mib as f64 / m.wall,
            m.client,
            m.server,
            m.wall / medians[0].wall
        );
    }
}
