//! The daemon's HTTP connections: what `axum::serve` does, with the limits
//! an API on a shared host needs. A client must send a request's headers
//! within [`HEADER_TIMEOUT`] (slow-header clients, and idle keep-alive
//! connections, are closed); headers are bounded (hyper answers 431 past
//! [`MAX_HEADER_BYTES`]); at most [`MAX_CONNECTIONS`] are served at once,
//! the rest wait in the listen backlog rather than being refused.
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Largest request head accepted (request line and headers).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Raise the soft open-files limit to the hard one: each connection is a
/// descriptor, and so is each VM's sockets and disks.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Serve `app` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, app: Router) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors or memory, or the peer gave up:
                // the listener stays, and so does the daemon.
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES.max(8192));
            if let Err(e) = b.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "connection");
            }
            drop(permit);
        });
    }
}
