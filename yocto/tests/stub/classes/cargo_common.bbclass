# Stand-in for OE-core's cargo_common.bbclass: the variables a recipe touches.
CARGO_HOME = "${WORKDIR}/cargo_home"
CARGO_VENDORING_DIRECTORY = "${CARGO_HOME}/bitbake"
CARGO_SRC_DIR ??= ""
CARGO_MANIFEST_PATH ??= "${S}/${CARGO_SRC_DIR}/Cargo.toml"
CARGO_BUILD_FLAGS = "-v --frozen --target ${RUST_HOST_SYS} --release --manifest-path=${CARGO_MANIFEST_PATH}"
CARGO_TARGET_SUBDIR = "${RUST_HOST_SYS}/release"
