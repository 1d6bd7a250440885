"""Idle timeouts and the enforcement point's hooks into the grant service.

A policy's `spec.idleTimeout` ends a grant that made no call for that long
(Expired / IdleTimeout). The last call comes from the authorization webhook or the
API server's audit events (gate.py; a standby's calls through status.lastUsedAt);
without either source no call is ever seen, and a grant under an idleTimeout ends
that long after it was granted (docs/authorization-webhook.md).

The deadline shares the grant's expiry timer: `schedule_expiry` (service.py) takes
the earlier of expiresAt and the idle deadline; when it fires the idle deadline is
computed again (a call since moves it on) and the grant ends only if it has passed.
A policy whose idleTimeout appears or shrinks reschedules its grants at once.

A mixin of the grant service (service.py), like reevaluation.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from .engine import Policy, TaskSpec
from .informers import Key
from .model import Reason
from .reevaluation import Reevaluation
from .runtime import LiveGrant

log = logging.getLogger(__name__)


class Idle(Reevaluation):
    """Expects the attributes and methods of `service.Service`."""

    #: The last call of a task's identity (epoch seconds) any source saw, or None: set
    #: by the command line when the enforcement point runs (Gate.last_used).
    uses: Callable[[str], float | None] | None = None

    def idle_timeout(self, grant: LiveGrant) -> timedelta | None:
        """The shortest idleTimeout of the policies the grant rests on, as they are now
        (from the watches only: no request; a deadline set without them is corrected
        by the next sweep)."""
        keys = set(grant.policies)
        if not keys:
            return None
        found = [
            p.idle_timeout
            for p in self._watched_policies({g.namespace for g in grant.grants})
            if p.idle_timeout is not None and p.key in keys
        ]
        return min(found, default=None)

    def _watched_policies(self, namespaces: set[str]) -> list[Policy]:
        cache = self.cache
        out = [p for ns in namespaces for p in cache.policies.in_namespace(ns)]
        return out + cache.cluster_policies.values()

    def idle_due(self, grant: LiveGrant) -> datetime | None:
        """When the grant ends for want of calls (None: no idleTimeout applies)."""
        idle = self.idle_timeout(grant)
        if idle is None or grant.granted_at is None:
            return None
        last = grant.granted_at
        used = self.uses(grant.uid) if self.uses is not None else None
        if used is not None:
            last = max(last, datetime.fromtimestamp(used, UTC))
        return last + idle

    def idle_message(self, grant: LiveGrant, due: datetime) -> str:
        idle = self.idle_timeout(grant) or timedelta(0)
        return f"no call for {int(idle.total_seconds())}s (idleTimeout): the grant ended"

    def end_if_idle(self, grant: LiveGrant) -> bool:
        """Called when the grant's timer fires: end it if its idle deadline passed."""
        due = self.idle_due(grant)
        if due is None or due > self.clock() + timedelta(milliseconds=50):
            return False
        self.revoke(grant, Reason.IDLE_TIMEOUT, self.idle_message(grant, due), triggered_at=due)
        return True

    def sweep_idle(self, policy_keys: set[str] | None = None) -> None:
        """Reschedule the grants under these policies (all: None) with an idleTimeout."""
        for grant in self.registry.all():
            if grant.expires_at is None:
                continue
            if policy_keys is not None and not policy_keys & set(grant.policies):
                continue
            if self.idle_timeout(grant) is not None:
                self.schedule_expiry(grant.uid, grant.expires_at)

    def _policy_event(self, kind: str, key: Key, old: object, new: object) -> None:
        super()._policy_event(kind, key, old, new)
        self._idle_policy_event(key, old, new)

    def _idle_policy_event(self, key: Key, old: object, new: object) -> None:
        """A policy gained or changed its idleTimeout: its grants' timers move."""
        before = old.idle_timeout if isinstance(old, Policy) else None
        after = new.idle_timeout if isinstance(new, Policy) else None
        if before != after and after is not None and isinstance(new, Policy):
            with contextlib.suppress(RuntimeError):  # shutting down
                self.pool.submit(self.sweep_idle, {new.key})

    # -- the enforcement point's questions ---------------------------------------------

    def live_state(self, uid: str) -> bool | None:
        """For the webhook: True while the grant is live here, False once it is ending
        or ended, None when this process does not know the task (not decided yet)."""
        grant = self.registry.get(uid)
        if grant is not None:
            return grant.stage_live and uid not in self._ending
        if uid in self.ended:
            return False
        return None

    def granted_spec(self, uid: str) -> TaskSpec | None:
        """The spec as granted (presets resolved to the rules issued), for re-checks."""
        grant = self.registry.get(uid)
        return grant.spec if grant is not None else None

    def recheck_refused(self, uid: str) -> None:
        """A `recheck` call failed its live re-evaluation: re-evaluate the grant now (it
        ends if the re-evaluation agrees, as it will with the same facts)."""
        grant = self.registry.get(uid)
        if grant is not None:
            self._reevaluate_soon([grant])
