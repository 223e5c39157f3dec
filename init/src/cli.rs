//! The `legate init` subcommand: its flags, and what each mode prints.
//!
//! Flags that set configuration keys are handed to the configuration layer
//! as overrides ([`InitArgs::config_overrides`]), so they are validated,
//! reported and merged exactly like the same keys from a file or a
//! `LEGATE_*` variable. The rest choose what to do.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;
use legate_config::{Config, FlagValue};

use crate::error::InitError;
use crate::ops::{apply, check, cleanup, dry_run, Change, Options};
use crate::plan::{plan, Family};
use crate::validate::{default_targets, validate, ValidateOptions};

/// Install, check or remove the iptables rules that send this namespace's
/// TCP through the proxy.
#[derive(Debug, Clone, Default, Args)]
pub struct InitArgs {
    /// Act in this network namespace: a name from `ip netns`, or a path such as /proc/PID/ns/net
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Option<String>,

    /// Remove every rule and chain legate installed, and nothing else
    #[arg(long, conflicts_with_all = ["dry_run", "check", "validate"])]
    pub cleanup: bool,

    /// Print the exact iptables-restore input that would be applied, and change nothing
    #[arg(long, conflicts_with_all = ["check", "validate"])]
    pub dry_run: bool,

    /// Compare the installed rules with the plan; print a diff and exit 1 when they differ
    #[arg(long, conflicts_with = "validate")]
    pub check: bool,

    /// After applying, prove that a connection lands on the outbound port with its original destination
    #[arg(long)]
    pub validate: bool,

    /// Destination the validation connects to (repeatable); defaults to 192.0.2.1:9, and 2001:db8::1 port 9 for IPv6
    #[arg(
        long = "validate-target",
        value_name = "ADDR:PORT",
        requires = "validate"
    )]
    pub validate_targets: Vec<SocketAddr>,

    /// iptables backend; auto keeps whichever already holds legate's rules [config: init.backend]
    #[arg(long, value_name = "auto|nft|legacy")]
    pub backend: Option<String>,

    /// Whether to install IPv6 rules; auto does when the namespace has IPv6 [config: init.ipv6]
    #[arg(long, value_name = "auto|on|off")]
    pub ipv6: Option<String>,

    /// Outbound destination ports not captured, such as 22,8000-8100 [config: init.exclude_outbound_ports]
    #[arg(long, value_name = "PORTS")]
    pub exclude_outbound_ports: Option<String>,

    /// Outbound destination networks not captured, comma-separated [config: init.exclude_outbound_cidrs]
    #[arg(long, value_name = "CIDRS")]
    pub exclude_outbound_cidrs: Option<String>,

    /// Capture only these outbound destination networks [config: init.include_outbound_cidrs]
    #[arg(long, value_name = "CIDRS")]
    pub include_outbound_cidrs: Option<String>,

    /// Inbound ports not captured; the admin port never is [config: init.exclude_inbound_ports]
    #[arg(long, value_name = "PORTS")]
    pub exclude_inbound_ports: Option<String>,

    /// Capture only these inbound ports [config: init.include_inbound_ports]
    #[arg(long, value_name = "PORTS")]
    pub include_inbound_ports: Option<String>,

    /// The proxy's uid, whose traffic is not captured [config: proxy.uid]
    #[arg(long, value_name = "UID")]
    pub proxy_uid: Option<String>,

    /// The proxy's gid, whose traffic is not captured [config: proxy.gid]
    #[arg(long, value_name = "GID")]
    pub proxy_gid: Option<String>,

    /// Port outbound traffic is redirected to [config: proxy.outbound_port]
    #[arg(long, value_name = "PORT")]
    pub outbound_port: Option<String>,

    /// Port inbound traffic is redirected to [config: proxy.inbound_port]
    #[arg(long, value_name = "PORT")]
    pub inbound_port: Option<String>,
}

impl InitArgs {
    /// The configuration keys these flags set, for the configuration layer
    /// to validate and merge over file and environment.
    pub fn config_overrides(&self) -> Vec<FlagValue> {
        let pairs: [(&Option<String>, &str, &str); 11] = [
            (&self.backend, "init.backend", "--backend"),
            (&self.ipv6, "init.ipv6", "--ipv6"),
            (
                &self.exclude_outbound_ports,
                "init.exclude_outbound_ports",
                "--exclude-outbound-ports",
            ),
            (
                &self.exclude_outbound_cidrs,
                "init.exclude_outbound_cidrs",
                "--exclude-outbound-cidrs",
            ),
            (
                &self.include_outbound_cidrs,
                "init.include_outbound_cidrs",
                "--include-outbound-cidrs",
            ),
            (
                &self.exclude_inbound_ports,
                "init.exclude_inbound_ports",
                "--exclude-inbound-ports",
            ),
            (
                &self.include_inbound_ports,
                "init.include_inbound_ports",
                "--include-inbound-ports",
            ),
            (&self.proxy_uid, "proxy.uid", "--proxy-uid"),
            (&self.proxy_gid, "proxy.gid", "--proxy-gid"),
            (
                &self.outbound_port,
                "proxy.outbound_port",
                "--outbound-port",
            ),
            (&self.inbound_port, "proxy.inbound_port", "--inbound-port"),
        ];
        pairs
            .into_iter()
            .filter_map(|(value, path, flag)| {
                value.as_ref().map(|v| FlagValue {
                    path: path.into(),
                    value: v.clone(),
                    flag: format!("{flag} {v}"),
                })
            })
            .collect()
    }
}

/// Prints to stdout; a closed pipe (`legate init --dry-run | head`) is the
/// reader's choice, not an error.
fn say(text: &str) -> Result<(), InitError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(InitError::io("writing to stdout", e))
        }
        _ => Ok(()),
    }
}

/// Runs `legate init` with a loaded configuration. Exit code 1 means
/// `--check` found a difference; errors are returned for the caller to
/// print.
pub fn run(args: &InitArgs, config: &Config) -> Result<ExitCode, InitError> {
    // The plan is built first: a bad value stops here, before any change.
    let plan = plan(&config.init, &config.proxy)?;
    let opts = Options {
        netns: args.netns.clone(),
        ..Options::from_config(&config.init)
    };

    if args.cleanup {
        let reports = cleanup(&opts)?;
        if reports.is_empty() {
            say("nothing of legate's is installed here; nothing removed\n")?;
        }
        for r in reports {
            say(&format!("removed legate's rules: {r}\n"))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.dry_run {
        say(&dry_run(&plan, &opts)?.to_string())?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.check {
        let report = check(&plan, &opts)?;
        say(&report.to_string())?;
        return Ok(if report.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }

    let report = apply(&plan, &opts)?;
    say(&format!("{report}\n"))?;
    if args.validate {
        let ipv6 = report
            .families
            .iter()
            .any(|(f, c)| *f == Family::V6 && *c != Change::Skipped);
        let targets = if args.validate_targets.is_empty() {
            default_targets(&config.init, ipv6)
        } else {
            args.validate_targets.clone()
        };
        let vopts = ValidateOptions {
            netns: args.netns.clone(),
            targets,
            ..ValidateOptions::new(&config.init, &config.proxy, ipv6)
        };
        for v in validate(&vopts)? {
            say(&format!(
                "validated: a connection to {} landed on {} with original destination {}\n",
                v.target, v.landed_on, v.original_dst
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: InitArgs,
    }

    #[test]
    fn flags_become_config_overrides() {
        let w = Wrapper::try_parse_from([
            "init",
            "--exclude-outbound-ports",
            "22,8000-8100",
            "--proxy-uid",
            "2000",
            "--ipv6",
            "off",
        ])
        .unwrap();
        let o = w.args.config_overrides();
        let paths: Vec<&str> = o.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            ["init.ipv6", "init.exclude_outbound_ports", "proxy.uid"]
        );
        for f in &o {
            assert!(legate_config::key_paths().contains(&f.path), "{}", f.path);
        }
        assert_eq!(o[1].flag, "--exclude-outbound-ports 22,8000-8100");
    }

    #[test]
    fn overrides_load_and_bad_values_name_the_flag() {
        let w =
            Wrapper::try_parse_from(["init", "--exclude-outbound-cidrs", "10.0.0.0/8,fd00::/8"])
                .unwrap();
        let sources = legate_config::Sources {
            flags: w.args.config_overrides(),
            ..Default::default()
        };
        let loaded = legate_config::load(&sources).unwrap();
        assert_eq!(loaded.config.init.exclude_outbound_cidrs.len(), 2);

        let w = Wrapper::try_parse_from(["init", "--outbound-port", "70000"]).unwrap();
        let sources = legate_config::Sources {
            flags: w.args.config_overrides(),
            ..Default::default()
        };
        let e = legate_config::load(&sources).unwrap_err().to_string();
        assert!(e.contains("--outbound-port 70000"), "{e}");
    }

    #[test]
    fn modes_exclude_each_other() {
        assert!(Wrapper::try_parse_from(["init", "--cleanup", "--check"]).is_err());
        assert!(Wrapper::try_parse_from(["init", "--validate-target", "10.0.0.1:80"]).is_err());
        assert!(Wrapper::try_parse_from([
            "init",
            "--validate",
            "--validate-target",
            "10.0.0.1:80"
        ])
        .is_ok());
    }
}
