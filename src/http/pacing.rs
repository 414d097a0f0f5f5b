//! The pace of a connection whose heartbeat was refused (CONTRACT §9).
//!
//! A refused heartbeat is answered at once with `Retry-After` of 8–12 s,
//! and a player waits that long before its next one. Its connection stays
//! open, and a heartbeat that comes on it sooner than [`PACE`] after the
//! refusal is left unread in the kernel until then: a player that honours
//! `Retry-After` never notices, and a client that retries at once is
//! answered at that pace instead of at the pace of the CPU. Any other
//! request on the connection (a viewer's, behind a proxy that reuses it)
//! is read at once. The heartbeat is the only `PUT` of the API, so the
//! first four bytes, peeked, tell which it is.
//!
//! Both other answers to a client that retries at once were measured and
//! cost the viewer or the flood (`docs/profiling.md`, "Overload on this
//! host"): closing the connection makes every refusal a handshake, an
//! accept and a teardown on both ends, about three times what the refusal
//! itself costs; reading the next request at once leaves a crowd of
//! connections with a request ready at every instant, each a turn the
//! runtime gives before a viewer's request. Reading it and holding it in
//! the router until the pace is over was measured too: the same answers,
//! but 4096 parsed requests held cost ~25 MiB of peak RSS.
//!
//! Written here because no crate delays a connection's reads on what the
//! router answered on it. The refusal is marked in a task-local of the
//! task that serves the connection, where the router's layers and the
//! connection's reads both run.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// How long after a refusal a heartbeat on the same connection waits to be
/// read. Short of a player's `Retry-After` by far and of the contract's
/// 250 ms for every answer, long enough that a crowd of clients retrying at
/// once costs a bounded share of the machine: 4096 of them send at most
/// 4096 / `PACE` refused requests a second.
pub const PACE: Duration = Duration::from_millis(150);

/// How a heartbeat's request line starts: the API's only `PUT`
/// (`admission.rs` tests that it stays so).
const HEARTBEAT: &[u8; 4] = b"PUT ";

tokio::task_local! {
    /// When a heartbeat was last refused on the connection this task serves.
    static REFUSED_AT: Cell<Option<Instant>>;
}

/// Serves one connection with its pace in reach of the router's layers.
pub fn serve<F: Future>(connection: F) -> impl Future<Output = F::Output> {
    REFUSED_AT.scope(Cell::new(None), connection)
}

/// A heartbeat was refused on the connection being served. Outside a
/// connection's task (unit tests) it does nothing.
pub fn heartbeat_refused() {
    let _ = REFUSED_AT.try_with(|at| at.set(Some(Instant::now())));
}

/// The read side of one connection's pace.
#[derive(Default)]
pub struct ReadPace {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ReadPace {
    /// Ready when `stream` may be read: at once, unless a heartbeat was
    /// refused on it less than [`PACE`] ago and the next request is a
    /// heartbeat; then when the pace is over.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>, stream: &TcpStream) -> Poll<io::Result<()>> {
        let Some(until) = paced_until() else {
            return Poll::Ready(Ok(()));
        };
        let mut head = [0u8; HEARTBEAT.len()];
        let mut peeked = ReadBuf::new(&mut head);
        ready!(stream.poll_peek(cx, &mut peeked))?;
        if peeked.filled() != HEARTBEAT {
            // A viewer's request, the end of the stream, or a head too short
            // to tell yet (read as it comes, as if not paced).
            forget_refusal();
            return Poll::Ready(Ok(()));
        }
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if sleep.deadline() != until {
                    sleep.as_mut().reset(until);
                }
                sleep
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep_until(until))),
        };
        ready!(sleep.as_mut().poll(cx));
        forget_refusal();
        Poll::Ready(Ok(()))
    }
}

fn paced_until() -> Option<Instant> {
    let refused_at = REFUSED_AT.try_with(Cell::get).ok().flatten()?;
    Some(refused_at + PACE).filter(|until| *until > Instant::now())
}

fn forget_refusal() {
    let _ = REFUSED_AT.try_with(|at| at.set(None));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// How long `stream` waited before it could be read (the clock is
    /// paused: only the pace's sleep moves it).
    async fn waited(pace: &mut ReadPace, stream: &TcpStream) -> Duration {
        let started = Instant::now();
        poll_fn(|cx| pace.poll_ready(cx, stream)).await.unwrap();
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_after_a_refused_one_waits_the_pace_and_a_viewer_does_not() {
        let (mut client, server) = pair().await;
        let mut pace = ReadPace::default();
        serve(async {
            client
                .write_all(b"PUT /v1/playback/sessions/s HTTP/1.1\r\n")
                .await
                .unwrap();
            assert_eq!(
                waited(&mut pace, &server).await,
                Duration::ZERO,
                "nothing refused yet"
            );

            heartbeat_refused();
            assert_eq!(waited(&mut pace, &server).await, PACE);
            assert_eq!(
                waited(&mut pace, &server).await,
                Duration::ZERO,
                "paced once per refusal"
            );

            let mut viewer = pair().await;
            viewer
                .0
                .write_all(b"GET /v1/contents/m-1/playback-info HTTP/1.1\r\n")
                .await
                .unwrap();
            heartbeat_refused();
            assert_eq!(
                waited(&mut pace, &viewer.1).await,
                Duration::ZERO,
                "a viewer's request is read at once"
            );
            // and the refusal is forgotten once a viewer's request came.
            assert_eq!(waited(&mut pace, &server).await, Duration::ZERO);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn connections_are_paced_apart() {
        let (mut client, server) = pair().await;
        client.write_all(b"PUT /").await.unwrap();
        serve(async { heartbeat_refused() }).await;
        serve(async {
            assert_eq!(waited(&mut ReadPace::default(), &server).await, Duration::ZERO);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn outside_a_connection_nothing_is_paced() {
        let (mut client, server) = pair().await;
        client.write_all(b"PUT /").await.unwrap();
        heartbeat_refused();
        assert_eq!(waited(&mut ReadPace::default(), &server).await, Duration::ZERO);
    }
}
