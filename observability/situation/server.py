"""The situation map's web server: one page, its local assets, the picture as JSON and as a live feed.

    GET /                   the page; everything it loads comes from this server (CSP 'self')
    GET /static/<file>      the page's script and style sheet
    GET /vendor/leaflet/…   the mapping library (Leaflet), from web/node_modules (``make web``)
    GET /data/china-boundaries.geojson   administrative boundaries (``boundaries.py``, ``make web``)
    GET /api/situation      the current picture (JSON)
    GET /api/events         server-sent events: the picture, each time it changes
    GET /healthz            200 once the hub has been read at least once

One thread polls the hub every ``interval`` seconds and keeps the last picture; every client
is served from it, so the hub sees one reader however many duty officers watch.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from citynerve.observability.situation.assets import BOUNDARIES, LEAFLET, STATIC

_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
          ".geojson": "application/geo+json"}
#: Every file served besides the page: URL path -> file. Nothing else under web/ is reachable.
ASSETS: dict[str, Path] = {
    "/static/app.js": STATIC / "app.js",
    "/static/style.css": STATIC / "style.css",
    "/vendor/leaflet/leaflet.js": LEAFLET / "leaflet.js",
    "/vendor/leaflet/leaflet.css": LEAFLET / "leaflet.css",
    **{f"/vendor/leaflet/images/{name}": LEAFLET / "images" / name
       for name in ("layers.png", "layers-2x.png", "marker-icon.png", "marker-icon-2x.png",
                    "marker-shadow.png")},
    "/data/china-boundaries.geojson": BOUNDARIES,
}
CSP = ("default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
KEEPALIVE_SECONDS = 15.0

log = logging.getLogger(__name__)


class PictureFeed:
    """The latest picture, refreshed by a poller thread; readers wait for a newer version."""

    def __init__(self, source: Callable[[], dict[str, Any]], interval: float = 1.0) -> None:
        self.source = source
        self.interval = interval
        self.version = 0
        self.payload = b""
        self.error: str | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="situation-poller", daemon=True)

    def start(self) -> PictureFeed:
        self.refresh()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def refresh(self) -> None:
        try:
            picture = self.source()
            error = None
        except Exception as exc:  # noqa: BLE001 - the hub may be down or refuse: keep the last picture, say so
            log.warning("reading the hub failed: %s", exc)
            error = f"cannot read the hub: {type(exc).__name__}: {exc}"[:500]
            picture = json.loads(self.payload) if self.payload else {"cities": [], "incidents": []}
        picture["error"] = error
        payload = json.dumps(picture, sort_keys=True).encode()
        with self._changed:
            if payload != self.payload:
                self.payload, self.error = payload, error
                self.version += 1
                self._changed.notify_all()

    def wait_newer(self, version: int, timeout: float) -> tuple[int, bytes]:
        with self._changed:
            self._changed.wait_for(lambda: self.version != version or self._stop.is_set(), timeout)
            return self.version, self.payload

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()


def page() -> bytes:
    return (STATIC / "index.html").read_bytes()


def missing_assets() -> list[Path]:
    """The served files that are not there (``make web`` installs them)."""
    return [file for file in ASSETS.values() if not file.is_file()]


_ASSET_CACHE: dict[Path, tuple[float, bytes, bytes]] = {}


def _asset(file: Path) -> tuple[bytes, bytes]:
    """A served file's bytes and their gzip (boundaries: 1.7 MB, 0.5 MB gzipped), kept until it changes."""
    mtime = file.stat().st_mtime
    cached = _ASSET_CACHE.get(file)
    if cached is None or cached[0] != mtime:
        body = file.read_bytes()
        cached = _ASSET_CACHE[file] = (mtime, body, gzip.compress(body, compresslevel=6, mtime=0))
    return cached[1], cached[2]


class _Handler(BaseHTTPRequestHandler):
    server: SituationServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, cache: bool = False,
              gzipped: bytes | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if gzipped is not None and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzipped
            self.send_header("Content-Encoding", "gzip")
        if gzipped is not None:
            self.send_header("Vary", "Accept-Encoding")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=60" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        feed = self.server.feed
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, _TYPES[".html"])
        elif path in ASSETS:
            file = ASSETS[path]
            if not file.is_file():
                self._send(HTTPStatus.NOT_FOUND, f"{path} is not installed: run `make web`\n".encode(),
                           "text/plain")
                return
            body, packed = _asset(file)
            self._send(HTTPStatus.OK, body, _TYPES[file.suffix], cache=True,
                       gzipped=None if file.suffix == ".png" else packed)
        elif path == "/api/situation":
            self._send(HTTPStatus.OK, feed.payload, "application/json")
        elif path == "/api/events":
            self._events(feed)
        elif path == "/healthz":
            ok = feed.version > 0
            self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                       b"ok\n" if ok else b"starting\n", "text/plain")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _events(self, feed: PictureFeed) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        version, payload = feed.version, feed.payload
        try:
            self.wfile.write(b"retry: 2000\ndata: " + payload + b"\n\n")
            self.wfile.flush()
            while not feed.stopped:
                newer, payload = feed.wait_newer(version, KEEPALIVE_SECONDS)
                if feed.stopped:
                    break
                if newer == version:
                    self.wfile.write(b": keep-alive\n\n")
                else:
                    version = newer
                    self.wfile.write(b"data: " + payload + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return


class SituationServer(ThreadingHTTPServer):
    """``SituationServer(("127.0.0.1", 8080), feed).serve_forever()``; `start`/`stop` run it on a thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], feed: PictureFeed) -> None:
        super().__init__(address, _Handler)
        self.feed = feed
        self.page = page()
        missing = missing_assets()
        if missing:
            log.warning("the map's library and boundaries are missing (run `make web`): %s",
                        ", ".join(str(f) for f in missing))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> SituationServer:
        self.feed.start()
        self._thread = threading.Thread(target=self.serve_forever, name="situation-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.feed.stop()
        self.shutdown()
        self.server_close()


def serve_hub(
    api: Any, host: str = "127.0.0.1", port: int = 8080, interval: float = 1.0,
) -> SituationServer:
    """A started server showing the hub that ``api`` (a ``kubernetes.client.ApiClient``) reaches."""
    from citynerve.observability.situation.picture import HubReader  # noqa: PLC0415

    return SituationServer((host, port), PictureFeed(HubReader(api).picture, interval)).start()


def run(kubeconfig: str | None, context: str | None, host: str, port: int, interval: float = 1.0) -> int:
    """``citynerve hub dashboard``: serve until interrupted."""
    from kubernetes import config  # noqa: PLC0415

    api = config.new_client_from_config(kubeconfig, context=context)
    server = serve_hub(api, host, port, interval)
    print(f"situation map on {server.url} (Ctrl-C to stop)", flush=True)  # noqa: T201 - a command's output
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
