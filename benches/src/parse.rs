//! Reading the load generators' reports: iperf3's JSON, wrk's text and
//! h2load's text plus its per-request log.

use crate::tools::percentile;
use crate::Result;

/// iperf3 `-J`: bits per second the receiver got, summed over streams.
pub fn iperf3_bps(json: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3: {e}").into());
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(|b| b.as_f64())
        .ok_or_else(|| "iperf3 output has no end.sum_received.bits_per_second".into())
}

/// The ping-pong client's report (`legate-bench tool pingpong`): round
/// trips made and their latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PingPong {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub count: u64,
}

/// The ping-pong client's JSON; a field missing is an error, not a zero
/// in the tables.
pub fn pingpong(json: &str) -> Result<PingPong> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let us = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| format!("pingpong output lacks {k}: {json}"))
    };
    Ok(PingPong {
        p50_us: us("p50_us")?,
        p99_us: us("p99_us")?,
        p999_us: us("p999_us")?,
        count: v["count"]
            .as_u64()
            .ok_or_else(|| format!("pingpong output lacks count: {json}"))?,
    })
}

/// Requests per second and latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HttpLoad {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Requests that failed or got a status other than 2xx/3xx.
    pub errors: u64,
}

/// A wrk duration such as `812.00us`, `1.21ms`, `2.00s` or `1.00m`, in
/// microseconds.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(n * scale)
}

/// `wrk --latency` output.
pub fn wrk(out: &str) -> Result<HttpLoad> {
    let mut load = HttpLoad::default();
    let mut p50 = None;
    let mut p99 = None;
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(d)) => p50 = wrk_duration_us(d),
            (Some("99%"), Some(d)) => p99 = wrk_duration_us(d),
            (Some("Requests/sec:"), Some(r)) => load.rps = r.parse()?,
            (Some("Non-2xx"), _) => {
                load.errors += line.rsplit(' ').next().unwrap_or("0").parse::<u64>()?
            }
            (Some("Socket"), Some("errors:")) => {
                // Socket errors: connect 0, read 0, write 0, timeout 0
                load.errors += line
                    .split(',')
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    load.p50_us = p50.ok_or("wrk output lacks the 50% latency; was --latency given?")?;
    load.p99_us = p99.ok_or("wrk output lacks the 99% latency")?;
    if load.rps == 0.0 {
        return Err(format!("wrk reported no requests:\n{out}").into());
    }
    Ok(load)
}

/// h2load's summary for req/s and failures, and its `--log-file` (one
/// line per request: start time, status, elapsed microseconds) for the
/// percentiles, which the summary does not give.
pub fn h2load(out: &str, log: &str) -> Result<HttpLoad> {
    let mut load = HttpLoad::default();
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // finished in 10.00s, 41234.50 req/s, 12.34MB/s
            let rps = rest
                .split(',')
                .nth(1)
                .and_then(|p| p.trim().strip_suffix(" req/s"))
                .ok_or_else(|| format!("cannot read req/s from {line:?}"))?;
            load.rps = rps.parse()?;
        }
        if let Some(rest) = line.strip_prefix("requests: ") {
            // requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 0 errored, 0 timeout
            for part in rest.split(',').map(str::trim) {
                if let Some(n) = part
                    .strip_suffix(" failed")
                    .or_else(|| part.strip_suffix(" errored"))
                    .or_else(|| part.strip_suffix(" timeout"))
                {
                    load.errors += n.parse::<u64>()?;
                }
            }
        }
    }
    let mut samples: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    if samples.is_empty() || load.rps == 0.0 {
        return Err(format!("h2load reported no requests:\n{out}").into());
    }
    samples.sort_unstable();
    load.p50_us = percentile(&samples, 50.0) as f64;
    load.p99_us = percentile(&samples, 99.0) as f64;
    Ok(load)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://10.200.0.3:8180/index.html
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.34us  201.00us   9.87ms   90.00%
    Req/Sec    30.12k     1.20k   33.00k    70.00%
  Latency Distribution
     50%  790.00us
     75%    0.90ms
     90%    1.01ms
     99%    1.50ms
  600000 requests in 10.00s, 200.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  59999.50
Transfer/sec:     20.00MB
";

    #[test]
    fn wrk_report() {
        let l = wrk(WRK).unwrap();
        assert_eq!(l.rps, 59999.5);
        assert_eq!(l.p50_us, 790.0);
        assert_eq!(l.p99_us, 1500.0);
        assert_eq!(l.errors, 3);
    }

    #[test]
    fn h2load_report() {
        let out = "finished in 10.00s, 41234.50 req/s, 12.34MB/s
requests: 412345 total, 412345 started, 412345 done, 412340 succeeded, 5 failed, 0 errored, 0 timeout";
        let log = "1700000000.1\t200\t100\n1700000000.2\t200\t300\n1700000000.3\t200\t200\n";
        let l = h2load(out, log).unwrap();
        assert_eq!(l.rps, 41234.5);
        assert_eq!(l.errors, 5);
        assert_eq!(l.p50_us, 200.0);
        assert_eq!(l.p99_us, 300.0);
    }

    #[test]
    fn a_pingpong_report_is_read_whole_or_refused() {
        let ok = r#"{"count":10,"p50_us":120.5,"p99_us":300.0,"p999_us":410.0}"#;
        let p = pingpong(ok).unwrap();
        assert_eq!(
            (p.count, p.p50_us, p.p99_us, p.p999_us),
            (10, 120.5, 300.0, 410.0)
        );
        let e = pingpong(r#"{"count":10,"p50_us":120.5}"#).unwrap_err();
        assert!(e.to_string().contains("p99_us"), "{e}");
    }

    #[test]
    fn iperf3_errors_are_reported() {
        assert!(iperf3_bps(r#"{"error":"unable to connect"}"#).is_err());
        let ok = r#"{"end":{"sum_received":{"bits_per_second":1.5e10}}}"#;
        assert_eq!(iperf3_bps(ok).unwrap(), 1.5e10);
    }
}
