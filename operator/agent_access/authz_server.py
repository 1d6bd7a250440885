"""The HTTPS endpoint the API server calls: `POST /authorize` (SubjectAccessReview,
its authorization webhook) and `POST /audit` (audit.k8s.io/v1 EventList, its audit
webhook backend), on one TLS port (--authz-port), plus `GET /healthz`.

Why aiohttp: an asyncio HTTP/1.1 server with keep-alive and TLS from the standard
`ssl` module, mature and in wide production use, and already how this project's
tests talk HTTP; each review is decided from memory in microseconds, so one event
loop on a thread of its own serves thousands of reviews a second without a thread
per connection (http.server's model) and without a second process (the state it
reads lives in this one). uvicorn/hypercorn would add an ASGI layer for nothing.

Bounded: a request body is at most 256 KiB (reviews) or 16 MiB (audit batches); at
most MAX_INFLIGHT reviews are in the handler at once; when the event loop runs
more than OVERLOAD_LAG behind, or the use log is full, per-task identities are
denied at once rather than queued. With --authz-client-ca only clients with a
certificate from that CA (the API server) are served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from .authz import ReviewError
from .faults import hold
from .gate import Gate, Pending

log = logging.getLogger(__name__)

MAX_INFLIGHT = 256
#: The event loop this far behind (seconds): per-task identities are denied at once.
OVERLOAD_LAG = 0.1
#: Seconds without the event loop running after which the process reports itself
#: not alive (/healthz on the metrics port: 503).
STUCK_AFTER = 10.0
REVIEW_MAX_BYTES = 256 * 1024
AUDIT_MAX_BYTES = 16 * 1024 * 1024
CERT_CHECK_SECONDS = 30.0
#: How long a call waits for its re-check (the API server gives the webhook 3 s).
RECHECK_WAIT = 2.0


def tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


class AuthzServer:
    def __init__(
        self,
        gate: Gate,
        port: int,
        cert: str,
        key: str,
        client_ca: str | None = None,
        host: str = "0.0.0.0",
        metrics: Any = None,
    ):
        self.gate = gate
        self.port = port
        self.host = host
        self.cert, self.key = cert, key
        self.metrics = metrics
        self.ctx = tls_context(cert, key, client_ca)
        self._mtimes = self._cert_mtimes()
        self._inflight = 0
        self._lag = 0.0
        #: When the event loop last ran its lag probe (monotonic): see responsive().
        self._beat = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Audit batches (megabytes of JSON): read off the event loop, one at a time.
        self._audit_pool = ThreadPoolExecutor(1, thread_name_prefix="authz-audit")

    # -- running ------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Listen (raises if the port cannot be bound)."""
        threading.Thread(target=self._run, name="authz-server", daemon=True).start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the authorization webhook did not start on port {self.port}")
        if self._error is not None:
            raise RuntimeError(f"the authorization webhook cannot listen: {self._error}")
        log.info("authorization webhook listening on https://%s:%d", self.host, self.port)

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is not None and runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        app = web.Application(client_max_size=AUDIT_MAX_BYTES)
        app.router.add_post("/authorize", self._authorize)
        app.router.add_post("/audit", self._audit)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(
                runner, self.host, self.port, ssl_context=self.ctx, backlog=1024,
                reuse_address=True,
            )  # fmt: skip
            loop.run_until_complete(site.start())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._runner = runner
        self._tasks = [loop.create_task(self._watch_lag()), loop.create_task(self._watch_certs())]
        self._ready.set()
        loop.run_forever()

    async def _watch_lag(self) -> None:
        interval = 0.05
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval)
            self._beat = time.monotonic()
            self._lag = max(0.0, self._beat - before - interval)

    def responsive(self) -> bool:
        """False once the event loop has not run for STUCK_AFTER seconds: no review is
        being answered (the API server refuses per-task identities on its timeout) and
        none will be; the operator's /healthz fails so the kubelet restarts it."""
        return time.monotonic() - self._beat < STUCK_AFTER

    def _cert_mtimes(self) -> tuple[float, float]:
        try:
            return os.stat(self.cert).st_mtime, os.stat(self.key).st_mtime
        except OSError:
            return (0.0, 0.0)

    async def _watch_certs(self) -> None:
        """A renewed certificate (cert-manager, a re-mounted Secret) is served from the
        next handshake on, without a restart."""
        while True:
            await asyncio.sleep(CERT_CHECK_SECONDS)
            mtimes = self._cert_mtimes()
            if mtimes != self._mtimes:
                try:
                    self.ctx.load_cert_chain(self.cert, self.key)
                    self._mtimes = mtimes
                    log.info("authorization webhook: serving certificate reloaded")
                except (OSError, ssl.SSLError) as exc:
                    log.warning("authorization webhook: new certificate not loaded: %s", exc)

    # -- handlers -----------------------------------------------------------------------

    async def _authorize(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        if request.content_length is not None and request.content_length > REVIEW_MAX_BYTES:
            return web.Response(status=413, text="review too large")
        self._inflight += 1
        try:
            hold("authz:review")  # tests: the event loop blocked (a stuck webhook)
            raw = await request.read()
            if len(raw) > REVIEW_MAX_BYTES:
                return web.Response(status=413, text="review too large")
            try:
                body = json.loads(raw)
            except ValueError:
                return web.Response(status=400, text="not JSON")
            overloaded = self._inflight > MAX_INFLIGHT or self._lag > OVERLOAD_LAG
            try:
                found = self.gate.overloaded(body) if overloaded else self.gate.review(body)
            except ReviewError as exc:
                log.warning("authorization webhook: unreadable review: %s", exc)
                if self.metrics is not None:
                    self.metrics.authz_call("malformed", None)
                return web.Response(status=400, text=str(exc))
            if isinstance(found, Pending):
                # a re-check not known yet: computed on the gate's threads (once for
                # every call waiting on the same facts), awaited here, so other
                # identities keep being answered meanwhile
                verdict: Any
                try:
                    verdict = await asyncio.wait_for(
                        asyncio.shield(asyncio.wrap_future(self.gate.begin(found))),
                        RECHECK_WAIT,
                    )
                except Exception as exc:  # timed out or failed: refused, and logged
                    verdict = exc
                found = self.gate.complete(found, verdict)
            answer = found
            denied = bool(answer["status"].get("denied"))
            decision = "deny" if denied else "no-opinion"
            if overloaded and denied:
                decision = "overloaded"
            if self.metrics is not None:
                self.metrics.authz_call(decision, time.perf_counter() - started)
            return web.json_response(answer)
        finally:
            self._inflight -= 1

    async def _audit(self, request: web.Request) -> web.Response:
        raw = await request.read()
        loop = asyncio.get_running_loop()
        try:  # a batch can be megabytes: read off the event loop
            count = await loop.run_in_executor(self._audit_pool, self._audit_batch, raw)
        except ValueError:
            return web.Response(status=400, text="not JSON")
        except queue.Full:
            if self.metrics is not None:
                self.metrics.audit_events("refused", 1)
            return web.Response(status=503, text="use log full; send again later")
        if self.metrics is not None:
            self.metrics.audit_events("recorded", count)
        return web.json_response({})

    def _audit_batch(self, raw: bytes) -> int:
        return self.gate.audit_events(json.loads(raw))

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.gate.listed():
            return web.Response(text="ok")
        return web.Response(status=503, text="starting")
