# Stand-in for OE-core's useradd.bbclass: its parse-time checks (update_useradd_after_parse).
DEPENDS:append = " ${USERADD_DEPENDS} shadow-native"

python () {
    useradd_packages = d.getVar('USERADD_PACKAGES')
    if not useradd_packages:
        bb.fatal("%s inherits useradd but doesn't set USERADD_PACKAGES" % d.getVar('FILE', False))
    for pkg in useradd_packages.split():
        if pkg not in d.getVar('PACKAGES').split():
            bb.fatal("USERADD_PACKAGES names %s, which is not in PACKAGES" % pkg)
        if not d.getVar('USERADD_PARAM:%s' % pkg) and not d.getVar('GROUPADD_PARAM:%s' % pkg) \
                and not d.getVar('GROUPMEMS_PARAM:%s' % pkg):
            bb.fatal("%s inherits useradd but doesn't set USERADD_PARAM, GROUPADD_PARAM or GROUPMEMS_PARAM for package %s"
                     % (d.getVar('FILE', False), pkg))
}
