#!/usr/bin/env python3
"""A real node for the local control plane: containerd + kubelet, kube-scheduler, and
the controllers a node's workloads need; no Docker, nothing left on the host after `down`.

    python hack/node.py up      # after hack/controlplane.py up; idempotent
    python hack/node.py down    # stop everything it started, remove every trace, verify
    python hack/node.py status  # exit 0 when the node is Ready
    python hack/node.py prerequisites  # install the Debian packages it needs

What `up` does (docs/design.md, "A real node"):
- installs Debian's containerd, runc, CNI plugins, iptables and busybox-static if
  missing (never starting or enabling containerd's own service);
- issues the node's certificates from the control plane's CA: a `system:node:` client
  certificate (Node authorizer, NodeRestriction) and a serving certificate the API
  server verifies; the kubelet API takes only certificates and tokens (no anonymous,
  Webhook authorization); the API server's own kubelet client is bound to
  system:kubelet-api-admin;
- restarts kube-apiserver with the ServiceAccount admission plugin (Pods get their
  projected tokens) and Pod Security `baseline` enforced cluster-wide (no privileged,
  host-namespace or hostPath Pods: the node shares the host's kernel and PIDs);
  `down` restores the control plane's flags;
- runs containerd, kubelet, kube-proxy and CoreDNS in a private mount and network
  namespace (`unshare --kill-child`): private tmpfs on /run, /var/lib and /var/log,
  private files over the machine-wide sysctls kubelet writes, and their own iptables,
  routes and Pod bridge; the host sees one veth pair, `route_localnet` on its end
  only, and three chains of its own: the DNAT from that link to the API server's
  loopback port, a raw-table drop of anything addressed to 127/8 from the link, and
  an INPUT filter that lets the node reach only that DNAT;
- imports the images in dist/*.oci.tar and the test images it builds itself
  (localhost/busybox:local from busybox-static, localhost/pause:local for sandboxes);
- starts kube-scheduler and a second kube-controller-manager with the controllers the
  first does not run (ServiceAccounts, root CA ConfigMaps, node lifecycle, Deployments,
  ReplicaSets, EndpointSlices, PodGC, ...), each with its own certificate.

`down` deletes the Node and its Pods, kills every process of the node's namespaces and
of kubelet's `kubepods` cgroups (checking each PID's start time and the boot), removes
those cgroups, its chains and its link, and nothing else; checks that none is left,
that no chain of a node's components appeared on the host and that the host's sysctls
are unchanged (exit 1 with a list otherwise, state kept for another try), and restores
the API server flags.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import controlplane as cp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

ROOT = cp.ROOT
NODE_DIR = Path(os.environ.get("AAO_NODE_DIR", ROOT / ".node"))
STATE_FILE = NODE_DIR / "state.json"
NODE_NAME = "aao-node"
# The node lives in a network namespace of its own, linked to the host by one veth
# pair: HOST_LINK (host end, cp.NODE_HOST_IP) <-> eth0 (node end, NODE_IP).
HOST_LINK, NODE_IP = "aao-node0", "10.213.0.2"  # NODE_IP: the node's InternalIP
POD_BRIDGE, POD_CIDR, POD_GATEWAY = "aao-cni0", "10.214.0.0/24", "10.214.0.1"
DNS_IP = "10.215.0.10"  # CoreDNS, on the node's loopback: cluster.local names for Pods
NAT_CHAIN = "AAO-NODE"  # nat: the link -> the API server's loopback port
RAW_CHAIN = "AAO-NODE-RAW"  # raw: nothing from the link may address 127/8 itself
INPUT_CHAIN = "AAO-NODE-INPUT"  # filter: from the link, only that DNAT and replies
CHAINS = (("nat", NAT_CHAIN, "PREROUTING"), ("raw", RAW_CHAIN, "PREROUTING"),
          ("filter", INPUT_CHAIN, "INPUT"))  # fmt: skip
PACKAGES = (
    "containerd", "runc", "containernetworking-plugins", "iptables", "busybox-static",
    "mmdebstrap",  # for make image-oci
)  # fmt: skip
#: kubelet writes these machine-wide sysctls; inside the node's mount namespace each
#: is a private file, so the host keeps its values. (net.* ones, which kubelet,
#: kube-proxy and the CNI plugin write, belong to the node's own network namespace.)
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
#: checked unchanged on the host after `up` and `down`
HOST_SYSCTLS = (
    *SYSCTLS,
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
)
#: What the control plane's own kube-controller-manager does not run, and a node's
#: workloads need (the chart's Deployment, Pods' tokens and CA, the node's taints).
NODE_CONTROLLERS = ",".join(
    f"{c}-controller"
    for c in (
        "serviceaccount", "root-ca-certificate-publisher", "node-lifecycle", "deployment",
        "replicaset", "endpointslice", "pod-garbage-collector", "disruption",
        "clusterrole-aggregation", "job",
        "ttl-after-finished", "taint-eviction",
    )
)  # fmt: skip
COREDNS_USER = "aao-local:coredns"
TEST_IMAGES = {"pause": "localhost/pause:local", "busybox": "localhost/busybox:local"}
READY_TIMEOUT = 60.0


def log(msg: str) -> None:
    print(f"node: {msg}", file=sys.stderr, flush=True)


def sh(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        check=check,
        text=True,
        capture_output=quiet,
        stdin=subprocess.DEVNULL,
    )


def out(*args: str) -> str:
    return subprocess.run(args, check=False, text=True, capture_output=True).stdout


# --- prerequisites ------------------------------------------------------------


def install_prerequisites() -> None:
    missing = [
        p
        for p in PACKAGES
        if subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
        ).stdout
        != "install ok installed"
    ]
    if not missing:
        return
    log(f"installing {' '.join(missing)} from Debian")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    # Debian starts and enables a package's service: containerd must run only as the
    # node's, so its own service is neither started now (policy-rc.d) nor at boot
    policy = Path("/usr/sbin/policy-rc.d")
    placed = not policy.exists()
    if placed:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            check=True,
            env=env,
        )
    finally:
        if placed:
            policy.unlink()
    if "containerd" in missing:  # what `systemctl disable` does, also without systemd
        for link in Path("/etc/systemd/system").glob("*.wants/containerd.service"):
            if link.is_symlink():
                link.unlink()


# --- API access (admin certificate) ------------------------------------------


def api(cpstate: dict, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    d = Path(cpstate["dir"])
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    ctx.load_cert_chain(str(d / "admin.crt"), str(d / "admin.key"))
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        cpstate["server"] + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json"} if data else {},
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# --- certificates ---------------------------------------------------------------


def issue_certificates(cpstate: dict, d: Path) -> None:
    cpd = Path(cpstate["dir"])
    ca = x509.load_pem_x509_certificate((cpd / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((cpd / "ca.key").read_bytes(), None)

    def write(name: str, subject: list, *, client: bool, sans=()) -> None:  # type: ignore[no-untyped-def]
        key = cp._key()
        cert = cp._cert(x509.Name(subject), key, ca.subject, ca_key, client=client, sans=sans)
        (d / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(cp._pem_key(key))
        (d / f"{name}.key").chmod(0o600)

    cn = lambda v: x509.NameAttribute(NameOID.COMMON_NAME, v)  # noqa: E731
    org = lambda v: x509.NameAttribute(NameOID.ORGANIZATION_NAME, v)  # noqa: E731
    write("kubelet", [org("system:nodes"), cn(f"system:node:{NODE_NAME}")], client=True)
    write(
        "kubelet-serving",
        [org("system:nodes"), cn(f"system:node:{NODE_NAME}")],
        client=False,
        sans=[x509.DNSName(NODE_NAME), x509.IPAddress(ipaddress.ip_address(NODE_IP))],
    )
    write("kube-scheduler", [cn("system:kube-scheduler")], client=True)
    write("kube-controller-manager", [cn("system:kube-controller-manager")], client=True)
    write("kube-proxy", [cn("system:kube-proxy")], client=True)  # bound to system:node-proxier
    write("coredns", [cn(COREDNS_USER)], client=True)
    shutil.copy(cpd / "ca.crt", d / "ca.crt")


def api_port(cpstate: dict) -> str:
    return cpstate["server"].rsplit(":", 1)[1]


def kubeconfig(cpstate: dict, d: Path, user: str, server: str | None = None) -> Path:
    path = d / f"{user}.kubeconfig"
    state = dict(cpstate, dir=str(d), server=server or cpstate["server"])
    cp.write_kubeconfig(state, user, path)
    return path


# --- host snapshot (what `down` must leave as it found) ------------------------------


def iptables_chains() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle", "raw"):
            listing = out(tool, "-w", "-t", table, "-S")
            found[f"{tool}/{table}"] = sorted(
                line.split()[1] for line in listing.splitlines() if line.startswith("-N ")
            )
    return found


def cgroup_tops() -> dict[str, list[str]]:
    """Top-level cgroups per hierarchy ("" for a pure cgroup v2 host: one hierarchy)."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return {"": sorted(p.name for p in base.iterdir() if p.is_dir())}
    tops = {}
    for h in sorted(base.iterdir()) if base.is_dir() else []:
        if h.is_dir():
            tops[h.name] = sorted(p.name for p in h.iterdir() if p.is_dir())
    return tops


def links() -> list[str]:
    return sorted(Path(p).name for p in Path("/sys/class/net").iterdir())


def sysctl_values() -> dict[str, str]:
    values = {}
    for name in HOST_SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = Path("/proc/sys", name).read_text().strip()
    return values


#: where a node's components would write on the host if their isolation failed
HOST_PATHS = (
    "/opt/containerd", "/opt/cni", "/etc/cni", "/etc/kubernetes", "/var/lib/kubelet",
    "/var/lib/containerd", "/var/lib/cni", "/run/containerd", "/var/run/netns",
    "/var/log/pods", "/var/log/containers", "/usr/libexec/kubernetes",
)  # fmt: skip


def snapshot() -> dict:
    return {
        "paths": [p for p in HOST_PATHS if os.path.lexists(p)],
        "iptables": iptables_chains(),
        "cgroups": cgroup_tops(),
        "links": links(),
        "sysctls": sysctl_values(),
    }


# --- state -------------------------------------------------------------------------


def read_state() -> dict | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None


def write_state(state: dict) -> None:
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(state, indent=1))


def node_ready(cpstate: dict) -> bool:
    code, node = api(cpstate, "GET", f"/api/v1/nodes/{NODE_NAME}")
    if code != 200:
        return False
    conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
    taints = [t["key"] for t in node.get("spec", {}).get("taints", []) or []]
    return conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints


# --- images ------------------------------------------------------------------------


def build_test_images(d: Path) -> list[Path]:
    """localhost/pause:local (the sandbox) and localhost/busybox:local (for tests)."""
    import oci  # hack/oci.py

    pause_bin = next(p / "pause" for p in cp.binary_dirs() if (p / "pause").exists())
    archives = []
    root = d / "img-pause"
    root.mkdir()
    shutil.copy(pause_bin, root / "pause")
    oci.build(root, d / "pause.oci.tar", TEST_IMAGES["pause"], {"Entrypoint": ["/pause"]}, {})
    archives.append(d / "pause.oci.tar")
    root = d / "img-busybox"
    (root / "bin").mkdir(parents=True)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnobody:x:65534:\n")
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in out("/bin/busybox", "--list").split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    oci.build(
        root,
        d / "busybox.oci.tar",
        TEST_IMAGES["busybox"],
        {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        {},
    )
    archives.append(d / "busybox.oci.tar")
    return archives


def import_images(d: Path, archives: list[Path]) -> None:
    for archive in archives:
        sh(
            "ctr",
            "--address",
            str(d / "containerd.sock"),
            "-n",
            "k8s.io",
            "images",
            "import",
            str(archive),
            quiet=True,
        )


# --- up ----------------------------------------------------------------------------


CONTAINERD_CONFIG = """version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"  # not /opt/containerd on the host
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # root here may not lower oom_score_adj (no CAP_SYS_RESOURCE): never ask runc to
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"""

LAUNCH = """#!/bin/sh
# Runs inside `unshare --mount --net --propagation private`: nothing mounted or
# configured here is seen by the host, and it all goes with the namespace's last process.
set -eu
D={d}
mount -t tmpfs -o mode=755 aao-node-run /run
mount -t tmpfs -o mode=755 aao-node-lib /var/lib
mount -t tmpfs -o mode=755 aao-node-log /var/log
mkdir -p "$D/sysctl"
for f in {sysctls}; do
  [ -e "/proc/sys/$f" ] || continue
  n="$D/sysctl/$(echo "$f" | tr / _)"
  cat "/proc/sys/$f" > "$n"
  mount --bind "$n" "/proc/sys/$f"
done
echo $$ > "$D/launch.pid"
i=0
while ! ip link show eth0 >/dev/null 2>&1; do  # the host moves the veth's end in
  i=$((i+1)); [ $i -lt 300 ] || {{ echo "no link from the host" >&2; exit 1; }}
  sleep 0.05
done
ip link set lo up
ip addr add {dns_ip}/32 dev lo
ip addr add {node_ip}/30 dev eth0
ip link set eth0 up
ip route add default via {host_ip}
echo 1 > /proc/sys/net/ipv4/ip_forward  # this network namespace's own
containerd --config "$D/containerd.toml" >> "$D/containerd.log" 2>&1 &
echo $! > "$D/containerd.pid"
i=0
while [ ! -S "$D/containerd.sock" ]; do
  i=$((i+1)); [ $i -lt 300 ] || {{ echo "containerd did not start" >&2; exit 1; }}
  sleep 0.1
done
"{kubelet}" --config="$D/kubelet.yaml" --kubeconfig="$D/kubelet.kubeconfig" \\
  --hostname-override={node} --node-ip={node_ip} --cert-dir="$D/kubelet-pki" \\
  --v=1 >> "$D/kubelet.log" 2>&1 &
echo $! > "$D/kubelet.pid"
"{kube_proxy}" --config="$D/kube-proxy.yaml" --v=1 >> "$D/kube-proxy.log" 2>&1 &
echo $! > "$D/kube-proxy.pid"
"{coredns}" -conf "$D/Corefile" >> "$D/coredns.log" 2>&1 &
echo $! > "$D/coredns.pid"
wait
"""

KUBE_PROXY_CONFIG = """apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: "{d}/kube-proxy.kubeconfig"}}
hostnameOverride: {node}
mode: iptables
clusterCIDR: {pod_cidr}
# replies from a Service's Pod go back through the node, not across the bridge
# (no br_netfilter needed)
iptables: {{masqueradeAll: true}}
# never touch the machine-wide conntrack table sizes
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
# the node's own loopback (its network namespace): no clash with the host
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
"""

COREFILE = """cluster.local:53 in-addr.arpa:53 {{
    bind {dns_ip}
    errors
    cache 5
    kubernetes cluster.local in-addr.arpa {{
        kubeconfig {d}/coredns.kubeconfig agent-access-local
    }}
}}
.:53 {{
    bind {dns_ip}
    errors
}}
"""


def kubelet_config(d: Path, healthz_port: int, port: int) -> str:
    return json.dumps(
        {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(d / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(d / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(d / "kubelet-serving.key"),
            "containerRuntimeEndpoint": f"unix://{d / 'containerd.sock'}",
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "resolvConf": str(d / "resolv.conf"),
            "clusterDomain": "cluster.local",
            "clusterDNS": [DNS_IP],
            "volumePluginDir": str(d / "volume-plugins"),
            "serializeImagePulls": False,
            "registerNode": True,
            "protectKernelDefaults": False,
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "20s",
            "maxPods": 110,
        },
        indent=1,
    )


def cni_config(d: Path) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "aao",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": POD_BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(d / "ipam"),
                    },
                }
            ],
        },
        indent=1,
    )


def setup_network(cpstate: dict, pid: int) -> None:
    """One veth pair from the host into the node's network namespace (pid's). The node
    reaches the API server (loopback only) at the host end, forwarded to 127.0.0.1:
    route_localnet on that link alone, one DNAT in a chain of our own."""
    sh("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", "eth0", "netns", str(pid))
    sh("ip", "addr", "add", f"{cp.NODE_HOST_IP}/30", "dev", HOST_LINK)
    sh("ip", "link", "set", HOST_LINK, "up")
    Path(f"/proc/sys/net/ipv4/conf/{HOST_LINK}/route_localnet").write_text("1\n")
    port = api_port(cpstate)
    ipt = ("iptables", "-w", "-t")
    for table, chain, _ in CHAINS:
        sh(*ipt, table, "-N", chain, check=False, quiet=True)
        sh(*ipt, table, "-F", chain)
    sh(
        *ipt, "nat", "-A", NAT_CHAIN, "-d", f"{cp.NODE_HOST_IP}/32", "-p", "tcp",
        "--dport", port, "-j", "DNAT", "--to-destination", f"127.0.0.1:{port}",
    )  # fmt: skip
    # route_localnet must not make the host's loopback services reachable from the
    # node (CVE-2020-8558): only the DNAT above may lead there
    sh(*ipt, "raw", "-A", RAW_CHAIN, "-d", "127.0.0.0/8", "-j", "DROP")
    sh(*ipt, "filter", "-A", INPUT_CHAIN, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
       "-j", "ACCEPT")  # fmt: skip
    sh(*ipt, "filter", "-A", INPUT_CHAIN, "-m", "conntrack", "--ctstate", "DNAT",
       "-d", "127.0.0.1/32", "-p", "tcp", "--dport", port, "-j", "ACCEPT")  # fmt: skip
    sh(*ipt, "filter", "-A", INPUT_CHAIN, "-j", "DROP")
    for table, chain, hook in CHAINS:
        jump = (hook, "-i", HOST_LINK, "-j", chain)
        if sh(*ipt, table, "-C", *jump, check=False, quiet=True).returncode:
            sh(*ipt, table, "-I", *jump)


def cluster_objects(cpstate: dict) -> None:
    """What a node's cluster needs from the API: the API server's kubelet client bound to
    system:kubelet-api-admin, CoreDNS's read access, and endpoints for the `kubernetes`
    Service (the control plane runs without an endpoint reconciler)."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    group = "rbac.authorization.k8s.io"

    def user(name: str) -> list[dict]:
        return [{"apiGroup": group, "kind": "User", "name": name}]

    def role(name: str) -> dict:
        return {"apiGroup": group, "kind": "ClusterRole", "name": name}

    api_port = int(cpstate["server"].rsplit(":", 1)[1])
    for path, body in (
        (f"{rbac}/clusterrolebindings", {
            "metadata": {"name": "aao-local:kube-apiserver-kubelet-client"},
            "roleRef": role("system:kubelet-api-admin"), "subjects": user(cp.KUBELET_CLIENT)}),
        (f"{rbac}/clusterroles", {
            "metadata": {"name": COREDNS_USER},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "namespaces"],
                 "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                 "verbs": ["list", "watch"]},
            ]}),
        (f"{rbac}/clusterrolebindings", {
            "metadata": {"name": COREDNS_USER}, "roleRef": role(COREDNS_USER),
            "subjects": user(COREDNS_USER)}),
        ("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", {
            "metadata": {"name": ENDPOINT_SLICE, "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "aao-local"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [cp.NODE_HOST_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": api_port, "protocol": "TCP"}]}),
    ):  # fmt: skip
        code, got = api(cpstate, "POST", path, body)
        if code not in (201, 409):
            raise SystemExit(f"node: could not create {path}: HTTP {code} {got.get('message')}")


CLUSTER_OBJECTS = (
    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/aao-local:kube-apiserver-kubelet-client",
    f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{COREDNS_USER}",
    f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{COREDNS_USER}",
    "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes-aao-node",
)
ENDPOINT_SLICE = "kubernetes-aao-node"


POD_SECURITY = """apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: PodSecurity
  configuration:
    apiVersion: pod-security.admission.config.k8s.io/v1
    kind: PodSecurityConfiguration
    defaults: {enforce: baseline, enforce-version: latest, warn: restricted, warn-version: latest}
    exemptions: {usernames: [], runtimeClasses: [], namespaces: []}
"""


def apiserver_for_node(cpstate: dict, enable: bool, d: Path | None = None) -> None:
    """For a node: ServiceAccount admission on (Pods need their tokens) and Pod Security
    `baseline` enforced everywhere (the node shares the host's kernel, PIDs and
    filesystem: no privileged, host-namespace or hostPath Pods). Off again at `down`."""
    cmd = cpstate["commands"]["kube-apiserver"]
    plain = [
        a
        for a in cmd
        if not a.startswith(("--admission-control-config-file=", "--allow-privileged="))
    ]
    plain = [a for a in plain if a != "--disable-admission-plugins=ServiceAccount"]
    if enable:
        assert d is not None
        (d / "admission.yaml").write_text(POD_SECURITY)
        want = [*plain, f"--admission-control-config-file={d / 'admission.yaml'}",
                "--allow-privileged=false"]  # fmt: skip
    else:
        want = [*plain, "--disable-admission-plugins=ServiceAccount", "--allow-privileged=true"]
    if want == cmd:
        return
    log(f"{'enabling' if enable else 'disabling'} ServiceAccount admission and Pod Security "
        "baseline (kube-apiserver restart)")  # fmt: skip
    cpstate["commands"]["kube-apiserver"] = want
    cp.stop_apiserver(cpstate)
    cp.start_apiserver(cpstate)  # writes the control plane's state


def start(args: list[str], logfile: Path) -> int:
    return cp.start_process(args, logfile)


def up() -> dict:
    cpstate = cp.read_state()
    if not cpstate or not cp.ready(cpstate):
        raise SystemExit("node: the control plane is not up: run `make controlplane-up` first")
    state = read_state()
    if (
        state
        and state.get("server") == cpstate["server"]
        and node_ready(cpstate)
        and all(ours(state, name) for name in state["pids"])
    ):
        d = Path(state["dir"])
        images = sorted((ROOT / "dist").glob("*.oci.tar"))
        import_images(d, images)
        log(f"already up: {NODE_NAME} Ready ({len(images)} images from dist/ imported)")
        return state
    if state:
        down(quiet=True)
    if os.geteuid() != 0:
        raise SystemExit("node: needs root (containerd, kubelet, mounts, iptables)")
    install_prerequisites()
    remove_iptables()  # a link or chain left by a node whose state was lost
    if HOST_LINK in links():
        sh("ip", "link", "delete", HOST_LINK, check=False, quiet=True)
    taken = [f"{h}/{t}" for h, tops in cgroup_tops().items() for t in tops if t in OWN_CGROUPS]
    if taken:
        raise SystemExit(
            f"node: cgroups of another kubelet exist ({', '.join(taken[:3])}); one node per machine"
        )
    started = time.monotonic()
    d = Path(tempfile.mkdtemp(prefix="aao-node-"))
    state = {
        "dir": str(d),
        "server": cpstate["server"],
        "boot": boot_id(),
        "pids": {},
        "before": snapshot(),
    }
    write_state(state)
    for sub in ("cni", "ipam", "volume-plugins", "kubelet-pki", "containerd"):
        (d / sub).mkdir()
    issue_certificates(cpstate, d)
    apiserver_for_node(cpstate, True, d)
    cluster_objects(cpstate)
    for user in ("kubelet", "kube-proxy", "coredns"):
        kubeconfig(cpstate, d, user, server=f"https://{cp.NODE_HOST_IP}:{api_port(cpstate)}")
    (d / "containerd.toml").write_text(CONTAINERD_CONFIG.format(d=d, pause=TEST_IMAGES["pause"]))
    (d / "cni" / "10-aao.conflist").write_text(cni_config(d))
    (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions ndots:1\n")
    (d / "kubelet.yaml").write_text(kubelet_config(d, cp.free_port(), cp.free_port()))
    (d / "kube-proxy.yaml").write_text(
        KUBE_PROXY_CONFIG.format(d=d, node=NODE_NAME, pod_cidr=POD_CIDR)
    )
    (d / "Corefile").write_text(COREFILE.format(d=d, dns_ip=DNS_IP))
    (d / "launch.sh").write_text(
        LAUNCH.format(
            d=d,
            sysctls=" ".join(SYSCTLS),
            kubelet=cp.find_binary("kubelet"),
            kube_proxy=cp.find_binary("kube-proxy"),
            coredns=cp.find_binary("coredns"),
            node=NODE_NAME,
            node_ip=NODE_IP,
            host_ip=cp.NODE_HOST_IP,
            dns_ip=DNS_IP,
        )
    )
    remember(state, "node", start(
        ["unshare", "--mount", "--net", "--propagation", "private", "--fork", "--kill-child",
         "sh", str(d / "launch.sh")],
        d / "launch.log",
    ))  # fmt: skip
    write_state(state)
    deadline = time.monotonic() + READY_TIMEOUT
    while not (d / "launch.pid").exists():
        if not cp.alive(state["pids"]["node"]) or time.monotonic() > deadline:
            raise SystemExit("node: the namespace did not start:\n" + tail(d / "launch.log"))
        time.sleep(0.02)
    launch = int((d / "launch.pid").read_text())
    # from now on `down` finds every process of the node by its mount namespace
    state["mntns"] = os.readlink(f"/proc/{launch}/ns/mnt")
    write_state(state)
    setup_network(cpstate, launch)
    while not (d / "coredns.pid").exists():
        if not cp.alive(state["pids"]["node"]) or time.monotonic() > deadline:
            raise SystemExit(
                "node: containerd did not start:\n"
                + tail(d / "containerd.log")
                + tail(d / "launch.log")
            )
        time.sleep(0.1)
    for name in ("containerd", "kubelet", "kube-proxy", "coredns"):  # watched until Ready
        remember(state, name, int((d / f"{name}.pid").read_text()))
    write_state(state)
    images = build_test_images(d) + sorted((ROOT / "dist").glob("*.oci.tar"))
    import_images(d, images)
    state["images"] = [str(p) for p in images]
    for name, extra in (
        ("kube-scheduler", ["--leader-elect=false"]),
        (
            "kube-controller-manager",
            [
                f"--controllers={NODE_CONTROLLERS}",
                "--use-service-account-credentials=true",
                f"--root-ca-file={d / 'ca.crt'}",
                f"--service-account-private-key-file={Path(cpstate['dir']) / 'sa.key'}",
                "--leader-elect=false",
                "--node-monitor-grace-period=20s",
            ],
        ),
    ):
        remember(state, name, start(
            [
                cp.find_binary(name),
                f"--kubeconfig={kubeconfig(cpstate, d, name)}",
                "--secure-port=0",
                *extra,
                "--v=1",
            ],
            d / f"{name}.log",
        ))  # fmt: skip
        write_state(state)
    while not node_ready(cpstate):
        for name in state["pids"]:
            if not ours(state, name):
                raise SystemExit(
                    f"node: {name} exited:\n"
                    + tail(d / f"{name if name != 'node' else 'launch'}.log")
                )
        if time.monotonic() > deadline:
            raise SystemExit("node: not Ready in time; kubelet log:\n" + tail(d / "kubelet.log"))
        time.sleep(0.2)
    log(
        f"{NODE_NAME} Ready in {time.monotonic() - started:.1f} s "
        f"({len(images)} images imported; state in {d})"
    )
    return state


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of its stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def remember(state: dict, name: str, pid: int) -> None:
    """Record a process with its start time: a PID reused later is never taken for it."""
    state["pids"][name] = pid
    state.setdefault("starts", {})[name] = start_time(pid)


def ours(state: dict, name: str) -> bool:
    """The recorded process `name` is still the one `up` started, and alive."""
    pid = state["pids"][name]
    return (
        state.get("boot") == boot_id()
        and cp.alive(pid)
        and start_time(pid) == state.get("starts", {}).get(name)
    )


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --- down ----------------------------------------------------------------------------


def processes_in(state: dict) -> list[int]:
    """Every process in the node's mount namespace (recorded on this boot only: after a
    reboot the number may belong to another namespace)."""
    mntns = state.get("mntns") if state.get("boot") == boot_id() else None
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if mntns and os.readlink(p / "ns" / "mnt") == mntns:
                    pids.append(int(p.name))
    return pids


#: the cgroups kubelet makes (cgroupfs driver, cgroup root "/"), in every hierarchy
OWN_CGROUPS = ("kubepods",)
#: chain names of a node's components: on the host they would mean the isolation leaked
NODE_CHAIN_PREFIXES = ("KUBE-", "CNI-")


def cgroup_dirs(before: dict[str, list[str]]) -> list[Path]:
    """The node's cgroups (kubelet's kubepods and below) not there before `up`, deepest
    first. Only these: whatever else appeared on the host meanwhile is not ours."""
    found = []
    base = Path("/sys/fs/cgroup")
    for hierarchy, tops in cgroup_tops().items():
        for top in tops:
            if top in OWN_CGROUPS and top not in before.get(hierarchy, []):
                found.extend(
                    sorted(
                        (p for p in (base / hierarchy / top).rglob("*") if p.is_dir()),
                        key=lambda p: -len(p.parts),
                    )
                )
                found.append(base / hierarchy / top)
    return found


def kill_all(state: dict) -> None:
    before = state.get("before", {})
    d = Path(state["dir"])
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((d / "kubelet.pid").read_text()), signal.SIGTERM)
    for _ in range(100):
        victims = set(processes_in(state))
        for cg in cgroup_dirs(before.get("cgroups", {})):
            with contextlib.suppress(OSError):
                victims.update(int(x) for x in (cg / "cgroup.procs").read_text().split())
        for name, pid in state.get("pids", {}).items():
            if ours(state, name):
                victims.add(pid)
        victims.discard(os.getpid())
        if not victims:
            return
        for pid in victims:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def remove_iptables() -> None:
    """The chains `up` made on the host, and their jumps."""
    if not shutil.which("iptables"):
        return
    for table, chain, hook in CHAINS:
        jump = ("iptables", "-w", "-t", table, "-D", hook, "-i", HOST_LINK, "-j", chain)
        while not sh(*jump, check=False, quiet=True).returncode:
            pass
        sh("iptables", "-w", "-t", table, "-F", chain, check=False, quiet=True)
        sh("iptables", "-w", "-t", table, "-X", chain, check=False, quiet=True)


def leaks(state: dict) -> list[str]:
    """Signs on the host that the node's isolation leaked, even while it runs: files
    its components would write, their mounts, their iptables chains, changed sysctls."""
    before = state.get("before", {})
    left = []
    paths = [p for p in HOST_PATHS if os.path.lexists(p) and p not in before.get("paths", [])]
    if paths:
        left.append(f"paths {paths}")
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if "aao-node" in line or line.split()[4].startswith(state["dir"])
    ]
    if mounts:
        left.append(f"mounts {mounts[:5]}")
    for key, chains in iptables_chains().items():
        theirs = [
            c
            for c in chains
            if c not in before.get("iptables", {}).get(key, [])
            and c.startswith(NODE_CHAIN_PREFIXES)
        ]
        if theirs:
            left.append(f"{key} chains {theirs}")
    if sysctl_values() != before.get("sysctls", sysctl_values()):
        left.append(f"sysctls changed: {sysctl_values()} (were {before.get('sysctls')})")
    return left


def leftovers(state: dict) -> list[str]:
    """What of the node is still on the host (nothing, after a good `down`), and any
    sign that its isolation leaked."""
    before = state.get("before", {})
    left = leaks(state)
    procs = processes_in(state)
    if procs:
        left.append(f"processes {procs}")
    if cgroup_dirs(before.get("cgroups", {})):
        left.append(f"cgroups {[str(p) for p in cgroup_dirs(before.get('cgroups', {}))][:5]}")
    for key, chains in iptables_chains().items():
        mine = [c for c in chains if c.startswith(NAT_CHAIN)]
        if mine:
            left.append(f"{key} chains {mine}")
    mine = [link for link in links() if link in (HOST_LINK, POD_BRIDGE)]
    if mine:
        left.append(f"links {mine}")
    return left


def down(quiet: bool = False) -> int:
    state = read_state()
    if not state:  # nothing recorded: only what is ours by name can be cleaned up
        remove_iptables()
        if HOST_LINK in links():
            sh("ip", "link", "delete", HOST_LINK, check=False, quiet=True)
        if not quiet:
            log("not up")
        shutil.rmtree(NODE_DIR, ignore_errors=True)
        return 0
    cpstate = cp.read_state()
    if cpstate and cpstate.get("server") == state.get("server") and cp.ready(cpstate):
        # its Pods go with it (no kubelet will ever run them again; a later node would
        # otherwise restart them as its own)
        _, pods = api(cpstate, "GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE_NAME}")
        for pod in pods.get("items", []):
            m = pod["metadata"]
            api(
                cpstate,
                "DELETE",
                f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}",
                {"gracePeriodSeconds": 0},
            )
        api(cpstate, "DELETE", f"/api/v1/nodes/{NODE_NAME}")
    kill_all(state)
    before = state.get("before", {})
    for _ in range(50):  # a cgroup is removable once its last process is reaped
        dirs = cgroup_dirs(before.get("cgroups", {}))
        for cg in dirs:
            with contextlib.suppress(OSError):
                cg.rmdir()
        if not dirs:
            break
        time.sleep(0.1)
    remove_iptables()
    if HOST_LINK in links():  # normally gone with the namespace, its peer's home
        sh("ip", "link", "delete", HOST_LINK, check=False, quiet=True)
    left = leftovers(state)
    if cpstate and cpstate.get("server") == state.get("server") and cp.ready(cpstate):
        for path in CLUSTER_OBJECTS:
            api(cpstate, "DELETE", path)
        apiserver_for_node(cpstate, False)
    if left:  # the state stays, so another `down` can try again
        log("left on the host: " + "; ".join(left))
        return 1
    shutil.rmtree(state["dir"], ignore_errors=True)
    shutil.rmtree(NODE_DIR, ignore_errors=True)
    if not quiet:
        log("down; nothing left on the host")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "prerequisites"])
    a = parser.parse_args()
    if a.command == "prerequisites":
        install_prerequisites()
        return 0
    if a.command == "up":
        up()
        return 0
    if a.command == "down":
        return down()
    cpstate, state = cp.read_state(), read_state()
    ok = bool(cpstate and state and cp.ready(cpstate) and node_ready(cpstate))
    print("up" if ok else "down")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
