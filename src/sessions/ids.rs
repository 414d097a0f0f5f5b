//! Session ids Moneta can recognise as its own:
//! `<random>.<content_id>.<device_id>.<mac>`, the MAC (HMAC-SHA256, 128 bits)
//! over the caller's `sub`, the title, the random part and the device under
//! `MONETA_SESSION_SECRET`. A forged id, or one issued to
//! another caller, fails here — also while Redis is down, when nothing else
//! could tell.
//!
//! The random part is a UUIDv7 stamped with the time of issue on this
//! instance's estimate of Redis' clock: Redis keeps a bounded number of
//! ended ids per user one by one, and tells the older ones it no longer
//! lists by when they were issued (`session_lib.lua`, `bury`).
//!
//! The device is in the id because a heartbeat is all Redis sees of a
//! session it lost (it started while Redis was unreachable, or Redis lost its
//! data): recorded again under its real device, the session is replaced, not
//! counted, when the same device starts again.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{ExposeSecret, Secret};
use crate::model::{ContentId, DeviceId, InvalidId, SessionId, SessionParts, UserId};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC kept in the id.
const MAC_BYTES: usize = 16;

/// Ids kept as verified, at most (a few hundred bytes each): more than the
/// sessions one instance sees heartbeats for between two of a session's
/// heartbeats.
const VERIFIED_CAPACITY: u64 = 10_000;
/// An id is kept while its heartbeats keep coming (every 30 s by default).
const VERIFIED_IDLE: Duration = Duration::from_secs(120);

/// Cloned, not made again, where another part needs it: without a shared
/// secret the key is random per process, and every holder must have the same.
#[derive(Clone)]
pub struct SessionKey {
    /// Keyed once; each MAC starts from a clone.
    keyed: HmacSha256,
    /// Every instance holds this key (`MONETA_SESSION_SECRET` is set); with a
    /// per-process key, ids of other instances fail the MAC and only Redis
    /// can tell whether they are real.
    shared: bool,
    /// Ids whose MAC verified, with the caller it verified for. A player
    /// sends the same id with every heartbeat of a session, and the MAC (an
    /// HMAC-SHA256 of four blocks) was the largest cost of a heartbeat's own
    /// work. The key never changes within a process, so an entry stays true;
    /// only ids that verified are kept, so forged ones cannot fill it.
    verified: moka::sync::Cache<String, Arc<str>, foldhash::fast::RandomState>,
}

/// When an id is issued, on Redis' clock.
#[derive(Debug, Clone, Copy)]
pub enum IssuedAt {
    /// This instance has measured Redis' clock and Redis recorded the start.
    Known(DateTime<Utc>),
    /// Redis did not record the start (unreachable), or this instance has
    /// never measured Redis' clock: the id carries no time (a UUIDv4), so
    /// Redis never judges it by the runs of ended ids, which cover every
    /// time up to theirs. Otherwise a session started during an outage, or
    /// on an instance whose own clock runs behind, would be taken for ended
    /// once its user has ended enough others before its first heartbeat
    /// after the outage. It ends only by being listed as ended, one by one.
    Unknown,
}

/// What an id's MAC proves about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provenance {
    /// Issued by Moneta to this caller.
    Issued,
    /// Not by this key, which other instances do not share: real only if
    /// Redis knows the session for this caller.
    Unproven,
    /// Not issued by this deployment to this caller.
    Forged,
}

#[derive(Debug, thiserror::Error)]
#[error("MONETA_SESSION_SECRET: unusable as an HMAC key")]
pub struct SessionKeyError;

impl SessionKey {
    /// The deployment's shared key, or (unset) a random key for this process.
    pub fn new(secret: Option<&Secret>) -> Result<Self, SessionKeyError> {
        let key = match secret {
            Some(secret) => secret.expose_secret().as_bytes().to_vec(),
            None => {
                tracing::warn!(
                    "MONETA_SESSION_SECRET is not set: session ids verify only on this instance \
                     (set one shared key for every instance of a deployment)"
                );
                let a = uuid::Uuid::new_v4();
                let b = uuid::Uuid::new_v4();
                [a.as_bytes().as_slice(), b.as_bytes().as_slice()].concat()
            }
        };
        let keyed = HmacSha256::new_from_slice(&key).map_err(|_| SessionKeyError)?;
        Ok(Self {
            keyed,
            shared: secret.is_some(),
            // foldhash, as the verified tokens (`auth/verifier.rs`).
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_idle(VERIFIED_IDLE)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        })
    }

    fn mac(&self, user: &UserId, parts: &SessionParts<'_>) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        // NUL cannot occur in any part, so the message is unambiguous; an id
        // without a device (issued before ids carried it) has one part fewer.
        for part in [user.as_str(), parts.content, parts.random]
            .into_iter()
            .chain(parts.device)
        {
            mac.update(part.as_bytes());
            mac.update(&[0]);
        }
        mac
    }

    /// A new id for `user` playing `content` on `device`, issued at `at`
    /// (Redis' clock as this instance estimates it), or with no time of
    /// issue: see [`IssuedAt`].
    pub fn issue(
        &self,
        user: &UserId,
        content: &ContentId,
        device: &DeviceId,
        at: IssuedAt,
    ) -> Result<SessionId, InvalidId> {
        let uuid = match at {
            IssuedAt::Known(at) => {
                let ms = u64::try_from(at.timestamp_millis()).unwrap_or_default();
                let stamp =
                    uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000);
                uuid::Uuid::new_v7(stamp)
            }
            IssuedAt::Unknown => uuid::Uuid::new_v4(),
        };
        let random = uuid.simple().to_string();
        let parts = SessionParts {
            random: &random,
            content: content.as_str(),
            device: Some(device.as_str()),
            mac: "",
        };
        let tag = self.mac(user, &parts).finalize().into_bytes();
        let encoded = URL_SAFE_NO_PAD.encode(tag.get(..MAC_BYTES).unwrap_or_default());
        let id = SessionId::from_parts(&random, content, Some(device), &encoded)?;
        // Its first heartbeat then finds it verified.
        self.remember(user, &id);
        Ok(id)
    }

    /// What the MAC proves of `id` for `user`.
    pub fn provenance(&self, user: &UserId, id: &SessionId) -> Provenance {
        match (self.verify(user, id), self.shared) {
            (true, _) => Provenance::Issued,
            (false, false) => Provenance::Unproven,
            (false, true) => Provenance::Forged,
        }
    }

    /// True when Moneta issued `id` to `user` (constant-time comparison).
    pub fn verify(&self, user: &UserId, id: &SessionId) -> bool {
        if self
            .verified
            .get(id.as_str())
            .is_some_and(|verified_for| &*verified_for == user.as_str())
        {
            return true;
        }
        let parts = id.parts();
        let Ok(tag) = URL_SAFE_NO_PAD.decode(parts.mac) else {
            return false;
        };
        let issued = self.mac(user, &parts).verify_truncated_left(&tag).is_ok();
        if issued {
            self.remember(user, id);
        }
        issued
    }

    fn remember(&self, user: &UserId, id: &SessionId) {
        self.verified
            .insert(id.as_str().to_owned(), Arc::from(user.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn title(s: &str) -> ContentId {
        ContentId::parse(s).unwrap()
    }

    fn device(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn ids_verify_only_for_their_caller_and_key() {
        let key = SessionKey::new(Some(&Secret::from("k1"))).unwrap();
        let id = key
            .issue(
                &user("alice"),
                &title("m-0001"),
                &device("tv.living:room"),
                IssuedAt::Known(Utc::now()),
            )
            .unwrap();
        assert_eq!(id.content_id(), title("m-0001"));
        assert_eq!(id.device_str(), Some("tv.living:room"));
        assert!(key.verify(&user("alice"), &id));
        assert!(!key.verify(&user("bob"), &id));
        // Verified once (and kept), still only for its caller.
        assert!(key.verify(&user("alice"), &id));
        assert!(!key.verify(&user("bob"), &id));
        assert!(!key.clone().verify(&user("bob"), &id));
        let other = SessionKey::new(Some(&Secret::from("k2"))).unwrap();
        assert!(!other.verify(&user("alice"), &id));
        let random_key = SessionKey::new(None).unwrap();
        assert!(!random_key.verify(&user("alice"), &id));
        assert_eq!(random_key.provenance(&user("alice"), &id), Provenance::Unproven);
        assert_eq!(other.provenance(&user("alice"), &id), Provenance::Forged);
        assert_eq!(key.provenance(&user("alice"), &id), Provenance::Issued);
    }

    #[test]
    fn an_id_carries_when_it_was_issued() {
        let key = SessionKey::new(Some(&Secret::from("k1"))).unwrap();
        let at = DateTime::from_timestamp_millis(1_764_800_000_123).unwrap();
        let id = key
            .issue(
                &user("alice"),
                &title("m-0001"),
                &device("tv"),
                IssuedAt::Known(at),
            )
            .unwrap();
        let random = id.parts().random;
        // What `issued` in session_lib.lua reads: the version, then the time.
        assert_eq!(&random[12..13], "7", "{random}");
        assert_eq!(u64::from_str_radix(&random[..12], 16).unwrap(), 1_764_800_000_123);
    }

    #[test]
    fn a_changed_title_device_or_random_part_breaks_the_mac() {
        let key = SessionKey::new(Some(&Secret::from("k1"))).unwrap();
        let tv = device("tv");
        let id = key
            .issue(&user("alice"), &title("m-0001"), &tv, IssuedAt::Known(Utc::now()))
            .unwrap();
        let SessionParts { random, mac, .. } = id.parts();
        let changed = [
            SessionId::from_parts(random, &title("m-0002"), Some(&tv), mac),
            SessionId::from_parts(&"0".repeat(32), &title("m-0001"), Some(&tv), mac),
            SessionId::from_parts(random, &title("m-0001"), Some(&device("phone")), mac),
            SessionId::from_parts(random, &title("m-0001"), None, mac),
        ];
        for other in changed {
            let other = other.unwrap();
            assert!(!key.verify(&user("alice"), &other), "{other}");
        }
    }

    #[test]
    fn ids_issued_before_they_carried_the_device_still_verify() {
        let key = SessionKey::new(Some(&Secret::from("k1"))).unwrap();
        let random = uuid::Uuid::now_v7().simple().to_string();
        let parts = SessionParts {
            random: &random,
            content: "m-0001",
            device: None,
            mac: "",
        };
        let tag = key.mac(&user("alice"), &parts).finalize().into_bytes();
        let mac = URL_SAFE_NO_PAD.encode(&tag[..MAC_BYTES]);
        let id = SessionId::parse(format!("{random}.m-0001.{mac}")).unwrap();
        assert_eq!(id.device_str(), None);
        assert_eq!(id.content_str(), "m-0001");
        assert!(key.verify(&user("alice"), &id));
        assert!(!key.verify(&user("bob"), &id));
    }
}
