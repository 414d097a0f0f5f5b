//! One file per resource.

pub mod health;
pub mod licenses;
pub mod playback_info;
pub mod sessions;
