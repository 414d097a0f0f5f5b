//! The framework's ceiling for `scripts/bench`: a bare axum handler on the
//! same runtime settings as Moneta, answering a JSON body of the same size
//! with no authentication and no I/O.
//!
//! Usage: `bench_baseline <listen addr> <body bytes>`

use axum::Router;
use axum::http::header;
use axum::routing::get;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3900".into());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(900);
    let body: &'static str =
        Box::leak(format!("{{\"pad\":\"{}\"}}", "x".repeat(size.saturating_sub(10))).into_boxed_str());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let app = Router::new().fallback(get(move || async move {
                ([(header::CONTENT_TYPE, "application/json")], body)
            }));
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            axum::serve(listener, app).await
        })
}
