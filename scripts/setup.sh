#!/usr/bin/env bash
# Creates .venv (if needed) and installs m3vit with the pinned versions from constraints.txt.
#   scripts/setup.sh          runtime dependencies
#   scripts/setup.sh --test   plus the test tools and the system packages the tests use
# Re-running is cheap: the install is skipped when pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

extras=""
want_system=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]"; want_system=1 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (use --test or nothing)" >&2; exit 2 ;;
  esac
done

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi

stamp=".venv/.m3vit-installed$extras"
digest="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  echo "setup: installing m3vit$extras into .venv (pinned by constraints.txt)"
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --upgrade pip \
         && .venv/bin/python -m pip install -c constraints.txt -e ".$extras"; } >"$log" 2>&1; then
    tail -n 25 "$log" >&2
    echo "setup: pip install failed; the full log is $root/$log" >&2
    exit 1
  fi
  echo "$digest" > "$stamp"
fi

# Resource counts need Debian's yosys, FST waves the lz4 headers; install them when we may, and
# say so when we may not.
if [ "$want_system" = 1 ]; then
  pkgs=""
  command -v yosys >/dev/null 2>&1 || pkgs="$pkgs yosys"
  echo '#include <lz4.h>' | c++ -E -x c++ - >/dev/null 2>&1 || pkgs="$pkgs liblz4-dev"
  if [ -n "$pkgs" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing$pkgs (apt-get)"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs) >/dev/null 2>&1 \
        || echo "setup: could not install$pkgs; synthesis tests are skipped without yosys, FST waves need liblz4-dev" >&2
    else
      echo "setup:$pkgs not installed and not root; synthesis tests are skipped without yosys, FST waves need liblz4-dev" >&2
    fi
  fi
fi
echo "setup: ready (.venv/bin/m3vit)"
