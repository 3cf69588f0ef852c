//! The commands a Redis client sends, as seen on the wire: a RESP request
//! parser and a counting TCP proxy, for the tests that count a store's
//! round trips.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One command a client sent through a [`counting_proxy`].
#[derive(Clone, Debug)]
pub struct Sent {
    /// The proxied connection it came on.
    pub conn: usize,
    /// How many replies had reached the client on that connection before
    /// it: commands of one connection with the same count were sent
    /// before any of their replies, in one round trip.
    pub round: u64,
    /// Its name, lower case.
    pub name: String,
}

/// The commands clients sent through a [`counting_proxy`], in order.
#[derive(Clone, Default)]
pub struct Wire(Arc<Mutex<Vec<Sent>>>);

impl Wire {
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// The names of the commands sent since `start`.
    pub fn since(&self, start: usize) -> Vec<String> {
        self.0.lock().unwrap()[start..]
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }

    /// The commands sent since `start` whose name `keep` accepts, grouped
    /// by round trip: one inner list per (connection, round).
    pub fn rounds_since(&self, start: usize, keep: impl Fn(&str) -> bool) -> Vec<Vec<String>> {
        let mut rounds: Vec<((usize, u64), Vec<String>)> = Vec::new();
        for sent in &self.0.lock().unwrap()[start..] {
            if !keep(&sent.name) {
                continue;
            }
            let id = (sent.conn, sent.round);
            match rounds.iter_mut().find(|(r, _)| *r == id) {
                Some((_, names)) => names.push(sent.name.clone()),
                None => rounds.push((id, vec![sent.name.clone()])),
            }
        }
        rounds.into_iter().map(|(_, names)| names).collect()
    }
}

/// Reads one RESP length line (`*3\r\n`, `$5\r\n`) at `pos`, introduced
/// by `marker`: the number and the position after the line.
fn len(buf: &[u8], pos: usize, marker: u8) -> Option<(usize, usize)> {
    let line_end = pos + buf.get(pos..)?.windows(2).position(|w| w == b"\r\n")?;
    assert_eq!(buf[pos], marker, "not a RESP request");
    let n = std::str::from_utf8(&buf[pos + 1..line_end])
        .unwrap()
        .parse()
        .unwrap();
    Some((n, line_end + 2))
}

/// One complete RESP request at the front of `buf`: its command name and
/// its length in bytes, or `None` until all of it has arrived.
pub fn command(buf: &[u8]) -> Option<(String, usize)> {
    let (args, mut pos) = len(buf, 0, b'*')?;
    let mut name = String::new();
    for i in 0..args {
        let (n, start) = len(buf, pos, b'$')?;
        if buf.len() < start + n + 2 {
            return None;
        }
        if i == 0 {
            name = String::from_utf8_lossy(&buf[start..start + n]).to_lowercase();
        }
        pos = start + n + 2;
    }
    Some((name, pos))
}

/// A TCP proxy to the Redis on `upstream` that records every command a
/// client sends through it before forwarding it: the store's round trips,
/// as seen on the wire (script-internal commands are not round trips).
pub async fn counting_proxy(upstream: u16) -> (u16, Wire) {
    let wire = Wire::default();
    let port = counting_proxy_into(upstream, wire.clone()).await;
    (port, wire)
}

/// [`counting_proxy`] recording into `wire`, which several proxies (one
/// per cluster node) may share.
pub async fn counting_proxy_into(upstream: u16, wire: Wire) -> u16 {
    static CONNS: AtomicUsize = AtomicUsize::new(0);
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)).await
            else {
                continue;
            };
            let seen = wire.clone();
            let conn = CONNS.fetch_add(1, Ordering::Relaxed);
            let replies = Arc::new(AtomicU64::new(0));
            tokio::spawn(async move {
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                let counted = replies.clone();
                let down = async move {
                    let mut chunk = vec![0u8; 64 * 1024];
                    loop {
                        let n = server_rx.read(&mut chunk).await?;
                        if n == 0 {
                            return client_tx.shutdown().await;
                        }
                        counted.fetch_add(1, Ordering::SeqCst);
                        client_tx.write_all(&chunk[..n]).await?;
                    }
                };
                let up = async {
                    let mut pending = Vec::new();
                    let mut chunk = vec![0u8; 64 * 1024];
                    loop {
                        let n = client_rx.read(&mut chunk).await?;
                        if n == 0 {
                            return server_tx.shutdown().await;
                        }
                        pending.extend_from_slice(&chunk[..n]);
                        while let Some((name, used)) = command(&pending) {
                            let round = replies.load(Ordering::SeqCst);
                            seen.0.lock().unwrap().push(Sent { conn, round, name });
                            pending.drain(..used);
                        }
                        server_tx.write_all(&chunk[..n]).await?;
                    }
                };
                let _: (std::io::Result<()>, std::io::Result<()>) = tokio::join!(down, up);
            });
        }
    });
    port
}
