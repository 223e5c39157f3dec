//! Load tools that run inside the pods as their own processes: an echo
//! server and three clients (connect-request-close, ping-pong, hold).
//!
//! Each client prints one line of JSON on stdout for the runner. Every loop
//! stops at a deadline and at a count, whichever comes first.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Result;

/// How long one connect, write or read may take before the tool gives up
/// on that connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on ping-pong round trips, whatever the duration.
const MAX_ROUND_TRIPS: usize = 5_000_000;
/// Upper bound on connections the connect-request-close client makes.
const MAX_CONNECTIONS: u64 = 50_000_000;

#[derive(Debug, Subcommand)]
pub enum Tool {
    /// Echoes every byte back, on each address given, until killed.
    Echo {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
    /// New connections per second: connect, send a small request, read the
    /// echoed reply, close; `concurrency` loops at once, for `seconds`.
    Crr(CrrArgs),
    /// Round-trip latency of `size`-byte messages on one open connection.
    Pingpong(PingpongArgs),
    /// Opens `count` connections, exchanges one message on each, prints
    /// `holding N` and keeps them open for `seconds` (or until killed).
    Hold(HoldArgs),
}

#[derive(Debug, Args)]
pub struct CrrArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 64)]
    size: usize,
}

#[derive(Debug, Args)]
pub struct PingpongArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 64)]
    size: usize,
}

#[derive(Debug, Args)]
pub struct HoldArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 1000)]
    count: usize,
    #[arg(long, default_value_t = 120.0)]
    seconds: f64,
}

pub fn run(tool: Tool) -> Result<()> {
    match tool {
        Tool::Echo { listen } => runtime(2)?.block_on(echo(listen)),
        Tool::Crr(args) => {
            let out = runtime(2)?.block_on(crr(args))?;
            println!("{out}");
            Ok(())
        }
        Tool::Pingpong(args) => {
            let out = pingpong(args)?;
            println!("{out}");
            Ok(())
        }
        Tool::Hold(args) => runtime(1)?.block_on(hold(args)),
    }
}

/// A runtime with `threads` workers: two for the server and the busy
/// client, as many as the machine has cores, so neither is the bottleneck
/// by construction; one for the client that only holds connections.
fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

async fn echo(listen: Vec<SocketAddr>) -> Result<()> {
    let mut listeners = Vec::new();
    for addr in listen {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        listeners.push(socket.listen(4096)?);
    }
    let mut tasks = Vec::new();
    for listener in listeners {
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    // Out of descriptors, most likely; let others close.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = conn.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = conn.read(&mut buf).await {
                        if conn.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
}

async fn crr(args: CrrArgs) -> Result<serde_json::Value> {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.seconds);
    let request = vec![b'x'; args.size];
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (ok, errors, first_error) = (ok.clone(), errors.clone(), first_error.clone());
        let request = request.clone();
        let target = args.target;
        tasks.push(tokio::spawn(async move {
            let mut reply = vec![0u8; request.len()];
            while tokio::time::Instant::now() < deadline
                && ok.load(Ordering::Relaxed) + errors.load(Ordering::Relaxed) < MAX_CONNECTIONS
            {
                let once = async {
                    let mut s = tokio::net::TcpStream::connect(target).await?;
                    s.set_nodelay(true)?;
                    s.write_all(&request).await?;
                    s.read_exact(&mut reply).await?;
                    Ok::<_, std::io::Error>(())
                };
                match tokio::time::timeout(IO_TIMEOUT, once).await {
                    Ok(Ok(())) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e.to_string());
                        // A refused or reset connection returns at once.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert("timeout".into());
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    let first_error = first_error.lock().unwrap().clone();
    Ok(serde_json::json!({
        "ok": ok,
        "errors": errors.load(Ordering::Relaxed),
        "secs": secs,
        "per_sec": ok as f64 / secs,
        "first_error": first_error,
    }))
}

fn pingpong(args: PingpongArgs) -> Result<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&args.target, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let msg = vec![b'p'; args.size];
    let mut back = vec![0u8; args.size];
    // Warm up: the first round trips open pooled connections, fault in
    // buffers and wake sleeping threads.
    for _ in 0..1000 {
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
    }
    let mut samples: Vec<u64> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    while samples.len() < MAX_ROUND_TRIPS {
        let t = Instant::now();
        if t >= deadline {
            break;
        }
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let mean = samples.iter().sum::<u64>() as f64 / samples.len().max(1) as f64;
    Ok(serde_json::json!({
        "count": samples.len(),
        "p50_us": percentile(&samples, 50.0) as f64 / 1e3,
        "p99_us": percentile(&samples, 99.0) as f64 / 1e3,
        "p999_us": percentile(&samples, 99.9) as f64 / 1e3,
        "mean_us": mean / 1e3,
    }))
}

async fn hold(args: HoldArgs) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut conns = Vec::with_capacity(args.count);
    let msg = [b'h'; 64];
    let mut back = [0u8; 64];
    for i in 0..args.count {
        let open = async {
            let mut s = tokio::net::TcpStream::connect(args.target).await?;
            s.write_all(&msg).await?;
            s.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(s)
        };
        match tokio::time::timeout(IO_TIMEOUT, open).await {
            Ok(Ok(s)) => conns.push(s),
            Ok(Err(e)) => return Err(format!("connection {i} to {}: {e}", args.target).into()),
            Err(_) => return Err(format!("connection {i} to {}: timed out", args.target).into()),
        }
    }
    println!("holding {}", conns.len());
    std::io::stdout().flush()?;
    tokio::time::sleep_until(deadline).await;
    drop(conns);
    Ok(())
}

/// The nearest-rank percentile of sorted samples; 0 when there are none.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.9), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
