"""In-memory state of the running operator: live grants and their deadlines.

No Kubernetes I/O here. `Registry` answers "which live grants does this pod /
agent / namespace / policy affect?" in O(1); `Deadlines` fires a callback at
each grant's expiresAt (one thread, a heap; not a polling loop).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .engine import TaskSpec
from .objects import base_name, reader_name, secret_name, stage_name
from .rules import Rule

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NamespaceGrant:
    namespace: str
    role: str
    binding: str
    rules: tuple[Rule, ...]

    def to_status(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "roleName": self.role,
            "roleBindingName": self.binding,
            "rules": [r.to_dict() for r in self.rules],
        }


#: Kinds of the objects a grant consists of (keys of `LiveGrant.object_uids`).
ROLE_BINDING, ROLE, SERVICE_ACCOUNT, SECRET = "RoleBinding", "Role", "ServiceAccount", "Secret"
ObjectRef = tuple[str, str, str]  # (kind, namespace, name)


@dataclass(frozen=True, slots=True)
class LiveGrant:
    """Everything needed to revoke a grant without reading the cluster.

    Built only from facts the operator owns: the task's spec and UID (names derive
    from them), its own objects and its own decision; never from the task's status.
    """

    namespace: str
    name: str
    uid: str
    spec: TaskSpec
    service_account: str
    secret: str
    grants: tuple[NamespaceGrant, ...]
    policies: tuple[str, ...]
    expires_at: datetime | None
    pod_uid: str | None = None
    granted_at: datetime | None = None
    created_at: datetime | None = None
    #: UID of each object as created (or found and verified): deletions carry it as a
    #: precondition, so a different object that took the name is never deleted.
    object_uids: Mapping[ObjectRef, str] = field(default_factory=dict)
    #: Staged tasks: the stage this grant is at (-1: not staged) and whether its access
    #: is issued (False between stages, and while a stage waits for approval), the whole
    #: task's deadline, and status.stages[] so far.
    stage_index: int = -1
    stage_live: bool = True
    task_expires_at: datetime | None = None
    stages: tuple[Mapping[str, Any], ...] = ()
    #: Objects of other stages still to delete (a clean-up that failed at start-up):
    #: deleted before the next stage is issued, and by any revocation.
    leftovers: tuple[ObjectRef, ...] = ()
    #: The hash of the token's credential id (authz.credential_hash), recorded in the
    #: status for the enforcement point; empty when adopted at start-up.
    credential: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def reader(self) -> str:
        """Role and RoleBinding that let the agent get exactly this task's token Secret."""
        return reader_name(self.service_account)

    def bindings(self) -> list[ObjectRef]:
        """The grant's RoleBindings: deleting them refuses the token (403) at once."""
        return [(ROLE_BINDING, g.namespace, g.binding) for g in self.grants]

    def leftover_bindings(self) -> list[ObjectRef]:
        return [r for r in self.leftovers if r[0] == ROLE_BINDING]

    def leftover_roles(self) -> list[ObjectRef]:
        return [r for r in self.leftovers if r[0] != ROLE_BINDING]

    def identity(self) -> list[ObjectRef]:
        """The agent's read of the token, the ServiceAccount (401), then the Secret."""
        return [
            (ROLE_BINDING, self.namespace, self.reader),
            (SERVICE_ACCOUNT, self.namespace, self.service_account),
            (SECRET, self.namespace, self.secret),
        ]

    def roles(self) -> list[ObjectRef]:
        out = [(ROLE, g.namespace, g.role) for g in self.grants]
        return [*out, (ROLE, self.namespace, self.reader)]

    def objects(self) -> list[ObjectRef]:
        """In revocation order: bindings (403 at once), identity (401), then Roles."""
        return self.bindings() + self.identity() + self.roles()


def parse_time(text: object) -> datetime | None:
    """RFC 3339 to an aware datetime; None for anything unparseable (never raises)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def planned_grant(task: Mapping[str, Any], spec: TaskSpec) -> LiveGrant:
    """The objects a task has or would have, from its spec and UID alone."""
    meta = task["metadata"]
    name = base_name(meta["name"], meta["uid"])
    role = stage_name(name, spec.stage_index)
    return LiveGrant(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta["uid"],
        spec=spec,
        service_account=name,
        secret=secret_name(meta["name"], meta["uid"]),
        grants=tuple(NamespaceGrant(e.namespace, role, role, e.rules) for e in spec.access),
        policies=(),
        expires_at=None,
        created_at=parse_time(meta.get("creationTimestamp")),
        stage_index=spec.stage_index,
    )


class Registry:
    """Live grants by task UID, indexed by pod, agent and target namespace.

    The indexes make every lookup a watch event needs O(matches), not O(grants):
    a busy cluster's pod events cost a dict lookup each, whatever the number of
    live grants.
    """

    def __init__(self) -> None:
        self._grants: dict[str, LiveGrant] = {}
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._mutex = threading.Lock()
        self._by_pod: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._by_agent: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._by_target: dict[str, set[str]] = defaultdict(set)
        #: Bumped by every outside change that may end grants (see Service.note_change).
        self.generation = 0

    def lock(self, uid: str) -> threading.Lock:
        with self._mutex:
            return self._locks[uid]

    def forget_lock(self, uid: str) -> None:
        with self._mutex:
            self._locks.pop(uid, None)

    @staticmethod
    def _keys(grant: LiveGrant) -> tuple[tuple[str, str] | None, tuple[str, str], set[str]]:
        pod = (grant.namespace, grant.spec.pod_name) if grant.spec.pod_name else None
        return pod, (grant.namespace, grant.spec.agent), {g.namespace for g in grant.grants}

    @staticmethod
    def _drop(index: dict[Any, set[str]], key: Any, uid: str) -> None:
        uids = index.get(key)
        if uids is not None:
            uids.discard(uid)
            if not uids:
                del index[key]

    def _unindex(self, grant: LiveGrant) -> None:
        pod, agent, targets = self._keys(grant)
        if pod is not None:
            self._drop(self._by_pod, pod, grant.uid)
        self._drop(self._by_agent, agent, grant.uid)
        for t in targets:
            self._drop(self._by_target, t, grant.uid)

    def add(self, grant: LiveGrant) -> None:
        with self._mutex:
            old = self._grants.get(grant.uid)
            if old is not None:
                self._unindex(old)
            self._grants[grant.uid] = grant
            pod, agent, targets = self._keys(grant)
            if pod is not None:
                self._by_pod[pod].add(grant.uid)
            self._by_agent[agent].add(grant.uid)
            for t in targets:
                self._by_target[t].add(grant.uid)

    def remove(self, uid: str) -> LiveGrant | None:
        with self._mutex:
            grant = self._grants.pop(uid, None)
            if grant is not None:
                self._unindex(grant)
            return grant

    def get(self, uid: str) -> LiveGrant | None:
        with self._mutex:
            return self._grants.get(uid)

    def bump(self) -> None:
        with self._mutex:
            self.generation += 1

    def all(self) -> list[LiveGrant]:
        with self._mutex:
            return list(self._grants.values())

    def __len__(self) -> int:
        return len(self._grants)

    def _lookup(self, index: dict[Any, set[str]], key: Any) -> list[LiveGrant]:
        with self._mutex:
            return [self._grants[u] for u in index.get(key, ()) if u in self._grants]

    def has_pod(self, namespace: str, pod: str) -> bool:
        """Cheap: does any live grant end with this pod? (No list is built.)"""
        return (namespace, pod) in self._by_pod

    def has_agent(self, namespace: str, agent: str) -> bool:
        return (namespace, agent) in self._by_agent

    def for_pod(self, namespace: str, pod: str) -> list[LiveGrant]:
        return self._lookup(self._by_pod, (namespace, pod))

    def for_agent(self, namespace: str, agent: str) -> list[LiveGrant]:
        return self._lookup(self._by_agent, (namespace, agent))

    def for_target(self, namespaces: Iterable[str] | None) -> list[LiveGrant]:
        """Grants into any of these namespaces; all grants when namespaces is None."""
        if namespaces is None:
            return self.all()
        with self._mutex:
            uids = set().union(*(self._by_target.get(n, ()) for n in namespaces))
            return [self._grants[u] for u in uids if u in self._grants]


class Deadlines:
    """Calls `fire(key)` at each scheduled wall-clock time, from one thread."""

    def __init__(self, fire: Callable[[str], None], clock: Callable[[], float] = time.time):
        self._fire = fire
        self._clock = clock
        self._heap: list[tuple[float, int, str]] = []
        self._current: dict[str, int] = {}
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
        self._thread.start()

    def schedule(self, key: str, when: datetime) -> None:
        with self._cond:
            seq = next(self._seq)
            self._current[key] = seq
            heapq.heappush(self._heap, (when.timestamp(), seq, key))
            self._cond.notify()

    def cancel(self, key: str) -> None:
        with self._cond:
            self._current.pop(key, None)

    def pending(self) -> int:
        with self._cond:
            return len(self._current)

    def next_due(self) -> float | None:
        with self._cond:
            live = [t for t, s, k in self._heap if self._current.get(k) == s]
            return min(live) if live else None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    while self._heap and self._current.get(self._heap[0][2]) != self._heap[0][1]:
                        heapq.heappop(self._heap)  # cancelled or rescheduled
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - self._clock()
                    if delay <= 0:
                        break
                    self._cond.wait(timeout=min(delay, 60))
                if self._stopped:
                    return
                _, _, key = heapq.heappop(self._heap)
                self._current.pop(key, None)
            try:
                self._fire(key)
            except Exception:  # the timer thread must survive a failing callback
                log.exception("deadline callback failed for %s", key)
