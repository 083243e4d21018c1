#!/usr/bin/env bash
# `make demo`: migrate a local SQLite database, seed demo data, start the app.
# Everything it starts stops on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
export DJANGO_SETTINGS_MODULE=gymbilling.settings.local
PORT="${PORT:-8000}"
BIN=.venv/bin
mkdir -p var

$BIN/python manage.py migrate --noinput
$BIN/python manage.py demo_seed

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "Stopping the demo..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

$BIN/python manage.py runserver "127.0.0.1:${PORT}" --noreload &
pids+=($!)

for _ in $(seq 1 30); do
  curl -fsS "http://127.0.0.1:${PORT}/healthz" >/dev/null 2>&1 && break
  sleep 1
done

cat <<MSG

GymBilling demo is running.

  Home             http://127.0.0.1:${PORT}/
  Finance admin    http://127.0.0.1:${PORT}/admin/   (admin@gym.local / gym-demo-admin)
  API docs         http://127.0.0.1:${PORT}/api/docs/

  Health check:    curl http://127.0.0.1:${PORT}/healthz
  Check the ledger: .venv/bin/python manage.py ledger_reconcile

Press Ctrl-C to stop.
MSG
wait
