# Stand-in for OE-core's bash-completion.bbclass: a ${PN}-bash-completion package with
# bash-completion's directories, that needs the bash-completion package. wrynose puts it before
# ${PN} (PACKAGE_BEFORE_PN), scarthgap after it (PACKAGES +=); either way ${PN}'s own FILES
# must not claim those directories.
DEPENDS:append:class-target = " bash-completion"
PACKAGE_BEFORE_PN += "${@'${PN}-bash-completion' if d.getVar('LAYERSERIES_CORENAMES') != 'scarthgap' else ''}"
PACKAGES += "${@'${PN}-bash-completion' if d.getVar('LAYERSERIES_CORENAMES') == 'scarthgap' else ''}"
FILES:${PN}-bash-completion = "${datadir}/bash-completion ${sysconfdir}/bash_completion.d"
RDEPENDS:${PN}-bash-completion = "bash-completion"
