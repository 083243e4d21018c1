#!/usr/bin/env bash
# The browser the page tests drive (tests/e2e): Debian's Chromium, run by
# Playwright with executable_path. Playwright's own download (`playwright
# install`) is not used: it comes from a CDN that CI machines may not reach,
# while Debian's packages come from the distribution's mirror.
set -eu
. "$(dirname "$0")/debian_program.sh"
ensure_debian_program ensure_browser "${CHROMIUM:-/usr/bin/chromium}" chromium CHROMIUM \
  "the page tests"
