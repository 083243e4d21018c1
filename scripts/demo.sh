#!/usr/bin/env bash
# `make demo`: migrate a local SQLite database, seed demo data, and start the
# CPU Triton server, a Celery worker and beat, and the web app. Everything it
# starts stops on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
export DJANGO_SETTINGS_MODULE=gymbilling.settings.local
export PATH="$PWD/.venv/bin:$PATH"
PORT="${PORT:-8000}"
TRITON_HTTP=8001 TRITON_GRPC=8002 TRITON_METRICS=8003
mkdir -p var/log

scripts/ensure_services.sh || {
  echo "make demo needs Redis on 127.0.0.1:6379 (the Celery broker and the rate limiter)." >&2
  exit 1
}

python manage.py migrate --noinput
python manage.py demo_seed --triton-grpc "127.0.0.1:${TRITON_GRPC}" --key-file var/demo-key
KEY=$(cat var/demo-key)

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "Stopping the demo..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

python manage.py triton_dev --http-port $TRITON_HTTP --grpc-port $TRITON_GRPC \
  --metrics-port $TRITON_METRICS > var/log/triton.log 2>&1 &
pids+=($!)
celery -A gymbilling worker -l INFO --concurrency 2 \
  -Q celery,inference.priority,inference.standard,inference.batch > var/log/worker.log 2>&1 &
pids+=($!)
celery -A gymbilling beat -l INFO -s var/celerybeat-schedule > var/log/beat.log 2>&1 &
pids+=($!)
python manage.py runserver "127.0.0.1:${PORT}" --noreload > var/log/web.log 2>&1 &
pids+=($!)

for _ in $(seq 1 60); do
  curl -fsS "http://127.0.0.1:${PORT}/healthz" >/dev/null 2>&1 \
    && curl -fsS "http://127.0.0.1:${TRITON_HTTP}/v2/health/ready" >/dev/null 2>&1 && break
  sleep 1
done

cat <<MSG

GymBilling demo is running (logs in var/log/).

  Home             http://127.0.0.1:${PORT}/
  Finance admin    http://127.0.0.1:${PORT}/admin/   (admin@gym.local / gym-demo-admin)
  API docs         http://127.0.0.1:${PORT}/api/docs/

  Your demo API key (organization demo-gym): ${KEY}

  curl http://127.0.0.1:${PORT}/v1/chat/completions \\
    -H "Authorization: Bearer ${KEY}" -H "Content-Type: application/json" \\
    -d '{"model": "gym-tiny", "messages": [{"role": "user", "content": "How do I train?"}], "max_tokens": 16}'

  curl http://127.0.0.1:${PORT}/api/v1/credits/balance -H "Authorization: Bearer ${KEY}"

  python - <<PY
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:${PORT}/v1", api_key="${KEY}")
reply = client.chat.completions.create(model="gym-tiny", max_tokens=16,
    messages=[{"role": "user", "content": "How do I train?"}])
print(reply.choices[0].message.content, reply.usage)
PY

Press Ctrl-C to stop.
MSG
wait
