#!/usr/bin/env bash
# make deploy-check: build the image and run the compose deployment for real, on loopback ports only.
# Builds the base (when BASE is deploy/base-image.sh's and absent), the tiergate image and the Redis/HAProxy
# image; starts Redis, llama_cpp.server, two gateway replicas and HAProxy (deploy/compose.yaml); sends SDK
# requests through both replicas and the balancer; reloads the policy (PUT on one replica, then an edit of the
# mounted file) and waits for both replicas to report each new version; stops one replica with SIGTERM while a
# bounded load runs through the balancer and wants zero failed requests and exit code 0. Cleans up its containers.
#
#   BASE=python:3.11-slim deploy/check.sh     where an image registry is reachable
#   deploy/check.sh                           here: BASE=tiergate-base:bookworm, built by deploy/base-image.sh
#   KEEP=1 deploy/check.sh                    leave the deployment running afterwards
set -euo pipefail
cd "$(dirname "$0")"
DEPLOY=$PWD
ROOT=$(cd .. && pwd)
PY=${PY:-$ROOT/.venv/bin/python}   # the client side needs openai and httpx (make install)
BASE=${BASE:-tiergate-base:bookworm}
export TIERGATE_IMAGE=${TIERGATE_IMAGE:-tiergate:cpu}
export TIERGATE_INFRA_IMAGE=${TIERGATE_INFRA_IMAGE:-tiergate-infra:latest}
PROJECT=tiergate-check
GW1=http://127.0.0.1:18181 GW2=http://127.0.0.1:18182 LB=http://127.0.0.1:18180
WORK=$(mktemp -d /tmp/tiergate-check.XXXXXX)
say() { printf '\n== %s\n' "$*"; }

# --- docker: BuildKit is needed (build secrets, cache mounts). A CLI without buildx (Debian's docker.io 20.10
# is one) reaches the daemon's own BuildKit with DOCKER_BUILDKIT=1; a newer CLI without buildx cannot.
export DOCKER_BUILDKIT=1
if [ -z "${DOCKER:-}" ]; then
    DOCKER=docker
    if ! docker buildx version >/dev/null 2>&1; then
        for candidate in $(type -ap docker); do
            if "$candidate" version --format '{{.Client.Version}}' 2>/dev/null | grep -q '^20\.'; then
                DOCKER=$candidate; break
            fi
        done
    fi
fi
STARTED_DOCKERD=
if ! "$DOCKER" info >/dev/null 2>&1; then
    # No daemon: start one the way this kind of machine allows (no bridge, no iptables: host networking only).
    command -v dockerd >/dev/null || { echo "no docker daemon and no dockerd: apt-get install docker.io" >&2; exit 1; }
    dockerd --storage-driver=vfs --bridge=none --iptables=false >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
fi
if "$DOCKER" compose version >/dev/null 2>&1; then COMPOSE=("$DOCKER" compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
else echo "neither 'docker compose' nor docker-compose: apt-get install docker-compose" >&2; exit 1; fi
COMPOSE+=(-p "$PROJECT" -f "$DEPLOY/compose.yaml")
# Creating a container copies its whole image on the vfs driver: longer than compose v1's 60 s HTTP timeout, after
# which it retries and trips over the container it did create.
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-600} DOCKER_CLIENT_TIMEOUT=${DOCKER_CLIENT_TIMEOUT:-600}

HTTP_PID=
cleanup() {
    local rc=$?
    if [ -z "${KEEP:-}" ]; then
        "${COMPOSE[@]}" down --remove-orphans --timeout 50 >/dev/null 2>&1 || true
    fi
    [ -z "$HTTP_PID" ] || kill "$HTTP_PID" 2>/dev/null || true
    if [ -n "$STARTED_DOCKERD" ] && [ -z "${KEEP:-}" ]; then kill "$STARTED_DOCKERD"; wait "$STARTED_DOCKERD" || true; fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT

# --- pip inside the build: this host's pip settings (local indexes, find-links, a CA bundle), as build secrets.
# Local folders are served over loopback HTTP for the length of the build (the build runs with --network host).
PIP_SECRETS=()
"$PY" - "$WORK" >"$WORK/pip.env" <<'PYTHON'
"""Turn `pip config list` into a pip.conf for the build; file:// and plain paths become loopback HTTP URLs."""
import pathlib, re, socket, subprocess, sys
work = pathlib.Path(sys.argv[1])
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings: dict[str, str] = {}
for line in listed.splitlines():
    match = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line)
    if match:
        settings.setdefault(match[1], match[2])
served = work / "served"
served.mkdir()
links = 0
def reachable(location: str) -> str:
    global links
    path = location.removeprefix("file://")
    if not path.startswith("/"):
        return location
    folder = pathlib.Path(path)
    links += 1
    if folder.name == "simple":  # an index links its files relative to its parent (../../files/...)
        (served / str(links)).symlink_to(folder.parent)
        return f"http://127.0.0.1:{{port}}/{links}/simple/"
    (served / str(links)).symlink_to(folder)
    return f"http://127.0.0.1:{{port}}/{links}/"
conf = ["[global]"]
for name in ("index-url", "extra-index-url", "find-links"):
    if name in settings:
        conf.append(f"{name} = " + " ".join(reachable(location) for location in settings[name].split()))
if "cert" in settings:
    conf.append("cert = /run/secrets/pip_cert")
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
(work / "pip.conf").write_text("\n".join(conf).replace("{port}", str(port)) + "\n")
print(f"PIP_PORT={port} PIP_LINKS={links} PIP_CERT_FILE={settings.get('cert', '')}")
PYTHON
eval "$(cat "$WORK/pip.env")"
if [ "$PIP_LINKS" -gt 0 ]; then
    "$PY" -m http.server --bind 127.0.0.1 "$PIP_PORT" --directory "$WORK/served" >"$WORK/http.log" 2>&1 &
    HTTP_PID=$!
fi
PIP_SECRETS+=(--secret "id=pip.conf,src=$WORK/pip.conf")
[ -z "$PIP_CERT_FILE" ] || PIP_SECRETS+=(--secret "id=pip_cert,src=$PIP_CERT_FILE")

# --- build
if [[ $BASE == tiergate-base:* ]] && ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    say "base image $BASE (debootstrap)"
    "$DEPLOY/base-image.sh" "$BASE"
fi
say "image $TIERGATE_IMAGE (BASE=$BASE)"
start=$(date +%s)
"$DOCKER" build --network host -f "$DEPLOY/Dockerfile" --build-arg "BASE=$BASE" "${PIP_SECRETS[@]}" \
    -t "$TIERGATE_IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
build_s=$(( $(date +%s) - start ))
"$DOCKER" build --network host -f "$DEPLOY/compose/Dockerfile.infra" --build-arg "BASE=$BASE" \
    -t "$TIERGATE_INFRA_IMAGE" "$DEPLOY/compose" >"$WORK/build-infra.log" 2>&1 || { tail -40 "$WORK/build-infra.log"; exit 1; }
size() { "$DOCKER" image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}'; }
echo "tiergate image: $(size "$TIERGATE_IMAGE"), built in ${build_s} s (a rebuild with the same locks reuses the compiled llama.cpp)"
echo "infra image (redis, haproxy): $(size "$TIERGATE_INFRA_IMAGE")"

# --- run
say "compose up: redis :18379, llama_cpp.server :18081, gw1 :18181, gw2 :18182, haproxy :18180"
cp -r "$DEPLOY/compose/policy" "$WORK/policy"   # a copy: the reload step edits it
chmod -R a+rX "$WORK"
export TIERGATE_POLICY_DIR=$WORK/policy
TIERGATE_ADMIN_KEY=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
export TIERGATE_ADMIN_KEY
"${COMPOSE[@]}" down --remove-orphans --timeout 50 >/dev/null 2>&1 || true
for _ in $(seq 120); do   # vfs removes a container's full copy of its image: a previous run's may still be going
    [ -z "$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ] && break
    sleep 1
done
start=$(date +%s)
"${COMPOSE[@]}" up -d
for url in "$GW1" "$GW2" "$LB"; do
    until "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/readyz', timeout=2)" "$url" 2>/dev/null; do
        if [ $(( $(date +%s) - start )) -gt 300 ]; then
            "${COMPOSE[@]}" ps; "${COMPOSE[@]}" logs --tail 30; echo "$url/readyz not ready within 300 s" >&2; exit 1
        fi
        sleep 1
    done
done
echo "all ready after $(( $(date +%s) - start )) s"
"${COMPOSE[@]}" ps

traffic() { "$PY" "$DEPLOY/compose/traffic.py" "$1" --balancer "$LB" --replica "$GW1" --replica "$GW2" \
    --admin-key "$TIERGATE_ADMIN_KEY" "${@:2}"; }
say "SDK requests through each replica and the balancer (a key made on gw1)"
traffic requests
say "reload: PUT /admin/policy on gw1, then an edit of the mounted policy file"
traffic reload --policy-file "$WORK/policy/policy.yaml"
say "SIGTERM to gw1 while 4 clients (2 streaming) run through the balancer"
gw1=$("${COMPOSE[@]}" ps -q gw1)
traffic drain --stop "$DOCKER stop --time 45 $gw1"
echo "gw1 exit code: $("$DOCKER" inspect -f '{{.State.ExitCode}}' "$gw1")"
[ "$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$gw1")" = 0 ] || { "$DOCKER" logs --tail 30 "$gw1"; exit 1; }
"$DOCKER" logs "$gw1" 2>&1 | grep -iE 'drain|shutdown|signal' | tail -5 || true
say "deploy-check passed"
