#!/usr/bin/env python3
"""Pack a directory into a single-layer OCI image archive, reproducibly, without Docker.

    python hack/oci.py ROOTFS OUT.tar --name localhost/busybox:local \
        [--entrypoint JSON] [--cmd JSON] [--env K=V ...] [--user U] [--label K=V ...] \
        [--expose 8080/tcp] [--workdir /]

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...), the
manifest annotated with `io.containerd.image.name` and `org.opencontainers.image.ref.name`,
so `ctr images import` names the image without a registry. Reproducible: files in
sorted order, every time clamped to SOURCE_DATE_EPOCH (default 0), owners numeric
only, gzip without a name or a time; the same tree and arguments give the same digest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import platform
import stat
import sys
import tarfile
from pathlib import Path

#: OCI's names for the machine's architectures (the image holds this machine's binaries)
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


def _epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


def layer_tar(root: Path, epoch: int) -> bytes:
    """The tree under root as a tar, entries sorted, times clamped, owners numeric."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        hardlinks: dict[tuple[int, int], str] = {}
        paths = sorted(p for p in root.rglob("*"))
        for path in paths:
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            info = tarfile.TarInfo(rel)
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid, info.gid = st.st_uid, st.st_gid
            info.uname = info.gname = ""
            info.mtime = min(int(st.st_mtime), epoch)
            if stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in hardlinks:
                    info.type = tarfile.LNKTYPE
                    info.linkname = hardlinks[key]
                    tar.addfile(info)
                    continue
                hardlinks[key] = rel
                info.size = st.st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                continue  # device nodes come from the runtime, never from the image
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as g:
        g.write(data)
    return out.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes, media_type: str) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def build(root: Path, out: Path, name: str, config: dict, labels: dict[str, str]) -> str:
    """Write the archive; return the manifest digest (the image's identity)."""
    epoch = _epoch()
    raw = layer_tar(root, epoch)
    blobs: dict[str, bytes] = {}
    layer = _blob(blobs, _gzip(raw), "application/vnd.oci.image.layer.v1.tar+gzip")
    created = f"{dt.datetime.fromtimestamp(epoch, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
    image_config = {
        "created": created,
        "architecture": ARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {**config, "Labels": labels} if labels else config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
        "history": [{"created": created, "created_by": "hack/oci.py"}],
    }
    cfg = _blob(
        blobs,
        json.dumps(image_config, sort_keys=True, separators=(",", ":")).encode(),
        "application/vnd.oci.image.config.v1+json",
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": [layer],
        "annotations": {"org.opencontainers.image.created": created, **labels},
    }
    man = _blob(
        blobs,
        json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(),
        "application/vnd.oci.image.manifest.v1+json",
    )
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                **man,
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True, separators=(",", ":")).encode(),
        **{f"blobs/sha256/{d.split(':', 1)[1]}": b for d, b in sorted(blobs.items())},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
            tar.addfile(info)
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, epoch
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)
    return man["digest"]


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(i.split("=", 1) for i in items)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rootfs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--entrypoint", type=json.loads)
    p.add_argument("--cmd", type=json.loads)
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--user")
    p.add_argument("--workdir")
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--expose", action="append", default=[])
    a = p.parse_args()
    config: dict = {}
    if a.env:
        config["Env"] = a.env
    if a.entrypoint is not None:
        config["Entrypoint"] = a.entrypoint
    if a.cmd is not None:
        config["Cmd"] = a.cmd
    if a.user:
        config["User"] = a.user
    if a.workdir:
        config["WorkingDir"] = a.workdir
    if a.expose:
        config["ExposedPorts"] = {e: {} for e in a.expose}
    digest = build(a.rootfs, a.out, a.name, config, _pairs(a.label))
    print(f"{a.name} {digest} {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
