#!/usr/bin/env bash
# The Yocto layer yocto/meta-iotd, checked without a Yocto build (no registry carries poky or
# OE-core, so neither `bitbake` nor yocto-check-layer can run here):
#
#   1. iotd-crates.inc is what scripts/yocto-crates.py generates from the current Cargo.lock;
#   2. the recipe's version is the crate's;
#   3. oelint-adv finds nothing (not even info) for scarthgap and for wrynose;
#   4. bitbake's own parser (the `bb` modules of PyPI's bitbake-setup) parses the layer for
#      wrynose, scarthgap with meta-lts-mixins' Rust, and stock scarthgap (where the recipe must
#      skip itself: Rust 1.75 is too old); the recipe's do_install, run against this tree,
#      installs every file the .deb takes from the tree, byte for byte, each file in a package
#      (yocto/tests/bbparse.py);
#   5. the layer README names a maintainer, an e-mail address and how to send patches
#      (yocto-check-layer's test_readme).
#
# The tools live in target/yocto-venv, pinned by yocto/tests/requirements.txt. Each check prints
# "ok: ..." or "FAIL: ..."; the last line is the summary.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

layer=yocto/meta-iotd
recipe_dir=$layer/recipes-connectivity/iotd
passed=0
failed=0
t_start=$SECONDS

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$1" "$(now)"; }
ok() { echo "ok: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() {
    local desc=$1 t out
    shift
    t=$(now)
    if out=$("$@" 2>&1); then
        ok "$desc ($(since "$t"))"
    else
        fail "$desc"
        [ -n "$out" ] && sed 's/^/    /' <<<"$out"
    fi
    return 0
}

# --- tools -----------------------------------------------------------------------------------

venv="$repo/target/yocto-venv"
requirements=yocto/tests/requirements.txt
# python3-venv provides ensurepip on Debian; install it when a venv cannot be made.
if ! python3 -c 'import ensurepip' 2>/dev/null; then
    [ "$(id -u)" -eq 0 ] || { echo "test-yocto: python3-venv is missing; run scripts/setup.sh as root" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends python3-venv >/dev/null
fi
# Rebuilt when the pins change; a stamp holds the requirements it was built from.
if ! cmp -s "$requirements" "$venv/.requirements" 2>/dev/null; then
    t=$(now)
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/.requirements"
    ok "target/yocto-venv from $requirements: $(grep -Eo '^(bitbake-setup|oelint-adv)==[^ ]+' "$requirements" | tr '\n' ' ')($(since "$t"))"
fi

# --- 1, 2: generated and versioned files -----------------------------------------------------

check "iotd-crates.inc is current with Cargo.lock (scripts/yocto-crates.py --check)" \
    python3 scripts/yocto-crates.py --check
version=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "iotd"))')
check "the recipe is iotd_$version.bb, the crate's version" test -f "$recipe_dir/iotd_$version.bb"

# --- 3. oelint-adv ---------------------------------------------------------------------------

# --suppress oelint.vars.homepageping: that rule fetches HOMEPAGE over the network. Info
# findings are not hidden: clean means no output at all.
for release in scarthgap wrynose; do
    check "oelint-adv --release $release: no findings" \
        bash -c 'out=$(cd "$1" && "$2/bin/oelint-adv" --release "$3" --mode all --quiet --relpaths \
                       --suppress oelint.vars.homepageping conf/layer.conf recipes-*/*/*.bb 2>&1) && [ -z "$out" ] ||
                 { echo "$out"; exit 1; }' _ "$layer" "$venv" "$release"
done

# --- 4. bitbake's parser ---------------------------------------------------------------------

parse() {
    "$venv/bin/python" yocto/tests/bbparse.py --layer "$layer" --source . "$@"
}
check "bitbake parse, wrynose: parses; do_install installs the .deb's files byte for byte, each in a package" \
    parse --release wrynose
check "bitbake parse, scarthgap with meta-lts-mixins' Rust (1.91): parses; do_install as above" \
    parse --release scarthgap --rustversion 1.91.0%
check "bitbake parse, stock scarthgap (Rust 1.75): the recipe skips itself, naming the mixin" \
    parse --release scarthgap --expect-skip "meta-lts-mixins (branch scarthgap/rust)"

# --- 5. README -------------------------------------------------------------------------------

# yocto-check-layer's test_readme: a top-level README* that mentions a maintainer and patches
# and has an e-mail address.
check "layer README names a maintainer, an e-mail address and how to send patches" \
    bash -c 'f=$(ls "$1"/README* | head -n 1) && grep -qi maintainer "$f" && grep -qi patch "$f" &&
             grep -qE "[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]+" "$f"' _ "$layer"

echo "yocto: $passed passed, $failed failed ($((SECONDS - t_start)) s)"
((failed == 0))
