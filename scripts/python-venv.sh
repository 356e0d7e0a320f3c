#!/usr/bin/env bash
# Creates, or reuses, the Python venv from which the interop tests run AWS's
# own software (awsiotsdk, boto3) against fake-iot-core.
#
#   scripts/python-venv.sh            # venv at $REPO/target/venv
#   IOTD_VENV=/some/dir scripts/python-venv.sh
#   IOTD_PYTHON=python3.11 scripts/python-venv.sh   # interpreter to build it from
#
# The venv holds exactly tests/interop/requirements.txt. A stamp file inside
# it records the sha256 of that file; when it matches, the script touches
# nothing and needs no network, so tests can call it before every run.
# When it does not match, the venv is rebuilt from scratch, so packages
# dropped from requirements.txt do not linger.
# Prints one line saying what it did.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IOTD_VENV:-$REPO/target/venv}"
REQ="$REPO/tests/interop/requirements.txt"
STAMP="$VENV/.requirements.sha256"
PY="${IOTD_PYTHON:-python3}"

[[ -f "$REQ" ]] || { echo "python-venv: missing $REQ" >&2; exit 1; }
want="$(sha256sum "$REQ" | cut -d' ' -f1)"

# Up to date: the stamp matches and the venv's interpreter still runs (a venv
# whose base interpreter was removed has a dangling bin/python).
up_to_date() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
        && "$VENV/bin/python" -c '' 2>/dev/null
}

if up_to_date; then
    echo "python-venv: $VENV up to date (requirements ${want:0:12})"
    exit 0
fi

# Tests may call this script from several processes at once; one builds, the
# others wait and then find the venv up to date.
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if up_to_date; then
    echo "python-venv: $VENV up to date (built by a concurrent run)"
    exit 0
fi

start=$SECONDS
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
fail() {
    echo "python-venv: $1 (log follows)" >&2
    cat "$log" >&2
    exit 1
}

# Rebuild from scratch, but never delete a directory that is not a venv
# (IOTD_VENV could point anywhere).
if [[ -e "$VENV" ]]; then
    if [[ -f "$VENV/pyvenv.cfg" ]] || [[ -d "$VENV" && -z "$(ls -A "$VENV")" ]]; then
        rm -rf "$VENV"
    else
        echo "python-venv: $VENV exists and is not a venv; refusing to replace it" >&2
        exit 1
    fi
fi

make_venv() { # $1 = interpreter
    rm -rf "$VENV"
    "$1" -m venv "$VENV" >>"$log" 2>&1
}

did_apt=""
if ! make_venv "$PY"; then
    # Debian splits venv/ensurepip into python3-venv; without it `-m venv`
    # fails with "ensurepip is not available".
    command -v apt-get >/dev/null || fail "creating venv $VENV with $PY failed"
    echo "+ apt-get install python3-venv" >>"$log"
    apt-get update >>"$log" 2>&1 || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >>"$log" 2>&1 \
        || fail "apt-get install python3-venv failed"
    did_apt=" (installed python3-venv)"
    if ! make_venv "$PY"; then
        # python3-venv only fixes Debian's own interpreter; fall back to it
        # when $PY is another build (pyenv, /usr/local) that lacks ensurepip.
        if [[ -x /usr/bin/python3 && "$(command -v "$PY")" != /usr/bin/python3 ]]; then
            PY=/usr/bin/python3
            make_venv "$PY" || fail "creating venv $VENV with $PY failed"
        else
            fail "creating venv $VENV with $PY failed even after installing python3-venv"
        fi
    fi
fi

"$VENV/bin/python" -m pip install --no-input --disable-pip-version-check \
    --require-virtualenv -r "$REQ" >>"$log" 2>&1 \
    || { rm -rf "$VENV"; fail "pip install -r $REQ into $VENV failed"; }

echo "$want" >"$STAMP"
pins="$(grep -Eo '^(awsiotsdk|awscrt|boto3|cryptography)==[^[:space:]]+' "$REQ" | tr '\n' ' ')"
echo "python-venv: created $VENV with $("$VENV/bin/python" -c 'import platform; print("Python " + platform.python_version())')${did_apt}: ${pins% } in $((SECONDS - start))s"
