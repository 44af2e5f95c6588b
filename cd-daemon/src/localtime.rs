//! The machine's local time zone for cron schedules: `localtime_r(3)` and `mktime(3)`
//! behind [`cd_core::schedule::Zone`].
//!
//! The C library reads `TZ` (or `/etc/localtime`) itself; nothing here parses zone
//! files. A wall-clock time that falls in a daylight-saving gap does not exist and
//! [`Local::to_unix`] says so (`None`), so a cron job at such a time is skipped that
//! day; in a repeated hour `mktime` picks one of the two instants.
#![expect(
    unsafe_code,
    reason = "localtime_r and mktime have no safe wrapper in std or rustix"
)]

use cd_core::schedule::{WallTime, Zone};

/// The local time zone of this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

fn localtime(unix: i64) -> Option<libc::tm> {
    let t: libc::time_t = unix;
    // SAFETY: an all-zero `tm` is a valid value (integers and a null `tm_zone`).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; `localtime_r` writes only `tm` and
    // is thread-safe (it does not use the static buffer `localtime` does).
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    (!r.is_null()).then_some(tm)
}

fn wall(tm: &libc::tm) -> WallTime {
    WallTime {
        year: tm.tm_year + 1900,
        month: (tm.tm_mon + 1) as u8,
        day: tm.tm_mday as u8,
        hour: tm.tm_hour as u8,
        minute: tm.tm_min as u8,
        second: tm.tm_sec.clamp(0, 60) as u8,
    }
}

impl Zone for Local {
    fn to_wall(&self, unix: i64) -> WallTime {
        match localtime(unix) {
            Some(tm) => wall(&tm),
            None => cd_core::schedule::Utc.to_wall(unix),
        }
    }

    fn to_unix(&self, w: &WallTime) -> Option<i64> {
        // SAFETY: as in `localtime`.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        tm.tm_year = w.year - 1900;
        tm.tm_mon = i32::from(w.month) - 1;
        tm.tm_mday = i32::from(w.day);
        tm.tm_hour = i32::from(w.hour);
        tm.tm_min = i32::from(w.minute);
        tm.tm_sec = i32::from(w.second);
        // Let the C library decide whether daylight saving is in force.
        tm.tm_isdst = -1;
        // SAFETY: `tm` is a valid, initialised struct that `mktime` may normalise.
        let t = unsafe { libc::mktime(&mut tm) };
        if t == -1 && *w != cd_core::schedule::Utc.to_wall(-1) {
            return None;
        }
        // mktime moves a time in a gap past it; such a time does not exist here.
        (localtime(t).map(|tm| wall(&tm)) == Some(*w)).then_some(t)
    }
}

/// `unix` as local time, `2024-05-10T03:00:00+09:00`.
#[must_use]
pub fn rfc3339(unix: i64) -> String {
    match localtime(unix) {
        Some(tm) => {
            let off = tm.tm_gmtoff;
            let sign = if off < 0 { '-' } else { '+' };
            let off = off.unsigned_abs();
            format!(
                "{}{sign}{:02}:{:02}",
                wall(&tm),
                off / 3600,
                off % 3600 / 60
            )
        }
        None => format!("{}Z", cd_core::schedule::Utc.to_wall(unix)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_round_trips() {
        // Whatever the machine's zone, a wall time it shows maps back to its instant.
        for t in [0i64, 951_868_800, 1_700_000_000, 1_711_846_800] {
            let t = t - t % 60;
            let w = Local.to_wall(t);
            assert_eq!(Local.to_unix(&w), Some(t), "{w}");
        }
        let s = rfc3339(1_700_000_000);
        assert_eq!(s.len(), "2023-11-14T22:13:20+00:00".len(), "{s}");
    }
}
