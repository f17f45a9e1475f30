#!/usr/bin/env bash
# Builds the Python plugins into WebAssembly components with componentize-py
# (pinned in plugins/python/requirements.txt).
#
# usage: plugins/python/build.sh [OUT_DIR]
#
#   OUT_DIR   where the components go (default: plugins/target/components):
#             bank-py.wasm
#
# Creates a venv at plugins/target/python-venv with the host's python3 when
# it is missing and pip-installs the pinned requirements into it. A second
# run with nothing changed returns at once: see inputs_hash below.
#
# componentize-py embeds its own CPython build (wasm32-wasip2) and the
# standard library, and snapshots the interpreter after importing the app
# module (component-init), so the module's top level runs at build time. The
# host python only runs the tool; the plugin runs on the embedded CPython.
#
# Not reproducible: two builds from the same inputs give different bytes
# (checked with componentize-py 0.25.1; sizes differ by up to ~50 KB). The
# snapshot is taken after CPython started inside the build with a random
# string-hash seed (PYTHONHASHSEED is not passed through), so the heap it
# captures differs; that seed is then fixed for every instance of that one
# component, but differs between builds. See plugins/python/README.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

case "${1:-}" in
  -h|--help) sed -n '2,22s/^# \{0,1\}//p' "$0"; exit 0 ;;
  -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then echo "build.sh: more than one OUT_DIR" >&2; exit 2; fi
out=${1:-$root/plugins/target/components}
mkdir -p "$out"
out=$(cd "$out" && pwd)

python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "build.sh: $python is not installed" >&2; exit 1; }

venv="$root/plugins/target/python-venv"
tool="$venv/bin/componentize-py"
# (Re)install when the venv is missing or older than the requirements.
installed="$venv/.requirements.txt"
if [ ! -x "$venv/bin/python" ]; then
  echo "build.sh: creating $venv" >&2
  "$python" -m venv "$venv"
fi
if [ ! -x "$tool" ] || ! cmp -s "$here/requirements.txt" "$installed"; then
  echo "build.sh: pip install -r plugins/python/requirements.txt" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$installed"
fi

# Everything the output depends on: the sources, the requirements, the WIT,
# this script, the tool and the python that runs it.
inputs_hash() {
  {
    "$venv/bin/python" --version
    "$tool" --version
    (cd "$here" && find refold-sdk/refold_sdk bank -type f -name '*.py' -print | LC_ALL=C sort | xargs sha256sum)
    (cd "$here" && sha256sum requirements.txt build.sh)
    (cd "$root/wit" && find . -type f | LC_ALL=C sort | xargs sha256sum)
  } | sha256sum | cut -d' ' -f1
}

names=(bank-py)
stamp="$out/.inputs-py.sha256"
hash=$(inputs_hash)
up_to_date=false
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
  up_to_date=true
  for name in "${names[@]}"; do [ -f "$out/$name.wasm" ] || up_to_date=false; done
fi

# componentize APP_DIR NAME: build module `app` of plugins/python/APP_DIR into
# OUT_DIR/NAME.wasm.
#
# The .py files are staged into a fresh directory first: componentize-py
# bundles what its -p directories hold and writes __pycache__ into them, so
# building from the source tree would pick up stale bytecode, tests and editor
# files, and leave __pycache__ behind. In the component the -p directories
# are mounted as /0, /1, ... (tracebacks say /0/app.py, /1/refold_sdk/...),
# so no path of this checkout ends up in it. Without VIRTUAL_ENV set,
# componentize-py adds no site-packages of the venv.
componentize() {
  local tmp="$out/.$2.wasm.tmp"
  local stage="$root/plugins/target/python-build/$2"
  rm -rf "$stage"
  mkdir -p "$stage/app" "$stage/sdk/refold_sdk"
  cp "$here/$1"/*.py "$stage/app/"
  cp "$here"/refold-sdk/refold_sdk/*.py "$stage/sdk/refold_sdk/"
  (cd "$stage" && env -u VIRTUAL_ENV "$tool" -q \
    -d "$root/wit" -w projector componentize \
    -p app -p sdk app -o "$tmp")
  mv "$tmp" "$out/$2.wasm"
}

if $up_to_date; then
  echo "build.sh: up to date (inputs unchanged since the last build into $out)" >&2
else
  rm -f "$stamp"
  componentize bank bank-py
  echo "$hash" >"$stamp"
fi

for name in "${names[@]}"; do
  printf '%9d  %s\n' "$(wc -c <"$out/$name.wasm")" "$out/$name.wasm"
done
