//! One module per resource of the internal API.

pub mod contents;
pub mod health;
pub mod progress;
pub mod users;
