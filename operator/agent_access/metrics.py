"""Prometheus metrics (prefix agentaccess_) and the HTTP endpoints that serve them.

`/metrics`, `/healthz` (the process is alive) and `/readyz` (the operator has
started and is watching) on --metrics-port.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from .runtime import Registry

AUTHZ_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.grants = Counter("agentaccess_grants_issued", "Grants issued", registry=r)
        self.denials = Counter(
            "agentaccess_grants_denied", "Requests denied", ["reason"], registry=r
        )
        self.revocations = Counter(
            "agentaccess_grants_revoked", "Grants ended, by reason", ["reason"], registry=r
        )
        self.issue_failures = Counter(
            "agentaccess_issue_failures", "Grants that could not be issued", registry=r
        )
        self.active = Gauge("agentaccess_active_grants", "Grants live now", registry=r)
        self.overdue = Gauge(
            "agentaccess_overdue_grants",
            "Live grants past expiresAt (must stay 0: a non-zero value means a broken timer)",
            registry=r,
        )
        self.grant_latency = Histogram(
            "agentaccess_grant_latency_seconds",
            "AgentTask creation to Active",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.revoke_latency = Histogram(
            "agentaccess_revocation_latency_seconds",
            "Trigger to bindings and identity gone",
            ["trigger"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.api_requests = Counter(
            "agentaccess_kubernetes_api_requests",
            "Kubernetes API requests by verb, resource and status code",
            ["verb", "resource", "code"],
            registry=r,
        )
        self.api_errors = Counter(
            "agentaccess_kubernetes_api_errors",
            "Kubernetes API errors by verb and status code (0: no response)",
            ["verb", "code"],
            registry=r,
        )
        self.notifications = Counter(
            "agentaccess_notifications",
            "Notifications by result: delivered, failed (given up after retries), dropped "
            "(a receiver's queue was full)",
            ["result"],
            registry=r,
        )
        self.leader = Gauge(
            "agentaccess_leader",
            "1 when this instance acts: it holds the leader Lease, or runs without election",
            registry=r,
        )
        self.handler_seconds = Histogram(
            "agentaccess_handler_duration_seconds",
            "Time spent in operator handlers",
            ["handler"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.authz_calls = Counter(
            "agentaccess_authz_calls",
            "Calls of per-task identities the authorization webhook answered, by decision "
            "(deny, no-opinion: RBAC decides, overloaded: denied without evaluation)",
            ["decision"],
            registry=r,
        )
        self.authz_latency = Histogram(
            "agentaccess_authz_latency_seconds",
            "Time to answer one SubjectAccessReview (request read to answer)",
            buckets=AUTHZ_BUCKETS,
            registry=r,
        )
        self.audit_event_lines = Counter(
            "agentaccess_audit_events",
            "API server audit events received on the audit webhook: recorded (use lines "
            "written) or refused (the use log was full; the API server sends them again)",
            ["result"],
            registry=r,
        )

        self.server_feature = Gauge(
            "agentaccess_server_feature",
            "1 when the API server serves a feature the operator's protections rest on "
            "(checked at start-up, docs/versions.md)",
            ["feature"],
            registry=r,
        )
        self.server_supported = Gauge(
            "agentaccess_server_supported",
            "1 when the API server's version is in the supported range and serves every "
            "such feature",
            ["version"],
            registry=r,
        )

    def server(self, report: Any) -> None:
        for name, present in report.features.items():
            self.server_feature.labels(feature=name).set(1 if present else 0)
        self.server_supported.labels(version=report.version).set(0 if report.unsafe else 1)

    def bind_registry(self, grants: Registry, clock: Callable[[], datetime]) -> None:
        self.active.set_function(lambda: len(grants))

        def overdue() -> float:
            now = clock()
            # A grant is overdue once its deadline is a full second behind.
            return sum(
                1 for g in grants.all() if g.expires_at and (now - g.expires_at).total_seconds() > 1
            )

        self.overdue.set_function(overdue)

    # -- recording ---------------------------------------------------------------------

    def granted(self, created_at: datetime | None, now: datetime) -> None:
        self.grants.inc()
        if created_at:
            self.grant_latency.observe(max(0.0, (now - created_at).total_seconds()))

    def denied(self, reason: str) -> None:
        self.denials.labels(reason=str(reason)).inc()

    def revoked(self, reason: str, seconds: float) -> None:
        self.revocations.labels(reason=str(reason)).inc()
        self.revoke_latency.labels(trigger=str(reason)).observe(max(0.0, seconds))

    def stage_left(self, seconds: float) -> None:
        """A staged task moved on: its previous stage's bindings gone (403)."""
        self.revoke_latency.labels(trigger="StageAdvanced").observe(max(0.0, seconds))

    def timed(self, handler: str) -> _Timed:
        return _Timed(self.handler_seconds.labels(handler=handler))

    def notification(self, result: str) -> None:
        self.notifications.labels(result=result).inc()

    def issue_failed(self) -> None:
        self.issue_failures.inc()

    def authz_call(self, decision: str, seconds: float | None) -> None:
        self.authz_calls.labels(decision=decision).inc()
        if seconds is not None:
            self.authz_latency.observe(seconds)

    def audit_events(self, result: str, count: int) -> None:
        self.audit_event_lines.labels(result=result).inc(count)

    def api_call(self, verb: str, resource: str, code: int, seconds: float) -> None:
        self.api_requests.labels(verb=verb, resource=resource, code=str(code)).inc()
        if code == 0 or code >= 400:
            self.api_errors.labels(verb=verb, code=str(code)).inc()


class Health:
    """Liveness and readiness state shared with the HTTP server.

    /readyz is 200 with "ok" when this instance leads and watches, 200 with
    "standby" while it waits for the leader Lease (a healthy replica), and 503
    while starting.
    """

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.standby = threading.Event()
        #: Also needed for readiness (the enforcement point: its watches have listed).
        self.also: list[Callable[[], bool]] = []
        #: Needed for liveness (the enforcement point's event loop still runs).
        self.alive: list[Callable[[], bool]] = []


def serve(
    metrics: Metrics, health: Health, port: int, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype, code = generate_latest(metrics.registry), CONTENT_TYPE_LATEST, 200
            elif path == "/healthz":
                if all(check() for check in health.alive):
                    body, ctype, code = b"ok\n", "text/plain", 200
                else:
                    body, ctype, code = b"stuck\n", "text/plain", 503
            elif path == "/readyz":
                if not all(check() for check in health.also):
                    body, code = b"not ready\n", 503
                elif health.ready.is_set():
                    body, code = b"ok\n", 200
                elif health.standby.is_set():
                    body, code = b"standby\n", 200
                else:
                    body, code = b"not ready\n", 503
                ctype = "text/plain"
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep stdout for audit lines
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


class _Timed:
    """with metrics.timed("reconcile"): ... observes how long the block took."""

    def __init__(self, histogram: Any):
        self.histogram = histogram

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.histogram.observe(time.monotonic() - self.started)
