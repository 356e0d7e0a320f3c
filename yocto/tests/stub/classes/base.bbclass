# Stand-in for OE-core's base.bbclass (and the parse-time parts of insane.bbclass): the task
# chain, SKIP_RECIPE, and wrynose's fatal checks on S and UNPACKDIR.

addtask fetch
addtask unpack after do_fetch
addtask patch after do_unpack
addtask configure after do_patch
addtask compile after do_configure
addtask install after do_compile
addtask package after do_install
addtask build after do_package

base_do_fetch() {
	:
}
base_do_unpack() {
	:
}
base_do_patch() {
	:
}
base_do_configure() {
	:
}
base_do_compile() {
	:
}
base_do_install() {
	:
}
base_do_package() {
	:
}
base_do_build() {
	:
}
EXPORT_FUNCTIONS do_fetch do_unpack do_patch do_configure do_compile do_install do_package do_build

python () {
    # As OE-core's base.bbclass.
    pn = d.getVar('PN')
    skip_msg = d.getVarFlag('SKIP_RECIPE', pn)
    if skip_msg:
        raise bb.parse.SkipRecipe("Recipe will be skipped because: %s" % (skip_msg))

    # As wrynose's insane.bbclass, which makes these fatal.
    unpackdir = d.getVar('UNPACKDIR')
    if unpackdir:
        workdir = d.getVar('WORKDIR')
        s = d.getVar('S')
        if unpackdir == workdir:
            bb.fatal("UNPACKDIR must not be WORKDIR (%s)" % workdir)
        if s in (workdir + "/git", unpackdir + "/git"):
            bb.fatal("S = %s: the git fetcher unpacks into ${UNPACKDIR}/${BB_GIT_DEFAULT_DESTSUFFIX}" % s)
        if s == workdir or "${WORKDIR}" in (d.getVar('S', False) or ""):
            bb.fatal("S must not be, or be set relative to, WORKDIR: %s" % d.getVar('S', False))
}
