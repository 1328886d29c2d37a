//! Retention: which snapshots a keep policy keeps. A pure function of the snapshot list and the policy;
//! removing what it does not keep is [`Repository::forget`](crate::Repository::forget)'s job.
//!
//! The rules are documented at [`plan`].
//!
//! Calendar arithmetic is done here on days since the epoch (no date crate): UTC days, proleptic Gregorian
//! calendar, ISO weeks.

use std::collections::BTreeMap;

use crate::SnapshotInfo;

/// How many snapshots of each VM to keep. In job files (YAML/JSON) the keys are `keep_last`, `keep_daily`,
/// `keep_weekly`, `keep_monthly` and `keep_yearly`, each optional; unknown keys are refused. A missing rule
/// and a rule of 0 both mean "this rule keeps nothing".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeepPolicy {
    /// The N newest snapshots.
    #[serde(rename = "keep_last", skip_serializing_if = "Option::is_none")]
    pub last: Option<u32>,
    /// The newest snapshot of each of the N most recent UTC days that have snapshots.
    #[serde(rename = "keep_daily", skip_serializing_if = "Option::is_none")]
    pub daily: Option<u32>,
    /// The newest snapshot of each of the N most recent ISO weeks that have snapshots.
    #[serde(rename = "keep_weekly", skip_serializing_if = "Option::is_none")]
    pub weekly: Option<u32>,
    /// The newest snapshot of each of the N most recent calendar months that have snapshots.
    #[serde(rename = "keep_monthly", skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u32>,
    /// The newest snapshot of each of the N most recent years that have snapshots.
    #[serde(rename = "keep_yearly", skip_serializing_if = "Option::is_none")]
    pub yearly: Option<u32>,
}

impl KeepPolicy {
    /// Whether no rule keeps anything: [`plan`] then keeps every snapshot.
    pub fn is_empty(&self) -> bool {
        self.rules().iter().all(|(_, n)| *n == 0)
    }

    fn rules(&self) -> [(Rule, u32); 5] {
        [
            (Rule::Last, self.last.unwrap_or(0)),
            (Rule::Daily, self.daily.unwrap_or(0)),
            (Rule::Weekly, self.weekly.unwrap_or(0)),
            (Rule::Monthly, self.monthly.unwrap_or(0)),
            (Rule::Yearly, self.yearly.unwrap_or(0)),
        ]
    }
}

impl std::fmt::Display for KeepPolicy {
    /// `keep-last 2, keep-daily 7`, or `no keep rule`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .rules()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(rule, n)| format!("keep-{} {n}", rule.name()))
            .collect();
        if parts.is_empty() {
            f.write_str("no keep rule")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// What the policy says about one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub id: String,
    pub vm: String,
    /// Seconds since the Unix epoch, UTC.
    pub time: i64,
    /// The same instant as RFC 3339.
    pub time_utc: String,
    pub keep: bool,
    /// Every rule that keeps it, with the period it stands for: `last 1` (the newest), `daily 2024-05-03`,
    /// `weekly 2024-W18`, `monthly 2024-05`, `yearly 2024`; `no keep rule` under an empty policy; empty when
    /// the snapshot goes.
    pub reasons: Vec<String>,
}

/// Decides, per VM, which snapshots `policy` keeps. The result has one decision per snapshot, grouped by VM
/// (VMs in name order), newest first within a VM.
///
/// The rules are restic's and borg's, applied to each VM on its own (a VM that is backed up hourly does not
/// push another VM's weekly snapshots out):
/// - a VM's snapshots are ordered newest first (by time, then id);
/// - `keep_last` N keeps the N newest;
/// - `keep_daily` N walks them newest first and keeps the first (newest) snapshot of each UTC day until N days
///   are kept: the newest snapshot of each of the N most recent days *that have snapshots* (days without a
///   backup do not use up the count). `keep_weekly` does the same with ISO 8601 weeks (Monday to Sunday, the
///   week-year of its Thursday), `keep_monthly` with calendar months and `keep_yearly` with years, all UTC;
/// - a snapshot is kept when any rule keeps it, and [`Decision::reasons`] names every rule that did.
///
/// Consequences worth relying on: the newest snapshot of a VM qualifies under every rule, so a policy with any
/// rule of at least 1 never removes it, and therefore never removes all of a VM's snapshots (the newest is
/// also the parent of the next incremental backup). No rule keeps more than its count, so there is no
/// implicit `keep_last 1` besides. A policy without any rule of at least 1 ([`KeepPolicy::is_empty`]) keeps
/// everything: forgetting everything is never what an empty policy means, and callers (the CLI) refuse it
/// with an error rather than guessing.
pub fn plan(snapshots: &[SnapshotInfo], policy: &KeepPolicy) -> Vec<Decision> {
    let mut by_vm: BTreeMap<&str, Vec<&SnapshotInfo>> = BTreeMap::new();
    for s in snapshots {
        by_vm.entry(&s.vm).or_default().push(s);
    }
    let mut out = Vec::with_capacity(snapshots.len());
    for (_, mut list) in by_vm {
        list.sort_by(|a, b| b.sort_key().cmp(&a.sort_key()));
        let mut decisions: Vec<Decision> = list
            .iter()
            .map(|s| Decision {
                id: s.id.clone(),
                vm: s.vm.clone(),
                time: s.time,
                time_utc: crate::ids::rfc3339(s.time),
                keep: false,
                reasons: Vec::new(),
            })
            .collect();
        if policy.is_empty() {
            for d in &mut decisions {
                d.keep = true;
                d.reasons.push("no keep rule".into());
            }
        } else {
            for (rule, count) in policy.rules() {
                apply(rule, count, &mut decisions);
            }
        }
        out.extend(decisions);
    }
    out
}

/// Keeps the first snapshot of each of the first `count` distinct periods of `rule`, walking `decisions`
/// (one VM's, newest first). Periods only decrease along the walk, so "differs from the last kept period"
/// means "a new period".
fn apply(rule: Rule, count: u32, decisions: &mut [Decision]) {
    let mut left = count;
    let mut last_period: Option<Period> = None;
    for (position, d) in decisions.iter_mut().enumerate() {
        if left == 0 {
            break;
        }
        let period = rule.period(d.time, position);
        if last_period == Some(period) {
            continue;
        }
        last_period = Some(period);
        left -= 1;
        d.keep = true;
        d.reasons.push(format!("{} {}", rule.name(), period));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    Last,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
        }
    }

    /// The period a snapshot at `time` falls in; for `last`, every snapshot is its own period, numbered from
    /// 1 for the newest.
    fn period(self, time: i64, position: usize) -> Period {
        let days = time.div_euclid(SECONDS_PER_DAY);
        match self {
            Rule::Last => Period::Position(position + 1),
            Rule::Daily => {
                let (y, m, d) = crate::ids::civil_from_days(days);
                Period::Day(y, m, d)
            }
            Rule::Weekly => {
                let (y, w) = iso_week(days);
                Period::Week(y, w)
            }
            Rule::Monthly => {
                let (y, m, _) = crate::ids::civil_from_days(days);
                Period::Month(y, m)
            }
            Rule::Yearly => Period::Year(crate::ids::civil_from_days(days).0),
        }
    }
}

/// A bucket of one rule, printed as the reason (`2024-05-03`, `2024-W18`, `2024-05`, `2024`, `3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Period {
    Position(usize),
    Day(i64, u32, u32),
    Week(i64, u32),
    Month(i64, u32),
    Year(i64),
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Period::Position(n) => write!(f, "{n}"),
            Period::Day(y, m, d) => write!(f, "{y:04}-{m:02}-{d:02}"),
            Period::Week(y, w) => write!(f, "{y:04}-W{w:02}"),
            Period::Month(y, m) => write!(f, "{y:04}-{m:02}"),
            Period::Year(y) => write!(f, "{y:04}"),
        }
    }
}

const SECONDS_PER_DAY: i64 = 86_400;

/// (year, month, day) to days since 1970-01-01, proleptic Gregorian (Howard Hinnant's `days_from_civil`, the
/// inverse of [`crate::ids::civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The ISO 8601 week (week-year, week 1..=53) of a day: weeks run Monday to Sunday and belong to the year of
/// their Thursday, so 2024-12-30 is in 2025-W01 and 2021-01-03 in 2020-W53.
fn iso_week(days: i64) -> (i64, u32) {
    // 1970-01-01 was a Thursday: Monday is 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let year = crate::ids::civil_from_days(thursday).0;
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    (year, week as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, m: u32, d: u32, hour: i64) -> i64 {
        days_from_civil(y, m, d) * SECONDS_PER_DAY + hour * 3600
    }

    fn snap(vm: &str, time: i64) -> SnapshotInfo {
        SnapshotInfo {
            id: format!("{}-{vm}", crate::ids::snapshot_id(time, 0)),
            vm: vm.into(),
            source: String::new(),
            size: 0,
            time,
            time_utc: crate::ids::rfc3339(time),
            hostname: "h".into(),
            disks: Vec::new(),
            time_nanos: 0,
        }
    }

    /// One snapshot a day at noon from `first` for `days` days.
    fn daily(vm: &str, first: (i64, u32, u32), days: i64) -> Vec<SnapshotInfo> {
        let start = days_from_civil(first.0, first.1, first.2);
        (0..days)
            .map(|i| snap(vm, (start + i) * SECONDS_PER_DAY + 12 * 3600))
            .collect()
    }

    fn kept(decisions: &[Decision]) -> Vec<String> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.time_utc.clone())
            .collect()
    }

    fn policy(last: u32, daily: u32, weekly: u32, monthly: u32, yearly: u32) -> KeepPolicy {
        let some = |n: u32| (n > 0).then_some(n);
        KeepPolicy {
            last: some(last),
            daily: some(daily),
            weekly: some(weekly),
            monthly: some(monthly),
            yearly: some(yearly),
        }
    }

    #[test]
    fn calendar_conversions_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        for days in -800_000..800_000 {
            let (y, m, d) = crate::ids::civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        let week = |y, m, d| iso_week(days_from_civil(y, m, d));
        assert_eq!(week(2024, 12, 30), (2025, 1));
        assert_eq!(week(2021, 1, 3), (2020, 53));
        assert_eq!(week(2021, 1, 4), (2021, 1));
        assert_eq!(week(2020, 12, 31), (2020, 53));
        assert_eq!(week(2026, 1, 1), (2026, 1)); // a Thursday
        assert_eq!(week(2027, 1, 1), (2026, 53)); // a Friday
        assert_eq!(week(2024, 5, 3), (2024, 18));
        assert_eq!(week(1970, 1, 1), (1970, 1));
        assert_eq!(week(1969, 12, 29), (1970, 1));
        assert_eq!(week(2005, 1, 2), (2004, 53));
        assert_eq!(week(2008, 12, 29), (2009, 1));
        // Every week has 7 days, Monday to Sunday, and weeks number consecutively.
        let mut prev = iso_week(days_from_civil(1999, 12, 27));
        for days in days_from_civil(1999, 12, 28)..days_from_civil(2040, 1, 1) {
            let cur = iso_week(days);
            let monday = (days + 3).rem_euclid(7) == 0;
            if monday {
                assert!(
                    cur == (prev.0, prev.1 + 1) || (cur == (prev.0 + 1, 1) && prev.1 >= 52),
                    "{prev:?} -> {cur:?}"
                );
            } else {
                assert_eq!(cur, prev);
            }
            prev = cur;
        }
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let snaps = daily("a", (2024, 5, 1), 10);
        let d = plan(&snaps, &policy(3, 0, 0, 0, 0));
        assert_eq!(
            kept(&d),
            [
                "2024-05-10T12:00:00Z",
                "2024-05-09T12:00:00Z",
                "2024-05-08T12:00:00Z"
            ]
        );
        assert_eq!(d[0].reasons, ["last 1"]);
        assert_eq!(d[2].reasons, ["last 3"]);
        assert!(d[3..].iter().all(|d| !d.keep && d.reasons.is_empty()));
        // Newest first, whatever order they came in.
        let mut reversed = snaps.clone();
        reversed.reverse();
        assert_eq!(plan(&reversed, &policy(3, 0, 0, 0, 0)), d);
        // More than there are: everything stays.
        assert!(plan(&snaps, &policy(50, 0, 0, 0, 0)).iter().all(|d| d.keep));
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_day_with_snapshots() {
        // Three snapshots a day on the 1st, 2nd and 5th (nothing on the 3rd and 4th).
        let mut snaps = Vec::new();
        for day in [1, 2, 5] {
            for hour in [1, 9, 23] {
                snaps.push(snap("a", at(2024, 5, day, hour)));
            }
        }
        let d = plan(&snaps, &policy(0, 3, 0, 0, 0));
        assert_eq!(
            kept(&d),
            [
                "2024-05-05T23:00:00Z",
                "2024-05-02T23:00:00Z",
                "2024-05-01T23:00:00Z"
            ]
        );
        assert_eq!(d[0].reasons, ["daily 2024-05-05"]);
        let d = plan(&snaps, &policy(0, 2, 0, 0, 0));
        assert_eq!(kept(&d), ["2024-05-05T23:00:00Z", "2024-05-02T23:00:00Z"]);
        // Days are UTC: 23:59:59 and 00:00:00 are different days.
        let edge = [
            snap("a", at(2024, 5, 2, 0)),
            snap("a", at(2024, 5, 2, 0) - 1),
        ];
        assert_eq!(
            plan(&edge, &policy(0, 2, 0, 0, 0))
                .iter()
                .filter(|d| d.keep)
                .count(),
            2
        );
    }

    #[test]
    fn keep_weekly_uses_iso_weeks_across_year_ends() {
        // Daily snapshots from Monday 2024-12-16 to Sunday 2025-01-12: weeks 51, 52 of 2024, 1 and 2 of 2025.
        let snaps = daily("a", (2024, 12, 16), 28);
        let d = plan(&snaps, &policy(0, 0, 4, 0, 0));
        assert_eq!(
            kept(&d),
            [
                "2025-01-12T12:00:00Z",
                "2025-01-05T12:00:00Z",
                "2024-12-29T12:00:00Z",
                "2024-12-22T12:00:00Z"
            ]
        );
        let reasons: Vec<_> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.reasons[0].clone())
            .collect();
        assert_eq!(
            reasons,
            [
                "weekly 2025-W02",
                "weekly 2025-W01",
                "weekly 2024-W52",
                "weekly 2024-W51"
            ]
        );
        // 2024-12-30 and 2024-12-31 belong to 2025-W01 with 2025-01-01..05: one week, one snapshot.
        let d = plan(&daily("a", (2024, 12, 30), 6), &policy(0, 0, 5, 0, 0));
        assert_eq!(kept(&d), ["2025-01-04T12:00:00Z"]);
        // 2021-01-03 (Sunday) is 2020-W53, with 2020-12-28..31.
        let d = plan(&daily("a", (2020, 12, 28), 8), &policy(0, 0, 5, 0, 0));
        assert_eq!(kept(&d), ["2021-01-04T12:00:00Z", "2021-01-03T12:00:00Z"]);
        assert_eq!(d[1].reasons, ["weekly 2020-W53"]);
    }

    #[test]
    fn monthly_and_yearly_over_years() {
        // One snapshot a day for three years, 2022-01-01 .. 2024-12-31 (2024 is a leap year).
        let snaps = daily("a", (2022, 1, 1), 365 + 365 + 366);
        let d = plan(&snaps, &policy(0, 0, 0, 13, 0));
        let kept_months = kept(&d);
        assert_eq!(kept_months.len(), 13);
        assert_eq!(kept_months[0], "2024-12-31T12:00:00Z");
        assert_eq!(kept_months[1], "2024-11-30T12:00:00Z");
        assert_eq!(kept_months[10], "2024-02-29T12:00:00Z");
        assert_eq!(kept_months[12], "2023-12-31T12:00:00Z");
        let d = plan(&snaps, &policy(0, 0, 0, 0, 5));
        assert_eq!(
            kept(&d),
            [
                "2024-12-31T12:00:00Z",
                "2023-12-31T12:00:00Z",
                "2022-12-31T12:00:00Z"
            ]
        );
        assert_eq!(d[0].reasons, ["yearly 2024"]);
    }

    #[test]
    fn rules_combine_and_name_every_reason() {
        let snaps = daily("a", (2024, 1, 1), 366);
        let d = plan(&snaps, &policy(2, 7, 4, 12, 3));
        // The newest qualifies under every rule.
        assert_eq!(
            d[0].reasons,
            [
                "last 1",
                "daily 2024-12-31",
                "weekly 2025-W01",
                "monthly 2024-12",
                "yearly 2024"
            ]
        );
        assert_eq!(d[1].reasons, ["last 2", "daily 2024-12-30"]);
        // Days: the 7 newest (12-25..31, covering last 2); weeks: 2025-W01 (12-31, counted), W52 (12-29, a
        // daily one too), W51 (12-22) and W50 (12-15); months: December (counted) and the 11 month ends
        // before; year: 2024 (counted). 7 + 2 + 11 = 20.
        let kept_ids = kept(&d);
        assert_eq!(kept_ids.len(), 20, "{kept_ids:?}");
        assert!(kept_ids.contains(&"2024-12-15T12:00:00Z".to_owned()));
        assert!(kept_ids.contains(&"2024-01-31T12:00:00Z".to_owned()));
        assert!(!kept_ids.contains(&"2024-12-24T12:00:00Z".to_owned()));
        assert!(!kept_ids.contains(&"2024-01-01T12:00:00Z".to_owned()));
        let reasons = |utc: &str| {
            d.iter()
                .find(|d| d.time_utc == utc)
                .unwrap()
                .reasons
                .clone()
        };
        assert_eq!(
            reasons("2024-12-29T12:00:00Z"),
            ["daily 2024-12-29", "weekly 2024-W52"]
        );
        assert_eq!(reasons("2024-12-22T12:00:00Z"), ["weekly 2024-W51"]);
        assert_eq!(reasons("2024-02-29T12:00:00Z"), ["monthly 2024-02"]);
    }

    #[test]
    fn each_vm_is_planned_alone() {
        let mut snaps = daily("web", (2024, 5, 1), 10);
        snaps.extend(daily("db", (2024, 3, 1), 3));
        snaps.reverse();
        let d = plan(&snaps, &policy(2, 0, 0, 0, 0));
        let vms: Vec<&str> = d.iter().map(|d| d.vm.as_str()).collect();
        assert_eq!(vms[..3], ["db", "db", "db"]);
        assert!(vms[3..].iter().all(|v| *v == "web"));
        assert_eq!(
            kept(&d),
            [
                "2024-03-03T12:00:00Z",
                "2024-03-02T12:00:00Z",
                "2024-05-10T12:00:00Z",
                "2024-05-09T12:00:00Z"
            ]
        );
        // The older VM keeps its own newest even though newer snapshots of another VM exist.
        let d = plan(&snaps, &policy(0, 1, 0, 0, 0));
        assert_eq!(kept(&d), ["2024-03-03T12:00:00Z", "2024-05-10T12:00:00Z"]);
    }

    #[test]
    fn empty_policy_keeps_everything() {
        let snaps = daily("a", (2024, 5, 1), 5);
        for p in [KeepPolicy::default(), policy(0, 0, 0, 0, 0)] {
            assert!(p.is_empty());
            assert_eq!(p.to_string(), "no keep rule");
            let d = plan(&snaps, &p);
            assert!(d.iter().all(|d| d.keep && d.reasons == ["no keep rule"]));
        }
        let zero_last = KeepPolicy {
            last: Some(0),
            ..KeepPolicy::default()
        };
        assert!(zero_last.is_empty());
        assert!(plan(&[], &policy(1, 0, 0, 0, 0)).is_empty());
    }

    #[test]
    fn any_rule_keeps_the_newest_of_every_vm() {
        let mut snaps = daily("a", (2023, 11, 20), 90);
        snaps.extend(daily("b", (2020, 2, 27), 5));
        for p in [
            policy(1, 0, 0, 0, 0),
            policy(0, 1, 0, 0, 0),
            policy(0, 0, 1, 0, 0),
            policy(0, 0, 0, 1, 0),
            policy(0, 0, 0, 0, 1),
        ] {
            let d = plan(&snaps, &p);
            for vm in ["a", "b"] {
                let newest = d.iter().find(|d| d.vm == vm).unwrap();
                assert!(newest.keep, "{p}: {newest:?}");
            }
            assert_eq!(d.iter().filter(|d| d.keep).count(), 2, "{p}");
        }
    }

    #[test]
    fn snapshots_in_the_same_second_order_by_nanos_then_id() {
        let mut a = snap("a", at(2024, 5, 1, 10));
        let mut b = a.clone();
        a.id = "z-older".into();
        b.id = "a-newer".into();
        b.time_nanos = 5;
        let d = plan(&[a, b], &policy(1, 0, 0, 0, 0));
        assert_eq!(d[0].id, "a-newer");
        assert!(d[0].keep && !d[1].keep);
    }

    #[test]
    fn policy_serde_names_and_unknown_keys() {
        let p: KeepPolicy = serde_json::from_str(r#"{"keep_last":3,"keep_weekly":4}"#).unwrap();
        assert_eq!(p, policy(3, 0, 4, 0, 0));
        assert_eq!(p.to_string(), "keep-last 3, keep-weekly 4");
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"keep_last":3,"keep_weekly":4}"#
        );
        let err = serde_json::from_str::<KeepPolicy>(r#"{"keep_dayly":3}"#).unwrap_err();
        assert!(err.to_string().contains("keep_dayly"), "{err}");
        assert_eq!(
            serde_json::from_str::<KeepPolicy>("{}").unwrap(),
            KeepPolicy::default()
        );
    }
}
