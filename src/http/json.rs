//! JSON answers written in one go.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::http::routes::sessions::HeartbeatAck;
use crate::playback::PlaybackAnswer;

/// Room for a whole playback-info answer (~700 bytes; more with licence
/// tokens and cookies), so serializing never grows the buffer.
const ANSWER_CAPACITY: usize = 2048;

/// A heartbeat's answer: an id of at most 249 bytes, a timestamp and three keys.
const HEARTBEAT_ANSWER_CAPACITY: usize = 384;

/// A JSON answer. axum's `Json` writes through a `BytesMut` writer that starts
/// at 128 bytes, one `put_slice` call per token serde emits; on the hot path
/// that was ~10 % of a playback-info's instructions (`docs/profiling.md`).
/// One `Vec` sized up front takes plain copies instead.
pub struct JsonAnswer<T>(pub T);

impl<T: Serialize> IntoResponse for JsonAnswer<T> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(ANSWER_CAPACITY);
        let written = serde_json::to_writer(&mut body, &self.0);
        json_response(written, body)
    }
}

/// playback-info's answer, which writes its own JSON.
impl IntoResponse for PlaybackAnswer {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(ANSWER_CAPACITY);
        let written = self.write_json(&mut body);
        json_response(written, body)
    }
}

/// A heartbeat's answer, which writes its own JSON.
impl IntoResponse for HeartbeatAck {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(HEARTBEAT_ANSWER_CAPACITY);
        self.write_json(&mut body);
        json_response(Ok(()), body)
    }
}

fn json_response(written: serde_json::Result<()>, body: Vec<u8>) -> Response {
    match written {
        Ok(()) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response(),
        // Only a map with non-string keys fails to serialize; none of
        // Moneta's answers has one. Same answer as axum's `Json`.
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}
