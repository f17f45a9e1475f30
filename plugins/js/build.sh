#!/usr/bin/env bash
# Builds the JavaScript plugins into WebAssembly components with
# componentize-js (pinned in package.json / package-lock.json).
#
# usage: plugins/js/build.sh [OUT_DIR]
#
#   OUT_DIR   where the components go (default: plugins/target/components):
#             bank-js.wasm
#
# componentize-js 0.23.0 imports @bytecodealliance/preview2-shim at run time
# but lists it only as a devDependency of its own, so a clean `npm ci` lacks
# it: package.json pins it (0.25.0) beside componentize-js.
#
# Installs the toolchain into plugins/js/node_modules with `npm ci` when it is
# missing or older than package-lock.json. A second run with nothing changed
# returns at once: see inputs_hash below.
#
# componentize-js embeds the StarlingMonkey (SpiderMonkey) engine and
# snapshots it with wizer after evaluating the module's top level. Built with
# the toolchain's defaults, no -d flags: the component then imports wasi:http
# (for `fetch`), which the host links as deny-all (every request is answered
# with HTTP-request-denied), so it loads and can reach nothing.
#
# Not reproducible: two builds from the same inputs give different bytes
# (checked with componentize-js 0.23.0; same size to within ~50 bytes).
# The wizer snapshot embeds the random temporary directory componentize-js
# works in (/tmp/<random>/sources/initializer.js), the absolute path of
# plugins/js (its --strip-path-prefix argument), and engine heap state that
# varies between runs. Stack traces name sources relative to plugins/js.
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

command -v node >/dev/null || { echo "build.sh: node is not installed" >&2; exit 1; }
command -v npm >/dev/null || { echo "build.sh: npm is not installed" >&2; exit 1; }

# npm ci when node_modules is missing or older than the lockfile (npm writes
# node_modules/.package-lock.json on every install).
installed="$here/node_modules/.package-lock.json"
if [ ! -f "$installed" ] || [ "$here/package-lock.json" -nt "$installed" ] ||
   [ ! -d "$here/node_modules/@bytecodealliance/componentize-js" ]; then
  echo "build.sh: npm ci (plugins/js)" >&2
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

# Everything the output depends on: the sources, the lockfile, the WIT, this
# script and the node that runs the toolchain.
inputs_hash() {
  {
    node --version
    (cd "$here" && find refold-sdk bank -type f -name '*.js' -print | LC_ALL=C sort | xargs sha256sum)
    (cd "$here" && sha256sum package.json package-lock.json build.sh)
    (cd "$root/wit" && find . -type f | LC_ALL=C sort | xargs sha256sum)
  } | sha256sum | cut -d' ' -f1
}

names=(bank-js)
stamp="$out/.inputs-js.sha256"
hash=$(inputs_hash)
up_to_date=false
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
  up_to_date=true
  for name in "${names[@]}"; do [ -f "$out/$name.wasm" ] || up_to_date=false; done
fi

# componentize SOURCE NAME: build plugins/js/SOURCE into OUT_DIR/NAME.wasm.
componentize() {
  local tmp="$out/.$2.wasm.tmp"
  # From plugins/js: componentize-js maps the current directory into the
  # engine at build time, so the entry module's relative imports
  # (../refold-sdk/) must lie under it.
  (cd "$here" && node node_modules/@bytecodealliance/componentize-js/src/cli.js \
    "$1" --wit "$root/wit" --world-name projector -o "$tmp")
  mv "$tmp" "$out/$2.wasm"
}

if $up_to_date; then
  echo "build.sh: up to date (inputs unchanged since the last build into $out)" >&2
else
  rm -f "$stamp"
  componentize bank/bank.js bank-js
  echo "$hash" >"$stamp"
fi

for name in "${names[@]}"; do
  printf '%9d  %s\n' "$(wc -c <"$out/$name.wasm")" "$out/$name.wasm"
done
