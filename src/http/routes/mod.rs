//! One file per resource.

pub mod health;
pub mod playback_info;
pub mod sessions;
