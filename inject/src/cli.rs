//! The `legate inject` subcommand: its flags, reading the manifests and
//! writing the result.
//!
//! The proxy's uid and gid and its admin address come from the loaded
//! configuration (`proxy.uid`, `proxy.gid`, `proxy.admin_listen`), so the
//! pod and the probes agree with what `legate init` and `legate proxy`
//! will read. Everything else that differs per cluster is a flag.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::Args;
use legate_config::{Config, TrustDomain};
use tracing::{debug, info, warn};

use crate::{inject, Action, InjectError, Injected, Options, VERSION};

/// Add legate's init container and sidecar to the pods in Kubernetes
/// manifests. Reads YAML (many documents) and writes the same documents,
/// injected, to stdout.
#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// Manifest file to read; stdin when absent or -
    #[arg(
        short = 'f',
        long = "filename",
        visible_alias = "file",
        value_name = "FILE|-"
    )]
    pub file: Option<PathBuf>,

    // clap prints this text as help, where the angle brackets are meant
    // as they stand, not as HTML.
    #[allow(rustdoc::invalid_html_tags)]
    /// Image with the legate binary at /usr/local/bin/legate [default: ghcr.io/legate-mesh/legate:<this version>]
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,

    /// SPIFFE trust domain of the pods' identities; must match the CA's
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// The CA's address as pods reach it
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "legate-ca.legate-system.svc:15012"
    )]
    pub ca_address: String,

    /// Run the proxy as the first regular container, held ready by a postStart hook, for clusters older than Kubernetes 1.29 (no native sidecars). Jobs then never complete on their own
    #[arg(long)]
    pub classic_sidecar: bool,
}

impl InjectArgs {
    /// The injection options these flags and the configuration give.
    pub fn options(&self, config: &Config) -> Result<Options, InjectError> {
        let mut o = Options::new(VERSION);
        if let Some(image) = &self.image {
            if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
                return Err(InjectError::Flag {
                    flag: "--image",
                    value: image.clone(),
                    message: "not an image reference; write REGISTRY/NAME:TAG".into(),
                });
            }
            o.image = image.clone();
        }
        self.trust_domain
            .parse::<TrustDomain>()
            .map_err(|message| InjectError::Flag {
                flag: "--trust-domain",
                value: self.trust_domain.clone(),
                message,
            })?;
        o.trust_domain = self.trust_domain.clone();
        match self.ca_address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => {
                return Err(InjectError::Flag {
                    flag: "--ca-address",
                    value: self.ca_address.clone(),
                    message: "expected HOST:PORT, such as legate-ca.legate-system.svc:15012".into(),
                })
            }
        }
        o.ca_address = self.ca_address.clone();
        o.classic_sidecar = self.classic_sidecar;
        o.proxy_uid = config.proxy.uid;
        o.proxy_gid = config.proxy.gid;
        o.admin_port = config.proxy.admin_listen.port();
        if config.proxy.admin_listen != Config::default().proxy.admin_listen {
            o.admin_listen = Some(config.proxy.admin_listen.to_string());
        }
        Ok(o)
    }
}

fn read_input(file: Option<&PathBuf>) -> Result<String, InjectError> {
    let bytes = match file {
        Some(path) if path.as_os_str() != "-" => {
            std::fs::read(path).map_err(|source| InjectError::Read {
                path: path.clone(),
                source,
            })?
        }
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut buf)
                .map_err(InjectError::Stdin)?;
            buf
        }
    };
    String::from_utf8(bytes).map_err(|e| InjectError::NotUtf8 {
        offset: e.utf8_error().valid_up_to(),
    })
}

/// Runs `legate inject`: reads the manifests, injects them, writes them to
/// stdout and logs what was done to each object on stderr. Nothing is
/// written when any document is refused.
pub fn run(args: &InjectArgs, config: &Config) -> Result<(), InjectError> {
    let opts = args.options(config)?;
    let input = read_input(args.file.as_ref())?;
    let result = inject(&input, &opts)?;
    for r in &result.reports {
        match r.action {
            Action::Injected => {
                info!(
                    document = r.at.document,
                    line = r.at.line,
                    "injected {}",
                    r.at.what
                );
                if opts.classic_sidecar && matches!(r.kind.as_str(), "Job" | "CronJob") {
                    warn!(
                        document = r.at.document,
                        "{}: with --classic-sidecar the proxy keeps running after the job's containers finish, so the Job never completes; use native sidecars (Kubernetes 1.29+)",
                        r.at.what
                    );
                }
            }
            Action::AlreadyInjected => {
                info!(
                    document = r.at.document,
                    "{} is already injected; left as it is", r.at.what
                )
            }
            Action::OptedOut => info!(
                document = r.at.document,
                "{} has legate.dev/inject: \"false\"; left out of the mesh", r.at.what
            ),
            Action::Incomplete => warn!(
                document = r.at.document,
                line = r.at.line,
                "{} has no complete pod template (no containers); left as it is",
                r.at.what
            ),
            Action::NoPodTemplate => {
                debug!(document = r.at.document, "{} passed through", r.at.what)
            }
            Action::Unsupported => warn!(
                document = r.at.document,
                line = r.at.line,
                "{}: legate does not inject a {}, so its pods would run outside the mesh; left as it is. To mesh them, write them as a Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob",
                r.at.what,
                if r.kind.is_empty() { "(none)" } else { r.kind.as_str() }
            ),
        }
    }
    if let Some(message) = nothing_found(&result) {
        warn!("{message}");
    }
    let mut out = std::io::stdout().lock();
    match out
        .write_all(result.text.as_bytes())
        .and_then(|()| out.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(InjectError::Write(e)),
        _ => Ok(()),
    }
}

/// A warning when the input held no object with a `kind` (nothing, only
/// comments, empty documents): an empty file or a wrong `-f` otherwise
/// gives an empty output and a silent success.
fn nothing_found(result: &Injected) -> Option<&'static str> {
    result.reports.iter().all(|r| r.kind.is_empty()).then_some(
        "no Kubernetes objects in the input; check the file given with -f, or what is piped in",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: InjectArgs,
    }

    fn options(argv: &[&str]) -> Result<Options, InjectError> {
        let w =
            Wrapper::try_parse_from(std::iter::once("inject").chain(argv.iter().copied())).unwrap();
        w.args.options(&Config::default())
    }

    #[test]
    fn defaults_follow_the_contract() {
        let o = options(&[]).unwrap();
        assert_eq!(o.image, format!("ghcr.io/legate-mesh/legate:{VERSION}"));
        assert_eq!(o.trust_domain, "cluster.local");
        assert_eq!(o.ca_address, "legate-ca.legate-system.svc:15012");
        assert_eq!(
            (o.proxy_uid, o.proxy_gid, o.admin_port),
            (1337, 1337, 15000)
        );
        assert!(!o.classic_sidecar);
        assert_eq!(o.admin_listen, None);
    }

    #[test]
    fn bad_flags_are_named() {
        let e = options(&["--trust-domain", "Cluster.Local"])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--trust-domain"), "{e}");
        let e = options(&["--ca-address", "legate-ca"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("HOST:PORT"), "{e}");
        let o = options(&["--image", "registry.local/legate:dev", "--classic-sidecar"]).unwrap();
        assert_eq!(o.image, "registry.local/legate:dev");
        assert!(o.classic_sidecar);
    }

    #[test]
    fn empty_input_is_reported() {
        let o = Options::new(VERSION);
        for input in ["", "\n", "# only a comment\n---\n"] {
            let result = inject(input, &o).unwrap();
            assert!(nothing_found(&result).is_some(), "{input:?}");
        }
        let result = inject("kind: Service\n", &o).unwrap();
        assert_eq!(nothing_found(&result), None);
    }

    #[test]
    fn a_moved_admin_server_moves_the_probes() {
        let mut config = Config::default();
        config.proxy.admin_listen = "0.0.0.0:9901".parse().unwrap();
        let w = Wrapper::try_parse_from(["inject"]).unwrap();
        let o = w.args.options(&config).unwrap();
        assert_eq!(o.admin_port, 9901);
        assert_eq!(o.admin_listen.as_deref(), Some("0.0.0.0:9901"));
    }
}
