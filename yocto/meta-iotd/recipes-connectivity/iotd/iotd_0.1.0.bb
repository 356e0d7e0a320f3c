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
# The crates compiled in are under permissive licences (Apache-2.0, MIT, BSD, ISC); see
# Cargo.lock and `cargo metadata`.
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://packaging/debian/copyright;md5=1d131a273316b7ceb61bd55e1aa5dce0"

# libtss2-esys, -tctildr and -mu, found through pkg-config.
DEPENDS += "tpm2-tss"

# destsuffix=${BP} and no S: the checkout lands in the default S on scarthgap
# (${WORKDIR}/${BP}) and on wrynose (${UNPACKDIR}/${BP}) alike.
SRC_URI = "git://github.com/iotd/iotd.git;protocol=https;branch=main;destsuffix=${BP}"
# The commit of this release. The crate list below is generated from that commit's
# Cargo.lock, so the two change together (scripts/yocto-crates.py).
SRCREV = "01f32a5949e3a5e6aefcefdc1671ca8aa7cd2ca0"

require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates pkgconfig systemd useradd features_check

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

FILES:${PN} += "\
    ${datadir}/bash-completion \
    ${datadir}/dbus-1 \
    ${datadir}/fish \
    ${datadir}/zsh \
    ${nonarch_libdir}/sysusers.d \
    ${nonarch_libdir}/tmpfiles.d \
"
CONFFILES:${PN} = "${sysconfdir}/iotd/config.toml"

# ca-certificates: the default trust store for AWS IoT's server certificate (Amazon's roots).
# dbus: the system bus iotd serves on. libtss2-tcti-device: dlopened by libtss2-tctildr, so
# the shared-library scan cannot see it. tpm2-tss: its udev rules give /dev/tpmrm0 to group tss.
RDEPENDS:${PN} += "ca-certificates dbus libtss2 libtss2-tcti-device tpm2-tss"
# avahi-daemon announces a gateway waiting for an installer (DNS-SD _iotd-onboard._tcp) over
# its D-Bus API; without it onboarding works by address. A recommendation, so an image that
# provisions from its own claim can leave it out (BAD_RECOMMENDATIONS).
RRECOMMENDS:${PN} += "avahi-daemon"

# The crates need Rust 1.89 (zbus 6). Say so when the recipe is parsed, instead of failing in
# do_compile after fetching every crate: scarthgap's own Rust is 1.75 (see the layer's README).
def iotd_rust_too_old(d):
    # RUSTVERSION is a version pattern such as "1.75%" or "1.91.0%".
    version = (d.getVar("RUSTVERSION") or "").rstrip("%").split(".")
    if len(version) < 2 or not (version[0].isdigit() and version[1].isdigit()):
        return ""
    if (int(version[0]), int(version[1])) >= (1, 89):
        return ""
    return "iotd needs Rust 1.89 or newer, this build has %s; on scarthgap add the layer " \
           "meta-lts-mixins (branch scarthgap/rust)" % d.getVar("RUSTVERSION")

SKIP_RECIPE[iotd] = "${@iotd_rust_too_old(d)}"
