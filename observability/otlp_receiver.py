"""A local OTLP/HTTP receiver (protobuf): keeps the spans and metric names it is sent, in memory.

For tests and for looking at a local run's traces without a collector::

    receiver = LocalOtlpReceiver().start()      # receiver.endpoint -> http://127.0.0.1:<port>
    configure_telemetry("x", otlp_endpoint=receiver.endpoint)
    ...
    receiver.spans                                # [ReceivedSpan(...), ...]

or as a process of its own (``GET /stats`` answers span count and metric names as JSON)::

    python -m citynerve.observability.otlp_receiver [--port 4318]   # prints its endpoint
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
import zlib
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any] = field(default_factory=dict)


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


class _Handler(BaseHTTPRequestHandler):
    server: LocalOtlpReceiver

    def log_message(self, *_: Any) -> None:
        return

    def do_GET(self) -> None:
        if self.path != "/stats":
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with self.server._lock:
            body = json.dumps({"spans": len(self.server.spans),
                               "metrics": sorted(self.server.metric_names)}).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            self.server.add_traces(request)
            reply = ExportTraceServiceResponse().SerializeToString()
        elif self.path == "/v1/metrics":
            metrics_request = ExportMetricsServiceRequest()
            metrics_request.ParseFromString(body)
            self.server.add_metrics(metrics_request)
            reply = ExportMetricsServiceResponse().SerializeToString()
        else:
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


class LocalOtlpReceiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self._lock = threading.Lock()
        self.spans: list[ReceivedSpan] = []
        self.metric_names: set[str] = set()
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def add_traces(self, request: ExportTraceServiceRequest) -> None:
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                received.extend(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes={kv.key: _value(kv.value) for kv in span.attributes},
                        resource=resource,
                    )
                    for span in scope_spans.spans
                )
        with self._lock:
            self.spans.extend(received)

    def add_metrics(self, request: ExportMetricsServiceRequest) -> None:
        names = {
            metric.name
            for resource_metrics in request.resource_metrics
            for scope_metrics in resource_metrics.scope_metrics
            for metric in scope_metrics.metrics
        }
        with self._lock:
            self.metric_names |= names

    def start(self) -> LocalOtlpReceiver:
        self._thread = threading.Thread(target=self.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m citynerve.observability.otlp_receiver",
                                     description="A local OTLP/HTTP receiver that keeps what it is sent.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318, help="0: any free port (default: %(default)s)")
    args = parser.parse_args(argv)
    receiver = LocalOtlpReceiver(args.host, args.port)
    print(receiver.endpoint, flush=True)  # noqa: T201 - the caller reads the endpoint from here
    try:
        receiver.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
