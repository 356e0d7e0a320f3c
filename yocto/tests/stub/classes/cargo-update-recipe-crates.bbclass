# Stand-in for OE-core's cargo-update-recipe-crates.bbclass: the task and its variable.
addtask do_update_crates after do_patch
do_update_crates[nostamp] = "1"
CARGO_LOCK_SRC_DIR ??= "${S}"
do_update_crates() {
	:
}
