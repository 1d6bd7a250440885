"""The objects the operator owns: created afresh, found and verified, deleted safely.

The operator only ever deletes an object that carries its marks for that very
task (managed-by + task UID labels), and deletes it with the object's UID as a
precondition, so a different object that took the name meanwhile is never hit.
It never reads Secrets it did not create: a token Secret is looked at through an
empty merge patch, which admission refuses for any Secret that is not the
operator's own (see crds/admission-policies.yaml), and which changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .kube import (
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
    Conflict,
    Kube,
    KubeError,
    NotFound,
    Resource,
)
from .model import SECRET_TYPE
from .objects import is_ours
from .runtime import ROLE, ROLE_BINDING, SECRET, SERVICE_ACCOUNT, LiveGrant, ObjectRef

log = logging.getLogger(__name__)

RESOURCES: dict[str, Resource] = {
    ROLE_BINDING: ROLE_BINDINGS,
    ROLE: ROLES,
    SERVICE_ACCOUNT: SERVICE_ACCOUNTS,
    SECRET: SECRETS,
}
KINDS = {res.plural: kind for kind, res in RESOURCES.items()}


class NotOurs(KubeError):
    """An object holds a name the operator needs, and it is not the operator's."""

    def __init__(self, kind: str, namespace: str, name: str):
        super().__init__(
            409,
            f"{kind} {namespace}/{name} already exists and was not created by the operator "
            "for this task; it was left untouched",
        )


def mine(kind: str, obj: Mapping[str, Any], task_uid: str) -> bool:
    """The operator's object for this task (a token Secret also has the operator's type)."""
    return is_ours(obj, task_uid) and (kind != SECRET or obj.get("type") == SECRET_TYPE)


class Owned:
    def __init__(self, kube: Kube):
        self.kube = kube

    def fetch(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as it is now, or None. Secrets through an empty merge patch."""
        res = RESOURCES[kind]
        if kind == SECRET:
            try:
                return self.kube.merge_patch(res, namespace, name, {})
            except NotFound:
                return None
            except KubeError as exc:
                if exc.status in (403, 422):  # admission: not a Secret of the operator's
                    raise NotOurs(kind, namespace, name) from None
                raise
        return self.kube.get(res, namespace, name)

    def create(self, kind: str, body: Mapping[str, Any], task_uid: str) -> dict[str, Any]:
        """Create; an object of that name left by an interrupted attempt for the same
        task is replaced; anything else holding the name makes this fail (NotOurs)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        try:
            return self.kube.create(RESOURCES[kind], namespace, body)
        except Conflict:
            existing = self.fetch(kind, namespace, name)
            if existing is not None and not mine(kind, existing, task_uid):
                raise NotOurs(kind, namespace, name) from None
            if existing is not None:
                self.kube.delete(RESOURCES[kind], namespace, name, existing["metadata"]["uid"])
            return self.kube.create(RESOURCES[kind], namespace, body)

    def delete(self, ref: ObjectRef, task_uid: str, uid: str = "") -> bool:
        """Delete the task's object at `ref` if it is there and provably the task's.

        With `uid` known (recorded at creation) that is one call; otherwise the object
        is fetched and verified first. Returns True when something was deleted.
        """
        kind, namespace, name = ref
        if not uid:
            try:
                found = self.fetch(kind, namespace, name)
            except NotOurs:
                log.warning("not deleting %s %s/%s: it is not this task's", kind, namespace, name)
                return False
            if found is None:
                return False
            if not mine(kind, found, task_uid):
                log.warning("not deleting %s %s/%s: it is not this task's", kind, namespace, name)
                return False
            uid = found["metadata"]["uid"]
        try:
            return self.kube.delete(RESOURCES[kind], namespace, name, uid)
        except Conflict:  # the precondition failed: another object holds the name now
            log.warning("not deleting %s %s/%s: it was replaced", kind, namespace, name)
            return False

    def delete_grant_part(self, grant: LiveGrant, refs: list[ObjectRef]) -> None:
        for ref in refs:
            self.delete(ref, grant.uid, grant.object_uids.get(ref, ""))
