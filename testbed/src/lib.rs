//! A small, isolated network made of Linux network namespaces, for legate's
//! end-to-end tests, benchmarks and `legate demo`.
//!
//! # The picture
//!
//! ```text
//!  bridge namespace <prefix>-br          no uplink, forwarding off
//!  +-------------------------------------------------------------+
//!  | br0  10.200.0.1/16  fd20:200::1/64                          |
//!  |  +-- v2 (alias <prefix>-client)   +-- v3 (alias <prefix>-server)
//!  +--|--------------------------------|-------------------------+
//!     | veth pair                      | veth pair
//!  +--|------------------------+    +--|------------------------+
//!  | eth0 10.200.0.2/16        |    | eth0 10.200.0.3/16        |
//!  |      fd20:200::2/64       |    |      fd20:200::3/64       |
//!  | lo; default via br0       |    | lo; default via br0       |
//!  +---------------------------+    +---------------------------+
//!  pod namespace <prefix>-client    pod namespace <prefix>-server
//! ```
//!
//! A [`Bed`] owns a bridge namespace; [`Bed::pod`] adds a [`Pod`] namespace
//! joined to the bridge by a veth pair. The pair is created inside the bed's
//! namespaces, so the host's network namespace is never changed: no
//! address, link, route or rule of the host is touched.
//!
//! # Names and addresses
//!
//! Every namespace is named `<prefix>-<something>`, with a prefix of
//! `lgt<pid>x<n>` ([`Bed::prefix`]): the pid of the test process and a
//! counter within it. Beds of many threads and many processes therefore
//! never collide, and leftovers of a dead process can be recognised.
//!
//! Pods get 10.200.0.2, .3, ... (up to .254) and fd20:200::2, ::3, ... in
//! the order they are added. Addresses repeat across beds: each bed is its
//! own layer-2 domain, so two beds never see each other. A pod can connect
//! to an address where nothing lives: inside 10.200.0.0/16 the connection
//! fails once ARP gives up; elsewhere it reaches the bridge namespace and
//! fails there, since it has no route onwards. Nothing leaves the bed.
//!
//! # Running things in a pod
//!
//! - [`Pod::command`] builds a process that enters the pod's namespace
//!   between `fork` and `exec`, optionally as another user
//!   ([`PodCommand::uid`], [`PodCommand::gid`]). [`PodCommand::spawn`] and
//!   [`Pod::spawn`] return a [`Process`] that collects its output and is
//!   killed (with its process group) when dropped; [`Pod::exec`] runs a
//!   command to completion. Only the network namespace changes: processes
//!   share the host's filesystem, `/etc/hosts` and `/sys`.
//! - [`Pod::run_in`] runs a closure on a fresh thread inside the pod. Sockets
//!   made there stay in the pod, so a test can bind a listener in one pod and
//!   use it from anywhere.
//! - [`Pod::capture`] records the pod's link with tcpdump, so a test can
//!   assert on the bytes on the wire.
//!
//! # Cleanup
//!
//! Dropping the bed (also while a panic unwinds) kills its processes and
//! removes its namespaces, which removes the veths and the bridge. SIGINT,
//! SIGTERM and SIGHUP tear down every bed of the process and then exit
//! (130, 143, 129). Namespaces left behind by a process that was SIGKILLed
//! are removed by the next bed created anywhere on the machine. Details in
//! the `cleanup` module.
//!
//! # Requirements
//!
//! Root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` from the `iproute2` package
//! and, for captures, the `tcpdump` package. Errors name what is missing.
//! Tests should call [`Bed::new`] and fail on its error rather than skip:
//! a bed that cannot be built is a broken test environment.
//!
//! # Example
//!
//! ```
//! use std::io::Read;
//! use std::net::TcpListener;
//!
//! # fn main() -> legate_testbed::Result<()> {
//! let bed = legate_testbed::Bed::new()?;
//! let client = bed.pod("client")?;
//! let server = bed.pod("server")?;
//!
//! let listener = server
//!     .run_in(|| TcpListener::bind("0.0.0.0:8080"))?
//!     .expect("bind");
//! let capture = server.capture()?;
//! client.exec(["bash", "-c", &format!("echo -n hello > /dev/tcp/{}/8080", server.ip())])?;
//! let mut received = String::new();
//! listener.accept().expect("accept").0.read_to_string(&mut received).expect("read");
//! assert_eq!(received, "hello");
//! assert!(capture.stop()?.contains("hello"));
//! # Ok(())
//! # }
//! ```

// The one unsafe block, entering a namespace between fork and exec, is in
// process.rs and allowed there explicitly.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod bed;
mod capture;
mod cleanup;
mod error;
pub mod mesh;
mod pod;
mod process;
mod sys;

pub use bed::Bed;
pub use capture::{Capture, Pcap, TcpFlow};
pub use error::{Error, Result};
pub use nix::sys::signal::Signal;
pub use pod::{wait_for_port, Pod, EXEC_TIMEOUT};
pub use process::{PodCommand, Process};

/// Checks that beds can be built here: the tools are installed, the process
/// is privileged, and a bed really comes up and goes away. The error says
/// what to fix.
pub fn available() -> Result<()> {
    sys::IP.path()?;
    Bed::new()?.close()
}

/// Names of all namespaces whose name starts with `prefix` followed by `-`,
/// that is, everything a bed with that prefix made and has not yet removed.
/// For tests of cleanup.
pub fn namespaces_of(prefix: &str) -> Result<Vec<String>> {
    let start = format!("{prefix}-");
    Ok(cleanup::list_netns()?
        .into_iter()
        .filter(|name| name.starts_with(&start))
        .collect())
}
