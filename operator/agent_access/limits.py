"""maxActiveTasks: how many live tasks of one agent a policy covers at once.

Counted from the registry (live grants, rebuilt from the operator's own objects at
start-up) plus the tasks being issued right now, under one lock: of several tasks
arriving together, exactly as many as the limit allows are issued. A task waiting
for approval is not live and does not count; it is counted when it is issued.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from .engine import Denied, Policy, TaskSpec, check_limits
from .runtime import Registry


class Limits:
    def __init__(self, registry: Registry):
        self.registry = registry
        self._lock = threading.Lock()
        #: uid -> ((namespace, agent), keys of the limited policies): being issued
        self._reserved: dict[str, tuple[tuple[str, str], tuple[str, ...]]] = {}

    def reserve(self, uid: str, spec: TaskSpec, used: Sequence[Policy]) -> Denied | None:
        """Count this task in (until `release`), or why it would exceed a limit."""
        limited = [p for p in used if p.max_active is not None]
        if not limited:
            return None
        agent = (spec.namespace, spec.agent)
        with self._lock:
            # distinct tasks per policy: one being issued is in the registry before its
            # reservation is released, and counts once
            holders: dict[str, set[str]] = {}
            for grant in self.registry.for_agent(*agent):
                if grant.uid != uid:
                    for key in grant.policies:
                        holders.setdefault(key, set()).add(grant.uid)
            for other, (who, keys) in self._reserved.items():
                if who == agent and other != uid:
                    for key in keys:
                        holders.setdefault(key, set()).add(other)
            counts = Counter({key: len(uids) for key, uids in holders.items()})
            denied = check_limits(spec, limited, counts)
            if denied is None:
                self._reserved[uid] = (agent, tuple(p.key for p in limited))
            return denied

    def count(self, spec: TaskSpec, used: Sequence[Policy]) -> Denied | None:
        """The same check without counting the task in (a dry run)."""
        denied = self.reserve("", spec, used)
        self.release("")
        return denied

    def release(self, uid: str) -> None:
        with self._lock:
            self._reserved.pop(uid, None)
