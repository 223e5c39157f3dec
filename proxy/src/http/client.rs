//! Plain HTTP clients with connection reuse, for the hops that are not
//! proxy to proxy: to a destination outside the mesh, and from the server's
//! proxy to its application: HTTP/1.1 in `http::h1`, HTTP/2 in
//! `http::h2c`.
//!
//! Each client dials fixed addresses whatever the request's authority says,
//! so the `Host` / `:authority` the application sent travels unchanged while
//! the connection goes where the capture said.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::{h1, h2c};
use crate::socket::{ConnectError, Dial, Targets};

/// Dials its addresses in order, moving to the next only when one refuses.
#[derive(Clone)]
pub struct FixedConnector {
    targets: Targets,
    dial: Dial,
}

impl FixedConnector {
    pub fn new(targets: Targets, dial: Dial) -> Self {
        FixedConnector { targets, dial }
    }

    /// Connects to the first address that accepts.
    pub async fn dial(&self) -> Result<TcpStream, ConnectError> {
        self.dial.connect(&self.targets).await
    }
}

/// The plain HTTP clients of one worker thread.
pub struct Clients {
    dial: Dial,
    http1: Arc<h1::Pool>,
    http2: h2c::Pool,
}

impl Clients {
    pub fn new(dial: Dial) -> Self {
        Clients {
            dial,
            http1: Arc::new(h1::Pool::new(dial)),
            http2: h2c::Pool::new(dial),
        }
    }

    /// How these clients dial, for connections made beside them.
    pub fn dial(&self) -> Dial {
        self.dial
    }

    /// HTTP/1.1, driven from each request's own task.
    pub fn http1(&self) -> &Arc<h1::Pool> {
        &self.http1
    }

    /// HTTP/2 with prior knowledge, on the h2 crate.
    pub fn http2(&self) -> &h2c::Pool {
        &self.http2
    }
}
