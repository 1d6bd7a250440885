"""Explaining a denial: which policy came closest, and what it lacks.

The engine finds the closest policy (the applicable one covering most of what was
asked, or the one that would apply but does not name the agent or needs a pod);
this module adds it to the denial message only when the requester may read that
policy (a SubjectAccessReview, `get` on it), so a denial never reveals a policy
its reader could not see (no oracle). The detail always goes to the audit line.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

from .engine import Denied, Policy, Requester
from .kube import Kube, KubeError
from .model import GROUP

log = logging.getLogger(__name__)

CACHE_SECONDS = 10.0
CACHE_LIMIT = 4096


class Explainer:
    def __init__(self, kube: Kube, self_review: bool = False):
        self.kube = kube
        #: ask as the caller itself (SelfSubjectAccessReview: `check` on a terminal)
        self.self_review = self_review
        self._lock = threading.Lock()
        self._cache: dict[tuple[object, ...], tuple[float, bool]] = {}

    def explain(self, denied: Denied, requester: Requester | None) -> Denied:
        """The denial with the closest policy in its message, if the requester may read it."""
        policy = denied.closest
        if policy is None or not denied.closest_note:
            return denied
        note = f"closest policy {policy.kind} {policy.key} {denied.closest_note}"
        detail = f"{denied.detail}; {note}" if denied.detail else note
        if requester is None and not self.self_review:
            return replace(denied, detail=detail)
        if not self.may_read(requester, policy):
            return replace(denied, detail=detail)
        return replace(denied, message=f"{denied.message}; {note}", detail=detail)

    def may_read(self, requester: Requester | None, policy: Policy) -> bool:
        who = (requester.username, requester.uid, requester.groups) if requester else ("self",)
        key = (*who, policy.namespace, policy.name)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit[0] > now:
                return hit[1]
        allowed = self._review(requester, policy)
        with self._lock:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = (now + CACHE_SECONDS, allowed)
        return allowed

    def _review(self, requester: Requester | None, policy: Policy) -> bool:
        attributes = {
            "verb": "get",
            "group": GROUP,
            "resource": "accesspolicies" if policy.namespace else "clusteraccesspolicies",
            "name": policy.name,
        }
        if policy.namespace:
            attributes["namespace"] = policy.namespace
        spec: dict[str, Any]
        if self.self_review or requester is None:
            kind, spec = "SelfSubjectAccessReview", {"resourceAttributes": attributes}
            path = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
        else:
            kind = "SubjectAccessReview"
            spec = {
                "user": requester.username,
                "groups": list(requester.groups),
                "resourceAttributes": attributes,
            }
            if requester.uid:
                spec["uid"] = requester.uid
            path = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": kind, "spec": spec}
        try:
            review = self.kube.request("POST", path, body=body, resource=kind.lower() + "s")
        except KubeError as exc:  # fail closed: the message stays without the name
            log.warning("could not review whether %s may read %s: %s", requester, policy.key, exc)
            return False
        return bool((review.get("status") or {}).get("allowed"))
