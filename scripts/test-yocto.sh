#!/usr/bin/env bash
# The Yocto layer yocto/meta-iotd, checked without a Yocto build (no registry carries poky or
# OE-core, so neither `bitbake` nor yocto-check-layer can run here):
#
#   1. iotd-crates.inc, the recipe's LICENSE and debian/copyright are what
#      scripts/third-party.py writes from the current Cargo.lock and the crates' metadata, and
#      every linked crate's licence is in its allow-list;
#   2. the recipe's version is the crate's, as a git snapshot (PV = "<version>+git");
#   3. oelint-adv finds nothing (not even info) for scarthgap and for wrynose;
#   4. bitbake's own parser (the `bb` modules of PyPI's bitbake-setup) parses the layer for
#      wrynose and for scarthgap with meta-lts-mixins' Rust; the recipe's do_install, run
#      against this tree, installs every file the .deb takes from the tree, byte for byte, each
#      file in its package; every licence has its text (yocto/tests/bbparse.py). With a Rust
#      too old, the recipe skips itself and says what to do: on stock scarthgap (no mixin;
#      the layer's dependency on the mixin is missing too) add the mixin, with an old mixin
#      update it;
#   5. yocto-check-layer's test_readme and test_security: the layer README names a maintainer,
#      an e-mail address and how to send patches; a SECURITY file is in the layer or at the top
#      of its repository.
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

check "scripts/third-party.py: licence expressions, the allow-list, copyright notices (scripts/third_party_test.py)" \
    python3 scripts/third_party_test.py
check "iotd-crates.inc, the recipe's LICENSE and debian/copyright are current; licences allowed (scripts/third-party.py --check)" \
    python3 scripts/third-party.py --check
version=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "iotd"))')
check "the recipe is iotd_git.bb with PV = \"$version+git\", the crate's version" \
    grep -qx "PV = \"$version+git\"" "$recipe_dir/iotd_git.bb"

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
check "bitbake parse, wrynose: parses; do_install installs the .deb's files byte for byte, each in its package" \
    parse --release wrynose
check "bitbake parse, scarthgap with meta-lts-mixins' Rust (1.91): parses; do_install as above" \
    parse --release scarthgap --mixin 1.91.0%
check "bitbake parse, scarthgap with an old meta-lts-mixins (Rust 1.84): the recipe skips itself, asking for an update" \
    parse --release scarthgap --mixin 1.84.1% \
        --expect-skip "your meta-lts-mixins (scarthgap/rust) provides Rust 1.84.1; iotd needs 1.89 or newer: update"
check "bitbake parse, stock scarthgap (Rust 1.75): the layer needs the mixin; the recipe skips itself, asking for it" \
    parse --release scarthgap --expect-missing-layer scarthgap-rust-mixin \
        --expect-skip "iotd needs Rust 1.89 or newer and this build has 1.75: add the layer meta-lts-mixins, branch scarthgap/rust"

# --- 5. README, SECURITY ---------------------------------------------------------------------

# yocto-check-layer's test_readme: a top-level README* that mentions a maintainer and patches
# and has an e-mail address.
check "layer README names a maintainer, an e-mail address and how to send patches" \
    bash -c 'f=$(ls "$1"/README* | head -n 1) && grep -qi maintainer "$f" && grep -qi patch "$f" &&
             grep -qE "[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]+" "$f"' _ "$layer"

# yocto-check-layer's test_security: SECURITY or SECURITY.* in the layer or at the top of the
# git repository that holds it, not empty.
check "a SECURITY file in the layer or at the top of its repository, not empty" \
    bash -c 'for f in "$1"/SECURITY "$1"/SECURITY.* "$2"/SECURITY "$2"/SECURITY.*; do
                 [ -s "$f" ] && exit 0; done; exit 1' _ "$layer" "$(git -C "$layer" rev-parse --show-toplevel)"

echo "yocto: $passed passed, $failed failed ($((SECONDS - t_start)) s)"
((failed == 0))
