//! The bed's network: pods reach each other over IPv4 and IPv6, captures see
//! the bytes, processes run where and as whom they should, and beds stay
//! apart. These run for real and need root; they fail, never skip, when the
//! bed cannot be built.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use legate_testbed::{Bed, Pod};

mod common;

fn bed() -> Bed {
    Bed::new().unwrap_or_else(|e| panic!("cannot build a test bed: {e}"))
}

fn pod(bed: &Bed, name: &str) -> Pod {
    bed.pod(name)
        .unwrap_or_else(|e| panic!("cannot add pod {name}: {e}"))
}

fn listen(pod: &Pod, addr: &str) -> TcpListener {
    pod.run_in(|| TcpListener::bind(addr))
        .expect("enter pod")
        .expect("bind in pod")
}

/// Accepts one connection, expects `expect` from it, answers `reply`, and
/// returns the peer's address.
fn serve_once(
    listener: TcpListener,
    expect: String,
    reply: String,
) -> std::thread::JoinHandle<SocketAddr> {
    std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut got = vec![0; expect.len()];
        stream.read_exact(&mut got).expect("read request");
        assert_eq!(String::from_utf8_lossy(&got), expect);
        stream.write_all(reply.as_bytes()).expect("write reply");
        peer
    })
}

/// A real client process: bash's /dev/tcp, which every machine has.
fn bash_client(pod: &Pod, host: IpAddr, port: u16, send: &str, reply_len: usize) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port} && printf %s '{send}' >&3 && head -c {reply_len} <&3"
    );
    pod.exec(["bash", "-c", &script]).expect("bash client")
}

#[test]
fn pods_exchange_tcp_over_ipv4_and_ipv6_and_the_capture_sees_it() {
    let bed = bed();
    let client = pod(&bed, "client");
    let server = pod(&bed, "server");
    let capture = server.capture().expect("start capture");

    let cases: [(IpAddr, IpAddr, &str, &str); 2] = [
        (server.ip().into(), client.ip().into(), "0.0.0.0:7004", "v4"),
        (server.ip6().into(), client.ip6().into(), "[::]:7006", "v6"),
    ];
    let mut sent = Vec::new();
    for (server_ip, client_ip, bind, family) in cases {
        let listener = listen(&server, bind);
        let port = listener.local_addr().expect("addr").port();
        let request = format!("ping-{family}-{}", bed.prefix());
        let reply = format!("pong-{family}-{}", bed.prefix());
        let served = serve_once(listener, request.clone(), reply.clone());

        let got = bash_client(&client, server_ip, port, &request, reply.len());
        assert_eq!(got, reply, "{family}: reply reached the client process");
        let peer = served.join().expect("server thread");
        assert_eq!(peer.ip(), client_ip, "{family}: server saw the client pod");
        sent.push((request, reply, SocketAddr::new(server_ip, port)));
    }

    let pcap = capture.stop().expect("stop capture");
    for (request, reply, server_addr) in sent {
        assert!(pcap.contains(&request), "capture holds {request}");
        assert!(pcap.contains(&reply), "capture holds {reply}");
        let flows = pcap.tcp_flows().expect("parse capture");
        assert!(
            flows
                .iter()
                .any(|f| f.dst == server_addr && f.data == request.as_bytes()),
            "a flow to {server_addr} carried exactly {request}: {flows:?}"
        );
    }
    assert!(!pcap.contains(format!("never-sent-{}", bed.prefix())));
}

#[test]
fn a_process_runs_as_the_requested_user_inside_the_pod() {
    let bed = bed();
    let pod = pod(&bed, "app");
    let output = pod
        .command("sh")
        .args([
            "-c",
            "id -u; id -g; grep '^Groups:' /proc/self/status; readlink /proc/self/ns/net",
        ])
        .uid(1000)
        .gid(1000)
        .current_dir("/")
        .output()
        .expect("run as 1000");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let netns_inode = std::fs::metadata(format!("/run/netns/{}", pod.netns()))
        .expect("stat netns")
        .ino();
    assert_eq!(lines[0], "1000", "uid");
    assert_eq!(lines[1], "1000", "gid");
    assert_eq!(lines[2].trim_end(), "Groups:", "no supplementary groups");
    assert_eq!(lines[3], format!("net:[{netns_inode}]"), "in the pod");
}

#[test]
fn beds_side_by_side_are_isolated_and_never_collide() {
    let results: Vec<(String, String)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let bed = bed();
                    let client = pod(&bed, "client");
                    let server = pod(&bed, "server");
                    // Every bed uses the same addresses; each must reach
                    // only its own server.
                    let listener = listen(&server, "10.200.0.3:7100");
                    let served = serve_once(listener, "who".into(), bed.prefix().into());
                    let got =
                        bash_client(&client, server.ip().into(), 7100, "who", bed.prefix().len());
                    served.join().expect("server thread");
                    (bed.prefix().to_owned(), got)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    for (prefix, got) in &results {
        assert_eq!(prefix, got, "a client reached another bed's server");
    }
    let mut prefixes: Vec<_> = results.iter().map(|(p, _)| p).collect();
    prefixes.sort();
    prefixes.dedup();
    assert_eq!(prefixes.len(), results.len(), "prefixes are unique");
}

#[test]
fn nothing_routes_off_the_bridge() {
    let bed = bed();
    let pod = pod(&bed, "app");
    let bridge = bed.bridge_netns();

    let links = common::ip(&["-n", &bridge, "-o", "link", "show"]);
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .collect();
    assert_eq!(names, ["lo", "br0", "v2"], "bridge namespace links");
    assert!(links.contains(&format!("alias {}", pod.netns())));

    for family in ["-4", "-6"] {
        let routes = common::ip(&["-n", &bridge, family, "route", "show"]);
        assert!(!routes.contains("default"), "no default route: {routes}");
    }
    let forwarding = common::netns_exec(&bridge, &["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(forwarding.trim(), "0");

    // Off-subnet destinations go to the bridge, which has nowhere to send
    // them. Asked of the routing tables only: no packet is sent.
    let via = common::ip(&["-n", pod.netns(), "route", "get", "10.201.0.1"]);
    assert!(via.contains("via 10.200.0.1 dev eth0"), "{via}");
    let onward = std::process::Command::new("ip")
        .args(["-n", &bridge, "route", "get", "10.201.0.1"])
        .output()
        .expect("ip route get");
    assert!(!onward.status.success(), "the bridge must not route on");

    // A free address inside the subnet: nobody answers.
    let refused = pod
        .run_in(|| {
            TcpStream::connect_timeout(
                &"10.200.0.250:80".parse().expect("addr"),
                Duration::from_secs(1),
            )
        })
        .expect("enter pod");
    assert!(refused.is_err());
}

#[test]
fn wait_for_port_sees_a_late_listener_and_times_out_on_none() {
    let bed = bed();
    let client = pod(&bed, "client");
    let server = pod(&bed, "server");
    let addr = SocketAddr::from((server.ip(), 7200));

    let server2 = server.clone();
    let (seen, wait_seen) = std::sync::mpsc::channel::<()>();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let listener = listen(&server2, "0.0.0.0:7200");
        // Keep it open until it has been seen.
        let _ = wait_seen.recv_timeout(Duration::from_secs(10));
        drop(listener);
    });
    legate_testbed::wait_for_port(&client, addr, Duration::from_secs(5)).expect("port opens");
    seen.send(()).expect("listener thread");
    late.join().expect("listener thread");

    let closed = SocketAddr::from((server.ip(), 7201));
    let err = client
        .wait_for_port(closed, Duration::from_millis(300))
        .expect_err("nothing listens");
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[test]
fn a_failing_command_reports_its_stderr_and_status() {
    let bed = bed();
    let pod = pod(&bed, "app");
    let err = pod
        .exec(["sh", "-c", "echo something broke >&2; exit 3"])
        .expect_err("exit 3 fails");
    let message = err.to_string();
    assert!(message.contains("something broke"), "{message}");
    assert!(message.contains("exit status: 3"), "{message}");
}

#[test]
fn dropping_a_process_kills_its_whole_group() {
    let bed = bed();
    let pod = pod(&bed, "app");
    let mut process = pod
        .spawn(["sh", "-c", "sleep 1000 & echo $!; wait"])
        .expect("spawn");
    process
        .wait_for_output("\n", Duration::from_secs(10))
        .expect("background pid");
    let sleeper: u32 = process.stdout().trim().parse().expect("pid");
    assert!(common::pid_alive(sleeper));
    drop(process);
    common::wait_dead(sleeper);
}
