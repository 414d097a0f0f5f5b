//! Identifier formats of CONTRACT §3.

fn matches(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// `[A-Za-z0-9_-]{1,64}`
pub fn is_content_id(s: &str) -> bool {
    matches(s, 64, b"_-")
}

/// `[A-Za-z0-9_.:-]{1,128}`
pub fn is_device_id(s: &str) -> bool {
    matches(s, 128, b"_.:-")
}

/// A client-sent request id we are willing to echo and log.
pub fn is_sane_request_id(s: &str) -> bool {
    matches(s, 128, b"_.:-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ids() {
        assert!(is_content_id("m-0001"));
        assert!(is_content_id(&"a".repeat(64)));
        assert!(!is_content_id(&"a".repeat(65)));
        assert!(!is_content_id(""));
        assert!(!is_content_id("m.1"));
        assert!(!is_content_id("m 1"));
    }

    #[test]
    fn device_ids() {
        assert!(is_device_id("tv-livingroom"));
        assert!(is_device_id("a:b.c_d-e"));
        assert!(!is_device_id("a/b"));
        assert!(!is_device_id(&"a".repeat(129)));
    }
}
