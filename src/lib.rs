//! Moneta: the playback edge of a streaming platform.

pub mod app;
pub mod auth;
pub mod config;
pub mod http;
pub mod licenses;
pub mod model;
pub mod playback;
pub mod progress;
pub mod resident;
pub mod resilience;
pub mod sessions;
pub mod sources;
pub mod startup;
pub mod telemetry;
