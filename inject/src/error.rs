//! Why injection failed. Every error about the input names the document
//! (counted from 1, in file order) and the line it starts on, so that the
//! operator can find it in a long multi-document file.

use std::path::PathBuf;

/// Where a problem is: which document, on which line, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// 1-based index of the document in the stream (empty documents and
    /// comment-only sections are not counted).
    pub document: usize,
    /// 1-based line of the input.
    pub line: usize,
    /// `Deployment shop/web`, or `document` when it has no kind and name.
    pub what: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "document {} ({}, line {})",
            self.document, self.what, self.line
        )
    }
}

/// Everything `legate inject` can refuse.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("cannot read {}: {source}; check the path given with -f", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot read the manifests from standard input: {0}")]
    Stdin(#[source] std::io::Error),

    #[error("cannot write to standard output: {0}")]
    Write(#[source] std::io::Error),

    #[error("the input is not UTF-8 text (byte {offset}); Kubernetes manifests are UTF-8 YAML")]
    NotUtf8 { offset: usize },

    #[error("document {document}: invalid YAML at line {line}, column {column}: {message}")]
    Syntax {
        document: usize,
        line: usize,
        column: usize,
        message: String,
    },

    #[error("{at}: hostNetwork is true, so legate does not inject it: the iptables rules `legate init` installs would capture the node's own traffic, not just this pod's. Leave the workload out of the mesh with the pod annotation legate.dev/inject: \"false\"")]
    HostNetwork { at: Location },

    #[error("{at}: YAML merge keys (`<<`) are not supported in {place} (one is at {path}): Kubernetes applies them, but legate would check and inject the object as if they were not there; expand them first, e.g. with `kubectl create --dry-run=client -o yaml -f FILE`, and inject the result")]
    MergeKey {
        at: Location,
        /// `an object with a pod template`, or `a Kubernetes object` when
        /// the key is at the top level.
        place: &'static str,
        /// The mapping holding the key, such as `spec.template.spec`.
        path: String,
    },

    #[error("{at}: annotation {annotation}: {message}")]
    Annotation {
        at: Location,
        annotation: String,
        message: String,
    },

    #[error("{at}: {message}")]
    Shape { at: Location, message: String },

    #[error("{at}: the pod already has a {thing} named {name:?}, but no legate.dev/injected annotation; rename it, or remove it if it is a leftover of an earlier injection, and inject again")]
    Conflict {
        at: Location,
        thing: &'static str,
        name: String,
    },

    #[error("{flag} {value:?}: {message}")]
    Flag {
        flag: &'static str,
        value: String,
        message: String,
    },
}
