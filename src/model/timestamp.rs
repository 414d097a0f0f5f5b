//! Timestamps written the way the rest of the JSON writes them, faster.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Serialize, Serializer};

/// `at` exactly as chrono's `Serialize` writes it (RFC 3339, `Z`, a
/// fraction of 0, 3, 6 or 9 digits, as many as it needs), digit by digit:
/// chrono goes through `collect_str` and padded `write!`s, ~2.4 k
/// instructions of the ~3 k a heartbeat's answer cost. For
/// `#[serde(serialize_with)]` on hot answers and bodies.
pub fn rfc3339<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    match Rfc3339::of(at) {
        Some(text) => serializer.serialize_str(text.as_str()),
        None => at.serialize(serializer),
    }
}

/// `at` as a JSON string, quotes included, the same text as [`rfc3339`],
/// for answers written by hand: the text is digits and separators, so
/// serde_json's escaping (~10 instructions a byte) has nothing to do.
pub fn write_rfc3339(out: &mut Vec<u8>, at: &DateTime<Utc>) {
    match Rfc3339::of(at) {
        Some(text) => {
            out.push(b'"');
            out.extend_from_slice(text.as_bytes());
            out.push(b'"');
        }
        // Writing into a Vec cannot fail.
        None => drop(serde_json::to_writer(out, at)),
    }
}

/// The text of an RFC 3339 timestamp in a year from 0 to 9999.
struct Rfc3339 {
    buf: [u8; 30],
    len: usize,
}

impl Rfc3339 {
    /// `None` for signed years and leap seconds, which keep chrono's own form.
    fn of(at: &DateTime<Utc>) -> Option<Self> {
        // Each of `DateTime`'s accessors adds the zone's offset again first;
        // the naive time is read once.
        let at = at.naive_utc();
        let (year, nano) = (at.year(), at.nanosecond());
        if !(0..=9999).contains(&year) || nano >= 1_000_000_000 {
            return None;
        }
        let mut buf = *b"0000-00-00T00:00:00.000000000Z";
        let mut put = |at: usize, width: usize, mut value: u32| {
            for i in (at..at + width).rev() {
                buf[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, year as u32);
        put(5, 2, at.month());
        put(8, 2, at.day());
        put(11, 2, at.hour());
        put(14, 2, at.minute());
        put(17, 2, at.second());
        put(20, 9, nano);
        let end = match nano {
            0 => 19,
            n if n % 1_000_000 == 0 => 23,
            n if n % 1_000 == 0 => 26,
            _ => 29,
        };
        buf[end] = b'Z';
        Some(Self { buf, len: end + 1 })
    }

    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits and separators were written.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[derive(Serialize)]
    struct At(#[serde(serialize_with = "rfc3339")] DateTime<Utc>);

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        let base = Utc.with_ymd_and_hms(2026, 12, 2, 4, 6, 9).unwrap();
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .map(|n| n.and_utc());
        let times = [
            base,
            base + chrono::Duration::milliseconds(7),
            base + chrono::Duration::milliseconds(930),
            base + chrono::Duration::microseconds(1_234),
            base + chrono::Duration::nanoseconds(5),
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-5, 1, 1, 0, 0, 0).unwrap(),
        ]
        .into_iter()
        .chain(leap);
        for at in times {
            let ours = serde_json::to_string(&At(at)).unwrap();
            let chrono = serde_json::to_string(&at).unwrap();
            assert_eq!(ours, chrono, "{at:?}");
            let mut written = Vec::new();
            write_rfc3339(&mut written, &at);
            assert_eq!(String::from_utf8(written).unwrap(), chrono, "{at:?}");
        }
    }
}
