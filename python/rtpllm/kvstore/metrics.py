"""`rtpllm kvstore serve`'s Prometheus endpoint: GET /metrics on its own small HTTP server.

The store's counters live in C++ (KVStoreServerStats); they are read once per scrape, so the
endpoint costs the store nothing between scrapes. Names follow serve's (`rtpllm:` prefix,
`_total` counters). Bytes in and out are what clients were handed slots for: the store hands out
slots and the clients move the bytes one-sided (committed saves in, pinned loads out).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "rtpllm:kvstore_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StoreCollector(Collector):
    def __init__(self, stats: Callable[[], object]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        yield counter("hit_blocks", "Blocks handed out to loads (pinned for a client).", s.pinned_hits)
        yield counter("misses", "Pin requests refused: a block not held (evicted, never saved).", s.pin_misses)
        yield counter("pin_requests", "Pin requests (loads) received.", s.pin_requests)
        yield counter("bytes_in", "Bytes of blocks saved into the store.", s.saved_blocks * s.bytes_per_block)
        yield counter("bytes_out", "Bytes of blocks handed out to loads.", s.pinned_hits * s.bytes_per_block)
        yield counter("saved_blocks", "Blocks saved (committed).", s.saved_blocks)
        yield counter("skipped_blocks", "Blocks offered for saving that were held already, or found no room.",
                      s.skipped_blocks)
        yield counter("evicted_blocks", "Blocks evicted from memory (least recently used).", s.evicted_blocks)
        yield counter("disk_reads", "Blocks read back from disk for a load.", s.disk_reads)
        yield counter("expired_pins", "Pins dropped by the lease (--pin-lease-s): never released by a live client.",
                      s.expired_pins)
        yield counter("expired_pin_blocks", "Blocks of the pins the lease dropped.", s.expired_pin_blocks)
        yield counter("refused_clients", "Clients refused (identity or shape mismatch, too many clients).",
                      s.refused_clients)
        yield counter("bad_requests", "Error replies and connections dropped for a malformed message.",
                      s.bad_requests)
        yield gauge("blocks_held", "Blocks held in memory.", s.used_blocks)
        yield gauge("blocks_capacity", "Block slots in memory.", s.capacity_blocks)
        yield gauge("blocks_pinned", "Blocks pinned now (being read by a client or the disk tier).", s.pinned_blocks)
        yield gauge("disk_blocks", "Blocks known to be on disk.", s.disk_blocks)
        yield gauge("clients", "Clients connected now.", s.clients)


class MetricsServer:
    """GET /metrics (and /health) on host:port (0: any free port) from a daemon thread."""

    def __init__(self, stats: Callable[[], object], host: str, port: int):
        registry = CollectorRegistry()
        registry.register(_StoreCollector(stats))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] == "/metrics":
                    body, status, kind = generate_latest(registry), 200, CONTENT_TYPE
                elif self.path == "/health":
                    body, status, kind = b"ok\n", 200, "text/plain"
                else:
                    body, status, kind = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not news
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="rtpllm-kvstore-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
