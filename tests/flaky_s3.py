"""A real HTTP proxy in front of the S3 test store that misbehaves like a busy or failing S3
endpoint: every `throttle_every`-th request gets a 503 SlowDown, every `drop_every`-th connection
is cut; and on demand the endpoint goes `down` (connections cut at once) or becomes a
`blackhole` (requests are read, never answered, until the blackhole ends), or is `partition`ed
(a request that arrives meanwhile, on a new or a pooled connection, is never read nor answered,
even after the partition ends: a connection's packets lost for good). A slow store delays
each PUT by `put_delay` seconds; after `deny_puts_after` PUTs every further PUT gets 403
AccessDenied (a store that turned unwritable). `fail(method, suffix, action, times)` scripts
one kind of request (its path ending in `suffix`): "deny" answers 403 without forwarding it,
"lose_reply" forwards it and cuts the connection instead of answering (the request took effect,
the client cannot know). `requests` logs what was forwarded, in order:
(method, path, query, start, end)."""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FlakyS3Proxy:
    def __init__(self, upstream: str, throttle_every: int = 0, drop_every: int = 0):
        target = urlsplit(upstream)
        counter = itertools.count(1)
        self.faults = {"throttled": 0, "dropped": 0, "forwarded": 0, "refused": 0, "held": 0}
        self.down = False
        self.blackhole_until = 0.0
        self.partition_until = 0.0
        self.closing = threading.Event()
        self.put_delay = 0.0
        self.deny_puts_after: int | None = None
        self.requests: list[tuple[str, str, str, float, float]] = []
        self.scripted: list[list] = []  # [method, suffix, action, times left (None: always)]
        puts = itertools.count(1)
        faults = self.faults
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                if time.monotonic() < proxy.partition_until:
                    with lock:
                        faults["held"] += 1
                    proxy.closing.wait()  # silent forever: neither the body read nor an answer
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    n = next(counter)
                if proxy.down:
                    with lock:
                        faults["refused"] += 1
                    self.close_connection = True
                    self.connection.close()
                    return
                if time.monotonic() < proxy.blackhole_until:
                    with lock:
                        faults["held"] += 1
                    while time.monotonic() < proxy.blackhole_until:  # no answer at all
                        time.sleep(0.1)
                    self.close_connection = True
                    self.connection.close()
                    return
                if drop_every and n % drop_every == 0:
                    with lock:
                        faults["dropped"] += 1
                    self.close_connection = True
                    self.connection.close()
                    return
                if throttle_every and n % throttle_every == 0:
                    with lock:
                        faults["throttled"] += 1
                    self._answer(503, SLOW_DOWN)
                    return
                action = proxy._scripted(self.command, self.path.partition("?")[0])
                if action == "deny":
                    self._answer(403, ACCESS_DENIED)
                    return
                started = time.monotonic()
                if self.command == "PUT":
                    with lock:
                        put = next(puts)
                    if proxy.deny_puts_after is not None and put > proxy.deny_puts_after:
                        self._answer(403, ACCESS_DENIED)
                        return
                    time.sleep(proxy.put_delay)
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                response = upstream_conn.getresponse()
                data = response.read()
                with lock:
                    faults["forwarded"] += 1
                    path, _, query = self.path.partition("?")
                    proxy.requests.append((self.command, path, query, started, time.monotonic()))
                if action == "lose_reply":
                    self.close_connection = True
                    self.connection.close()
                    upstream_conn.close()
                    return
                self.send_response(response.status)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer has no body but announces the object's size.
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream_conn.close()

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def fail(self, method: str, suffix: str, action: str, times: int | None = None) -> None:
        """Script the next `times` requests (None: every one) of `method` on a path ending in
        `suffix`: "deny" (403) or "lose_reply" (forwarded, then the connection cut)."""
        self.scripted.append([method, suffix, action, times])

    def _scripted(self, method: str, path: str) -> str | None:
        for rule in self.scripted:
            if rule[0] == method and path.endswith(rule[1]) and rule[3] != 0:
                if rule[3] is not None:
                    rule[3] -= 1
                return rule[2]
        return None

    def blackhole(self, seconds: float) -> None:
        """From now on, for `seconds`, requests get no answer (a network that drops packets)."""
        self.blackhole_until = time.monotonic() + seconds

    def partition(self, seconds: float) -> None:
        """From now on, for `seconds`, requests get no answer ever (their connections stay open
        and silent after the partition too), as on a network partition."""
        self.partition_until = time.monotonic() + seconds

    def __enter__(self) -> FlakyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
