#!/usr/bin/env python3
"""Parses meta-iotd with bitbake's own parser (the `bb` modules of PyPI's bitbake-setup) for one
Yocto release, and checks what a real build would check early:

    bbparse.py --layer yocto/meta-iotd --source . --release wrynose
    bbparse.py ... --release scarthgap --mixin 1.91.0%      (scarthgap + meta-lts-mixins)
    bbparse.py ... --release scarthgap --mixin 1.84.1% --expect-skip "update"   (an old mixin)
    bbparse.py ... --release scarthgap --expect-missing-layer scarthgap-rust-mixin \
                   --expect-skip "add the layer meta-lts-mixins"   (stock scarthgap)

There is no OE-core here (no registry carries it): stub/conf/bitbake.conf and stub/classes/
stand in for it, with OE-core's values and its parse-time checks. On top of parsing, this runs
the recipe's do_install (with cargo's install step fed two stand-in binaries) against the source
tree, then checks that every installed file lands in a package (OE's installed-vs-shipped),
that the unit, its ExecStart and the conffiles are installed, the layer's dependencies are
the collections the release provides, the licence checksums match, every licence is in the
release's common licences or has its text in the source (NO_GENERIC_LICENSE, as
do_populate_lic wants), and the runtime dependencies are packages that exist (OE-core,
meta-tpm).
Prints one line per finding and exits non-zero on the first failure.
"""

import argparse
import fnmatch
import glob
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
STUB = os.path.join(HERE, "stub")

# Packages that exist for RDEPENDS: OE-core's ca-certificates and dbus, and the packages of
# meta-security's tpm2-tss recipe (meta-tpm): PACKAGES = tpm2-tss libtss2 libtss2-mu
# libtss2-tcti-device libtss2-tcti-mssim and their -dev/-staticdev/-dbg/-doc.
KNOWN_RUNTIME_PACKAGES = {
    "bash-completion", "ca-certificates", "dbus", "tpm2-tss", "libtss2", "libtss2-mu",
    "libtss2-tcti-device", "libtss2-tcti-mssim",
}

# The collections of the layers a build has: OE-core and meta-tpm always, meta-lts-mixins'
# scarthgap/rust (whose layer.conf also sets RUSTVERSION) with --mixin.
BASE_COLLECTIONS = ["core", "tpm-layer"]
MIXIN_COLLECTION = "scarthgap-rust-mixin"

# Where each file must land: the completions each in its shell's package.
PACKAGE_OF = {
    "${datadir}/bash-completion/completions/iotctl": "${PN}-bash-completion",
    "${datadir}/zsh/site-functions/_iotctl": "${PN}-zsh-completion",
    "${datadir}/fish/vendor_completions.d/iotctl.fish": "${PN}-fish-completion",
    "${bindir}/iotctl": "${PN}",
    "${mandir}/man1/iotctl.1": "${PN}-doc",
}

# What the image must get, as the .deb installs it (Debian-only files aside).
EXPECTED = [
    "${bindir}/iotd", "${bindir}/iotctl",
    "${systemd_system_unitdir}/iotd.service",
    "${nonarch_libdir}/sysusers.d/iotd.conf", "${nonarch_libdir}/tmpfiles.d/iotd.conf",
    "${sysconfdir}/iotd/config.toml",
    "${docdir}/iotd/examples/iotd.toml",
    "${datadir}/dbus-1/system.d/io.iotd.Agent1.conf",
    "${datadir}/dbus-1/interfaces/io.iotd.Agent1.xml",
    "${mandir}/man8/iotd.8", "${mandir}/man1/iotctl.1",
    "${datadir}/bash-completion/completions/iotctl",
    "${datadir}/zsh/site-functions/_iotctl",
    "${datadir}/fish/vendor_completions.d/iotctl.fish",
]


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def load_bb():
    # bitbake-setup's wheel has no hashserv; bb.siggen only needs this function from it.
    for name in ("hashserv", "hashserv.client"):
        module = types.ModuleType(name)
        module.is_valid_unihash = lambda unihash: True
        sys.modules[name] = module
    import bb  # noqa: F401
    import bb.data
    import bb.msg
    import bb.parse
    import bb.siggen
    bb.msg.init_msgconfig(False, 0, [])
    # bb.fatal() and parse errors are logged, then raised without their text: show the log.
    import logging
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("bitbake %(levelname)s: %(message)s"))
    logging.getLogger("BitBake").addHandler(handler)
    return bb


def common_licences(release):
    with open(os.path.join(STUB, f"common-licenses-{release}.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def parse(bb, layer, release, mixin, expect_missing_layer, topdir):
    d = bb.data.init()
    d.setVar("BBPATH", f"{STUB}:{layer}")
    d.setVar("TOPDIR", topdir)
    d.setVar("LAYERSERIES_CORENAMES", release)
    # COMMON_LICENSE_DIR (${TOPDIR}/licenses) as the release has it.
    os.makedirs(os.path.join(topdir, "licenses"))
    for name in common_licences(release):
        open(os.path.join(topdir, "licenses", name), "w").close()
    collections = list(BASE_COLLECTIONS)
    if mixin:
        # What meta-lts-mixins' layer.conf does, before bitbake.conf's weak default.
        d.setVar("RUSTVERSION", mixin)
        collections.append(MIXIN_COLLECTION)
    d.setVar("BBFILE_COLLECTIONS", " ".join(collections))
    d.setVar("__bbclasstype", "global")
    bb.parse.handle(os.path.join(STUB, "conf/bitbake.conf"), d, True)
    d.setVar("LAYERDIR", layer)
    bb.parse.handle(os.path.join(layer, "conf/layer.conf"), d, True)
    # Expand LAYERDIR into BBFILES etc. before it goes away, as bitbake's cooker does.
    d.expandVarref("LAYERDIR")
    d.delVar("LAYERDIR")
    present = set(d.getVar("BBFILE_COLLECTIONS").split())
    for coll in (d.getVar("BBFILE_COLLECTIONS") or "").split():
        if coll in collections:
            continue  # the other layers: not parsed here
        compat = (d.getVar(f"LAYERSERIES_COMPAT_{coll}") or "").split()
        if release not in compat:
            fail(f"layer {coll}: LAYERSERIES_COMPAT_{coll} = {' '.join(compat)!r} lacks {release}")
        depends = (d.getVar(f"LAYERDEPENDS_{coll}") or "").split()
        print(f"layer {coll}: compatible with {release}; depends on {' '.join(depends)}")
        # As bitbake's cooker checks them (a "name:version" pins a version; none here).
        missing = [dep for dep in (dep.split(":")[0] for dep in depends) if dep not in present]
        for dep in missing:
            message = (f"Layer '{coll}' depends on layer '{dep}', but this layer is not enabled "
                       f"in your configuration")
            if dep != expect_missing_layer:
                fail(message)
            print(f"as expected, bitbake would stop: {message}")
        if expect_missing_layer and expect_missing_layer not in missing:
            fail(f"layer {coll} does not depend on {expect_missing_layer} for {release}")
    bb.parse.BBHandler.inherit("base", "configuration INHERITs", 0, d)
    bb.parse.siggen = bb.siggen.init(d)
    d.setVar("__bbclasstype", "recipe")
    recipes = sorted(f for pattern in d.getVar("BBFILES").split() for f in glob.glob(pattern))
    if not recipes:
        fail(f"no recipes match BBFILES = {d.getVar('BBFILES')}")
    results = []
    for fn in recipes:
        try:
            variants = bb.parse.handle(fn, bb.data.createCopy(d))
        except Exception as e:  # ParseError, SkipRecipe raised outside anon python, bb.fatal
            fail(f"{os.path.relpath(fn, layer)}: {type(e).__name__}: {e or 'see the bitbake message above'}")
        results.append((fn, variants[""]))
    return results


def check_license(r, source):
    for entry in (r.getVar("LIC_FILES_CHKSUM") or "").split():
        path, *params = entry.split(";")
        if not path.startswith("file://"):
            fail(f"LIC_FILES_CHKSUM entry {entry}: not a file:// URL")
        rel = path[len("file://"):]
        params = dict(p.split("=", 1) for p in params)
        if rel.startswith("/"):
            continue  # ${COMMON_LICENSE_DIR}: not in this tree
        with open(os.path.join(source, rel), "rb") as f:
            lines = f.read().splitlines(keepends=True)
        begin = int(params.get("beginline", 1))
        end = int(params.get("endline", len(lines)))
        md5 = hashlib.md5(b"".join(lines[begin - 1:end])).hexdigest()
        if md5 != params.get("md5"):
            fail(f"LIC_FILES_CHKSUM: {rel} has md5 {md5}, the recipe says {params.get('md5')}")
        print(f"LIC_FILES_CHKSUM: {rel} md5 matches")


def check_licence_texts(r, release):
    """As do_populate_lic: each licence of LICENSE has a text in the release's common licences,
    or NO_GENERIC_LICENSE names one from LIC_FILES_CHKSUM; never both (license-exists and
    license-no-generic, QA warnings a reviewer wants gone)."""
    generic = set(common_licences(release))
    in_checksums = {entry.split(";")[0][len("file://"):]
                    for entry in (r.getVar("LIC_FILES_CHKSUM") or "").split()}
    print(f"LICENSE: {r.getVar('LICENSE')}")
    names = sorted(set(re.findall(r"[A-Za-z0-9.+_-]+", r.getVar("LICENSE"))))
    for name in names:
        own = r.getVarFlag("NO_GENERIC_LICENSE", name)
        if name in generic and own:
            fail(f"{name} is in {release}'s common licences, but NO_GENERIC_LICENSE[{name}] = {own}")
        if name not in generic and not own:
            fail(f"{release} has no common licence {name}, and NO_GENERIC_LICENSE[{name}] is unset")
        if own and own not in in_checksums:
            fail(f"NO_GENERIC_LICENSE[{name}] = {own}, which LIC_FILES_CHKSUM does not list")
        print(f"licence {name}: " + (f"its text from the source, {own}" if own else f"{release}'s common licence"))


def run_install(bb, r, source, tmp):
    import bb.data
    r = bb.data.createCopy(r)
    r.setVar("S", source)
    r.setVar("B", os.path.join(tmp, "build"))
    r.setVar("D", os.path.join(tmp, "image"))
    # Stand-ins for what `cargo build` leaves in the target directory: one executable per
    # -p package (our binaries are named after their packages), plus a non-binary.
    target = os.path.join(r.getVar("B"), "target", r.getVar("CARGO_TARGET_SUBDIR"))
    os.makedirs(target)
    flags = r.getVar("CARGO_BUILD_FLAGS").split()
    built = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == "-p"]
    for name in built:
        path = os.path.join(target, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, 0o755)
    with open(os.path.join(target, "libiotd.rlib"), "w"):
        pass
    script = os.path.join(tmp, "do_install.sh")
    with open(script, "w") as f:
        f.write("set -e\n")
        bb.data.emit_func("do_install", f, r)
        f.write("do_install\n")
    proc = subprocess.run(["bash", script], capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"do_install failed:\n{proc.stdout}{proc.stderr}")
    image = r.getVar("D")
    installed = sorted("/" + os.path.relpath(os.path.join(dp, f), image)
                       for dp, _, files in os.walk(image) for f in files)
    print(f"do_install: {len(installed)} files installed (cargo built: {' '.join(built)})")
    return r, installed


def package_of(r, path):
    # As OE's populate_packages: the first package in PACKAGES whose FILES pattern matches the
    # file or a directory above it.
    for pkg in r.getVar("PACKAGES").split():
        for pattern in (r.getVar(f"FILES:{pkg}") or "").split():
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/"):
                return pkg
    return None


def check_install(r, installed):
    pn = r.getVar("PN")
    where = {path: package_of(r, path) for path in installed}
    unshipped = [p for p, pkg in where.items() if pkg is None]
    if unshipped:
        fail("installed but not shipped in any package (OE: installed-vs-shipped): "
             + " ".join(unshipped))
    for path, pkg in where.items():
        print(f"  {pkg}: {path}")
    for want in EXPECTED:
        path = r.expand(want)
        if path not in where:
            fail(f"not installed: {path}")
    for want, pkg in PACKAGE_OF.items():
        path, pkg = r.expand(want), r.expand(pkg)
        if where.get(path) != pkg:
            fail(f"{path} is in {where.get(path)}, not {pkg}")
    for unit in (r.getVar(f"SYSTEMD_SERVICE:{pn}") or "").split():
        path = r.expand(f"${{systemd_system_unitdir}}/{unit}")
        if where.get(path) != pn:
            fail(f"SYSTEMD_SERVICE:{pn} names {unit}, but {path} is not in {pn}")
        with open(os.path.join(r.getVar("D"), path.lstrip("/"))) as f:
            for line in f:
                if line.startswith("ExecStart="):
                    binary = line.split("=", 1)[1].split()[0].lstrip("-@:+!")
                    if where.get(binary) != pn:
                        fail(f"{unit}: ExecStart={binary} is not installed in {pn}")
                    print(f"unit {unit}: ExecStart={binary} is in {pn}")
    for conffile in (r.getVar(f"CONFFILES:{pn}") or "").split():
        if where.get(conffile) != pn:
            fail(f"CONFFILES:{pn} names {conffile}, which is not in {pn}")
    print(f"CONFFILES:{pn}: {r.getVar(f'CONFFILES:{pn}')}")


def check_same_as_deb(r, cargo_toml):
    """Every file the .deb installs from the source tree (its cargo-deb assets and the unit
    files cargo-deb picks up) is installed by the recipe too, byte for byte."""
    import tomllib
    with open(cargo_toml, "rb") as f:
        deb = tomllib.load(f)["package"]["metadata"]["deb"]
    crate_dir = os.path.dirname(os.path.abspath(cargo_toml))
    sources = []
    for source, _dest, _mode in deb["assets"]:
        if source.startswith("target/") or "/debian/" in source:
            continue  # the binaries (checked above) and Debian-only files
        sources += glob.glob(os.path.join(crate_dir, source))
    unit_scripts = os.path.join(crate_dir, deb["systemd-units"]["unit-scripts"])
    unit = deb["systemd-units"]["unit-name"]
    sources += [os.path.join(unit_scripts, f"{unit}.{ext}") for ext in ("service", "sysusers", "tmpfile")]
    image = r.getVar("D")
    installed = {}
    for dp, _, files in os.walk(image):
        for f in files:
            with open(os.path.join(dp, f), "rb") as fh:
                installed.setdefault(hashlib.sha256(fh.read()).hexdigest(), []).append(f)
    missing = []
    for source in sorted(set(sources)):
        with open(source, "rb") as fh:
            if hashlib.sha256(fh.read()).hexdigest() not in installed:
                missing.append(os.path.relpath(source, os.path.dirname(crate_dir)))
    if missing:
        fail("the .deb installs these, the recipe does not: " + " ".join(missing))
    print(f"same files as the .deb: all {len(set(sources))} files it takes from the source tree")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", required=True)
    ap.add_argument("--source", required=True, help="the iotd source tree the recipe fetches")
    ap.add_argument("--release", required=True, choices=["scarthgap", "wrynose"])
    ap.add_argument("--mixin", metavar="RUSTVERSION",
                    help="meta-lts-mixins (scarthgap/rust) is in the build and sets RUSTVERSION")
    ap.add_argument("--expect-skip", help="the recipe must be skipped with this text")
    ap.add_argument("--expect-missing-layer",
                    help="the layer depends on this collection, which the build lacks")
    args = ap.parse_args()
    layer = os.path.abspath(args.layer)
    source = os.path.abspath(args.source)

    bb = load_bb()
    with tempfile.TemporaryDirectory() as tmp:
        for fn, r in parse(bb, layer, args.release, args.mixin, args.expect_missing_layer, tmp):
            name = os.path.relpath(fn, layer)
            skipped = r.getVar("__SKIPPED")
            if args.expect_skip:
                if not skipped or args.expect_skip not in skipped:
                    fail(f"{name}: expected to be skipped ({args.expect_skip!r}), got {skipped or 'parsed'}")
                print(f"{name}: skipped as expected: {skipped}")
                continue
            if skipped:
                fail(f"{name}: skipped: {skipped}")
            pn = r.getVar("PN")
            print(f"{name}: parsed, PN={pn} PV={r.getVar('PV')} S={r.getVar('S')}")
            src_uri = r.getVar("SRC_URI").split()
            print(f"SRC_URI: {len(src_uri)} entries, {sum(u.startswith('crate://') for u in src_uri)} crates; "
                  f"{next(u for u in src_uri if not u.startswith('crate://'))}")
            if r.getVar("S") != r.expand("${WORKDIR}/${BP}" if args.release == "scarthgap" else "${UNPACKDIR}/${BP}"):
                fail(f"S = {r.getVar('S')} is not the release's default")
            destsuffix = re.search(r";destsuffix=([^;]+)", src_uri[0])
            if not destsuffix or os.path.join(os.path.dirname(r.getVar("S")), destsuffix.group(1)) != r.getVar("S"):
                fail(f"the git checkout ({src_uri[0]}) does not land in S = {r.getVar('S')}")
            print(f"CARGO_BUILD_FLAGS: {r.getVar('CARGO_BUILD_FLAGS')}")
            print(f"DEPENDS: {r.getVar('DEPENDS')}")
            packages = r.getVar("PACKAGES").split()
            print(f"PACKAGES: {' '.join(packages)}")
            for pkg in packages:
                rdepends = (r.getVar(f"RDEPENDS:{pkg}") or "").split()
                if rdepends:
                    print(f"RDEPENDS:{pkg}: {' '.join(rdepends)}")
                unknown = [p for p in rdepends if p not in KNOWN_RUNTIME_PACKAGES | set(packages)]
                if unknown:
                    fail(f"RDEPENDS:{pkg} names packages no layer provides: {' '.join(unknown)}")
            print(f"USERADD_PARAM:{pn}: {r.getVar(f'USERADD_PARAM:{pn}')}")
            print(f"GROUPADD_PARAM:{pn}: {r.getVar(f'GROUPADD_PARAM:{pn}')}")
            print(f"SYSTEMD_SERVICE:{pn}: {r.getVar(f'SYSTEMD_SERVICE:{pn}')}")
            tasks = r.getVar("__BBTASKS", False) or []
            for task in ("do_fetch", "do_compile", "do_install", "do_update_crates"):
                if task not in tasks:
                    fail(f"task {task} missing")
            check_license(r, source)
            check_licence_texts(r, args.release)
            r2, installed = run_install(bb, r, source, tmp)
            check_install(r2, installed)
            check_same_as_deb(r2, os.path.join(source, "agent/Cargo.toml"))
    print(f"ok: {args.release}{' with meta-lts-mixins (Rust ' + args.mixin + ')' if args.mixin else ''}")


if __name__ == "__main__":
    main()
