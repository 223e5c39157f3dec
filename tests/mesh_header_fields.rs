//! HTTP/1.1 heads with more header fields than the usual limit of 100,
//! end to end: refused by default (a request with 431 from the proxy that
//! reads it, an answer with 502 from the server's proxy), each refusal's
//! log line naming `proxy.http.max_header_fields`, and carried both ways,
//! over the mesh and from a client outside it, once that key is raised;
//! past the default, an answer is also held to the HTTP/2 header list the
//! mesh carries, but only when it crosses the mesh.

mod common;

use std::time::Duration;

use common::*;
use legate_testbed::Pod;

const PORT: u16 = 8080;
/// More fields than the default allows, in requests and answers alike.
const FIELDS: usize = 150;
const KEY: &str = "proxy.http.max_header_fields";

/// A scripted server in a meshed pod, a meshed client and a client outside
/// the mesh; both proxies get `set`.
fn setup(set: &[&str]) -> (Mesh, MeshedPod, MeshedPod, Pod, Scripted) {
    let mesh = Mesh::new(&[]);
    let opts = PodOptions {
        proxy_set: set.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let server = mesh.meshed_pod("server", opts.clone());
    let client = mesh.meshed_pod("client", opts);
    let outsider = mesh.plain_pod("outsider");
    let app = Scripted::start(&server.pod, PORT);
    (mesh, server, client, outsider, app)
}

/// curl's arguments for a GET of `path` with `fields` header fields of
/// its own (`x-asked-001: q 1` and on) beside curl's Host, User-Agent and
/// Accept.
fn get_with_fields(server: &MeshedPod, path: &str, fields: usize) -> Vec<String> {
    let mut args = Vec::new();
    for i in 1..=fields {
        args.push("-H".to_owned());
        args.push(format!("x-asked-{i:03}: q {i}"));
    }
    args.push(format!("http://{}:{PORT}{path}", server.pod.ip()));
    args
}

fn send(pod: &Pod, args: &[String]) -> Reply {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    request(pod, &args)
}

/// How many of the answer's fields the application added.
fn answered_fields(r: &Reply) -> usize {
    r.headers
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-answer-"))
        .count()
}

/// How many of the request's own fields reached the application, which
/// echoes the fields it got as JSON.
fn asked_fields_seen(r: &Reply) -> usize {
    r.body.matches("\"x-asked-").count()
}

/// Waits for a line on `pod`'s proxy log that has all of `needles`.
fn logged(pod: &MeshedPod, needles: &[&str]) -> bool {
    for _ in 0..50 {
        if pod
            .proxy
            .stderr()
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn more_than_100_fields_cross_the_mesh_both_ways_once_the_limit_is_raised() {
    let (_mesh, server, client, outsider, _app) = setup(&["proxy.http.max_header_fields=200"]);
    let path = format!("/fields/{FIELDS}");

    // Over the mesh: the client's proxy takes the request, the server's
    // proxy the answer.
    let r = send(&client.pod, &get_with_fields(&server, &path, FIELDS));
    assert_eq!(
        r.status,
        200,
        "{r:?}\n{}\n{}",
        client.proxy.stderr(),
        server.proxy.stderr()
    );
    assert_eq!(asked_fields_seen(&r), FIELDS, "{}", r.body);
    assert_eq!(answered_fields(&r), FIELDS, "{}", r.headers);
    assert_eq!(r.header("x-answer-150").as_deref(), Some("a 150"));
    assert!(r.body.contains("\"x-asked-150\": \"q 150\""), "{}", r.body);

    // From outside the mesh, to the server's proxy alone.
    let r = send(&outsider, &get_with_fields(&server, &path, FIELDS));
    assert_eq!(r.status, 200, "{r:?}\n{}", server.proxy.stderr());
    assert_eq!(asked_fields_seen(&r), FIELDS, "{}", r.body);
    assert_eq!(answered_fields(&r), FIELDS, "{}", r.headers);

    // Up to the limit and no further: 197 of the request's own and curl's
    // three make 200.
    let r = send(&client.pod, &get_with_fields(&server, "/headers", 197));
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(&client.pod, &get_with_fields(&server, "/headers", 198));
    assert_eq!(r.status, 431, "{r:?}");
}

#[test]
fn more_than_100_fields_are_refused_by_default_and_the_log_names_the_key() {
    let (_mesh, server, client, outsider, _app) = setup(&[]);

    // The hundred hyper and Envoy take: 97 and curl's three.
    let r = send(&client.pod, &get_with_fields(&server, "/headers", 97));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(asked_fields_seen(&r), 97);

    // A request with more: 431 from the client's proxy, before the mesh.
    let r = send(&client.pod, &get_with_fields(&server, "/headers", FIELDS));
    assert_eq!(r.status, 431, "{r:?}");
    assert!(
        logged(&client, &["431", KEY]),
        "the client's proxy did not say which key to raise:\n{}",
        client.proxy.stderr()
    );

    // An answer with more: 502 from the server's proxy.
    let r = send(
        &client.pod,
        &get_with_fields(&server, &format!("/fields/{FIELDS}"), 0),
    );
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(
        r.header("legate-error").as_deref(),
        Some("application_error")
    );
    assert!(
        logged(&server, &["request to the application failed", KEY]),
        "the server's proxy did not say which key to raise:\n{}",
        server.proxy.stderr()
    );

    // From outside the mesh: 431 from the server's proxy.
    let r = send(&outsider, &get_with_fields(&server, "/headers", FIELDS));
    assert_eq!(r.status, 431, "{r:?}");
    assert!(
        logged(&server, &["431", "client's request head", KEY]),
        "{}",
        server.proxy.stderr()
    );
}

/// 900 fields of 40 bytes: a head of about 50 KB, within the 60 KiB an
/// answer's head may take, but 76 KB of HTTP/2 header list (32 bytes more
/// for each field), past the 64 KiB the mesh carries.
const WIDE: &str = "/fields/900/40";

#[test]
fn an_answer_too_large_for_the_mesh_is_refused_only_where_it_would_cross_it() {
    let (mesh, server, client, outsider, _app) = setup(&["proxy.http.max_header_fields=1000"]);
    // Through the mesh: the server's proxy refuses it with a reason,
    // where the client's proxy would have had a stream reset.
    let r = send(&client.pod, &get_with_fields(&server, WIDE, 0));
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        logged(
            &server,
            &["request to the application failed", "header list"]
        ),
        "{}",
        server.proxy.stderr()
    );

    // To a client outside the mesh the server's proxy answers over
    // HTTP/1.1, which has no such list.
    let r = send(&outsider, &get_with_fields(&server, WIDE, 0));
    assert_eq!(r.status, 200, "{r:?}\n{}", server.proxy.stderr());
    assert_eq!(answered_fields(&r), 900, "{}", r.headers);

    // From a server outside the mesh the answer goes straight back to the
    // application over HTTP/1.1, as it would without the proxy.
    let outside = mesh.plain_pod("outside-server");
    let _outside_app = Scripted::start(&outside, PORT);
    let url = format!("http://{}:{PORT}{WIDE}", outside.ip());
    let r = request(&client.pod, &[url.as_str()]);
    assert_eq!(r.status, 200, "{r:?}\n{}", client.proxy.stderr());
    assert_eq!(answered_fields(&r), 900, "{}", r.headers);
    let last = format!("a 900{}", "a".repeat(35));
    assert_eq!(r.header("x-answer-900").as_deref(), Some(last.as_str()));
}
