#!/usr/bin/env bash
# The connection pooler a lock test runs through (tests/gymbilling/test_locks.py):
# Debian's PgBouncer. The test starts its own, in transaction mode on a port of its
# own; a service the package may start (port 6432, no database) is not used.
#
# The binary is the one the test runs, looked for in the test's order: PGBOUNCER, else
# `pgbouncer` on PATH, else Debian's /usr/sbin/pgbouncer (installed when missing).
set -eu
. "$(dirname "$0")/debian_program.sh"
ensure_debian_program ensure_pgbouncer \
  "${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}" pgbouncer PGBOUNCER \
  "the lock tests"
