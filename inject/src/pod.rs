//! What gets added to a pod: the `legate-init` container, the
//! `legate-proxy` sidecar, and the two volumes the sidecar reads its
//! identity from.
//!
//! The sidecar is a *native sidecar* by default: an init container with
//! `restartPolicy: Always`, placed right after `legate-init` and before the
//! pod's own init containers (Kubernetes 1.29 and later). The kubelet
//! starts it, waits for its startup probe (a certificate in hand), and
//! only then starts the next init container, so the application's first
//! connection already goes through a ready proxy. It is stopped after the
//! application's containers, and it does not keep a Job from completing.
//!
//! With `--classic-sidecar` (clusters before 1.29) the proxy is instead the
//! first regular container, with a `postStart` hook running
//! `legate wait-ready`: the kubelet starts containers in order and waits
//! for each one's `postStart` before starting the next, which holds the
//! application back until the proxy is ready. Init containers of the
//! application then run before any proxy exists, and a Job never completes
//! on its own because the proxy keeps running.

use saphyr::Yaml;

use crate::annotations::{Setting, Target};
use crate::node::{map, plain, seq, string};

pub const INIT_NAME: &str = "legate-init";
pub const PROXY_NAME: &str = "legate-proxy";
pub const TOKEN_VOLUME: &str = "legate-token";
pub const BUNDLE_VOLUME: &str = "legate-bundle";
/// The ConfigMap holding the mesh's trust bundle, in each meshed namespace.
pub const BUNDLE_CONFIGMAP: &str = "legate-trust-bundle";
pub const TOKEN_DIR: &str = "/var/run/secrets/legate";
pub const TOKEN_FILE: &str = "/var/run/secrets/legate/token";
pub const BUNDLE_DIR: &str = "/etc/legate/bundle";
pub const BUNDLE_FILE: &str = "/etc/legate/bundle/bundle.pem";
/// The audience of the projected ServiceAccount token; the CA's
/// TokenReview asks for exactly this one, so a token minted for the API
/// server (or anything else) is not accepted.
pub const TOKEN_AUDIENCE: &str = "legate";
/// Short, so that a leaked token is soon useless; the kubelet refreshes it
/// at 80% of its lifetime and the proxy re-reads it on every renewal.
pub const TOKEN_SECONDS: u32 = 3600;

/// How the added containers are configured: the same for every pod in a
/// run of `legate inject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The image with `legate` at `/usr/local/bin/legate`.
    pub image: String,
    /// Written into the `legate.dev/injected` annotation.
    pub version: String,
    pub trust_domain: String,
    /// The CA's address as pods reach it, `host:port`.
    pub ca_address: String,
    /// Proxy as a regular container with a `postStart` hook (before 1.29).
    pub classic_sidecar: bool,
    /// The proxy's uid and gid, exempt from capture.
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// The admin server's port, for the probes.
    pub admin_port: u16,
    /// Set when the admin address is not the default, so the proxy in the
    /// pod listens where the probes look.
    pub admin_listen: Option<String>,
}

impl Options {
    /// The defaults for a given legate version: its image on ghcr.io, trust
    /// domain `cluster.local`, the CA in `legate-system`.
    pub fn new(version: &str) -> Self {
        Options {
            image: format!("ghcr.io/legate-mesh/legate:{version}"),
            version: version.to_owned(),
            trust_domain: "cluster.local".into(),
            ca_address: "legate-ca.legate-system.svc:15012".into(),
            classic_sidecar: false,
            proxy_uid: 1337,
            proxy_gid: 1337,
            admin_port: 15000,
            admin_listen: None,
        }
    }
}

fn env<'i>(name: &str, value: &str) -> Yaml<'i> {
    map([("name", plain(name)), ("value", string(value))])
}

fn field_env<'i>(name: &str, path: &str) -> Yaml<'i> {
    map([
        ("name", plain(name)),
        (
            "valueFrom",
            map([(
                "fieldRef",
                map([("apiVersion", plain("v1")), ("fieldPath", plain(path))]),
            )]),
        ),
    ])
}

fn http_probe<'i>(path: &str, port: u16, extra: Vec<(&'static str, Yaml<'i>)>) -> Yaml<'i> {
    let mut entries = vec![(
        "httpGet",
        map([("path", plain(path)), ("port", plain(port.to_string()))]),
    )];
    entries.extend(extra);
    map(entries)
}

fn settings_env<'i>(settings: &[(&'static Setting, String)], target: Target) -> Vec<Yaml<'i>> {
    settings
        .iter()
        .filter(|(s, _)| s.container.reaches(target))
        .map(|(s, v)| env(s.env, v))
        .collect()
}

/// The `legate-init` container: installs the interception rules as root
/// with only the two network capabilities, then exits.
pub(crate) fn init_container<'i>(o: &Options, settings: &[(&'static Setting, String)]) -> Yaml<'i> {
    let mut envs = vec![
        env("LEGATE_PROXY_UID", &o.proxy_uid.to_string()),
        env("LEGATE_PROXY_GID", &o.proxy_gid.to_string()),
    ];
    envs.extend(settings_env(settings, Target::Init));
    map([
        ("name", plain(INIT_NAME)),
        ("image", string(o.image.as_str())),
        ("args", seq([plain("init")])),
        ("env", seq(envs)),
        (
            "resources",
            map([
                (
                    "requests",
                    map([("cpu", string("10m")), ("memory", string("16Mi"))]),
                ),
                ("limits", map([("memory", string("64Mi"))])),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsUser", plain("0")),
                ("runAsNonRoot", plain("false")),
                ("privileged", plain("false")),
                ("allowPrivilegeEscalation", plain("false")),
                (
                    "capabilities",
                    map([
                        ("add", seq([plain("NET_ADMIN"), plain("NET_RAW")])),
                        ("drop", seq([plain("ALL")])),
                    ]),
                ),
            ]),
        ),
    ])
}

/// The `legate-proxy` sidecar.
pub(crate) fn proxy_container<'i>(
    o: &Options,
    settings: &[(&'static Setting, String)],
    resources: &[String; 3],
) -> Yaml<'i> {
    let mut envs = vec![
        field_env("LEGATE_IDENTITY_NAMESPACE", "metadata.namespace"),
        field_env("LEGATE_IDENTITY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env("LEGATE_IDENTITY_TRUST_DOMAIN", &o.trust_domain),
        env("LEGATE_IDENTITY_CA_ADDRESS", &o.ca_address),
        env("LEGATE_IDENTITY_TOKEN_FILE", TOKEN_FILE),
        env("LEGATE_IDENTITY_CA_BUNDLE", BUNDLE_FILE),
        env("LEGATE_PROXY_UID", &o.proxy_uid.to_string()),
        env("LEGATE_PROXY_GID", &o.proxy_gid.to_string()),
    ];
    if let Some(listen) = &o.admin_listen {
        envs.push(env("LEGATE_PROXY_ADMIN_LISTEN", listen));
    }
    envs.extend(settings_env(settings, Target::Proxy));
    let [cpu_request, memory_request, memory_limit] = resources;

    let mut c: Vec<(&'static str, Yaml<'i>)> = vec![
        ("name", plain(PROXY_NAME)),
        ("image", string(o.image.as_str())),
        ("args", seq([plain("proxy")])),
    ];
    if !o.classic_sidecar {
        c.push(("restartPolicy", plain("Always")));
    }
    c.extend([
        ("env", seq(envs)),
        (
            "ports",
            seq([map([
                ("name", plain("legate-admin")),
                ("containerPort", plain(o.admin_port.to_string())),
                ("protocol", plain("TCP")),
            ])]),
        ),
        (
            "resources",
            map([
                (
                    "requests",
                    map([
                        ("cpu", string(cpu_request.as_str())),
                        ("memory", string(memory_request.as_str())),
                    ]),
                ),
                ("limits", map([("memory", string(memory_limit.as_str()))])),
            ]),
        ),
        (
            "volumeMounts",
            seq([
                map([
                    ("name", plain(TOKEN_VOLUME)),
                    ("mountPath", plain(TOKEN_DIR)),
                    ("readOnly", plain("true")),
                ]),
                map([
                    ("name", plain(BUNDLE_VOLUME)),
                    ("mountPath", plain(BUNDLE_DIR)),
                    ("readOnly", plain("true")),
                ]),
            ]),
        ),
        // Up to two minutes to obtain the first certificate.
        (
            "startupProbe",
            http_probe(
                "/ready",
                o.admin_port,
                vec![
                    ("periodSeconds", plain("1")),
                    ("failureThreshold", plain("120")),
                ],
            ),
        ),
        (
            "readinessProbe",
            http_probe("/ready", o.admin_port, vec![("periodSeconds", plain("5"))]),
        ),
        (
            "livenessProbe",
            http_probe("/live", o.admin_port, vec![("periodSeconds", plain("10"))]),
        ),
    ]);
    if o.classic_sidecar {
        c.push((
            "lifecycle",
            map([(
                "postStart",
                map([(
                    "exec",
                    map([("command", seq([plain("legate"), plain("wait-ready")]))]),
                )]),
            )]),
        ));
    }
    c.push((
        "securityContext",
        map([
            ("runAsUser", plain(o.proxy_uid.to_string())),
            ("runAsGroup", plain(o.proxy_gid.to_string())),
            ("runAsNonRoot", plain("true")),
            ("readOnlyRootFilesystem", plain("true")),
            ("allowPrivilegeEscalation", plain("false")),
            ("capabilities", map([("drop", seq([plain("ALL")]))])),
        ]),
    ));
    map(c)
}

/// The projected ServiceAccount token and the trust bundle.
pub(crate) fn volumes<'i>() -> [Yaml<'i>; 2] {
    [
        map([
            ("name", plain(TOKEN_VOLUME)),
            (
                "projected",
                map([(
                    "sources",
                    seq([map([(
                        "serviceAccountToken",
                        map([
                            ("audience", plain(TOKEN_AUDIENCE)),
                            ("expirationSeconds", plain(TOKEN_SECONDS.to_string())),
                            ("path", plain("token")),
                        ]),
                    )])]),
                )]),
            ),
        ]),
        map([
            ("name", plain(BUNDLE_VOLUME)),
            ("configMap", map([("name", plain(BUNDLE_CONFIGMAP))])),
        ]),
    ]
}
