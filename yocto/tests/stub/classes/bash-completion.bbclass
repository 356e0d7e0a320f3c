# Stand-in for OE-core's bash-completion.bbclass: a ${PN}-bash-completion package, before
# ${PN}, with bash-completion's directories, that needs the bash-completion package.
DEPENDS:append:class-target = " bash-completion"
PACKAGE_BEFORE_PN += "${PN}-bash-completion"
FILES:${PN}-bash-completion = "${datadir}/bash-completion ${sysconfdir}/bash_completion.d"
RDEPENDS:${PN}-bash-completion = "bash-completion"
