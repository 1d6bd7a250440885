"""Start-up: rebuild live grants from the operator's own objects, end those that
must end, and remove every object no live grant holds.

Runs before watching. What it trusts: the task's spec and UID, and the objects
carrying the operator's marks whose names are the ones it derives for that task
UID (admission lets only the operator create or change such objects). The
deadline is the earlier of the one recorded on the per-task ServiceAccount and
the one in the task's status, so rewriting either can only shorten a grant; a
task whose status no longer says Active loses its objects.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import stages
from .engine import SpecError, TaskSpec, parse_task
from .kube import AGENT_TASKS, KubeError
from .model import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_GRANTED_AT,
    ANNOTATION_POD_UID,
    ANNOTATION_POLICIES,
    ANNOTATION_PRESET_RULES,
    ANNOTATION_STAGE,
    ANNOTATION_TASK_EXPIRES_AT,
    LABEL_MANAGED_BY,
    LABEL_TASK_NAME,
    LABEL_TASK_NAMESPACE,
    LABEL_TASK_UID,
    MANAGED_BY,
    Phase,
    Reason,
)
from .objects import base_name, names_of
from .owned import RESOURCES
from .rules import parse_rules
from .runtime import (
    ROLE,
    ROLE_BINDING,
    SECRET,
    SERVICE_ACCOUNT,
    LiveGrant,
    ObjectRef,
    parse_time,
    planned_grant,
)

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)

Found = dict[ObjectRef, dict[str, Any]]


def owned_objects(service: Service) -> dict[str, Found]:
    """Objects carrying the operator's marks, by task UID; only names that task can use."""
    selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    out: dict[str, Found] = defaultdict(dict)
    for kind in (SERVICE_ACCOUNT, ROLE_BINDING, ROLE):
        objs = (
            _compact(obj, kind == SERVICE_ACCOUNT)
            for page in service.kube.pages(RESOURCES[kind], None, label_selector=selector)
            for obj in page
        )
        for obj in objs:
            meta = obj.get("metadata") or {}
            labels = meta.get("labels") or {}
            uid, task_name = labels.get(LABEL_TASK_UID), labels.get(LABEL_TASK_NAME)
            if not uid or not task_name or meta.get("name") not in names_of(task_name, uid):
                log.warning(
                    "ignoring %s %s/%s: not named for its task",
                    kind,
                    meta.get("namespace"),
                    meta.get("name"),
                )
                continue
            out[uid][(kind, meta["namespace"], meta["name"])] = obj
    return out


def _compact(obj: Mapping[str, Any], annotations: bool = False) -> dict[str, Any]:
    """What recovery reads of an object: with 10,000 live grants, whole objects would
    cost hundreds of MB at start-up."""
    meta = obj.get("metadata") or {}
    keep = ["name", "namespace", "uid", "labels"] + (["annotations"] if annotations else [])
    return {"metadata": {k: meta[k] for k in keep if k in meta}}


def _holds_identity(status: Mapping[str, Any]) -> bool:
    """Active, or a staged task between stages (its identity lives on)."""
    return status.get("phase") == Phase.ACTIVE.value or (
        status.get("phase") == Phase.PENDING.value and bool(status.get("stages"))
    )


def _compact_task(task: Mapping[str, Any]) -> dict[str, Any] | None:
    """A task holding an identity, as recovery and adoption read it; None for any other."""
    status = task.get("status") or {}
    if not _holds_identity(status):
        return None
    return {
        "apiVersion": task.get("apiVersion"),
        "kind": task.get("kind"),
        "metadata": task.get("metadata") or {},
        "spec": task.get("spec") or {},
        "status": {
            k: status[k]
            for k in ("phase", "expiresAt", "grantedAt", "policies", "stage", "stages")
            if k in status
        },
    }


def _with_presets(spec: TaskSpec, record: Mapping[str, Any]) -> TaskSpec:
    """Preset entries get the rules recorded on the identity when they were granted; an
    entry whose record is missing or unreadable keeps none, and its re-check ends the
    grant (fail closed)."""
    if not any(e.preset for e in spec.access):
        return spec
    try:
        recorded = json.loads(record.get(ANNOTATION_PRESET_RULES) or "{}")
    except (TypeError, ValueError):
        recorded = {}
    entries = []
    for entry in spec.access:
        rules = (
            recorded.get(entry.namespace) if entry.preset and isinstance(recorded, dict) else None
        )
        try:
            parsed = parse_rules(rules) if rules else ()
        except Exception:
            parsed = ()
        entries.append(replace(entry, rules=parsed) if entry.preset else entry)
    return replace(spec, access=tuple(entries))


def _adopt(service: Service, task: Mapping[str, Any], found: Found) -> LiveGrant:
    spec = parse_task(task)
    plan = planned_grant(task, spec)
    sa = found.get((SERVICE_ACCOUNT, plan.namespace, plan.service_account))
    record = ((sa or {}).get("metadata") or {}).get("annotations") or {}
    if any(e.preset for e in spec.access):
        plan = planned_grant(task, _with_presets(spec, record))
    status = task.get("status") or {}
    if spec.staged and status.get("stage") != spec.stage:
        status = {k: v for k, v in status.items() if k != "expiresAt"}  # another stage's
    deadlines = [
        t
        for t in (
            parse_time(record.get(ANNOTATION_EXPIRES_AT)),
            parse_time(status.get("expiresAt")),
        )
        if t is not None
    ]
    policies = record.get(ANNOTATION_POLICIES)
    if spec.staged:
        return _adopt_staged(service, task, spec, plan, found, record, deadlines)
    wanted = set(plan.objects())
    return replace(
        plan,
        expires_at=min(deadlines) if deadlines else service.clock(),
        granted_at=parse_time(record.get(ANNOTATION_GRANTED_AT))
        or parse_time(status.get("grantedAt")),
        pod_uid=record.get(ANNOTATION_POD_UID) or None,
        policies=tuple(p for p in (policies or "").split(",") if p)
        or tuple(p for p in status.get("policies") or () if isinstance(p, str)),
        object_uids={ref: obj["metadata"]["uid"] for ref, obj in found.items() if ref in wanted},
    )


def _adopt_staged(
    service: Service,
    task: Mapping[str, Any],
    spec: TaskSpec,
    plan: LiveGrant,
    found: Found,
    record: Mapping[str, Any],
    deadlines: list[Any],
) -> LiveGrant:
    """A staged task's identity, and its current stage if that stage is complete. Stage
    objects that are not the current stage's (a crash while moving on), and an
    incomplete current stage, are deleted now: no access of any stage is left until
    the current one is decided again (the task watch does that next)."""
    status = task.get("status") or {}
    identity = set(plan.identity()) | {(ROLE, plan.namespace, plan.reader)}
    stage = set(plan.bindings()) | {(ROLE, g.namespace, g.role) for g in plan.grants}
    live = stage <= set(found) and record.get(ANNOTATION_STAGE) == spec.stage
    stale = [ref for ref in found if ref not in identity and (ref not in stage or not live)]
    leftovers = []
    for ref in sorted(stale, key=lambda r: r[0] != ROLE_BINDING):  # bindings first
        try:
            service.owned.delete(ref, plan.uid, found[ref]["metadata"]["uid"])
        except KubeError as exc:  # kept, and deleted before any stage is issued again
            log.warning("could not remove %s of %s: %s", ref, plan.ref, exc)
            leftovers.append(ref)
    if leftovers and live:  # never two stages: the current one is decided again after
        leftovers += sorted(stage, key=lambda r: r[0] != ROLE_BINDING)
        live = False
    task_expires = parse_time(record.get(ANNOTATION_TASK_EXPIRES_AT))
    if task_expires is None:
        task_expires = min(deadlines) if deadlines else service.clock()
    expires = min([*deadlines, task_expires]) if live else task_expires
    kept = identity | (stage if live else set()) | set(leftovers)
    policies = record.get(ANNOTATION_POLICIES) or ""
    return replace(
        plan,
        grants=plan.grants if live else (),
        expires_at=expires,
        task_expires_at=task_expires,
        granted_at=parse_time(record.get(ANNOTATION_GRANTED_AT))
        or parse_time(status.get("grantedAt")),
        pod_uid=record.get(ANNOTATION_POD_UID) or None,
        policies=tuple(p for p in policies.split(",") if p) if live else (),
        object_uids={ref: obj["metadata"]["uid"] for ref, obj in found.items() if ref in kept},
        stage_live=live,
        stages=stages.sanitize(status.get("stages")),
        leftovers=tuple(leftovers),
    )


def recover(service: Service) -> None:
    tasks = [
        compact
        for page in service.kube.pages(AGENT_TASKS)
        for task in page
        if (compact := _compact_task(task)) is not None
    ]
    found = owned_objects(service)
    now = service.clock()
    adopted: set[str] = set()
    for task in tasks:
        meta = task.get("metadata") or {}
        uid = meta.get("uid", "")
        status = task.get("status") or {}
        if not _holds_identity(status):
            continue
        if status.get("phase") != Phase.ACTIVE.value and not any(
            ref[0] == SERVICE_ACCOUNT for ref in found.get(uid, {})
        ):  # a staged task waiting for its first stage: no identity yet, nothing to adopt
            continue
        try:
            grant = _adopt(service, task, found.get(uid, {}))
        except (SpecError, KeyError, TypeError, ValueError) as exc:
            log.warning("cannot resume %s/%s: %s", meta.get("namespace"), meta.get("name"), exc)
            continue
        adopted.add(uid)
        service.registry.add(grant)
        assert grant.expires_at is not None
        if grant.expires_at <= now and grant.stage_index < 0:
            service.revoke(
                grant,
                Reason.TTL_EXPIRED,
                "the TTL ran out while the operator was down",
                triggered_at=grant.expires_at,
            )
        else:
            service.schedule_expiry(uid, grant.expires_at)
            service.unverified.add(uid)
    removed = 0
    for uid, objs in found.items():
        if uid not in adopted:
            removed += _remove(service, uid, objs)
    if removed:
        log.info("removed %d orphaned objects", removed)


def _remove(service: Service, uid: str, objs: Found) -> int:
    """Delete the objects of a task that holds no live grant, its token Secret too."""
    removed = 0
    secrets: set[ObjectRef] = set()
    for ref, obj in sorted(objs.items(), key=lambda item: item[0][0] != ROLE_BINDING):
        labels = obj["metadata"].get("labels") or {}
        base = base_name(labels.get(LABEL_TASK_NAME, ""), uid)
        ns = labels.get(LABEL_TASK_NAMESPACE)
        if ns:
            secrets.add((SECRET, ns, f"{base}-token"))
        try:
            removed += service.owned.delete(ref, uid, obj["metadata"]["uid"])
        except KubeError as exc:
            log.warning("could not remove %s: %s", ref, exc)
    for ref in secrets:
        try:
            removed += service.owned.delete(ref, uid)
        except KubeError as exc:
            log.warning("could not remove %s: %s", ref, exc)
    return removed
