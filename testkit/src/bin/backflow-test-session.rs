//! Records a made-up session of a job in a repository, as if it had run AGE seconds ago, so that a
//! daemon started on that repository owes the job a run at once (its catch-up of a missed run):
//! how a benchmark starts a job in a daemon without its console (`benches/e2e-console.sh`).
//!
//! ```text
//! backflow-test-session REPOSITORY JOB AGE_SECONDS
//! ```

use backflow_repository::{Location, Repository};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [repo, job, age] = &args[..] else {
        eprintln!("usage: backflow-test-session REPOSITORY JOB AGE_SECONDS");
        std::process::exit(2);
    };
    let age: i64 = age.parse().unwrap_or_else(|_| {
        eprintln!("AGE_SECONDS: expected a number of seconds, got {age}");
        std::process::exit(2);
    });
    let location: Location = repo.parse().unwrap_or_else(|e| {
        eprintln!("{repo}: {e}");
        std::process::exit(2);
    });
    let repository = Repository::open_at(&location).unwrap_or_else(|e| {
        eprintln!("{repo}: {e}");
        std::process::exit(1);
    });
    let then = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
        - age;
    let id = Repository::new_session_id(then);
    let record = serde_json::json!({
        "id": id, "job": job, "started": then, "ended": then,
        "result": "success", "vms": [], "error": null,
    });
    if let Err(e) = repository.record_session(&id, &record) {
        eprintln!("{repo}: {e}");
        std::process::exit(1);
    }
    println!("{id}");
}
