#!/usr/bin/env bash
# Prove the container path end to end, as a user runs it:
#   1. a Docker engine and a local Debian base image (deploy/docker/make-base-image.sh; no registry is
#      reachable here, so the local base is tagged as the image the Dockerfile names);
#   2. build the image, `docker compose up` with deploy/docker-compose.ci.yml swapping vLLM for the
#      project's fake vLLM, wait until both services are healthy;
#   3. calls through the published port, rows checked with `tokentrail sql` inside the container;
#   4. restart the stack and check that the data survived; take it down.
# Runnable by hand. It stops only what it started: its compose project, and dockerd if it started it.
# Prints the image size and the time from `up` to healthy.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-/tmp/dk}"
export WORK COMPOSE_V2=1
BASE_TAG="debian:bookworm-slim"

started_dockerd=0
if ! docker info >/dev/null 2>&1; then started_dockerd=1; fi
bash deploy/docker/make-base-image.sh >/tmp/tokentrail-make-base-image.log 2>&1 \
  || { tail -n 30 /tmp/tokentrail-make-base-image.log; exit 1; }
docker image inspect "$BASE_TAG" >/dev/null 2>&1 || docker tag local/debian:slim "$BASE_TAG"

PROJECT="tokentrail-check-$$"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export TOKENTRAIL_PORT="$PORT"
compose() { docker compose -p "$PROJECT" -f docker-compose.yml -f deploy/docker-compose.ci.yml "$@"; }
cleanup() {
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  if [ "$started_dockerd" = 1 ]; then WORK="$WORK" bash deploy/docker/stop-dockerd.sh >/dev/null || true; fi
}
trap cleanup EXIT

echo "compose-check: building the image"
t0=$(date +%s)
compose build tokentrail >/tmp/tokentrail-compose-build.log 2>&1 || { tail -n 40 /tmp/tokentrail-compose-build.log; exit 1; }
compose build vllm >>/tmp/tokentrail-compose-build.log 2>&1 || { tail -n 40 /tmp/tokentrail-compose-build.log; exit 1; }
echo "compose-check: built in $(( $(date +%s) - t0 )) s; image size $(docker image inspect tokentrail:local --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"

t0=$(date +%s.%N)
compose up -d --wait --wait-timeout 180
echo "compose-check: up to healthy in $(python3 -c "import time; print(round(time.time() - $t0, 1))") s on port $PORT"

call() {
  curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
    -H 'X-Trajectory-Id: compose-check' -H 'X-Trajectory-Tags: stage=ci' \
    -d '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":4'"$1"'}' >/dev/null
}
call ''
call ',"stream":true,"stream_options":{"include_usage":true}'

rows() {
  compose exec -T tokentrail tokentrail sql --csv \
    "SELECT count(*) AS calls, sum(completion_tokens) AS tokens FROM llm_calls WHERE trajectory_id = 'compose-check' AND integrity = 'ok'" \
    | tail -n 1
}
for _ in $(seq 1 50); do [ "$(rows)" = "2,8" ] && break; sleep 0.2; done
[ "$(rows)" = "2,8" ] || { echo "compose-check: expected 2 recorded calls with 8 tokens, got $(rows)"; compose logs tokentrail | tail -n 30; exit 1; }
echo "compose-check: 2 calls recorded with their token IDs"

compose down
compose up -d --wait --wait-timeout 180
[ "$(rows)" = "2,8" ] || { echo "compose-check: data did not survive a restart: $(rows)"; exit 1; }
echo "compose-check: data survived a restart; ok"
