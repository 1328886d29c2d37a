//! Snapshot ids and UTC time formatting, without a date crate.
//!
//! A snapshot id is `YYYYMMDDTHHMMSSZ-xxxxxx`: the UTC second the backup began and 24 random bits in hex. Ids
//! sort by time as plain strings, which keeps `ls snapshots/` readable; the random part keeps two backups that
//! begin in the same second apart (and commit refuses to overwrite an existing name regardless).

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard Hinnant's
/// `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: i64,
    minute: i64,
    second: i64,
}

fn civil(unix_secs: i64) -> Civil {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    Civil {
        year,
        month,
        day,
        hour: secs / 3600,
        minute: secs / 60 % 60,
        second: secs % 60,
    }
}

/// `2026-11-27T10:40:19Z`.
pub fn rfc3339(unix_secs: i64) -> String {
    let c = civil(unix_secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// `20261127T104019Z-3fa2c1`.
pub(crate) fn snapshot_id(unix_secs: i64, suffix: u32) -> String {
    let c = civil(unix_secs);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{:06x}",
        c.year,
        c.month,
        c.day,
        c.hour,
        c.minute,
        c.second,
        suffix & 0xff_ffff
    )
}

pub(crate) fn random_suffix() -> u32 {
    rand::random::<u32>() & 0xff_ffff
}

/// Whether `s` can name a snapshot or session: it becomes a file name, so no separators, dots or spaces.
pub(crate) fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_689_619), "2026-11-26T10:40:19Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(
            snapshot_id(1_795_689_619, 0x3fa2c1),
            "20261126T104019Z-3fa2c1"
        );
    }

    #[test]
    fn ids_sort_by_time() {
        let a = snapshot_id(1_700_000_000, 0xffffff);
        let b = snapshot_id(1_700_000_001, 0);
        assert!(a < b);
        assert!(valid_id(&a));
        assert!(!valid_id("../config") && !valid_id("") && !valid_id("a b"));
    }
}
