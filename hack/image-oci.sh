#!/usr/bin/env bash
# The operator image as an OCI archive, without Docker: what the Dockerfile describes
# (Python 3.11, the project in /opt/venv, no pip, non-root 65532, ENTRYPOINT
# agent-access-operator, CMD run), built from Debian packages by mmdebstrap and the
# project's wheels, then packed by hack/oci.py.
#
#   hack/image-oci.sh              -> dist/agent-access-operator-<version>.oci.tar
#   IMAGE_NAME=... OUT=... hack/image-oci.sh
#
# As the Dockerfile's image: the same /opt/venv (byte-compiled, as pip does), user,
# entrypoint, environment and labels. Unlike it: Debian's own Python 3.11 in /usr/bin
# rather than python.org's in /usr/local, and no apt (nothing to install at run time).
# Reproducible for the same inputs: the Debian packages of the day (their versions
# are written beside the archive), the Python packages at the versions installed in
# .venv (pinned through a constraints file), this tree, and SOURCE_DATE_EPOCH (the
# last commit's time): two builds give the same digest. Needs root (mmdebstrap
# --mode=root, chroot) and Debian's mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
VERSION="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
NAME="${IMAGE_NAME:-localhost/agent-access-operator:$VERSION}"
OUT="${OUT:-dist/agent-access-operator-$VERSION.oci.tar}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SUITE=bookworm  # Python 3.11, as the Dockerfile's python:3.11-slim
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
log() { echo "image-oci: $*" >&2; }

command -v mmdebstrap >/dev/null || {
  log "installing mmdebstrap from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >&2
}
[ "$(id -u)" = 0 ] || { log "needs root (mmdebstrap --mode=root)"; exit 1; }

work="$(mktemp -d /tmp/aao-image-XXXXXX)"
trap 'rm -rf "$work"' EXIT
started=$SECONDS

# 1. The project and its runtime dependencies as wheels, at the versions .venv holds.
"$VENV/bin/pip" freeze --exclude-editable --all > "$work/constraints.txt"
mkdir -p "$work/src"
git ls-files -z pyproject.toml README.md operator | xargs -0 cp --parents -t "$work/src"
find "$work/src" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
# PIP_CONSTRAINT also pins the isolated build environment (setuptools, wheel)
PIP_CONSTRAINT="$work/constraints.txt" \
  "$VENV/bin/pip" wheel -q --no-cache-dir -w "$work/wheels" "$work/src" >&2
pip_version="$("$VENV/bin/pip" --version | awk '{print $2}')"
"$VENV/bin/pip" download -q --no-cache-dir --no-deps -d "$work/pip" "pip==$pip_version" >&2
pip_wheel="$(cd "$work/pip" && ls pip-*.whl)"
log "wheels: $(cd "$work/wheels" && ls | tr '\n' ' ')"

# 2. Debian base with Python, the venv, the wheels installed, nothing to build with.
mkdir -p "$work/rootfs"
mmdebstrap --mode=root --variant=essential --format=directory \
  --include=python3-minimal,libpython3.11-stdlib,libstdc++6,tzdata,ca-certificates,usr-is-merged \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook="mkdir -p \"\$1/tmp/build\" && cp -r $work/wheels $work/pip \"\$1/tmp/build/\"" \
  --customize-hook='chroot "$1" python3 -m venv --without-pip /opt/venv' \
  --customize-hook='chroot "$1" /opt/venv/bin/python3 /tmp/build/pip/'"$pip_wheel"'/pip install -q --no-index --no-cache-dir --find-links /tmp/build/wheels agent-access-operator' \
  --customize-hook='chroot "$1" dpkg-query -W -f "\${Package}=\${Version}\n" > "$1/tmp/packages.txt"' \
  --customize-hook="cp \"\$1/tmp/packages.txt\" $work/packages.txt" \
  --customize-hook='echo "operator:x:65532:65532::/nonexistent:/usr/sbin/nologin" >> "$1/etc/passwd"' \
  --customize-hook='echo "operator:x:65532:" >> "$1/etc/group"' \
  --customize-hook='rm -rf "$1"/tmp/* "$1"/var/cache/* "$1"/var/log/* "$1"/var/lib/dpkg/*-old "$1"/usr/lib/python3.11/ensurepip "$1"/opt/venv/lib/python3.11/site-packages/pip "$1"/opt/venv/lib/python3.11/site-packages/pip-*' \
  "$SUITE" "$work/rootfs" \
  "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY_MIRROR $SUITE-security main" >&2

# 3. Pack, as the Dockerfile's final stage configures the image.
mkdir -p "$(dirname "$OUT")"
python3 hack/oci.py "$work/rootfs" "$OUT" --name "$NAME" \
  --entrypoint '["agent-access-operator"]' --cmd '["run"]' --user 65532:65532 --workdir / \
  --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --env PYTHONUNBUFFERED=1 --env PYTHONDONTWRITEBYTECODE=1 --expose 8080/tcp \
  --label org.opencontainers.image.title=agent-access-operator \
  --label "org.opencontainers.image.description=Just-in-time, least-privilege access for AI agents" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label "org.opencontainers.image.version=$VERSION" > "$work/packed"
cp "$work/packages.txt" "${OUT%.oci.tar}.packages.txt"
read -r _ digest _ < "$work/packed"
echo "$NAME@$digest" > "${OUT%.oci.tar}.digest"
log "$NAME $digest $(du -h "$OUT" | cut -f1) in $((SECONDS - started)) s -> $OUT"
