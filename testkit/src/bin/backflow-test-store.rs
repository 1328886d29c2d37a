//! Serves one of the test harness's object stores to a shell script (the S3 benchmarks,
//! `benches/s3.sh`), so that scripts get the same stores as the tests:
//!
//! ```text
//! backflow-test-store garage|garage-cluster|s3s-fs
//! ```
//!
//! Prints the store's variables as `NAME=VALUE` lines (the AWS variables of
//! `backflow_testkit::s3::S3::env`, then `S3_BUCKET`, a new empty bucket, and `S3_PIDS`, the
//! servers' pids), then `READY`, and keeps the store until its stdin reaches end-of-file (the
//! script closed the pipe, or exited); then stops the servers by pid and removes their files.

use std::io::{Read, Write};

use backflow_testkit::s3::{Garage, S3, S3sFs};

/// What is kept alive until stdin closes.
enum Store {
    Garage(Garage),
    S3sFs(S3sFs),
}

fn main() {
    let kind = std::env::args().nth(1).unwrap_or_default();
    let (store, s3) = match kind.as_str() {
        "garage" => {
            let garage = Garage::single();
            let s3 = garage.bucket("bench");
            (Store::Garage(garage), s3)
        }
        "garage-cluster" => {
            let garage = Garage::cluster3();
            let s3 = garage.bucket("bench");
            (Store::Garage(garage), s3)
        }
        "s3s-fs" => {
            let server = S3sFs::start();
            let s3 = server.bucket("bench");
            (Store::S3sFs(server), s3)
        }
        _ => {
            eprintln!("usage: backflow-test-store garage|garage-cluster|s3s-fs");
            std::process::exit(2);
        }
    };
    let pids: Vec<String> = match &store {
        Store::Garage(g) => (0..g.len())
            .filter_map(|i| g.pid(i))
            .map(|p| p.to_string())
            .collect(),
        Store::S3sFs(s) => vec![s.pid().to_string()],
    };
    print_variables(&s3, &pids);
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(store);
}

fn print_variables(s3: &S3, pids: &[String]) {
    let mut out = std::io::stdout().lock();
    for (name, value) in s3.env() {
        writeln!(out, "{name}={value}").unwrap();
    }
    writeln!(out, "S3_BUCKET={}", s3.bucket).unwrap();
    writeln!(out, "S3_PIDS={}", pids.join(" ")).unwrap();
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
}
