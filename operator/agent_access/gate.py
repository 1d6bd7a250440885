"""The enforcement point: every call of a per-task identity, decided from memory.

`Gate` answers the API server's SubjectAccessReviews (authz_server.py carries them)
and turns its audit events into the use log. Everything it reads is watch-fed and
in memory, so no request waits on the API server:

- an AgentTask watch of its own (the spec, and the status only the operator
  writes), indexed by per-task identity;
- the facts cache (facts.py): policies, namespaces, agents, pods; on the leader
  the very cache its grant service uses, on a standby one of the gate's own;
- on the leader, the registry of live grants (`live`): a revocation is known here
  the moment it starts, before any object or status changes.

Leader and standbys answer alike; a standby's view lags the leader's by one watch
event (milliseconds): a cancel, a deletion, a suspension, a pod's end or a policy
change is seen by every replica from the same watch event that tells the leader.

Each call is one `used` audit line (written by a thread of its own from a bounded
queue: when the queue is full the call is denied, so no call goes unrecorded) and
updates the identity's last use, which idle timeouts count from. Replicas record
the last use in the task's status (`lastUsedAt`) for tasks under an idleTimeout,
at most every IDLE_FLUSH_MIN seconds (or a quarter of the timeout), so the leader
sees calls a standby answered.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .audit import AuditLog
from .authz import (
    Call,
    TaskEntry,
    entry_of,
    epoch,
    inactive,
    needs_recheck,
    parse_review,
    recheck_rules,
    response,
)
from .engine import Denied, Policy, TaskSpec, condition_context, reassess, resolve_presets
from .facts import Cache, agent_object, suspension
from .informers import SKIP, Informer, Key
from .kube import AGENT_TASKS, Kube, KubeError
from .model import Reason
from .reevaluation import pod_end_reason
from .rules import Rule
from .uses import events_of, line_of_event, used_line

log = logging.getLogger(__name__)

#: Use lines waiting to be written; a call that finds the queue full is denied.
LINE_QUEUE = 20_000
#: A replica records a task's last use in its status at most this often (seconds)...
IDLE_FLUSH_MIN = 2.0
#: ... or every idleTimeout / IDLE_FLUSH_PARTS, whichever is longer.
IDLE_FLUSH_PARTS = 4
#: A recheck that failed asks the leader to re-evaluate the task at most this often.
REVOKE_ASK_EVERY = 1.0
#: Re-check verdicts kept (per task and state of the facts it read); cleared when full.
VERDICTS = 4096
#: A watch disconnected longer than this (seconds): the gate refuses until it is back.
UNHEALTHY_GRACE = 5.0
#: Threads computing re-checks (each once per task and state of its facts).
RECHECK_THREADS = 2

#: What the API server is told (and so the caller, and whoever asks a
#: SubjectAccessReview about the identity): the kind of refusal, never a task's name.
STARTING = "agent-access-operator: starting, per-task identities are refused until it is ready"
NOT_ACTIVE = "agent-access-operator: the task of this identity is not active"
OUTSIDE = "agent-access-operator: the agent is suspended or gone, or the task's pod ended"
RECHECK_FAILED = "agent-access-operator: re-check failed, the grant is being revoked"
LOG_FULL = "agent-access-operator: the use log is full"
OVERLOADED = "agent-access-operator: overloaded"


@dataclass(frozen=True, slots=True)
class Pending:
    """A call that needs a re-check: finished off the event loop (`Gate.finish`)."""

    version: str
    call: Call
    entry: TaskEntry
    now: float
    started: float
    key: tuple[Any, ...]


class Gate:
    def __init__(
        self,
        kube: Kube,
        cache: Cache,
        audit: AuditLog,
        clock: Callable[[], float] = time.time,
        namespaces: Sequence[str] | None = None,
    ):
        self.kube = kube
        self.cache = cache
        self.audit = audit
        self.clock = clock
        #: The leader's knowledge of a task's grant (True live, False ended, None: not
        #: known here) and how to ask it to re-evaluate a grant a recheck refused; unset
        #: on standbys.
        self.live: Callable[[str], bool | None] | None = None
        self.refused: Callable[[str], None] | None = None
        #: The leader's grant spec (presets resolved as granted); None on standbys.
        self.grant_spec: Callable[[str], TaskSpec | None] | None = None
        #: AgentTasks by namespace ("": every namespace), as the operator watches them.
        self._watches: dict[str, Informer[TaskEntry]] = {
            ns or "": Informer(
                kube,
                AGENT_TASKS,
                self._entry,
                self._task_changed,
                name=f"agenttasks-authz/{ns}" if ns else "agenttasks-authz",
                namespace=ns,
            )
            for ns in ([*namespaces] if namespaces else [None])
        }
        #: (namespace, identity) -> (namespace, task name); checked on every lookup.
        self._by_identity: dict[Key, Key] = {}
        #: uid -> (namespace, task name)
        self._by_uid: dict[str, Key] = {}
        #: uid -> the `recheck` rules of its policies when this replica first saw it Active
        #: (a policy that drops or loses them later still gets the call re-checked).
        self._captured: dict[str, tuple[tuple[str, Rule], ...]] = {}
        #: uid -> the last call seen here (epoch seconds), and what was last recorded.
        self._last_used: dict[str, float] = {}
        self._flushed: dict[str, float] = {}
        self._asked: dict[str, float] = {}
        self._verdicts: dict[tuple[Any, ...], Denied | None] = {}
        self._computing: dict[tuple[Any, ...], Future[Denied | None]] = {}
        self._verdict_lock = threading.Lock()
        self._use_lock = threading.Lock()
        self._unhealthy_since: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(RECHECK_THREADS, thread_name_prefix="authz-recheck")
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue(LINE_QUEUE)
        self._started = False

    # -- running ------------------------------------------------------------------------

    def start(self, own_cache: bool) -> None:
        """Start the task watch, the line writer and the status flusher; `own_cache`:
        start the facts cache too (a standby: no grant service runs it)."""
        if self._started:
            return
        self._started = True
        if own_cache:
            threading.Thread(target=self.cache.start, name="facts-start", daemon=True).start()
        for watch in self._watches.values():
            watch.start()
        threading.Thread(target=self._write_lines, name="use-log", daemon=True).start()
        threading.Thread(target=self._flush_loop, name="last-use", daemon=True).start()

    def _read(self) -> list[Informer[Any]]:
        """The watches the gate decides from."""
        c = self.cache
        return [*self._watches.values(), c.policies, c.cluster_policies, c.namespaces,
                c.service_accounts, c.pods]  # fmt: skip

    def listed(self) -> bool:
        """Every watch it reads has listed once (readiness: the Service sends reviews)."""
        return all(w.synced.is_set() for w in self._read())

    def ready(self) -> bool:
        """Listed, and no watch disconnected for longer than UNHEALTHY_GRACE: an
        enforcement point that may be behind refuses (fail closed) rather than answer
        from stale state; a reconnect (a few hundred ms) does not refuse everyone."""
        now = time.monotonic()
        for watch in self._read():
            if not watch.synced.is_set():
                return False
            if watch.healthy:
                self._unhealthy_since.pop(watch.name, None)
            elif now - self._unhealthy_since.setdefault(watch.name, now) > UNHEALTHY_GRACE:
                return False
        return True

    def _task(self, key: Key) -> TaskEntry | None:
        watch = self._watches.get("") or self._watches.get(key[0])
        return watch.get(*key) if watch is not None else None

    # -- the task watch (watch thread) --------------------------------------------------

    def _entry(self, task: Mapping[str, Any]) -> TaskEntry | Any:
        entry = entry_of(task)
        if entry is None:
            return SKIP
        self._by_identity[(entry.namespace, entry.identity)] = (entry.namespace, entry.name)
        self._by_uid[entry.uid] = (entry.namespace, entry.name)
        if entry.phase == "Active" and entry.uid not in self._captured and self._policies_listed():
            self._captured[entry.uid] = self._recheck_of(entry)
        return entry

    def _policies_listed(self) -> bool:
        c = self.cache
        return all(i.synced.is_set() for i in (c.policies, c.cluster_policies, c.namespaces))

    def _recheck_of(self, entry: TaskEntry) -> tuple[tuple[str, Rule], ...]:
        if entry.spec is None:
            return ()
        out = []
        for ns in entry.spec.target_namespaces:
            labels = self.cache.namespaces.get(None, ns)
            for rule in recheck_rules(self._policies(ns), ns, labels):
                out.append((ns, rule))
        return tuple(out)

    def _task_changed(self, kind: str, key: Key, old: Any, new: Any) -> None:
        replaced = isinstance(new, TaskEntry) and isinstance(old, TaskEntry) and new.uid != old.uid
        if (new is None or replaced) and isinstance(old, TaskEntry):
            if self._by_identity.get((old.namespace, old.identity)) == key:
                del self._by_identity[(old.namespace, old.identity)]
            if self._by_uid.get(old.uid) == key:
                del self._by_uid[old.uid]
            for table in (self._captured, self._last_used, self._flushed, self._asked):
                table.pop(old.uid, None)

    def entry(self, namespace: str, identity: str) -> TaskEntry | None:
        key = self._by_identity.get((namespace, identity))
        found = self._task(key) if key else None
        if found is None or found.identity != identity:
            return None
        return found

    # -- facts (memory only) ------------------------------------------------------------

    def _policies(self, namespace: str) -> list[Policy]:
        return [*self.cache.policies.in_namespace(namespace), *self.cache.cluster_policies.values()]

    def _outside(self, entry: TaskEntry, live_pod_uid: str | None) -> str | None:
        """A suspension, a deleted agent, a pod that ended: from the watches."""
        cache = self.cache
        agent = cache.service_accounts.get(entry.namespace, entry.agent)
        why = suspension(
            entry.namespace, entry.agent, agent, cache.namespaces.get(None, entry.namespace)
        )
        if why:
            return why
        if agent is None:
            return f"agent ServiceAccount {entry.namespace}/{entry.agent} does not exist"
        if entry.pod_name:
            reason = pod_end_reason(cache.pods.get(entry.namespace, entry.pod_name), live_pod_uid)
            if reason is not None:
                return f"pod {entry.pod_name} ended ({reason})"
        return None

    def _recheck(self, entry: TaskEntry, call: Call, now: float) -> Denied | None:
        """The live re-evaluation of a call that needs a `recheck: true` rule: the task's
        access is still covered by the policies as they are now, conditions included."""
        granted = self.grant_spec(entry.uid) if self.grant_spec is not None else None
        spec = granted or entry.spec
        if spec is None:
            return Denied(Reason.POLICY_CHANGED, "the task's spec cannot be read")
        targets = spec.target_namespaces
        policies = [p for ns in set(targets) for p in self.cache.policies.in_namespace(ns)]
        policies += self.cache.cluster_policies.values()
        namespaces = {n: labels for n in targets
                      if (labels := self.cache.namespaces.get(None, n)) is not None}  # fmt: skip
        resolved = resolve_presets(spec, policies, namespaces)
        if isinstance(resolved, Denied):
            return resolved
        moment = datetime.fromtimestamp(now, UTC)
        context = None
        if any(p.conditions for p in policies):
            agent = self.cache.service_accounts.get(spec.namespace, spec.agent)
            pod = self.cache.pods.get(spec.namespace, spec.pod_name) if spec.pod_name else None
            context = condition_context(
                resolved, policies, agent_object(spec.namespace, spec.agent, agent),
                pod.as_object(spec.namespace) if pod else None, moment,
            )  # fmt: skip
        verdict = reassess(resolved, policies, namespaces, entry.policies, context)
        return verdict if isinstance(verdict, Denied) else None

    # -- a review (the server's event loop: memory only) -------------------------------

    def review(self, body: Any) -> dict[str, Any] | Pending:
        """Answer one SubjectAccessReview, or hand back the call when it needs a re-check
        not yet known (the server runs `finish` on a worker thread). Raises ReviewError
        for a malformed review."""
        started = time.perf_counter()
        version, call = parse_review(body)
        if call is None:  # not a per-task identity: the configuration sends none
            return response(version, False, "")
        now = self.clock()
        entry = self.entry(call.home, call.identity)
        decided = self._decide(call, entry, now)
        if isinstance(decided, tuple) and len(decided) == 1:  # a re-check is needed
            assert entry is not None
            key = decided[0]
            with self._verdict_lock:
                known = key in self._verdicts
                verdict = self._verdicts.get(key)
            if not known:
                return Pending(version, call, entry, now, started, key)
            return self._answer(
                version, call, entry, now, started, *self._rechecked(entry, verdict)
            )
        why, short, refused = decided
        return self._answer(version, call, entry, now, started, why, short, refused)

    def begin(self, pending: Pending) -> Future[Denied | None]:
        """The re-check of a pending call: one computation per task and state of its
        facts, on the gate's threads, shared by every call waiting for it."""
        key = pending.key
        with self._verdict_lock:
            if key in self._verdicts:
                done: Future[Denied | None] = Future()
                done.set_result(self._verdicts[key])
                return done
            future = self._computing.get(key)
            if future is not None:
                return future
            future = self._computing[key] = self._pool.submit(self._compute, pending)
        # Outside the lock: a future that is already done runs the callback at once, on
        # this thread, and _forget takes the lock (under it, the event loop deadlocked).
        future.add_done_callback(lambda f: self._forget(key, f))
        return future

    def _forget(self, key: tuple[Any, ...], future: Future[Denied | None]) -> None:
        with self._verdict_lock:
            if self._computing.get(key) is future:
                del self._computing[key]

    def _compute(self, p: Pending) -> Denied | None:
        verdict = self._recheck(p.entry, p.call, p.now)
        # kept only if the facts did not move while it ran (else it answers this call only)
        if self._fingerprint(p.entry, p.now) == p.key:
            with self._verdict_lock:
                if len(self._verdicts) >= VERDICTS:
                    self._verdicts.clear()
                self._verdicts[p.key] = verdict
        return verdict

    def complete(self, p: Pending, verdict: Denied | BaseException | None) -> dict[str, Any]:
        """Answer a pending call once its re-check is known (or failed: refused). What may
        have changed while it waited (a cancel, a suspension) is looked at again."""
        entry = self.entry(p.call.home, p.call.identity)
        now = self.clock()
        live = self.live(p.entry.uid) if self.live is not None else None
        why = inactive(entry, now, live)
        if why is not None or entry is None:
            return self._answer(p.version, p.call, entry, p.now, p.started, why, NOT_ACTIVE, None)
        why = self._outside(entry, None)
        if why is not None:
            return self._answer(p.version, p.call, entry, p.now, p.started, why, OUTSIDE, None)
        if isinstance(verdict, BaseException):
            log.warning("re-checking a call of %s did not complete: %r", entry.ref, verdict)
            why = f"the re-check did not complete ({type(verdict).__name__})"
            return self._answer(p.version, p.call, entry, p.now, p.started, why,
                                RECHECK_FAILED, None)  # fmt: skip
        found = self._rechecked(entry, verdict)
        return self._answer(p.version, p.call, entry, p.now, p.started, *found)

    def overloaded(self, body: Any) -> dict[str, Any]:
        """Refuse a call without deciding it (the server is behind); still logged."""
        version, call = parse_review(body)
        if call is None:
            return response(version, False, "")
        entry = self.entry(call.home, call.identity)
        return self._answer(version, call, entry, self.clock(), time.perf_counter(),
                            "the authorizer is overloaded", OVERLOADED, None,
                            decision="overloaded")  # fmt: skip

    def _rechecked(
        self, entry: TaskEntry, verdict: Denied | None
    ) -> tuple[str | None, str | None, str | None]:
        if verdict is None:
            return None, None, None
        return f"re-check failed: {verdict.message}", RECHECK_FAILED, entry.uid

    def _answer(
        self,
        version: str,
        call: Call,
        entry: TaskEntry | None,
        now: float,
        started: float,
        why: str | None,
        short: str | None,
        refused: str | None,
        decision: str | None = None,
    ) -> dict[str, Any]:
        """Record the call (one line; its last use) and answer."""
        denied = why is not None
        # made with the task's own token, or a review someone made about the identity
        made = entry.made(call) if entry is not None else bool(call.credential)
        line = used_line(
            call, entry, decision or ("deny" if denied else "no-opinion"), why or "",
            datetime.fromtimestamp(now, UTC), (time.perf_counter() - started) * 1000,
            event="used" if made else "checked",
        )  # fmt: skip
        try:
            self._lines.put_nowait(line)
        except queue.Full:  # a call that cannot be recorded is not allowed
            denied, short = True, LOG_FULL
        if entry is not None and made:
            self._note_use(entry.uid, now)
        asked = self._asked.get(refused or "", 0.0)
        if refused is not None and self.refused is not None and now - asked >= REVOKE_ASK_EVERY:
            self._asked[refused] = now
            self.refused(refused)
        return response(version, denied, short or "")

    def _decide(
        self, call: Call, entry: TaskEntry | None, now: float
    ) -> tuple[str | None, str | None, str | None] | tuple[tuple[Any, ...]]:
        """(why the call is denied or None, what the API server is told, the task to
        revoke or None); or (the re-check's key,) when the call needs one."""
        if not self.ready():
            return "the authorizer is starting: its watches have not listed yet", STARTING, None
        live = self.live(entry.uid) if (self.live is not None and entry is not None) else None
        why = inactive(entry, now, live)
        if why is not None or entry is None:
            return why, NOT_ACTIVE, None
        why = self._outside(entry, None)
        if why is not None:
            return why, OUTSIDE, None
        if entry.phase == "Active" and entry.uid not in self._captured:
            self._captured[entry.uid] = self._recheck_of(entry)
        labels = self.cache.namespaces.get(None, call.namespace)
        rules = [r for ns, r in self._captured.get(entry.uid, ()) if ns == call.namespace]
        rules += recheck_rules(self._policies(call.namespace), call.namespace, labels)
        if not needs_recheck(call, rules):
            return None, None, None
        if entry.spec is None or call.namespace not in entry.spec.target_namespaces:
            # e.g. the stage the task moves on from: its bindings are on their way out
            why = f"{call.namespace} is not in the current access of AgentTask {entry.ref}"
            return why, NOT_ACTIVE, None
        return (self._fingerprint(entry, now),)

    def _fingerprint(self, entry: TaskEntry, now: float) -> tuple[Any, ...]:
        """Everything a re-check reads: the task (its resourceVersion), the policies,
        namespaces, agent and pod as watched, and the second when conditions read `now`."""
        granted = self.grant_spec(entry.uid) if self.grant_spec is not None else None
        spec = granted or entry.spec
        assert spec is not None
        targets = sorted(set(spec.target_namespaces))
        policies = [p for ns in targets for p in self.cache.policies.in_namespace(ns)]
        policies += self.cache.cluster_policies.values()
        cache = self.cache
        return (
            entry.uid,
            entry.version,
            granted is not None,
            spec.stage_index,
            tuple((p.key, p.resource_version) for p in policies),
            tuple(tuple(sorted((cache.namespaces.get(None, n) or {}).items())) for n in targets),
            cache.service_accounts.get(spec.namespace, spec.agent),
            cache.pods.get(spec.namespace, spec.pod_name) if spec.pod_name else None,
            int(now) if any(p.conditions for p in policies) else 0,
        )

    # -- audit events (the API server's, from its audit webhook backend) -------------------

    def audit_events(self, body: Any) -> int:
        """Turn an EventList into use lines; the number of lines. Raises queue.Full
        when the use log cannot take them (the API server sends them again)."""
        lines = []
        now = self.clock()
        for event in events_of(body):
            line = line_of_event(event, self.entry)
            if line is None:
                continue
            lines.append(line)
            task = line.get("task")
            if task and line["event"] == "used":
                # never later than now: a forged time cannot hold an idle grant open
                self._note_use(task["uid"], min(epoch(line["time"]) or 0.0, now))
        if self._lines.maxsize - self._lines.qsize() < len(lines):
            raise queue.Full
        for line in lines:
            self._lines.put_nowait(line)
        return len(lines)

    # -- last use -------------------------------------------------------------------------

    def _note_use(self, uid: str, moment: float) -> None:
        with self._use_lock:
            if moment > self._last_used.get(uid, 0.0):
                self._last_used[uid] = moment

    def last_used(self, uid: str) -> float | None:
        """The last call of the task's identity any replica saw (as far as known here:
        this replica's calls and audit events, and status.lastUsedAt)."""
        entry = self._entry_by_uid(uid)
        recorded = entry.last_used if entry is not None else None
        mine = self._last_used.get(uid)
        return max((t for t in (mine, recorded) if t is not None), default=None)

    def idle_timeout(self, entry: TaskEntry) -> float | None:
        """The shortest idleTimeout of the policies the grant rests on (seconds)."""
        keys = set(entry.policies)
        found = [
            p.idle_timeout.total_seconds()
            for ns in (entry.spec.target_namespaces if entry.spec else ())
            for p in self._policies(ns)
            if p.idle_timeout is not None and p.key in keys
        ]
        return min(found, default=None)

    def _flush_loop(self) -> None:
        while True:  # for the life of the process (a daemon thread)
            time.sleep(1.0)
            try:
                self.flush()
            except Exception:
                log.exception("recording last uses failed")

    def flush(self) -> None:
        """Record in status.lastUsedAt the last use of tasks under an idleTimeout."""
        now = self.clock()
        for uid, used in list(self._last_used.items()):
            if used <= self._flushed.get(uid, 0.0):
                continue
            entry = self._entry_by_uid(uid)
            if entry is None or entry.phase != "Active":
                continue
            idle = self.idle_timeout(entry)
            if idle is None:
                continue
            if entry.last_used is not None and used <= entry.last_used:
                self._flushed[uid] = used  # another replica recorded a later call
                continue
            every = max(IDLE_FLUSH_MIN, idle / IDLE_FLUSH_PARTS)
            if now - self._flushed.get(uid, 0.0) < every:
                continue
            self._flushed[uid] = used
            stamp = datetime.fromtimestamp(used, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            patch = [{"op": "test", "path": "/metadata/uid", "value": uid}]
            if entry.last_used_text:  # only over the value seen: never back in time
                patch.append({"op": "test", "path": "/status/lastUsedAt",
                              "value": entry.last_used_text})  # fmt: skip
            patch.append({"op": "add", "path": "/status/lastUsedAt", "value": stamp})
            with contextlib.suppress(KubeError):  # another replica wrote first: next round
                self.kube.json_patch(AGENT_TASKS, entry.namespace, entry.name, patch, "status")

    def _entry_by_uid(self, uid: str) -> TaskEntry | None:
        key = self._by_uid.get(uid)
        found = self._task(key) if key else None
        return found if found is not None and found.uid == uid else None

    # -- output ---------------------------------------------------------------------------

    def _write_lines(self) -> None:
        """Write queued use lines in batches (one flush each): at a thousand calls a
        second the writer stays a small share of the interpreter."""
        while True:
            try:
                batch = [self._lines.get(timeout=0.5)]
            except queue.Empty:
                continue
            while len(batch) < 500:
                try:
                    batch.append(self._lines.get_nowait())
                except queue.Empty:
                    break
            try:
                self.audit.write_many(batch)
            except Exception:
                log.exception("writing %d use lines failed", len(batch))
            time.sleep(0.01)  # let lines gather: fewer, larger writes

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line is written (tests, shutdown)."""
        end = time.monotonic() + timeout
        while not self._lines.empty() and time.monotonic() < end:
            time.sleep(0.01)
        return self._lines.empty()
