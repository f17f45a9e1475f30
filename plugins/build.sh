#!/usr/bin/env bash
# Builds every plugin component in release for wasm32-wasip2, including the
# feature variants, and copies them to stable names in an output directory.
#
# usage: plugins/build.sh [--examples | --check-examples] [OUT_DIR]
#
#   OUT_DIR     where the components go (default: plugins/target/components):
#               bank.wasm bank-v2.wasm orders.wasm probe.wasm
#               probe-trap-describe.wasm probe-fail-all.wasm probe-entity-orders.wasm
#               probe-entity-dashed.wasm probe-loop-init.wasm
#               bank-js.wasm (plugins/js/build.sh: the bank in JavaScript)
#               bank-py.wasm (plugins/python/build.sh: the bank in Python)
#   --examples  also copy bank.wasm and orders.wasm to examples/bank/ and
#               examples/orders/ (the copies there are committed so that the
#               quick start needs no wasm build); says whether they changed
#   --check-examples
#               exit 1 if examples/*/*.wasm differ from what the sources
#               build (they are stale); copies nothing
#
# Variants share one target directory and are built one after another, each
# copied out before the next; the default features are built last, so
# plugins/target/wasm32-wasip2/release/*.wasm are the default builds.
# A second run with nothing changed returns at once: see inputs_hash below.
#
# Reproducible: the same sources, Cargo.lock and toolchain give the same
# bytes. Panic messages embed source paths; the one path that differs between
# machines, the cargo registry under CARGO_HOME, is remapped to /cargo here.
# (A plain `cargo build --release` works too, but embeds the local path.)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

usage() { sed -n '2,16s/^# \{0,1\}//p' "$0"; }

examples=false
check_examples=false
out=""
for arg in "$@"; do
  case "$arg" in
    --examples) examples=true ;;
    --check-examples) check_examples=true ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "build.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *)
      if [ -n "$out" ]; then echo "build.sh: more than one OUT_DIR" >&2; exit 2; fi
      out=$arg ;;
  esac
done
out=${out:-$here/target/components}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The wasm32-wasip2 standard library: rustup, else the copy kept beside the
# repository (for machines where rustup cannot download).
ensure_target() {
  local sysroot
  sysroot=$(rustc --print sysroot)
  if [ -d "$sysroot/lib/rustlib/wasm32-wasip2/lib" ]; then return 0; fi
  echo "build.sh: installing the wasm32-wasip2 target" >&2
  if command -v rustup >/dev/null && timeout 300 rustup target add wasm32-wasip2; then return 0; fi
  local kept="$root/../shared/toolchain/install-wasm32-wasip2.sh"
  if [ -f "$kept" ]; then bash "$kept"; return; fi
  echo "build.sh: cannot install the wasm32-wasip2 target (rustup failed, no $kept)" >&2
  return 1
}
ensure_target

cargo_home=${CARGO_HOME:-$HOME/.cargo}
export CARGO_ENCODED_RUSTFLAGS="--remap-path-prefix=$cargo_home/registry/src=/cargo/registry/src"

release="$here/target/wasm32-wasip2/release"
names=(bank bank-v2 orders probe probe-trap-describe probe-fail-all probe-entity-orders probe-entity-dashed probe-loop-init)

# Cargo keeps one fingerprint per cdylib whatever its features, so building
# the variants one after another relinks each of them on every run. Skip all
# of it when no input changed since the last build into OUT_DIR.
inputs_hash() {
  {
    rustc -vV; cargo -V; echo "$CARGO_ENCODED_RUSTFLAGS"
    (cd "$here" && find . -path ./target -prune -o -type f \
      \( -name '*.rs' -o -name '*.toml' -o -name Cargo.lock -o -name build.sh \) -print |
      LC_ALL=C sort | xargs sha256sum)
    (cd "$root/wit" && find . -type f | LC_ALL=C sort | xargs sha256sum)
  } | sha256sum | cut -d' ' -f1
}
stamp="$out/.inputs.sha256"
hash=$(inputs_hash)
up_to_date=false
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
  up_to_date=true
  for name in "${names[@]}"; do [ -f "$out/$name.wasm" ] || up_to_date=false; done
fi

# copy ARTIFACT NAME: copy a freshly built component to OUT_DIR/NAME.
copy() {
  if ! cmp -s "$release/$1" "$out/$2"; then cp "$release/$1" "$out/$2"; fi
}

build() {
  (cd "$here" && cargo build --release --locked "$@")
}

if $up_to_date; then
  echo "build.sh: up to date (inputs unchanged since the last build into $out)" >&2
else
  rm -f "$stamp"
  build -p bank --features v2
  copy bank.wasm bank-v2.wasm
  for variant in trap-describe fail-all entity-orders entity-dashed loop-init; do
    build -p refold-probe --features "$variant"
    copy refold_probe.wasm "probe-$variant.wasm"
  done
  build --workspace
  copy bank.wasm bank.wasm
  copy orders.wasm orders.wasm
  copy refold_probe.wasm probe.wasm
  echo "$hash" >"$stamp"
fi

# The JavaScript examples (their own toolchain, pinned in js/package-lock.json;
# the script skips its build when its inputs are unchanged).
bash "$here/js/build.sh" "$out" >&2
names+=(bank-js)
# The Python examples (componentize-py pinned in python/requirements.txt, in
# a venv under plugins/target; skipped likewise when nothing changed).
bash "$here/python/build.sh" "$out" >&2
names+=(bank-py)

for name in "${names[@]}"; do
  printf '%8d  %s\n' "$(wc -c <"$out/$name.wasm")" "$out/$name.wasm"
done

if $check_examples; then
  stale=0
  for name in bank orders; do
    dest="$root/examples/$name/$name.wasm"
    if cmp -s "$out/$name.wasm" "$dest"; then
      echo "up to date $dest"
    else
      echo "STALE      $dest (run plugins/build.sh --examples)" >&2
      stale=1
    fi
  done
  exit $stale
fi

if $examples; then
  for name in bank orders; do
    dest="$root/examples/$name/$name.wasm"
    if cmp -s "$out/$name.wasm" "$dest"; then
      echo "unchanged $dest"
    else
      mkdir -p "$(dirname "$dest")"
      cp "$out/$name.wasm" "$dest"
      echo "updated   $dest"
    fi
  done
fi
