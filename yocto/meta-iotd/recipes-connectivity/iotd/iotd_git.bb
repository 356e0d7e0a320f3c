# nooelint: oelint.var.bbclassextend - a gateway daemon, for the target only: no native or nativesdk variant
SUMMARY = "Gateway agent that owns the device's AWS IoT identity, and its CLI"
DESCRIPTION = "iotd creates the device key (in a file or inside the TPM), provisions the \
               gateway with AWS IoT fleet provisioning, keeps an MQTT session with that \
               identity and rotates its certificate before it expires. It runs as a sandboxed \
               systemd service and shows its state on D-Bus (io.iotd.Agent1). iotctl is the \
               command-line tool for field operations."
HOMEPAGE = "https://github.com/iotd/iotd"
BUGTRACKER = "https://github.com/iotd/iotd/issues"
SECTION = "net"
CVE_PRODUCT = "iotd"
# iotd's own licence, and those of the crates linked into iotd and iotctl and of the npm
# packages bundled into iotd's installer page: written by scripts/third-party.py, which fails
# on a licence outside its allow-list. A crate's choice (A | B) is left out when one of its
# licences is here anyway; packaging/debian/copyright lists every crate under its licence.
LICENSE = "Apache-2.0 & BSD-3-Clause & ISC & MIT & Unicode-3.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57 \
                    file://LICENSES/Unicode-3.0.txt;md5=548c7e11b6a9486e064814cf1c708e5b"
# scarthgap's common licences predate SPDX's Unicode-3.0 (unicode-ident's): there its text
# comes from this source tree. Later releases have it, and warn when a recipe brings its own.
NO_GENERIC_LICENSE[Unicode-3.0] = "${@iotd_unless_common_licence(d, 'Unicode-3.0', 'LICENSES/Unicode-3.0.txt')}"

# libtss2-esys, -tctildr and -mu, found through pkg-config.
DEPENDS += "tpm2-tss"

# The project tags no releases yet: a snapshot of main, the version its crates declare.
PV = "0.1.0+git"

# destsuffix=${BP} and no S: the checkout lands in the default S on scarthgap
# (${WORKDIR}/${BP}) and on wrynose (${UNPACKDIR}/${BP}) alike.
SRC_URI = "git://github.com/iotd/iotd.git;protocol=https;branch=main;destsuffix=${BP}"
# The commit of this release. The crate list below is generated from that commit's
# Cargo.lock, so the two change together (scripts/third-party.py).
SRCREV = "27e7a62c9c100c0d9d957f1f38cbe65289f91d3c"

require ${BPN}-crates.inc

inherit bash-completion cargo cargo-update-recipe-crates pkgconfig systemd useradd features_check

# A Type=notify service with a systemd sandbox; there is no init script.
REQUIRED_DISTRO_FEATURES = "systemd"

# tss-esapi-sys ships pre-generated bindings for these architectures only; others need its
# generate-bindings feature and clang (as meta-parsec's parsec-service does).
COMPATIBLE_HOST = "(x86_64|aarch64|arm).*-linux"

# Build the two binaries only (the workspace also has test tools), and leave stripping to
# the packaging so the -dbg package has the symbols.
CARGO_BUILD_FLAGS += "-p iotd -p iotctl --config profile.release.strip=false"

do_install:append() {
    # Everything below is installed from packaging/, as the .deb installs it.
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/packaging/systemd/iotd.service ${D}${systemd_system_unitdir}/iotd.service
    install -d ${D}${nonarch_libdir}/sysusers.d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/packaging/systemd/iotd.sysusers ${D}${nonarch_libdir}/sysusers.d/iotd.conf
    install -m 0644 ${S}/packaging/systemd/iotd.tmpfile ${D}${nonarch_libdir}/tmpfiles.d/iotd.conf

    install -d ${D}${sysconfdir}/iotd ${D}${docdir}/${BPN}/examples
    install -m 0644 ${S}/packaging/config/config.toml ${D}${sysconfdir}/iotd/config.toml
    install -m 0644 ${S}/config/iotd.toml ${D}${docdir}/${BPN}/examples/iotd.toml

    install -d ${D}${datadir}/dbus-1/system.d ${D}${datadir}/dbus-1/interfaces
    install -m 0644 ${S}/packaging/dbus/io.iotd.Agent1.conf ${D}${datadir}/dbus-1/system.d/
    install -m 0644 ${S}/packaging/dbus/io.iotd.Agent1.xml ${D}${datadir}/dbus-1/interfaces/

    install -d ${D}${mandir}/man1 ${D}${mandir}/man8
    install -m 0644 ${S}/packaging/man/iotd.8 ${D}${mandir}/man8/
    install -m 0644 ${S}/packaging/man/iotctl*.1 ${D}${mandir}/man1/

    install -d ${D}${datadir}/bash-completion/completions ${D}${datadir}/zsh/site-functions \
        ${D}${datadir}/fish/vendor_completions.d
    install -m 0644 ${S}/packaging/completions/iotctl.bash ${D}${datadir}/bash-completion/completions/iotctl
    install -m 0644 ${S}/packaging/completions/_iotctl ${D}${datadir}/zsh/site-functions/_iotctl
    install -m 0644 ${S}/packaging/completions/iotctl.fish ${D}${datadir}/fish/vendor_completions.d/iotctl.fish
}

SYSTEMD_SERVICE:${PN} = "iotd.service"

# The agent's system user, in group tss for /dev/tpmrm0; iotd-admin may call its D-Bus
# methods. The same as packaging/systemd/iotd.sysusers, created at rootfs time so that a
# read-only rootfs works. tpm2-tss creates the tss group; USERADD_DEPENDS makes it exist in
# this recipe's sysroot before useradd runs.
USERADD_PACKAGES = "${PN}"
USERADD_DEPENDS = "tpm2-tss"
GROUPADD_PARAM:${PN} = "--system iotd-admin"
USERADD_PARAM:${PN} = "--system --user-group --home-dir ${localstatedir}/lib/iotd \
                       --no-create-home --shell ${base_sbindir}/nologin --groups tss iotd"

# iotctl's completions: bash's in ${PN}-bash-completion (the bash-completion class), zsh's and
# fish's in packages of their own, so an image without those shells does not carry them.
PACKAGE_BEFORE_PN += "${PN}-zsh-completion ${PN}-fish-completion"
FILES:${PN}-zsh-completion += "${datadir}/zsh"
FILES:${PN}-fish-completion += "${datadir}/fish"

FILES:${PN} += "\
    ${datadir}/dbus-1 \
    ${nonarch_libdir}/sysusers.d \
    ${nonarch_libdir}/tmpfiles.d \
"
CONFFILES:${PN} = "${sysconfdir}/iotd/config.toml"

# ca-certificates: the default trust store for AWS IoT's server certificate (Amazon's roots).
# dbus: the system bus iotd serves on. libtss2-tcti-device: libtss2-tctildr loads it with
# dlopen, so the shared-library scan cannot see it (libtss2 itself it does find). tpm2-tss: its
# udev rules give /dev/tpmrm0 to group tss.
RDEPENDS:${PN} += "ca-certificates dbus libtss2-tcti-device tpm2-tss"
# avahi-daemon announces a gateway waiting for an installer (DNS-SD _iotd-onboard._tcp) over
# its D-Bus API; without it onboarding works by address. A recommendation, so an image that
# provisions from its own claim can leave it out (BAD_RECOMMENDATIONS).
RRECOMMENDS:${PN} += "avahi-daemon"

# The crates need Rust 1.89 (zbus 6). Say so when the recipe is parsed, instead of failing in
# do_compile after fetching every crate: scarthgap's own Rust is 1.75, and meta-lts-mixins'
# scarthgap/rust branch brings a newer one (see the layer's README). Anonymous Python, so that
# every variant of the recipe (lib32-iotd, ...) is skipped, whatever its name.
IOTD_MIN_RUST = "1.89"

def iotd_rust_problem(d):
    """Why this build's Rust cannot build iotd, or "" when it can."""
    import bb.utils
    version = (d.getVar("RUSTVERSION") or "").rstrip("%")
    parts = version.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return ""
    need = d.getVar("IOTD_MIN_RUST")
    if bb.utils.vercmp_string_op(version, need, ">="):
        return ""
    if "scarthgap-rust-mixin" in (d.getVar("BBFILE_COLLECTIONS") or "").split():
        return "your meta-lts-mixins (scarthgap/rust) provides Rust %s; iotd needs %s or newer: " \
               "update that layer's checkout" % (version, need)
    return "iotd needs Rust %s or newer and this build has %s: add the layer meta-lts-mixins, " \
           "branch scarthgap/rust, which brings a newer Rust to scarthgap" % (need, version)

def iotd_unless_common_licence(d, name, path):
    """`path` when no licence directory of the build has `name`, else ""."""
    import os
    dirs = [d.getVar("COMMON_LICENSE_DIR")] + (d.getVar("LICENSE_PATH") or "").split()
    return "" if any(p and os.path.isfile(os.path.join(p, name)) for p in dirs) else path

# nooelint: oelint.task.noanonpython - the way to skip every variant of the recipe at parse time
python __anonymous() {
    problem = iotd_rust_problem(d)
    if problem:
        raise bb.parse.SkipRecipe(problem)
}
