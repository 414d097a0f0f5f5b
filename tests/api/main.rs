//! Integration tests that drive Moneta's real HTTP surface against a real
//! redis-server and an in-test internal API.

#[path = "../support/mod.rs"]
mod support;

mod helpers;

mod allocator;
mod auth;
mod cdn_signing;
mod cluster;
mod connections;
mod delivery;
mod fault_proxy;
mod faults;
mod health;
mod jwt_attacks;
mod licenses;
mod overload;
mod playback_info;
mod player;
mod progress;
mod redis_tls;
mod reliability;
mod replicas;
mod round_trips;
mod schemathesis;
mod sessions;
mod shutdown;
