#!/usr/bin/env python3
"""A local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager
(garbage collector, ServiceAccount token controller, namespace controller); no kubelet
(`make node-up`, hack/node.py, joins one).

    python hack/controlplane.py up      # start (idempotent), write .controlplane/kubeconfig
    python hack/controlplane.py down    # stop and remove all state
    python hack/controlplane.py status  # exit 0 when up and ready

Binaries come from hack/build-binaries.sh (cached outside the repo by version).
AAO_CONTROLLER_MANAGER=0 leaves kube-controller-manager out.
State (certificates, etcd data, logs) lives in a temporary directory recorded in
.controlplane/state.json; only 127.0.0.1 is listened on, on free ports.
Used by the Makefile and by the pytest fixture in tests/integration/conftest.py.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("AAO_CONTROLPLANE_DIR", ROOT / ".controlplane"))
KUBECONFIG = STATE_DIR / "kubeconfig"
STATE_FILE = STATE_DIR / "state.json"
READY_TIMEOUT = float(os.environ.get("AAO_CONTROLPLANE_TIMEOUT", "90"))
#: The controllers kube-controller-manager runs here: what the operator's promises
#: rely on (owner references, legacy token Secrets, namespace deletion).
CONTROLLERS = "garbagecollector,serviceaccount-token,namespace"
PROCESSES = ("kube-controller-manager", "kube-apiserver", "etcd")  # stop order
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service's ClusterIP (first of SERVICE_CIDR)
KUBELET_CLIENT = "kube-apiserver-kubelet-client"
#: where a node (hack/node.py, in a network namespace of its own) reaches this API
#: server: the host end of its link, forwarded to the loopback port
NODE_HOST_IP = "10.213.0.1"


def log(msg: str) -> None:
    print(f"controlplane: {msg}", file=sys.stderr, flush=True)


def binary_dirs() -> list[Path]:
    out = (
        subprocess.run(
            [str(ROOT / "hack" / "build-binaries.sh"), "--print"],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    return [Path(p) for p in out.split(":")]


def find_binary(name: str) -> str:
    for d in binary_dirs():
        if (d / name).exists():
            return str(d / name)
    raise SystemExit(f"controlplane: {name} not found; run hack/build-binaries.sh")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- certificates -----------------------------------------------------------


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert(
    subject: x509.Name, key, issuer: x509.Name, issuer_key, *, ca=False, sans=(), client=False
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = (
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
            if client
            else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> dict[str, Path]:
    pem = serialization.Encoding.PEM
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-access-local-ca")])
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    srv_key = _key()
    srv = _cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        srv_key,
        ca_name,
        ca_key,
        sans=[
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            # the `kubernetes` Service, as Pods on a node (hack/node.py) reach it
            x509.IPAddress(ipaddress.ip_address(SERVICE_IP)),
            x509.IPAddress(ipaddress.ip_address(NODE_HOST_IP)),
            x509.DNSName("kubernetes"),
            x509.DNSName("kubernetes.default"),
            x509.DNSName("kubernetes.default.svc"),
            x509.DNSName("kubernetes.default.svc.cluster.local"),
        ],
    )

    def client(common_name: str, *organizations: str):  # type: ignore[no-untyped-def]
        key = _key()
        names = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        subject = x509.Name([*names, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        return key, _cert(subject, key, ca_name, ca_key, client=True)

    adm_key, adm = client("admin", "system:masters")
    kcm_key, kcm = client("system:kube-controller-manager")
    # the API server's identity towards kubelets (logs, exec); bound to
    # system:kubelet-api-admin when a node joins
    kubelet_client_key, kubelet_client = client(KUBELET_CLIENT)
    files = {
        "ca.crt": ca.public_bytes(pem),
        # kept so that a node (hack/node.py) gets certificates from the same CA
        "ca.key": _pem_key(ca_key),
        "kubelet-client.crt": kubelet_client.public_bytes(pem),
        "kubelet-client.key": _pem_key(kubelet_client_key),
        "kube-controller-manager.crt": kcm.public_bytes(pem),
        "kube-controller-manager.key": _pem_key(kcm_key),
        "apiserver.crt": srv.public_bytes(pem),
        "apiserver.key": _pem_key(srv_key),
        "admin.crt": adm.public_bytes(pem),
        "admin.key": _pem_key(adm_key),
        "sa.key": _pem_key(_key()),
    }
    paths = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        (d / name).chmod(0o600)
        paths[name] = d / name
    return paths


# --- the enforcement point (AUTHZ_WEBHOOK=1, AUDIT_LOG=1, AUDIT_WEBHOOK=1) -----

#: Only per-task identities are sent to the webhook: everyone else never waits on it.
MATCH_PER_TASK = "request.user.matches('^system:serviceaccount:[^:]+:aat-[^:]+$')"


def _issue(pki: Path, common_name: str, *, client: bool, sans=()) -> tuple[bytes, bytes]:
    """A certificate from the local CA: (cert PEM, key PEM)."""
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    # P-256: a TLS handshake with it costs the webhook a fraction of an RSA one
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = _cert(name, key, ca.subject, ca_key, client=client, sans=sans)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem


def _webhook_kubeconfig(url: str, pki: Path, client_cert: Path, client_key: Path) -> dict:
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "webhook",
        "clusters": [
            {"name": "agent-access", "cluster": {
                "server": url, "certificate-authority-data": b64(pki / "ca.crt")}}
        ],
        "users": [
            {"name": "kube-apiserver", "user": {
                "client-certificate-data": b64(client_cert),
                "client-key-data": b64(client_key)}}
        ],
        "contexts": [
            {"name": "webhook", "context": {"cluster": "agent-access", "user": "kube-apiserver"}}
        ],
    }  # fmt: skip


def enforcement_flags(pki: Path, options: dict) -> list[str]:
    """Write STATE_DIR/authz/ (port, tls.crt, tls.key, client-ca.crt: what the operator
    serves with) and the API server's configuration files; its extra flags."""
    flags: list[str] = []
    if options.get("runtime_config"):  # tests: a server that lacks an API
        flags.append(f"--runtime-config={options['runtime_config']}")
    if options.get("disable_plugins"):  # ... and the admission plugin serving it
        flags.append(f"--disable-admission-plugins={options['disable_plugins']}")
    extra = ("runtime_config", "disable_plugins")
    if not any(v for k, v in options.items() if k not in extra):
        return flags
    authz = STATE_DIR / "authz"
    authz.mkdir(parents=True, exist_ok=True)
    if options.get("authz") or options.get("audit_webhook"):
        port = free_port()
        cert, key = _issue(
            pki, "agent-access-webhook", client=False,
            sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        )  # fmt: skip
        ccert, ckey = _issue(pki, "kube-apiserver-webhook-client", client=True)
        files = {
            "port": str(port).encode(),
            "tls.crt": cert,
            "tls.key": key,
            "client-ca.crt": (pki / "ca.crt").read_bytes(),
            "apiserver-client.crt": ccert,
            "apiserver-client.key": ckey,
        }
        for name, data in files.items():
            (authz / name).write_bytes(data)
            (authz / name).chmod(0o600)
        base = f"https://127.0.0.1:{port}"
        client = (authz / "apiserver-client.crt", authz / "apiserver-client.key")
        if options.get("authz"):
            (authz / "webhook.kubeconfig").write_text(
                json.dumps(_webhook_kubeconfig(f"{base}/authorize", pki, *client))
            )
            config = {
                "apiVersion": "apiserver.config.k8s.io/v1",
                "kind": "AuthorizationConfiguration",
                "authorizers": [
                    {
                        "type": "Webhook",
                        "name": "agent-access",
                        "webhook": {
                            "timeout": "3s",
                            # nothing cached: every call is seen, a refusal follows a
                            # revocation at once (the TTLs must still be positive)
                            "authorizedTTL": "1s",
                            "unauthorizedTTL": "1s",
                            "cacheAuthorizedRequests": False,
                            "cacheUnauthorizedRequests": False,
                            "subjectAccessReviewVersion": "v1",
                            "matchConditionSubjectAccessReviewVersion": "v1",
                            "failurePolicy": "Deny",
                            "connectionInfo": {
                                "type": "KubeConfigFile",
                                "kubeConfigFile": str(authz / "webhook.kubeconfig"),
                            },
                            "matchConditions": [{"expression": MATCH_PER_TASK}],
                        },
                    },
                    {"type": "Node", "name": "node"},
                    {"type": "RBAC", "name": "rbac"},
                ],
            }
            (authz / "authorization-config.yaml").write_text(json.dumps(config, indent=2))
            flags.append(f"--authorization-config={authz / 'authorization-config.yaml'}")
        if options.get("audit_webhook"):
            (authz / "audit-webhook.kubeconfig").write_text(
                json.dumps(_webhook_kubeconfig(f"{base}/audit", pki, *client))
            )
            flags += [
                f"--audit-webhook-config-file={authz / 'audit-webhook.kubeconfig'}",
                "--audit-webhook-mode=batch",
                "--audit-webhook-batch-max-wait=1s",
                "--audit-webhook-initial-backoff=1s",
            ]
    if options.get("audit_log") or options.get("audit_webhook"):
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [
                # an audit policy cannot match a name prefix: every ServiceAccount but
                # the control plane's own; the operator keeps only per-task identities
                {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
                {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                {"level": "None"},
            ],
        }
        (authz / "audit-policy.yaml").write_text(json.dumps(policy, indent=2))
        flags.append(f"--audit-policy-file={authz / 'audit-policy.yaml'}")
    if options.get("audit_log"):
        flags += [
            f"--audit-log-path={STATE_DIR / 'audit.log'}",
            "--audit-log-format=json",
            "--audit-log-maxsize=100",
            "--audit-log-maxbackup=1",
        ]
    return flags


def options_from_env() -> dict:
    on = lambda name: os.environ.get(name, "") not in ("", "0")  # noqa: E731
    return {
        "authz": on("AUTHZ_WEBHOOK"),
        "audit_log": on("AUDIT_LOG"),
        "audit_webhook": on("AUDIT_WEBHOOK"),
    }


# --- processes ----------------------------------------------------------------


def read_state() -> dict | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def ready(state: dict) -> bool:
    ctx = ssl.create_default_context(cafile=str(Path(state["dir"]) / "ca.crt"))
    ctx.load_cert_chain(
        str(Path(state["dir"]) / "admin.crt"), str(Path(state["dir"]) / "admin.key")
    )
    try:
        with urllib.request.urlopen(f"{state['server']}/readyz", context=ctx, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def write_kubeconfig(state: dict, user: str = "admin", path: Path | None = None) -> None:
    d = Path(state["dir"])
    b64 = lambda name: base64.b64encode((d / name).read_bytes()).decode()  # noqa: E731
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "agent-access-local",
        "clusters": [
            {
                "name": "agent-access-local",
                "cluster": {"server": state["server"], "certificate-authority-data": b64("ca.crt")},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {
                    "client-certificate-data": b64(f"{user}.crt"),
                    "client-key-data": b64(f"{user}.key"),
                },
            }
        ],
        "contexts": [
            {
                "name": "agent-access-local",
                "context": {
                    "cluster": "agent-access-local",
                    "user": "admin",
                    "namespace": "default",
                },
            }
        ],
    }
    path = path or KUBECONFIG
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)


def stop_apiserver(state: dict) -> None:
    """Stop kube-apiserver only (etcd keeps the data): for outage tests."""
    pid = state["pids"]["kube-apiserver"]
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    end = time.monotonic() + 10
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    # a multi-threaded process's leader turns zombie before its last thread lets the
    # listening socket go: wait until the port can be bound again
    port = int(state["server"].rsplit(":", 1)[1])
    while time.monotonic() < end:
        with socket.socket() as s:
            # as Go's listener does: connections in TIME_WAIT do not hold the port
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.05)


def start_apiserver(state: dict) -> None:
    """Start kube-apiserver again with the same arguments and port; wait until ready."""
    d = Path(state["dir"])
    state["pids"]["kube-apiserver"] = start_process(
        state["commands"]["kube-apiserver"], d / "kube-apiserver.log"
    )
    STATE_FILE.write_text(json.dumps(state))
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready(state):
        if time.monotonic() > deadline:
            raise TimeoutError("kube-apiserver did not come back")
        time.sleep(0.1)


def start_process(args: list[str], logfile: Path) -> int:
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid


def wait_etcd(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if b'"health":"true"' in r.read():
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("etcd did not become healthy")


def up(options: dict | None = None) -> dict:
    options = options if options is not None else options_from_env()
    state = read_state()
    if (
        state
        and state.get("options", {}) == options
        and all(alive(p) for p in state["pids"].values())
        and ready(state)
    ):
        write_kubeconfig(state)
        log(f"already up at {state['server']}")
        return state
    if state:
        down(quiet=True)
    apiserver, etcd = find_binary("kube-apiserver"), find_binary("etcd")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="agent-access-controlplane-"))
    pki = make_pki(d)
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    state = {
        "dir": str(d),
        "server": f"https://127.0.0.1:{api_port}",
        "pids": {},
        "etcd": etcd_url,
        "options": options,
    }
    STATE_FILE.write_text(json.dumps(state))
    deadline = time.monotonic() + READY_TIMEOUT
    state["pids"]["etcd"] = start_process(
        [
            etcd,
            "--name",
            "default",
            "--data-dir",
            str(d / "etcd"),
            "--listen-client-urls",
            etcd_url,
            "--advertise-client-urls",
            etcd_url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer_port}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ],
        d / "etcd.log",
    )
    STATE_FILE.write_text(json.dumps(state))
    wait_etcd(etcd_url, deadline)
    state["commands"] = {}
    extra = enforcement_flags(d, options)
    state["commands"]["kube-apiserver"] = [
        apiserver,
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={api_port}",
        f"--tls-cert-file={pki['apiserver.crt']}",
        f"--tls-private-key-file={pki['apiserver.key']}",
        f"--client-ca-file={pki['ca.crt']}",
        # Node: a kubelet (hack/node.py) reads only what its own Pods use (with
        # AUTHZ_WEBHOOK=1 the authorization config names Webhook, Node, RBAC instead)
        *([] if options.get("authz") else ["--authorization-mode=Node,RBAC"]),
        *extra,
        "--enable-admission-plugins=NodeRestriction",
        f"--kubelet-client-certificate={pki['kubelet-client.crt']}",
        f"--kubelet-client-key={pki['kubelet-client.key']}",
        f"--kubelet-certificate-authority={pki['ca.crt']}",
        "--kubelet-preferred-address-types=InternalIP",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki['sa.key']}",
        f"--service-account-signing-key-file={pki['sa.key']}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        "--disable-admission-plugins=ServiceAccount",
        "--endpoint-reconciler-type=none",
        # AAO_APISERVER_PROFILING=1 serves /debug/pprof (where the control plane's CPU
        # goes during a benchmark: docs/benchmarks.md)
        "--profiling=" + ("true" if os.environ.get("AAO_APISERVER_PROFILING") == "1" else "false"),
        f"--cert-dir={d / 'certs'}",
        "--v=1",
    ]
    state["pids"]["kube-apiserver"] = start_process(
        state["commands"]["kube-apiserver"], d / "kube-apiserver.log"
    )
    STATE_FILE.write_text(json.dumps(state))
    while time.monotonic() < deadline:
        if not alive(state["pids"]["kube-apiserver"]):
            tail = (d / "kube-apiserver.log").read_text()[-3000:]
            raise SystemExit(f"controlplane: kube-apiserver exited:\n{tail}")
        if ready(state):
            break
        time.sleep(0.2)
    else:
        raise SystemExit(
            "controlplane: kube-apiserver did not become ready in time; "
            f"see {d / 'kube-apiserver.log'}"
        )
    write_kubeconfig(state)
    if os.environ.get("AAO_CONTROLLER_MANAGER", "1") != "0":
        start_controller_manager(state, pki)
    log(f"up at {state['server']} (state in {d})")
    return state


def start_controller_manager(state: dict, pki: dict[str, Path]) -> None:
    """kube-controller-manager with its own certificate (system:kube-controller-manager)
    and one ServiceAccount per controller, as kubeadm runs it. Not waited for: it
    catches up within seconds, and only tests of its controllers need it."""
    d = Path(state["dir"])
    kubeconfig = d / "kube-controller-manager.kubeconfig"
    write_kubeconfig(state, "kube-controller-manager", kubeconfig)
    state["commands"]["kube-controller-manager"] = [
        find_binary("kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        f"--controllers={CONTROLLERS}",
        "--use-service-account-credentials=true",
        f"--root-ca-file={pki['ca.crt']}",
        f"--service-account-private-key-file={pki['sa.key']}",
        "--leader-elect=false",
        "--secure-port=0",
        "--concurrent-gc-syncs=20",
        "--v=1",
    ]
    state["pids"]["kube-controller-manager"] = start_process(
        state["commands"]["kube-controller-manager"], d / "kube-controller-manager.log"
    )
    STATE_FILE.write_text(json.dumps(state))


def controller_manager_ready(state: dict) -> bool:
    """Its controllers have started (the log says so once their caches synced)."""
    log_file = Path(state["dir"]) / "kube-controller-manager.log"
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return False
    return "all resource monitors have synced" in text.lower()


def down(quiet: bool = False) -> None:
    state = read_state()
    if state:
        for name in PROCESSES:
            pid = state["pids"].get(name)
            if pid and alive(pid):
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGTERM)
        for name in PROCESSES:
            pid = state["pids"].get(name)
            end = time.monotonic() + 10
            while pid and alive(pid) and time.monotonic() < end:
                time.sleep(0.1)
            if pid and alive(pid):
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
        shutil.rmtree(state["dir"], ignore_errors=True)
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    if not quiet:
        log("down")


@contextlib.contextmanager
def temporary(prefix: str = "aao-cp-", options: dict | None = None):  # type: ignore[no-untyped-def]
    """A control plane of its own, state in a temporary directory; yields its kubeconfig.

    For test sessions, benchmarks and the soak, so they never touch .controlplane/.
    """
    global STATE_DIR, KUBECONFIG, STATE_FILE
    saved = STATE_DIR, KUBECONFIG, STATE_FILE
    state = Path(tempfile.mkdtemp(prefix=prefix))
    STATE_DIR, KUBECONFIG, STATE_FILE = state, state / "kubeconfig", state / "state.json"
    try:
        up(options or {})
        yield str(KUBECONFIG)
    finally:
        down(quiet=True)
        STATE_DIR, KUBECONFIG, STATE_FILE = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args()
    if args.command == "up":
        up()
        print(f"export KUBECONFIG={KUBECONFIG}")
    elif args.command == "down":
        down()
    else:
        state = read_state()
        ok = bool(state) and all(alive(p) for p in state["pids"].values()) and ready(state)
        print("up" if ok else "down")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
