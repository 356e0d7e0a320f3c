//! Renders the man pages from the clap definition, so they cannot drift from `--help`.
//!
//! They land in `$OUT_DIR/man/`: `iotctl.1` and one page per subcommand (`iotctl-status.1`,
//! `iotctl-check.1`, `iotctl-config-check.1`, …). Packaging installs them from there (find the
//! directory with `cargo build --message-format=json`, or `find target -path '*iotctl-*/out/man'`)
//! into /usr/share/man/man1/.

use std::path::PathBuf;

#[path = "src/cli.rs"]
#[allow(dead_code)]
mod cli;

fn main() -> std::io::Result<()> {
    println!("cargo::rerun-if-changed=src/cli.rs");
    let out_dir = std::env::var_os("OUT_DIR")
        .map(PathBuf::from)
        .ok_or_else(|| std::io::Error::other("cargo did not set OUT_DIR"))?;
    let man_dir = out_dir.join("man");
    std::fs::create_dir_all(&man_dir)?;
    let command = <cli::Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(command, &man_dir)
}
