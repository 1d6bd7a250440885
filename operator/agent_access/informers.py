"""Watch-fed facts: the cluster state a decision needs, kept in memory.

One `Informer` per kind lists it once, then watches from the list's
resourceVersion: each event updates a compact value per object (a parsed policy,
a namespace's labels, a ServiceAccount's UID, a pod's facts; never the whole
object) and is reported to a callback. A watch that ends is resumed from the last
version seen (bookmarks keep it recent); one that is too old (410 Gone) or broken
relists, and the relist reports every difference as an event, so a deletion
missed while disconnected still ends the grants it must.

`healthy` is False from a watch failure until the relist that follows it: callers
then read the API server directly instead (see facts.py for the freshness rules).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from .kube import Gone, Kube, KubeError, Resource

log = logging.getLogger(__name__)

V = TypeVar("V")
Key = tuple[str, str]  # (namespace or "", name)
#: (event type, key, old value or None, new value or None); after the initial list only.
OnChange = Callable[[str, Key, Any, Any], None]

#: (event type, the object as received); a relist's deletion gets `stub(key, old value)`.
OnObject = Callable[[str, Mapping[str, Any]], None]

#: Not a value: the object is present but ignored (e.g. a malformed policy).
SKIP: Any = object()


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class Informer(Generic[V]):
    def __init__(
        self,
        kube: Kube,
        resource: Resource,
        transform: Callable[[Mapping[str, Any]], V],
        on_change: OnChange | None = None,
        name: str = "",
        timeout: int = 300,
        by_namespace: bool = False,
        namespace: str | None = None,
        on_object: OnObject | None = None,
        stub: Callable[[Key, V], Mapping[str, Any]] | None = None,
    ):
        self.kube = kube
        self.resource = resource
        self.transform = transform
        self.on_change = on_change
        self.name = name or resource.plural
        self.timeout = timeout
        #: Only this namespace (None: all).
        self.namespace = namespace
        #: Whole objects, for a consumer that needs more than the compact value (the
        #: AgentTask watch): every event, and every object of the first list too.
        self.on_object = on_object
        self.stub = stub
        self.items: dict[Key, V] = {}
        #: namespace -> {name: value}, when asked for (policies: a decision reads a few
        #: namespaces, never all).
        self.by_namespace: dict[str, dict[str, V]] | None = {} if by_namespace else None
        self.resource_version = ""
        self.synced = threading.Event()
        self.healthy = False
        self.relists = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading --------------------------------------------------------------------

    def get(self, namespace: str | None, name: str) -> V | None:
        return self.items.get((namespace or "", name))

    def values(self) -> list[V]:
        return list(self.items.values())

    def in_namespace(self, namespace: str) -> list[V]:
        assert self.by_namespace is not None
        return list((self.by_namespace.get(namespace) or {}).values())

    def _index(self, key: Key, value: V | None) -> None:
        if self.by_namespace is None:
            return
        ns, name = key
        if value is None:
            names = self.by_namespace.get(ns)
            if names is not None:
                names.pop(name, None)
                if not names:
                    del self.by_namespace[ns]
        else:
            self.by_namespace.setdefault(ns, {})[name] = value

    # -- running --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _value(self, obj: Mapping[str, Any]) -> V | None:
        try:
            value = self.transform(obj)
        except Exception:  # one hostile object never stops the watch
            log.exception("ignoring %s %s: could not read it", self.name, key_of(obj))
            return None
        return None if value is SKIP else value

    def _report(
        self, kind: str, key: Key, old: Any, new: Any, obj: Mapping[str, Any] | None = None
    ) -> None:
        try:
            if self.on_change is not None:
                self.on_change(kind, key, old, new)
            if self.on_object is not None:
                if obj is None:
                    if self.stub is None or old is None:
                        return
                    obj = self.stub(key, old)
                self.on_object(kind, obj)
        except Exception:
            log.exception("handling a %s event of %s %s failed", kind, self.name, key)

    def relist(self) -> None:
        """List afresh; report what changed since the last known state."""
        fresh: dict[Key, V] = {}
        raw: dict[Key, Mapping[str, Any]] = {}
        version = [""]
        first = not self.synced.is_set()
        pages = self.kube.pages(self.resource, self.namespace, version=version)
        for page in pages:  # never all at once
            for obj in page:
                value = self._value(obj)
                if value is not None:
                    fresh[key_of(obj)] = value
                    if self.on_object is None:
                        continue
                    if first:  # whole objects: the first list is news too, page by page
                        self._report("ADDED", key_of(obj), None, value, obj)
                    elif self.items.get(key_of(obj)) != value:  # only what changed
                        raw[key_of(obj)] = obj
        old, self.items = self.items, fresh
        if self.by_namespace is not None:
            index: dict[str, dict[str, V]] = {}
            for (ns, name), value in fresh.items():
                index.setdefault(ns, {})[name] = value
            self.by_namespace = index
        self.resource_version = version[0]
        self.relists += 1
        if not first:  # a relist after a gap: report what it changed
            for key in old.keys() - fresh.keys():
                self._report("DELETED", key, old[key], None)
            for key, value in fresh.items():
                before = old.get(key)
                if before != value:
                    kind = "ADDED" if before is None else "MODIFIED"
                    self._report(kind, key, before, value, raw.get(key))
        self.healthy = True
        self.synced.set()

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        """One watch event."""
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if version:
                self.resource_version = str(version)
            return
        if kind == "OPEN":  # the watch is established: the cache follows the server
            self.healthy = True
            return
        key = key_of(obj)
        old = self.items.get(key)
        new = None if kind == "DELETED" else self._value(obj)
        if new is None:
            self.items.pop(key, None)
        else:
            self.items[key] = new
        self._index(key, new)
        if version:
            self.resource_version = str(version)
        self._report(kind, key, old, new, obj)

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                if not self.resource_version:
                    self.relist()
                for kind, obj in self.kube.watch(
                    self.resource, self.resource_version, self.timeout, self.namespace
                ):
                    if self._stop.is_set():
                        return
                    self.apply(kind, obj)
                delay = 0.2
            except Gone:
                log.info("watch of %s expired; relisting", self.name)
                self.healthy = False
                self.resource_version = ""
            except KubeError as exc:
                # Broken connection: resume from the last version (Gone if too old).
                # Anything else the server refused: relist.
                log.warning("watch of %s failed (%s); resuming", self.name, exc)
                self.healthy = False
                if exc.status != 0:
                    self.resource_version = ""
                self._stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("watch of %s failed; relisting", self.name)
                self.healthy = False
                self.resource_version = ""
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)


def wait_synced(informers: list[Informer[Any]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for informer in informers:
        if not informer.synced.wait(max(0.0, deadline - time.monotonic())):
            return False
    return True
