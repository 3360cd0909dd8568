#!/usr/bin/env bash
# CI step for the container tests on a fresh Debian 12 machine, as root, without a container registry: installs
# podman, buildah, debootstrap and runc, makes the local base image (make-base-image.sh; reused on a machine that
# already has it with the same inputs), builds the pipeline image (build-image.sh; podman reuses the layers whose
# content is unchanged) and runs `pytest -m container` (tests/flows/test_containers.py): the micro flow's stages
# in podman containers, with results equal to an in-process run. Prints the seconds of each step.
#   infra/container/ci.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export CI="${CI:-true}"  # a missing podman fails the container tests instead of skipping them
export PIP_NO_CACHE_DIR=1
IMAGE="${ARBORL_TEST_IMAGE:-localhost/arborl:latest}"
export ARBORL_TEST_IMAGE="$IMAGE"

started=$(date +%s)
step_started=$started
step() {  # the seconds of the step just done
  local now; now=$(date +%s)
  echo "ci.sh: $1 took $((now - step_started)) s"
  step_started=$now
}

missing=()  # Debian packages: the container tools, and what `make install` needs on a bare machine
for package in podman buildah debootstrap runc make g++ python3-venv; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  apt-get update && apt-get install -y "${missing[@]}"
fi
step "installing ${missing[*]:-nothing}"

make install  # .venv: the flow runs in-process and launches the stage containers
step ".venv"
infra/container/make-base-image.sh
step "base image"
infra/container/build-image.sh "$IMAGE"
step "pipeline image"
.venv/bin/pytest -q -m container -s -p no:cacheprovider
step "container tests"
echo "ci.sh: total $(( $(date +%s) - started )) s"
