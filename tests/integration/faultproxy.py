"""A proxy in front of kube-apiserver that answers a share of requests with 429 or 5xx,
and can hold chosen requests for a while (to land a change in the middle of a step).

The operator talks plain HTTP to 127.0.0.1:<port>; the proxy forwards to the real
API server with the admin client certificate, streams watches untouched, and for
other requests injects `429 Too Many Requests` (with Retry-After) or a 500/503
with the given probability. Counts what it injected.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
from collections import Counter
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from .cluster import free_port

HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "content-encoding",
}


class FaultProxy:
    def __init__(self, kubeconfig: str, workdir: Path, rate: float = 0.3, seed: int = 7):
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        self.upstream = cfg["clusters"][0]["cluster"]["server"]
        import base64

        user = cfg["users"][0]["user"]
        for name, key in (("ca.crt", "certificate-authority-data"),):
            (workdir / name).write_bytes(base64.b64decode(cfg["clusters"][0]["cluster"][key]))
        (workdir / "client.crt").write_bytes(base64.b64decode(user["client-certificate-data"]))
        (workdir / "client.key").write_bytes(base64.b64decode(user["client-key-data"]))
        self.ssl = ssl.create_default_context(cafile=str(workdir / "ca.crt"))
        self.ssl.load_cert_chain(str(workdir / "client.crt"), str(workdir / "client.key"))
        self.rate = rate
        self.random = random.Random(seed)
        #: (method, path fragment) -> seconds to hold such requests before forwarding
        self.delays: dict[tuple[str, str], float] = {}
        self.injected: Counter[str] = Counter()
        #: Path fragments whose watches are refused (503) while listed here.
        self.refuse_watches: set[str] = set()
        #: Bumped by cut_watches(): open watches matching _cut_fragment end.
        self._cut_epoch = 0
        self._cut_fragment = ""
        self.port = free_port()
        self.kubeconfig = str(workdir / "proxy.kubeconfig")
        Path(self.kubeconfig).write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "proxy",
                    "clusters": [
                        {"name": "p", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}
                    ],
                    "users": [{"name": "u", "user": {}}],
                    "contexts": [{"name": "proxy", "context": {"cluster": "p", "user": "u"}}],
                }
            )
        )
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())

        async def session() -> aiohttp.ClientSession:  # must be made inside the loop
            return aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl, limit=64),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
            )

        self._session = self._loop.run_until_complete(session())
        self._ready.set()
        self._loop.run_forever()

    def cut_watches(self, fragment: str) -> None:
        """End every open watch whose path holds `fragment` (as a dropped connection)."""
        self._cut_fragment = fragment
        self._cut_epoch += 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        watching = request.query.get("watch") in ("true", "1")
        epoch = self._cut_epoch
        if watching and any(f in request.path for f in self.refuse_watches):
            self.injected["WATCH 503"] += 1
            return web.json_response({"kind": "Status", "code": 503}, status=503)
        if not watching and request.path.startswith("/api") and self.random.random() < self.rate:
            code = self.random.choice([429, 429, 500, 503])
            self.injected[f"{request.method} {code}"] += 1
            body = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": "injected by the fault proxy",
                "code": code,
            }
            headers = {"Retry-After": "0"} if code == 429 else {}
            return web.json_response(body, status=code, headers=headers)
        for (method, fragment), seconds in self.delays.items():
            if request.method == method and fragment in request.path:
                await asyncio.sleep(seconds)
        data = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=data or None, headers=headers
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP},
            )
            await response.prepare(request)
            while True:
                try:
                    chunk = await asyncio.wait_for(upstream.content.readany(), 0.1)
                except TimeoutError:
                    chunk = None
                if watching and epoch != self._cut_epoch and self._cut_fragment in request.path:
                    request.transport.close()  # type: ignore[union-attr]
                    return response
                if chunk is None:
                    continue
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
            return response

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())
