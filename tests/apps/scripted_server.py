#!/usr/bin/env python3
"""A scriptable HTTP/1.1 server for legate's end-to-end tests.

What it does depends on the path; every request is counted per key, and
/count/KEY reports the count, so a test can tell how many attempts reached
the application:

  /ok/KEY                      200
  /fail/N/KEY                  500 for the first N requests, then 200
  /always500/KEY               500
  /status/CODE/KEY             that status (204 and 304 without content)
  /slowfirst/KEY/SECONDS       the first request sleeps, later ones answer at once
  /sleep/SECONDS/KEY           sleeps, then 200
  /reset/N/KEY                 resets the connection for the first N requests
  /echo/N/KEY                  503 for the first N requests, then "<length> <sha256>" of the body
  /sink/KEY                    reads the body in pieces; "<length> <sha256>"
  /headers                     the request headers as JSON
  /fields/N                    the request headers as JSON, answered with N
                               more header fields, X-Answer-001: a 1 and on
  /fields/N/W                  the same, each value padded with "a" to W bytes
  /both                        "hello" in chunks, with a stale Content-Length: 3
  /trailers                    a chunked response with a trailer
  /trailers-in                 the trailer fields of a chunked request, as JSON
  /ws                          a WebSocket echo (one text frame at a time)

CONNECT makes it an HTTP proxy: a target whose host is "tunnel" is accepted
(200) and the tunnel echoes what the client sends; any other is declined
with 405 on a connection kept open for the next request (as hyper's server
declines one), the request headers as JSON in the body.
"""

import base64
import hashlib
import http.client
import http.server
import json
import socket
import struct
import sys
import threading
import time

# Python refuses a request with more than 100 header fields (431); a legacy
# application may take more, and the tests need one that does.
http.client._MAXHEADERS = 1000

counts = {}
lock = threading.Lock()


def bump(key):
    with lock:
        counts[key] = counts.get(key, 0) + 1
        return counts[key]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        # 204 and 304 answers have no body, and a 204 no length either.
        if code == 304:
            self.send_header("Content-Length", str(len(body)))
        if code in (204, 304):
            body = b""
        else:
            self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        # A HEAD answer has the GET answer's head, and no body.
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_body(self, hasher=None):
        self.trailers = {}
        total = 0
        data = bytearray()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while True:
                        line = self.rfile.readline()
                        if line in (b"\r\n", b"\n", b""):
                            break
                        name, _, value = line.decode("latin-1").partition(":")
                        self.trailers[name.strip().lower()] = value.strip()
                    break
                chunk = self.rfile.read(size)
                self.rfile.readline()
                total += len(chunk)
                if hasher:
                    hasher.update(chunk)
                else:
                    data += chunk
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
                total += len(chunk)
                if hasher:
                    hasher.update(chunk)
                else:
                    data += chunk
        return total, bytes(data)

    def reset(self):
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                break
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                break
            out = bytes([0x80 | opcode])
            if len(payload) < 126:
                out += bytes([len(payload)])
            else:
                out += bytes([126]) + struct.pack(">H", len(payload))
            self.wfile.write(out + payload)
            self.wfile.flush()
        self.close_connection = True

    def handle_any(self):
        parts = self.path.strip("/").split("/")
        op = parts[0]
        if op == "sink":
            bump(parts[1])
            h = hashlib.sha256()
            total, _ = self.read_body(h)
            return self.reply(200, f"{total} {h.hexdigest()}".encode())
        total, body = self.read_body()
        if op == "ok":
            bump(parts[1] if len(parts) > 1 else "ok")
            return self.reply(200, b"ok\n")
        if op == "fail":
            n, key = int(parts[1]), parts[2]
            c = bump(key)
            if c <= n:
                return self.reply(500, b"failing\n")
            return self.reply(200, f"ok after {c}\n".encode())
        if op == "always500":
            bump(parts[1])
            return self.reply(500, b"broken\n")
        if op == "status":
            bump(parts[2])
            return self.reply(int(parts[1]), b"as asked\n")
        if op == "slowfirst":
            c = bump(parts[1])
            if c == 1:
                time.sleep(float(parts[2]))
            return self.reply(200, f"attempt {c}\n".encode())
        if op == "sleep":
            bump(parts[2])
            time.sleep(float(parts[1]))
            return self.reply(200, b"slept\n")
        if op == "reset":
            c = bump(parts[2])
            if c <= int(parts[1]):
                return self.reset()
            return self.reply(200, f"attempt {c}\n".encode())
        if op == "echo":
            c = bump(parts[2])
            if c <= int(parts[1]):
                return self.reply(503, b"not yet\n")
            return self.reply(200, f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())
        if op == "count":
            with lock:
                return self.reply(200, str(counts.get(parts[1], 0)).encode())
        if op == "trailers-in":
            return self.reply(200, json.dumps(self.trailers).encode(),
                              [("Content-Type", "application/json")])
        if op == "headers":
            return self.reply(200, json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(),
                              [("Content-Type", "application/json")])
        if op == "fields":
            width = int(parts[2]) if len(parts) > 2 else 0
            more = [(f"X-Answer-{i:03}", f"a {i}".ljust(width, "a"))
                    for i in range(1, int(parts[1]) + 1)]
            return self.reply(200, json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(),
                              [("Content-Type", "application/json")] + more)
        if op == "both":
            # Chunks that also claim a length, which the chunks override.
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n0\r\n\r\n")
            self.close_connection = True
            return
        if op == "trailers":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "x-checksum")
            self.end_headers()
            for piece in (b"first piece,", b"second piece"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\nx-checksum: 12345\r\n\r\n")
            return
        if op == "ws":
            return self.websocket()
        self.reply(404, b"unknown path\n")

    def do_CONNECT(self):
        if self.path.split(":")[0] != "tunnel":
            return self.reply(405, json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(),
                              [("Content-Type", "application/json")])
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        while True:
            data = self.rfile.read1(65536)
            if not data:
                break
            self.wfile.write(data)
            self.wfile.flush()
        self.close_connection = True

    # PROPFIND: a method beyond the common ones, as WebDAV servers take.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PROPFIND = handle_any


server = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler)
server.daemon_threads = True
server.serve_forever()
