//! The `legate ca ...` commands: clap types, their mapping onto
//! configuration keys, and what each does.
//!
//! Flags that correspond to configuration keys are turned into overrides by
//! [`CaCommand::config_overrides`], so a flag, a `LEGATE_*` variable and the
//! config file all reach the same field; [`run`] then works from the loaded
//! [`Config`] alone.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use legate_config::{Config, FlagValue, Secret, SpiffeId};

use crate::manager::{IdentityManager, ManagerOptions, TokenSource};
use crate::store::{self, Import};
use crate::{inspect, server, CaError};

/// Run and manage the certificate authority.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the CA in --dir: a P-256 root and intermediate, or your own
    /// root (and intermediate) imported from PEM files. Never overwrites
    /// existing keys without --force.
    Init(InitArgs),
    /// Serve the CA API over HTTPS on ca.listen (default :15012): issue
    /// certificates, serve the trust bundle, report health.
    Serve(ServeArgs),
    /// Mint a bootstrap token bound to one identity and print it. Give it to
    /// the workload as identity.token or identity.token_file.
    Token(TokenArgs),
    /// Add a new root and intermediate that take over signing while the
    /// bundle keeps the old root; with --retire, drop old roots once
    /// nothing they issued is still valid.
    Rotate(RotateArgs),
    /// Show what a PEM certificate file holds: identity, validity and time
    /// left, issuer chain.
    Inspect(InspectArgs),
    /// Fetch a certificate from a running CA by hand and write cert.pem,
    /// key.pem and bundle.pem to --out.
    Issue(IssueArgs),
    /// Print the trust bundle: every root that is not retired. Refuses a
    /// bundle file that is damaged or whose roots have all expired.
    Bundle(BundleArgs),
}

/// The CA directory.
#[derive(Debug, Args)]
pub struct DirArg {
    /// Directory holding the CA's keys and state [config: ca.dir]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Certificates and keys to import instead of generating them.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Your root certificate (PEM), instead of a generated one
    #[arg(long, value_name = "FILE")]
    pub root_cert: Option<PathBuf>,
    /// The root's private key (PEM); not needed when you also bring the intermediate
    #[arg(long, value_name = "FILE", requires = "root_cert")]
    pub root_key: Option<PathBuf>,
    /// Your signing intermediate (PEM; may be followed by further intermediates up to the root)
    #[arg(long, value_name = "FILE", requires_all = ["root_cert", "intermediate_key"])]
    pub intermediate_cert: Option<PathBuf>,
    /// The intermediate's private key (PEM)
    #[arg(long, value_name = "FILE", requires = "intermediate_cert")]
    pub intermediate_key: Option<PathBuf>,
}

impl ImportArgs {
    fn to_import(&self) -> Option<Import> {
        self.root_cert.as_ref().map(|root| Import {
            root_cert: root.clone(),
            root_key: self.root_key.clone(),
            intermediate_cert: self.intermediate_cert.clone(),
            intermediate_key: self.intermediate_key.clone(),
        })
    }
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// The mesh's SPIFFE trust domain [config: identity.trust_domain]
    #[arg(long, value_name = "TD")]
    pub trust_domain: Option<String>,
    /// Replace an existing CA in --dir. Certificates it issued stop verifying.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub import: ImportArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Address to listen on [config: ca.listen]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Extra DNS name for the API's certificate, such as a Kubernetes Service name (repeatable) [config: ca.dns_names]
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// The identity the token grants: a SPIFFE ID, or a path such as
    /// `web` or `ns/shop/sa/web` in the CA's trust domain
    #[arg(long, value_name = "ID")]
    pub identity: String,
    /// How long the token is valid, 1s or more, such as 10m [config: ca.token_ttl]
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Retire every root but the signing one, refusing while certificates
    /// they issued may still be valid
    #[arg(long, conflicts_with_all = ["root_cert", "root_key", "intermediate_cert", "intermediate_key"])]
    pub retire: bool,
    #[command(flatten)]
    pub import: ImportArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A PEM file with one or more certificates (a chain, a bundle)
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Bootstrap token from `legate ca token` [config: identity.token]
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the token [config: identity.token_file]
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Where to write cert.pem, key.pem (mode 0600) and bundle.pem [config: identity.cert_dir]
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The CA API, host:port [config: identity.ca_address]
    #[arg(long = "ca", value_name = "HOST:PORT")]
    pub ca_address: Option<String>,
    /// PEM roots to verify the CA with [config: identity.ca_bundle]
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// The SPIFFE ID to ask for; defaults to the one the token names [config: identity.id]
    #[arg(long, value_name = "ID")]
    pub identity: Option<String>,
}

#[derive(Debug, Args)]
pub struct BundleArgs {
    #[command(flatten)]
    pub dir: DirArg,
}

fn flag(path: &str, value: impl Into<String>, flag: &str) -> FlagValue {
    FlagValue {
        path: path.into(),
        value: value.into(),
        flag: flag.into(),
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

impl CaCommand {
    /// The configuration overrides this command's flags stand for.
    pub fn config_overrides(&self) -> Vec<FlagValue> {
        let mut out = Vec::new();
        let dir = |d: &DirArg, out: &mut Vec<FlagValue>| {
            if let Some(p) = &d.dir {
                out.push(flag("ca.dir", path_str(p), "--dir"));
            }
        };
        match self {
            CaCommand::Init(a) => {
                dir(&a.dir, &mut out);
                if let Some(td) = &a.trust_domain {
                    out.push(flag("identity.trust_domain", td, "--trust-domain"));
                }
            }
            CaCommand::Serve(a) => {
                dir(&a.dir, &mut out);
                if let Some(l) = &a.listen {
                    out.push(flag("ca.listen", l, "--listen"));
                }
                if !a.dns_names.is_empty() {
                    out.push(flag("ca.dns_names", a.dns_names.join(","), "--dns-name"));
                }
            }
            CaCommand::Token(a) => {
                dir(&a.dir, &mut out);
                if let Some(t) = &a.ttl {
                    out.push(flag("ca.token_ttl", t, "--ttl"));
                }
            }
            CaCommand::Rotate(a) => dir(&a.dir, &mut out),
            CaCommand::Bundle(a) => dir(&a.dir, &mut out),
            CaCommand::Inspect(_) => {}
            CaCommand::Issue(a) => {
                if let Some(t) = &a.token {
                    out.push(flag("identity.token", t, "--token"));
                }
                if let Some(p) = &a.token_file {
                    out.push(flag("identity.token_file", path_str(p), "--token-file"));
                }
                out.push(flag("identity.cert_dir", path_str(&a.out), "--out"));
                if let Some(c) = &a.ca_address {
                    out.push(flag("identity.ca_address", c, "--ca"));
                }
                if let Some(b) = &a.ca_bundle {
                    out.push(flag("identity.ca_bundle", path_str(b), "--ca-bundle"));
                }
                if let Some(id) = &a.identity {
                    out.push(flag("identity.id", id, "--identity"));
                    // The identity names its trust domain; say so, or the
                    // configuration would find it outside the default one.
                    if let Ok(parsed) = id.parse::<SpiffeId>() {
                        out.push(flag(
                            "identity.trust_domain",
                            parsed.trust_domain(),
                            "--identity",
                        ));
                    }
                }
            }
        }
        out
    }
}

/// Runs a `legate ca` command against the loaded configuration.
pub async fn run(cmd: CaCommand, config: &Config) -> Result<(), CaError> {
    let dir = &config.ca.dir;
    match cmd {
        CaCommand::Init(a) => {
            let import = a.import.to_import();
            let report = store::init(
                dir,
                &config.identity.trust_domain,
                &config.ca,
                import.as_ref(),
                a.force,
            )?;
            print_out(&report);
        }
        CaCommand::Serve(_) => server::serve(dir, &config.ca).await?,
        CaCommand::Token(a) => {
            let id = if a.identity.starts_with("spiffe://") {
                a.identity.parse::<SpiffeId>()
            } else {
                let td = store::trust_domain(dir)?;
                SpiffeId::new(&td, a.identity.trim_matches('/').split('/'))
            }
            .map_err(|e| CaError::Usage(format!("--identity {:?}: {e}", a.identity)))?;
            let token = store::mint_token(dir, &id, config.ca.token_ttl)?;
            print_out(&format!("{token}\n"));
        }
        CaCommand::Rotate(a) if a.retire => {
            print_out(&store::retire(dir, std::time::SystemTime::now())?)
        }
        CaCommand::Rotate(a) => print_out(&store::rotate(
            dir,
            &config.ca,
            a.import.to_import().as_ref(),
        )?),
        CaCommand::Inspect(a) => print_out(&inspect::inspect_file(&a.file)?),
        CaCommand::Bundle(_) => print_out(&store::bundle(dir, std::time::SystemTime::now())?),
        CaCommand::Issue(_) => {
            let mut opts = match ManagerOptions::from_config(&config.identity) {
                Ok(o) => o,
                Err(e) => {
                    // Without a configured identity, ask for the one the
                    // token names (unverified here; the CA checks it).
                    let token = match (&config.identity.token, &config.identity.token_file) {
                        (Some(t), _) => Some(t.clone()),
                        (None, Some(p)) => Some(Secret::new(crate::files::read_string(p)?.trim())),
                        _ => None,
                    };
                    let Some(id) = token.and_then(|t| crate::token::unverified_subject(t.expose()))
                    else {
                        return Err(e);
                    };
                    let mut identity = config.identity.clone();
                    identity.trust_domain = id
                        .trust_domain()
                        .parse()
                        .map_err(|e: String| CaError::Usage(e))?;
                    identity.id = Some(id);
                    ManagerOptions::from_config(&identity)?
                }
            };
            // A certificate by hand: do not reuse an old one from --out.
            if let TokenSource::None = opts.token {
                return Err(CaError::Usage("pass --token or --token-file".into()));
            }
            let out_dir = opts.cert_dir.clone();
            opts.cert_dir = None;
            let manager = IdentityManager::new(opts)?;
            let creds = manager.fetch().await?;
            if let Some(dir) = out_dir {
                crate::manager::save_dir(&dir, &creds)?;
                print_out(&format!(
                    "wrote cert.pem, key.pem and bundle.pem to {}\n",
                    dir.display()
                ));
            }
            let summary =
                inspect::describe(creds.chain(), std::time::SystemTime::now()).unwrap_or_default();
            print_out(&summary);
        }
    }
    Ok(())
}

/// Runs a command on a fresh runtime and turns the result into an exit
/// code, printing the error. For a synchronous `main`.
pub fn run_blocking(cmd: CaCommand, config: &Config) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cmd, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is the reader's choice.
fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}
