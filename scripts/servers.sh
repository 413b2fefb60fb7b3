#!/usr/bin/env bash
# Makes sure the servers the tests start are installed (the tests start and stop their own
# instances on free ports; this script starts nothing), and the headless browser the
# dashboard's browser test drives (Chromium and its chromedriver). Installs them from the
# system's packages when it may (root with apt-get); otherwise prints the one command to run
# and fails, so a missing server never shows up later as skipped tests or a coverage failure.
set -euo pipefail

# PostgreSQL counts as installed when initdb is on the PATH or in Debian's versioned
# directories (/usr/lib/postgresql/<version>/bin, which the postgresql package does not put on
# the PATH); tests/support/postgres.py looks in the same places.
have_postgres() {
    command -v initdb >/dev/null 2>&1 && return 0
    local initdb
    for initdb in /usr/lib/postgresql/*/bin/initdb; do
        [ -x "$initdb" ] && return 0
    done
    return 1
}

# RabbitMQ counts as installed when rabbitmq-server is on the PATH or in Debian's script
# directory (/usr/lib/rabbitmq/bin, whose script runs a node in the foreground; the one in
# /usr/sbin only wraps it); tests/support/rabbitmq.py looks in the same places.
have_rabbitmq() {
    command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]
}

# Chromium counts as installed when chromium (Debian) or chromium-browser (Ubuntu) and
# chromedriver are on the PATH; tests/support/browser.py looks for the same names.
have_chromium() {
    { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } &&
        command -v chromedriver >/dev/null 2>&1
}

missing=()
brew_missing=()
brew_casks=()
command -v redis-server >/dev/null 2>&1 || { missing+=(redis-server); brew_missing+=(redis); }
have_postgres || { missing+=(postgresql); brew_missing+=(postgresql@15); }
have_rabbitmq || { missing+=(rabbitmq-server); brew_missing+=(rabbitmq); }
# Homebrew ships both as casks (apps), not formulae.
have_chromium || { missing+=(chromium chromium-driver); brew_casks+=(chromium chromedriver); }

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} from the system's packages (needed by the tests)"
    export DEBIAN_FRONTEND=noninteractive
    # Install without starting the packages' own services (a redis-server on 6379, a
    # PostgreSQL cluster on 5432, a RabbitMQ node on 5672): the tests start and stop
    # instances of their own.
    # Both settings last for this install only.
    cleanup=()
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        cleanup+=("$policy")
    fi
    cluster_conf=/etc/postgresql-common/createcluster.d/eventbus-no-main-cluster.conf
    mkdir -p "$(dirname "$cluster_conf")"
    echo "create_main_cluster = false" >"$cluster_conf"
    cleanup+=("$cluster_conf")
    trap 'rm -f "${cleanup[@]}"' EXIT
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
    echo "make test needs ${missing[*]}: run  sudo apt-get install ${missing[*]}" >&2
elif command -v brew >/dev/null 2>&1; then
    commands=()
    [ ${#brew_missing[@]} -eq 0 ] || commands+=("brew install ${brew_missing[*]}")
    [ ${#brew_casks[@]} -eq 0 ] || commands+=("brew install --cask ${brew_casks[*]}")
    joined=$(printf ' && %s' "${commands[@]}")
    echo "make test needs ${missing[*]}: run  ${joined# && }" >&2
else
    echo "make test needs ${missing[*]} on the PATH (Debian: sudo apt-get install ${missing[*]})" >&2
fi
exit 1
