//! JWT verification: key sources, the current key set and the verifier.

pub mod claims;
pub mod keys;
pub mod secrets_manager;
pub mod verifier;

pub use claims::Claims;
pub use keys::{KeySource, KeyStore, VerificationKey};
pub use verifier::{AuthError, Verifier};
