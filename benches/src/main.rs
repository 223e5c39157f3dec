//! `legate-bench`: legate's data plane measured against direct connections
//! and against nginx and HAProxy mTLS pairs, in one run, in the same
//! test-bed namespaces.
//!
//! ```text
//!  pod "client"  10.200.0.2                 pod "server"  10.200.0.3
//!  iperf3 / wrk / h2load / tools            iperf3 -s, echo tool, nginx app
//!   | direct ---------------------------------> :5202 :7100 :8180 :8182
//!   | legate: captured -> legate proxy ==mTLS==> legate proxy -> :5201 :7000 :8080 :8082
//!   | 127.0.0.1:1xxxx -> nginx / haproxy ==mTLS==> nginx / haproxy -> same
//! ```
//!
//! Both pods run `legate init` and a `legate proxy` sidecar (uid 1337) for
//! the whole run; the direct and comparison ports are excluded from capture
//! (`--exclude-outbound-ports` in the client, `--exclude-inbound-ports` in
//! the server), so those paths never meet legate, and every path shares
//! the same veths and applications. The runner checks that legate's CPU
//! stays near zero while other peers are measured.
//!
//! Run it as root through `scripts/bench.sh`, which installs the tools
//! and builds everything in release mode first.

mod certs;
mod measure;
mod parse;
mod peers;
mod report;
mod run;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

#[derive(Debug, Parser)]
#[command(
    name = "legate-bench",
    about = "Benchmarks legate's L4 and HTTP data plane against direct connections, nginx and HAProxy, in test-bed namespaces (needs root)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    tool: Option<ToolCmd>,
    #[command(flatten)]
    run: run::RunArgs,
}

#[derive(Debug, Subcommand)]
enum ToolCmd {
    /// Load tools the runner starts inside the pods.
    #[command(hide = true)]
    Tool {
        #[command(subcommand)]
        tool: tools::Tool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.tool {
        Some(ToolCmd::Tool { tool }) => tools::run(tool),
        None => run::run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("legate-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
