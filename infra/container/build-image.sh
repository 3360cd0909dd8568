#!/usr/bin/env bash
# Builds the pipeline image (the repository Dockerfile, target `pipeline`) with podman, on a machine without a
# container registry: FROM the local base of make-base-image.sh, pip inside the build configured as pip is on
# this machine (its merged `pip config list`, including PIP_* variables, written to a pip.conf mounted at
# /etc/pip.conf; every file and folder that configuration names, such as a CA bundle, a constraints file, a
# find-links folder holding the torch wheel or a file:// index, mounted read-only at the same path). Those mounts
# exist only while the build's RUN steps run: none of it is in the image.
#   infra/container/build-image.sh [TAG]          # default arborl:latest
# Environment: BASE_IMAGE (default localhost/arborl-base:bookworm), CONTAINER_CLI (default podman),
# TORCH_INDEX_URL (default empty: torch as pip's configuration finds it), PIP (the pip whose configuration is
# used; default: .venv/bin/pip, else python3 -m pip), BUILD_ARGS (more `podman build` arguments).
# With a registry and docker, none of this is needed: `docker build -t arborl .`.
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG="${1:-arborl:latest}"
CLI="${CONTAINER_CLI:-podman}"
BASE="${BASE_IMAGE:-localhost/arborl-base:bookworm}"
die() { echo "build-image: $*" >&2; exit 1; }
command -v "$CLI" >/dev/null || die "$CLI is not installed (apt-get install -y podman buildah)"
"$CLI" image exists "$BASE" 2>/dev/null || die "no base image $BASE: run infra/container/make-base-image.sh"

if [[ -n "${PIP:-}" ]]; then read -r -a pip <<<"$PIP"
elif [[ -x .venv/bin/pip ]]; then pip=(.venv/bin/pip)
else pip=(python3 -m pip)
fi

WORK=$(mktemp -d /var/tmp/arborl-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# `pip config list` prints `global.key='value'`, `install.key='value'` and `:env:.key='value'` (PIP_* variables):
# one [global] section of them all, the variables last so they win as they do on the host.
"${pip[@]}" config list >"$WORK/config.list"
python3 - "$WORK/config.list" "$WORK/pip.conf" "$WORK/paths" <<'PY'
import configparser, os, sys

entries = []
for line in open(sys.argv[1]):
    key, _, value = line.rstrip("\n").partition("=")
    section, _, name = key.rpartition(".")
    value = value.strip("'\"")
    entries.append((section == ":env:", section, name, value))
conf = configparser.ConfigParser(interpolation=None)
conf["global"] = {}
paths = set()
for _, section, name, value in sorted(entries, key=lambda e: e[0]):
    target = "global" if section in (":env:", "global") else section
    conf.setdefault(target, {})
    conf[target][name] = value
    for word in value.split():
        path = word.removeprefix("file://")
        if path.startswith("/") and os.path.exists(path):
            paths.add(os.path.realpath(path))
            if os.path.isdir(path) and word.startswith("file://") and os.path.basename(path.rstrip("/")) == "simple":
                paths.add(os.path.dirname(os.path.realpath(path)))  # a file:// index links to files beside it
with open(sys.argv[2], "w") as f:
    conf.write(f)
# a folder already mounted covers the paths under it
kept = [p for p in sorted(paths) if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]
open(sys.argv[3], "w").write("".join(p + "\n" for p in kept))
PY

volumes=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
while read -r path; do volumes+=(-v "$path:$path:ro"); done <"$WORK/paths"
echo "build-image: $TAG from $BASE; pip configuration: $(tr '\n' ' ' <"$WORK/paths")"

extra=()
[[ -n "${BUILD_ARGS:-}" ]] && read -r -a extra <<<"$BUILD_ARGS"
started=$(date +%s)
"$CLI" build --isolation=chroot --network host --target pipeline -t "$TAG" \
  --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-}" \
  "${volumes[@]}" "${extra[@]}" .
# earlier builds that no tag names any more (each a few GB once the dependencies changed); the cached layers of
# this build stay
"$CLI" image prune -f --filter label=arborl.image=pipeline >/dev/null
echo "build-image: $TAG built in $(( $(date +%s) - started )) s, $("$CLI" image inspect --format '{{.Size}}' "$TAG") bytes"
