"""One ingestion worker of a SensorFleet: the container its ingest Deployment runs.

``python -m citynerve.workloads.ingest --config-env CITYNERVE_FLEET_CONFIG`` reads the fleet's
configuration (written into the pod template by the city operator), serves the NGSI-LD batch
endpoint its terminals and gateways post to, runs every payload through ``IngestPipeline``
(malformed entities and readings are quarantined and counted, never dropped silently), and
reports its counters into the fleet's ingest-report ConfigMap under a key of its own
(``worker.<pod>``), so replicas never overwrite each other. The city operator reads that
ConfigMap into the SensorFleet's status: terminals online, freshness, quality, quarantine.

The worker runs as its fleet's own ServiceAccount, which may patch that one ConfigMap and
nothing else: the city operator makes the ConfigMap (and the account) before the workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from citynerve.observability.logs import configure_logging
from citynerve.workloads.ingest.pipeline import IngestPipeline
from citynerve.workloads.ingest.sensor_type import CATALOGUE, SensorType

log = logging.getLogger(__name__)
GROUP, VERSION = "citynerve.io", "v1alpha1"
REPORT_LABEL = "citynerve.io/ingest-report"
WORKER_KEY_PREFIX = "worker."
UPSERT_PATH = "/ngsi-ld/v1/entityOperations/upsert"
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
# A terminal is online while its newest accepted reading is younger than this many intervals.
ONLINE_INTERVALS = 3
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _rfc3339(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class FleetConfig:
    fleet: str
    sensor_type: str
    sampling_interval_s: int
    report_config_map: str

    @classmethod
    def parse(cls, text: str) -> FleetConfig:
        try:
            raw = json.loads(text)
            return cls(str(raw["fleet"]), str(raw["sensorType"]), int(raw["samplingIntervalSeconds"]),
                       str(raw["reportConfigMap"]))
        except (ValueError, KeyError, TypeError) as exc:
            msg = f"the fleet configuration is not what the city operator writes: {exc!r}"
            raise ValueError(msg) from exc


class IngestWorker:
    """The pipeline behind a lock (the HTTP server is threaded) and the report it produces."""

    def __init__(self, config: FleetConfig, sensor_type: SensorType) -> None:
        self.config = config
        self.pipeline = IngestPipeline(sensor_type, window_s=max(60.0, 5.0 * config.sampling_interval_s),
                                       track_terminals=True)
        self._lock = threading.Lock()

    def ingest(self, payload: bytes, now_ms: int | None = None) -> dict[str, int]:
        """One NGSI-LD batch; returns what became of it (readings accepted, entities rejected…)."""
        with self._lock:
            before = (self.pipeline.stats.accepted, self.pipeline.stats.quarantined_total)
            self.pipeline.ingest_ngsi(payload, now_ms if now_ms is not None else int(time.time() * 1000))
            stats = self.pipeline.stats
            return {"accepted": stats.accepted - before[0],
                    "quarantined": stats.quarantined_total - before[1]}

    def report(self, now_ms: int | None = None) -> dict[str, Any]:
        """The counters the operator reads (``compute_fleet_status`` documents each)."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        window_ms = ONLINE_INTERVALS * self.config.sampling_interval_s * 1000
        with self._lock:
            stats = self.pipeline.stats
            newest = self.pipeline.newest_reading_ms()
            report: dict[str, Any] = {
                "reportedAt": _rfc3339(now_ms),
                "terminalsOnline": self.pipeline.terminals_seen_since(now_ms - window_ms),
                "acceptedReadings": stats.accepted,
                "rejectedReadings": stats.quarantined_total,
                "duplicateReadings": stats.duplicates,
                "quarantinedPayloads": stats.quarantined_total,
                "quarantineReasons": dict(sorted(stats.quarantined.items())),
            }
        if newest is not None:
            report["lastReadingTime"] = _rfc3339(newest)
        return report


class ReportNotFoundError(Exception):
    """The fleet's report ConfigMap is not there (yet): the city operator makes it."""


class ReportWriter:
    """Merges this worker's key into the fleet's report ConfigMap; writes only on change.

    A patch is all the worker may do: creating a ConfigMap is the operator's, since RBAC cannot
    narrow `create` to one name.
    """

    def __init__(self, namespace: str, name: str, fleet: str, worker: str,
                 kubeconfig: str | None = None, context: str | None = None) -> None:
        from kubernetes import client, config  # noqa: PLC0415 - only the reporting worker needs it

        # A configuration of its own: workers of several clusters may share a process (the demo).
        configuration = client.Configuration()
        if kubeconfig or os.environ.get("KUBECONFIG"):
            config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
        self.core = client.CoreV1Api(client.ApiClient(configuration))
        self.namespace, self.name, self.fleet = namespace, name, fleet
        self.key = f"{WORKER_KEY_PREFIX}{worker}"
        self._last: str | None = None

    def write(self, report: Mapping[str, Any]) -> bool:
        from kubernetes import client  # noqa: PLC0415

        text = json.dumps(report, sort_keys=True)
        if text == self._last:
            return False
        body = {"metadata": {"labels": {REPORT_LABEL: self.fleet}}, "data": {self.key: text}}
        try:
            self.core.patch_namespaced_config_map(self.name, self.namespace, body)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            msg = (f"ConfigMap {self.namespace}/{self.name} does not exist; the city operator makes it "
                   f"with SensorFleet {self.fleet}")
            raise ReportNotFoundError(msg) from exc
        self._last = text
        return True


class RunningWorker:
    """A worker serving its endpoint and reporting every ``report_seconds``, on threads of its own."""

    def __init__(self, worker: IngestWorker, writer: ReportWriter, address: str = "127.0.0.1",
                 port: int = 0, report_seconds: float = 15.0) -> None:
        self.worker, self.writer = worker, writer
        self.report_seconds = report_seconds
        self.server = ThreadingHTTPServer((address, port), _handler(worker))
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.server.serve_forever, name="ingest-http", daemon=True),
                         threading.Thread(target=self._report, name="ingest-report", daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}{UPSERT_PATH}"

    def _report(self) -> None:
        while True:
            try:
                self.writer.write(self.worker.report())
            except Exception as exc:  # noqa: BLE001 - an API server away is worth a line, not a traceback per beat
                log.warning("could not write the ingest report of %s; trying again: %s",
                            self.worker.config.fleet, str(exc).splitlines()[0] if str(exc) else repr(exc))
            if self._stop.wait(self.report_seconds):
                return

    def stop(self) -> None:
        """A last report, then the endpoint closes."""
        self._stop.set()
        self._threads[1].join(10)
        try:
            self.writer.write(self.worker.report())
        except Exception:
            log.exception("could not write the last ingest report of %s", self.worker.config.fleet)
        self.server.shutdown()
        self.server.server_close()


def _handler(worker: IngestWorker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

        def _reply(self, status: HTTPStatus, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(HTTPStatus.OK, {"fleet": worker.config.fleet})
            elif self.path == "/report":
                self._reply(HTTPStatus.OK, worker.report())
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no {self.path}; POST {UPSERT_PATH}"})

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != UPSERT_PATH:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no {self.path}; POST {UPSERT_PATH}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_PAYLOAD_BYTES:
                self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"over {MAX_PAYLOAD_BYTES} bytes"})
                return
            result = worker.ingest(self.rfile.read(length))
            # 207: some entities may have been quarantined; the body says how many readings were.
            status = HTTPStatus.MULTI_STATUS if result["quarantined"] else HTTPStatus.NO_CONTENT
            if status == HTTPStatus.NO_CONTENT:
                self.send_response(status)
                self.end_headers()
            else:
                self._reply(status, result)

    return Handler


def load_sensor_type(name: str, writer: ReportWriter | None) -> SensorType:
    """The fleet's SensorType from the API (the hub's catalogue), else the built-in one."""
    if writer is not None:
        from kubernetes import client  # noqa: PLC0415

        try:
            body = client.CustomObjectsApi(writer.core.api_client).get_cluster_custom_object(
                GROUP, VERSION, "sensortypes", name)
            return SensorType.from_resource(name, body["spec"])
        except client.ApiException as exc:
            if exc.status != 404 or name not in CATALOGUE:
                raise
    if name in CATALOGUE:
        return CATALOGUE[name]
    msg = f"SensorType {name} is neither in the cluster nor built in"
    raise ValueError(msg)


def _namespace(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if _NAMESPACE_FILE.exists():
        return _NAMESPACE_FILE.read_text().strip()
    msg = "no namespace: pass --namespace or set POD_NAMESPACE"
    raise ValueError(msg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m citynerve.workloads.ingest", description=__doc__)
    parser.add_argument("--config-env", default="CITYNERVE_FLEET_CONFIG",
                        help="environment variable holding the fleet configuration (default: %(default)s)")
    parser.add_argument("--address", default="0.0.0.0", help="listen address (default: %(default)s)")  # noqa: S104
    parser.add_argument("--port", type=int, default=8080, help="listen port (default: %(default)s)")
    parser.add_argument("--report-seconds", type=float, default=15.0,
                        help="seconds between reports to the fleet's ConfigMap (default: %(default)s)")
    parser.add_argument("--namespace", default=None, help="the fleet's namespace (default: $POD_NAMESPACE)")
    parser.add_argument("--worker", default=os.environ.get("POD_NAME") or os.uname().nodename,
                        help="this worker's name in the report (default: $POD_NAME)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster or $KUBECONFIG)")
    parser.add_argument("--context", default=None, help="context in --kubeconfig")
    args = parser.parse_args(argv)
    configure_logging("INFO")
    try:
        config = FleetConfig.parse(os.environ.get(args.config_env, ""))
        writer = ReportWriter(_namespace(args.namespace), config.report_config_map, config.fleet, args.worker,
                              args.kubeconfig, args.context)
        worker = IngestWorker(config, load_sensor_type(config.sensor_type, writer))
    except ValueError as exc:
        log.error("%s", exc)  # noqa: TRY400 - a configuration error, not a crash to trace
        return 2
    running = RunningWorker(worker, writer, args.address, args.port, args.report_seconds)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("fleet %s (%s): listening on %s, reporting to ConfigMap %s", config.fleet, config.sensor_type,
             running.url, config.report_config_map)
    stop.wait()
    running.stop()
    return 0
