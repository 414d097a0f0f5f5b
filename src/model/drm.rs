//! The DRM systems a licence may be asked for: a closed set, so a path
//! segment or a token claim never becomes a metric label or a setting name
//! unchecked.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrmSystem {
    Widevine,
    PlayReady,
    FairPlay,
    /// W3C ClearKey: the development stand-in for any CENC system.
    ClearKey,
}

impl DrmSystem {
    pub const ALL: [DrmSystem; 4] = [
        DrmSystem::Widevine,
        DrmSystem::PlayReady,
        DrmSystem::FairPlay,
        DrmSystem::ClearKey,
    ];

    /// The name the catalog, the licence token and the route use.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DrmSystem::Widevine => "widevine",
            DrmSystem::PlayReady => "playready",
            DrmSystem::FairPlay => "fairplay",
            DrmSystem::ClearKey => "clearkey",
        }
    }
}

impl fmt::Display for DrmSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CENC key id (16 bytes), however it was written: hex in the catalog,
/// licence tokens and key files (dashes allowed, as in UUID form), unpadded
/// base64url in W3C ClearKey messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 16];
        let mut digits = text.bytes().filter(|b| *b != b'-');
        for byte in &mut bytes {
            let high = hex_value(digits.next()?)?;
            let low = hex_value(digits.next()?)?;
            *byte = high << 4 | low;
        }
        digits.next().is_none().then_some(Self(bytes))
    }

    pub fn from_base64url(text: &str) -> Option<Self> {
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        // Some CDMs pad; the value is the same.
        let decoded = URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()?;
        decoded.try_into().ok().map(Self)
    }

    pub fn to_base64url(self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0)
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_read_the_same_from_hex_and_base64url() {
        let hex = KeyId::from_hex("0123abcd0123ABCD0123abcd0123abcd").unwrap();
        assert_eq!(KeyId::from_hex("0123abcd-0123-abcd-0123-abcd0123abcd"), Some(hex));
        assert_eq!(hex.to_base64url(), "ASOrzQEjq80BI6vNASOrzQ");
        assert_eq!(KeyId::from_base64url("ASOrzQEjq80BI6vNASOrzQ"), Some(hex));
        assert_eq!(KeyId::from_base64url("ASOrzQEjq80BI6vNASOrzQ=="), Some(hex));
        for bad in [
            "",
            "0123abcd",
            "0123abcd0123abcd0123abcd0123abcdff",
            "0123abcd0123abcd0123abcd0123abcg",
        ] {
            assert_eq!(KeyId::from_hex(bad), None, "{bad:?}");
        }
        for bad in ["", "ASOrzQ", "ASOrzQEjq80BI6vNASOrzQEj", "!!!!zQEjq80BI6vNASOrzQ"] {
            assert_eq!(KeyId::from_base64url(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        for system in DrmSystem::ALL {
            assert_eq!(DrmSystem::parse(system.as_str()), Some(system));
        }
        for other in ["", "Widevine", "clearkey ", "primetime", "../widevine"] {
            assert_eq!(DrmSystem::parse(other), None, "{other:?}");
        }
    }
}
