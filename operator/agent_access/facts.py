"""Facts a decision needs: policies, namespaces, agent, pod.

They come from watches (`Cache`, see informers.py), so a decision or a
re-evaluation makes no read call. Freshness rules:

- Until every watch has listed once, and while any watch is broken (from the
  failure to the relist after it), facts are read from the API server instead.
- A grant decided on watched facts is re-checked by every later change the watches
  deliver (a policy narrowed or deleted, a namespace relabelled or deleted, the
  agent or the pod gone): the change that raced the decision ends the grant as soon
  as it arrives, exactly as a change made just after the grant would. Changes that
  arrive while the grant is being issued are caught by the registry's generation.
- A denial is never made on watched facts: the decision is taken again from facts
  read from the API server (a policy, namespace, agent or pod created a moment
  before the task may not have arrived yet), and that one stands.

Every parse of a user object is total: a malformed or hostile policy is skipped
(and logged), never a crash of the decision or re-evaluation that lists it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from .approval import Vote, parse_vote
from .engine import PodFacts, Policy, SpecError, TaskSpec, World, broken_policy, parse_policy
from .informers import SKIP, Informer, Key, OnChange, wait_synced
from .kube import (
    ACCESS_POLICIES,
    AGENT_TASK_APPROVALS,
    CLUSTER_ACCESS_POLICIES,
    NAMESPACES,
    PODS,
    SERVICE_ACCOUNTS,
    Kube,
)
from .model import IDENTITY_PREFIX

log = logging.getLogger(__name__)


def _policy(body: Mapping[str, Any], kind: str) -> Policy | None:
    """The policy, or one that matches nothing and says why (reported as Ready=False)."""
    try:
        return parse_policy(dict(body, kind=kind))
    except SpecError as exc:
        meta = body.get("metadata") or {}
        log.warning("ignoring policy %s/%s: %s", meta.get("namespace"), meta.get("name"), exc)
        return broken_policy(dict(body, kind=kind), "InvalidSpec", str(exc))


def parse_policies(namespaced: list[dict], cluster: list[dict]) -> list[Policy]:
    out = [_policy(b, b.get("kind") or "AccessPolicy") for b in namespaced]
    out += [_policy(b, "ClusterAccessPolicy") for b in cluster]
    return [p for p in out if p is not None]


def _namespace_labels(ns: Mapping[str, Any]) -> dict[str, str] | Any:
    meta = ns.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return SKIP  # a namespace being deleted is no place to grant into
    labels = meta.get("labels")
    return dict(labels) if isinstance(labels, dict) else {}


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
        labels=_pairs(meta.get("labels")),
    )


def _pairs(raw: Any, skip: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    """Labels or annotations, compact and comparable (interned: few distinct strings)."""
    if not isinstance(raw, Mapping) or not raw:
        return ()
    return tuple(
        sorted(
            (sys.intern(str(k)), sys.intern(str(v)) if len(str(v)) < 64 else str(v))
            for k, v in raw.items()
            if k not in skip
        )
    )


#: On an agent's ServiceAccount (annotation) or its namespace (label): "true" suspends
#: the agent (every agent of the namespace): live grants revoked, new tasks denied.
SUSPENDED = "agentaccess.io/suspended"


class AgentFacts(NamedTuple):
    uid: str
    suspended: bool
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()


#: Annotations never kept (large, and no condition needs them).
SKIPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def agent_object(namespace: str, name: str, facts: AgentFacts | None) -> dict[str, Any] | None:
    """The agent's ServiceAccount as conditions see it."""
    if facts is None:
        return None
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": facts.uid,
            "labels": dict(facts.labels),
            "annotations": dict(facts.annotations),
        }
    }


def _agent(sa: Mapping[str, Any]) -> AgentFacts | Any:
    """A ServiceAccount that may be an agent: its UID and whether it is suspended. The
    operator's own per-task identities (aat-*, a reserved prefix) are never agents."""
    meta = sa.get("metadata") or {}
    if str(meta.get("name") or "").startswith(IDENTITY_PREFIX):
        return SKIP
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        annotations = {}
    return AgentFacts(
        str(meta.get("uid") or ""),
        annotations.get(SUSPENDED) == "true",
        _pairs(meta.get("labels")),
        _pairs(annotations, SKIPPED_ANNOTATIONS),
    )


def suspension(
    namespace: str, agent: str, facts: AgentFacts | None, labels: Mapping[str, str] | None
) -> str | None:
    """Why the agent may not act now, or None."""
    if facts is not None and facts.suspended:
        return f"agent ServiceAccount {namespace}/{agent} is suspended (annotation {SUSPENDED})"
    if labels is not None and labels.get(SUSPENDED) == "true":
        return f"namespace {namespace} is suspended (label {SUSPENDED})"
    return None


class Cache:
    """The watches behind the facts; `on_*` callbacks are set before `start`."""

    def __init__(self, kube: Kube):
        self.kube = kube
        self.on_policy: OnChange | None = None
        self.on_namespace: OnChange | None = None
        self.on_service_account: OnChange | None = None
        self.on_pod: OnChange | None = None
        self.on_approval: OnChange | None = None
        self._started = False
        self.policies: Informer[Policy] = Informer(
            kube,
            ACCESS_POLICIES,
            lambda b: _policy(b, "AccessPolicy") or SKIP,
            self._report("on_policy"),
            by_namespace=True,
        )
        self.cluster_policies: Informer[Policy] = Informer(
            kube,
            CLUSTER_ACCESS_POLICIES,
            lambda b: _policy(b, "ClusterAccessPolicy") or SKIP,
            self._report("on_policy"),
        )
        self.namespaces: Informer[dict[str, str]] = Informer(
            kube, NAMESPACES, _namespace_labels, self._report("on_namespace")
        )
        self.service_accounts: Informer[AgentFacts] = Informer(
            kube, SERVICE_ACCOUNTS, _agent, self._report("on_service_account")
        )
        self.pods: Informer[PodFacts] = Informer(
            kube, PODS, lambda b: pod_facts(b) or SKIP, self._report("on_pod")
        )
        self.approvals: Informer[Vote] = Informer(
            kube,
            AGENT_TASK_APPROVALS,
            lambda b: parse_vote(b) or SKIP,
            self._report("on_approval"),
            by_namespace=True,
        )
        self.all: list[Informer[Any]] = [
            self.approvals,
            self.policies,
            self.cluster_policies,
            self.namespaces,
            self.service_accounts,
            self.pods,
        ]

    def _report(self, attribute: str) -> OnChange:
        def report(kind: str, key: Key, old: Any, new: Any) -> None:
            callback = getattr(self, attribute)
            if callback is not None:
                callback(kind, key, old, new)

        return report

    def start(self, timeout: float = 60) -> bool:
        """Start every watch (once: the enforcement point may have started them before
        this process led); wait (up to `timeout`) until each has listed once."""
        if not self._started:
            self._started = True
            for informer in self.all:
                informer.start()
        return wait_synced(self.all, timeout)

    def stop(self) -> None:
        for informer in self.all:
            informer.stop()

    def ready(self) -> bool:
        return all(i.synced.is_set() and i.healthy for i in self.all)


class Facts:
    def __init__(self, kube: Kube, io: ThreadPoolExecutor, cache: Cache | None = None):
        self.kube = kube
        self.io = io
        self.cache = cache

    def cache_ready(self) -> bool:
        return self._cached() is not None

    def _cached(self) -> Cache | None:
        return self.cache if self.cache is not None and self.cache.ready() else None

    def policies(self, namespaces: Iterable[str] | None) -> list[Policy]:
        cache = self._cached()
        if cache is not None:
            if namespaces is None:
                namespaced = cache.policies.values()
            else:
                namespaced = [p for n in set(namespaces) for p in cache.policies.in_namespace(n)]
            return namespaced + cache.cluster_policies.values()
        if namespaces is None:
            raw = self.kube.list(ACCESS_POLICIES)
        else:
            raw = [p for ns in namespaces for p in self.kube.list(ACCESS_POLICIES, ns)]
        return parse_policies(raw, self.kube.list(CLUSTER_ACCESS_POLICIES))

    def namespaces(self, names: Iterable[str] | None) -> dict[str, dict[str, str]]:
        cache = self._cached()
        if cache is not None:
            if names is None:
                return {name: labels for (_, name), labels in cache.namespaces.items.items()}
            found = {n: cache.namespaces.get(None, n) for n in names}
            return {n: labels for n, labels in found.items() if labels is not None}
        if names is None:
            items = self.kube.list(NAMESPACES)
        else:
            items = [ns for n in names if (ns := self.kube.get(NAMESPACES, None, n))]
        return namespace_labels(items)

    def agent_exists(self, namespace: str, name: str) -> bool:
        """Absent from the watch: confirmed by a read before it counts."""
        cache = self._cached()
        if cache is not None and cache.service_accounts.get(namespace, name) is not None:
            return True
        return self.kube.get(SERVICE_ACCOUNTS, namespace, name) is not None

    def suspension(self, namespace: str, agent: str) -> str | None:
        """Is the agent suspended? From the watches when they are ready (a suspension
        they have not delivered yet revokes when they do), else read."""
        cache = self._cached()
        if cache is not None:
            return suspension(
                namespace, agent, cache.service_accounts.get(namespace, agent),
                cache.namespaces.get(None, namespace),
            )  # fmt: skip
        sa = self.kube.get(SERVICE_ACCOUNTS, namespace, agent)
        ns = self.kube.get(NAMESPACES, None, namespace)
        return suspension(
            namespace, agent, _agent(sa) if sa else None,
            ((ns or {}).get("metadata") or {}).get("labels") or {},
        )  # fmt: skip

    def pod(self, namespace: str, name: str, uid: str | None = None) -> PodFacts | None:
        """The pod as watched; if absent, deleting, finished or another UID than
        expected, confirmed by a read (which then decides)."""
        cache = self._cached()
        if cache is not None:
            pod = cache.pods.get(namespace, name)
            if (
                pod is not None
                and not pod.deleting
                and pod.phase not in ("Succeeded", "Failed")
                and (not uid or pod.uid == uid)
            ):
                return pod
        return pod_facts(self.kube.get(PODS, namespace, name))

    def votes(self, namespace: str, task_uid: str, fresh: bool = False) -> list[Vote]:
        """The AgentTaskApprovals made for this task: watched, or read (`fresh`, or while
        the watches are not ready)."""
        cache = None if fresh else self._cached()
        if cache is not None:
            found = cache.approvals.in_namespace(namespace)
        else:
            raw = self.kube.list(AGENT_TASK_APPROVALS, namespace)
            found = [v for b in raw if (v := parse_vote(b)) is not None]
        return [v for v in found if v.task_uid == task_uid]

    def condition_objects(
        self, spec: TaskSpec
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The agent's ServiceAccount and the task's pod as conditions see them."""
        cache = self._cached()
        if cache is not None:
            agent = cache.service_accounts.get(spec.namespace, spec.agent)
            pod = cache.pods.get(spec.namespace, spec.pod_name) if spec.pod_name else None
        else:
            sa = self.kube.get(SERVICE_ACCOUNTS, spec.namespace, spec.agent)
            found = _agent(sa) if sa else None
            agent = found if isinstance(found, AgentFacts) else None
            raw = self.kube.get(PODS, spec.namespace, spec.pod_name) if spec.pod_name else None
            pod = pod_facts(raw)
        return (
            agent_object(spec.namespace, spec.agent, agent),
            pod.as_object(spec.namespace) if pod else None,
        )

    def world(self, spec: TaskSpec) -> tuple[World, bool]:
        """Every fact the decision needs: from the watches (no request; True) when they
        are ready, else read from the API server (False)."""
        cache = self._cached()
        if cache is None:
            return self.world_from_api(spec), False
        targets = spec.target_namespaces
        agent = cache.service_accounts.get(spec.namespace, spec.agent)
        pod = cache.pods.get(spec.namespace, spec.pod_name) if spec.pod_name else None
        return World(
            policies=self.policies(targets),
            namespaces=self.namespaces(targets),
            agent_exists=agent is not None,
            pod=pod,
            suspended=suspension(
                spec.namespace, spec.agent, agent, cache.namespaces.get(None, spec.namespace)
            ),
            agent_object=agent_object(spec.namespace, spec.agent, agent),
            pod_object=pod.as_object(spec.namespace) if pod else None,
        ), True

    def world_from_api(self, spec: TaskSpec) -> World:
        """Read every fact the decision needs, concurrently (one round trip, not five)."""
        targets = spec.target_namespaces
        submit = self.io.submit
        namespaces = [submit(self.kube.get, NAMESPACES, None, t) for t in targets]
        policies = [submit(self.kube.list, ACCESS_POLICIES, t) for t in targets]
        cluster = submit(self.kube.list, CLUSTER_ACCESS_POLICIES)
        agent = submit(self.kube.get, SERVICE_ACCOUNTS, spec.namespace, spec.agent)
        home = submit(self.kube.get, NAMESPACES, None, spec.namespace)
        pod = submit(self.kube.get, PODS, spec.namespace, spec.pod_name) if spec.pod_name else None
        sa = agent.result()
        facts = _agent(sa) if sa else None
        found = pod_facts(pod.result()) if pod else None
        return World(
            policies=parse_policies([p for f in policies for p in f.result()], cluster.result()),
            namespaces=namespace_labels([ns for f in namespaces if (ns := f.result())]),
            agent_exists=sa is not None,
            pod=found,
            agent_object=agent_object(
                spec.namespace, spec.agent, facts if isinstance(facts, AgentFacts) else None
            ),
            pod_object=found.as_object(spec.namespace) if found else None,
            suspended=suspension(
                spec.namespace,
                spec.agent,
                _agent(sa) if sa else None,
                ((home.result() or {}).get("metadata") or {}).get("labels") or {},
            ),
        )
