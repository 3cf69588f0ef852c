//! A TCP forwarder for the backend tests: it can be stopped, cutting every
//! forwarded connection, and started again on the same port (an outage and
//! its end), and it can show a tap every byte the client sends (to count
//! statements on the wire).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Sees the bytes one connection's client sends, in order.
pub type Sink = Box<dyn FnMut(&[u8]) + Send>;

/// Makes, for each forwarded connection, its [`Sink`].
pub type Tap = Arc<dyn Fn() -> Sink + Send + Sync>;

/// A TCP forwarder that can be stopped and started again.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    accept: JoinHandle<()>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(bind: SocketAddr, upstream: SocketAddr, tap: Option<Tap>) -> Self {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let list = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let tap = tap.clone();
                let conn = tokio::spawn(async move {
                    if let Some(tap) = tap {
                        forward_tapped(client, upstream, tap()).await;
                    } else if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                list.lock().unwrap().push(conn);
            }
        });
        Self {
            addr,
            upstream,
            accept,
            conns,
        }
    }

    /// Stops accepting and cuts every connection; returns the proxy's own
    /// address and its upstream, to start it again.
    pub async fn stop(self) -> (SocketAddr, SocketAddr) {
        self.accept.abort();
        let _ = self.accept.await;
        let conns: Vec<_> = self.conns.lock().unwrap().drain(..).collect();
        for conn in conns {
            conn.abort();
            let _ = conn.await;
        }
        (self.addr, self.upstream)
    }
}

/// Forwards `client` to `upstream`, showing `tap` what the client sends.
async fn forward_tapped(client: TcpStream, upstream: SocketAddr, mut tap: Sink) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = client_rx.read(&mut buf).await {
        if n == 0 || server_tx.write_all(&buf[..n]).await.is_err() {
            break;
        }
        tap(&buf[..n]);
    }
    back.abort();
}

/// The first address `host:port` resolves to.
pub async fn resolve(host: &str, port: u16) -> SocketAddr {
    tokio::net::lookup_host((host, port))
        .await
        .unwrap()
        .next()
        .unwrap()
}
