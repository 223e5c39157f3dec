//! `legate`: one binary for every part of the mesh.
//!
//! Each subcommand is a thin shell: it turns its flags into configuration
//! overrides, loads the layered configuration, sets up logging and hands
//! over to the crate that owns the capability.

mod check;
mod cli;
mod demo;
mod identity;
mod logging;
mod proxy_cmd;
mod run;
mod wait_ready;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::run(cli)
}
