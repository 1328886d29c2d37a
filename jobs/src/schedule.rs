//! When jobs run. Everything here takes the time as a parameter (unix seconds, UTC), so that tests
//! drive the clock and the daemon supplies the real one.
//!
//! The rules:
//! - A job is due at every time one of its cron expressions matches (UTC, minute resolution).
//! - A missed run is caught up once: when the daemon starts and a scheduled time fell between the
//!   job's last session start and now, the job runs once, however many times were missed. A job
//!   with no session yet waits for its first scheduled time (a new job does not run at start).
//! - One run per job at a time: a time that comes while the job runs is remembered, once, and the
//!   job runs again when the current run ends (the same catch-up rule).
//! - One backup per VM at a time: a job selecting a VM that another job is backing up waits,
//!   whole, until that VM is free (then it starts on the next check). Waiting whole keeps a
//!   session what its job says (every VM it selects), rather than a partial run to be topped up.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use crate::file::Job;

/// Who asked for a run the clock owed: [`Scheduler::requested_by`] of a scheduled or caught-up run.
pub const SCHEDULE: &str = "schedule";

/// The earliest time one of the job's schedules matches strictly after `after`; `None` for a job
/// without schedules (or a schedule that never matches, such as February 30th).
pub fn next_due(job: &Job, after: i64) -> Option<i64> {
    let after = DateTime::<Utc>::from_timestamp(after, 0)?;
    job.schedule
        .iter()
        .filter_map(|s| s.cron.find_next_occurrence(&after, false).ok())
        .map(|t| t.timestamp())
        .min()
}

/// The next `n` times `schedule` matches strictly after `after` (fewer when it stops matching).
pub fn next_times(schedule: &crate::file::Schedule, after: i64, n: usize) -> Vec<i64> {
    let mut times = Vec::with_capacity(n);
    let mut from = after;
    while times.len() < n {
        let Some(t) = DateTime::<Utc>::from_timestamp(from, 0)
            .and_then(|from| schedule.cron.find_next_occurrence(&from, false).ok())
            .map(|t| t.timestamp())
        else {
            break;
        };
        times.push(t);
        from = t;
    }
    times
}

/// Whether a scheduled time fell after the last session's start and at or before `now`. A job
/// never run has missed nothing: it waits for its first time.
pub fn missed(job: &Job, last_started: Option<i64>, now: i64) -> bool {
    last_started
        .and_then(|last| next_due(job, last))
        .is_some_and(|t| t <= now)
}

/// The jobs, their next times and what is running.
pub struct Scheduler {
    slots: Vec<Slot>,
    /// VMs being backed up by a running job.
    busy_vms: BTreeSet<String>,
}

struct Slot {
    job: Job,
    /// The next scheduled time not yet turned into `pending`.
    next: Option<i64>,
    /// A run is owed (a scheduled time came, or one was missed before the daemon started, or
    /// someone asked for one), and who asked: `schedule`, or the console's user.
    pending: Option<String>,
    /// A disabled job's scheduled times pass without owing a run; asking still runs it.
    enabled: bool,
    /// The VMs of the run going on, if one is.
    running: Option<Vec<String>>,
}

impl Scheduler {
    /// `jobs`: each job with the start of its last recorded session. Jobs that missed a run are
    /// due at once.
    pub fn new(jobs: Vec<(Job, Option<i64>)>, now: i64) -> Scheduler {
        let slots = jobs
            .into_iter()
            .map(|(job, last_started)| Slot {
                next: next_due(&job, now),
                pending: missed(&job, last_started, now).then(|| SCHEDULE.to_owned()),
                enabled: true,
                running: None,
                job,
            })
            .collect();
        Scheduler {
            slots,
            busy_vms: BTreeSet::new(),
        }
    }

    pub fn job(&self, index: usize) -> &Job {
        &self.slots[index].job
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The jobs owed a run and not running, by index. Times passed are taken in (several passed
    /// times owe one run). A job returned is still owed until [`Scheduler::start`] accepts it.
    pub fn due(&mut self, now: i64) -> Vec<usize> {
        let mut due = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.next.is_some_and(|t| t <= now) {
                if slot.enabled && slot.pending.is_none() {
                    slot.pending = Some(SCHEDULE.to_owned());
                }
                slot.next = next_due(&slot.job, now);
            }
            if slot.pending.is_some() && slot.running.is_none() {
                due.push(i);
            }
        }
        due
    }

    /// Marks job `index` running on `vms` (the VMs it selects now), unless one of them is being
    /// backed up by another job: then it stays owed and `false` is returned.
    pub fn start(&mut self, index: usize, vms: Vec<String>) -> bool {
        let slot = &mut self.slots[index];
        if slot.running.is_some() || vms.iter().any(|vm| self.busy_vms.contains(vm)) {
            return false;
        }
        self.busy_vms.extend(vms.iter().cloned());
        slot.running = Some(vms);
        slot.pending = None;
        true
    }

    /// Who asked for job `index`'s owed run (`schedule`, or the console's user); `None`: no run
    /// is owed.
    pub fn requested_by(&self, index: usize) -> Option<&str> {
        self.slots[index].pending.as_deref()
    }

    /// Someone (`who`) asks for a run of job `index` now, disabled or not: it is owed, and starts
    /// at the next check unless it runs already (then `false`) or its VMs are busy (then it
    /// waits for them as a scheduled run does).
    pub fn request(&mut self, index: usize, who: &str) -> bool {
        let slot = &mut self.slots[index];
        if slot.running.is_some() {
            return false;
        }
        slot.pending = Some(who.to_owned());
        true
    }

    /// Enables or disables job `index`. Disabling drops a scheduled run that is owed and not
    /// started; a running one goes on.
    pub fn set_enabled(&mut self, index: usize, enabled: bool) {
        let slot = &mut self.slots[index];
        slot.enabled = enabled;
        if !enabled && slot.pending.as_deref() == Some(SCHEDULE) {
            slot.pending = None;
        }
    }

    pub fn is_enabled(&self, index: usize) -> bool {
        self.slots[index].enabled
    }

    /// Whether job `index` runs now.
    pub fn is_running(&self, index: usize) -> bool {
        self.slots[index].running.is_some()
    }

    /// Job `index`'s run ended: its VMs are free.
    pub fn finish(&mut self, index: usize) {
        if let Some(vms) = self.slots[index].running.take() {
            for vm in vms {
                self.busy_vms.remove(&vm);
            }
        }
    }

    /// Job `index`'s next scheduled time (`None`: it has no schedule, or it is disabled).
    pub fn next_run(&self, index: usize) -> Option<i64> {
        let slot = &self.slots[index];
        slot.next.filter(|_| slot.enabled)
    }

    /// How many runs are going on.
    pub fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.running.is_some()).count()
    }

    /// The earliest next scheduled time of any job (`None`: no job has one). Jobs owed a run but
    /// waiting for their VMs are not counted: they are checked again when a run ends.
    pub fn next_wake(&self) -> Option<i64> {
        self.slots.iter().filter_map(|s| s.next).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-01-05 00:00:00 UTC, a Monday.
    const MONDAY: i64 = 1_767_571_200;
    const MINUTE: i64 = 60;
    const HOUR: i64 = 3600;

    fn job(name: &str, vms: &str, schedules: &[&str]) -> Job {
        let schedule = schedules
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ");
        crate::parse(
            &format!("name: {name}\nrepository: /r\nvms: [{vms}]\nschedule: [{schedule}]\n"),
            "/j.yaml",
        )
        .unwrap()
    }

    #[test]
    fn the_next_three_times_of_a_schedule() {
        let j = job("j", "a", &["30 2 * * 1-5"]);
        let day = 24 * HOUR;
        let at = MONDAY + 2 * HOUR + 30 * MINUTE;
        // From Monday 00:00: Monday, Tuesday, Wednesday at 02:30; from Thursday noon: Friday,
        // then Monday (no weekend).
        assert_eq!(
            next_times(&j.schedule[0], MONDAY, 3),
            [at, at + day, at + 2 * day]
        );
        assert_eq!(
            next_times(&j.schedule[0], MONDAY + 3 * day + 12 * HOUR, 2),
            [at + 4 * day, at + 7 * day]
        );
    }

    #[test]
    fn every_minute() {
        let j = job("j", "a", &["* * * * *"]);
        assert_eq!(next_due(&j, MONDAY), Some(MONDAY + MINUTE));
        assert_eq!(next_due(&j, MONDAY + 1), Some(MONDAY + MINUTE));
        assert_eq!(next_due(&j, MONDAY + 59), Some(MONDAY + MINUTE));
        assert_eq!(next_due(&j, MONDAY + MINUTE), Some(MONDAY + 2 * MINUTE));
    }

    #[test]
    fn hourly_and_daily() {
        let hourly = job("j", "a", &["0 * * * *"]);
        assert_eq!(next_due(&hourly, MONDAY), Some(MONDAY + HOUR));
        assert_eq!(
            next_due(&hourly, MONDAY + 61 * MINUTE),
            Some(MONDAY + 2 * HOUR)
        );
        let nightly = job("j", "a", &["30 2 * * *"]);
        assert_eq!(
            next_due(&nightly, MONDAY + 3 * HOUR),
            Some(MONDAY + 24 * HOUR + 2 * HOUR + 30 * MINUTE)
        );
    }

    #[test]
    fn the_earliest_of_several_expressions() {
        // 02:00 on weekdays, 04:00 on Sundays (weekday 0).
        let j = job("j", "a", &["0 2 * * 1-5", "0 4 * * 0"]);
        assert_eq!(next_due(&j, MONDAY), Some(MONDAY + 2 * HOUR));
        let friday_noon = MONDAY + 4 * 24 * HOUR + 12 * HOUR;
        let sunday = MONDAY + 6 * 24 * HOUR;
        assert_eq!(next_due(&j, friday_noon), Some(sunday + 4 * HOUR));
        assert_eq!(next_due(&job("j", "a", &[]), MONDAY), None);
    }

    #[test]
    fn a_missed_run_is_caught_up_once() {
        let j = job("j", "a", &["* * * * *"]);
        // The daemon was down for five hours: 300 times missed, one run owed.
        let last = MONDAY + 10;
        let now = MONDAY + 5 * HOUR + 30;
        assert!(missed(&j, Some(last), now));
        let mut s = Scheduler::new(vec![(j.clone(), Some(last))], now);
        assert_eq!(s.due(now), [0]);
        assert!(s.start(0, vec!["a".into()]));
        s.finish(0);
        assert_eq!(s.due(now + 1), Vec::<usize>::new());
        // Then the schedule resumes.
        assert_eq!(s.next_wake(), Some(MONDAY + 5 * HOUR + MINUTE));
        assert_eq!(s.due(MONDAY + 5 * HOUR + MINUTE), [0]);

        // Nothing missed: the last session started after the last scheduled time.
        assert!(!missed(&j, Some(now - 20), now));
        let hourly = job("j", "a", &["0 * * * *"]);
        assert!(!missed(&hourly, Some(MONDAY + 1), MONDAY + 59 * MINUTE));
        assert!(missed(&hourly, Some(MONDAY + 1), MONDAY + HOUR));
    }

    #[test]
    fn a_new_job_waits_for_its_first_time() {
        let j = job("j", "a", &["0 * * * *"]);
        let now = MONDAY + 10 * MINUTE;
        assert!(!missed(&j, None, now));
        let mut s = Scheduler::new(vec![(j, None)], now);
        assert!(s.due(now).is_empty());
        assert_eq!(s.next_wake(), Some(MONDAY + HOUR));
        assert!(s.due(MONDAY + HOUR - 1).is_empty());
        assert_eq!(s.due(MONDAY + HOUR), [0]);
    }

    #[test]
    fn a_running_job_is_not_started_again() {
        let j = job("j", "a", &["* * * * *"]);
        let mut s = Scheduler::new(vec![(j, None)], MONDAY);
        assert_eq!(s.due(MONDAY + MINUTE), [0]);
        assert!(s.start(0, vec!["a".into()]));
        assert_eq!(s.running(), 1);
        // Three times come while it runs: not started, one run owed.
        for t in 2..5 {
            assert!(s.due(MONDAY + t * MINUTE).is_empty());
        }
        assert!(!s.start(0, vec!["a".into()]));
        s.finish(0);
        assert_eq!(s.running(), 0);
        assert_eq!(s.due(MONDAY + 4 * MINUTE + 5), [0]);
        assert!(s.start(0, vec!["a".into()]));
        s.finish(0);
        assert!(s.due(MONDAY + 4 * MINUTE + 6).is_empty());
    }

    #[test]
    fn a_vm_is_not_backed_up_by_two_jobs_at_once() {
        let web = job("web", "\"web*\"", &["0 * * * *"]);
        let all = job("all", "\"*\"", &["0 * * * *"]);
        let db = job("db", "\"db*\"", &["0 * * * *"]);
        let mut s = Scheduler::new(vec![(web, None), (all, None), (db, None)], MONDAY);
        assert_eq!(s.due(MONDAY + HOUR), [0, 1, 2]);
        assert!(s.start(0, vec!["web1".into(), "web2".into()]));
        // `all` shares web1 and web2: it waits, whole; `db` shares nothing.
        assert!(!s.start(1, vec!["db1".into(), "web1".into(), "web2".into()]));
        assert!(s.start(2, vec!["db1".into()]));
        assert_eq!(s.due(MONDAY + HOUR + 5), [1]);
        s.finish(0);
        assert!(!s.start(1, vec!["db1".into(), "web1".into(), "web2".into()]));
        s.finish(2);
        assert_eq!(s.due(MONDAY + HOUR + 10), [1]);
        assert!(s.start(1, vec!["db1".into(), "web1".into(), "web2".into()]));
        assert!(s.due(MONDAY + HOUR + 11).is_empty());
    }

    #[test]
    fn a_disabled_job_owes_no_scheduled_run_but_runs_when_asked() {
        let mut s = Scheduler::new(vec![(job("j", "a", &["0 * * * *"]), Some(MONDAY))], MONDAY);
        s.set_enabled(0, false);
        assert_eq!(s.next_run(0), None);
        assert!(s.due(MONDAY + HOUR).is_empty());
        assert!(s.request(0, "token:alice"));
        assert_eq!(s.due(MONDAY + HOUR + 1), [0]);
        assert_eq!(s.requested_by(0), Some("token:alice"));
        assert!(s.start(0, vec!["a".into()]));
        // Running: a second request is refused.
        assert!(!s.request(0, "token:bob"));
        s.finish(0);
        s.set_enabled(0, true);
        assert_eq!(s.due(MONDAY + 2 * HOUR), [0]);
        assert_eq!(s.requested_by(0), Some(SCHEDULE));
        // Disabling drops the owed scheduled run.
        s.set_enabled(0, false);
        assert!(s.due(MONDAY + 2 * HOUR + 1).is_empty());
    }
}
