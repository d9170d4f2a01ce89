#!/usr/bin/env python3
"""A small HTTP(S) server for the specs of warren.http (Python 3 standard library only).

    python3 spec/support/httpserver.py DIR [--tls CERT KEY]

Listens on a free loopback port, one thread per connection (HTTP/1.0: one request per
connection), and writes the port to DIR/port once it listens. Every event is a line in
DIR/events, written whole: "request METHOD PATH", "done PATH", "aborted PATH" (the client
closed the connection before the response was complete).

    /echo            200, a JSON object: method, path, headers (names in lower case), body
                     (latin-1); and the response header X-Echo: yes
    /big?size=N      200, N bytes (Content-Length), fast
    /slow?size=N     200, N bytes at 16 KiB every 0.1 s
    /delay?s=S       200 "ok" after S seconds
    /hang            reads the request and never answers
    /redirect?to=P   302 to P
    /files/NAME      GET: the file DIR/files/NAME (404 if missing); PUT: stores the body there
"""
import json
import os
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

DIR = sys.argv[1]
FILES = os.path.join(DIR, "files")
os.makedirs(FILES, exist_ok=True)
lock = threading.Lock()


def event(*words):
    with lock, open(os.path.join(DIR, "events"), "a") as f:
        f.write(" ".join(words) + "\n")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def reply(self, status, data, headers=()):
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def stream(self, size, chunk, pause):
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        block = b"x" * chunk
        sent = 0
        while sent < size:
            n = min(chunk, size - sent)
            self.wfile.write(block[:n])
            sent += n
            if pause:
                self.wfile.flush()
                time.sleep(pause)

    def handle_any(self):
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        event("request", self.command, self.path)
        try:
            if url.path == "/echo":
                data = self.body()
                out = {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": data.decode("latin-1"),
                }
                self.reply(200, json.dumps(out).encode(),
                           [("X-Echo", "yes"), ("Content-Type", "application/json")])
            elif url.path == "/big":
                self.stream(int(q["size"]), 1 << 16, 0)
            elif url.path == "/slow":
                self.stream(int(q["size"]), 1 << 14, 0.1)
            elif url.path == "/delay":
                time.sleep(float(q["s"]))
                self.reply(200, b"ok")
            elif url.path == "/hang":
                time.sleep(3600)
            elif url.path == "/redirect":
                self.reply(302, b"", [("Location", q["to"])])
            elif url.path.startswith("/files/"):
                path = os.path.join(FILES, os.path.basename(url.path))
                if self.command == "PUT":
                    data = self.body()
                    with open(path + ".part", "wb") as f:
                        f.write(data)
                    os.rename(path + ".part", path)
                    self.reply(201, b"stored\n")
                elif os.path.exists(path):
                    with open(path, "rb") as f:
                        self.reply(200, f.read())
                else:
                    self.reply(404, b"no such file\n")
            else:
                self.reply(404, b"not found\n")
            self.wfile.flush()
            event("done", self.path)
        except (BrokenPipeError, ConnectionResetError):
            event("aborted", self.path)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


server = Server(("127.0.0.1", 0), Handler)
if len(sys.argv) >= 5 and sys.argv[2] == "--tls":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
with open(os.path.join(DIR, "port.tmp"), "w") as f:
    f.write(str(server.server_address[1]))
os.rename(os.path.join(DIR, "port.tmp"), os.path.join(DIR, "port"))
server.serve_forever()
