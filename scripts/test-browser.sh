#!/usr/bin/env bash
# Provision the browser the web-page tests drive (dd label serve, dd eval study serve):
# a Chromium or Chrome found on PATH (or named by DD_CHROMIUM) is used as it is; without one,
# Debian's chromium is installed with apt-get where this machine allows it (root, or sudo
# without a password). Elsewhere it says what to do and fails: the tests never skip.
# `make test` runs this before the tests; `.ci/run` runs `make test`.
set -euo pipefail

for name in "${DD_CHROMIUM:-}" chromium chromium-browser google-chrome google-chrome-stable; do
  if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then
    exit 0
  fi
done

if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="-"; fi
  if [ "$SUDO" != "-" ]; then
    echo "installing Debian's chromium for the browser tests (apt-get)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
    exit 0
  fi
fi

cat >&2 <<'MSG'
error: the browser tests need Chromium or Chrome, and none was found on PATH.
  - Debian/Ubuntu with root: apt-get install chromium
  - an existing Chromium/Chrome elsewhere: export DD_CHROMIUM=/path/to/chrome
  - where downloads are allowed: .venv/bin/playwright install chromium, then DD_CHROMIUM=playwright
MSG
exit 1
