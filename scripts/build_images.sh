#!/usr/bin/env bash
# Builds the platform's images (moai/base, moai/master, moai/backnode) on a machine that reaches
# no container registry: the OS base is bootstrapped from the Debian mirror apt already uses and
# imported once; Python packages come from a wheelhouse downloaded on the host (torch pinned) and
# are installed inside the images with --no-index. A machine that can pull may instead set
# BASE_IMAGE=python:3.11-slim (the OS bootstrap is then skipped).
#
# Every step is cached: the OS base by its recipe tag, the wheelhouse by its requirement list, the
# dependency images by their base and requirement lists, the image layers by docker. Only the
# platform's own wheel changes when the code changes, and it is the last layer of each image, so a
# rebuild after a code change takes seconds.
#
# Environment knobs: BASE_IMAGE, IMAGE_PREFIX (default "moai"), MOAI_IMAGE_CACHE (default
# ~/.cache/moai-images), TORCH_SPEC (default torch==2.13.0), PYTHON (host python, default python3).
set -euo pipefail
# A failing command inside $(...) stops the build instead of yielding a half-made tag.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
IMAGE_PREFIX=${IMAGE_PREFIX:-moai}
CACHE=${MOAI_IMAGE_CACHE:-$HOME/.cache/moai-images}
# Packages the OS base needs: the interpreter and venv (which brings pip's own wheel). The tag
# names the recipe, so changing this list (bump OS_RECIPE) rebuilds the base once.
OS_PACKAGES=python3,python3-venv
OS_RECIPE=v1
export DOCKER_BUILDKIT=0  # the classic builder ships with the engine; no buildx plugin needed

log() { printf '\n== %s\n' "$*"; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }
build_start=$(date +%s)
mkdir -p "$CACHE"

docker info >/dev/null 2>&1 || { echo "docker engine not reachable (is dockerd running?)" >&2; exit 1; }

# --- 1. OS base: debootstrap minbase + docker import, once per suite and recipe -----------------
bootstrap_os_base() {
    local suite mirror tag root
    read -r suite mirror < <("$PYTHON" scripts/debian_source.py)
    tag="$IMAGE_PREFIX/os:$suite-$OS_RECIPE"
    if docker image inspect "$tag" >/dev/null 2>&1; then
        echo "$tag" ; return
    fi
    local t0; t0=$(date +%s)
    root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    echo "bootstrapping Debian $suite into $root" >&2
    debootstrap --variant=minbase --include="$OS_PACKAGES" "$suite" "$root" "$mirror" >&2
    # Lean base: no package lists, no downloaded .debs, no docs or man pages, no mirror address.
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/etc/apt/sources.list "$root"/debootstrap
    tar -C "$root" --numeric-owner -c . | docker import \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$tag" >&2
    rm -rf "$root"
    echo "OS base $tag built in $(elapsed "$t0")" >&2
    echo "$tag"
}

# --- 2. Wheelhouse on the host: control-plane deps and torch apart, so the master's image carries
#        no torch ------------------------------------------------------------------------------------
project_requirements() {
    "$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"]))'
}

fill_wheelhouse() {  # DIR REQUIREMENTS_FILE PYTHON_VERSION: pip download only when the list changed
    local dir=$1 reqs=$2 pyver=$3
    if [ -f "$dir/requirements.txt" ] && cmp -s "$reqs" "$dir/requirements.txt"; then return; fi
    rm -rf "$dir" && mkdir -p "$dir"
    # (grep drops pip's notes about find-links directories of this host's pip config that do not exist)
    "$PYTHON" -m pip download -q --only-binary=:all: --python-version "$pyver" -d "$dir" -r "$reqs" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    cp "$reqs" "$dir/requirements.txt"
}

# --- 3. Dependency images: /opt/moai installed in a container from the bind-mounted wheelhouse and
#        committed, once per base image and requirement list. A Dockerfile stage would put the
#        wheels in a layer, install, and copy the venv once more into the final image: torch
#        written three times on a cold build; here it is written once, and no .whl enters an image.
deps_image() {  # NAME FROM_IMAGE WHEEL_SET...: prints the tag of FROM_IMAGE plus those wheel sets
    local name=$1 from=$2; shift 2
    local set key tag container args=()
    key=$({ docker image inspect -f '{{.Id}}' "$from"
            for set in "$@"; do cat "$CACHE/wheels/$set/requirements.txt"; done; } | sha256sum | cut -c1-12)
    tag="$IMAGE_PREFIX/deps-$name:$key"
    if docker image inspect "$tag" >/dev/null 2>&1; then
        echo "$tag"; return
    fi
    local t0; t0=$(date +%s)
    for set in "$@"; do args+=(--find-links "/wheels/$set" -r "/wheels/$set/requirements.txt"); done
    container="moai-deps-$name-$$"
    # /tmp and /root/.cache are emptied in the same container: the commit keeps no pip leftovers.
    if ! docker run --name "$container" --network none -v "$CACHE/wheels:/wheels:ro" "$from" sh -ec '
            [ -x /opt/moai/bin/pip ] || python3 -m venv /opt/moai
            /opt/moai/bin/pip install -q --no-index --no-cache-dir --disable-pip-version-check "$@"
            rm -rf /tmp/* /root/.cache' pip-install "${args[@]}" >&2 \
       || ! docker commit -c 'CMD ["/bin/bash"]' "$container" "$tag" >/dev/null; then
        docker rm -f "$container" >/dev/null
        return 1
    fi
    docker rm "$container" >/dev/null
    # Earlier recipes' tags go (untagging only: an image still built on one keeps its layers).
    docker image ls --format '{{.Repository}}:{{.Tag}}' "$IMAGE_PREFIX/deps-$name" \
        | { grep -vxF "$tag" || true; } | xargs -r docker rmi >/dev/null
    echo "dependency image $tag built in $(elapsed "$t0")" >&2
    echo "$tag"
}

# --- 4. Build contexts: small directories of hard links, so docker sends only what is needed ----
stage_context() {  # NAME SOURCES...: a fresh context dir holding the given files/dirs
    local ctx="$CACHE/context/$1"; shift
    rm -rf "$ctx" && mkdir -p "$ctx"
    local src
    for src in "$@"; do cp -al "$src" "$ctx/" 2>/dev/null || cp -a "$src" "$ctx/"; done
    echo "$ctx"
}

main() {
    local base="${BASE_IMAGE:-}"
    [ -n "$base" ] || base=$(bootstrap_os_base)
    log "OS base: $base"

    log "wheelhouse"
    local t0; t0=$(date +%s)
    local reqs="$CACHE/requirements" pyver; mkdir -p "$reqs"
    # Wheels for the images' interpreter, which need not be the host's; the version heads each
    # list (as a comment pip ignores) so that a new interpreter refills the wheelhouse.
    pyver=$(docker run --rm "$base" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    { echo "# python $pyver"; project_requirements; } >"$reqs/control.txt"
    { echo "# python $pyver"; echo "$TORCH_SPEC"; } >"$reqs/torch.txt"
    fill_wheelhouse "$CACHE/wheels/control" "$reqs/control.txt" "$pyver"
    fill_wheelhouse "$CACHE/wheels/torch" "$reqs/torch.txt" "$pyver"
    echo "wheelhouse ready in $(elapsed "$t0")"

    log "platform wheel"
    rm -rf "$CACHE/dist" && mkdir -p "$CACHE/dist"
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$CACHE/dist" . >/dev/null

    log "dependency images"
    local control_deps front_deps
    control_deps=$(deps_image control "$base" control)
    # The front's on top of the master's: both images share the control-plane layer.
    front_deps=$(deps_image front "$control_deps" torch)
    echo "$control_deps, $front_deps"

    local front_ctx control_ctx
    front_ctx=$(stage_context front "$CACHE/dist" images/healthcheck.py)
    control_ctx=$(stage_context control "$CACHE/dist" images/healthcheck.py daemons/supervisord)

    build() {  # IMAGE CONTEXT [build args...]
        local image=$1 ctx=$2; shift 2
        local t; t=$(date +%s)
        log "image $IMAGE_PREFIX/$image"
        docker build -q --force-rm -f "images/$image/Dockerfile" -t "$IMAGE_PREFIX/$image:latest" "$@" "$ctx"
        echo "$IMAGE_PREFIX/$image built in $(elapsed "$t")"
    }
    build master "$control_ctx" --build-arg DEPS_IMAGE="$control_deps"
    build base "$front_ctx" --build-arg DEPS_IMAGE="$front_deps"
    build backnode "$control_ctx" --build-arg FRONT_IMAGE="$IMAGE_PREFIX/base:latest"

    log "images (total build time $(elapsed "$build_start"))"
    docker image ls --format 'table {{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E "^($IMAGE_PREFIX/|REPOSITORY)"
}

main "$@"
