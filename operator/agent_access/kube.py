"""The Kubernetes adapter: the only module that imports `kubernetes`.

Every call goes through `Kube.request`, which speaks plain dicts (no generated
models), retries what is transient (429, 5xx, connection errors) with backoff,
treats 404 on delete as done, and turns failures into `KubeError`s whose
messages carry the API's status and reason but never a request body (so a
token can never leak through an exception).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import kubernetes
import urllib3

from .model import API_VERSION, APPROVALS, CLUSTER_POLICIES, GROUP, POLICIES, TASKS, VERSION

log = logging.getLogger(__name__)

RETRYABLE = frozenset({429, 500, 502, 503, 504})


class KubeError(Exception):
    def __init__(self, status: int, reason: str, verb: str = "", path: str = ""):
        self.status = status
        self.reason = reason
        self.verb = verb
        self.path = path
        super().__init__(f"{verb} {path}: {status} {reason}".strip())

    @property
    def transient(self) -> bool:
        return self.status in RETRYABLE or self.status == 0


class ConfigError(Exception):
    """Neither a kubeconfig nor an in-cluster service account could be loaded."""


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Gone(KubeError):
    pass


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API."""

    prefix: str  # "/api/v1" or "/apis/group/version"
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        path = self.prefix
        if self.namespaced and namespace:
            path += f"/namespaces/{quote(namespace)}"
        path += f"/{self.plural}"
        if name:
            path += f"/{quote(name)}"
        if sub:
            path += f"/{sub}"
        return path


SERVICE_ACCOUNTS = Resource("/api/v1", "serviceaccounts")
SECRETS = Resource("/api/v1", "secrets")
PODS = Resource("/api/v1", "pods")
EVENTS = Resource("/api/v1", "events")
NAMESPACES = Resource("/api/v1", "namespaces", namespaced=False)
ROLES = Resource("/apis/rbac.authorization.k8s.io/v1", "roles")
ROLE_BINDINGS = Resource("/apis/rbac.authorization.k8s.io/v1", "rolebindings")
AGENT_TASKS = Resource(f"/apis/{GROUP}/{VERSION}", TASKS)
AGENT_TASK_APPROVALS = Resource(f"/apis/{GROUP}/{VERSION}", APPROVALS)
ACCESS_POLICIES = Resource(f"/apis/{GROUP}/{VERSION}", POLICIES)
CLUSTER_ACCESS_POLICIES = Resource(f"/apis/{GROUP}/{VERSION}", CLUSTER_POLICIES, namespaced=False)

Items = list[dict[str, Any]]
_Box = list[str]  # a one-element out-parameter

#: Called after every API call with (verb, resource plural, status code, seconds).
RequestObserver = Callable[[str, str, int, float], None]


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for key, value in headers.items():
        if key.lower() == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _reason(body: bytes | str | None, fallback: str) -> str:
    try:
        data = json.loads(body or b"")
        return str(data.get("message") or data.get("reason") or fallback)
    except (ValueError, AttributeError):
        return fallback


class Kube:
    """Thin, synchronous, thread-safe access to the API server."""

    def __init__(
        self,
        api_client: Any,
        retries: int = 5,
        observer: RequestObserver | None = None,
    ):
        self.api = api_client
        self.retries = retries
        self.observer = observer

    @classmethod
    def from_environment(cls, pool_size: int = 32, **kwargs: Any) -> Kube:
        """Load the kubeconfig (KUBECONFIG) or the in-cluster service account."""
        config = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            try:
                kubernetes.config.load_kube_config(client_configuration=config)
            except (kubernetes.config.ConfigException, OSError) as exc:
                raise ConfigError(
                    f"no cluster to talk to: set KUBECONFIG or run in a pod ({exc})"
                ) from None
        config.connection_pool_maxsize = pool_size
        return cls(kubernetes.client.ApiClient(config), **kwargs)

    @classmethod
    def from_kubeconfig(
        cls, path: str | None = None, context: str | None = None, **kwargs: Any
    ) -> tuple[Kube, str | None]:
        """For command-line tools, as kubectl: the kubeconfig (path, else KUBECONFIG, else
        ~/.kube/config) and its context's namespace; in a pod without one, the pod's
        service account."""
        import os

        config = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_kube_config(
                config_file=path, context=context, client_configuration=config
            )
            _, active = kubernetes.config.list_kube_config_contexts(config_file=path)
            if context:
                contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=path)
                active = next((c for c in contexts if c["name"] == context), active)
            namespace = (active.get("context") or {}).get("namespace")
        except (kubernetes.config.ConfigException, OSError) as exc:
            if path or context or os.environ.get("KUBECONFIG"):  # asked for, and broken
                raise ConfigError(f"cannot use the kubeconfig: {exc}") from None
            try:
                kubernetes.config.load_incluster_config(client_configuration=config)
            except kubernetes.config.ConfigException:
                raise ConfigError(f"no cluster to talk to: set KUBECONFIG ({exc})") from None
            namespace = None  # in a pod, as kubectl: the pod's own namespace
            sa_ns = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
            if os.environ.get("POD_NAMESPACE"):
                namespace = os.environ["POD_NAMESPACE"]
            elif os.path.exists(sa_ns):
                with open(sa_ns, encoding="utf-8") as f:
                    namespace = f.read().strip() or None
        return cls(kubernetes.client.ApiClient(config), **kwargs), namespace

    # -- the one place requests are made ---------------------------------------

    def request(
        self,
        verb: str,
        path: str,
        body: Any = None,
        query: Iterable[tuple[str, str]] = (),
        content_type: str = "application/json",
        timeout: float = 30,
        resource: str = "other",
    ) -> dict[str, Any]:
        """One API call. `resource` labels the metrics (a plural, never an object name)."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            status, text, response_headers = 0, "", {}
            try:
                method, url, hdrs, data, post = self.api.param_serialize(
                    method=verb,
                    resource_path=path,
                    query_params=list(query),
                    header_params=headers,
                    body=body,
                    auth_settings=["BearerToken"],
                )
                response = self.api.call_api(
                    method, url, hdrs, data, post, _request_timeout=timeout
                )
                status = response.status
                response_headers = dict(getattr(response, "headers", None) or {})
                raw = response.read() if hasattr(response, "read") else response.data
                text = raw.decode() if isinstance(raw, bytes) else (raw or "")
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                status, text = 0, f"connection error: {type(exc).__name__}"
            if self.observer:
                self.observer(verb, resource, status, time.monotonic() - started)
            if 200 <= status < 300:
                return json.loads(text) if text else {}
            reason = _reason(text, text if status == 0 else f"HTTP {status}")
            if (status in RETRYABLE or status == 0) and attempt <= self.retries:
                # short, jittered: a revocation waiting on an outage resumes soon after
                delay = min(0.5, 0.05 * 2 ** (attempt - 1)) * (0.5 + random.random())
                retry_after = _retry_after(response_headers)
                if status == 429 and retry_after is not None:
                    delay = min(retry_after, 5.0)
                log.debug("retrying %s %s after %s (attempt %d)", verb, path, status, attempt)
                time.sleep(delay)
                continue
            error = {404: NotFound, 409: Conflict, 410: Gone}.get(status, KubeError)
            raise error(status, reason, verb, path)

    def get(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", res.path(namespace, name), resource=res.plural)
        except NotFound:
            return None

    def list(
        self, res: Resource, namespace: str | None = None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        return (
            self.request("GET", res.path(namespace), query=query, resource=res.plural).get("items")
            or []
        )

    def list_all(
        self,
        res: Resource,
        namespace: str | None = None,
        page: int = 500,
        label_selector: str = "",
    ) -> tuple[Items, str]:
        """Every object of a kind, in pages; returns (items, the list's resourceVersion)."""
        items: Items = []
        version = [""]
        for chunk in self.pages(res, namespace, page, label_selector, version):
            items.extend(chunk)
        return items, version[0]

    def pages(
        self,
        res: Resource,
        namespace: str | None = None,
        page: int = 500,
        label_selector: str = "",
        version: _Box | None = None,
    ) -> Iterator[Items]:
        """A kind's objects one page at a time, so a caller that keeps only a little of
        each never holds them all. The list's resourceVersion goes into `version[0]`."""
        token = ""
        while True:
            query = [("limit", str(page))] + ([("continue", token)] if token else [])
            if label_selector:
                query.append(("labelSelector", label_selector))
            result = self.request("GET", res.path(namespace), query=query, resource=res.plural)
            yield result.get("items") or []
            meta = result.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                if version is not None:
                    version[0] = str(meta.get("resourceVersion") or "")
                return

    def watch(
        self,
        res: Resource,
        resource_version: str,
        timeout: int = 300,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Stream (type, object) watch events from `resource_version`, bookmarks included.

        First yields ("OPEN", {}) once the server accepted the watch. Ends when the
        server closes it (after about `timeout` seconds). Raises
        Gone when that version is too old (relist), KubeError on other failures.
        """
        query = [
            ("watch", "1"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout)),
        ] + ([("labelSelector", label_selector)] if label_selector else [])
        if field_selector:
            query.append(("fieldSelector", field_selector))
        started = time.monotonic()
        try:
            method, url, hdrs, data, post = self.api.param_serialize(
                method="GET",
                resource_path=res.path(namespace),
                query_params=query,
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
            )
            response = self.api.call_api(
                method, url, hdrs, data, post, _request_timeout=(10, timeout + 30)
            ).response
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            why = f"connection error: {type(exc).__name__}"
            raise KubeError(0, why, "WATCH", res.path()) from None
        if self.observer:
            self.observer("WATCH", res.plural, response.status, time.monotonic() - started)
        try:
            if response.status != 200:
                reason = _reason(response.read(), f"HTTP {response.status}")
                error = {410: Gone}.get(response.status, KubeError)
                raise error(response.status, reason, "WATCH", res.path())
            yield "OPEN", {}
            pending = b""
            for chunk in response.stream(1 << 16):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        code = int(obj.get("code") or 0)
                        error = {410: Gone}.get(code, KubeError)
                        raise error(code, str(obj.get("message") or ""), "WATCH", res.path())
                    yield str(kind), obj
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            why = f"watch broken: {type(exc).__name__}"
            raise KubeError(0, why, "WATCH", res.path()) from None
        finally:  # also when the consumer stops early: never reuse a half-read stream
            response.close()
            response.release_conn()

    def create(self, res: Resource, namespace: str | None, body: Mapping[str, Any]) -> dict:
        return self.request("POST", res.path(namespace), body=body, resource=res.plural)

    def delete(self, res: Resource, namespace: str | None, name: str, uid: str = "") -> bool:
        """Delete; True if something was deleted, False if it was already gone.

        With `uid`, only that very object is deleted (a precondition the API server
        checks): another object holding the name raises Conflict and stays.
        """
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", res.path(namespace, name), body=body, resource=res.plural)
            return True
        except NotFound:
            return False

    def merge_patch(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        sub: str = "",
    ) -> dict[str, Any]:
        return self.request(
            "PATCH",
            res.path(namespace, name, sub),
            body=patch,
            content_type="application/merge-patch+json",
            resource=f"{res.plural}/{sub}" if sub else res.plural,
        )

    def json_patch(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        patch: Sequence[Mapping[str, Any]],
        sub: str = "",
    ) -> dict[str, Any]:
        """RFC 6902 patch: its "test" operations make it conditional (422 if one fails)."""
        return self.request(
            "PATCH",
            res.path(namespace, name, sub),
            body=list(patch),
            content_type="application/json-patch+json",
            resource=f"{res.plural}/{sub}" if sub else res.plural,
        )

    # -- domain helpers ----------------------------------------------------------

    def request_token(
        self,
        namespace: str,
        service_account: str,
        seconds: int,
        audiences: Iterable[str],
        bound: Mapping[str, str] | None,
    ) -> tuple[str, str]:
        """TokenRequest; returns (token, expirationTimestamp). The token is never logged."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audiences:
            spec["audiences"] = list(audiences)
        if bound:
            spec["boundObjectRef"] = dict(bound)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        result = self.request(
            "POST",
            SERVICE_ACCOUNTS.path(namespace, service_account, "token"),
            body=body,
            resource="serviceaccounts/token",
        )
        status = result.get("status") or {}
        return status["token"], status.get("expirationTimestamp", "")

    def post_event(
        self,
        involved: Mapping[str, Any],
        event_type: str,
        reason: str,
        message: str,
        action: str,
        component: str = "agent-access-operator",
    ) -> None:
        meta = involved.get("metadata", {})
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{meta.get('name', 'task')}.",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", API_VERSION),
                "kind": involved.get("kind", "AgentTask"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": event_type,
            "action": action,
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.create(EVENTS, meta["namespace"], body)
