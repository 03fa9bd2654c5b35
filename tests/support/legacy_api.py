"""A stand-in for the user's `working-sd-api.py`: the foreign SD1.5 script the runbook upgrades.

Stdlib HTTP + PIL, starts in a fraction of a second: `GET /health` and `POST /generate` (a flat PNG of
the requested size, as base64), the two endpoints the app uses. Run: `python legacy_api.py PORT`.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path in ("/health", "/ready"):  # /ready: HAProxy's check in the fleet tests
            self._send(200, {"status": "healthy", "model_loaded": True, "cuda_available": False})
        else:
            self._send(404, {"success": False, "error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        width, height = int(body.get("width") or 512), int(body.get("height") or 512)
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (90, 120, 200)).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        self._send(200, {"success": True, "image": image, "final_resolution": f"{width}x{height}"})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    print(f"legacy SD1.5 API listening on 127.0.0.1:{sys.argv[1]}", file=sys.stderr, flush=True)
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
