//! A TCP proxy in front of a dependency that can refuse connections (its
//! listener closed, live connections cut) and come back on the same port, or
//! silence the connections it carries (open, carrying nothing: a host that
//! died without a reset, a partition) while new ones pass.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

pub struct FaultProxy {
    pub port: u16,
    target: u16,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    silence: Arc<Notify>,
    /// Silenced connections, held open.
    silenced: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
}

impl FaultProxy {
    pub async fn start(target: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = FaultProxy {
            port,
            target,
            tasks: Arc::default(),
            silence: Arc::default(),
            silenced: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let target = self.target;
        let tasks = self.tasks.clone();
        let silence = self.silence.clone();
        let silenced = self.silenced.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                // Made before the connection is carried, so no silence is missed.
                let silence = silence.clone().notified_owned();
                let silenced = silenced.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            () = silence => silenced.lock().unwrap().push((inbound, outbound)),
                        }
                    }
                });
                tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Closes the listener and every proxied connection: new connections are refused.
    pub fn refuse(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// The connections open now carry nothing more and stay open; new
    /// connections pass.
    pub fn silence(&self) {
        self.silence.notify_waiters();
    }

    /// Listens again on the same port.
    pub async fn restore(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot listen again on {}: {e}", self.port),
            }
        };
        self.serve(listener);
    }
}

/// A proxy whose first connection hears the server `lag` later than it
/// speaks (each chunk passed on `lag` after it arrived, in order), while
/// later connections pass at once: one connection behind the others, as the
/// one that carries a client's invalidations can be behind the one its
/// write went over.
pub struct LaggingProxy {
    pub port: u16,
    accept: AbortHandle,
}

impl LaggingProxy {
    pub async fn start(target: u16, lag: std::time::Duration) -> LaggingProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            let mut first = true;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let lagging = std::mem::take(&mut first);
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    if !lagging {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    let (chunks, mut lagged) = tokio::sync::mpsc::unbounded_channel();
                    let hear = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                            let due = tokio::time::Instant::now() + lag;
                            if chunks.send((due, buf[..n].to_vec())).is_err() {
                                break;
                            }
                        }
                    };
                    let pass_on = async move {
                        while let Some((due, chunk)) = lagged.recv().await {
                            tokio::time::sleep_until(due).await;
                            if to_client.write_all(&chunk).await.is_err() {
                                break;
                            }
                        }
                    };
                    let speak = tokio::io::copy(&mut from_client, &mut to_server);
                    let _ = tokio::join!(hear, pass_on, speak);
                });
            }
        });
        LaggingProxy {
            port,
            accept: accept.abort_handle(),
        }
    }
}

impl Drop for LaggingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
