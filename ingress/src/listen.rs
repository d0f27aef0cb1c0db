//! The HTTP listener: who may hold a connection, and for how long before saying anything.
//!
//! `axum::serve` sets no timer, so a client that opens a connection and dribbles its
//! headers (slowloris) holds it forever, and it accepts without bound. This loop instead:
//!
//! - holds at most `max_connections` open connections; past that, new ones wait in the
//!   kernel's accept backlog until one closes;
//! - closes a connection whose first bytes do not arrive within `header_read_timeout`, and
//!   (through hyper's HTTP/1 timer) one whose request headers are not complete by then,
//!   also between keep-alive requests;
//! - speaks HTTP/1.1 and HTTP/2 over cleartext with prior knowledge (h2c), told apart by
//!   the connection preface;
//! - on shutdown stops accepting, lets open requests finish and closes idle connections,
//!   among them those that have not yet said anything (an HTTP client's pool opens some it
//!   never uses), which would otherwise hold the stop until their header timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// What one client may hold, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// The HTTP/2 connection preface; anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Pause after a failed accept (out of file descriptors, most likely) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `shutdown` completes, then waits for open
/// connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    let closing = CancellationToken::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let closing = closing.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let started = tokio::select! {
                started = starts_in_time(&stream, limits.header_read_timeout) => started,
                () = closing.cancelled() => false,
            };
            if !started {
                debug!("closing a connection that sent nothing in time");
                return;
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    closing.cancel();
    graceful.shutdown().await;
    Ok(())
}

/// Waits until the client has sent enough to tell HTTP/1 from h2c (hyper's version
/// sniffing has no timer of its own). False when it has not within `within`, or hung up.
async fn starts_in_time(stream: &TcpStream, within: Duration) -> bool {
    let sniff = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if n == buf.len() || buf[..n] != H2_PREFACE[..n] {
                return true;
            }
            // A prefix of the h2 preface: wait for more bytes without spinning on peek.
            if stream.readable().await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(within, sniff).await.unwrap_or(false)
}
