"""A tiny mock AI API for the gunicorn example: echoes the request, and
answers 429 (Retry-After: 2) to every 10th request of a key.

    python3 examples/gunicorn/mock_provider.py   # listens on 127.0.0.1:8099
"""
from __future__ import annotations

import collections
import http.server
import json
import sys

counts: "collections.Counter[str]" = collections.Counter()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        counts[key] += 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if counts[key] % 10 == 0:
            self.send_response(429)
            self.send_header("Retry-After", "2")
            self.end_headers()
            self.wfile.write(b'{"error": "rate limited"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"key_suffix": key[-4:], "echo": body.decode(errors="replace")}).encode())

    def log_message(self, *args) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8099
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
