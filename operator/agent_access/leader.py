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
from datetime import UTC, datetime
from typing import Any

from .kube import Conflict, Kube, KubeError, Resource

log = logging.getLogger(__name__)

LEASES = Resource("/apis/coordination.k8s.io/v1", "leases")
LEASE_LABEL = "agentaccess.io/leader-election"


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record(spec: Mapping[str, Any]) -> tuple[Any, ...]:
    """The parts of a Lease that show whether its holder is still renewing it."""
    return tuple(
        spec.get(k)
        for k in (
            "holderIdentity",
            "renewTime",
            "acquireTime",
            "leaseTransitions",
            "leaseDurationSeconds",
        )
    )


@dataclass(frozen=True)
class Verdict:
    """What to do with the Lease as it is now. Purely computational."""

    take: bool  # write ourselves as holder (acquire, renew or take over)
    transitions: int  # leaseTransitions to write


def decide(
    spec: Mapping[str, Any], identity: str, observed_for: float, lease_seconds: float
) -> Verdict:
    """client-go's rule: another holder's lease counts as live only while this process
    has seen its record change within `lease_seconds` (`observed_for` = seconds, on
    the local clock, since the record last changed). Times written in the Lease
    (`renewTime`, a future one included) and its `leaseDurationSeconds` are not
    trusted: an edited Lease cannot freeze the replicas for longer than one lease."""
    holder = spec.get("holderIdentity") or ""
    try:
        transitions = int(spec.get("leaseTransitions") or 0)
    except (TypeError, ValueError):
        transitions = 0
    if holder == identity:
        return Verdict(True, transitions)
    if holder and observed_for < lease_seconds:
        return Verdict(False, transitions)
    return Verdict(True, transitions + (1 if holder else 0))


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
        self.monotonic: Callable[[], float] = time.monotonic
        self._observed: tuple[Any, ...] | None = None
        self._renewal: threading.Thread | None = None
        self._observed_at = 0.0

    def try_acquire(self) -> bool:
        """One attempt to become (or stay) the leader."""
        now = self.clock()
        lease = self.kube.get(LEASES, self.namespace, self.name)
        spec = (lease or {}).get("spec") or {}
        record = _record(spec)
        if record != self._observed:  # measured locally from when it last changed
            self._observed, self._observed_at = record, self.monotonic()
        verdict = decide(
            spec, self.identity, self.monotonic() - self._observed_at, self.lease_seconds
        )
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
            # the label admission keys on: only the operator writes a Lease carrying it
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {LEASE_LABEL: "true"},
            },
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
        self._observed, self._observed_at = _record(new_spec), self.monotonic()
        return True

    def wait_for_leadership(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Block until this instance holds the Lease, then keep renewing it (True); or
        until told to stop first (False). `should_stop` is polled, so a signal handler
        can answer it without taking a lock."""
        while not self._stop.is_set() and not should_stop():
            try:
                if self.try_acquire():
                    break
            except KubeError as exc:
                log.warning("leader election: %s", exc)
            deadline = time.monotonic() + self.retry_seconds
            while time.monotonic() < deadline and not (self._stop.is_set() or should_stop()):
                time.sleep(0.05)
        else:
            return False
        log.info("leader election: %s now leads %s/%s", self.identity, self.namespace, self.name)
        self.leading.set()
        self._renewal = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._renewal.start()
        return True

    def _renew(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.retry_seconds):
            try:
                if self.try_acquire():
                    last = time.monotonic()
                    continue
                # Someone else's record, live by local observation. As in client-go, a
                # leader keeps trying until its renew deadline before it gives up.
                if time.monotonic() - last < self.lease_seconds * 2 / 3:
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
        if self._renewal is not None:  # no renewal in flight re-takes it after this
            self._renewal.join(self.retry_seconds + 10)
        try:
            lease = self.kube.get(LEASES, self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                self.kube.request(
                    "PUT", LEASES.path(self.namespace, self.name), body=lease, resource="leases"
                )
        except KubeError as exc:
            log.warning("leader election: release failed: %s", exc)
