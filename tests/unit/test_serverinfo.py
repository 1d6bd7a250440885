"""The start-up check of the API server (serverinfo.py): supported range, features,
and when running would be unsafe."""

from __future__ import annotations

from agent_access.serverinfo import OLDEST_MINOR, assess, minor_of, served_resources

GV = "admissionregistration.k8s.io/v1"
BOTH = {GV: ["validatingadmissionpolicies", "mutatingadmissionpolicies", "webhooks"]}


def test_a_supported_server_with_both_policy_kinds_is_safe():
    report = assess({"gitVersion": "v1.37.2", "minor": "37"}, BOTH)
    assert report.unsafe == () and all(report.features.values())
    assert report.lines()[0] == "API server v1.37.2"


def test_an_older_server_or_a_missing_policy_kind_is_unsafe():
    old = assess({"gitVersion": "v1.33.4", "minor": "33"}, {GV: ["validatingadmissionpolicies"]})
    assert len(old.unsafe) == 2  # too old, and no MutatingAdmissionPolicy
    assert "older than the oldest supported" in old.unsafe[0]
    assert "mutatingadmissionpolicies is not served" in old.unsafe[1]
    assert old.features == {"validating-admission-policies": True,
                            "mutating-admission-policies": False}  # fmt: skip
    gated = assess({"gitVersion": f"v1.{OLDEST_MINOR}.0", "minor": str(OLDEST_MINOR)},
                   {GV: ["validatingadmissionpolicies"]})  # fmt: skip
    assert len(gated.unsafe) == 1  # the version is fine, the feature is switched off


def test_newer_servers_are_noted_not_refused():
    report = assess({"gitVersion": "v1.40.0", "minor": "40"}, BOTH)
    assert report.unsafe == () and "newer than the newest tested" in report.notes[0]


def test_version_and_discovery_are_read_leniently():
    assert minor_of({"minor": "36+"}) == 36
    assert minor_of({"gitVersion": "v1.35.2-eks-1"}) == 35
    assert minor_of({}) is None
    assert served_resources({"resources": [{"name": "a"}, "junk", {"name": "b"}]}) == ["a", "b"]
    assert served_resources({}) == []
