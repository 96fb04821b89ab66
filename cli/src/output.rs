//! How weftctl prints: a table for people by default, `-o json` or `-o yaml` for scripts (the
//! same data, serialized whole).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// `value` as `format` asks: `table` renders it for people.
pub fn render<T: Serialize>(format: Format, value: &T, table: impl FnOnce(&T) -> String) -> String {
    match format {
        Format::Table => table(value),
        Format::Json => serde_json::to_string_pretty(value).expect("weftctl's reports serialize") + "\n",
        Format::Yaml => serde_yaml::to_string(value).expect("weftctl's reports serialize"),
    }
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
pub fn table<const N: usize>(headers: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Unix seconds as an RFC 3339 UTC time and how far from `now` it is (`in 2h3m`, `5m ago`).
pub fn when(unix_seconds: i64, now: SystemTime) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(unix_seconds.max(0).unsigned_abs());
    let stamp = jiff::Timestamp::from_second(unix_seconds)
        .map_or_else(|_| unix_seconds.to_string(), |t| t.to_string());
    match at.duration_since(now) {
        Ok(ahead) => format!("{stamp} (in {})", span(ahead)),
        Err(behind) => format!("{stamp} ({} ago)", span(behind.duration())),
    }
}

/// `t` as Unix seconds (0 before the epoch).
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A duration for people, to the largest two units: `3d4h`, `2h3m`, `4m10s`, `12s`.
pub fn span(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes, seconds) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m{seconds}s"),
        (0, _, _) => format!("{hours}h{minutes}m"),
        _ => format!("{days}d{hours}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_the_widest_cell() {
        let rows = [["reviews".to_owned(), "1".to_owned()], ["a".to_owned(), "200".to_owned()]];
        assert_eq!(table(["NAME", "N"], &rows), "NAME     N\nreviews  1\na        200\n");
    }

    #[test]
    fn times_read_as_a_date_and_a_distance() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(when(1_800_007_380, now), "2027-01-15T10:03:00Z (in 2h3m)");
        assert_eq!(when(1_799_999_990, now), "2027-01-15T07:59:50Z (10s ago)");
        assert_eq!(span(Duration::from_secs(3 * 86_400 + 4 * 3600 + 5)), "3d4h");
    }
}
