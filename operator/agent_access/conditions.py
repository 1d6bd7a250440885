"""CEL conditions on policies: compiled once per policy version, evaluated per target
namespace at grant time and whenever what they read changes (and every 30 s).

The implementation is cel-expr-python (Google's C++ CEL, cel-cpp): it follows the
CEL spec (docs/design.md has the comparison with cel-python), type-checks at
compile time, and bounds every evaluation to 10,000 loop iterations. The
extensions enabled are the ones Kubernetes admission policies offer that cannot
blow up memory: strings, optional types, sets, regex (RE2), math. Not enabled:
`lists` (`lists.range`) and `bindings` (`cel.bind`), with which an expression can
build huge values under the loop limit.

Variables (API.md): `task`, `agent`, `namespace` (the target Namespace; CEL
reserves the word, so it is also available as `namespaceObject`, the Kubernetes
name), `pod` (or null), `requester`, `now` (a timestamp). Each is the object as the
operator knows it (see `activation`): metadata with name, namespace, uid, labels
(and annotations for the agent); a task's spec as written; a pod's phase.

Fail closed: an expression that does not compile (or does not return bool) makes
its policy match nothing (Ready=False, InvalidCondition); an evaluation that errs
(a missing label, say) counts as false, with the error in the message.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cel_expr_python import cel

#: Longest expression accepted (the CRD refuses longer ones at apply time too).
MAX_EXPRESSION = 4096
MAX_CONDITIONS = 16
#: Functions that can multiply a string's size in one call (nested, exponentially, with
#: no loop at all): `'a'.replace('a', 'aaaa')`, `s.split('').join(s)`, `s.quote()`.
#: Refused at compile time: with them gone, what an evaluation builds is bounded by
#: the expression's length times the loop limit.
FORBIDDEN_FUNCTIONS = frozenset({"replace", "join", "quote"})
#: `namespace` is a reserved word in CEL: the contract's variable is renamed to an
#: identifier of the same length, so error positions stay right.
NAMESPACE_ALIAS = "namespacE"
VARIABLES = ("task", "agent", NAMESPACE_ALIAS, "namespaceObject", "pod", "requester")

_ENV_YAML = """
name: agentaccess-policy-conditions
extensions:
  - name: strings
  - name: optional
  - name: sets
  - name: regex
  - name: math
"""
_env: Any = None
_env_lock = threading.Lock()


def _environment() -> Any:
    global _env
    with _env_lock:
        if _env is None:
            variables = {name: cel.Type.DYN for name in VARIABLES}
            variables["now"] = cel.Type.TIMESTAMP
            _env = cel.NewEnv(config=cel.NewEnvConfigFromYaml(_ENV_YAML), variables=variables)
        return _env


class ConditionError(ValueError):
    """A condition that cannot be used (InvalidCondition)."""


@dataclass(frozen=True, slots=True)
class Condition:
    expression: str
    message: str
    program: Any = field(compare=False, hash=False, repr=False)


def rewrite(expression: str) -> str:
    """The expression with every bare identifier `namespace` (not a field selection such
    as `task.metadata.namespace`, not inside a string) renamed to NAMESPACE_ALIAS."""
    out: list[str] = []
    i, n = 0, len(expression)
    previous = ""  # the last non-space character outside strings
    while i < n:
        c = expression[i]
        if c in "'\"":
            j = _string_end(expression, i)
            out.append(expression[i:j])
            previous = c
            i = j
            continue
        if c.isalpha() or c == "_":
            j = i
            while j < n and (expression[j].isalnum() or expression[j] == "_"):
                j += 1
            word = expression[i:j]
            if j < n and expression[j] in "'\"" and word.lower() in ("r", "b", "rb", "br"):
                k = _string_end(expression, j)  # a raw or bytes literal: copied as is
                out.append(expression[i:k])
                previous = expression[j]
                i = k
                continue
            out.append(NAMESPACE_ALIAS if word == "namespace" and previous != "." else word)
            previous = word[-1]
            i = j
            continue
        if not c.isspace():
            previous = c
        out.append(c)
        i += 1
    return "".join(out)


def called_functions(expression: str) -> list[str]:
    """Names of the functions an expression calls (identifiers followed by "("),
    strings skipped: a lexical view, enough to refuse a function wherever it is."""
    names: list[str] = []
    i, n = 0, len(expression)
    while i < n:
        c = expression[i]
        if c in "'\"":
            i = _string_end(expression, i)
            continue
        if c.isalpha() or c == "_":
            j = i
            while j < n and (expression[j].isalnum() or expression[j] == "_"):
                j += 1
            if (
                j < n
                and expression[j] in "'\""
                and expression[i:j].lower() in ("r", "b", "rb", "br")
            ):
                i = _string_end(expression, j)
                continue
            k = j
            while k < n and expression[k].isspace():
                k += 1
            if k < n and expression[k] == "(":
                names.append(expression[i:j])
            i = j
            continue
        i += 1
    return names


def _string_end(text: str, start: int) -> int:
    """The index just past the string literal starting at `start` (a quote)."""
    quote = text[start]
    triple = text[start : start + 3] == quote * 3
    delimiter = quote * 3 if triple else quote
    i = start + len(delimiter)
    raw = start > 0 and text[start - 1] in "rR"
    while i < len(text):
        if text[i] == "\\" and not raw:
            i += 2
            continue
        if text.startswith(delimiter, i):
            return i + len(delimiter)
        i += 1
    return len(text)


@functools.lru_cache(maxsize=4096)
def compile_condition(expression: Any, message: str = "") -> Condition:
    """Compiled once per distinct (expression, message): policies are parsed on every
    watch event of theirs."""
    if not isinstance(expression, str) or not expression.strip():
        raise ConditionError("an empty expression")
    if len(expression) > MAX_EXPRESSION:
        raise ConditionError(f"longer than {MAX_EXPRESSION} characters")
    rewritten = rewrite(expression)
    called = FORBIDDEN_FUNCTIONS & set(called_functions(rewritten))
    if called:
        raise ConditionError(
            f"{', '.join(sorted(called))} may not be used: it can make an evaluation build "
            "huge strings (see docs/policy-guide.md)"
        )
    try:
        program = _environment().compile(rewritten)
    except RuntimeError as exc:
        raise ConditionError(_clean(str(exc))) from None
    kind = program.return_type()
    if kind not in (cel.Type.BOOL, cel.Type.DYN):
        raise ConditionError(f"returns {kind.name()}, not bool")
    return Condition(expression, message if isinstance(message, str) else "", program)


def compile_conditions(raw: Any) -> tuple[Condition, ...]:
    """spec.conditions; ConditionError naming the first that cannot be used."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_CONDITIONS:
        raise ConditionError(f"spec.conditions must be a list of at most {MAX_CONDITIONS}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ConditionError(f"spec.conditions[{i}] must be an object")
        try:
            message = item.get("message") or ""
            out.append(compile_condition(item.get("expression"), str(message)))
        except ConditionError as exc:
            raise ConditionError(f"spec.conditions[{i}]: {exc}") from None
    return tuple(out)


def _clean(text: str) -> str:
    text = text.replace(NAMESPACE_ALIAS, "namespace")
    for prefix in ("INVALID_ARGUMENT: ", "ERROR: "):
        text = text.replace(prefix, "")
    return " ".join(text.split())[:512]


@dataclass(frozen=True, slots=True)
class Failure:
    """Why conditions do not hold: `message` for the requester (the author's message,
    or a text that reveals nothing of the policy); `detail` (the expression, the
    evaluation error) for the audit line only."""

    message: str
    detail: str


NOT_HOLDING = "a condition of a policy that would cover this request does not hold"


def holds(conditions: Sequence[Condition], variables: Mapping[str, Any]) -> Failure | None:
    """None if every condition holds; else why not. An evaluation that errs (a missing
    label, the loop limit, memory) counts as false."""
    for condition in conditions:
        try:
            value = condition.program.eval(data=dict(variables))
        except Exception as exc:  # the loop limit, memory: never a crash, always false
            return Failure(
                condition.message or NOT_HOLDING,
                f"condition {condition.expression!r} could not be evaluated: {_clean(str(exc))}",
            )
        if value.type() == cel.Type.ERROR:
            why = _clean(str(value.value()))
            return Failure(
                condition.message or NOT_HOLDING,
                f"condition {condition.expression!r} could not be evaluated: {why}",
            )
        if value.type() != cel.Type.BOOL or value.value() is not True:
            return Failure(
                condition.message or NOT_HOLDING,
                f"condition {condition.expression!r} does not hold",
            )
    return None


def task_object(spec: Any) -> dict[str, Any]:
    """The AgentTask as conditions see it (the same at grant time and on re-checks):
    its name, namespace, uid and labels, and its spec as the operator read it."""
    access = []
    for e in spec.access:
        item: dict[str, Any] = {"namespace": e.namespace}
        if e.preset:
            item["preset"] = e.preset
        item["rules"] = [r.to_dict() for r in e.rules]
        access.append(item)
    task_spec: dict[str, Any] = {
        "agent": spec.agent,
        "intent": spec.intent,
        "ttl": f"{int(spec.ttl.total_seconds())}s",
        "audiences": list(spec.audiences),
        "access": access,
        "dryRun": spec.dry_run,
    }
    if spec.pod_name:
        task_spec["podName"] = spec.pod_name
    return {
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "uid": spec.uid,
            "labels": dict(spec.labels),
        },
        "spec": task_spec,
    }


def namespace_object(name: str, labels: Mapping[str, str] | None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": dict(labels or {})}}


def activation(
    task: Mapping[str, Any],
    agent: Mapping[str, Any] | None,
    pod: Mapping[str, Any] | None,
    requester: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """The variables but `namespace` (set per target namespace, see `for_namespace`)."""
    return {
        "task": task,
        "agent": agent,
        "pod": pod,
        "requester": requester,
        "now": now,
    }


def for_namespace(base: Mapping[str, Any], namespace: Mapping[str, Any]) -> dict[str, Any]:
    return {**base, NAMESPACE_ALIAS: namespace, "namespaceObject": namespace}
