//! Plain HTTP clients with connection reuse, for the hops that are not
//! proxy to proxy: to a destination outside the mesh, and from the server's
//! proxy to its application ([`super::h1`] and [`super::app_h2`]).
//!
//! Each client dials fixed addresses whatever the request's authority says,
//! so the `Host` / `:authority` the application sent travels unchanged while
//! the connection goes where the capture said.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{app_h2, h1};
use crate::pool::Body;
use crate::socket::{self, ConnectError, Targets};

/// Dials its addresses in order, moving to the next only when one refuses.
#[derive(Clone)]
pub struct FixedConnector {
    targets: Targets,
    connect_timeout: Duration,
    keepalive: Duration,
}

impl FixedConnector {
    pub fn new(targets: Targets, connect_timeout: Duration, keepalive: Duration) -> Self {
        FixedConnector {
            targets,
            connect_timeout,
            keepalive,
        }
    }

    /// Connects to the first address that accepts.
    pub async fn dial(&self) -> Result<TcpStream, ConnectError> {
        socket::connect_first(&self.targets, self.connect_timeout, self.keepalive).await
    }
}

impl tower_service::Service<http::Uri> for FixedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.dial().await.map(TokioIo::new) })
    }
}

pub type HttpClient = Client<FixedConnector, Body>;

/// Clients by destination and HTTP version, created on first use.
pub struct Clients {
    connect_timeout: Duration,
    keepalive: Duration,
    clients: Mutex<HashMap<(Targets, bool), HttpClient>>,
    app: Arc<h1::Pool>,
    app_h2: app_h2::Pool,
}

/// More distinct destinations than this and the idle clients are dropped,
/// so a workload that talks to many addresses cannot grow the map forever.
const MAX_CLIENTS: usize = 1024;

impl Clients {
    pub fn new(connect_timeout: Duration, keepalive: Duration) -> Self {
        Clients {
            connect_timeout,
            keepalive,
            clients: Mutex::new(HashMap::new()),
            app: Arc::new(h1::Pool::new(connect_timeout, keepalive)),
            app_h2: app_h2::Pool::new(connect_timeout, keepalive),
        }
    }

    /// HTTP/1.1 to the application, driven from each request's own task.
    pub fn app_h1(&self) -> &Arc<h1::Pool> {
        &self.app
    }

    /// HTTP/2 with prior knowledge to the application, on the h2 crate.
    pub fn app_h2(&self) -> &app_h2::Pool {
        &self.app_h2
    }

    /// The client for `targets`, speaking HTTP/2 with prior knowledge when
    /// `h2`, else HTTP/1.1.
    pub fn get(&self, targets: Targets, h2: bool) -> HttpClient {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&(targets, h2)) {
            return c.clone();
        }
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        let connector = FixedConnector::new(targets, self.connect_timeout, self.keepalive);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .http2_only(h2)
            .build(connector);
        clients.insert((targets, h2), client.clone());
        client
    }
}
