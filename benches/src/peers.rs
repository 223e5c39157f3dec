//! Ports, and the configuration of every non-legate process: the HTTP
//! application (nginx serving a small file), the nginx `stream` mTLS pair,
//! the nginx HTTP mTLS pair and the HAProxy mTLS pair.
//!
//! How each comparison peer is set up, so that the comparison is fair:
//! - both sides of every pair use TLS 1.3 only, ECDSA P-256 certificates
//!   from one root, the server verifies the client's certificate and the
//!   client verifies the server's chain and name;
//! - workers: nginx `worker_processes auto` and HAProxy's default threads,
//!   which are both one per core (2 here), as legate's default
//!   `proxy.workers` is;
//! - connection reuse: the nginx HTTP pair keeps a pool of upstream
//!   keep-alive connections on both sides (`keepalive 64`) with TLS
//!   session reuse; the HAProxy pair speaks HTTP/2 between the proxies
//!   (`alpn h2`) with `http-reuse always`, multiplexing like legate does,
//!   and pools HTTP/1.1 connections to the application. The nginx stream
//!   pair cannot pool (one upstream TLS connection per client connection)
//!   but resumes TLS sessions (`proxy_ssl_session_reuse on`, the default);
//! - logging off (`access_log off`, HAProxy without a log target), as
//!   legate logs nothing per connection at its default level.

use std::path::Path;

use crate::certs::{PeerCerts, SERVER_NAME};

/// Ports in the server pod.
pub mod port {
    /// iperf3 through legate and the nginx stream pair.
    pub const IPERF: u16 = 5201;
    /// iperf3 for direct connections (not captured).
    pub const IPERF_DIRECT: u16 = 5202;
    /// The echo server through legate and the nginx stream pair.
    pub const ECHO: u16 = 7000;
    /// The same echo server, for direct connections.
    pub const ECHO_DIRECT: u16 = 7100;
    /// The HTTP application, HTTP/1.1 and HTTP/2 cleartext (h2c, prior
    /// knowledge), through legate and the comparison pairs.
    pub const HTTP1: u16 = 8080;
    pub const H2C: u16 = 8082;
    /// The same application, for direct connections.
    pub const HTTP1_DIRECT: u16 = 8180;
    pub const H2C_DIRECT: u16 = 8182;
    /// Server sides of the comparison pairs.
    pub const NGINX_HTTP_TLS: u16 = 9443;
    pub const HAPROXY_TLS: u16 = 9444;
    pub const NGINX_STREAM_TLS_IPERF: u16 = 9445;
    pub const NGINX_STREAM_TLS_ECHO: u16 = 9446;

    /// Ports in the client pod where the comparison pairs' client sides
    /// listen on 127.0.0.1.
    pub const NGINX_STREAM_LOCAL_IPERF: u16 = 12001;
    pub const NGINX_STREAM_LOCAL_ECHO: u16 = 12002;
    pub const NGINX_HTTP_LOCAL_H1: u16 = 10080;
    pub const NGINX_HTTP_LOCAL_H2: u16 = 10082;
    pub const HAPROXY_LOCAL_H1: u16 = 11080;
    pub const HAPROXY_LOCAL_H2: u16 = 11082;

    /// Server-pod ports that `legate init` must leave alone, so direct and
    /// comparison traffic never meets legate. Used as the client's
    /// excluded outbound ports and the server's excluded inbound ports.
    pub const NOT_CAPTURED: &[u16] = &[
        IPERF_DIRECT,
        ECHO_DIRECT,
        HTTP1_DIRECT,
        H2C_DIRECT,
        NGINX_HTTP_TLS,
        HAPROXY_TLS,
        NGINX_STREAM_TLS_IPERF,
        NGINX_STREAM_TLS_ECHO,
    ];
}

/// The body the HTTP application serves: 256 bytes.
pub fn page() -> String {
    let mut s = String::from("<!doctype html><title>legate bench</title><p>");
    while s.len() < 255 {
        s.push('x');
    }
    s.push('\n');
    s
}

/// Lines every nginx config starts with: all state under `prefix`.
fn nginx_head(prefix: &Path, modules: &str) -> String {
    let p = prefix.display();
    format!(
        "{modules}daemon off;
master_process on;
user root;
worker_processes auto;
worker_rlimit_nofile 65536;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 16384; }}
"
    )
}

fn nginx_http_head(prefix: &Path) -> String {
    let p = prefix.display();
    format!(
        "access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;"
    )
}

/// The application: nginx serving [`page`] from `site`, on the mesh ports
/// and the direct ports, HTTP/1.1 and h2c.
pub fn nginx_app(prefix: &Path, site: &Path) -> String {
    use port::*;
    format!(
        "{head}http {{
    {http}
    default_type text/html;
    server {{
        listen {HTTP1};
        listen {HTTP1_DIRECT};
        listen {H2C} http2;
        listen {H2C_DIRECT} http2;
        root {site};
        location / {{ }}
    }}
}}
",
        head = nginx_head(prefix, ""),
        http = nginx_http_head(prefix),
        site = site.display(),
    )
}

const STREAM_MODULE: &str = "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n";

/// The client side of the nginx stream pair, in the client pod: plaintext
/// on 127.0.0.1, mTLS to the server side.
pub fn nginx_stream_client(prefix: &Path, certs: &PeerCerts, server: &str) -> String {
    use port::*;
    let tls = format!(
        "proxy_ssl on;
        proxy_ssl_protocols TLSv1.3;
        proxy_ssl_certificate {cert};
        proxy_ssl_certificate_key {key};
        proxy_ssl_trusted_certificate {ca};
        proxy_ssl_verify on;
        proxy_ssl_name {SERVER_NAME};
        proxy_ssl_server_name on;
        proxy_ssl_session_reuse on;",
        cert = certs.client_cert.display(),
        key = certs.client_key.display(),
        ca = certs.ca.display(),
    );
    format!(
        "{head}stream {{
    server {{
        listen 127.0.0.1:{NGINX_STREAM_LOCAL_IPERF};
        proxy_pass {server}:{NGINX_STREAM_TLS_IPERF};
        {tls}
    }}
    server {{
        listen 127.0.0.1:{NGINX_STREAM_LOCAL_ECHO};
        proxy_pass {server}:{NGINX_STREAM_TLS_ECHO};
        {tls}
    }}
}}
",
        head = nginx_head(prefix, STREAM_MODULE),
    )
}

/// The server side of the nginx stream pair: mTLS in, plaintext to the
/// application on localhost.
pub fn nginx_stream_server(prefix: &Path, certs: &PeerCerts) -> String {
    use port::*;
    let tls = format!(
        "ssl_protocols TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;",
        cert = certs.server_cert.display(),
        key = certs.server_key.display(),
        ca = certs.ca.display(),
    );
    format!(
        "{head}stream {{
    server {{
        listen {NGINX_STREAM_TLS_IPERF} ssl;
        proxy_pass 127.0.0.1:{IPERF};
        {tls}
    }}
    server {{
        listen {NGINX_STREAM_TLS_ECHO} ssl;
        proxy_pass 127.0.0.1:{ECHO};
        {tls}
    }}
}}
",
        head = nginx_head(prefix, STREAM_MODULE),
    )
}

/// The client side of the nginx HTTP pair: HTTP/1.1 and h2c on 127.0.0.1,
/// pooled HTTP/1.1 over mTLS to the server side (nginx cannot speak HTTP/2
/// to an upstream).
pub fn nginx_http_client(prefix: &Path, certs: &PeerCerts, server: &str) -> String {
    use port::*;
    format!(
        "{head}http {{
    {http}
    upstream mesh {{
        server {server}:{NGINX_HTTP_TLS};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{NGINX_HTTP_LOCAL_H1};
        listen 127.0.0.1:{NGINX_HTTP_LOCAL_H2} http2;
        location / {{
            proxy_pass https://mesh;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate {cert};
            proxy_ssl_certificate_key {key};
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name {SERVER_NAME};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
",
        head = nginx_head(prefix, ""),
        http = nginx_http_head(prefix),
        cert = certs.client_cert.display(),
        key = certs.client_key.display(),
        ca = certs.ca.display(),
    )
}

/// The server side of the nginx HTTP pair: mTLS in, pooled HTTP/1.1 to the
/// application.
pub fn nginx_http_server(prefix: &Path, certs: &PeerCerts) -> String {
    use port::*;
    format!(
        "{head}http {{
    {http}
    upstream app {{
        server 127.0.0.1:{HTTP1};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {NGINX_HTTP_TLS} ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
",
        head = nginx_head(prefix, ""),
        http = nginx_http_head(prefix),
        cert = certs.server_cert.display(),
        key = certs.server_key.display(),
        ca = certs.ca.display(),
    )
}

const HAPROXY_COMMON: &str = "global
    maxconn 8192
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
";

/// The client side of the HAProxy pair: HTTP/1.1 and h2c on 127.0.0.1,
/// HTTP/2 over mTLS to the server side, connections reused across
/// requests.
pub fn haproxy_client(certs: &PeerCerts, server: &str) -> String {
    use port::*;
    format!(
        "{HAPROXY_COMMON}frontend local_h1
    bind 127.0.0.1:{HAPROXY_LOCAL_H1}
    default_backend mesh
frontend local_h2
    bind 127.0.0.1:{HAPROXY_LOCAL_H2} proto h2
    default_backend mesh
backend mesh
    http-reuse always
    server peer {server}:{HAPROXY_TLS} ssl crt {crt} ca-file {ca} verify required verifyhost {SERVER_NAME} sni str({SERVER_NAME}) alpn h2
",
        crt = certs.client_combined.display(),
        ca = certs.ca.display(),
    )
}

/// The server side of the HAProxy pair: mTLS in, pooled HTTP/1.1 to the
/// application.
pub fn haproxy_server(certs: &PeerCerts) -> String {
    use port::*;
    format!(
        "{HAPROXY_COMMON}frontend mesh
    bind :{HAPROXY_TLS} ssl crt {crt} ca-file {ca} verify required alpn h2,http/1.1
    default_backend app
backend app
    http-reuse always
    server app 127.0.0.1:{HTTP1}
",
        crt = certs.server_combined.display(),
        ca = certs.ca.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_is_256_bytes() {
        assert_eq!(page().len(), 256);
    }

    #[test]
    fn excluded_ports_are_not_the_captured_ones() {
        for p in [port::IPERF, port::ECHO, port::HTTP1, port::H2C] {
            assert!(!port::NOT_CAPTURED.contains(&p));
        }
    }
}
