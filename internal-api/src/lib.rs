//! Reference implementation of the private internal API that Moneta calls
//! for catalog data, entitlements and resume positions.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod configuration;
pub mod db;
pub mod domain;
pub mod error;
pub mod extract;
pub mod middleware;
pub mod queries;
pub mod routes;
pub mod seed;
pub mod startup;
pub mod state;
pub mod telemetry;
