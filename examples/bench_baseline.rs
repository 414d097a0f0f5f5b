//! The ceilings `scripts/bench` measures Moneta against, on the same runtime
//! settings as Moneta and answering a JSON body of the same size:
//!
//! - without a Redis URL, a bare axum handler: no authentication, no I/O;
//! - with one, the one-round-trip ceiling: each request makes one Redis
//!   pipeline (GET + HGET, the shape of Moneta's warm playback-info read) on a
//!   multiplexed connection, then answers. Request `i` reads user
//!   `bench-{i % users}`'s entitlement and their position for title
//!   `(i / users) % titles`, the order `scripts/bench` sends Moneta.
//!
//! Usage: `bench_baseline <listen addr> <body bytes> [<redis url> <users> [<title,title,…>]]`
//! (titles default to `m-0001`)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// The Redis side of the one-round-trip ceiling.
struct OneTrip {
    conn: redis::aio::MultiplexedConnection,
    /// `(entitlement key, positions key)` per user, built once: Moneta builds
    /// its keys per request, the ceiling does not pay for that.
    keys: Vec<(String, String)>,
    titles: Vec<String>,
    next: AtomicUsize,
}

impl OneTrip {
    async fn read(&self) -> Result<(), redis::RedisError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let (entitlement, positions) = &self.keys[i % self.keys.len()];
        let title = &self.titles[(i / self.keys.len()) % self.titles.len()];
        let mut conn = self.conn.clone();
        let _: (Option<String>, Option<String>) = redis::pipe()
            .cmd("GET")
            .arg(entitlement)
            .cmd("HGET")
            .arg(positions)
            .arg(title)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3900".into());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(900);
    let redis_url = args.next();
    let users: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(256).max(1);
    let titles: Vec<String> = args
        .next()
        .map(|s| {
            s.split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .filter(|t: &Vec<String>| !t.is_empty())
        .unwrap_or_else(|| vec!["m-0001".to_owned()]);
    let body: &'static str =
        Box::leak(format!("{{\"pad\":\"{}\"}}", "x".repeat(size.saturating_sub(10))).into_boxed_str());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            let Some(url) = redis_url else {
                let app = Router::new().fallback(get(move || async move {
                    ([(header::CONTENT_TYPE, "application/json")], body)
                }));
                return axum::serve(listener, app).await;
            };
            let client = redis::Client::open(url).map_err(std::io::Error::other)?;
            let conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(std::io::Error::other)?;
            // Moneta's own layout (the default `MONETA_REDIS_BUCKETS`).
            let buckets = moneta::sources::redis::keys::Buckets::new(64);
            let keys = (0..users)
                .map(|i| {
                    let user = moneta::model::UserId::parse(format!("bench-{i}"))
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    let keys = buckets.user(&user);
                    Ok((keys.entitlement(), keys.positions()))
                })
                .collect::<std::io::Result<_>>()?;
            let trip = Arc::new(OneTrip {
                conn,
                keys,
                titles,
                next: AtomicUsize::new(0),
            });
            let app = Router::new().fallback(get(move || {
                let trip = trip.clone();
                async move {
                    match trip.read().await {
                        Ok(()) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
                        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                    }
                }
            }));
            axum::serve(listener, app).await
        })
}
