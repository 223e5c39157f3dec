//! Who talks to whom, and in what: meshed and non-meshed pods, permissive
//! and strict servers, per-port authorization and foreign certificates.

mod common;
mod obs_support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use obs_support::{metric, scrape};

#[test]
fn meshed_to_non_meshed_works_in_plaintext() {
    let mesh = Mesh::new(&[]);
    let client = mesh.meshed_pod("client", PodOptions::default());
    let legacy = mesh.plain_pod("legacy");
    let body = secret("plain");
    let (_srv, _site) = http_server(&legacy, 8080, &body);
    let capture = legacy.capture().expect("capture");
    let (ok, out, err) = curl(&client.pod, &[&format!("http://{}:8080/", legacy.ip())]);
    assert!(ok, "curl: {err}");
    assert_eq!(out, body);
    let pcap = capture.stop().unwrap();
    assert!(
        pcap.contains(body.as_bytes()),
        "a destination without a proxy gets the bytes as they are"
    );
    assert!(!pcap.contains(b"legate/h2"));
}

/// From `pod`, `n` connections at once to the echo server at `dst`, each
/// sending a line and reading its echo within `wait`: the ones that failed.
fn echo_burst(pod: &legate_testbed::Pod, dst: SocketAddr, n: usize, wait: Duration) -> Vec<String> {
    pod.run_in(move || {
        let conns: Vec<_> = (0..n)
            .map(|i| {
                std::thread::spawn(move || -> std::io::Result<()> {
                    let mut s = TcpStream::connect(dst)?;
                    s.set_read_timeout(Some(wait))?;
                    let line = format!("line {i}\n");
                    s.write_all(line.as_bytes())?;
                    let mut back = vec![0; line.len()];
                    s.read_exact(&mut back)?;
                    if back != line.as_bytes() {
                        return Err(std::io::Error::other("another echo"));
                    }
                    Ok(())
                })
            })
            .collect();
        conns
            .into_iter()
            .enumerate()
            .filter_map(|(i, c)| match c.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("connection {i}: {e}")),
                Err(_) => Some(format!("connection {i} panicked")),
            })
            .collect()
    })
    .expect("run in pod")
}

#[test]
fn a_destination_whose_mesh_port_drops_connects_is_reached_in_plaintext_by_every_connection() {
    let mesh = Mesh::new(&[]);
    // The probe of a destination nothing answers for waits the connect
    // timeout; longer than the echo's wait below, a second probe in the
    // way of a connection would fail it.
    let client = mesh.meshed_pod(
        "client",
        PodOptions {
            proxy_set: vec![
                "proxy.connect_timeout=6s".into(),
                "proxy.probe_ttl=3s".into(),
            ],
            ..Default::default()
        },
    );
    let legacy = mesh.plain_pod("legacy");
    legacy
        .exec([
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "15006", "-j", "DROP",
        ])
        .unwrap();
    let listener = legacy
        .run_in(|| TcpListener::bind(("0.0.0.0", 7000)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let dst = SocketAddr::new(legacy.ip().into(), 7000);

    // First contact: a burst of connections (a pool filling at start-up)
    // waits for the one probe, then every connection goes in plaintext;
    // none is reset because another connection's probe failed.
    let failed = echo_burst(&client.pod, dst, 20, Duration::from_secs(12));
    assert!(failed.is_empty(), "{failed:?}\n{}", client.proxy.stderr());

    // Once the answer's TTL has passed, connections go on in plaintext
    // at once while the destination is probed again in the background,
    // rather than one of them waiting the connect timeout.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(3500));
        let failed = echo_burst(&client.pod, dst, 5, Duration::from_secs(3));
        assert!(failed.is_empty(), "{failed:?}\n{}", client.proxy.stderr());
    }
}

#[test]
fn connections_to_a_service_address_are_spread_over_its_pods_as_without_the_mesh() {
    let mesh = Mesh::new(&[]);
    let a = mesh.meshed_pod("web-a", PodOptions::default());
    let b = mesh.meshed_pod("web-b", PodOptions::default());
    let (_web_a, _site_a) = http_server(&a.pod, 8080, "a");
    let (_web_b, _site_b) = http_server(&b.pod, 8080, "b");
    for (pod, name) in [(&a.pod, b"a"), (&b.pod, b"b")] {
        let listener = pod
            .run_in(|| TcpListener::bind(("0.0.0.0", 9000)))
            .unwrap()
            .unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.write_all(name);
            }
        });
    }
    let (client, _config) = service_client(&mesh, "client", &[]);
    let web: SocketAddr = "10.200.250.1:80".parse().unwrap();
    let raw: SocketAddr = "10.200.250.1:90".parse().unwrap();
    let pods = |port| [&a, &b].map(|p| SocketAddr::new(p.pod.ip().into(), port));
    balance(&client.pod, web, &pods(8080));
    balance(&client.pod, raw, &pods(9000));

    // Each new connection of the application's is a new choice, over the
    // mesh as without it: HTTP ...
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..24 {
        let (ok, body, err) = curl(&client.pod, &[&format!("http://{web}/")]);
        assert!(ok, "{err}\n{}", client.proxy.stderr());
        *seen.entry(body).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "HTTP answered by {seen:?}");
    // ... and opaque TCP.
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..24 {
        let got = tcp_exchange(&client.pod, raw, b"").unwrap();
        *seen
            .entry(String::from_utf8_lossy(&got).into_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "TCP answered by {seen:?}");
    // Over mTLS, each pod's proxy seeing the client's identity.
    for p in [&a, &b] {
        let text = scrape(&p.pod);
        let from_client = metric(
            &text,
            "legate_tcp_connections_opened_total",
            &[("direction", "inbound"), ("peer", client.id())],
        );
        assert!(from_client > 0.0, "{text}");
        let plaintext = metric(
            &text,
            "legate_tcp_connections_opened_total",
            &[("direction", "inbound"), ("peer", "none")],
        );
        assert_eq!(plaintext, 0.0, "{text}");
    }
    // An application connection held open has its mesh connection
    // counted apart from the pooled ones while it lasts.
    let held = client
        .pod
        .run_in(move || TcpStream::connect(web))
        .unwrap()
        .unwrap();
    let own = || {
        let text = scrape(&client.pod);
        let pooled = metric(&text, "legate_pool_connections", &[]);
        (metric(&text, "legate_own_connections", &[]), pooled)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while own() != (1.0, 0.0) {
        assert!(std::time::Instant::now() < deadline, "{:?}", own());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(held);
    // Each of those mesh connections closed with its application
    // connection, not left open to the idle timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while own() != (0.0, 0.0) {
        assert!(std::time::Instant::now() < deadline, "{:?}", own());
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in [&a, &b] {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = scrape(&p.pod);
            let active = metric(
                &text,
                "legate_tcp_connections_active",
                &[("direction", "inbound")],
            );
            if active == 0.0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn non_meshed_client_reaches_a_permissive_server_and_is_refused_by_a_strict_one() {
    let mesh = Mesh::new(&[]);
    let permissive = mesh.meshed_pod("open", PodOptions::default());
    let strict = mesh.meshed_pod(
        "locked",
        PodOptions {
            proxy_set: vec!["proxy.mode=strict".into()],
            ..Default::default()
        },
    );
    let outsider = mesh.plain_pod("outsider");
    let (_a, _sa) = http_server(&permissive.pod, 8080, "open door");
    let (_b, _sb) = http_server(&strict.pod, 8080, "locked door");

    let (ok, out, err) = curl(
        &outsider,
        &[&format!("http://{}:8080/", permissive.pod.ip())],
    );
    assert!(ok && out == "open door", "permissive: {err}");
    let (ok, _, err) = curl(&outsider, &[&format!("http://{}:8080/", strict.pod.ip())]);
    assert!(!ok, "a strict server let a client outside the mesh in");
    assert!(
        err.contains("reset") || err.contains("Empty reply") || err.contains("Recv failure"),
        "{err}"
    );
    assert!(
        strict.proxy.stderr().contains("strict"),
        "the refusal is logged with the reason"
    );

    // A meshed client still gets in.
    let client = mesh.meshed_pod("friend", PodOptions::default());
    let (ok, out, err) = curl(&client.pod, &[&format!("http://{}:8080/", strict.pod.ip())]);
    assert!(
        ok && out == "locked door",
        "meshed client to strict server: {err}"
    );
}

#[test]
fn an_identity_outside_the_ports_policy_is_refused_and_logged() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod(
        "vault",
        PodOptions {
            proxy_set: vec![format!(
                "proxy.authz=[{{ ports = \"8080\", allow = [\"spiffe://{TRUST_DOMAIN}/teller\"] }}]"
            )],
            ..Default::default()
        },
    );
    let (_srv, _site) = http_server(&server.pod, 8080, "gold");
    let teller = mesh.meshed_pod("teller", PodOptions::default());
    let robber = mesh.meshed_pod("robber", PodOptions::default());
    let url = format!("http://{}:8080/", server.pod.ip());

    let (ok, out, err) = curl(&teller.pod, &[&url]);
    assert!(ok && out == "gold", "allowed identity: {err}");

    let (_, out, _) = curl(&robber.pod, &["-i", &url]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("legate-error:"),
        "the proxy marks its own answer: {out}"
    );
    let log = server.proxy.stderr();
    assert!(
        log.lines().any(|l| l.contains("authorization policy")
            && l.contains(robber.id())
            && l.contains(server.id())),
        "the refusal names both identities:\n{log}"
    );

    // Opaque TCP to the same port is refused too.
    let dst = SocketAddr::new(server.pod.ip().into(), 8080);
    let got = tcp_exchange(&robber.pod, dst, b"\x00\x01not http\r\n");
    assert!(
        got.map(|b| b.is_empty()).unwrap_or(true),
        "opaque bytes got through the policy"
    );
}

#[test]
fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("bank", PodOptions::default());
    let (_srv, _site) = http_server(&server.pod, 8080, "accounts");
    let rogue_ca = Ca::start(&mesh.bed, "rogue-ca", &[]);
    let rogue = mesh.meshed_pod_of(&rogue_ca, "rogue", PodOptions::default());
    let capture = server.pod.capture().expect("capture");

    let (_, out, _) = curl(
        &rogue.pod,
        &["-i", &format!("http://{}:8080/", server.pod.ip())],
    );
    assert!(
        !out.contains("accounts"),
        "a foreign certificate was accepted: {out}"
    );
    assert!(
        out.starts_with("HTTP/1.1 502"),
        "the client's proxy answers for the failed handshake: {out}"
    );
    let log = rogue.proxy.stderr();
    assert!(
        log.contains("handshake"),
        "the client proxy says why:\n{log}"
    );
    let pcap = capture.stop().unwrap();
    assert!(!pcap.contains(b"GET / HTTP"), "no plaintext fallback");
}

/// A peer can name any port in its tunnel to the mesh port, so the server's
/// proxy forwards to localhost only on ports its rules capture. On a port
/// left out of the capture, the mesh reaches what the network reaches: a
/// service bound to the pod IP or all addresses, never one bound to
/// localhost alone. A captured port still reaches an application that
/// listens on localhost only.
#[test]
fn a_peer_reaches_localhost_only_services_on_captured_ports_alone() {
    let mesh = Mesh::new(&[]);
    let skip = "init.exclude_inbound_ports=9000-9002".to_owned();
    let server = mesh.meshed_pod(
        "vault",
        PodOptions {
            init_set: vec![skip.clone()],
            proxy_set: vec![skip],
            ..Default::default()
        },
    );
    let client = mesh.meshed_pod("visitor", PodOptions::default());
    let localhost: IpAddr = Ipv4Addr::LOCALHOST.into();
    let hidden = secret("localhost-only");
    let (_a, _sa) = http_server_on(&server.pod, localhost, 8080, "captured app");
    let (_b, _sb) = http_server_on(&server.pod, localhost, 9000, &hidden);
    let (_c, _sc) = http_server(&server.pod, 9001, "public on an uncaptured port");
    // A plain TCP listener on localhost; the client sends nothing, so
    // detection gives up and the tunnel is opaque TCP. Whether the proxy
    // ever dialled it shows in its accept queue.
    let listener = server
        .pod
        .run_in(|| TcpListener::bind("127.0.0.1:9002"))
        .unwrap()
        .expect("bind 127.0.0.1:9002");
    listener.set_nonblocking(true).unwrap();

    let url = |port: u16| format!("http://{}:{port}/", server.pod.ip());
    let (ok, out, err) = curl(&client.pod, &[&url(8080)]);
    assert!(ok && out == "captured app", "captured port: {err}");
    let (ok, out, err) = curl(&client.pod, &[&url(9001)]);
    assert!(
        ok && out == "public on an uncaptured port",
        "uncaptured port, public service: {err}"
    );
    let (_, out, _) = curl(&client.pod, &["-i", &url(9000)]);
    assert!(
        !out.contains(&hidden),
        "a peer reached a localhost-only service on an uncaptured port"
    );
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");

    let dst = SocketAddr::new(server.pod.ip().into(), 9002);
    let got = tcp_exchange(&client.pod, dst, b"");
    assert!(got.map(|b| b.is_empty()).unwrap_or(true));
    assert!(
        listener.accept().is_err(),
        "the localhost-only listener was reached through the mesh"
    );
}
