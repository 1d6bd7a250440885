"""Notifications: each decision POSTed to webhooks as a CloudEvent (or a Slack message).

Built from the audit record of the decision (which never holds a token), handed to a
bounded queue per receiver and delivered by that receiver's own thread with retries
and backoff: a slow, hung or dead receiver never delays a grant or a revocation, nor
the other receivers. When a receiver's queue is full the oldest event is dropped and
counted (agentaccess_notifications_total{result="dropped"}).

Wire format (docs/notifications.md):
- CloudEvents 1.0, structured JSON (`Content-Type: application/cloudevents+json`),
  `type` = `io.agentaccess.task.<event>` with <event> one of pending (awaiting
  approval), approved (an approval that counts), granted, denied, and the phase an
  end leads to: revoked, expired, completed, cancelled, failed;
  `subject` = `<namespace>/<task>`; `id` unique per decision and stable across retries.
- With a secret: `X-AgentAccess-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
  "<t>.<body>">` (the timestamp bounds replays; the receiver recomputes and compares).
- `--notify-format slack`: `{"text": ...}` for a Slack incoming webhook.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

SOURCE = "/agentaccess.io/operator"
TYPE_PREFIX = "io.agentaccess.task."
SIGNATURE_HEADER = "X-AgentAccess-Signature"
#: fields of the audit record a notification carries (never objects, never a token)
DATA_FIELDS = (
    "task",
    "agent",
    "intent",
    "podName",
    "requester",
    "approval",
    "phase",
    "reason",
    "message",
    "trigger",
    "namespaces",
    "grantedRules",
    "grantedAt",
    "expiresAt",
    "endedAt",
)
QUEUE_LIMIT = 1000  # events per receiver
QUEUE_BYTES = 4 << 20  # and their bodies' size: a tenant's huge intents cannot grow memory
TEXT_LIMIT = 1024  # characters of intent and message carried (the audit line has them whole)
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds before each retry; then given up
TIMEOUT = 5.0  # seconds per attempt (connect and response)


def event_type(record: Mapping[str, Any]) -> str | None:
    """granted, denied and pending (awaiting approval) as such; approved for each
    approval that counts; any end by the phase it ends in (revoked, expired,
    completed, cancelled, failed). None for bookkeeping that is no decision: the
    deletion of a task that held no grant (its decision was sent when it was taken)."""
    event = str(record.get("event"))
    if event in ("granted", "denied", "pending"):
        return TYPE_PREFIX + event
    if event == "approval":  # a counted Approve; a counted Deny is sent as the denial
        approval = record.get("approval") or {}
        counted = approval.get("counted") and approval.get("decision") == "Approve"
        return TYPE_PREFIX + "approved" if counted else None
    if event == "deleted":
        return None
    return TYPE_PREFIX + str(record.get("phase") or "revoked").lower()


def _data(record: Mapping[str, Any]) -> dict[str, Any]:
    data = {k: record.get(k) for k in DATA_FIELDS}
    for k in ("intent", "message"):
        text = data[k]
        if isinstance(text, str) and len(text) > TEXT_LIMIT:
            data[k] = text[:TEXT_LIMIT] + "…"
    return data


def cloudevent(record: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The CloudEvent of type `kind` for one audit record. Purely computational."""
    task = record.get("task") or {}
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": SOURCE,
        "type": kind,
        "subject": f"{task.get('namespace')}/{task.get('name')}",
        "time": record.get("time"),
        "datacontenttype": "application/json",
        "data": _data(record),
    }


def _slack_escape(value: Any) -> str:
    """Slack's control characters: an intent cannot ping a channel or hide a link."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(record: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """A Slack incoming-webhook message for one audit record. Purely computational."""
    task = record.get("task") or {}
    data = _data(record)
    what = kind.removeprefix(TYPE_PREFIX)
    e = _slack_escape
    who = (record.get("requester") or {}).get("username") or "unknown"
    text = (
        f"*{what}*: AgentTask `{e(task.get('namespace'))}/{e(task.get('name'))}` for agent "
        f"`{e(record.get('agent'))}` ({e(record.get('reason'))}): {e(data['message'])}\n"
        f"intent: {e(data['intent'])} · asked by {e(who)}"
    )
    if what == "granted":
        text += f" · until {e(record.get('expiresAt'))}"
    return {"text": text}


def sign(secret: bytes, body: bytes, now: float) -> str:
    t = int(now)
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, now: float, tolerance: float = 300) -> bool:
    """What a receiver does (and the tests): recompute, compare in constant time."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
        given = parts["v1"].encode("ascii")
    except (KeyError, ValueError, UnicodeEncodeError):
        return False
    expected = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(now - t) <= tolerance and hmac.compare_digest(expected.encode(), given)


class Receiver:
    """One webhook: its own bounded queue and delivery thread."""

    def __init__(
        self,
        url: str,
        secret: bytes | None,
        fmt: str,
        observe: Callable[[str], None],
        post: Callable[[str, bytes, dict[str, str]], int] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.url, self.secret, self.fmt = url, secret, fmt
        self.observe = observe
        self.post = post or _post
        self.sleep = sleep
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued_bytes = 0
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self.thread.start()

    def put(self, body: bytes) -> None:
        """Never blocks: a full queue (by count or size) drops its oldest events."""
        with self.cond:
            self.queue.append(body)
            self.queued_bytes += len(body)
            while len(self.queue) > QUEUE_LIMIT or self.queued_bytes > QUEUE_BYTES:
                self.queued_bytes -= len(self.queue.popleft())
                self.observe("dropped")
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopped:
                    self.cond.wait()
                if self.stopped:
                    return
                body = self.queue.popleft()
                self.queued_bytes -= len(body)
            self._deliver(body)

    def _deliver(self, body: bytes) -> None:
        content = (
            "application/cloudevents+json" if self.fmt == "cloudevents" else "application/json"
        )
        for attempt, pause in enumerate((*BACKOFF, None)):
            headers = {"Content-Type": content, "User-Agent": "agent-access-operator"}
            if self.secret is not None:
                headers[SIGNATURE_HEADER] = sign(self.secret, body, time.time())
            try:
                status = self.post(self.url, body, headers)
            except Exception as exc:
                status, why = 0, type(exc).__name__
            else:
                why = f"HTTP {status}"
            if 200 <= status < 300:
                self.observe("delivered")
                return
            if 300 <= status < 500 and status not in (408, 429):
                break  # refused, or redirected (never followed): retrying will not help
            if pause is None or self.stopped:
                break
            log.debug(
                "notification to %s failed (%s), attempt %d", _redact(self.url), why, attempt + 1
            )
            self.sleep(pause)
        log.warning("notification to %s given up (%s)", _redact(self.url), why)
        self.observe("failed")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, never followed: it would turn the POST into a GET that
    carries the signature to wherever the receiver points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(req, timeout=TIMEOUT) as r:
            r.read(1024)
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _redact(url: str) -> str:
    """Webhook URLs often carry their credential (Slack's path, user:password@): log the
    scheme and host only."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}/…"


class Notifier:
    """Every audit record, to every receiver, without ever waiting for one."""

    def __init__(
        self,
        urls: Sequence[str],
        secret: bytes | None = None,
        fmt: str = "cloudevents",
        observe: Callable[[str], None] = lambda result: None,
    ):
        if fmt not in ("cloudevents", "slack"):
            raise ValueError(f"unknown notification format {fmt!r}")
        self.fmt = fmt
        self.receivers = [Receiver(u, secret, fmt, observe) for u in urls]

    def __call__(self, record: Mapping[str, Any]) -> None:
        kind = event_type(record)
        if kind is None:
            return
        message = slack_message(record, kind) if self.fmt == "slack" else cloudevent(record, kind)
        body = json.dumps(message, separators=(",", ":"), default=str).encode()
        for receiver in self.receivers:
            receiver.put(body)

    def stop(self) -> None:
        for receiver in self.receivers:
            receiver.stop()
