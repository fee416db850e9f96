"""Local HTTP servers on 127.0.0.1 for download tests (no network needed)."""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextlib.contextmanager
def serve(routes: dict):
    """Serves ``{path: (status, body bytes)}``; yields (base URL, list of requested paths)."""
    requested = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body_wanted: bool):
            requested.append(self.path)
            status, body = routes.get(self.path, (404, b"not found"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body_wanted:
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - the http.server API
            self._answer(True)

        def do_HEAD(self):  # noqa: N802
            self._answer(False)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def silent_server():
    """Accepts connections and never sends a byte (a hung server); yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    accepted = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in accepted:
            conn.close()
        sock.close()


@contextlib.contextmanager
def raw_server(respond):
    """Calls ``respond(conn)`` in a thread for each connection (the test writes the raw HTTP bytes);
    yields (base URL, list of connection counts)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    stop = threading.Event()
    conns, threads = [], []

    def serve_one(conn):
        try:
            conn.settimeout(5)
            conn.recv(65536)  # the request; its content does not matter here
            respond(conn, stop)
        except OSError:
            pass
        finally:
            conn.close()

    def accept():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn = sock.accept()[0]
            except OSError:
                continue
            conns.append(conn)
            t = threading.Thread(target=serve_one, args=(conn,), daemon=True)
            t.start()
            threads.append(t)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", conns
    finally:
        stop.set()
        thread.join(timeout=2)
        for t in threads:
            t.join(timeout=2)
        sock.close()


def trickle(body: bytes, interval: float, length: bool = True):
    """A ``raw_server`` responder that sends ``body`` one byte per ``interval`` seconds."""
    def respond(conn, stop):
        head = b"HTTP/1.1 200 OK\r\n" + (f"Content-Length: {len(body)}\r\n".encode() if length else b"") + \
            b"Connection: close\r\n\r\n"
        conn.sendall(head)
        for i in range(len(body)):
            if stop.wait(interval):
                return
            conn.sendall(body[i:i + 1])
    return respond


def cut_short(body: bytes, keep: int):
    """A ``raw_server`` responder without Content-Length that sends ``keep`` bytes of ``body`` and closes."""
    def respond(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body[:keep])
    return respond


def slow_headers(interval: float):
    """A ``raw_server`` responder that sends its header lines one byte per ``interval`` seconds, forever."""
    def respond(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not stop.wait(interval):
            conn.sendall(b"a")
    return respond
