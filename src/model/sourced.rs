/// Where a piece of an answer came from; anything but `Fresh` makes the answer degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Redis or the internal API, within its freshness.
    Fresh,
    /// A copy kept past its freshness because the internal API failed.
    Stale,
    /// The static fallback catalog file.
    Snapshot,
    /// The caller's JWT claims instead of the entitlement service.
    Claims,
    /// Nothing could answer; a neutral default was used.
    Default,
}

impl Origin {
    pub fn is_degraded(self) -> bool {
        self != Origin::Fresh
    }
}

/// A value together with where it came from.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    pub value: T,
    pub origin: Origin,
}

impl<T> Sourced<T> {
    pub fn fresh(value: T) -> Self {
        Self {
            value,
            origin: Origin::Fresh,
        }
    }
    pub fn new(value: T, origin: Origin) -> Self {
        Self { value, origin }
    }
}
