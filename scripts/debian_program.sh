# Sourced by the scripts that make sure a program the tests run is there (a browser, a
# connection pooler): Debian's package, installed with apt-get where this shell may
# (root, on Debian), from the distribution's mirror, which CI machines reach.
#
# ensure_debian_program SCRIPT BINARY PACKAGE VARIABLE PURPOSE: nothing to do when
# BINARY is there; else install PACKAGE, or say how to get it (or which VARIABLE names
# another binary) and fail.
ensure_debian_program() {
  local script=$1 binary=$2 package=$3 variable=$4 purpose=$5
  if [ -x "$binary" ]; then
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "$script: $binary is missing; install it (Debian: apt-get install $package)" \
         "or set $variable to another binary." >&2
    return 1
  fi
  echo "$script: installing Debian's $package for $purpose" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$package" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q "$package" >/dev/null; }
  test -x "$binary"
}
