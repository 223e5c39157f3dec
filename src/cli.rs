//! Command-line interface: global flags, the subcommand tree and dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use legate_config::{FlagValue, Loaded, Sources};

use crate::logging;

/// A transparent mTLS service-mesh sidecar: capture, identity, policy and
/// telemetry for applications that cannot change.
#[derive(Debug, Parser)]
#[command(
    name = "legate",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every subcommand accepts.
#[derive(Debug, Args)]
struct GlobalArgs {
    /// Configuration file (TOML). Flags and LEGATE_* variables override it.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Log filter, such as info, debug or info,legate_proxy=trace [env: LEGATE_LOG]
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,

    /// Log format [env: LEGATE_LOG_FORMAT]
    #[arg(long, global = true, value_name = "text|json")]
    log_format: Option<String>,

    /// Set any configuration key, for example --set proxy.mode=strict (repeatable)
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect and validate configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run and manage the certificate authority: init, serve, token, rotate, inspect, issue
    #[command(subcommand)]
    Ca(legate_ca::cli::CaCommand),
    /// Install, check or remove the iptables rules that send a namespace's TCP through the proxy
    Init(legate_init::cli::InitArgs),
    /// Add the init container and sidecar to Kubernetes manifests: YAML from -f FILE or stdin, to stdout
    Inject(legate_inject::cli::InjectArgs),
    /// Run the sidecar proxy: capture listeners, mTLS with the workload certificate, policy
    Proxy(crate::proxy_cmd::ProxyArgs),
    /// Mesh one process on a plain host: its TCP goes through a proxy while it runs
    Run(crate::run::RunArgs),
    /// Build a small mesh in network namespaces, send traffic through it and show what happened
    Demo,
    /// Wait until the local proxy is ready; for startup ordering and health checks
    WaitReady(crate::wait_ready::WaitReadyArgs),
    /// Diagnose the meshing of this network namespace: capture rules, the proxy's listeners and uid, readiness, certificate, CA; exits 1 when a check fails
    Check(crate::check::CheckArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (secrets redacted), or every error in it; exits 1 on error
    Check {
        /// The file to check; defaults to --config or LEGATE_CONFIG
        file: Option<PathBuf>,
    },
    /// List every key with its environment variable and default value
    Keys,
}

impl GlobalArgs {
    /// Turns the global flags into configuration overrides.
    fn overrides(&self) -> Result<Vec<FlagValue>, String> {
        let mut out = Vec::new();
        if let Some(level) = &self.log_level {
            out.push(FlagValue {
                path: "log.level".into(),
                value: level.clone(),
                flag: "--log-level".into(),
            });
        }
        if let Some(format) = &self.log_format {
            out.push(FlagValue {
                path: "log.format".into(),
                value: format.clone(),
                flag: "--log-format".into(),
            });
        }
        for kv in &self.set {
            let (path, value) = kv.split_once('=').ok_or_else(|| {
                format!("--set {kv:?} has no '='; write --set KEY=VALUE, for example --set proxy.mode=strict")
            })?;
            out.push(FlagValue {
                path: path.trim().to_owned(),
                value: value.to_owned(),
                flag: format!("--set {kv}"),
            });
        }
        Ok(out)
    }
}

/// Where the configuration comes from: the file, the environment and flags.
fn sources(
    global: &GlobalArgs,
    file: Option<PathBuf>,
    extra: Vec<FlagValue>,
) -> Result<Sources, ExitCode> {
    let mut sources = Sources::from_process_env(file.or_else(|| global.config.clone()));
    sources.flags = match global.overrides() {
        Ok(f) => f,
        Err(msg) => {
            eprintln!("error: {msg}");
            return Err(ExitCode::from(2));
        }
    };
    // Subcommand flags are more specific than the global --set.
    sources.flags.extend(extra);
    Ok(sources)
}

/// Loads the layered configuration, printing every problem on failure.
fn load_config(
    global: &GlobalArgs,
    file: Option<PathBuf>,
    extra: Vec<FlagValue>,
) -> Result<Loaded, ExitCode> {
    let sources = sources(global, file, extra)?;
    legate_config::load(&sources).map_err(|e| {
        eprint!("error: {e}");
        if !e.to_string().ends_with('\n') {
            eprintln!();
        }
        ExitCode::FAILURE
    })
}

/// Loads configuration and starts logging: the common prologue of every
/// subcommand that does real work.
fn prepare(global: &GlobalArgs, extra: Vec<FlagValue>) -> Result<Loaded, ExitCode> {
    let loaded = load_config(global, None, extra)?;
    start_logging(loaded)
}

/// [`prepare`] for `--cleanup`, which must work whatever the configuration
/// says: a host or pod whose rules outlived their proxy has lost its
/// network until they go. Removing them needs nothing from the
/// configuration (the chains are found by name in whichever backend holds
/// them), so one that no longer loads, by a mistake or by a rule a newer
/// release checks, is reported and the built-in defaults stand in.
fn prepare_cleanup(global: &GlobalArgs, extra: Vec<FlagValue>) -> Result<Loaded, ExitCode> {
    let sources = sources(global, None, extra)?;
    let loaded = match legate_config::load(&sources) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprint!(
                "warning: the configuration does not load; --cleanup goes on with the \
                 built-in defaults, since it finds legate's rules by their chains in either \
                 backend. Fix the configuration before installing rules again.\n{e}"
            );
            if !e.to_string().ends_with('\n') {
                eprintln!();
            }
            legate_config::load(&Sources::default()).map_err(|e| {
                eprintln!("error: the built-in defaults do not load: {e}");
                ExitCode::FAILURE
            })?
        }
    };
    start_logging(loaded)
}

/// [`prepare_cleanup`] for a `--cleanup`, [`prepare`] otherwise.
fn prepare_or_clean(
    global: &GlobalArgs,
    cleanup: bool,
    extra: Vec<FlagValue>,
) -> Result<Loaded, ExitCode> {
    if cleanup {
        prepare_cleanup(global, extra)
    } else {
        prepare(global, extra)
    }
}

fn start_logging(loaded: Loaded) -> Result<Loaded, ExitCode> {
    let log = &loaded.config.log;
    if let Err(e) = logging::init(&log.level, log.format) {
        eprintln!("error: {e}");
        return Err(ExitCode::FAILURE);
    }
    Ok(loaded)
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Config(ConfigCommand::Check { file }) => config_check(&cli.global, file),
        Command::Config(ConfigCommand::Keys) => config_keys(),
        Command::Ca(cmd) => match prepare(&cli.global, cmd.config_overrides()) {
            Ok(loaded) => legate_ca::cli::run_blocking(cmd, &loaded.config),
            Err(code) => code,
        },
        Command::Init(args) => {
            match prepare_or_clean(&cli.global, args.cleanup, args.config_overrides()) {
                Ok(loaded) => {
                    print_warnings(&loaded);
                    match legate_init::cli::run(&args, &loaded.config) {
                        Ok(code) => code,
                        Err(e) => {
                            eprintln!("error: {e}");
                            ExitCode::FAILURE
                        }
                    }
                }
                Err(code) => code,
            }
        }
        Command::Inject(args) => match prepare(&cli.global, Vec::new()) {
            Ok(loaded) => match legate_inject::cli::run(&args, &loaded.config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(code) => code,
        },
        Command::Proxy(args) => match prepare(&cli.global, args.config_overrides()) {
            Ok(loaded) => match sources(&cli.global, None, args.config_overrides()) {
                // The same sources again on reload.
                Ok(sources) => crate::proxy_cmd::run(loaded.config, sources),
                Err(code) => code,
            },
            Err(code) => code,
        },
        Command::Run(args) => {
            match prepare_or_clean(&cli.global, args.cleanup, args.config_overrides()) {
                Ok(loaded) => {
                    print_warnings(&loaded);
                    crate::run::run(args, loaded.config)
                }
                Err(code) => code,
            }
        }
        Command::Demo => crate::demo::run(),
        Command::WaitReady(args) => match load_config(&cli.global, None, Vec::new()) {
            Ok(loaded) => crate::wait_ready::run(&args, &loaded.config),
            Err(code) => code,
        },
        Command::Check(args) => match load_config(&cli.global, None, Vec::new()) {
            Ok(loaded) => crate::check::run(&args, &loaded.config),
            Err(code) => code,
        },
    }
}

fn config_check(global: &GlobalArgs, file: Option<PathBuf>) -> ExitCode {
    match load_config(global, file, Vec::new()) {
        Ok(loaded) => {
            // The log filter is only checked when logging starts; check it here too.
            if let Err(e) = logging::validate_filter(&loaded.config.log.level) {
                eprintln!("error: 1 configuration error:\n  - {e}");
                return ExitCode::FAILURE;
            }
            print_warnings(&loaded);
            for warning in file_warnings(&loaded.config) {
                eprintln!("warning: {warning}");
            }
            print_out(&loaded.config.to_toml())
        }
        Err(code) => code,
    }
}

/// What the configuration holds that works, but probably not as meant.
/// The commands that act on it (`legate init`, `legate run`) say so before
/// they act; the proxy, which `legate run` also starts, does not repeat it.
fn print_warnings(loaded: &Loaded) {
    for warning in loaded.warnings() {
        eprintln!("warning: {warning}");
    }
}

/// What is wrong, on this machine, with the files the configuration names
/// for the proxy: warnings, not errors, since a configuration is often
/// checked somewhere else than where it runs. The proxy refuses the same
/// mistakes when it starts, later and in a log.
fn file_warnings(config: &legate_config::Config) -> Vec<String> {
    use std::path::Path;
    let mut out = Vec::new();
    let file = |key: &str, path: &Path, out: &mut Vec<String>| -> Option<Vec<u8>> {
        match std::fs::metadata(path) {
            Err(e) => out.push(format!("{key} {}: {e}", path.display())),
            Ok(m) if !m.is_file() => {
                out.push(format!("{key} {} is not a regular file", path.display()))
            }
            Ok(_) => match std::fs::read(path) {
                Ok(data) => return Some(data),
                Err(e) => out.push(format!("{key} {}: {e}", path.display())),
            },
        }
        None
    };
    let id = &config.identity;
    if let Some(path) = &id.ca_bundle {
        if let Some(pem) = file("identity.ca_bundle", path, &mut out) {
            if let Err(e) = legate_ca::Bundle::from_pem(&pem) {
                out.push(format!("identity.ca_bundle {}: {e}", path.display()));
            }
        }
    }
    if let Some(path) = &id.token_file {
        file("identity.token_file", path, &mut out);
    }
    if let Some(path) = &config.telemetry.otlp_ca_file {
        file("telemetry.otlp_ca_file", path, &mut out);
    }
    if let Some(dir) = &id.cert_dir {
        if dir.exists() && !dir.is_dir() {
            out.push(format!(
                "identity.cert_dir {} is not a directory",
                dir.display()
            ));
        }
    }
    out
}

fn config_keys() -> ExitCode {
    let defaults = legate_config::Config::default().to_toml();
    let table: toml::Table = defaults.parse().unwrap_or_default();
    let mut out = String::new();
    for path in legate_config::key_paths() {
        let default = path
            .split('.')
            .try_fold(toml::Value::Table(table.clone()), |v, k| match v {
                toml::Value::Table(mut t) => t.remove(k),
                _ => None,
            })
            .map(|v| v.to_string())
            .unwrap_or_else(|| "(unset)".into());
        out.push_str(&format!(
            "{path:<40} {:<42} {default}\n",
            legate_config::env_name(&path)
        ));
    }
    print_out(&out)
}

/// Writes command output to stdout. A closed pipe (`legate ... | head`) is
/// the reader's choice, not an error worth a panic.
fn print_out(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use legate_config::LogFormat;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn log_format_words_match_the_config() {
        assert_eq!(LogFormat::WORDS, ["text", "json"]);
    }
}
