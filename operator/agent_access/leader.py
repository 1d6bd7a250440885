"""Lease-based leader election (coordination.k8s.io/v1), as Kubernetes controllers do it.

Only the holder of the Lease acts; the others wait and take over when the holder
stops renewing for `lease_duration`. A leader that cannot renew in time exits
the process (it may no longer be the only one acting); its pod restarts as a
standby. `decide` is pure; `LeaderElector` does the I/O through the adapter.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .kube import Conflict, Kube, KubeError, Resource

log = logging.getLogger(__name__)

LEASES = Resource("/apis/coordination.k8s.io/v1", "leases")


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    text = text.rstrip("Z")
    fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in text else "%Y-%m-%dT%H:%M:%S"
    return datetime.strptime(text, fmt).replace(tzinfo=UTC)


@dataclass(frozen=True)
class Verdict:
    """What to do with the Lease as it is now. Purely computational."""

    take: bool  # write ourselves as holder (acquire, renew or take over)
    transitions: int  # leaseTransitions to write


def decide(spec: Mapping[str, Any], identity: str, now: datetime) -> Verdict:
    holder = spec.get("holderIdentity") or ""
    transitions = int(spec.get("leaseTransitions") or 0)
    if holder == identity:
        return Verdict(True, transitions)
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    duration = timedelta(seconds=int(spec.get("leaseDurationSeconds") or 15))
    expired = renewed is None or renewed + duration <= now
    if not holder or expired:
        return Verdict(True, transitions + (1 if holder else 0))
    return Verdict(False, transitions)


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: int = 15,
        retry_seconds: float = 2.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_lost: Callable[[], None] | None = None,
    ):
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.on_lost = on_lost or (lambda: os._exit(1))
        self.leading = threading.Event()
        self._stop = threading.Event()

    def try_acquire(self) -> bool:
        """One attempt to become (or stay) the leader."""
        now = self.clock()
        lease = self.kube.get(LEASES, self.namespace, self.name)
        spec = (lease or {}).get("spec") or {}
        verdict = decide(spec, self.identity, now)
        if not verdict.take:
            return False
        new_spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "acquireTime": spec.get("acquireTime")
            if spec.get("holderIdentity") == self.identity
            else _ts(now),
            "renewTime": _ts(now),
            "leaseTransitions": verdict.transitions,
        }
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": new_spec,
        }
        try:
            if lease is None:
                self.kube.create(LEASES, self.namespace, body)
            else:  # optimistic concurrency: only one contender's write wins
                body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
                self.kube.request(
                    "PUT", LEASES.path(self.namespace, self.name), body=body, resource="leases"
                )
        except Conflict:
            return False
        return True

    def wait_for_leadership(self) -> None:
        """Block until this instance holds the Lease, then keep renewing it."""
        while not self._stop.is_set():
            try:
                if self.try_acquire():
                    break
            except KubeError as exc:
                log.warning("leader election: %s", exc)
            self._stop.wait(self.retry_seconds)
        if self._stop.is_set():
            return
        log.info("leader election: %s now leads %s/%s", self.identity, self.namespace, self.name)
        self.leading.set()
        threading.Thread(target=self._renew, name="lease-renewal", daemon=True).start()

    def _renew(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.retry_seconds):
            try:
                if self.try_acquire():
                    last = time.monotonic()
                    continue
                log.error("leader election: lost the lease to another instance")
            except KubeError as exc:
                log.warning("leader election: renewal failed: %s", exc)
                # Transient trouble may pass while the lease still holds; a refusal
                # (e.g. 403) will not.
                if exc.transient and time.monotonic() - last < self.lease_seconds * 2 / 3:
                    continue
            self.leading.clear()
            self.on_lost()
            return

    def release(self) -> None:
        """Give the Lease up on a clean shutdown, so a standby takes over at once."""
        self._stop.set()
        if not self.leading.is_set():
            return
        try:
            lease = self.kube.get(LEASES, self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                self.kube.request(
                    "PUT", LEASES.path(self.namespace, self.name), body=lease, resource="leases"
                )
        except KubeError as exc:
            log.warning("leader election: release failed: %s", exc)
