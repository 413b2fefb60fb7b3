#!/usr/bin/env bash
# Makes sure the servers the tests start are installed (the tests start and stop their own
# instances on free ports; this script starts nothing). Installs them from the system's
# packages when it may (root with apt-get); otherwise prints the one command to run and fails,
# so a missing server never shows up later as skipped tests or a coverage failure.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} from the system's packages (needed by the tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
    echo "make test needs ${missing[*]}: run  sudo apt-get install ${missing[*]}" >&2
elif command -v brew >/dev/null 2>&1; then
    echo "make test needs ${missing[*]}: run  brew install redis" >&2
else
    echo "make test needs ${missing[*]} on the PATH (Debian: sudo apt-get install ${missing[*]})" >&2
fi
exit 1
