"""Notifications: each decision POSTed to webhooks as a CloudEvent (or a Slack message).

Built from the audit record of the decision (which never holds a token), handed to a
bounded queue per receiver and delivered by that receiver's own thread with retries
and backoff: a slow, hung or dead receiver never delays a grant or a revocation, nor
the other receivers. When a receiver's queue is full the oldest event is dropped and
counted (agentaccess_notifications_total{result="dropped"}).

Wire format (docs/notifications.md):
- CloudEvents 1.0, structured JSON (`Content-Type: application/cloudevents+json`),
  `type` = `io.agentaccess.task.<event>` with <event> one of granted, denied, and the
  phase an end leads to: revoked, expired, completed, cancelled, failed;
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
QUEUE_LIMIT = 1000
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds before each retry; then given up
TIMEOUT = 5.0  # seconds per attempt (connect and response)


def event_type(record: Mapping[str, Any]) -> str:
    """granted and denied as such; any end by the phase it ends in (revoked, expired,
    completed, cancelled, failed)."""
    event = str(record.get("event"))
    if event in ("granted", "denied"):
        return TYPE_PREFIX + event
    return TYPE_PREFIX + str(record.get("phase") or "revoked").lower()


def cloudevent(record: Mapping[str, Any]) -> dict[str, Any]:
    """The CloudEvent for one audit record. Purely computational."""
    task = record.get("task") or {}
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": SOURCE,
        "type": event_type(record),
        "subject": f"{task.get('namespace')}/{task.get('name')}",
        "time": record.get("time"),
        "datacontenttype": "application/json",
        "data": {k: record.get(k) for k in DATA_FIELDS},
    }


def slack_message(record: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message for one audit record. Purely computational."""
    task = record.get("task") or {}
    what = event_type(record).removeprefix(TYPE_PREFIX)
    who = (record.get("requester") or {}).get("username") or "unknown"
    text = (
        f"*{what}*: AgentTask `{task.get('namespace')}/{task.get('name')}` for agent "
        f"`{record.get('agent')}` ({record.get('reason')}): {record.get('message')}\n"
        f"intent: {record.get('intent')!r} · asked by {who}"
    )
    if what == "granted":
        text += f" · until {record.get('expiresAt')}"
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
    except (KeyError, ValueError):
        return False
    expected = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(now - t) <= tolerance and hmac.compare_digest(expected, parts.get("v1", ""))


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
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self.thread.start()

    def put(self, message: dict[str, Any]) -> None:
        """Never blocks: a full queue drops its oldest event."""
        with self.cond:
            if len(self.queue) >= QUEUE_LIMIT:
                self.queue.popleft()
                self.observe("dropped")
            self.queue.append(message)
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
                message = self.queue.popleft()
            self._deliver(message)

    def _deliver(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":"), default=str).encode()
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
            if 400 <= status < 500 and status not in (408, 429):
                break  # the receiver refuses this event: retrying will not help
            if pause is None or self.stopped:
                break
            log.debug("notification to %s failed (%s), attempt %d", self.url, why, attempt + 1)
            self.sleep(pause)
        log.warning("notification to %s given up (%s)", _redact(self.url), why)
        self.observe("failed")


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            r.read(1024)
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _redact(url: str) -> str:
    """Webhook URLs often carry their credential in the path (Slack): log the host only."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…"


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
        message = slack_message(record) if self.fmt == "slack" else cloudevent(record)
        for receiver in self.receivers:
            receiver.put(message)

    def stop(self) -> None:
        for receiver in self.receivers:
            receiver.stop()
