#!/usr/bin/env bash
# Start a real vLLM (CPU) OpenAI-compatible server for the tiny model, in the background.
#
# Usage: start.sh MODEL_DIR            (or env VLLM_MODEL_DIR)
# Env:   VLLM_VENV (default ~/.cache/tokentrail/vllm-venv)   PORT (default 8001)   HOST (default 127.0.0.1)
#        VLLM_PIDFILE (default /tmp/vllm-tiny-$PORT.pid)   VLLM_LOG (default /tmp/vllm-tiny-$PORT.log)
#        VLLM_START_TIMEOUT seconds (default 300)   VLLM_CPU_KVCACHE_SPACE GiB (default 1)
#        VLLM_EXTRA_ARGS (extra `vllm serve` flags, word-split)
# Prints the PID and the base URL (http://HOST:PORT/v1) once GET /health returns 200.
set -euo pipefail

MODEL_DIR="${1:-${VLLM_MODEL_DIR:-}}"
[ -n "$MODEL_DIR" ] && [ -f "$MODEL_DIR/config.json" ] || { echo "usage: $0 MODEL_DIR (dir with config.json)" >&2; exit 2; }
MODEL_DIR="$(cd "$MODEL_DIR" && pwd)"
VENV="${VLLM_VENV:-$HOME/.cache/tokentrail/vllm-venv}"
PORT="${PORT:-8001}"
HOST="${HOST:-127.0.0.1}"
PIDFILE="${VLLM_PIDFILE:-/tmp/vllm-tiny-$PORT.pid}"
LOG="${VLLM_LOG:-/tmp/vllm-tiny-$PORT.log}"
TIMEOUT="${VLLM_START_TIMEOUT:-300}"
[ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/vllm" ] || { echo "no vllm in $VENV (run install.sh first)" >&2; exit 2; }

if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "already running: PID $(cat "$PIDFILE") (pidfile $PIDFILE)" >&2; exit 1
fi

# Offline: never touch the Hugging Face hub; no usage stats.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"   # GiB of KV cache (CPU backend)
export VLLM_TARGET_DEVICE=cpu

# NB: the `vllm` CLI dies with PackageNotFoundError (it asks importlib.metadata for "vllm", but the
# distribution is "vllm-cpu"), so use the module entry point instead.
# setsid: own session, so the server survives the calling shell; the PID we record is vLLM's API server.
# shellcheck disable=SC2086
setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
  --served-model-name tiny \
  --host "$HOST" --port "$PORT" \
  --dtype bfloat16 \
  --max-model-len 2048 \
  --seed 0 \
  --enable-auto-tool-choice --tool-call-parser hermes \
  ${VLLM_EXTRA_ARGS:-} \
  >"$LOG" 2>&1 </dev/null &
PID=$!
echo "$PID" >"$PIDFILE"

t0=$(date +%s)
until "$VENV/bin/python" -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://$HOST:$PORT/health', timeout=2).status == 200 else 1)" 2>/dev/null; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "vLLM exited during startup; last log lines ($LOG):" >&2; tail -n 40 "$LOG" >&2; rm -f "$PIDFILE"; exit 1
  fi
  if [ $(( $(date +%s) - t0 )) -ge "$TIMEOUT" ]; then
    echo "vLLM not healthy after ${TIMEOUT}s (PID $PID still running; log $LOG); stop it with stop.sh" >&2; exit 1
  fi
  sleep 1
done
echo "PID=$PID"
echo "BASE_URL=http://$HOST:$PORT/v1"
echo "healthy after $(( $(date +%s) - t0 ))s; log: $LOG; pidfile: $PIDFILE" >&2
