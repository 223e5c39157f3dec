//! `legate demo`: a small mesh in network namespaces, built and exercised
//! the way an operator would, with a report of what happened on the wire.
//!
//! Pods (each its own network namespace on a private bridge; nothing
//! touches the host's network):
//! - `ca`: the built-in CA (`legate ca serve`);
//! - `web`: python's http.server, meshed (`legate init` + `legate proxy`);
//! - `shop`: a curl client, meshed;
//! - `vault`: another http.server, meshed, strict, and only `shop` may call it;
//! - `legacy`: no proxy at all, a client and a server;
//! - `rogue`: meshed, but with a certificate from a different CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use legate_testbed::mesh::{self, Ca, Legate, Mesh, MeshedPod, PodOptions, APP_UID, TRUST_DOMAIN};
use legate_testbed::{Pod, Process};

/// What one scene showed.
struct Outcome {
    scene: &'static str,
    expected: &'static str,
    seen: String,
    ok: bool,
}

fn tool(name: &str, package: &str) -> Result<(), String> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(format!("`{name}` is not installed; install it with `apt-get install {package}` (scripts/demo.sh does this)"))
    }
}

fn http_server(pod: &Pod, port: u16, body: &str) -> Result<(Process, tempfile::TempDir), String> {
    let site = mesh::shared_dir().map_err(|e| e.to_string())?;
    mesh::write_readable(&site.path().join("index.html"), body.as_bytes())
        .map_err(|e| e.to_string())?;
    let process = pod
        .command("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "0.0.0.0"])
        .current_dir(site.path())
        .uid(APP_UID)
        .spawn()
        .map_err(|e| e.to_string())?;
    pod.wait_for_port(
        SocketAddr::new(pod.ip().into(), port),
        Duration::from_secs(10),
    )
    .map_err(|e| e.to_string())?;
    Ok((process, site))
}

/// curl as an ordinary user: (HTTP status or error, body).
fn curl(pod: &Pod, url: &str) -> (String, String) {
    let out = pod
        .command("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url])
        .uid(APP_UID)
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
            (format!("HTTP {code}"), body.to_owned())
        }
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let reason = err
                .lines()
                .next()
                .unwrap_or("failed")
                .trim_start_matches("curl: ")
                .to_owned();
            (format!("refused ({reason})"), String::new())
        }
        Err(e) => (format!("could not run curl: {e}"), String::new()),
    }
}

/// The client identities a server's proxy logged for mesh connections.
fn peers_seen(m: &MeshedPod) -> Vec<String> {
    let mut ids: Vec<String> = m
        .proxy
        .stderr()
        .lines()
        .filter(|l| l.contains("accepted mesh connection"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("peer="))
                .map(str::to_owned)
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

fn meshed(mesh: &Mesh, name: &str, set: &[String]) -> Result<MeshedPod, String> {
    let opts = PodOptions {
        proxy_set: set.to_vec(),
        log: Some("info".into()),
        ..Default::default()
    };
    mesh.meshed_pod(name, opts)
        .map_err(|e| format!("pod {name}: {e}"))
}

pub fn run() -> ExitCode {
    match demo() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: the demo could not run: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<bool, String> {
    tool("curl", "curl")?;
    tool("python3", "python3")?;
    let bin: PathBuf =
        std::env::current_exe().map_err(|e| format!("cannot find the legate binary: {e}"))?;
    let legate = Legate::new(bin);

    println!(
        "legate demo: building a mesh in network namespaces (nothing touches the host network)\n"
    );
    let mesh = Mesh::new(legate.clone(), &[]).map_err(|e| e.to_string())?;
    let web = meshed(&mesh, "web", &[])?;
    let shop = meshed(&mesh, "shop", &[])?;
    let vault = meshed(
        &mesh,
        "vault",
        &[
            "proxy.mode=strict".into(),
            format!(
                "proxy.authz=[{{ ports = \"8080\", allow = [\"spiffe://{TRUST_DOMAIN}/shop\"] }}]"
            ),
        ],
    )?;
    let legacy = mesh.plain_pod("legacy").map_err(|e| e.to_string())?;
    let rogue_ca = Ca::start(&legate, &mesh.bed, "rogue-ca", &[]).map_err(|e| e.to_string())?;
    let rogue = mesh
        .meshed_pod_of(
            &rogue_ca,
            "rogue",
            PodOptions {
                log: Some("info".into()),
                ..Default::default()
            },
        )
        .map_err(|e| format!("pod rogue: {e}"))?;

    let page = "hello from web, over mutual TLS";
    let (_web_srv, _s1) = http_server(&web.pod, 8080, page)?;
    let (_vault_srv, _s2) = http_server(&vault.pod, 8080, "vault contents")?;
    let (_legacy_srv, _s3) = http_server(&legacy, 8080, "hello from legacy, no proxy here")?;

    println!("  {:<8} {:<12} {:<44} role", "pod", "address", "identity");
    println!(
        "  {:<8} {:<12} {:<44} CA: legate ca serve on :15012",
        "ca",
        mesh.ca.pod.ip(),
        "-"
    );
    for (m, role) in [
        (&web, "http.server :8080, legate init + proxy (permissive)"),
        (&shop, "curl, legate init + proxy"),
        (&vault, "http.server :8080, proxy strict, only shop allowed"),
        (&rogue, "curl, proxy with a certificate from another CA"),
    ] {
        println!("  {:<8} {:<12} {:<44} {role}", m.name, m.pod.ip(), m.id());
    }
    println!(
        "  {:<8} {:<12} {:<44} curl and http.server :8080, no proxy\n",
        "legacy",
        legacy.ip(),
        "-"
    );

    let url = |p: &Pod| format!("http://{}:8080/", p.ip());
    let mut outcomes = Vec::new();

    // 1. Meshed to meshed, with a capture on the server's link.
    let capture = web.pod.capture().map_err(|e| e.to_string())?;
    let (status, body) = curl(&shop.pod, &url(&web.pod));
    let pcap = capture.stop().map_err(|e| e.to_string())?;
    let tls13 = pcap.contains(mesh::TLS13_SERVER_HELLO_VERSION) && pcap.contains(b"legate/h2");
    let leaked = pcap.contains(page.as_bytes());
    let ok = status == "HTTP 200" && body == page && tls13 && !leaked;
    outcomes.push(Outcome {
        scene: "shop -> web (both meshed)",
        expected: "HTTP 200, TLS 1.3 on the wire, no plaintext",
        seen: format!(
            "{status}, {} bytes; wire: {}{}",
            body.len(),
            if tls13 {
                "TLS 1.3 with ALPN legate/h2"
            } else {
                "no mesh TLS seen"
            },
            if leaked {
                ", PLAINTEXT SEEN"
            } else {
                ", payload never in the clear"
            }
        ),
        ok,
    });
    let peers = peers_seen(&web);
    outcomes.push(Outcome {
        scene: "web's proxy: who called?",
        expected: "spiffe://legate.local/shop",
        seen: if peers.is_empty() {
            "no mesh client logged".into()
        } else {
            peers.join(", ")
        },
        ok: peers.iter().any(|p| p == shop.id()),
    });

    // 2. A client outside the mesh to a permissive server.
    let capture = web.pod.capture().map_err(|e| e.to_string())?;
    let (status, _) = curl(&legacy, &url(&web.pod));
    let plain = capture
        .stop()
        .map_err(|e| e.to_string())?
        .contains(page.as_bytes());
    outcomes.push(Outcome {
        scene: "legacy -> web (permissive)",
        expected: "HTTP 200 in plaintext",
        seen: format!(
            "{status}{}",
            if plain { ", plaintext on the wire" } else { "" }
        ),
        ok: status == "HTTP 200" && plain,
    });

    // 3. Meshed client to a destination without a proxy.
    let (status, body) = curl(&shop.pod, &url(&legacy));
    outcomes.push(Outcome {
        scene: "shop -> legacy (no proxy there)",
        expected: "HTTP 200 in plaintext",
        seen: format!("{status}, {:?}", body),
        ok: status == "HTTP 200",
    });

    // 4. Strict server, client outside the mesh.
    let (status, _) = curl(&legacy, &url(&vault.pod));
    outcomes.push(Outcome {
        scene: "legacy -> vault (strict)",
        expected: "refused",
        seen: status.clone(),
        ok: status.starts_with("refused"),
    });

    // 5. Authorization: only shop may call vault.
    let (status, body) = curl(&shop.pod, &url(&vault.pod));
    outcomes.push(Outcome {
        scene: "shop -> vault (allowed by policy)",
        expected: "HTTP 200",
        seen: format!("{status}, {:?}", body),
        ok: status == "HTTP 200",
    });
    let (status, _) = curl(&web.pod, &url(&vault.pod));
    outcomes.push(Outcome {
        scene: "web -> vault (not in policy)",
        expected: "HTTP 403 from vault's proxy",
        seen: status.clone(),
        ok: status == "HTTP 403",
    });

    // 6. A certificate from another CA.
    let (status, _) = curl(&rogue.pod, &url(&web.pod));
    let why = rogue
        .proxy
        .stderr()
        .lines()
        .find(|l| l.contains("handshake"))
        .map(|l| l.split("error=").nth(1).unwrap_or(l).trim().to_owned())
        .unwrap_or_default();
    outcomes.push(Outcome {
        scene: "rogue -> web (foreign CA)",
        expected: "refused: the handshake fails",
        seen: format!(
            "{status}{}",
            if why.is_empty() {
                String::new()
            } else {
                format!("; rogue's proxy: {why}")
            }
        ),
        ok: status == "HTTP 502",
    });

    // 7. The diagnosis from web's namespace, which has just seen rogue's
    // handshake fail.
    let checked = legate
        .command(&web.pod)
        .args([
            "check",
            "--set",
            &format!("identity.ca_address={}", mesh.ca.address()),
        ])
        .output()
        .map_err(|e| format!("legate check: {e}"))?;
    let report = String::from_utf8_lossy(&checked.stdout);
    let summary = report.lines().last().unwrap_or_default().to_owned();
    let warned = report
        .lines()
        .find(|l| l.contains("mTLS handshakes failed"))
        .map(str::trim)
        .unwrap_or_default();
    outcomes.push(Outcome {
        scene: "web's namespace: legate check",
        expected: "no check fails; rogue's handshake counted",
        seen: if warned.is_empty() {
            summary.clone()
        } else {
            format!("{summary}; {warned}")
        },
        ok: checked.status.success() && !warned.is_empty(),
    });

    let mut all_ok = true;
    for (i, o) in outcomes.iter().enumerate() {
        all_ok &= o.ok;
        println!(
            "{}. {:<34} {}",
            i + 1,
            o.scene,
            if o.ok { "ok" } else { "UNEXPECTED" }
        );
        println!("   expected: {}", o.expected);
        println!("   seen:     {}", o.seen);
    }
    println!();
    drop((web, shop, vault, rogue, rogue_ca, legacy));
    let prefix = mesh.bed.prefix().to_owned();
    mesh.close().map_err(|e| e.to_string())?;
    println!("cleaned up: every namespace, process and rule of {prefix} is gone");
    if all_ok {
        println!("all {} checks behaved as expected", outcomes.len());
    } else {
        println!("some checks did not behave as expected (see above)");
    }
    Ok(all_ok)
}
