#!/usr/bin/env bash
# Install the Debian packages named as arguments when their command is missing.
# Used by `make test` / `make bench` so a brand-new machine needs nothing by hand.
set -euo pipefail
missing=()
for pkg in "$@"; do
  case "$pkg" in
    redis-server) cmd=redis-server ;;
    nginx) cmd=nginx ;;
    wrk) cmd=wrk ;;
    # Debian's prometheus package ships promtool (checks and unit-tests deploy/prometheus)
    prometheus) cmd=promtool ;;
    *) cmd="$pkg" ;;
  esac
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
echo "installing Debian packages: ${missing[*]}" >&2
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the daemons it installs; the tests and benchmarks start their own.
for pkg in "${missing[@]}"; do
  case "$pkg" in redis-server|nginx|prometheus) (service "$pkg" stop || true) >/dev/null 2>&1 ;; esac
done
