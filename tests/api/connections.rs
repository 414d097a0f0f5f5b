//! A request answered before its body was read (a bad token, a refusal): the
//! connection either stays usable or the answer says `Connection: close`,
//! never closed behind the client's back.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{connect, exchange, spawn_app};
use crate::support::PATIENCE;

const HEARTBEAT_BODY: &str = r#"{"position_ms":1000,"state":"playing"}"#;
const SESSION: &str = "00000000000000000000000000000000.m-0001.tv.AAAAAAAAAAAAAAAAAAAAAA";

fn heartbeat_head(body_len: usize, extra: &str) -> String {
    format!(
        "PUT /v1/playback/sessions/{SESSION} HTTP/1.1\r\nHost: moneta\r\nAuthorization: Bearer not-a-token\r\n\
         Content-Type: application/json\r\nContent-Length: {body_len}\r\n{extra}\r\n"
    )
}

/// Whether the server closes the connection (end of stream) within `PATIENCE`.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    matches!(
        tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn health_on(stream: &mut TcpStream) -> u16 {
    exchange(stream, "GET /health/live HTTP/1.1\r\nHost: moneta\r\n\r\n")
        .await
        .0
}

#[tokio::test]
async fn a_body_sent_with_its_head_keeps_the_connection_of_a_refused_request() {
    let app = spawn_app().await;
    let mut stream = connect(&app).await;
    let request = heartbeat_head(HEARTBEAT_BODY.len(), "") + HEARTBEAT_BODY;
    for _ in 0..3 {
        let (status, head) = exchange(&mut stream, &request).await;
        assert_eq!(status, 401, "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(health_on(&mut stream).await, 200, "the connection is reused");
    }
}

/// Before: the `401` came without `Connection: close`, and the connection was
/// closed under the client, whose next write (its body or its next request)
/// met a broken pipe.
#[tokio::test]
async fn a_request_refused_before_its_body_came_is_told_its_connection_closes() {
    // The body never comes before the answer does.
    refused_without_its_body_and_closed("").await;
}

#[tokio::test]
async fn a_request_that_waits_for_100_continue_is_refused_without_it_and_told_it_closes() {
    // A final answer, not `100 Continue`.
    refused_without_its_body_and_closed("Expect: 100-continue\r\n").await;
}

/// A heartbeat head with a bad token and no body: `401` saying
/// `Connection: close`, and the connection closed.
async fn refused_without_its_body_and_closed(extra_header: &str) {
    let app = spawn_app().await;
    let mut stream = connect(&app).await;
    let head = heartbeat_head(HEARTBEAT_BODY.len(), extra_header);
    let (status, head) = exchange(&mut stream, &head).await;
    assert_eq!(status, 401, "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(closed_by_server(&mut stream).await);
}

#[tokio::test]
async fn a_large_unread_body_is_not_read_to_keep_its_connection() {
    let app = spawn_app().await;
    let mut stream = connect(&app).await;
    let body = format!(
        r#"{{"position_ms":1,"state":"playing","pad":"{}"}}"#,
        "x".repeat(200 * 1024)
    );
    stream
        .write_all(heartbeat_head(body.len(), "").as_bytes())
        .await
        .expect("head");
    // The body is written alongside; Moneta stops reading it.
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(body.as_bytes()).await;
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let head = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                return String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
            }
            let n = read.read(&mut buf).await.expect("read the answer");
            assert!(n > 0, "closed before an answer");
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer");
    assert!(
        head.starts_with("http/1.1 401") || head.starts_with("http/1.1 413"),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server closes the connection");
    writer.abort();
}
