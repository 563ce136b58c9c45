# Sourced by run.sh and test.sh: make ./.venv hold what requirements*.txt ask for, then use it.
# Quick when already set up: it reinstalls only when a requirements file changed.
# PYTHON=/path/to/python skips the venv (e.g. a GPU machine with torch preinstalled).
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_reqs=${1:-requirements.txt}
if [ -n "${PYTHON:-}" ]; then
  :
else
  if [ ! -x "$_here/.venv/bin/python" ]; then
    echo "setup: creating $_here/.venv" >&2
    python3 -m venv "$_here/.venv" || { echo "setup: python3 -m venv failed; install python3-venv" >&2; exit 1; }
  fi
  _stamp="$_here/.venv/.installed-$(cat "$_here"/requirements*.txt | cksum | cut -d' ' -f1)-$(basename "$_reqs")"
  if [ ! -f "$_stamp" ]; then
    echo "setup: installing $_reqs into .venv (once)" >&2
    # (the grep drops pip's notes about find-links folders some machines' pip config names)
    "$_here/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$_here/$_reqs" 2>&1 \
      | { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "setup: pip install -r $_reqs failed" >&2; exit 1; }
    touch "$_stamp"
  fi
  PYTHON="$_here/.venv/bin/python"
fi
export PYTHON
