//! Identifiers, parsed once where they enter (HTTP path, body, token, the
//! internal API's JSON): a value of these types is valid by construction, so
//! nothing below the edge checks a string again.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not an identifier; the message names the rule, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub &'static str);

/// Byte classes of the identifiers' alphabets, one bit each.
const HEX: u8 = 1;
/// `[A-Za-z0-9_-]`: titles, and a session id's MAC (URL-safe base64).
const WORD: u8 = 2;
/// `[A-Za-z0-9_.:-]`: devices.
const DEVICE: u8 = 4;

/// Each byte's classes: one look-up a byte instead of a chain of range
/// checks. A heartbeat checks its whole session id (~90 bytes) this way,
/// and the chains cost ~1.1 k instructions a request.
const CLASSES: [u8; 256] = {
    let mut table = [0; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let word = c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
        table[b] = if c.is_ascii_hexdigit() { HEX } else { 0 }
            | if word { WORD | DEVICE } else { 0 }
            | if c == b'.' || c == b':' { DEVICE } else { 0 };
        b += 1;
    }
    table
};

fn all_in(s: &str, class: u8) -> bool {
    s.bytes().all(|b| CLASSES[usize::from(b)] & class != 0)
}

fn plain(s: &str, max: usize, class: u8) -> bool {
    !s.is_empty() && s.len() <= max && all_in(s, class)
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $rule:expr, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The rule, as error messages and the OpenAPI document state it.
            pub const RULE: &'static str = $rule;

            pub fn parse(s: impl Into<String>) -> Result<Self, InvalidId> {
                let s = s.into();
                let check: fn(&str) -> bool = $check;
                if check(&s) { Ok(Self(s)) } else { Err(InvalidId($rule)) }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

id_type!(
    /// A user id (the JWT `sub`): 1–128 bytes, no control characters (CONTRACT §6).
    UserId,
    "sub must be 1-128 bytes without control characters",
    |s| !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control)
);

id_type!(
    /// `[A-Za-z0-9_-]{1,64}`
    ContentId,
    "content_id must match [A-Za-z0-9_-]{1,64}",
    |s| plain(s, 64, WORD)
);

id_type!(
    /// `[A-Za-z0-9_.:-]{1,128}`
    DeviceId,
    "device_id must match [A-Za-z0-9_.:-]{1,128}",
    |s| plain(s, 128, DEVICE)
);

id_type!(
    /// A session id as Moneta issues it: `<random>.<content_id>.<device_id>.<mac>`
    /// (ids issued before they carried the device, `<random>.<content_id>.<mac>`,
    /// stay valid). Only the shape is checked here; whether Moneta issued it to
    /// this caller is the MAC's business (`sessions::ids`).
    SessionId,
    "not a session id",
    |s| SessionId::split_str(s).is_some()
);

/// Hex digits of the random part of a session id (128 bits).
pub const SESSION_RANDOM_LEN: usize = 32;
/// URL-safe base64 characters of a session id's MAC (128 bits).
pub const SESSION_MAC_LEN: usize = 22;

/// The parts of a session id, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParts<'a> {
    pub random: &'a str,
    pub content: &'a str,
    /// The device the session started on; `None` in ids issued before ids
    /// carried it.
    pub device: Option<&'a str>,
    pub mac: &'a str,
}

impl SessionId {
    /// The random part and the MAC have fixed lengths and no `.`, and a title
    /// has no `.` either, so the title runs to the first `.` of what lies
    /// between them and the device (which may hold `.`) is the rest.
    fn split_str(s: &str) -> Option<SessionParts<'_>> {
        let (random, rest) = s.split_at_checked(SESSION_RANDOM_LEN)?;
        let (middle, mac) = rest.split_at_checked(rest.len().checked_sub(SESSION_MAC_LEN)?)?;
        let middle = middle.strip_prefix('.')?.strip_suffix('.')?;
        let (content, device) = match middle.split_once('.') {
            Some((content, device)) => (content, Some(device)),
            None => (middle, None),
        };
        let ok = all_in(random, HEX)
            && plain(content, 64, WORD)
            && device.is_none_or(|d| plain(d, 128, DEVICE))
            && all_in(mac, WORD);
        ok.then_some(SessionParts {
            random,
            content,
            device,
            mac,
        })
    }

    /// The parts of an id whose shape was checked when it was built, without
    /// checking it again (a heartbeat asks for them several times).
    pub fn parts(&self) -> SessionParts<'_> {
        let s = self.0.as_str();
        let random = s.get(..SESSION_RANDOM_LEN).unwrap_or_default();
        let mac_at = s.len().saturating_sub(SESSION_MAC_LEN);
        let mac = s.get(mac_at..).unwrap_or_default();
        let middle = s
            .get(SESSION_RANDOM_LEN + 1..mac_at.saturating_sub(1))
            .unwrap_or_default();
        let (content, device) = match middle.split_once('.') {
            Some((content, device)) => (content, Some(device)),
            None => (middle, None),
        };
        SessionParts {
            random,
            content,
            device,
            mac,
        }
    }

    /// The title a session plays, so positions route while Redis is down.
    pub fn content_id(&self) -> ContentId {
        ContentId(self.content_str().to_owned())
    }

    /// [`SessionId::content_id`], borrowed.
    pub fn content_str(&self) -> &str {
        self.parts().content
    }

    /// The device the session started on, so that Redis can record the
    /// session again under it after losing it; `None` for ids issued before
    /// ids carried it.
    pub fn device_str(&self) -> Option<&str> {
        self.parts().device
    }

    /// Assembles an id from its parts (the MAC is computed by the caller).
    pub fn from_parts(
        random: &str,
        content: &ContentId,
        device: Option<&DeviceId>,
        mac: &str,
    ) -> Result<Self, InvalidId> {
        Self::parse(match device {
            Some(device) => format!("{random}.{content}.{device}.{mac}"),
            None => format!("{random}.{content}.{mac}"),
        })
    }
}

/// A resume position: an integer from 0 to 2^53 − 1, so that every consumer
/// of the JSON (JavaScript players, the internal API) reads it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct PositionMs(u64);

impl PositionMs {
    pub const MAX: u64 = (1 << 53) - 1;
    pub const ZERO: PositionMs = PositionMs(0);

    pub fn new(ms: u64) -> Result<Self, InvalidId> {
        if ms <= Self::MAX {
            Ok(Self(ms))
        } else {
            Err(InvalidId(
                "position_ms must be an integer from 0 to 9007199254740991",
            ))
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for PositionMs {
    type Error = InvalidId;
    fn try_from(ms: u64) -> Result<Self, InvalidId> {
        Self::new(ms)
    }
}

impl From<PositionMs> for u64 {
    fn from(p: PositionMs) -> u64 {
        p.0
    }
}

impl fmt::Display for PositionMs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_byte_is_in_the_alphabets_the_rules_name() {
        for b in 0..=255u8 {
            let alnum = b.is_ascii_alphanumeric();
            let expected = [
                (HEX, b.is_ascii_hexdigit()),
                (WORD, alnum || b"_-".contains(&b)),
                (DEVICE, alnum || b"_.:-".contains(&b)),
            ];
            for (class, member) in expected {
                assert_eq!(
                    CLASSES[usize::from(b)] & class != 0,
                    member,
                    "byte {b} class {class}"
                );
            }
        }
    }

    #[test]
    fn content_ids() {
        assert!(ContentId::parse("m-0001").is_ok());
        assert!(ContentId::parse("a".repeat(64)).is_ok());
        for bad in ["", "m.1", "m 1", "m/1"] {
            assert!(ContentId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ContentId::parse("a".repeat(65)).is_err());
    }

    #[test]
    fn device_ids() {
        assert!(DeviceId::parse("tv-livingroom").is_ok());
        assert!(DeviceId::parse("a:b.c_d-e").is_ok());
        assert!(DeviceId::parse("a/b").is_err());
        assert!(DeviceId::parse("a".repeat(129)).is_err());
    }

    #[test]
    fn user_ids_are_bounded_and_printable() {
        assert!(UserId::parse("user-42").is_ok());
        assert!(UserId::parse("ünïcødé {weird}:id").is_ok());
        assert!(UserId::parse("x".repeat(128)).is_ok());
        assert!(UserId::parse("x".repeat(129)).is_err());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a\nb").is_err());
        assert!(UserId::parse("a\u{7f}b").is_err());
    }

    #[test]
    fn ids_refuse_bad_json() {
        assert!(serde_json::from_str::<ContentId>("\"m/1\"").is_err());
        assert_eq!(
            serde_json::from_str::<ContentId>("\"m-1\"").unwrap().as_str(),
            "m-1"
        );
    }

    #[test]
    fn session_ids_have_a_title_a_device_and_a_mac() {
        let random = "a".repeat(SESSION_RANDOM_LEN);
        let mac = "b".repeat(SESSION_MAC_LEN);
        let id = SessionId::parse(format!("{random}.m-0001.tv.living:room-1.{mac}")).unwrap();
        let parts = SessionParts {
            random: &random,
            content: "m-0001",
            device: Some("tv.living:room-1"),
            mac: &mac,
        };
        assert_eq!(id.parts(), parts);
        assert_eq!(SessionId::split_str(id.as_str()), Some(parts));
        assert_eq!(id.content_id().as_str(), "m-0001");
        assert_eq!(id.device_str(), Some("tv.living:room-1"));
        // Issued before ids carried the device.
        let old = SessionId::parse(format!("{random}.m-0001.{mac}")).unwrap();
        assert_eq!(old.parts().device, None);
        assert_eq!(old.content_str(), "m-0001");
        let device = DeviceId::parse("d".repeat(128)).unwrap();
        let longest = SessionId::from_parts(
            &random,
            &ContentId::parse("c".repeat(64)).unwrap(),
            Some(&device),
            &mac,
        );
        assert_eq!(longest.unwrap().device_str(), Some(device.as_str()));
        let dotted_mac = format!("{}.{}", "b".repeat(10), "b".repeat(SESSION_MAC_LEN - 11));
        for bad in [
            format!("{random}.m-0001"),
            format!("{random}.m/1.{mac}"),
            "nope".to_owned(),
            format!("{random}..{mac}"),
            format!("{random}.m-1..{mac}"),
            format!("{random}..tv.{mac}"),
            format!("{random}.{mac}"),
            format!("{random}.m-1.{dotted_mac}"),
            format!("{random}xm-1.{mac}"),
            format!("{random}.m-1x{mac}"),
            format!("{}.m-1.{mac}", "g".repeat(SESSION_RANDOM_LEN)),
            format!("{random}.m-é.{mac}"),
            format!("{random}.m-1.t/v.{mac}"),
            format!("{random}.m-1.{}.{mac}", "d".repeat(129)),
            format!("{random}.{}.{mac}", "a".repeat(65)),
        ] {
            assert!(SessionId::parse(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn positions_stop_at_two_to_the_53() {
        assert!(PositionMs::new(PositionMs::MAX).is_ok());
        assert!(PositionMs::new(PositionMs::MAX + 1).is_err());
        assert!(serde_json::from_str::<PositionMs>("9007199254740992").is_err());
        assert!(serde_json::from_str::<PositionMs>("-1").is_err());
        assert!(serde_json::from_str::<PositionMs>("1.5").is_err());
    }
}
