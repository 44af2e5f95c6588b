//! When a `mode = "scheduled"` content set runs: a 5-field cron expression or a fixed
//! interval, and the next instant either is due.
//!
//! # Cron
//!
//! `minute hour day-of-month month day-of-week`, as in Vixie cron:
//!
//! | field | values | names |
//! | --- | --- | --- |
//! | minute | 0–59 | |
//! | hour | 0–23 | |
//! | day of month | 1–31 | |
//! | month | 1–12 | `jan`–`dec` |
//! | day of week | 0–7 (0 and 7 are Sunday) | `sun`–`sat` |
//!
//! Each field is a comma list of items; an item is `*`, a value `a`, a range `a-b`,
//! or either of `*` and `a-b` with a step (`*/15`, `8-18/2`). Names are
//! case-insensitive and may stand wherever a value may.
//!
//! **Day of month and day of week** follow Vixie cron's rule: when both fields are
//! restricted (neither starts with `*`), a day matches if *either* matches
//! (`0 0 1 * mon` runs on the 1st and on every Monday); when one starts with `*`
//! (including `*/n`), only the other one decides.
//!
//! # Time zones
//!
//! This module reads no clock and knows no time zone database. Cron expressions are
//! matched against *wall-clock fields* ([`WallTime`]), and a [`Zone`] converts between
//! those and Unix seconds: [`Utc`] and [`FixedOffset`] here, the master's local time
//! zone (`localtime_r`/`mktime`) in the daemon. Where a zone's wall clock skips an hour
//! (daylight saving starts), a time in the gap does not exist and is not run that day;
//! where it repeats an hour, a time in it runs once. The search itself is pure calendar
//! arithmetic on the proleptic Gregorian calendar.
//!
//! # Intervals
//!
//! `every = "15m"`: a positive whole number with one unit, `s`, `m`, `h` or `d`
//! ([`parse_every`]). The next run is the previous one plus the interval.

use std::fmt;

/// A problem in a schedule expression, at byte `at` of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ScheduleError {
    /// Byte offset in the expression where the problem is (0 for the whole text).
    pub at: usize,
    pub reason: String,
}

fn error(at: usize, reason: impl Into<String>) -> ScheduleError {
    ScheduleError {
        at,
        reason: reason.into(),
    }
}

/// Wall-clock fields of one minute (seconds are always 0 where cron is concerned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WallTime {
    pub year: i32,
    /// 1–12.
    pub month: u8,
    /// 1–31.
    pub day: u8,
    /// 0–23.
    pub hour: u8,
    /// 0–59.
    pub minute: u8,
    /// 0–59 (60 only if a zone reports a leap second).
    pub second: u8,
}

impl WallTime {
    /// 0 = Sunday … 6 = Saturday.
    #[must_use]
    pub fn weekday(&self) -> u8 {
        weekday(days_from_civil(self.year, self.month, self.day))
    }
}

impl fmt::Display for WallTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// Converts between Unix seconds and wall-clock fields.
pub trait Zone {
    /// The wall clock at `unix` seconds.
    fn to_wall(&self, unix: i64) -> WallTime;
    /// The instant the wall clock shows `wall` (seconds included), or `None` where it
    /// never does (a daylight-saving gap). Where it shows it twice, either.
    fn to_unix(&self, wall: &WallTime) -> Option<i64>;
}

/// Coordinated Universal Time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utc;

/// A zone that is always `offset_seconds` ahead of UTC (negative: behind).
#[derive(Debug, Clone, Copy)]
pub struct FixedOffset {
    pub offset_seconds: i32,
}

impl Zone for Utc {
    fn to_wall(&self, unix: i64) -> WallTime {
        utc_wall(unix)
    }
    fn to_unix(&self, wall: &WallTime) -> Option<i64> {
        Some(utc_unix(wall))
    }
}

impl Zone for FixedOffset {
    fn to_wall(&self, unix: i64) -> WallTime {
        utc_wall(unix + i64::from(self.offset_seconds))
    }
    fn to_unix(&self, wall: &WallTime) -> Option<i64> {
        Some(utc_unix(wall) - i64::from(self.offset_seconds))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
#[must_use]
pub fn days_from_civil(year: i32, month: u8, day: u8) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `days` after 1970-01-01.
#[must_use]
pub fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

fn weekday(days: i64) -> u8 {
    // 1970-01-01 was a Thursday.
    (days + 4).rem_euclid(7) as u8
}

fn utc_wall(unix: i64) -> WallTime {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    WallTime {
        year,
        month,
        day,
        hour: (secs / 3600) as u8,
        minute: (secs / 60 % 60) as u8,
        second: (secs % 60) as u8,
    }
}

fn utc_unix(w: &WallTime) -> i64 {
    days_from_civil(w.year, w.month, w.day) * 86_400
        + i64::from(w.hour) * 3600
        + i64::from(w.minute) * 60
        + i64::from(w.second)
}

/// A set of values 0..=63 of one cron field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bits(u64);

impl Bits {
    fn has(self, v: u8) -> bool {
        self.0 & (1 << v) != 0
    }
}

/// A parsed 5-field cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: Bits,
    hours: Bits,
    days: Bits,
    months: Bits,
    /// 0–6, Sunday = 0 (a 7 in the text is folded into 0).
    weekdays: Bits,
    /// The day-of-month / day-of-week field starts with `*`.
    days_star: bool,
    weekdays_star: bool,
    text: String,
}

struct FieldSpec {
    name: &'static str,
    min: u8,
    max: u8,
    names: &'static [&'static str],
}

const MONTH_NAMES: &[&str] = &[
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAY_NAMES: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

const FIELDS: [FieldSpec; 5] = [
    FieldSpec {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    FieldSpec {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    FieldSpec {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
    },
    FieldSpec {
        name: "month",
        min: 1,
        max: 12,
        names: MONTH_NAMES,
    },
    FieldSpec {
        name: "day of week",
        min: 0,
        max: 7,
        names: DAY_NAMES,
    },
];

impl FieldSpec {
    /// One value at byte `at` of the expression.
    fn value(&self, s: &str, at: usize) -> Result<u8, ScheduleError> {
        if let Some(i) = self.names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            // Months are named from 1, days from 0.
            return Ok(i as u8 + self.min);
        }
        let v: u32 = s
            .parse()
            .ok()
            .filter(|_| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                error(
                    at,
                    format!("{}: `{s}` is not a number{}", self.name, self.names_hint()),
                )
            })?;
        if v < u32::from(self.min) || v > u32::from(self.max) {
            return Err(error(
                at,
                format!(
                    "{}: {v} is out of range {}-{}",
                    self.name, self.min, self.max
                ),
            ));
        }
        Ok(v as u8)
    }

    fn names_hint(&self) -> &'static str {
        match self.name {
            "month" => " or a month name (jan-dec)",
            "day of week" => " or a day name (sun-sat)",
            _ => "",
        }
    }

    /// One comma-separated field starting at byte `at`.
    fn parse(&self, field: &str, at: usize) -> Result<Bits, ScheduleError> {
        let mut bits = 0u64;
        let mut offset = at;
        for item in field.split(',') {
            let item_at = offset;
            offset += item.len() + 1;
            if item.is_empty() {
                return Err(error(item_at, format!("{}: empty list item", self.name)));
            }
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => {
                    let step_at = item_at + r.len() + 1;
                    let n: u32 =
                        s.parse()
                            .ok()
                            .filter(|_| !s.starts_with('+'))
                            .ok_or_else(|| {
                                error(
                                    step_at,
                                    format!("{}: step `{s}` is not a number", self.name),
                                )
                            })?;
                    if n == 0 || n > u32::from(self.max) + 1 {
                        return Err(error(
                            step_at,
                            format!(
                                "{}: step {n} is out of range 1-{}",
                                self.name,
                                u32::from(self.max) + 1
                            ),
                        ));
                    }
                    (r, n as u8)
                }
                None => (item, 1),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let lo = self.value(a, item_at)?;
                let hi = self.value(b, item_at + a.len() + 1)?;
                if lo > hi {
                    return Err(error(
                        item_at,
                        format!("{}: range {range} runs backwards", self.name),
                    ));
                }
                (lo, hi)
            } else if step > 1 {
                return Err(error(
                    item_at,
                    format!(
                        "{}: a step needs `*` or a range before it (`*/{step}`, `a-b/{step}`), not `{range}`",
                        self.name
                    ),
                ));
            } else {
                let v = self.value(range, item_at)?;
                (v, v)
            };
            let mut v = lo;
            while v <= hi {
                bits |= 1 << v;
                v = match v.checked_add(step) {
                    Some(n) => n,
                    None => break,
                };
            }
        }
        Ok(Bits(bits))
    }
}

impl Cron {
    /// Parses `minute hour day-of-month month day-of-week` (see the module docs).
    pub fn parse(text: &str) -> Result<Cron, ScheduleError> {
        let mut fields = Vec::with_capacity(5);
        let mut rest = text;
        let mut base = 0;
        loop {
            let trimmed = rest.trim_start();
            base += rest.len() - trimmed.len();
            if trimmed.is_empty() {
                break;
            }
            let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
            fields.push((&trimmed[..end], base));
            base += end;
            rest = &trimmed[end..];
        }
        if fields.len() != 5 {
            return Err(error(
                fields.get(5).map_or(0, |f| f.1),
                format!(
                    "a cron schedule has 5 fields (minute hour day-of-month month day-of-week), this one has {}",
                    fields.len()
                ),
            ));
        }
        let mut bits = [Bits(0); 5];
        for (i, (f, at)) in fields.iter().enumerate() {
            bits[i] = FIELDS[i].parse(f, *at)?;
        }
        // Sunday is 0 and 7.
        let mut weekdays = bits[4].0;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays & !(1 << 7)) | 1;
        }
        Ok(Cron {
            minutes: bits[0],
            hours: bits[1],
            days: bits[2],
            months: bits[3],
            weekdays: Bits(weekdays),
            days_star: fields[2].0.starts_with('*'),
            weekdays_star: fields[4].0.starts_with('*'),
            text: text.trim().to_owned(),
        })
    }

    /// The expression as written (trimmed).
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn day_matches(&self, year: i32, month: u8, day: u8) -> bool {
        if !self.months.has(month) {
            return false;
        }
        let dom = self.days.has(day);
        let dow = self
            .weekdays
            .has(weekday(days_from_civil(year, month, day)));
        match (self.days_star, self.weekdays_star) {
            (false, false) => dom || dow,
            _ => dom && dow,
        }
    }

    /// The first instant strictly after `unix` at which the wall clock of `zone` shows a
    /// matching minute (second 0), or `None` if there is none within 28 years (an
    /// expression such as `0 0 30 2 *` never matches).
    pub fn next_after(&self, unix: i64, zone: &impl Zone) -> Option<i64> {
        let now = zone.to_wall(unix);
        let mut days = days_from_civil(now.year, now.month, now.day);
        // Within the first day, start at the minute after `now`.
        let mut from = Some((now.hour, now.minute));
        // The Gregorian calendar repeats every 400 years; 28 covers every weekday and
        // leap-day combination that can occur before 2100.
        for _ in 0..(366 * 28) {
            let (year, month, day) = civil_from_days(days);
            if self.day_matches(year, month, day) {
                for hour in 0..24u8 {
                    if !self.hours.has(hour) || from.is_some_and(|(h, _)| hour < h) {
                        continue;
                    }
                    for minute in 0..60u8 {
                        if !self.minutes.has(minute)
                            || from.is_some_and(|(h, m)| hour == h && minute <= m)
                        {
                            continue;
                        }
                        let wall = WallTime {
                            year,
                            month,
                            day,
                            hour,
                            minute,
                            second: 0,
                        };
                        match zone.to_unix(&wall) {
                            Some(t) if t > unix => return Some(t),
                            // A daylight-saving gap, or a repeated hour already past.
                            _ => continue,
                        }
                    }
                }
            }
            from = None;
            days += 1;
        }
        None
    }
}

/// When a scheduled content set runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Cron(Cron),
    /// Every this many seconds.
    Every {
        seconds: u64,
    },
}

impl Schedule {
    /// The next run strictly after `unix` (for `Every`, `unix` is the previous run or
    /// the start).
    pub fn next_after(&self, unix: i64, zone: &impl Zone) -> Option<i64> {
        match self {
            Schedule::Cron(c) => c.next_after(unix, zone),
            Schedule::Every { seconds } => unix.checked_add(i64::try_from(*seconds).ok()?),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron(c) => write!(f, "cron \"{}\"", c.as_str()),
            Schedule::Every { seconds } => write!(f, "every {seconds}s"),
        }
    }
}

/// Parses an interval: a positive whole number and one unit, `s`, `m`, `h` or `d`
/// (`"90s"`, `"15m"`, `"1d"`). Returns seconds.
pub fn parse_every(text: &str) -> Result<u64, ScheduleError> {
    let t = text.trim();
    let lead = text.len() - text.trim_start().len();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(error(
                lead + digits,
                format!("interval `{t}` is not a number with a unit s, m, h or d (e.g. \"15m\")"),
            ));
        }
    };
    let n: u64 = num.parse().map_err(|_| {
        error(
            lead,
            format!("interval `{t}` has no number before its unit"),
        )
    })?;
    if n == 0 {
        return Err(error(lead, "the interval must be longer than zero"));
    }
    n.checked_mul(per)
        .filter(|s| *s <= 366 * 86_400)
        .ok_or_else(|| error(lead, format!("interval `{t}` is longer than a year")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(y: i32, mo: u8, d: u8, h: u8, mi: u8) -> i64 {
        utc_unix(&WallTime {
            year: y,
            month: mo,
            day: d,
            hour: h,
            minute: mi,
            second: 0,
        })
    }

    fn next(expr: &str, from: i64) -> WallTime {
        let t = Cron::parse(expr)
            .unwrap()
            .next_after(from, &Utc)
            .unwrap_or_else(|| panic!("{expr}: no next"));
        Utc.to_wall(t)
    }

    fn w(y: i32, mo: u8, d: u8, h: u8, mi: u8) -> WallTime {
        Utc.to_wall(unix(y, mo, d, h, mi))
    }

    #[test]
    fn calendar_round_trips() {
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(
            civil_from_days(days_from_civil(2024, 2, 29) + 1),
            (2024, 3, 1)
        );
        assert_eq!(w(2024, 6, 2, 0, 0).weekday(), 0, "2024-06-02 was a Sunday");
        assert_eq!(w(1970, 1, 1, 0, 0).weekday(), 4);
        assert_eq!(unix(2000, 3, 1, 0, 0), 951_868_800);
    }

    #[test]
    fn daily_at_three() {
        let c = "0 3 * * *";
        assert_eq!(next(c, unix(2024, 5, 10, 1, 0)), w(2024, 5, 10, 3, 0));
        // Strictly after: at 03:00 exactly, the next is tomorrow.
        assert_eq!(next(c, unix(2024, 5, 10, 3, 0)), w(2024, 5, 11, 3, 0));
        assert_eq!(next(c, unix(2024, 5, 10, 3, 0) - 1), w(2024, 5, 10, 3, 0));
        // Year end.
        assert_eq!(next(c, unix(2024, 12, 31, 4, 0)), w(2025, 1, 1, 3, 0));
    }

    #[test]
    fn steps_lists_and_ranges() {
        let from = unix(2024, 5, 10, 10, 7);
        assert_eq!(next("*/15 * * * *", from), w(2024, 5, 10, 10, 15));
        assert_eq!(
            next("*/15 * * * *", unix(2024, 5, 10, 10, 45)),
            w(2024, 5, 10, 11, 0)
        );
        assert_eq!(next("5,50 * * * *", from), w(2024, 5, 10, 10, 50));
        assert_eq!(next("0 8-18/2 * * *", from), w(2024, 5, 10, 12, 0));
        assert_eq!(
            next("0 8-18/2 * * *", unix(2024, 5, 10, 18, 0)),
            w(2024, 5, 11, 8, 0)
        );
        assert_eq!(next("30 1 * jan,jul *", from), w(2024, 7, 1, 1, 30));
        assert_eq!(next("* * * * *", from), w(2024, 5, 10, 10, 8));
        // Seconds are dropped: the next whole minute.
        assert_eq!(next("* * * * *", from + 59), w(2024, 5, 10, 10, 8));
    }

    #[test]
    fn february_29() {
        let c = "0 0 29 2 *";
        assert_eq!(next(c, unix(2023, 3, 1, 0, 0)), w(2024, 2, 29, 0, 0));
        assert_eq!(next(c, unix(2024, 2, 29, 0, 0)), w(2028, 2, 29, 0, 0));
        // 2100 is not a leap year.
        assert_eq!(next(c, unix(2097, 1, 1, 0, 0)), w(2104, 2, 29, 0, 0));
        // Never.
        assert_eq!(Cron::parse("0 0 30 2 *").unwrap().next_after(0, &Utc), None);
        assert_eq!(
            Cron::parse("0 0 31 4,6 *").unwrap().next_after(0, &Utc),
            None
        );
    }

    #[test]
    fn sunday_is_zero_and_seven() {
        // 2024-06-06 is a Thursday; the next Sunday is the 9th.
        let from = unix(2024, 6, 6, 12, 0);
        for c in [
            "0 0 * * 0",
            "0 0 * * 7",
            "0 0 * * sun",
            "0 0 * * SUN",
            "0 0 * * 6-7",
        ] {
            let n = next(c, from);
            assert_eq!(n.weekday(), if c.ends_with("6-7") { 6 } else { 0 }, "{c}");
        }
        assert_eq!(next("0 0 * * 7", from), w(2024, 6, 9, 0, 0));
        assert_eq!(next("0 0 * * 5-7", from), w(2024, 6, 7, 0, 0));
        assert_eq!(Cron::parse("0 0 * * 0").unwrap(), {
            let mut c = Cron::parse("0 0 * * 7").unwrap();
            c.text = "0 0 * * 0".into();
            c
        });
    }

    #[test]
    fn day_of_month_or_day_of_week() {
        // Both restricted: the 13th OR any Friday (Vixie cron).
        let c = "0 0 13 * 5";
        let from = unix(2024, 6, 1, 0, 0); // a Saturday
        assert_eq!(next(c, from), w(2024, 6, 7, 0, 0)); // Friday the 7th
        assert_eq!(next(c, unix(2024, 6, 12, 0, 0)), w(2024, 6, 13, 0, 0)); // a Thursday
        // One starred: AND, i.e. only the other decides.
        assert_eq!(next("0 0 13 * *", from), w(2024, 6, 13, 0, 0));
        assert_eq!(next("0 0 * * 5", from), w(2024, 6, 7, 0, 0));
        // `*/2` counts as starred, as in Vixie cron: odd days that are also Fridays.
        assert_eq!(next("0 0 */2 * 5", from), w(2024, 6, 7, 0, 0));
        assert_eq!(
            next("0 0 */2 * 5", unix(2024, 6, 7, 0, 0)),
            w(2024, 6, 21, 0, 0)
        );
    }

    #[test]
    fn fixed_offset_zone() {
        // 03:00 at UTC+9 is 18:00 UTC the day before.
        let z = FixedOffset {
            offset_seconds: 9 * 3600,
        };
        let t = Cron::parse("0 3 * * *")
            .unwrap()
            .next_after(unix(2024, 5, 10, 0, 0), &z)
            .unwrap();
        assert_eq!(Utc.to_wall(t), w(2024, 5, 10, 18, 0));
        assert_eq!(z.to_wall(t).hour, 3);
    }

    /// A zone with a daylight-saving gap 02:00–03:00 on 2024-03-31 (UTC+1 → UTC+2).
    struct Dst;
    impl Zone for Dst {
        fn to_wall(&self, t: i64) -> WallTime {
            let switch = unix(2024, 3, 31, 1, 0);
            utc_wall(t + if t < switch { 3600 } else { 7200 })
        }
        fn to_unix(&self, w: &WallTime) -> Option<i64> {
            let local = utc_unix(w);
            let gap = (unix(2024, 3, 31, 2, 0), unix(2024, 3, 31, 3, 0));
            if local >= gap.0 && local < gap.1 {
                None
            } else if local < gap.0 {
                Some(local - 3600)
            } else {
                Some(local - 7200)
            }
        }
    }

    #[test]
    fn a_time_in_a_dst_gap_is_skipped_that_day() {
        let c = Cron::parse("30 2 * * *").unwrap();
        let t = c.next_after(unix(2024, 3, 30, 12, 0), &Dst).unwrap();
        assert_eq!(Dst.to_wall(t), w(2024, 4, 1, 2, 30));
        let t = Cron::parse("30 3 * * *")
            .unwrap()
            .next_after(unix(2024, 3, 30, 12, 0), &Dst)
            .unwrap();
        assert_eq!(Dst.to_wall(t), w(2024, 3, 31, 3, 30));
    }

    #[test]
    fn bad_expressions_say_where() {
        let cases = [
            ("0 3 * *", 0, "5 fields"),
            ("0 3 * * * *", 10, "5 fields"),
            ("60 3 * * *", 0, "minute: 60 is out of range 0-59"),
            ("0 24 * * *", 2, "hour: 24 is out of range"),
            ("0 3 0 * *", 4, "day of month: 0 is out of range 1-31"),
            ("0 3 * 13 *", 6, "month: 13"),
            ("0 3 * * 8", 8, "day of week: 8 is out of range 0-7"),
            ("0 3 * * fri-mon", 8, "runs backwards"),
            ("*/0 * * * *", 2, "step 0"),
            ("5/2 * * * *", 0, "a step needs"),
            ("0 x * * *", 2, "hour: `x` is not a number"),
            ("0  3 * foo *", 7, "month name"),
            ("1,,2 * * * *", 2, "empty list item"),
            ("0 3-x * * *", 4, "`x`"),
            ("-1 * * * *", 0, "not a number"),
        ];
        for (expr, at, why) in cases {
            let e = Cron::parse(expr).unwrap_err();
            assert_eq!(e.at, at, "{expr}: {e}");
            assert!(e.reason.contains(why), "{expr}: {e}");
        }
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_every("2s"), Ok(2));
        assert_eq!(parse_every("15m"), Ok(900));
        assert_eq!(parse_every("1h"), Ok(3600));
        assert_eq!(parse_every("1d"), Ok(86_400));
        for bad in ["", "15", "m", "0m", "1.5h", "15 m", "1w", "-1s", "999999d"] {
            assert!(parse_every(bad).is_err(), "{bad}");
        }
        let s = Schedule::Every { seconds: 900 };
        assert_eq!(s.next_after(1000, &Utc), Some(1900));
    }
}
