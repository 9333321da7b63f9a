//! Scheduled workloads: a `[microvm]` unit with `schedule = "..."` runs
//! a fresh VM at the times a cron expression names, in a time zone.
//!
//! # Design
//! The expression is crontab's five fields (minute, hour, day of month,
//! month, day of week) or one of its `@` names, evaluated by `croner` as
//! Vixie cron does (a day matches when its day of month *or* its day of
//! week does, when both are restricted). What other crons would read
//! differently is refused: a seconds or year field, `croner`'s extensions
//! (`L`, `W`, `#`, `+`, `?`) and `@reboot` (there is no "boot" for a unit
//! reloaded at any time).
//!
//! Times are computed in the unit's time zone (an IANA name, default
//! UTC), so `0 9 * * *` means 09:00 there across daylight saving changes;
//! they are compared as UTC instants.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The longest expression read.
pub const MAX_EXPRESSION: usize = 256;

/// The `@` names crontab knows (but `@reboot`).
const NAMES: &[&str] = &[
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

/// A cron expression, checked when read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CronSchedule {
    text: String,
    cron: croner::Cron,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for CronSchedule {}

impl TryFrom<String> for CronSchedule {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        CronSchedule::parse(&text)
    }
}

impl From<CronSchedule> for String {
    fn from(s: CronSchedule) -> String {
        s.text
    }
}

impl std::fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl CronSchedule {
    /// Reads crontab's five fields or an `@` name.
    pub fn parse(text: &str) -> Result<CronSchedule, String> {
        let t = text.trim();
        if t.len() > MAX_EXPRESSION {
            return Err(format!("at most {MAX_EXPRESSION} bytes"));
        }
        if t.starts_with('@') {
            if !NAMES.contains(&t.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "{t:?}: not one of {} (a unit has no boot of its own for @reboot)",
                    NAMES.join(", ")
                ));
            }
        } else {
            let fields = t.split_whitespace().count();
            if fields != 5 {
                return Err(format!(
                    "{t:?} has {fields} fields; crontab's five are minute, hour, day of month, month, day of week"
                ));
            }
            if let Some(c) = t.chars().find(|c| matches!(c, 'L' | 'W' | '#' | '+' | '?')) {
                // Month and day names hold no L, W or #... but "JUL",
                // "WED": letters are checked as words below.
                if matches!(c, '#' | '+' | '?') || !names_only(t) {
                    return Err(format!(
                        "{t:?}: {c:?} is an extension other crons read differently or not at all"
                    ));
                }
            }
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(t)
            .map_err(|e| format!("{t:?}: {e}"))?;
        Ok(CronSchedule {
            text: t.to_string(),
            cron,
        })
    }

    /// The first time after `t` it names, in time zone `tz`.
    pub fn next_after(&self, tz: &TimeZone, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&tz.0), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last time at or before `t` it names, in time zone `tz`.
    pub fn last_at_or_before(&self, tz: &TimeZone, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&tz.0), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }
}

/// Letters appear only inside month and weekday names (`JAN`, `wed`).
fn names_only(t: &str) -> bool {
    const WORDS: &[&str] = &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC", "SUN",
        "MON", "TUE", "WED", "THU", "FRI", "SAT",
    ];
    t.split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .all(|w| WORDS.contains(&w.to_ascii_uppercase().as_str()))
}

/// An IANA time zone (`Europe/Berlin`, `UTC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeZone(pub chrono_tz::Tz);

impl Default for TimeZone {
    fn default() -> Self {
        TimeZone(chrono_tz::UTC)
    }
}

impl TryFrom<String> for TimeZone {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        if s.len() > 64 {
            return Err("a time zone name is at most 64 bytes".into());
        }
        s.parse::<chrono_tz::Tz>().map(TimeZone).map_err(|_| {
            format!("{s:?} is not an IANA time zone (like \"Europe/Berlin\" or \"UTC\")")
        })
    }
}

impl From<TimeZone> for String {
    fn from(t: TimeZone) -> String {
        t.0.name().to_string()
    }
}

impl std::fmt::Display for TimeZone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name())
    }
}

/// What a due run does while an earlier run of the unit still runs
/// (Kubernetes CronJob's `concurrencyPolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Concurrency {
    /// Both run.
    #[default]
    Allow,
    /// The new run is skipped.
    Forbid,
    /// The running one is stopped, then the new one starts.
    Replace,
}

impl std::fmt::Display for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Concurrency::Allow => "allow",
            Concurrency::Forbid => "forbid",
            Concurrency::Replace => "replace",
        })
    }
}

/// The most ended runs a scheduled unit keeps.
pub const MAX_HISTORY: u32 = 100;

/// Ended runs kept when `history` is not given.
pub const DEFAULT_HISTORY: u32 = 5;

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn five_fields_and_names_are_read_as_crontab_reads_them() {
        let utc = TimeZone::default();
        let every5 = CronSchedule::parse("*/5 * * * *").unwrap();
        assert_eq!(
            every5.next_after(&utc, at(2026, 12, 7, 21, 3)),
            Some(at(2026, 12, 7, 21, 5))
        );
        assert_eq!(
            every5.next_after(&utc, at(2026, 12, 7, 21, 5)),
            Some(at(2026, 12, 7, 21, 10)),
            "strictly after"
        );
        let hourly = CronSchedule::parse("@hourly").unwrap();
        assert_eq!(
            hourly.next_after(&utc, at(2026, 12, 7, 21, 3)),
            Some(at(2026, 12, 7, 22, 0))
        );
        // Vixie cron: with both days restricted, either one matches. The
        // 1st of January 2027 is a Friday; the first Monday is the 4th.
        let either = CronSchedule::parse("0 0 1 * MON").unwrap();
        assert_eq!(
            either.next_after(&utc, at(2026, 12, 31, 12, 0)),
            Some(at(2027, 1, 1, 0, 0))
        );
        assert_eq!(
            either.next_after(&utc, at(2027, 1, 1, 0, 0)),
            Some(at(2027, 1, 4, 0, 0))
        );
        assert!(CronSchedule::parse("0 9 * JUL wed").is_ok(), "names");
        assert_eq!(
            every5.last_at_or_before(&utc, at(2026, 12, 7, 21, 9)),
            Some(at(2026, 12, 7, 21, 5))
        );
    }

    #[test]
    fn a_time_zone_moves_the_hours_and_follows_daylight_saving() {
        let berlin = TimeZone::try_from("Europe/Berlin".to_string()).unwrap();
        let nine = CronSchedule::parse("0 9 * * *").unwrap();
        // Winter: UTC+1; summer: UTC+2.
        assert_eq!(
            nine.next_after(&berlin, at(2026, 12, 7, 0, 0)),
            Some(at(2026, 12, 7, 8, 0))
        );
        assert_eq!(
            nine.next_after(&berlin, at(2026, 7, 7, 0, 0)),
            Some(at(2026, 7, 7, 7, 0))
        );
        assert_eq!(String::from(berlin), "Europe/Berlin");
    }

    #[test]
    fn what_other_crons_read_differently_is_refused_naming_why() {
        for (bad, why) in [
            ("* * * *", "has 4 fields"),
            ("0 * * * * *", "has 6 fields"),
            ("0 0 * * * 2027", "has 6 fields"),
            ("0 0 L * *", "extension"),
            ("0 0 15W * *", "extension"),
            ("0 0 * * 5#2", "extension"),
            ("0 0 1 * +MON", "extension"),
            ("0 0 ? * *", "extension"),
            ("@reboot", "@reboot"),
            ("@often", "not one of"),
            ("61 * * * *", "61"),
            ("* * * * FOO", "FOO"),
        ] {
            let e = CronSchedule::parse(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        let long = format!("{} * * * *", "1,".repeat(200));
        assert!(CronSchedule::parse(&long).unwrap_err().contains("at most"));
        assert!(TimeZone::try_from("Mars/Olympus".to_string())
            .unwrap_err()
            .contains("IANA"));
    }
}
