//! Session ids Moneta can recognise as its own: `<random>.<content_id>.<mac>`,
//! the MAC (HMAC-SHA256, 128 bits) over the caller's `sub`, the title and the
//! random part under `MONETA_SESSION_SECRET`. A forged id, or one issued to
//! another caller, fails here — also while Redis is down, when nothing else
//! could tell.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{ExposeSecret, Secret};
use crate::model::{ContentId, InvalidId, SessionId, UserId};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC kept in the id.
const MAC_BYTES: usize = 16;

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
        })
    }

    fn mac(&self, user: &UserId, content: &ContentId, random: &str) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        // NUL cannot occur in any of the three parts, so the message is unambiguous.
        for part in [user.as_str(), content.as_str(), random] {
            mac.update(part.as_bytes());
            mac.update(&[0]);
        }
        mac
    }

    /// A new id for `user` playing `content`.
    pub fn issue(&self, user: &UserId, content: &ContentId) -> Result<SessionId, InvalidId> {
        let random = uuid::Uuid::new_v4().simple().to_string();
        let tag = self.mac(user, content, &random).finalize().into_bytes();
        let encoded = URL_SAFE_NO_PAD.encode(tag.get(..MAC_BYTES).unwrap_or_default());
        SessionId::from_parts(&random, content, &encoded)
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
        let (random, content, encoded) = id.parts();
        let Ok(tag) = URL_SAFE_NO_PAD.decode(encoded) else {
            return false;
        };
        self.mac(user, &content, random)
            .verify_truncated_left(&tag)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn ids_verify_only_for_their_caller_and_key() {
        let key = SessionKey::new(Some(&Secret::from("k1"))).unwrap();
        let title = ContentId::parse("m-0001").unwrap();
        let id = key.issue(&user("alice"), &title).unwrap();
        assert_eq!(id.content_id(), title);
        assert!(key.verify(&user("alice"), &id));
        assert!(!key.verify(&user("bob"), &id));
        let other = SessionKey::new(Some(&Secret::from("k2"))).unwrap();
        assert!(!other.verify(&user("alice"), &id));
        let random_key = SessionKey::new(None).unwrap();
        assert!(!random_key.verify(&user("alice"), &id));
        assert_eq!(random_key.provenance(&user("alice"), &id), Provenance::Unproven);
        assert_eq!(other.provenance(&user("alice"), &id), Provenance::Forged);
        assert_eq!(key.provenance(&user("alice"), &id), Provenance::Issued);
    }

    #[test]
    fn a_changed_title_or_random_part_breaks_the_mac() {
        let key = SessionKey::new(Some(&Secret::from("k1"))).unwrap();
        let id = key
            .issue(&user("alice"), &ContentId::parse("m-0001").unwrap())
            .unwrap();
        let (random, _, mac) = id.parts();
        let other_title = SessionId::from_parts(random, &ContentId::parse("m-0002").unwrap(), mac).unwrap();
        assert!(!key.verify(&user("alice"), &other_title));
        let other_random =
            SessionId::from_parts(&"0".repeat(32), &ContentId::parse("m-0001").unwrap(), mac).unwrap();
        assert!(!key.verify(&user("alice"), &other_random));
    }
}
