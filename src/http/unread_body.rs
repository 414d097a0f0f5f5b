//! A request answered before its body was read: the connection says whether
//! it stays open.
//!
//! Many answers come before the body is read: a refusal under overload, a
//! missing or bad token, an unsupported media type, an unknown route. hyper
//! keeps such a connection open only when the rest of the body is already in
//! its buffer; otherwise it closes the connection after the answer, and the
//! answer does not say so. A client that sent its head and its body in two
//! writes (or whose body came in a later segment) then wrote its next request
//! into a closed connection: a broken pipe, or, behind a proxy that reuses its
//! upstream connections, a `502` for someone else's request.
//!
//! So once the answer is ready and the body is not read to its end, the rest
//! is read here for at most [`DRAIN_WAIT`] and [`DRAIN_MAX_BYTES`]: a body
//! that came with its head costs one pass of the connection's own loop, and the
//! connection stays open (a refused heartbeat's connection must, for the
//! overload pacing of `http/pacing.rs`). A body that does not come in time, is
//! larger, or was held back by `Expect: 100-continue` closes the connection,
//! and the answer carries `Connection: close`. hyper has no hook between "the
//! answer is ready" and "the head is written" that sees the request body, hence
//! this wrapper around the service it calls.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, header};
use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};
use tower::ServiceExt;
use tower::util::Oneshot;

/// How long the rest of a body is waited for once the answer is ready.
const DRAIN_WAIT: Duration = Duration::from_millis(20);
/// The most of an unread body read to keep its connection: more than any
/// body the API takes but a licence challenge.
const DRAIN_MAX_BYTES: usize = 64 * 1024;

/// The router as hyper calls it, with the rule above.
#[derive(Clone)]
pub struct AnswerThenDrain {
    router: Router,
}

impl AnswerThenDrain {
    pub fn new(router: Router) -> Self {
        Self { router }
    }
}

impl hyper::service::Service<Request<Incoming>> for AnswerThenDrain {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answering;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let router = self.router.clone();
        // Requests without a body (every GET) pay nothing.
        if req.body().is_end_stream() {
            return Answering::Plain {
                call: router.oneshot(req.map(Body::new)),
            };
        }
        let waits_for_continue = req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let (parts, body) = req.into_parts();
        let shared = Shared(Arc::new(Mutex::new(Tracked { body, ended: false })));
        let req = Request::from_parts(parts, Body::new(Lent(shared.clone())));
        Answering::Tracked {
            call: router.oneshot(req),
            shared,
            waits_for_continue,
        }
    }
}

pin_project_lite::pin_project! {
    #[project = AnsweringProj]
    pub enum Answering {
        Plain { #[pin] call: Oneshot<Router, Request<Body>> },
        Tracked {
            #[pin] call: Oneshot<Router, Request<Body>>,
            shared: Shared,
            waits_for_continue: bool,
        },
        Draining {
            answer: Option<Response<Body>>,
            drain: Pin<Box<dyn Future<Output = bool> + Send>>,
        },
        Done,
    }
}

impl Future for Answering {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                AnsweringProj::Plain { call } => return call.poll(cx),
                AnsweringProj::Tracked {
                    call,
                    shared,
                    waits_for_continue,
                } => {
                    let Ok(mut answer) = ready!(call.poll(cx));
                    if shared.ended() {
                        return Poll::Ready(Ok(answer));
                    }
                    if *waits_for_continue {
                        // The client sends the body only after a `100
                        // Continue`; reading it now would ask for one after
                        // the final answer.
                        close(&mut answer);
                        return Poll::Ready(Ok(answer));
                    }
                    let drain = Box::pin(drain(shared.clone()));
                    self.set(Answering::Draining {
                        answer: Some(answer),
                        drain,
                    });
                }
                AnsweringProj::Draining { answer, drain } => {
                    let drained = ready!(drain.as_mut().poll(cx));
                    let mut answer = answer.take().unwrap_or_default();
                    if !drained {
                        close(&mut answer);
                    }
                    self.set(Answering::Done);
                    return Poll::Ready(Ok(answer));
                }
                // Polled again after it answered: never by hyper.
                AnsweringProj::Done => return Poll::Pending,
            }
        }
    }
}

fn close(answer: &mut Response<Body>) {
    answer
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Reads the rest of the body; true when it ended within the bounds.
async fn drain(shared: Shared) -> bool {
    let rest = async {
        let mut read = 0usize;
        loop {
            match std::future::poll_fn(|cx| shared.poll_frame(cx)).await {
                None => return true,
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > DRAIN_MAX_BYTES {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
            }
        }
    };
    tokio::time::timeout(DRAIN_WAIT, rest).await.unwrap_or(false)
}

struct Tracked {
    body: Incoming,
    ended: bool,
}

/// The request body, shared between the router (which may read it) and the
/// wrapper (which reads what the router left). Never locked across an
/// await; the two never read at once.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<Tracked>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Tracked> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ended(&self) -> bool {
        let tracked = self.lock();
        tracked.ended || tracked.body.is_end_stream()
    }

    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut tracked = self.lock();
        let frame = ready!(Pin::new(&mut tracked.body).poll_frame(cx));
        if frame.is_none() {
            tracked.ended = true;
        }
        Poll::Ready(frame)
    }
}

/// The body as the router sees it.
struct Lent(Shared);

impl HttpBody for Lent {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.ended()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().body.size_hint()
    }
}
