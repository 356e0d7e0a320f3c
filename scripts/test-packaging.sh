#!/usr/bin/env bash
# The Debian package and the systemd unit, tested for real:
#
#   1. build the .deb (scripts/package-deb.sh) and check its control data and contents;
#   2. lintian: no errors and no warnings (overrides are justified in
#      packaging/debian/iotd.lintian-overrides);
#   3. in a fresh Debian bookworm root (debootstrap, cached under target/packaging/): install
#      with apt, check the user, groups, files, enablement and that both binaries run;
#      `systemd-analyze verify` prints nothing for the installed unit and
#      `systemd-analyze security --offline=true` scores at most 1.5;
#   4. boot that root with systemd-nspawn (a real systemd as PID 1) and check that iotd starts
#      inside its sandbox as user iotd, reaches READY, reaches the TPM device node, and stops
#      within 5 s;
#   5. upgrade over itself (a locally edited conffile is kept), remove, purge: nothing left;
#   6. piuparts (install/purge in its own chroot).
#
# Each check prints "ok: ..." with its duration or "FAIL: ..." with the reason; the last line
# is the summary. Runs as root (debootstrap, chroot, nspawn); installs the Debian packages it
# needs when they are missing. Set IOTD_KEEP_ROOT=1 to keep the test root for inspection.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

work="$repo/target/packaging"
mkdir -p "$work"
passed=0
failed=0
t_start=$SECONDS

# --- reporting -------------------------------------------------------------------------------

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$1" "$(now)"; }
ok() { echo "ok: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
summary() {
    echo "packaging: $passed passed, $failed failed ($((SECONDS - t_start)) s)"
    ((failed == 0))
}
# A failure that makes the remaining checks meaningless.
fatal() { fail "$*"; summary || true; exit 1; }

# check DESCRIPTION COMMAND...: runs COMMAND; its output is shown only when it fails.
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

[ "$(id -u)" -eq 0 ] || { echo "test-packaging: must run as root (debootstrap, chroot, nspawn)" >&2; exit 1; }

# lintian, debootstrap and piuparts test the package; systemd-container brings systemd-nspawn;
# binutils' strip is used by cargo-deb; man-db lets lintian check the man pages; python3-debian
# reads the copyright file as DEP-5.
tools=(lintian debootstrap piuparts systemd-container binutils man-db python3 python3-debian)
missing=()
for p in "${tools[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    t=$(now)
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
    ok "installed ${missing[*]} ($(since "$t"))"
fi

# The Debian mirror this machine's apt uses (deb822 .sources or one-line .list), so the test
# root comes from the same place and nothing is hard-coded.
mirror=$(python3 - <<'PY'
import glob, re
files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")) \
      + sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
found = []
for f in files:
    try:
        text = open(f).read()
    except OSError:
        continue
    if f.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.split()
            if ("deb" in fields.get("types", []) and "bookworm" in fields.get("suites", [])
                    and "main" in fields.get("components", [])):
                found += fields.get("uris", [])
    else:
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s+(?:\S+\s+)*main\b", line)
            if m:
                found.append(m.group(1))
print(found[0].rstrip("/") if found else "")
PY
)
[ -n "$mirror" ] || fatal "no apt source for Debian bookworm main in /etc/apt/sources.list{,.d}"

# --- 1. build --------------------------------------------------------------------------------

version=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "iotd"))')
description=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json,sys; print(next(p["description"] for p in json.load(sys.stdin)["packages"] if p["name"] == "iotd"))')

t=$(now)
# cargo's and cargo-deb's progress goes to a log, shown when the build fails.
if ! deb=$(scripts/package-deb.sh 2>"$work/package-deb.log" | tail -n 1) || [ ! -f "$deb" ]; then
    sed 's/^/    /' "$work/package-deb.log" | tail -n 60
    fatal "building the .deb (scripts/package-deb.sh)"
fi
# A copy: the next cargo-deb run clears its working directory target/debian/.
mkdir -p "$work/debs"
rm -f "$work/debs/"*.deb
cp "$deb" "$work/debs/"
deb="$work/debs/$(basename "$deb")"
ok "built $(basename "$deb"); iotctl's generated man pages and completions are current ($(since "$t"))"

# The same package, one version later, for the upgrade test.
t=$(now)
if ! deb2=$(scripts/package-deb.sh --deb-version "$version-1+upgradetest" --output "$work/debs/" \
        2>"$work/package-deb.log" | tail -n 1) || [ ! -f "$deb2" ]; then
    sed 's/^/    /' "$work/package-deb.log" | tail -n 60
    fatal "building the upgrade .deb"
fi
ok "built $(basename "$deb2") for the upgrade test ($(since "$t"))"

control() { dpkg-deb -f "$deb" "$1"; }
check "package synopsis is the crate description on one line, under 80 characters" \
    bash -c '[ "${#1}" -lt 80 ] && [ "$(dpkg-deb -f "$2" Description | head -n 1)" = "$1" ] ||
             { echo "synopsis: $(dpkg-deb -f "$2" Description | head -n 1)"; echo "crate description (${#1} characters): $1"; echo "cargo-deb wraps a description of 80 characters or more into the extended description; shorten description in agent/Cargo.toml"; exit 1; }' \
    _ "$description" "$deb"
check "Depends names the dlopened device TCTI, dbus, ca-certificates and a sysusers provider" \
    bash -c 'd=$(dpkg-deb -f "$1" Depends); echo "$d";
             for w in libtss2-tcti-device0 ca-certificates "dbus-system-bus | dbus" "systemd | systemd-standalone-sysusers | systemd-sysusers"; do
                 grep -qF "$w" <<<"$d" || { echo "missing: $w"; exit 1; }; done' _ "$deb"
check "/etc/iotd/config.toml is the only conffile" \
    bash -c 'c=$(dpkg-deb --ctrl-tarfile "$1" | tar -xO ./conffiles); [ "$c" = /etc/iotd/config.toml ] || { echo "conffiles: $c"; exit 1; }' _ "$deb"
expected_files=(
    ./usr/bin/iotd ./usr/bin/iotctl
    ./etc/iotd/config.toml
    ./usr/share/doc/iotd/examples/iotd.toml ./usr/share/doc/iotd/copyright ./usr/share/doc/iotd/changelog.Debian.gz
    ./usr/lib/systemd/system/iotd.service ./usr/lib/sysusers.d/iotd.conf ./usr/lib/tmpfiles.d/iotd.conf
    ./usr/share/dbus-1/system.d/io.iotd.Agent1.conf ./usr/share/dbus-1/interfaces/io.iotd.Agent1.xml
    ./usr/share/man/man8/iotd.8.gz ./usr/share/man/man1/iotctl.1.gz
    ./usr/share/bash-completion/completions/iotctl ./usr/share/zsh/vendor-completions/_iotctl
    ./usr/share/fish/vendor_completions.d/iotctl.fish
    ./usr/share/lintian/overrides/iotd
)
check "the package contains both binaries, unit, sysusers, tmpfiles, D-Bus policy and interface, config, man pages, completions" \
    bash -c 'list=$(dpkg-deb -c "$1" | awk "{print \$6}"); shift; for f in "$@"; do grep -qxF "$f" <<<"$list" || { echo "missing: $f"; r=1; }; done; exit ${r:-0}' \
    _ "$deb" "${expected_files[@]}"
check "iotd.8 carries the crate version ($version)" \
    grep -q "^\.TH IOTD 8 .* \"iotd $version\"" packaging/man/iotd.8

# --- 2. lintian ------------------------------------------------------------------------------

t=$(now)
# Everything lintian has to say, overrides included, for the log...
lintian_out=$(lintian --pedantic --display-info --display-experimental --show-overrides "$deb" 2>&1 |
    grep -v '^running with root privileges is not recommended' || true)
echo "lintian output:"
sed 's/^/    /' <<<"$lintian_out"
# ...and the verdict from a run without --show-overrides (with it, lintian 2.116 also fails on
# overridden tags).
if lintian --fail-on error,warning "$deb" >/dev/null 2>&1 && ! grep -qE '^(E|W): ' <<<"$lintian_out"; then
    ok "lintian: no errors, no warnings ($(since "$t"))"
else
    fail "lintian reports errors or warnings"
fi

# lintian reads a copyright file as DEP-5 only in a source package; this package is built from
# the tree, so the same checks run here on the file it ships, with Debian's own parser
# (python3-debian, strict): License fields in DEP-5's syntax, every licence a Files paragraph
# names has its own paragraph and none is unused; a licence with a text in
# /usr/share/common-licenses points there.
check "debian/copyright as shipped is DEP-5 (python3-debian, strict): each licence named has its paragraph, none unused" \
    bash -c 'dpkg-deb --fsys-tarfile "$1" | tar -xO ./usr/share/doc/iotd/copyright | /usr/bin/python3 -c "$2"' _ "$deb" '
import re, sys
from debian import copyright as dep5
c = dep5.Copyright(sys.stdin, strict=True)
named, defined = set(), set()
for p in c.all_files_paragraphs():
    # DEP-5 groups with a comma ("A or B, and C"); it has no parentheses.
    if re.search(r"[()]", p.license.synopsis):
        sys.exit(f"License: {p.license.synopsis}: DEP-5 has no parentheses")
    named |= {n.strip() for n in re.split(r",?\s+(?:and|or)\s+", p.license.synopsis) if n.strip()}
for p in c.all_license_paragraphs():
    defined.add(p.license.synopsis)
    if p.license.synopsis.startswith("Apache-2.0") and "/usr/share/common-licenses/Apache-2.0" not in p.license.text:
        sys.exit(f"{p.license.synopsis}: does not point at /usr/share/common-licenses/Apache-2.0")
missing, unused = named - defined, defined - named
if missing or unused:
    sys.exit(f"without a licence paragraph: {sorted(missing)}; paragraphs no file uses: {sorted(unused)}")
files = sum(len(p.files) for p in c.all_files_paragraphs())
print(f"{len(list(c.all_files_paragraphs()))} files paragraphs ({files} patterns), licences: {sorted(defined)}")
'

# --- 3. a fresh bookworm root ----------------------------------------------------------------

# The pristine minbase root is built once and kept as a tarball (debootstrap takes ~30 s, the
# unpack ~3 s). It is rebuilt when older than a week, so point releases do not pile up in the
# apt upgrade of every run.
base="$work/bookworm-minbase.tgz"
if [ ! -s "$base" ] || [ -n "$(find "$base" -mtime +7)" ]; then
    t=$(now)
    tmp_root="$work/debootstrap.tmp"
    rm -rf "$tmp_root"
    debootstrap --variant=minbase bookworm "$tmp_root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        { tail -n 20 "$work/debootstrap.log"; fatal "debootstrap bookworm from $mirror"; }
    tar -C "$tmp_root" -czf "$base.tmp" . && mv "$base.tmp" "$base"
    rm -rf "$tmp_root"
    ok "debootstrap bookworm minbase from $mirror, cached as target/packaging/$(basename "$base") ($(since "$t"))"
fi

root="$work/root"
cleanup_root() {
    for m in "$root/proc" "$root/dev/pts" "$root/sys"; do
        mountpoint -q "$m" 2>/dev/null && umount -l "$m"
    done
    [ "${IOTD_KEEP_ROOT:-}" = 1 ] || rm -rf "$root"
}
trap cleanup_root EXIT
cleanup_root
mkdir -p "$root"
t=$(now)
tar -C "$root" -xzf "$base"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"
mount --bind /dev/pts "$root/dev/pts"
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }
# Services must not start in the chroot (there is no systemd here; invoke-rc.d would try).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
in_root apt-get update -qq >/dev/null 2>&1 || fatal "apt-get update in the test root"
# man-db lets `systemd-analyze verify` resolve Documentation=man:...; procps and the systemd
# tools are for the boot test below (systemd-sysv gives nspawn its /sbin/init).
in_root apt-get install -y -qq --no-install-recommends man-db procps systemd-sysv >/dev/null 2>&1 ||
    fatal "installing man-db, procps and systemd-sysv in the test root"
ok "fresh bookworm root unpacked and prepared ($(since "$t"))"

mkdir -p "$root/tmp/debs"
cp "$deb" "$root/tmp/debs/"
cp "$deb2" "$root/tmp/debs/"
deb_in_root="/tmp/debs/$(basename "$deb")"
deb2_in_root="/tmp/debs/$(basename "$deb2")"

t=$(now)
if out=$(in_root apt-get install -y --no-install-recommends "$deb_in_root" 2>&1); then
    ok "apt-get install ./$(basename "$deb") with its dependencies ($(since "$t"))"
else
    sed 's/^/    /' <<<"$out" | tail -n 30
    fatal "apt-get install of the .deb in the bookworm root"
fi

check "user iotd exists: system uid, home /var/lib/iotd, no login shell" \
    bash -c 'e=$(chroot "$1" getent passwd iotd) || { echo "no user iotd"; exit 1; }; echo "$e";
             IFS=: read -r _ _ uid _ _ home shell <<<"$e";
             [ "$uid" -lt 1000 ] && [ "$home" = /var/lib/iotd ] && [ "$shell" = /usr/sbin/nologin ]' _ "$root"
check "iotd is in group tss (the TPM device) and group iotd-admin exists (D-Bus methods)" \
    bash -c 'g=$(chroot "$1" id -nG iotd); echo "groups: $g"; grep -qw tss <<<"$g" && chroot "$1" getent group iotd-admin' _ "$root"
check "/etc/iotd/config.toml is installed, 0644 root, and has no uncommented key" \
    bash -c 'f="$1/etc/iotd/config.toml"; [ "$(stat -c "%a %U" "$f")" = "644 root" ] &&
             python3 -c "import sys, tomllib; d = tomllib.load(open(sys.argv[1], \"rb\")); assert all(v == {} for v in d.values()), d" "$f"' _ "$root"
check "every key in /etc/iotd/config.toml is documented in the reference config/iotd.toml" \
    python3 - "$root/etc/iotd/config.toml" config/iotd.toml <<'PY'
import re, sys
def keys(path):
    section, out = "", set()
    for line in open(path):
        if m := re.match(r"^\[([^\]]+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^#?([A-Za-z_]+)\s*=", line):
            out.add(f"{section}.{m.group(1)}")
    return out
missing = keys(sys.argv[1]) - keys(sys.argv[2])
assert not missing, f"not in the reference: {sorted(missing)}"
PY
check "unit installed and enabled (multi-user.target)" \
    bash -c '[ -f "$1/usr/lib/systemd/system/iotd.service" ] && [ "$(chroot "$1" systemctl is-enabled iotd.service)" = enabled ]' _ "$root"
check "iotd --version runs and prints $version" \
    bash -c 'v=$(chroot "$1" /usr/bin/iotd --version); echo "$v"; [ "$v" = "iotd $2" ]' _ "$root" "$version"
check "iotctl --help runs and prints its usage" \
    bash -c 'h=$(chroot "$1" /usr/bin/iotctl --help); echo "$h"; grep -q "^Usage: iotctl" <<<"$h"' _ "$root"
check "man iotd and man iotctl resolve" \
    bash -c 'chroot "$1" man -w iotd && chroot "$1" man -w iotctl' _ "$root"
check "the system trust store has Amazon's roots (the default cloud.ca_bundle)" \
    bash -c 'for n in 1 2 3 4; do [ -s "$1/etc/ssl/certs/Amazon_Root_CA_$n.pem" ] || { echo "no Amazon Root CA $n"; exit 1; }; done;
             grep -q "BEGIN CERTIFICATE" "$1/etc/ssl/certs/ca-certificates.crt"' _ "$root"
check "the D-Bus policy and interface description are well-formed XML" \
    python3 -c '
import sys, xml.parsers.expat
bad = 0
for path in sys.argv[1:]:
    try:
        xml.parsers.expat.ParserCreate().Parse(open(path, "rb").read(), True)
    except xml.parsers.expat.ExpatError as e:
        print(f"{path}: {e}"); bad = 1
sys.exit(bad)' "$root/usr/share/dbus-1/system.d/io.iotd.Agent1.conf" "$root/usr/share/dbus-1/interfaces/io.iotd.Agent1.xml"

# systemd-analyze exits 0 on warnings (unknown keys, bad values), so any output is a failure.
# It runs in the root where the unit's ExecStart and man pages exist, as on a gateway.
check "systemd-analyze verify iotd.service prints nothing" \
    bash -c 'out=$(chroot "$1" systemd-analyze verify /usr/lib/systemd/system/iotd.service 2>&1) && [ -z "$out" ] || { echo "$out"; exit 1; }' _ "$root"
t=$(now)
security=$(chroot "$root" systemd-analyze security --offline=true --threshold=15 \
    /usr/lib/systemd/system/iotd.service 2>&1) && security_rc=0 || security_rc=$?
exposure=$(sed -n 's/.*Overall exposure level for iotd.service: \([0-9.]*\).*/\1/p' <<<"$security")
if ((security_rc == 0)) && [ -n "$exposure" ] &&
    python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) <= 1.5 else 1)' "$exposure"; then
    ok "systemd-analyze security --offline=true: exposure $exposure (at most 1.5) ($(since "$t"))"
else
    sed 's/^/    /' <<<"$security"
    fail "systemd-analyze security: exposure ${exposure:-unknown}, must be at most 1.5"
fi
grep -E '^✗' <<<"$security" | sed 's/^/    /' || true

# --- 4. boot the root: iotd under a real systemd ---------------------------------------------

# nspawn boots the root with systemd as PID 1. A oneshot unit (ordered after
# multi-user.target, so after iotd's start job finished) looks at iotd, stops it, writes what
# it saw to /probe.out and powers the container off. A stand-in /dev/tpmrm0 (the null device's
# numbers, group tss, 0660) shows that the sandbox lets iotd open the TPM device node: a test
# drop-in writes to it from ExecStartPre=, which runs with the same sandbox, user and groups.
mkdir -p "$root/etc/iotd/config.d" "$root/etc/systemd/system/iotd.service.d" \
    "$root/etc/systemd/system/multi-user.target.wants"
cat >"$root/etc/iotd/config.d/10-test.toml" <<'EOF'
# The two required keys; no claim, so iotd stays unprovisioned and does not connect.
[cloud]
endpoint = "localhost"
[provisioning]
template = "packaging-test"
EOF
cat >"$root/etc/systemd/system/iotd.service.d/50-tpm-probe.conf" <<'EOF'
[Service]
ExecStartPre=/bin/sh -c 'if [ -e /dev/tpmrm0 ]; then echo probe >/dev/tpmrm0 && echo tpm-open-ok >&2; fi'
EOF
cat >"$root/usr/local/sbin/iotd-probe" <<'EOF'
#!/bin/sh
exec >/probe.out 2>&1
show() { systemctl show iotd.service -p "$1" --value; }
echo "boot.active=$(systemctl is-active iotd.service)"
echo "boot.status=$(show StatusText)"
# With a TPM device node, through the sandbox:
mknod -m 0660 /dev/tpmrm0 c 1 3 && chgrp tss /dev/tpmrm0
systemctl restart iotd.service
pid=$(show MainPID)
echo "active=$(systemctl is-active iotd.service)"
echo "substate=$(show SubState)"
echo "status=$(show StatusText)"
echo "uid=$(awk '/^Uid:/ {print $2}' /proc/$pid/status)"
echo "iotd_uid=$(id -u iotd)"
echo "groups=$(id -nG "$(awk '/^Uid:/ {print $2}' /proc/$pid/status)" 2>/dev/null) / $(awk '/^Groups:/ {$1=""; print}' /proc/$pid/status)"
echo "tss_gid=$(getent group tss | cut -d: -f3)"
echo "nonewprivs=$(awk '/^NoNewPrivs:/ {print $2}' /proc/$pid/status)"
echo "seccomp=$(awk '/^Seccomp:/ {print $2}' /proc/$pid/status)"
echo "capbnd=$(awk '/^CapBnd:/ {print $2}' /proc/$pid/status)"
echo "statedir=$(stat -c '%a %U' /var/lib/iotd)"
echo "tpm_in_sandbox=$(test -c /proc/$pid/root/dev/tpmrm0 && echo yes || echo no)"
echo "dev_in_sandbox=$(ls /proc/$pid/root/dev | tr '\n' ' ')"
echo "tpm_open=$(journalctl -b -u iotd.service -o cat | grep -c tpm-open-ok)"
echo "busname=$(busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus NameHasOwner s io.iotd.Agent1 2>&1)"
iotctl status >/tmp/iotctl-status 2>&1; echo "iotctl_status_rc=$?"
iotctl config check >/tmp/iotctl-config 2>&1; echo "iotctl_config_rc=$?"
start=$(date +%s%N)
systemctl stop iotd.service
end=$(date +%s%N)
echo "stop_ms=$(( (end - start) / 1000000 ))"
echo "result=$(show Result)"
echo "exit=$(show ExecMainStatus)"
echo "--- iotctl status"
cat /tmp/iotctl-status
echo "--- iotctl config check"
cat /tmp/iotctl-config
echo "--- journal"
journalctl -b -u iotd.service --no-pager -o short-monotonic | tail -n 40
systemctl poweroff --no-block
EOF
chmod 755 "$root/usr/local/sbin/iotd-probe"
cat >"$root/etc/systemd/system/iotd-probe.service" <<'EOF'
[Unit]
After=multi-user.target iotd.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/iotd-probe
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/iotd-probe.service "$root/etc/systemd/system/multi-user.target.wants/"
rm -f "$root/usr/sbin/policy-rc.d" "$root/probe.out"
umount -l "$root/proc" "$root/dev/pts"
t=$(now)
boot_rc=0
timeout 120 systemd-nspawn --quiet --register=no --keep-unit --directory="$root" --boot \
    --console=pipe >"$work/nspawn.log" 2>&1 </dev/null || boot_rc=$?
boot_time=$(since "$t")
if [ ! -s "$root/probe.out" ]; then
    tail -n 30 "$work/nspawn.log" | sed 's/^/    /'
    fail "booting the root with systemd-nspawn (rc $boot_rc): the probe wrote nothing"
else
    probe() { sed -n "s/^$1=//p" "$root/probe.out" | head -n 1; }
    show_probe() { sed 's/^/    /' "$root/probe.out"; }
    echo "boot test ($boot_time):"
    if [ "$(probe active)" = active ] && [ "$(probe substate)" = running ]; then
        ok "under systemd, iotd.service reaches active (running) in its sandbox: \"$(probe status)\""
    else
        show_probe; fail "iotd.service is not active (running) under systemd"
    fi
    if [ "$(probe uid)" = "$(probe iotd_uid)" ] && grep -qw "$(probe tss_gid)" <<<"$(probe groups)"; then
        ok "iotd runs as user iotd with group tss"
    else
        show_probe; fail "iotd does not run as iotd with group tss"
    fi
    if [ "$(probe nonewprivs)" = 1 ] && [ "$(probe seccomp)" = 2 ] && [ "$(probe capbnd)" = 0000000000000000 ]; then
        ok "sandbox in force: no_new_privs, seccomp filter, empty capability bounding set"
    else
        show_probe; fail "the sandbox is not in force"
    fi
    if [ "$(probe boot.active)" = active ]; then
        ok "without /dev/tpmrm0 (first boot of the root) the unit starts too: the bind is optional"
    else
        show_probe; fail "without /dev/tpmrm0 the unit does not start: $(probe boot.active)"
    fi
    # The pseudo devices systemd puts into a PrivateDevices= /dev (char/ holds its
    # major:minor links), and the TPM.
    unexpected=$(tr ' ' '\n' <<<"$(probe dev_in_sandbox)" | grep -vxE \
        'null|zero|full|random|urandom|tty|ptmx|pts|shm|mqueue|hugepages|log|stdin|stdout|stderr|fd|core|char|tpmrm0|' || true)
    if [ "$(probe tpm_in_sandbox)" = yes ] && [ "$(probe tpm_open)" = 1 ] && [ -z "$unexpected" ]; then
        ok "the private /dev has /dev/tpmrm0, writable by iotd through DeviceAllow and group tss, and only pseudo devices besides"
    else
        show_probe; fail "the TPM device node is not usable inside the sandbox, or devices are visible: ${unexpected//$'\n'/ }"
    fi
    if [ "$(probe statedir)" = "700 iotd" ]; then
        ok "StateDirectory /var/lib/iotd is 0700 iotd"
    else
        show_probe; fail "/var/lib/iotd is $(probe statedir), not 700 iotd"
    fi
    if [ "$(probe busname)" = "b true" ]; then
        ok "iotd owns io.iotd.Agent1 on the system bus (the installed policy lets user iotd own it)"
    else
        show_probe; fail "io.iotd.Agent1 has no owner on the system bus: $(probe busname)"
    fi
    if [ "$(probe iotctl_status_rc)" = 0 ]; then
        ok "iotctl status (root, over the system bus) answers"
    else
        show_probe; fail "iotctl status failed (rc $(probe iotctl_status_rc))"
    fi
    if [ "$(probe iotctl_config_rc)" = 0 ]; then
        ok "iotctl config check accepts the shipped /etc/iotd/config.toml with a drop-in setting the required keys"
    else
        show_probe; fail "iotctl config check refused the configuration (rc $(probe iotctl_config_rc))"
    fi
    if [ -n "$(probe stop_ms)" ] && [ "$(probe stop_ms)" -lt 5000 ] && [ "$(probe result)" = success ]; then
        ok "systemctl stop iotd: stopped cleanly in $(probe stop_ms) ms (limit 5000)"
    else
        show_probe; fail "iotd did not stop cleanly within 5 s (took $(probe stop_ms) ms, result $(probe result))"
    fi
fi
# Undo the test's own additions; what the agent wrote stays (the purge must remove it).
rm -rf "$root/etc/systemd/system/iotd-probe.service" "$root/etc/systemd/system/multi-user.target.wants/iotd-probe.service" \
    "$root/usr/local/sbin/iotd-probe" "$root/etc/systemd/system/iotd.service.d" "$root/probe.out"
rm -f "$root/etc/iotd/config.d/10-test.toml"
mount -t proc proc "$root/proc"
mount --bind /dev/pts "$root/dev/pts"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"

# --- 5. upgrade, remove, purge ---------------------------------------------------------------

echo "# edited by the administrator" >>"$root/etc/iotd/config.toml"
t=$(now)
if out=$(in_root apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold "$deb2_in_root" 2>&1); then
    ok "upgrade to $(basename "$deb2") over the installed package ($(since "$t"))"
else
    sed 's/^/    /' <<<"$out" | tail -n 30
    fail "upgrade to $(basename "$deb2")"
fi
check "after the upgrade: new version installed, the edited conffile kept, the unit still enabled" \
    bash -c 'v=$(chroot "$1" dpkg-query -W -f="\${Version}" iotd); echo "version $v"; [ "$v" = "$2" ] &&
             grep -q "edited by the administrator" "$1/etc/iotd/config.toml" &&
             [ "$(chroot "$1" systemctl is-enabled iotd.service)" = enabled ]' _ "$root" "$version-1+upgradetest"

t=$(now)
check "dpkg --remove: binaries and unit gone, conffile kept" \
    bash -c 'chroot "$1" dpkg --remove iotd && [ ! -e "$1/usr/bin/iotd" ] && [ ! -e "$1/usr/bin/iotctl" ] &&
             [ ! -e "$1/usr/lib/systemd/system/iotd.service" ] && [ -f "$1/etc/iotd/config.toml" ]' _ "$root"
check "dpkg --purge: no file named *iotd* left anywhere, /etc/iotd and /var/lib/iotd gone (the iotd user stays, as is usual on Debian)" \
    bash -c 'chroot "$1" dpkg --purge iotd || exit 1
             # /var/cache/man holds pages formatted by this test (systemd-analyze verify runs man).
             left=$(chroot "$1" find / -xdev \( -path /proc -o -path /tmp/debs -o -path /var/cache/man \) -prune -o -name "*iotd*" -print)
             [ -z "$left" ] || { echo "left behind:"; echo "$left"; exit 1; }
             [ ! -e "$1/etc/iotd" ] && [ ! -e "$1/var/lib/iotd" ] && chroot "$1" getent passwd iotd >/dev/null' _ "$root"
cleanup_root

# --- 6. piuparts -----------------------------------------------------------------------------

# Its own chroot: install, remove and purge, then a comparison of the whole file system before
# and after (the archive upgrade test does not apply: iotd is not in Debian). Its base has
# systemd and dbus already installed, as every gateway running iotd has: piuparts purges the
# dependencies it installed too, and systemd's purge leaves its own tmpfiles directories
# (/var/lib/private, /var/lib/systemd/coredump, ...), which it would blame on us. For the same
# reason no --pedantic-purge-test.
piuparts_base="$work/bookworm-systemd.tgz"
if [ ! -s "$piuparts_base" ] || [ "$piuparts_base" -ot "$base" ]; then
    t=$(now)
    rm -rf "$root"
    mkdir -p "$root"
    tar -C "$root" -xzf "$base"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    mount -t proc proc "$root/proc"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    { in_root apt-get update -qq && in_root apt-get install -y -qq --no-install-recommends systemd dbus &&
      in_root apt-get clean; } >/dev/null 2>&1 || fatal "installing systemd and dbus into the piuparts base"
    rm -f "$root/usr/sbin/policy-rc.d"
    umount -l "$root/proc"
    tar -C "$root" -czf "$piuparts_base.tmp" . && mv "$piuparts_base.tmp" "$piuparts_base"
    cleanup_root
    ok "piuparts base (bookworm minbase + systemd, dbus) cached as target/packaging/$(basename "$piuparts_base") ($(since "$t"))"
fi
t=$(now)
if piuparts --basetgz="$piuparts_base" --distribution=bookworm --mirror="$mirror" --no-eatmydata \
    --no-upgrade-test "$deb" >"$work/piuparts.log" 2>&1; then
    ok "piuparts: $(grep -Eo 'PASS: .*' "$work/piuparts.log" | tail -n 1) ($(since "$t"))"
else
    grep -E -A12 'FAIL|ERROR' "$work/piuparts.log" | tail -n 40 | sed 's/^/    /'
    fail "piuparts (log: target/packaging/piuparts.log)"
fi

summary
