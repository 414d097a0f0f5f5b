//! Playback: which title, for whom, with which URLs.

pub mod cdn;
pub mod model;
pub mod rules;
mod service;

pub use service::{Authorized, Playback, PlaybackError};
