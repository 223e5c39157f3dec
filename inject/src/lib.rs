//! `legate inject`: adds legate's init container and sidecar to Kubernetes
//! manifests. YAML in, YAML out, nothing else: no cluster access, no
//! webhook, so the result can be reviewed, diffed and committed.
//!
//! ```text
//! legate inject -f app.yaml | kubectl apply -f -
//! ```
//!
//! Every document of a multi-document stream is handled on its own, in
//! order:
//!
//! - a Pod, or the pod template of a Deployment, StatefulSet, DaemonSet,
//!   ReplicaSet, ReplicationController, Job or CronJob (and the same kinds
//!   inside a `kind: List`) gets the `legate-init` container, the
//!   `legate-proxy` sidecar, their two volumes and the annotation
//!   `legate.dev/injected: "<version>"` ([`pod`] says what they are);
//! - a pod that already carries that annotation, or opts out with
//!   `legate.dev/inject: "false"`, is left as it is, so running inject
//!   twice gives the same output as running it once;
//! - a pod with `hostNetwork: true` is refused: its iptables rules would
//!   capture the node's traffic; `!!bool true` counts as `true`;
//! - an object with a pod template that holds a YAML merge key (`<<`), and
//!   any object with one at its top level, is refused: Kubernetes applies
//!   merge keys and this crate does not, so the checks above could be
//!   judging a pod other than the one that would run;
//! - every other document (Services, ConfigMaps, partial objects such as
//!   patches) is passed through; kinds that hold pods legate does not
//!   inject (PodList, PodTemplate, custom kinds with `spec.template`) are
//!   passed through with a warning.
//!
//! A document that is not changed is written back byte for byte, comments
//! included (the `split` module explains how). A changed document is
//! written back with its key order and the exact text of every scalar, and
//! with the comments above it, but without the comments inside it; the
//! `emit` module lists what is and is not kept.
//!
//! The annotations a workload can set are in [`annotations`].

#![forbid(unsafe_code)]

pub mod annotations;
pub mod cli;
mod emit;
mod error;
mod node;
pub mod pod;
mod split;

use saphyr::{Mapping, Yaml, YamlLoader};
use saphyr_parser::Parser;

pub use error::{InjectError, Location};
pub use pod::Options;

use annotations::{Annotations, INJECTED};
use node::{as_map, as_map_mut, as_seq, as_seq_mut, entry, get, get_mut, is_true, text};

/// The version written into `legate.dev/injected` and the default image tag.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What happened to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The init container and sidecar were added.
    Injected,
    /// It already had `legate.dev/injected`; left as it is.
    AlreadyInjected,
    /// `legate.dev/inject: "false"`; left as it is.
    OptedOut,
    /// A kind with a pod template, but without a complete one (no
    /// containers), such as a patch; left as it is.
    Incomplete,
    /// A kind without a pod template; passed through.
    NoPodTemplate,
    /// A kind that holds pods but that legate does not inject (a PodList,
    /// a PodTemplate, a custom kind with `spec.template`); passed through,
    /// which the operator should hear about: its pods run outside the mesh.
    Unsupported,
}

/// One object's outcome, for the operator's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub at: Location,
    pub kind: String,
    pub action: Action,
}

/// The rewritten stream and what was done to each object.
#[derive(Debug, Clone)]
pub struct Injected {
    pub text: String,
    pub reports: Vec<Report>,
}

/// Injects every pod in `input`, a stream of YAML documents.
pub fn inject(input: &str, opts: &Options) -> Result<Injected, InjectError> {
    let mut out = String::with_capacity(input.len() * 2);
    let mut reports = Vec::new();
    let mut index = 0;
    for chunk in split::split(input) {
        let Some(mut doc) = parse(&chunk, index + 1)? else {
            out.push_str(chunk.text);
            continue;
        };
        index += 1;
        let line = chunk.first_line + split::content_line(chunk.text) - 1;
        let at = Location {
            document: index,
            line,
            what: describe(&doc),
        };
        let changed = if is_list(&doc) {
            no_top_merge_key(&doc, &at)?;
            let mut changed = false;
            if let Some(items) = as_map_mut(&mut doc)
                .and_then(|m| get_mut(m, "items"))
                .and_then(as_seq_mut)
            {
                for (i, item) in items.iter_mut().enumerate() {
                    let at = Location {
                        what: format!("List item {} ({})", i + 1, describe(item)),
                        ..at.clone()
                    };
                    changed |= object(item, &at, opts, &mut reports)?;
                }
            }
            changed
        } else {
            object(&mut doc, &at, opts, &mut reports)?
        };
        if changed {
            out.push_str(&split::header(chunk.text));
            emit::document(&doc, &mut out).map_err(|e| InjectError::Shape {
                at: at.clone(),
                message: format!("cannot be written back: {e}"),
            })?;
            if split::has_end_marker(chunk.text) {
                out.push_str("...\n");
            }
        } else {
            out.push_str(chunk.text);
        }
    }
    Ok(Injected { text: out, reports })
}

/// Parses one piece of the stream; `None` when it holds no document (only
/// comments, or an empty document).
fn parse<'a>(chunk: &split::Chunk<'a>, document: usize) -> Result<Option<Yaml<'a>>, InjectError> {
    let syntax = |e: &saphyr::ScanError| InjectError::Syntax {
        document,
        line: chunk.first_line + e.marker().line().saturating_sub(1),
        column: e.marker().col() + 1,
        message: e.info().to_owned(),
    };
    let mut loader: YamlLoader<'a, Yaml<'a>> = YamlLoader::default();
    // Keep every scalar as written: see `node`.
    loader.early_parse(false);
    Parser::new_from_str(chunk.text)
        .load(&mut loader, true)
        .map_err(|e| syntax(&e))?;
    if let Some(e) = loader.error() {
        return Err(syntax(e));
    }
    let mut docs = loader.into_documents();
    match docs.len() {
        0 => Ok(None),
        1 => Ok(Some(docs.remove(0)).filter(|d| !matches!(d, Yaml::BadValue))),
        _ => Err(InjectError::Syntax {
            document,
            line: chunk.first_line,
            column: 1,
            message: "more than one document where one was expected; separate documents with a line holding only ---".into(),
        }),
    }
}

fn is_list(doc: &Yaml<'_>) -> bool {
    as_map(doc)
        .and_then(|m| get(m, "kind"))
        .and_then(text)
        .is_some_and(|k| k == "List")
}

/// `Deployment shop/web`, for messages.
fn describe(doc: &Yaml<'_>) -> String {
    let Some(m) = as_map(doc) else {
        return "not a mapping".into();
    };
    let kind = get(m, "kind")
        .and_then(text)
        .unwrap_or("object without kind");
    let meta = get(m, "metadata").and_then(as_map);
    let field = |k: &str| meta.and_then(|meta| get(meta, k)).and_then(text);
    match (field("namespace"), field("name").or(field("generateName"))) {
        (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => kind.to_owned(),
    }
}

/// Where a kind keeps its pod template, or `None` for kinds without one.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Whether an object of a kind without a known pod template still looks
/// like it holds pods: a PodList or PodTemplate, or any kind with
/// `spec.template` (a custom workload such as a rollout).
fn holds_pods(kind: &str, doc: &Yaml<'_>) -> bool {
    matches!(kind, "PodList" | "PodTemplate")
        || as_map(doc)
            .and_then(|m| get(m, "spec"))
            .and_then(as_map)
            .and_then(|spec| get(spec, "template"))
            .is_some_and(|t| as_map(t).is_some())
}

fn annotations_of<'i>(m: &Mapping<'i>) -> Option<Mapping<'i>> {
    get(m, "metadata")
        .and_then(as_map)
        .and_then(|meta| get(meta, "annotations"))
        .and_then(as_map)
        .cloned()
}

/// Injects one object; returns whether it changed.
fn object(
    doc: &mut Yaml<'_>,
    at: &Location,
    o: &Options,
    reports: &mut Vec<Report>,
) -> Result<bool, InjectError> {
    let shape = |message: String| InjectError::Shape {
        at: at.clone(),
        message,
    };
    let kind = as_map(doc)
        .and_then(|m| get(m, "kind"))
        .and_then(text)
        .unwrap_or_default()
        .to_owned();
    let mut report = |action| {
        reports.push(Report {
            at: at.clone(),
            kind: kind.clone(),
            action,
        })
    };
    no_top_merge_key(doc, at)?;
    let Some(path) = template_path(&kind) else {
        report(if holds_pods(&kind, doc) {
            Action::Unsupported
        } else {
            Action::NoPodTemplate
        });
        return Ok(false);
    };
    // Anywhere inside an object with a pod template, a merge key may supply
    // `hostNetwork`, the annotations or the containers the checks below
    // look for, and Kubernetes would see them where this tree does not.
    if let Some(path) = merge_key(doc, "") {
        return Err(InjectError::MergeKey {
            at: at.clone(),
            place: "an object with a pod template",
            path,
        });
    }
    let workload_annotations = as_map(doc).and_then(annotations_of);
    let prefix: String = path.iter().map(|p| format!("{p}.")).collect();

    // Find the pod template; a partial object (a patch) is left alone.
    let mut t = &mut *doc;
    for key in path {
        match as_map_mut(t).and_then(|m| get_mut(m, key)) {
            Some(next) => t = next,
            None => {
                report(Action::Incomplete);
                return Ok(false);
            }
        }
    }
    let Some(template) = as_map_mut(t) else {
        return Err(shape(format!(
            "{} is not a mapping",
            prefix.trim_end_matches('.')
        )));
    };
    let Some(spec) = get(template, "spec").and_then(as_map) else {
        report(Action::Incomplete);
        return Ok(false);
    };
    let containers = match get(spec, "containers") {
        None => {
            report(Action::Incomplete);
            return Ok(false);
        }
        Some(c) => {
            as_seq(c).ok_or_else(|| shape(format!("{prefix}spec.containers is not a list")))?
        }
    };
    if containers.is_empty() {
        report(Action::Incomplete);
        return Ok(false);
    }
    let first_container = containers
        .first()
        .and_then(as_map)
        .and_then(|c| get(c, "name"))
        .and_then(text)
        .map(str::to_owned);

    let pod_annotations = annotations_of(template);
    let ann = Annotations {
        pod: pod_annotations.as_ref(),
        workload: workload_annotations.as_ref(),
    };
    let bad = |(annotation, message): annotations::Bad| InjectError::Annotation {
        at: at.clone(),
        annotation,
        message,
    };
    if ann.opted_out().map_err(bad)? {
        report(Action::OptedOut);
        return Ok(false);
    }
    if pod_annotations
        .as_ref()
        .is_some_and(|m| get(m, INJECTED).is_some())
    {
        report(Action::AlreadyInjected);
        return Ok(false);
    }
    if let Some(b) = ann.unknown() {
        return Err(bad(b));
    }
    if get(spec, "hostNetwork").is_some_and(is_true) {
        return Err(InjectError::HostNetwork { at: at.clone() });
    }
    let settings = ann.settings().map_err(bad)?;
    let resources = ann.resources().map_err(bad)?;
    check_names(spec, at, &prefix)?;

    // Everything is checked; change the pod.
    let meta = entry(template, "metadata", node::map([]), Some("spec"));
    let meta = meta
        .and_then(as_map_mut)
        .ok_or_else(|| shape(format!("{prefix}metadata is not a mapping")))?;
    let annotations = entry(meta, "annotations", node::map([]), None);
    let annotations = annotations
        .and_then(as_map_mut)
        .ok_or_else(|| shape(format!("{prefix}metadata.annotations is not a mapping")))?;
    annotations.insert(node::plain(INJECTED), node::string(o.version.as_str()));
    if o.classic_sidecar {
        // The proxy becomes the first container; keep `kubectl logs` and
        // `kubectl exec` pointed at the application.
        const DEFAULT: &str = "kubectl.kubernetes.io/default-container";
        if let (None, Some(name)) = (get(annotations, DEFAULT), &first_container) {
            annotations.insert(node::plain(DEFAULT), node::string(name.as_str()));
        }
    }

    let spec = get_mut(template, "spec")
        .and_then(as_map_mut)
        .ok_or_else(|| shape(format!("{prefix}spec is not a mapping")))?;
    let init = pod::init_container(o, &settings);
    let proxy = pod::proxy_container(o, &settings, &resources);
    let inits = entry(spec, "initContainers", node::seq([]), Some("containers"));
    let inits = inits
        .and_then(as_seq_mut)
        .ok_or_else(|| shape(format!("{prefix}spec.initContainers is not a list")))?;
    if o.classic_sidecar {
        inits.insert(0, init);
        let containers = get_mut(spec, "containers")
            .and_then(as_seq_mut)
            .ok_or_else(|| shape(format!("{prefix}spec.containers is not a list")))?;
        containers.insert(0, proxy);
    } else {
        inits.insert(0, init);
        inits.insert(1, proxy);
    }
    let volumes = entry(spec, "volumes", node::seq([]), None);
    let volumes = volumes
        .and_then(as_seq_mut)
        .ok_or_else(|| shape(format!("{prefix}spec.volumes is not a list")))?;
    volumes.extend(pod::volumes());
    report(Action::Injected);
    Ok(true)
}

/// Refuses a merge key at the top level of any object: it may supply the
/// `kind` (or a List's `items`), so not even the kind read without it can
/// be trusted to say that the object holds no pods.
fn no_top_merge_key(doc: &Yaml<'_>, at: &Location) -> Result<(), InjectError> {
    match as_map(doc) {
        Some(m) if m.keys().any(node::is_merge_key) => Err(InjectError::MergeKey {
            at: at.clone(),
            place: "a Kubernetes object",
            path: "the top level".into(),
        }),
        _ => Ok(()),
    }
}

/// Where in `node` the first merge key is: the dotted path of the mapping
/// that holds it (`spec.template.spec`, `spec.containers[0]`), or `None`.
fn merge_key(node: &Yaml<'_>, path: &str) -> Option<String> {
    let here = || {
        if path.is_empty() {
            "the top level".to_owned()
        } else {
            path.to_owned()
        }
    };
    if let Some(m) = as_map(node) {
        for (k, v) in m {
            if node::is_merge_key(k) {
                return Some(here());
            }
            let key = text(k).unwrap_or("?");
            let inner = if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            };
            if let Some(found) = merge_key(v, &inner) {
                return Some(found);
            }
        }
    } else if let Some(items) = as_seq(node) {
        for (i, item) in items.iter().enumerate() {
            if let Some(found) = merge_key(item, &format!("{path}[{i}]")) {
                return Some(found);
            }
        }
    }
    None
}

/// Refuses a pod that already uses the names legate adds.
fn check_names(spec: &Mapping<'_>, at: &Location, prefix: &str) -> Result<(), InjectError> {
    let names = |key: &str| -> Vec<String> {
        get(spec, key)
            .and_then(as_seq)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|c| as_map(c).and_then(|c| get(c, "name")).and_then(text))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    for key in ["initContainers", "containers", "volumes"] {
        if get(spec, key).is_some_and(|v| as_seq(v).is_none() && !node::is_null(v)) {
            return Err(InjectError::Shape {
                at: at.clone(),
                message: format!("{prefix}spec.{key} is not a list"),
            });
        }
    }
    let containers = names("initContainers")
        .into_iter()
        .chain(names("containers"));
    for name in containers {
        if name == pod::INIT_NAME || name == pod::PROXY_NAME {
            return Err(InjectError::Conflict {
                at: at.clone(),
                thing: "container",
                name,
            });
        }
    }
    for name in names("volumes") {
        if name == pod::TOKEN_VOLUME || name == pod::BUNDLE_VOLUME {
            return Err(InjectError::Conflict {
                at: at.clone(),
                thing: "volume",
                name,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(yaml: &str) -> Result<Injected, InjectError> {
        inject(yaml, &Options::new("0.1.0"))
    }

    const POD: &str = "kind: Pod\nmetadata: {name: web}\n";

    #[test]
    fn merge_keys_are_refused_where_they_could_hide_anything() {
        let refused = [
            // hostNetwork that Kubernetes applies and the check would miss.
            format!("{POD}spec:\n  <<: {{hostNetwork: true}}\n  containers: [{{name: app}}]\n"),
            // An annotation hidden from validation.
            "x: &ann {legate.dev/mod: strict}\nkind: Pod\nmetadata:\n  annotations: {<<: *ann}\nspec:\n  containers: [{name: app}]\n"
                .to_owned(),
            // Containers that would be missed as "no containers".
            "b: &b {containers: [{name: app}]}\nkind: Deployment\nspec:\n  template:\n    spec: {<<: *b}\n"
                .to_owned(),
            // A kind supplied by a merge key.
            "<<: {kind: Pod}\nspec:\n  containers: [{name: app}]\n".to_owned(),
            // The same inside a List, and in a List's own top level.
            "kind: List\nitems:\n- kind: Pod\n  spec:\n    <<: {hostNetwork: true}\n    containers: [{name: app}]\n"
                .to_owned(),
            "kind: List\n<<: {items: [{kind: Pod, spec: {containers: [{name: a}]}}]}\n".to_owned(),
            // The explicit spelling of a merge key.
            format!("{POD}spec:\n  !!merge x: {{hostNetwork: true}}\n  containers: [{{name: app}}]\n"),
        ];
        for yaml in refused {
            let e = run(&yaml).expect_err(&yaml);
            assert!(matches!(e, InjectError::MergeKey { .. }), "{yaml}: {e}");
            let e = e.to_string();
            assert!(
                e.contains("`<<`") && e.contains("kubectl create --dry-run=client"),
                "{e}"
            );
        }
        let e = run(&format!(
            "{POD}spec:\n  <<: {{hostNetwork: true}}\n  containers: [{{name: app}}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("Pod web") && e.contains("(one is at spec)"),
            "{e}"
        );
        // Objects without pods keep their merge keys below the top level.
        let config = "kind: ConfigMap\nmetadata: {name: c}\ndata:\n  <<: {a: b}\n";
        assert_eq!(run(config).unwrap().text, config);
    }

    #[test]
    fn tagged_host_network_is_refused_like_plain_true() {
        for value in [
            "!!bool true",
            "!!bool \"true\"",
            "!!bool yes",
            "!<tag:yaml.org,2002:bool> on",
        ] {
            let yaml =
                format!("{POD}spec:\n  hostNetwork: {value}\n  containers: [{{name: app}}]\n");
            let e = run(&yaml).expect_err(&yaml);
            assert!(matches!(e, InjectError::HostNetwork { .. }), "{value}: {e}");
        }
        // Not booleans to Kubernetes, so not a host-network pod; the API
        // server refuses the string itself.
        for value in ["!!str true", "\"true\"", "!!bool false", "false"] {
            let yaml =
                format!("{POD}spec:\n  hostNetwork: {value}\n  containers: [{{name: app}}]\n");
            run(&yaml).unwrap_or_else(|e| panic!("{value}: {e}"));
        }
    }

    #[test]
    fn kinds_that_hold_pods_are_told_apart() {
        let yaml = "kind: PodList\nitems: []\n---\nkind: PodTemplate\ntemplate: {spec: {containers: [{name: a}]}}\n---\nkind: Rollout\nspec:\n  template: {spec: {containers: [{name: a}]}}\n---\nkind: Service\nspec: {ports: []}\n";
        let result = run(yaml).unwrap();
        assert_eq!(result.text, yaml);
        let actions: Vec<Action> = result.reports.iter().map(|r| r.action).collect();
        assert_eq!(
            actions,
            [
                Action::Unsupported,
                Action::Unsupported,
                Action::Unsupported,
                Action::NoPodTemplate
            ]
        );
    }

    #[test]
    fn tagged_null_lists_are_filled_in() {
        let yaml = format!("{POD}spec:\n  initContainers: !!null\n  volumes: !!null ''\n  containers: [{{name: app}}]\n");
        let out = run(&yaml).unwrap().text;
        assert!(out.contains("- name: legate-init"), "{out}");
    }
}
