#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer on 127.0.0.1 before tests or benchmarks.
# Where one is installed but stopped, start it with the documented command
# (../shared/NOTES.md); where one is missing, say so and fail.
#
# Usage: ensure_services.sh [postgresql] [redis]; no argument checks both. The
# demo names only redis: its database is SQLite, and a machine without
# PostgreSQL must not stop it with a message about PostgreSQL.
set -u

want_pg=0 want_redis=0
[ $# -eq 0 ] && set -- postgresql redis
for service in "$@"; do
  case $service in
    postgresql) want_pg=1 ;;
    redis) want_redis=1 ;;
    *) echo "ensure_services: unknown service '$service' (postgresql, redis)" >&2; exit 2 ;;
  esac
done

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

wait_for() {  # wait_for NAME CHECK
  for _ in $(seq 1 30); do "$2" && return 0; sleep 1; done
  echo "ensure_services: $1 did not come up on 127.0.0.1 within 30 s" >&2
  return 1
}

status=0
if ((want_pg)) && ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "ensure_services: PostgreSQL is not answering; starting it" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    wait_for PostgreSQL pg_up || status=1
  else
    echo "ensure_services: PostgreSQL is not running on 127.0.0.1:5432 and is not installed" \
         "(apt-get install postgresql); the tests and benchmarks expect it there." >&2
    status=1
  fi
fi
if ((want_redis)) && ! redis_up; then
  if command -v redis-server >/dev/null; then
    echo "ensure_services: Redis is not answering; starting it" >&2
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for Redis redis_up || status=1
  else
    echo "ensure_services: Redis is not running on 127.0.0.1:6379 and is not installed" \
         "(apt-get install redis-server)." >&2
    status=1
  fi
fi
exit $status
