"""A stand-in for the user's `working-sd-api.py`: the foreign SD1.5 script the runbook upgrades.

Stdlib HTTP + PIL, starts in a fraction of a second: `GET /health` and `POST /generate` (a flat PNG of
the requested size, as base64), the two endpoints the app uses. Run: `python legacy_api.py PORT`; with
`--noise` each image is seeded noise of its prompt and seed, so CLIP scores vary per prompt as a real
model's do (a flat image scores the same low way on every prompt).

SIGTERM is graceful, as it is for the real script, a FastAPI app under uvicorn: it stops listening at once,
finishes the requests in flight, then exits. A staged deploy's cut-over relies on exactly that: the new
service takes the port the moment the old one stops listening, and no request the old one accepted is cut.
(`python -m http.server`'s default, dying mid-request on TERM, would make that look worse than it is.)
"""

from __future__ import annotations

import base64
import io
import json
import random
import signal
import socket
import sys
import threading
import zlib
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
        picture = Image.new("RGB", (width, height), (90, 120, 200))
        if NOISE:
            rng = random.Random(zlib.crc32(f"{body.get('prompt')}|{body.get('seed')}".encode()))
            picture = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
        picture.save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        self._send(200, {"success": True, "image": image, "final_resolution": f"{width}x{height}"})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


NOISE = "--noise" in sys.argv


def serve(port: int) -> None:
    """Serve until SIGTERM / SIGINT; then stop listening, let the requests in flight finish, exit."""
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = False  # server_close() waits for the request threads
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    print(f"legacy SD1.5 API listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    while not stopping.wait(0.01):
        pass
    # Stop listening at once, as uvicorn closes its listener: from here a connection is refused (the new
    # service takes the port), never left in a queue this process no longer accepts from, which closing the
    # socket after the accept loop's next poll (up to 20 ms later) would reset.
    server.socket.shutdown(socket.SHUT_RDWR)
    server.shutdown()  # the accept loop ends
    server.server_close()  # waits for the requests in flight
    print("legacy SD1.5 API stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
