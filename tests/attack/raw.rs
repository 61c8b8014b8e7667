//! Raw TCP on both sides: a client that writes exact bytes and reads until the proxy closes,
//! and an origin that answers each request head with exact bytes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads until the peer closes (bounded by `within`); what arrived, or None on the timeout.
pub async fn until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let read = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    Some(received)
}

/// Writes `bytes` on a fresh connection and reads until the proxy closes it (bounded: 10 s).
/// Attacks end with `Connection: close` (or provoke an error), so a close always comes.
pub async fn exchange(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    // The proxy may answer and close before taking everything: not an error here.
    let _ = stream.write_all(bytes).await;
    let received = until_closed(&mut stream, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("the proxy kept the connection open after {bytes:?}"));
    String::from_utf8_lossy(&received).into_owned()
}

/// Status codes of the responses in a raw HTTP/1 byte stream, in order.
pub fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.1 ")
        .filter(|(i, _)| *i == 0 || raw[..*i].ends_with('\n'))
        .filter_map(|(i, _)| raw.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// What a raw origin saw: each request head, as text.
pub type Heads = Arc<Mutex<Vec<String>>>;

/// An origin that reads request heads (the proxy sends bodiless GETs here) on keep-alive
/// connections and answers each with `reply(head)`, byte for byte, closing after a reply that
/// carries `connection: close`.
pub async fn origin(
    reply: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
) -> (SocketAddr, Heads) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let heads: Heads = Default::default();
    let seen = heads.clone();
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let seen = seen.clone();
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&pending[..end + 4]).into_owned();
                        pending.drain(..end + 4);
                        seen.lock().unwrap().push(head.clone());
                        let bytes = reply(&head);
                        if socket.write_all(&bytes).await.is_err() {
                            return;
                        }
                        // A reply that says it closes does: how a truncated body ends.
                        if bytes
                            .windows(17)
                            .any(|w| w.eq_ignore_ascii_case(b"connection: close"))
                        {
                            return;
                        }
                    }
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (address, heads)
}

/// The request target of a request head.
pub fn target(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or_default()
}
