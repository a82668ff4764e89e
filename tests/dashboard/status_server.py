"""A real HTTP server on 127.0.0.1 that serves a node status document (``GET /status``)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StatusServer:
    """Serves ``self.doc`` as JSON at ``/status`` until :meth:`stop`; with ``raw``, those
    bytes verbatim as ``application/json`` instead (odd bodies a node might send)."""

    def __init__(self, doc: dict[str, Any], raw: bytes | None = None) -> None:
        self.doc = doc
        self.raw = raw
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                if self.path != "/status":
                    self.send_error(404)
                    return
                body = owner.raw if owner.raw is not None else json.dumps(owner.doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Shut the server down and close its socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def status_doc(leader: str | None, height: int, head_hash: str | None) -> dict[str, Any]:
    """A status document in the documented shape (docs/dashboard.md)."""
    return {
        "node": "did:key:z6MkNodeUnderTest",
        "raft": {
            "role": "leader" if leader else "candidate",
            "term": 7,
            "leader": leader,
            "leader_changes": 3,
            "commit_index": 1200,
            "applied_index": 1197,
            "last_index": 1202,
        },
        "peers": [
            {"id": "p1", "up": True},
            {"id": "p2", "up": True},
            {"id": "p3", "up": False},
        ],
        "members": {"up": 5, "down": 1},
        "last_reading": {"slot": 95, "at": "2026-11-24T06:00:00Z"},
        "ledger": {"height": height, "head_hash": head_hash},
        "invalid_messages": {"bad_signature": 4, "replayed_nonce": 2, "unknown_member": 1},
        "meter_read_failures": 3,
    }
