//! Worker threads. The proxy runs `proxy.workers` of them (by default one
//! per CPU), each with a single-threaded runtime of its own: the listeners'
//! thread accepts and hands connections to the workers in turn (itself
//! included), and a connection stays on its worker to the end, with that
//! worker's pool of mesh connections. A request then never wakes another
//! thread; a multi-threaded runtime moves tasks between threads, and every
//! such hand-off costs a cross-thread wake-up.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::metrics::Direction;
use crate::{ConnGuard, Shared};

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Most workers `proxy.workers = 0` starts. A sidecar shares its pod's
/// CPUs with the application, and every worker keeps its own mesh
/// connections to each peer; an operator who wants more sets a number.
const AUTO_MAX: usize = 4;

/// How many workers `config` asks for: `proxy.workers`, or with `0` one
/// per CPU this process may use (affinity and cgroup limits counted), at
/// most [`AUTO_MAX`].
pub fn count(config: &legate_config::Config) -> usize {
    match config.proxy.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(AUTO_MAX)),
        n => n as usize,
    }
}

/// The index of the calling worker; the listeners' thread is worker 0.
pub(crate) fn current() -> usize {
    WORKER.with(Cell::get)
}

/// A connection just accepted, counted as active.
pub(crate) struct Accepted {
    pub guard: ConnGuard,
    pub sock: TcpStream,
    pub client: SocketAddr,
    pub dir: Direction,
}

/// A connection on its way to another worker, out of any runtime.
struct Moving {
    guard: ConnGuard,
    sock: std::net::TcpStream,
    client: SocketAddr,
    dir: Direction,
}

/// The worker threads beside the listeners' own.
pub(crate) struct Workers {
    lanes: Vec<mpsc::UnboundedSender<Moving>>,
    stop: watch::Sender<bool>,
}

impl Workers {
    /// Starts all workers but the calling thread's. One that cannot start
    /// is reported and left out; the others carry its share.
    pub fn start(shared: &Arc<Shared>) -> Workers {
        let (stop, _) = watch::channel(false);
        let mut lanes = Vec::new();
        // As many as there are pools: `count` reads the CPUs the process
        // may use, which can change between two calls.
        for index in 1..shared.workers() {
            let (tx, rx) = mpsc::unbounded_channel();
            let stopped = stop.subscribe();
            let started = std::thread::Builder::new()
                .name(format!("legate-worker-{index}"))
                .spawn(move || run(index, rx, stopped));
            match started {
                Ok(_) => lanes.push(tx),
                Err(e) => {
                    warn!(index, error = %e, "cannot start a worker thread; running with fewer")
                }
            }
        }
        Workers { lanes, stop }
    }

    /// A handle to share connections out, for one accept loop.
    pub fn lanes(&self) -> Lanes {
        Lanes {
            senders: self.lanes.clone(),
            next: 0,
        }
    }

    /// Ends the workers once the proxy has drained: what they still hold
    /// is dropped.
    pub fn stop(self) {
        self.stop.send_replace(true);
    }
}

/// Hands connections to the workers in turn.
pub(crate) struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Moving>>,
    next: usize,
}

impl Lanes {
    /// Sends `conn` to the next worker, or returns it when it is the
    /// calling thread's turn (or its worker is gone).
    pub fn hand_over(&mut self, conn: Accepted) -> Option<Accepted> {
        let lane = self.next % (self.senders.len() + 1);
        self.next = self.next.wrapping_add(1);
        if lane == 0 {
            return Some(conn);
        }
        let Accepted {
            guard,
            sock,
            client,
            dir,
        } = conn;
        // Leaves this runtime's poller so that the worker's can take it.
        let sock = match sock.into_std() {
            Ok(s) => s,
            Err(e) => {
                debug!(%client, error = %e, "connection lost while handing it to a worker");
                return None;
            }
        };
        let moving = Moving {
            guard,
            sock,
            client,
            dir,
        };
        match self.senders[lane - 1].send(moving) {
            Ok(()) => None,
            Err(mpsc::error::SendError(m)) => settle(m),
        }
    }
}

/// Registers a moved connection with the calling thread's runtime.
fn settle(m: Moving) -> Option<Accepted> {
    match TcpStream::from_std(m.sock) {
        Ok(sock) => Some(Accepted {
            guard: m.guard,
            sock,
            client: m.client,
            dir: m.dir,
        }),
        Err(e) => {
            debug!(client = %m.client, error = %e, "connection lost while handing it to a worker");
            None
        }
    }
}

/// One worker: serves what it is handed until the proxy has drained.
fn run(
    index: usize,
    mut lane: mpsc::UnboundedReceiver<Moving>,
    mut stopped: watch::Receiver<bool>,
) {
    WORKER.with(|w| w.set(index));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            // Dropping the lane makes the listeners' thread serve its share.
            warn!(index, error = %e, "cannot start a worker's runtime; running with fewer");
            return;
        }
    };
    runtime.block_on(async move {
        loop {
            tokio::select! {
                moved = lane.recv() => match moved {
                    Some(m) => {
                        if let Some(conn) = settle(m) {
                            crate::handle(conn);
                        }
                    }
                    // No more connections; those open finish as the proxy drains.
                    None => break,
                },
                _ = stopped.wait_for(|s| *s) => return,
            }
        }
        let _ = stopped.wait_for(|s| *s).await;
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}
