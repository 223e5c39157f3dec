#!/usr/bin/env python3
"""A gRPC server and client for legate's end-to-end tests, with raw-bytes
messages so no generated code is needed.

  grpc_echo.py serve PORT
  grpc_echo.py unary HOST:PORT TEXT      prints the echoed text
  grpc_echo.py fail HOST:PORT            prints the status code name
  grpc_echo.py chat HOST:PORT A B C      prints each reply of a bidi stream
  grpc_echo.py flaky HOST:PORT N KEY     the server answers UNAVAILABLE to the
                                         first N calls for KEY, then
                                         "ok after <calls>"; prints that or
                                         the status code name
"""

import sys
import threading
from concurrent import futures

import grpc


def ident(b):
    return b


def echo(request, context):
    return request


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")


calls = {}
calls_lock = threading.Lock()


def flaky(request, context):
    failures, key = request.decode().split(":", 1)
    with calls_lock:
        calls[key] = calls.get(key, 0) + 1
        seen = calls[key]
    if seen <= int(failures):
        context.abort(grpc.StatusCode.UNAVAILABLE, f"call {seen} fails")
    return f"ok after {seen}".encode()


def chat(requests, context):
    for message in requests:
        yield b"re:" + message


def serve(port):
    handlers = grpc.method_handlers_generic_handler(
        "legate.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, ident, ident),
            "Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
            "Flaky": grpc.unary_unary_rpc_method_handler(flaky, ident, ident),
            "Chat": grpc.stream_stream_rpc_method_handler(chat, ident, ident),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handlers,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    server.wait_for_termination()


def main():
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "serve":
        return serve(target)
    channel = grpc.insecure_channel(target)
    try:
        if mode == "unary":
            call = channel.unary_unary("/legate.Echo/Echo", ident, ident)
            print(call(sys.argv[3].encode(), timeout=10).decode())
        elif mode == "fail":
            call = channel.unary_unary("/legate.Echo/Fail", ident, ident)
            call(b"x", timeout=10)
            print("OK")
        elif mode == "flaky":
            call = channel.unary_unary("/legate.Echo/Flaky", ident, ident)
            request = f"{sys.argv[3]}:{sys.argv[4]}".encode()
            print(call(request, timeout=10).decode())
        elif mode == "chat":
            call = channel.stream_stream("/legate.Echo/Chat", ident, ident)
            for reply in call(iter(m.encode() for m in sys.argv[3:]), timeout=10):
                print(reply.decode())
    except grpc.RpcError as e:
        print(e.code().name)
        print(e.details(), file=sys.stderr)


main()
