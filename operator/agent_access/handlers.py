"""kopf handlers: with kopf_state, the only modules that import kopf.

Each handler is a few lines that hand off to the grant service. Handlers are
synchronous; kopf runs them in its thread pool.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from .audit import AuditLog
from .kopf_state import MemoryDiffBaseStorage, MemoryProgressStorage
from .kube import AGENT_TASKS, Kube, KubeError
from .metrics import Health, Metrics
from .model import FINALIZER, GROUP, TASKS, VERSION
from .rules import DEFAULT_GUARDRAILS, Guardrails
from .service import Service

log = logging.getLogger(__name__)


@dataclass
class Config:
    """Set by the command line before kopf starts."""

    audit_file: str | None = None
    guardrails: Guardrails = DEFAULT_GUARDRAILS
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    workers: int = 16
    watch_workers: int = 64


CONFIG = Config()
_service: Service | None = None
_progress = MemoryProgressStorage(prefix=GROUP)
_diffbase = MemoryDiffBaseStorage()


def service() -> Service:
    if _service is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return _service


class _timed:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        CONFIG.metrics.handler_seconds.labels(handler=self.name).observe(
            time.monotonic() - self.started
        )


@kopf.on.startup()
def start(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _service
    settings.persistence.finalizer = FINALIZER
    # Never read bookkeeping from the object: anyone who may patch a task could plant it.
    settings.persistence.progress_storage = _progress
    settings.persistence.diffbase_storage = _diffbase
    settings.posting.enabled = False  # the service writes its own Events
    settings.execution.max_workers = max(8, CONFIG.workers)
    settings.watching.server_timeout = 300
    settings.scanning.disabled = True
    # Bound how many objects kopf works on at once (per watched kind), and let idle
    # per-object workers go after 0.1 s: a burst of new tasks then cannot drive the
    # peak (and the memory the process keeps afterwards) up with its size.
    # Measured at 300 new tasks: RSS 171 MB unbounded, 94 MB with 64, same throughput.
    settings.batching.worker_limit = CONFIG.watch_workers
    settings.batching.idle_timeout = 0.1
    # Connections for every thread that may call at once (decisions with their
    # concurrent writes, revocations, watches): a full pool would discard connections
    # and pay a TLS handshake for each new one.
    kube = Kube.from_environment(
        pool_size=4 * CONFIG.workers + 16, observer=CONFIG.metrics.api_call
    )
    _service = Service(
        kube,
        AuditLog(path=CONFIG.audit_file),
        CONFIG.metrics,
        CONFIG.guardrails,
        workers=CONFIG.workers,
    )
    _service.start()
    CONFIG.health.ready.set()


@kopf.on.cleanup()
def stop(**_: Any) -> None:
    CONFIG.health.ready.clear()
    if _service is not None:
        _service.close()


@kopf.on.event(GROUP, VERSION, TASKS)
def task_seen(type: str | None, body: kopf.Body, **_: Any) -> None:
    if _service is None:
        return
    if type == "DELETED":  # also when the finalizer was removed by someone else
        _service.on_task_gone(body)
        _task_locks.pop(body["metadata"]["uid"], None)
        _progress.forget(body["metadata"]["uid"])
        _diffbase.forget(body["metadata"]["uid"])
    else:
        try:
            _service.seen(body)
        except KubeError as exc:
            log.warning("could not restore the status of %s: %s", body["metadata"]["name"], exc)


#: One lock per task. A decision runs in the background, so kopf's worker is free at
#: once for other tasks (a burst of costly requests cannot hold up anyone's cancel or
#: deletion); later events of the same task wait for its decision.
_task_locks: dict[str, asyncio.Lock] = {}
_deciding: set[asyncio.Task[None]] = set()


@kopf.on.create(GROUP, VERSION, TASKS)
@kopf.on.resume(GROUP, VERSION, TASKS)
@kopf.on.update(GROUP, VERSION, TASKS)
async def reconcile_task(body: kopf.Body, **_: Any) -> None:
    svc = service()
    lock = _task_locks.setdefault(body["metadata"]["uid"], asyncio.Lock())
    if svc.needs_decision(body) and not lock.locked():
        await lock.acquire()  # free: returns at once
        job = asyncio.create_task(_decide(svc, copy.deepcopy(dict(body)), lock))
        _deciding.add(job)
        job.add_done_callback(_deciding.discard)
        return
    if not svc.has_work(body):
        return  # e.g. the status write of a grant ending: nothing to wait in line for
    async with lock:  # cancel, re-checks: on the revocation threads
        await asyncio.get_running_loop().run_in_executor(svc.pool, _reconcile, svc, body)


async def _decide(svc: Service, body: dict[str, Any], lock: asyncio.Lock) -> None:
    """Decide on the decision threads; on API errors try again (with the task as it is
    then) until it is decided or gone. Holds the task's lock throughout."""
    loop = asyncio.get_running_loop()
    meta = body["metadata"]
    delay = 1.0
    try:
        while True:
            try:
                await loop.run_in_executor(svc.decisions, _run_reconcile, svc, body)
                return
            except KubeError as exc:
                log.warning(
                    "deciding %s/%s failed, retrying: %s", meta["namespace"], meta["name"], exc
                )
            except Exception:
                log.exception("deciding %s/%s failed", meta["namespace"], meta["name"])
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            try:
                fresh = await loop.run_in_executor(
                    svc.pool, svc.kube.get, AGENT_TASKS, meta["namespace"], meta["name"]
                )
            except KubeError:
                continue
            if not fresh or fresh["metadata"]["uid"] != meta["uid"]:
                return
            body = fresh
    finally:
        lock.release()


def _run_reconcile(svc: Service, body: Mapping[str, Any]) -> None:
    with _timed("reconcile"):
        svc.reconcile(body)


def _reconcile(svc: Service, body: kopf.Body) -> None:
    try:
        _run_reconcile(svc, body)
    except KubeError as exc:  # the API is struggling: try again soon, not in 60 s
        raise kopf.TemporaryError(f"API error, retrying: {exc}", delay=1) from exc


@kopf.on.delete(GROUP, VERSION, TASKS)
async def task_deleted(body: kopf.Body, **_: Any) -> None:
    svc = service()
    async with _task_locks.setdefault(body["metadata"]["uid"], asyncio.Lock()):
        await asyncio.get_running_loop().run_in_executor(svc.pool, _delete, svc, body)


def _delete(svc: Service, body: kopf.Body) -> None:
    with _timed("delete"):
        try:
            svc.on_task_deleted(body)
        except KubeError as exc:
            raise kopf.TemporaryError(f"API error, retrying: {exc}", delay=1) from exc


# Policies, cluster policies, namespaces, ServiceAccounts and pods are watched by the
# service itself (facts.Cache): compact in-memory facts, changes filtered before any
# work, no kopf machinery per event of an unrelated pod.
