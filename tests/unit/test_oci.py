"""hack/oci.py: the image archive is reproducible and what containerd imports."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))
import oci


def tree(root: Path, mtime: int) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "alias").symlink_to("tool")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    os.link(root / "etc" / "passwd", root / "etc" / "passwd-")
    for p in [*root.rglob("*"), root]:
        os.utime(p, (mtime, mtime), follow_symlinks=False)
    return root


def test_the_same_tree_gives_the_same_digest_whenever_it_was_made(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = oci.build(tree(tmp_path / "a", 1800000000), tmp_path / "a.tar", "localhost/x:1", {}, {})
    b = oci.build(tree(tmp_path / "b", 1900000000), tmp_path / "b.tar", "localhost/x:1", {}, {})
    assert a == b
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    c = oci.build(tree(tmp_path / "c", 1), tmp_path / "c.tar", "localhost/x:1", {}, {})
    assert c != a  # times before the epoch are kept: the content differs


def test_the_archive_is_an_oci_layout_naming_the_image(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    root = tree(tmp_path / "root", 0)
    digest = oci.build(
        root, tmp_path / "img.tar", "localhost/busybox:local", {"Cmd": ["/bin/tool"]}, {"a": "b"}
    )
    with tarfile.open(tmp_path / "img.tar") as t:
        read = lambda name: t.extractfile(name).read()  # noqa: E731
        index = json.loads(read("index.json"))
        assert json.loads(read("oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        entry = index["manifests"][0]
        assert entry["digest"] == digest
        assert entry["annotations"]["io.containerd.image.name"] == "localhost/busybox:local"
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == "local"
        manifest_bytes = read(f"blobs/sha256/{digest.split(':')[1]}")
        assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == digest
        manifest = json.loads(manifest_bytes)
        config = json.loads(read(f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"))
        assert config["config"] == {"Cmd": ["/bin/tool"], "Labels": {"a": "b"}}
        layer = read(f"blobs/sha256/{manifest['layers'][0]['digest'].split(':')[1]}")
    import gzip
    import io

    raw = gzip.decompress(layer)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        members = {m.name: m for m in t.getmembers()}
    assert list(members) == sorted(members)
    assert members["bin/alias"].issym() and members["bin/alias"].linkname == "tool"
    assert members["etc/passwd-"].islnk() or members["etc/passwd"].islnk()
    assert members["bin/tool"].mode == 0o755
    assert all(m.uname == "" and m.gname == "" for m in members.values())
