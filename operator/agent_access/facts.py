"""Facts a decision needs, read from the cluster: policies, namespaces, agent, pod.

Every parse of a user object is total: a malformed or hostile policy is skipped
(and logged), never a crash of the decision or re-evaluation that lists it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .engine import PodFacts, Policy, SpecError, TaskSpec, World, parse_policy
from .kube import ACCESS_POLICIES, CLUSTER_ACCESS_POLICIES, NAMESPACES, PODS, SERVICE_ACCOUNTS, Kube

log = logging.getLogger(__name__)


def parse_policies(namespaced: list[dict], cluster: list[dict]) -> list[Policy]:
    out = []
    for body in namespaced + [dict(b, kind="ClusterAccessPolicy") for b in cluster]:
        body.setdefault("kind", "AccessPolicy")
        try:
            out.append(parse_policy(body))
        except SpecError as exc:
            meta = body.get("metadata") or {}
            log.warning("ignoring policy %s/%s: %s", meta.get("namespace"), meta.get("name"), exc)
    return out


def namespace_labels(items: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """{name: labels} of the namespaces that exist (one being deleted does not)."""
    out = {}
    for ns in items:
        meta = ns.get("metadata") or {}
        labels = meta.get("labels")
        if not meta.get("deletionTimestamp") and isinstance(meta.get("name"), str):
            out[meta["name"]] = labels if isinstance(labels, dict) else {}
    return out


def pod_facts(pod: Mapping[str, Any] | None) -> PodFacts | None:
    if not pod:
        return None
    meta, spec = pod.get("metadata", {}), pod.get("spec") or {}
    return PodFacts(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        phase=(pod.get("status") or {}).get("phase", ""),
        deleting=bool(meta.get("deletionTimestamp")),
    )


class Facts:
    def __init__(self, kube: Kube, io: ThreadPoolExecutor):
        self.kube = kube
        self.io = io

    def policies(self, namespaces: Iterable[str] | None) -> list[Policy]:
        if namespaces is None:
            raw = self.kube.list(ACCESS_POLICIES)
        else:
            raw = [p for ns in namespaces for p in self.kube.list(ACCESS_POLICIES, ns)]
        return parse_policies(raw, self.kube.list(CLUSTER_ACCESS_POLICIES))

    def namespaces(self, names: Iterable[str] | None) -> dict[str, dict[str, str]]:
        if names is None:
            items = self.kube.list(NAMESPACES)
        else:
            items = [ns for n in names if (ns := self.kube.get(NAMESPACES, None, n))]
        return namespace_labels(items)

    def world(self, spec: TaskSpec) -> World:
        """Read every fact the decision needs, concurrently (one round trip, not five)."""
        targets = spec.target_namespaces
        submit = self.io.submit
        namespaces = [submit(self.kube.get, NAMESPACES, None, t) for t in targets]
        policies = [submit(self.kube.list, ACCESS_POLICIES, t) for t in targets]
        cluster = submit(self.kube.list, CLUSTER_ACCESS_POLICIES)
        agent = submit(self.kube.get, SERVICE_ACCOUNTS, spec.namespace, spec.agent)
        pod = submit(self.kube.get, PODS, spec.namespace, spec.pod_name) if spec.pod_name else None
        return World(
            policies=parse_policies([p for f in policies for p in f.result()], cluster.result()),
            namespaces=namespace_labels([ns for f in namespaces if (ns := f.result())]),
            agent_exists=agent.result() is not None,
            pod=pod_facts(pod.result()) if pod else None,
        )
