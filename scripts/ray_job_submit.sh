#!/usr/bin/env bash
# Run a sweep as a Ray job on a local, loopback-only Ray head, then stop that head.
#
#   scripts/ray_job_submit.sh [SPEC]        SPEC defaults to scripts/job_spec.yaml
#
# What it does:
#   1. starts a head with the venv's `ray start --head --block` on 127.0.0.1 (free ports, 2 CPUs,
#      dashboard on), so that the raylet, and therefore the job's driver, run the venv's python;
#   2. `ray job submit --working-dir .` of `python -m orchestrator tune SPEC --store STORE`,
#      streaming the job's output here;
#   3. on exit (trap), stops exactly the head it started.
#
# Environment:
#   AITUNE_JOB_STORE   store directory (default /tmp/aitune-job-store)
#   AITUNE_VENV        virtual environment with ray[default] and the project's deps (default .venv)
#   RAY_AUTH_MODE      "token" (default, what `ray start --head` uses) or "disabled"; the same value
#                      is used for start and submit, as it must be
#   AITUNE_JOB_ARGS    extra arguments for `python -m orchestrator tune` (e.g. "--force")
#   AITUNE_JOBS        how many jobs of the same sweep to submit at once, sharing the store
#                      (default 1); with more than one, each job's output is prefixed "[job N]"
#
# Why not `ray stop`: it signals every Ray process on the machine by name, including other
# users' clusters and test runs. `ray start --block` instead stays in the foreground, and on
# SIGTERM it shuts down only the processes it started (GCS, raylet, dashboard, workers).
# The head gets its own --temp-dir, so /tmp/ray/ray_current_cluster is not touched either.
#
# Exit status: the job's (0 when it SUCCEEDED), or 1 when the head could not start.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SPEC="${1:-scripts/job_spec.yaml}"
VENV="${AITUNE_VENV:-$ROOT/.venv}"
RAY="$VENV/bin/ray"
PY="$VENV/bin/python"
STORE="${AITUNE_JOB_STORE:-/tmp/aitune-job-store}"

if [[ ! -x "$RAY" ]]; then
  echo "error: $RAY not found: install ray[default] in $VENV (or set AITUNE_VENV)" >&2
  exit 1
fi
if [[ ! -f "$SPEC" ]]; then
  echo "error: spec $SPEC not found" >&2
  exit 1
fi

export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# Keep every Ray server on 127.0.0.1: on Linux Ray otherwise swaps a loopback node address for
# the machine's outward one (see cluster/connect.py). Inherited by the job's driver too.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Jobs inherit the raylet's environment: with the venv first on PATH, the entrypoint's `python`
# is the venv's python.
export PATH="$VENV/bin:$PATH"

TMP="$(mktemp -d /tmp/aitune-rayjob-XXXXXX)"  # short: Ray's socket paths must stay under 107 chars
HEAD_PID=""

stop_head() {
  local rc=$?
  if [[ -n "$HEAD_PID" ]] && kill -0 "$HEAD_PID" 2>/dev/null; then
    echo "== stopping the Ray head (pid $HEAD_PID)"
    kill -TERM "$HEAD_PID" 2>/dev/null
    for _ in $(seq 1 60); do
      kill -0 "$HEAD_PID" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$HEAD_PID" 2>/dev/null; then
      echo "== the head did not stop within 30 s; killing pid $HEAD_PID" >&2
      kill -KILL "$HEAD_PID" 2>/dev/null
    fi
    wait "$HEAD_PID" 2>/dev/null
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap stop_head EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Free loopback ports for every server the head opens (no defaults that a second Ray on this
# machine may hold already).
read -r GCS_PORT DASH_PORT CLIENT_PORT AGENT_PORT AGENT_GRPC_PORT METRICS_PORT RTENV_PORT < <("$PY" - <<'EOF'
import socket
socks = []
for _ in range(7):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
DASHBOARD="http://127.0.0.1:$DASH_PORT"

echo "== starting a Ray head on 127.0.0.1:$GCS_PORT (dashboard $DASHBOARD, RAY_AUTH_MODE=$RAY_AUTH_MODE)"
"$RAY" start --head --block \
  --node-ip-address=127.0.0.1 --port="$GCS_PORT" --num-cpus=2 \
  --object-store-memory=$((200 * 1024 * 1024)) \
  --disable-usage-stats \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
  --ray-client-server-port="$CLIENT_PORT" \
  --dashboard-agent-listen-port="$AGENT_PORT" --dashboard-agent-grpc-port="$AGENT_GRPC_PORT" \
  --metrics-export-port="$METRICS_PORT" --runtime-env-agent-port="$RTENV_PORT" \
  --temp-dir="$TMP" >"$TMP/ray-start.log" 2>&1 &
HEAD_PID=$!

# Ready when the jobs API answers (the dashboard starts last). With token auth a bare HTTP
# probe gets 401, so ask through the CLI, which sends the token.
ready=""
for _ in $(seq 1 120); do
  if ! kill -0 "$HEAD_PID" 2>/dev/null; then
    break
  fi
  if "$RAY" job list --address "$DASHBOARD" >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.5
done
if [[ -z "$ready" ]]; then
  echo "error: the Ray head did not come up; its log:" >&2
  cat "$TMP/ray-start.log" >&2
  exit 1
fi
echo "== head up (pid $HEAD_PID)"

# Ray also skips what .gitignore lists; the excludes make the upload's limits explicit. Top-level
# folders are anchored with "/": a bare "store" would also drop orchestrator/store/ from the upload.
RUNTIME_ENV='{"excludes": ["/.venv", "/venv", ".git", "/runs", "/store", "/.whl", ".pytest_cache", "**/__pycache__", "*.egg-info"]}'
JOBS="${AITUNE_JOBS:-1}"

job_succeeded() {
  # `ray job submit` exits 1 when the job FAILED but 0 when it was STOPPED: ask for the status.
  # (Captured first: `grep -q` in a pipe would close it early, and with pipefail the SIGPIPE
  # that `ray` then gets would read as a failure.)
  local status_out
  status_out="$("$RAY" job status --address "$DASHBOARD" "$1" 2>&1)"
  grep -q "Job '$1' succeeded" <<<"$status_out"
}

if [[ "$JOBS" -le 1 ]]; then
  SUBMISSION_ID="aitune-$(date +%s)-$$"
  echo "== ray job submit $SUBMISSION_ID: python -m orchestrator tune $SPEC --store $STORE ${AITUNE_JOB_ARGS:-}"
  # shellcheck disable=SC2086  # AITUNE_JOB_ARGS is split on purpose
  "$RAY" job submit --address "$DASHBOARD" --submission-id "$SUBMISSION_ID" \
    --working-dir . --runtime-env-json "$RUNTIME_ENV" \
    -- python -m orchestrator tune "$SPEC" --store "$STORE" ${AITUNE_JOB_ARGS:-}
  submit_rc=$?
  if job_succeeded "$SUBMISSION_ID"; then status=SUCCEEDED; else status="not SUCCEEDED"; fi
  echo "== job $SUBMISSION_ID: $status (ray job submit exited $submit_rc)"
  if [[ $submit_rc -eq 0 && "$status" == SUCCEEDED ]]; then
    exit 0
  fi
  exit $(( submit_rc == 0 ? 1 : submit_rc ))
fi

# Several jobs of one sweep on one store, at once: they claim keys in the store and share the work.
IDS=()
for n in $(seq 1 "$JOBS"); do
  id="aitune-$(date +%s)-$$-$n"
  IDS+=("$id")
  echo "== ray job submit --no-wait $id: python -m orchestrator tune $SPEC --store $STORE ${AITUNE_JOB_ARGS:-}"
  # shellcheck disable=SC2086
  "$RAY" job submit --no-wait --address "$DASHBOARD" --submission-id "$id" \
    --working-dir . --runtime-env-json "$RUNTIME_ENV" \
    -- python -m orchestrator tune "$SPEC" --store "$STORE" ${AITUNE_JOB_ARGS:-} >/dev/null || exit 1
done
rc=0
n=0
for id in "${IDS[@]}"; do
  n=$((n + 1))
  "$RAY" job logs --follow --address "$DASHBOARD" "$id" 2>&1 | sed "s/^/[job $n] /"
  if job_succeeded "$id"; then
    echo "== job $id: SUCCEEDED"
  else
    echo "== job $id: not SUCCEEDED"
    rc=1
  fi
done
exit $rc
