"""Policy status: `status.conditions[]` type Ready on AccessPolicies and
ClusterAccessPolicies, written by the operator.

Ready is False when part of the policy cannot be used and the policy therefore
matches nothing (fail closed): a condition that does not compile
(`InvalidCondition`), an intent pattern that is not RE2 (`InvalidIntentPattern`), a
spec the operator cannot read (`InvalidSpec`). Otherwise True (`Valid`).

Written only when it would say something new (the watched policy carries what its
status shows now), on a thread of its own: never on a watch thread, never in the
way of a grant or a revocation. Status is output only: the operator never reads it
to decide anything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from .engine import Policy
from .kube import ACCESS_POLICIES, CLUSTER_ACCESS_POLICIES, Kube, KubeError, NotFound

log = logging.getLogger(__name__)

READY_MESSAGE = "the policy is in use"


def desired(policy: Policy) -> tuple[str, str, str]:
    """(status, reason, message) of its Ready condition."""
    if policy.problem is not None:
        return ("False", *policy.problem)
    return ("True", "Valid", READY_MESSAGE)


def needs_write(policy: Policy) -> bool:
    want = desired(policy)
    shown = policy.shown
    return shown is None or shown[:3] != want or shown[3] != policy.generation


class PolicyStatus:
    def __init__(self, kube: Kube, clock: Callable[[], datetime]):
        self.kube = kube
        self.clock = clock
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="policy-status")

    def observe(self, policy: Policy | None) -> None:
        """A policy as watched (any thread): write its Ready condition if it changed."""
        if policy is not None and policy.uid and needs_write(policy):
            with contextlib.suppress(RuntimeError):  # shutting down
                self.pool.submit(self._write, policy)

    def observe_all(self, policies: Iterable[Policy]) -> None:
        for policy in policies:
            self.observe(policy)

    def _write(self, policy: Policy) -> None:
        status, reason, message = desired(policy)
        shown = policy.shown
        since = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        condition: dict[str, Any] = {
            "type": "Ready",
            "status": status,
            "reason": reason,
            "message": message[:1024],
            "observedGeneration": policy.generation,
            "lastTransitionTime": since,
        }
        if shown is not None and shown[0] == status and shown[4]:
            condition["lastTransitionTime"] = shown[4]
        resource = ACCESS_POLICIES if policy.namespace else CLUSTER_ACCESS_POLICIES
        patch: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/uid", "value": policy.uid},
            {"op": "add", "path": "/status", "value": {"conditions": [condition]}},
        ]
        try:
            self.kube.json_patch(resource, policy.namespace, policy.name, patch, "status")
        except NotFound:
            pass
        except KubeError as exc:  # the next change of the policy writes it again
            log.warning("could not write the status of policy %s: %s", policy.key, exc)
        if status == "False":
            log.warning("policy %s matches nothing: %s: %s", policy.key, reason, message)

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
