//! Integration tests against a real PostgreSQL server (see `helpers`).

mod auth;
mod cli;
mod contents;
mod health;
mod helpers;
mod markers;
mod outage;
mod progress;
mod users;
