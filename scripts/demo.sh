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
STRIPE_STANDIN_PORT="${STRIPE_STANDIN_PORT:-8420}"
mkdir -p var/log

# Billing runs against the local Stripe stand-in unless a real key is given.
if [ -z "${STRIPE_SECRET_KEY:-}" ]; then
  export STRIPE_SECRET_KEY=sk_test_gymbilling_demo
  export STRIPE_WEBHOOK_SECRET=whsec_gymbilling_demo
  export STRIPE_API_BASE="http://127.0.0.1:${STRIPE_STANDIN_PORT}"
  STANDIN=1
fi

# Redis only: the demo's database is SQLite (settings.local, unless DATABASE_URL
# is set), so PostgreSQL is no requirement of it.
scripts/ensure_services.sh redis || {
  echo "make demo needs Redis on 127.0.0.1:6379 (the Celery broker, the rate limiter and" \
       "the token relay); its database is SQLite (var/demo.sqlite3), so PostgreSQL is not needed." >&2
  exit 1
}

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "Stopping the demo..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

if [ -n "${STANDIN:-}" ]; then
  python -m gymbilling.stripe_standin --host 127.0.0.1 --port "$STRIPE_STANDIN_PORT" \
    --data-dir var/stripe-standin \
    --webhook-url "http://127.0.0.1:${PORT}/stripe/webhook/" --webhook-secret "$STRIPE_WEBHOOK_SECRET" \
    > var/log/stripe-standin.log 2>&1 &
  pids+=($!)
  for _ in $(seq 1 50); do
    curl -fsS "${STRIPE_API_BASE}/_config/health" >/dev/null 2>&1 && break
    sleep 0.2
  done
fi

python manage.py migrate --noinput
python manage.py demo_seed --triton-grpc "127.0.0.1:${TRITON_GRPC}" \
  --triton-metrics "http://127.0.0.1:${TRITON_METRICS}/metrics" --key-file var/demo-key
python manage.py stripe_sync_catalog
KEY=$(cat var/demo-key)

python manage.py triton_dev --http-port $TRITON_HTTP --grpc-port $TRITON_GRPC \
  --metrics-port $TRITON_METRICS > var/log/triton.log 2>&1 &
pids+=($!)
# One worker on every queue, taking them in this order (the broker's
# queue_order_strategy, settings): the sweeps, billing and email first (few
# and short), callbacks of jobs already run, then inference by priority.
celery -A gymbilling worker -l INFO --concurrency 2 \
  -Q celery,email,callbacks,inference.priority,inference.standard,inference.batch \
  > var/log/worker.log 2>&1 &
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

GymBilling demo is running (logs in var/log/; the emails it sends, such as sign-up
links, are printed in var/log/worker.log).

  Home             http://127.0.0.1:${PORT}/
  Dashboard        http://127.0.0.1:${PORT}/dashboard/   (member@gym.local / gym-demo-member)
  Finance admin    http://127.0.0.1:${PORT}/admin/   (admin@gym.local / gym-demo-admin)
  API docs         http://127.0.0.1:${PORT}/api/docs/

  Your demo API key (organization demo-gym): ${KEY}

  curl http://127.0.0.1:${PORT}/v1/chat/completions \\
    -H "Authorization: Bearer ${KEY}" -H "Content-Type: application/json" \\
    -d '{"model": "gym-tiny", "messages": [{"role": "user", "content": "How do I train?"}], "max_tokens": 16}'

  curl http://127.0.0.1:${PORT}/api/v1/credits/balance -H "Authorization: Bearer ${KEY}"

  # Subscribe to Pro: open the returned url and pay with card 4242 4242 4242 4242
  # (Stripe: ${STRIPE_API_BASE:-https://api.stripe.com}); the webhook grants the credits.
  curl http://127.0.0.1:${PORT}/api/v1/billing/checkout -H "Authorization: Bearer ${KEY}" \
    -H "Content-Type: application/json" -d '{"plan": "pro"}'

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
