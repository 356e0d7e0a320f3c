# Stand-in for OE-core's cargo.bbclass: cargo_do_install as OE-core has it, and the crate
# fetcher's rule that every crate:// entry has a checksum.
inherit cargo_common

DEPENDS:append = " cargo-native"

cargo_do_compile() {
	:
}

# As OE-core: every executable cargo left in the target directory goes to ${bindir}.
cargo_do_install() {
	local have_installed=false
	for tgt in "${B}/target/${CARGO_TARGET_SUBDIR}/"*; do
		case $tgt in
		*.so|*.rlib)
			;;
		*examples)
			;;
		*)
			if [ -f "$tgt" ] && [ -x "$tgt" ]; then
				install -d "${D}${bindir}"
				install -m755 "$tgt" "${D}${bindir}"
				have_installed=true
			fi
			;;
		esac
	done
	if ! $have_installed; then
		echo "Did not find anything to install" >&2
		exit 1
	fi
}

EXPORT_FUNCTIONS do_compile do_install

python () {
    # bitbake's crate fetcher: the checksum of crate://crates.io/N/V is SRC_URI[<name>.sha256sum]
    # with name=N-V unless the entry names itself.
    for uri in (d.getVar('SRC_URI') or "").split():
        if not uri.startswith("crate://"):
            continue
        path, _, params = uri.partition(";")
        parts = path[len("crate://"):].split("/")
        if len(parts) != 3:
            bb.fatal("malformed crate URL %s" % uri)
        name = "%s-%s" % (parts[1], parts[2])
        for p in params.split(";"):
            if p.startswith("name="):
                name = p[len("name="):]
        checksum = d.getVarFlag('SRC_URI', name + '.sha256sum')
        if not checksum or len(checksum) != 64:
            bb.fatal("%s: no SRC_URI[%s.sha256sum]" % (uri, name))
}
