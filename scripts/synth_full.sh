#!/usr/bin/env bash
# Full, unscaled yosys synthesis of the datapath for a hardware config (default: rtl_sim/hw.json).
# This is the slow benchmark behind the scaled figures of `m3vit synth`: for the default 32x48
# array yosys 0.23 needed 12 CPU-minutes and 2.8 GB (49 minutes on a busy 2-core machine).
# Extra arguments go to the synth command, e.g.  scripts/synth_full.sh --parallel 16x16 --json
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
cd "$root"
start=$(date +%s)
"$python" -m m3vit.rtl_sim.synth --method full --workdir build/synth-full "$@"
echo "synth_full: $(( $(date +%s) - start )) s" >&2
