#!/usr/bin/env bash
# Makes a local Python 3.11 base image without any container registry: debootstrap Debian 12 (bookworm) from this
# machine's own apt source, a venv at /opt/venv (python, pip) first on PATH, then `podman import`. The result
# stands in for python:3.11-slim (Debian 12's python3.11 is the same minor version, with its headers for the CPU
# kernels) in the repository Dockerfile:
#   infra/container/make-base-image.sh                 # -> localhost/arborl-base:bookworm
#   infra/container/build-image.sh                     # builds the pipeline image FROM it
# A user who can pull python:3.11-slim never needs this. Run as root (debootstrap needs it).
# The image carries a label with a hash of the inputs (mirror, suite, packages, recipe); a second call with
# the same inputs reuses the image instead of bootstrapping again (--force rebuilds).
# Environment: BASE_TAG (default localhost/arborl-base:bookworm), MIRROR (default: this machine's apt source for
# bookworm), CONTAINER_CLI (default podman).
set -euo pipefail

TAG="${BASE_TAG:-localhost/arborl-base:bookworm}"
CLI="${CONTAINER_CLI:-podman}"
SUITE=bookworm
PACKAGES=python3.11,libpython3.11-dev,python3-venv,ca-certificates
RECIPE=2  # raise when the steps below change what the image holds
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

die() { echo "make-base-image: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install -y debootstrap)"
command -v "$CLI" >/dev/null || die "$CLI is not installed (apt-get install -y podman)"

# The first http(s) URI of this machine's apt sources that serves the suite (deb822 .sources or one-line .list).
apt_uri() {
  local suite=$1 file uri
  for file in /etc/apt/sources.list.d/*.sources; do
    [[ -e $file ]] || continue
    # a deb822 stanza: URIs and Suites lines; print the URI of a stanza whose Suites include the suite
    uri=$(awk -v s="$suite" 'BEGIN{RS=""} /(^|\n)Types:[^\n]*deb( |\n|$)/ {
            u=""; ok=0; n=split($0, L, "\n")
            for (i=1;i<=n;i++) { if (L[i] ~ /^URIs:/) { split(L[i], w, /[ \t]+/); u=w[2] }
                                 if (L[i] ~ /^Suites:/) { m=split(L[i], w, /[ \t]+/); for (j=2;j<=m;j++) if (w[j]==s) ok=1 } }
            if (ok && u != "") { print u; exit } }' "$file")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -e $file ]] || continue
    uri=$(awk -v s="$suite" '$1=="deb" { i=2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                                         if ($(i+1)==s) { print $i; exit } }' "$file")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
}

MIRROR="${MIRROR:-$(apt_uri "$SUITE")}"
[[ -n "$MIRROR" ]] || die "no apt source for $SUITE in /etc/apt/sources.list*; set MIRROR=http://.../debian"
SECURITY="$(apt_uri "$SUITE-security")"

INPUTS=$(printf '%s\n' "$MIRROR" "$SECURITY" "$SUITE" "$PACKAGES" "$RECIPE")
HASH=$(printf '%s' "$INPUTS" | sha256sum | cut -c1-16)
if [[ $FORCE -eq 0 ]] && [[ "$("$CLI" image inspect --format '{{ index .Labels "arborl.base-inputs" }}' "$TAG" \
      2>/dev/null)" == "$HASH" ]]; then
  echo "make-base-image: $TAG is up to date (inputs $HASH); --force rebuilds"
  exit 0
fi

WORK=$(mktemp -d /var/tmp/arborl-base.XXXXXX)
ROOTFS="$WORK/rootfs"
unmount_all() {  # whatever is mounted under the root file system, deepest first
  findmnt -rn -o TARGET | { grep "^$ROOTFS/" || true; } | sort -r | xargs -r umount -l
}
# debootstrap mounts /proc (and may leave it mounted on failure): unmount before removing anything
trap 'unmount_all; rm -rf --one-file-system "$WORK"' EXIT
echo "make-base-image: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

{
  echo "deb $MIRROR $SUITE main"
  echo "deb $MIRROR $SUITE-updates main"
  [[ -n "$SECURITY" ]] && echo "deb $SECURITY $SUITE-security main"
} >"$ROOTFS/etc/apt/sources.list"
# python and pip of a venv, so `pip install` works as in python:3.11-slim (Debian's own python is
# externally managed)
chroot "$ROOTFS" /usr/bin/python3.11 -m venv /opt/venv
chroot "$ROOTFS" /opt/venv/bin/python -m pip --version
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/tmp/* "$ROOTFS"/root/.cache
unmount_all

tar --numeric-owner -C "$ROOTFS" -c . | "$CLI" import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "LABEL arborl.base-inputs=$HASH" \
  --change 'CMD ["python"]' \
  - "$TAG" >/dev/null
echo "make-base-image: $TAG ($("$CLI" image inspect --format '{{.Size}}' "$TAG") bytes, inputs $HASH)"
