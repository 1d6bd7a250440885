#!/usr/bin/env python3
"""JSON schemas for kubeconform, generated from a live API server's /openapi/v3.

    hack/openapi_schemas.py KUBECONFIG OUT_DIR

Writes one standalone schema per kind the server serves (built-in kinds and every
CRD installed at the time), named `<group>_<kind>_<version>.json` (kind lower-case;
for the core group, kubeconform's `.Group` is the version, e.g. `v1_pod_v1.json`),
for kubeconform's
`-schema-location 'OUT_DIR/{{ .Group }}_{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json'`.
Strict, as openapi2jsonschema --strict makes them: an object that lists its
properties accepts no others (unless it says it preserves unknown fields).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator")]

from agent_access.kube import Kube  # noqa: E402


def standalone(
    schema: dict[str, Any],
    components: dict[str, Any],
    stack: tuple[str, ...] = (),
    memo: dict[str, Any] | None = None,
) -> Any:
    """The schema with every $ref inlined; a type that contains itself (the CRD's own
    JSONSchemaProps) accepts anything where it recurs."""
    memo = {} if memo is None else memo
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in stack:
            return {}
        if name not in memo:
            memo[name] = standalone(components.get(name, {}), components, (*stack, name), memo)
        return memo[name]
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "allOf" and len(value) == 1:  # {allOf: [{$ref}], default: ...}
            out.update(standalone(value[0], components, stack, memo))
        elif key == "properties":
            out["properties"] = {
                k: standalone(v, components, stack, memo) for k, v in value.items()
            }
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = standalone(value, components, stack, memo)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [standalone(v, components, stack, memo) for v in value]
        elif key == "default":
            continue  # defaults are the server's business, not a constraint
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "string"}, {"type": "integer"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def main(kubeconfig: str, out_dir: str) -> int:
    import kubernetes

    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    kube = Kube(kubernetes.client.ApiClient(config))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Every group-version discovery serves must be in /openapi/v3 (a CRD that was just
    # established may take a moment to appear there).
    wanted = {"api/v1"} | {
        f"apis/{v['groupVersion']}"
        for g in kube.request("GET", "/apis")["groups"]
        for v in g["versions"]
    }
    deadline = time.monotonic() + 60
    while True:
        paths = kube.request("GET", "/openapi/v3")["paths"]
        missing = wanted - paths.keys()
        if not missing:
            break
        if time.monotonic() > deadline:
            print(f"openapi_schemas: not in /openapi/v3: {sorted(missing)}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    written = 0
    for path, ref in paths.items():
        if not (path.startswith("api/") or path.startswith("apis/")):
            continue
        url = ref["serverRelativeURL"]
        doc = kube.request("GET", url.split("?", 1)[0], query=[("hash", url.split("hash=")[-1])])
        components = (doc.get("components") or {}).get("schemas") or {}
        memo: dict[str, Any] = {}
        for schema in components.values():
            for gvk in schema.get("x-kubernetes-group-version-kind") or []:
                group = gvk["group"] or gvk["version"]
                name = f"{group}_{gvk['kind'].lower()}_{gvk['version']}.json"
                full = dict(standalone(schema, components, (), memo))
                full["$schema"] = "http://json-schema.org/draft-07/schema#"
                (out / name).write_text(json.dumps(full))
                written += 1
    print(f"openapi_schemas: {written} schemas in {out}", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
