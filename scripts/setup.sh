#!/usr/bin/env bash
# Installs what the build and the test suite need, and only what is missing, so that a second
# run is a fast no-op. Runs as root on Debian (CI and developer machines are the same kind).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

# Debian packages the build needs (tss-esapi links libtss2) and the tests start or call
# (swtpm per test, tpm2-tools for the interop check, openssl for TLS probes).
# D-Bus tests run a private dbus-daemon with the shipped policy (busctl, gdbus, setpriv); the
# packaging tests lint, install and boot the .deb in a debootstrap root. `make bench` counts
# iotd's fsyncs per provisioning and simulates a slow disk with strace (fault injection delays
# every fsync; dm-delay would need device-mapper and a block device, which CI containers lack).
# The discovery test runs private avahi-daemons (mDNS, DNS-SD) in network namespaces it makes
# with iproute2; it never uses or disturbs an avahi-daemon the host may run.
# The installer's page is tested in Debian's headless Chromium (its screenshots need a font:
# DejaVu, so that they look the same on every machine).
packages=(openssl ca-certificates pkg-config libtss2-dev libtss2-tcti-swtpm0 libtss2-tcti-device0
          swtpm swtpm-tools tpm2-tools
          dbus dbus-daemon libglib2.0-bin util-linux passwd systemd
          lintian debootstrap piuparts systemd-container binutils man-db python3-venv strace
          avahi-daemon iproute2 chromium fonts-dejavu-core)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install ${missing[*]} (run as root, or install them yourself)" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust >= 1.89 (rustup)" >&2; exit 1; }

# The installer's page (agent/page): its build and tests run on node with the npm packages of its
# lockfile (noble's cryptography, esbuild, playwright-core to drive Chromium). noble 2 needs node
# 20.19 or newer, which Debian 12's nodejs (18) is not: the machine's own node is used, and a
# missing or older one stops the setup with the reason.
node_version=$(node --version 2>/dev/null || true)
if ! printf '%s\n' "$node_version" | awk -F'[v.]' '{ exit !($2 > 20 || ($2 == 20 && $3 >= 19)) }' \
   || ! command -v npm >/dev/null; then
    echo "setup: node >= 20.19 and npm are needed for the installer's page (found: ${node_version:-no node})" >&2
    exit 1
fi
page="$repo/agent/page"
# `npm ci` again only when the lockfile changed since the last one (a stamp beside the packages).
# No install scripts: none of these packages needs one (esbuild finds its binary package).
if ! cmp -s "$page/package-lock.json" "$page/node_modules/.iotd-lock"; then
    echo "setup: installing the page's npm packages (npm ci in agent/page)"
    (cd "$page" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    cp "$page/package-lock.json" "$page/node_modules/.iotd-lock"
fi

# AWS's own device SDK and boto3, for the interoperability tests and the demo.
"$repo/scripts/python-venv.sh"
