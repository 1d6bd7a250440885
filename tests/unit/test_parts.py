"""Durations, names, status conditions, deadlines, audit records, generated CRDs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent_access import audit, objects, status
from agent_access.durations import DurationError, parse_duration
from agent_access.model import END_PHASE, Phase, Reason
from agent_access.runtime import Deadlines

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 28, 16, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("10m", 600),
        ("1h30m", 5400),
        ("90s", 90),
        ("1.5h", 5400),
        ("500ms", 0.5),
        ("2h0m5s", 7205),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "10", "ten minutes", "-5m", "0s", "5 m", "1d"])
def test_parse_duration_rejects(text):
    with pytest.raises(DurationError):
        parse_duration(text)


def test_names_are_dns_safe_unique_and_bounded():
    uid = "c11c8696-4a0d-48f5-95fd-1bb70ce4e6fc"
    name = objects.base_name("Incident.4711_SUMMARY" + "x" * 80, uid)
    assert name.startswith("aat-incident-4711-summary") and name.endswith("-c11c8696")
    assert len(objects.secret_name("t" * 253, uid)) <= 63
    assert objects.base_name("t", uid) != objects.base_name("t", "d" + uid[1:])


def test_token_seconds_respects_api_minimum_and_avoids_3607():
    assert objects.token_seconds(10) == 600
    assert objects.token_seconds(3547) == 3608
    assert objects.token_seconds(7200) == 7260


def test_owners_pod_alone_owns_identity_when_given():
    task = {"metadata": {"name": "t", "namespace": "a", "uid": "u"}}
    assert objects.owners_in_task_namespace(task, ("p", "pu"))[0]["kind"] == "Pod"
    assert objects.owners_in_task_namespace(task, None)[0]["kind"] == "AgentTask"


def test_condition_keeps_transition_time_unless_status_flips():
    first = status.set_condition(None, True, "PolicyAllowed", "m", 1, NOW)
    later = NOW + timedelta(minutes=5)
    same = status.set_condition(first, True, "PolicyAllowed", "m2", 2, later)
    assert same[0]["lastTransitionTime"] == "2026-11-28T16:00:00Z"
    assert same[0]["observedGeneration"] == 2
    flipped = status.set_condition(same, False, "Cancelled", "m3", 2, later)
    assert flipped[0]["lastTransitionTime"] == "2026-11-28T16:05:00Z"
    assert len(flipped) == 1


def test_every_end_reason_maps_to_a_terminal_phase():
    for reason, phase in END_PHASE.items():
        assert phase.terminal, reason
    assert not Phase.ACTIVE.terminal and not Phase.PENDING.terminal
    assert END_PHASE[Reason.POD_DELETED] == Phase.REVOKED
    assert END_PHASE[Reason.POD_FAILED] == Phase.COMPLETED


def test_deadlines_fire_in_order_and_can_be_cancelled():
    fired: list[str] = []
    done = threading.Event()

    def fire(key):
        fired.append(key)
        if key == "last":
            done.set()

    d = Deadlines(fire)
    now = datetime.now(UTC)
    d.schedule("last", now + timedelta(milliseconds=300))
    d.schedule("first", now + timedelta(milliseconds=50))
    d.schedule("cancelled", now + timedelta(milliseconds=100))
    d.schedule("moved", now + timedelta(milliseconds=10))
    d.schedule("moved", now + timedelta(milliseconds=200))
    d.cancel("cancelled")
    assert done.wait(3)
    d.stop()
    assert fired == ["first", "moved", "last"]


def test_audit_record_is_one_json_line_with_hostile_intent(tmp_path):
    import io

    hostile = 'a"b\nc\x00\x1b[31m' + "x" * 65536
    task = {
        "metadata": {"name": "t", "namespace": "a", "uid": "u"},
        "spec": {"agent": "bot", "intent": hostile},
    }
    out = io.StringIO()
    log = audit.AuditLog(stream=out, path=str(tmp_path / "audit.jsonl"))
    log.write(audit.record("denied", task, reason="Forbidden", phase="Denied", message="m"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["intent"] == hostile
    assert (tmp_path / "audit.jsonl").read_text() == out.getvalue()


def test_generated_crds_are_current(tmp_path):
    before = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    subprocess.run([sys.executable, str(ROOT / "hack" / "gen_crds.py")], check=True)
    after = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert before == after, "crds/ is stale: run `make crds` and commit"


def test_cli_help_lists_the_contract_options():
    out = subprocess.run(
        [sys.executable, "-m", "agent_access.cli", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--metrics-port", "--audit-file", "--namespace"):
        assert option in out


def test_timer_thread_survives_failing_callback():
    calls = []

    def fire(key):
        calls.append(key)
        raise RuntimeError("boom")

    d = Deadlines(fire)
    now = datetime.now(UTC)
    d.schedule("a", now)
    d.schedule("b", now + timedelta(milliseconds=50))
    time.sleep(0.3)
    d.stop()
    assert calls == ["a", "b"]


def test_all_done_is_set_once_every_future_finished():
    from concurrent.futures import Future

    from agent_access.reevaluation import all_done

    assert all_done([]).is_set()
    futures: list[Future[None]] = [Future() for _ in range(3)]
    futures[0].set_result(None)  # finished before: counted at once
    done = all_done(futures)
    assert not done.is_set()
    futures[1].set_exception(RuntimeError("a failed drop still counts"))
    assert not done.is_set()
    futures[2].set_result(None)
    assert done.is_set()
