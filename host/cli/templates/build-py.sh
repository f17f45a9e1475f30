#!/usr/bin/env bash
# Builds {{name}}.wasm from app.py with the pinned componentize-py
# (requirements.txt), installed into .venv on the first run.
#
# componentize-py embeds its own CPython and snapshots it after importing
# app.py, so the module's top level runs at build time; the host's python3
# only runs the tool.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/componentize-py ] || ! cmp -s requirements.txt .venv/.requirements.txt; then
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.requirements.txt
fi
# Staged into a fresh directory: componentize-py bundles what its -p
# directories hold (and writes __pycache__ into them).
stage=.build
rm -rf "$stage"
mkdir -p "$stage/app" "$stage/sdk"
cp app.py "$stage/app/"
cp -r refold_sdk "$stage/sdk/"
rm -rf "$stage/sdk/refold_sdk/__pycache__"
(cd "$stage" && env -u VIRTUAL_ENV ../.venv/bin/componentize-py -q \
  -d ../wit -w projector componentize -p app -p sdk app -o ../{{name}}.wasm.tmp)
mv {{name}}.wasm.tmp {{name}}.wasm
rm -rf "$stage"
echo "built {{name}}.wasm"
