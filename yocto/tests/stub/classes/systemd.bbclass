# Stand-in for OE-core's systemd.bbclass: its variables, the rule that SYSTEMD_PACKAGES are
# packages of the recipe with SYSTEMD_SERVICE set, and what its populate_packages step does to
# FILES (each unit goes into its package; the unit file must then exist, checked after
# do_install by bbparse.py).
SYSTEMD_PACKAGES ??= "${PN}"
SYSTEMD_AUTO_ENABLE ??= "enable"

python () {
    if not bb.utils.contains('DISTRO_FEATURES', 'systemd', True, False, d):
        return
    packages = d.getVar('PACKAGES').split()
    for pkg in d.getVar('SYSTEMD_PACKAGES').split():
        if pkg not in packages:
            bb.fatal("SYSTEMD_PACKAGES names %s, which is not in PACKAGES" % pkg)
        services = (d.getVar('SYSTEMD_SERVICE:' + pkg) or "").split()
        if not services:
            bb.fatal("SYSTEMD_SERVICE:%s is not set" % pkg)
        d.appendVar('FILES:' + pkg, " " + " ".join("${systemd_system_unitdir}/" + s for s in services))
}
