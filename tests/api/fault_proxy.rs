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
