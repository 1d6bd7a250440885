"""Shared pytest hooks: print measured timings and the server version at the end."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    try:
        from tests.integration.cluster import FACTS, TIMINGS
    except Exception:
        return
    for name, value in FACTS.items():
        terminalreporter.write_line(f"tested against {name} {value}")
    if not TIMINGS:
        return
    terminalreporter.section("measured timings (seconds)")
    for name, values in sorted(TIMINGS.items()):
        values = sorted(values)
        terminalreporter.write_line(
            f"{name:<40} n={len(values):<3} min={values[0]:.3f} "
            f"median={values[len(values) // 2]:.3f} max={values[-1]:.3f}"
        )
