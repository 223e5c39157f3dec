//! Access logs: one JSON line per connection and one per HTTP request, on
//! stdout, apart from the diagnostic log on stderr.
//!
//! Off by default (`log.access = "off"`). When on, `log.access_sample`
//! decides which connections and requests are logged (each independently),
//! and request paths and query strings appear only with
//! `log.access_paths = true`, since they may carry personal data or
//! credentials. All three are reloaded with the configuration, and the
//! admin server can switch logging on and off at runtime.
//!
//! Lines are formatted on the request path only when one is logged, and
//! appended to a shared buffer that a dedicated thread writes out
//! [`FLUSH_EVERY`] after the first line of a batch arrives: one write for
//! many lines, and no wakeup per line. With nothing to write the thread
//! sleeps until a line comes, so a proxy with access logs off (the
//! default) or without traffic never wakes it. A slow stdout (a full
//! pipe, a stalled log shipper) never blocks traffic: when the buffer
//! holds [`MAX_BUFFER`] bytes new lines are dropped and counted in
//! `legate_access_log_dropped_total`.
//!
//! A connection line:
//!
//! ```json
//! {"time":"2025-01-01T12:00:00.000Z","kind":"tcp","direction":"outbound","source":"10.200.0.2:40112","destination":"10.200.0.3:6379","source_id":"spiffe://legate.local/web","destination_id":"spiffe://legate.local/cache","protocol":"tcp","bytes_read":120,"bytes_written":4096,"duration_ms":12.5,"error":null}
//! ```
//!
//! A request line has `"kind":"http"` and adds `method`, `authority`,
//! `path` (only with `log.access_paths`), `status`, `request_bytes`,
//! `response_bytes`, `retries` and `error` (the proxy's own reason from
//! its `legate-error` header, when it answered itself). `duration_ms` runs
//! from the request to the end of the response body. On a connection line
//! `bytes_read` and `bytes_written` are those of the accepted socket (see
//! [`crate::metrics`]); `source` and `destination` are the client's
//! address and the original destination.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use legate_config::{AccessLogMode, LogConfig};

use crate::metrics::Metrics;

/// How often the writer thread writes out what has been logged.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes waiting for the writer before new lines are dropped.
pub const MAX_BUFFER: usize = 8 << 20;
/// The sample rate is kept in parts per million.
const MILLION: u32 = 1_000_000;

/// The access log's switches and its writer.
pub struct AccessLog {
    enabled: AtomicBool,
    sample_ppm: AtomicU32,
    paths: AtomicBool,
    queue: Arc<Queue>,
    local_id: OnceLock<Arc<str>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.enabled)
            .field("sample_ppm", &self.sample_ppm)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// An access log writing to stdout from its own thread.
    pub fn stdout(cfg: &LogConfig, metrics: Arc<Metrics>) -> Self {
        Self::to_writer(cfg, metrics, || Box::new(std::io::stdout()))
    }

    /// An access log writing to whatever `open` returns, on a thread of its
    /// own. Tests give it a buffer.
    pub fn to_writer(
        cfg: &LogConfig,
        metrics: Arc<Metrics>,
        open: impl FnOnce() -> Box<dyn Write + Send> + Send + 'static,
    ) -> Self {
        let queue = Arc::new(Queue::default());
        let writer = queue.clone();
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&writer, open()));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the access log writer; access logs are lost");
        }
        let log = AccessLog {
            enabled: AtomicBool::new(false),
            sample_ppm: AtomicU32::new(MILLION),
            paths: AtomicBool::new(false),
            queue,
            local_id: OnceLock::new(),
            metrics,
        };
        log.configure(cfg);
        log
    }

    /// Applies the `log.access*` keys, at start and on reload.
    pub fn configure(&self, cfg: &LogConfig) {
        self.enabled
            .store(cfg.access == AccessLogMode::On, Ordering::Relaxed);
        self.set_sample(cfg.access_sample);
        self.paths.store(cfg.access_paths, Ordering::Relaxed);
    }

    /// Switches logging on or off at runtime.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Sets the sampled fraction, clamped to 0..=1.
    pub fn set_sample(&self, fraction: f64) {
        let ppm = (fraction.clamp(0.0, 1.0) * f64::from(MILLION)).round() as u32;
        self.sample_ppm.store(ppm, Ordering::Relaxed);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn sample(&self) -> f64 {
        f64::from(self.sample_ppm.load(Ordering::Relaxed)) / f64::from(MILLION)
    }

    /// Whether paths and query strings may be logged (and put in spans).
    pub fn with_paths(&self) -> bool {
        self.paths.load(Ordering::Relaxed)
    }

    /// Decides, once per connection or request, whether it is logged.
    pub fn sampled(&self) -> bool {
        if !self.enabled.load(Ordering::Relaxed) {
            return false;
        }
        let ppm = self.sample_ppm.load(Ordering::Relaxed);
        ppm >= MILLION || rand::random_range(0..MILLION) < ppm
    }

    /// Sets this workload's SPIFFE ID, which every line carries; once.
    pub fn set_local_id(&self, id: &str) {
        let _ = self.local_id.set(Arc::from(id));
    }

    /// This workload's SPIFFE ID, if set.
    pub fn local_id(&self) -> Option<&str> {
        self.local_id.get().map(|s| &**s)
    }

    /// Waits, up to `timeout`, until the writer has written out what is
    /// queued; for an orderly exit, so that the last lines are not lost
    /// even when the output is slow to take them.
    pub fn flush(&self, timeout: Duration) {
        let pending = self.queue.lock();
        let _ = self
            .queue
            .written
            .wait_timeout_while(pending, timeout, |p| !p.lines.is_empty() || p.writing);
    }

    /// Queues a finished line; drops it when the writer is behind.
    pub fn emit(&self, line: String) {
        let mut pending = self.queue.lock();
        if pending.lines.len() + line.len() > MAX_BUFFER {
            drop(pending);
            self.metrics.access_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first = pending.lines.is_empty();
        pending.lines.extend_from_slice(line.as_bytes());
        drop(pending);
        // Later lines of the batch find the writer already awake.
        if first {
            self.queue.arrived.notify_one();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.arrived.notify_one();
    }
}

/// Lines waiting for the writer thread.
#[derive(Default)]
struct Queue {
    pending: Mutex<Pending>,
    /// Signalled when a line lands in an empty buffer, and on close.
    arrived: Condvar,
    /// Signalled when the writer has written a batch out.
    written: Condvar,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    /// The log is gone: write what is left and end.
    closed: bool,
    /// The writer holds lines it has taken but not yet written.
    writing: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sleeps until lines arrive, gives the batch [`FLUSH_EVERY`] to grow and
/// writes it out in one go; ends once the log is dropped and written out.
fn write_lines(queue: &Queue, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        let closed = {
            let mut p = queue.lock();
            while p.lines.is_empty() && !p.closed {
                p = queue.arrived.wait(p).unwrap_or_else(|p| p.into_inner());
            }
            p.closed
        };
        if !closed {
            std::thread::sleep(FLUSH_EVERY);
        }
        {
            let mut p = queue.lock();
            std::mem::swap(&mut p.lines, &mut batch);
            p.writing = !batch.is_empty();
        }
        if !batch.is_empty() {
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            queue.lock().writing = false;
            queue.written.notify_all();
        }
        if closed {
            return;
        }
    }
}

/// Builds one JSON object line without an intermediate value tree.
pub struct Line {
    buf: String,
}

impl Line {
    /// Starts a line with its time and kind (`tcp` or `http`).
    pub fn new(time: SystemTime, kind: &str) -> Self {
        let mut buf = String::with_capacity(384);
        buf.push_str("{\"time\":\"");
        rfc3339(&mut buf, time);
        buf.push('"');
        let mut line = Line { buf };
        line.str("kind", kind);
        line
    }

    fn key(&mut self, key: &str) {
        self.buf.push_str(",\"");
        self.buf.push_str(key);
        self.buf.push_str("\":");
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        escape(&mut self.buf, value);
        self
    }

    /// A value whose text needs no escaping, such as an address.
    pub fn display(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        self.key(key);
        let _ = std::fmt::write(&mut self.buf, format_args!("\"{value}\""));
        self
    }

    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(v) => self.str(key, v),
            None => {
                self.key(key);
                self.buf.push_str("null");
                self
            }
        }
    }

    pub fn num(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        let _ = std::fmt::write(&mut self.buf, format_args!("{value}"));
        self
    }

    pub fn millis(&mut self, key: &str, d: Duration) -> &mut Self {
        self.key(key);
        let micros = d.as_micros();
        let _ = std::fmt::write(
            &mut self.buf,
            format_args!("{}.{:03}", micros / 1000, micros % 1000),
        );
        self
    }

    /// The finished line, newline included.
    pub fn finish(mut self) -> String {
        self.buf.push_str("}\n");
        self.buf
    }
}

/// Writes `s` as a JSON string.
fn escape(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = std::fmt::write(out, format_args!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends `t` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
fn rfc3339(out: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = std::fmt::write(
        out,
        format_args!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            d.subsec_millis()
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_escapes_and_utc_times() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let mut l = Line::new(t, "http");
        l.str("authority", "a\"b\\c\n")
            .num("status", 200)
            .opt_str("error", None)
            .millis("duration_ms", Duration::from_micros(12_345));
        let text = l.finish();
        assert!(text.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["kind"], "http");
        assert_eq!(v["authority"], "a\"b\\c\n");
        assert_eq!(v["status"], 200);
        assert!(v["error"].is_null());
        assert_eq!(v["duration_ms"].as_f64(), Some(12.345));
        let mut leap = String::new();
        rfc3339(&mut leap, UNIX_EPOCH + Duration::from_secs(951_782_400));
        assert_eq!(leap, "2000-02-29T00:00:00.000Z");
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_dropped_log_writes_what_is_queued_and_its_writer_ends() {
        let sink = Sink::default();
        let s2 = sink.clone();
        let cfg = LogConfig {
            access: AccessLogMode::On,
            ..LogConfig::default()
        };
        let log = AccessLog::to_writer(&cfg, Arc::new(Metrics::new()), move || Box::new(s2));
        log.emit(Line::new(SystemTime::now(), "tcp").finish());
        drop(log);
        // The writer holds the other reference to the sink until it ends.
        for _ in 0..400 {
            if Arc::strong_count(&sink.0) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(Arc::strong_count(&sink.0), 1, "the writer thread ended");
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("\"kind\":\"tcp\""), "{text}");
    }

    /// An output that takes its time, as a pipe to a busy log collector.
    struct SlowSink(Sink);
    impl Write for SlowSink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_millis(300));
            self.0.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn flush_returns_once_queued_lines_are_written_out() {
        let sink = Sink::default();
        let s2 = sink.clone();
        let cfg = LogConfig {
            access: AccessLogMode::On,
            ..LogConfig::default()
        };
        let log = AccessLog::to_writer(&cfg, Arc::new(Metrics::new()), move || {
            Box::new(SlowSink(s2))
        });
        log.emit(Line::new(SystemTime::now(), "http").finish());
        log.flush(Duration::from_secs(10));
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("\"kind\":\"http\""), "flushed: {text:?}");
    }

    #[test]
    fn off_by_default_sampled_when_on_and_lines_reach_the_writer() {
        let sink = Sink::default();
        let s2 = sink.clone();
        let mut cfg = LogConfig::default();
        let log = AccessLog::to_writer(&cfg, Arc::new(Metrics::new()), move || Box::new(s2));
        assert!(!log.sampled(), "off by default");
        cfg.access = AccessLogMode::On;
        cfg.access_sample = 0.0;
        log.configure(&cfg);
        assert!((0..1000).all(|_| !log.sampled()));
        log.set_sample(1.0);
        assert!(log.sampled());
        log.set_sample(0.5);
        let n = (0..10_000).filter(|_| log.sampled()).count();
        assert!((4000..6000).contains(&n), "{n}");
        log.emit(Line::new(SystemTime::now(), "tcp").finish());
        for _ in 0..200 {
            if !sink.0.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("\"kind\":\"tcp\""), "{text}");
    }
}
