"""Desired state: names and bodies of the objects one grant consists of.

Purely computational, no side effects. Names are deterministic from the task
(name + UID), so the operator can find and remove a task's objects even when
it crashed before recording them in status.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from .model import (
    API_VERSION,
    LABEL_MANAGED_BY,
    LABEL_TASK_NAME,
    LABEL_TASK_NAMESPACE,
    LABEL_TASK_UID,
    MANAGED_BY,
    MAX_STAGES,
    MIN_TOKEN_SECONDS,
    SECRET_TYPE,
)
from .rules import Rule

_UNSAFE = re.compile(r"[^a-z0-9-]+")


def base_name(task_name: str, task_uid: str) -> str:
    """aat-<task name, trimmed>-<8 chars of the UID>: unique per task, DNS-1123 safe."""
    stem = _UNSAFE.sub("-", task_name.lower()).strip("-")[:40].strip("-") or "task"
    suffix = task_uid.replace("-", "")[:8] or hashlib.sha256(task_name.encode()).hexdigest()[:8]
    return f"aat-{stem}-{suffix}"


def secret_name(task_name: str, task_uid: str) -> str:
    return f"{base_name(task_name, task_uid)}-token"


def reader_name(base: str) -> str:
    """Role/RoleBinding letting the agent read its own token Secret (and nothing else)."""
    return f"{base}-token-reader"


def stage_name(base: str, index: int) -> str:
    """Role/RoleBinding of a staged task's stage `index` (0-based): <base>-s<index+1>;
    the task's own name for a task without stages."""
    return base if index < 0 else f"{base}-s{index + 1}"


def names_of(task_name: str, task_uid: str) -> frozenset[str]:
    """Every object name a task's grant can use: anything else is not the task's."""
    base = base_name(task_name, task_uid)
    stages = {stage_name(base, i) for i in range(MAX_STAGES)}
    return frozenset({base, f"{base}-token", reader_name(base), *stages})


def is_ours(obj: Mapping[str, Any], task_uid: str) -> bool:
    """Does this object carry the operator's marks for this very task?"""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    return (
        labels.get(LABEL_MANAGED_BY) == MANAGED_BY
        and labels.get(LABEL_TASK_UID) == task_uid
        and bool(task_uid)
    )


def task_labels(task: Mapping[str, Any]) -> dict[str, str]:
    meta = task["metadata"]
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_TASK_UID: meta["uid"],
        LABEL_TASK_NAME: meta["name"][:63].rstrip("-_."),
        LABEL_TASK_NAMESPACE: meta["namespace"],
    }


def task_owner(task: Mapping[str, Any]) -> dict[str, Any]:
    meta = task["metadata"]
    return {
        "apiVersion": task.get("apiVersion", API_VERSION),
        "kind": task.get("kind", "AgentTask"),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": False,
    }


def pod_owner(pod_name: str, pod_uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": pod_name,
        "uid": pod_uid,
        "blockOwnerDeletion": False,
    }


def _meta(
    task: Mapping[str, Any], name: str, namespace: str, owners: list[dict[str, Any]] | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": task_labels(task)}
    if owners:
        meta["ownerReferences"] = owners
    return meta


def owners_in_task_namespace(
    task: Mapping[str, Any], pod: tuple[str, str] | None
) -> list[dict[str, Any]]:
    """Owners for the ServiceAccount and Secret.

    With a pod, the pod alone owns them: the garbage collector deletes an object
    only when all owners are gone, and deleting the pod must kill the token even
    when the operator is down. Without a pod, the task owns them.
    """
    return [pod_owner(*pod)] if pod else [task_owner(task)]


def service_account(
    task: Mapping[str, Any],
    name: str,
    owners: list[dict[str, Any]],
    record: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The per-task identity. `record` (annotations: deadline, pod, policies) is what a
    restarted operator reads back, instead of the task's status."""
    meta = _meta(task, name, task["metadata"]["namespace"], owners)
    if record:
        meta["annotations"] = dict(record)
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta,
        "automountServiceAccountToken": False,
    }


def token_reader_role(task: Mapping[str, Any], name: str, secret: str) -> dict[str, Any]:
    return role(
        task,
        task["metadata"]["namespace"],
        name,
        (Rule(api_groups=("",), resources=("secrets",), verbs=("get",), resource_names=(secret,)),),
    )


def token_reader_binding(task: Mapping[str, Any], name: str, agent: str) -> dict[str, Any]:
    ns = task["metadata"]["namespace"]
    return role_binding(task, ns, name, ns, agent)


def role(task: Mapping[str, Any], namespace: str, name: str, rules: tuple[Rule, ...]) -> dict:
    owners = [task_owner(task)] if namespace == task["metadata"]["namespace"] else None
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(task, name, namespace, owners),
        "rules": [r.to_dict() for r in rules],
    }


def role_binding(
    task: Mapping[str, Any], namespace: str, name: str, sa_namespace: str, sa_name: str
) -> dict[str, Any]:
    owners = [task_owner(task)] if namespace == task["metadata"]["namespace"] else None
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(task, name, namespace, owners),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}],
    }


def token_secret(
    task: Mapping[str, Any],
    name: str,
    owners: list[dict[str, Any]],
    service_account_name: str,
    expires_at: str,
    token_b64: str = "",
) -> dict[str, Any]:
    """The Secret that carries the token (base64, as `data` holds it)."""
    meta = _meta(task, name, task["metadata"]["namespace"], owners)
    meta["annotations"] = {
        "agentaccess.io/service-account": service_account_name,
        "agentaccess.io/expires-at": expires_at,
    }
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": meta,
        "data": {"token": token_b64} if token_b64 else {},
    }
    return body


def token_seconds(ttl_seconds: int) -> int:
    """TokenRequest lifetime: at least the API minimum; never 3607 (silently extended)."""
    seconds = max(MIN_TOKEN_SECONDS, int(ttl_seconds) + 60)
    return 3608 if seconds == 3607 else seconds
