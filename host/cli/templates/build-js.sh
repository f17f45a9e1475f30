#!/usr/bin/env bash
# Builds {{name}}.wasm from plugin.js with the pinned componentize-js.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d node_modules/@bytecodealliance/componentize-js ]; then
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
fi
node node_modules/@bytecodealliance/componentize-js/src/cli.js plugin.js \
  --wit wit --world-name projector -o {{name}}.wasm
echo "built {{name}}.wasm"
