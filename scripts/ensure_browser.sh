#!/usr/bin/env bash
# The browser the page tests drive (tests/e2e): Debian's Chromium, run by
# Playwright with executable_path. Playwright's own download (`playwright
# install`) is not used: it comes from a CDN that CI machines may not reach,
# while Debian's packages come from the distribution's mirror.
set -eu

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "ensure_browser: $CHROMIUM is missing; install Chromium (Debian: apt-get install" \
       "chromium) or set CHROMIUM to a Chromium or Chrome binary." >&2
  exit 1
fi
echo "ensure_browser: installing Debian's chromium for the page tests" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium >/dev/null \
  || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
test -x "$CHROMIUM"
