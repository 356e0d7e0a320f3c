//! Two things for the `iotd` binary.
//!
//! Packed relative relocations (DT_RELR) on GNU/Linux: a position-independent executable
//! carries one 24-byte relocation per pointer in its read-only data (vtables, string tables),
//! which RELR packs into a bitmap. For iotd that is about 320 KB of its stripped size, on a
//! gateway where flash is scarce (the budget is 5 MB). It needs binutils 2.38 or newer to link
//! and glibc 2.36 or newer to run (Debian 12; Yocto scarthgap has 2.39); an older glibc refuses
//! to start the binary with a clear "GLIBC_ABI_DT_RELR not found", never a crash.
//!
//! The installer's page, prepared for embedding: agent/page/dist/index.html (built from its
//! sources by `node agent/page/build.mjs`, and committed, so that building iotd needs no node)
//! is gzip-compressed with zopfli into `$OUT_DIR/page.html.gz`, which iotd sends as it is; and
//! the Content-Security-Policy that allows the page's one inline script and one inline style by
//! their SHA-256 goes to `$OUT_DIR/page.csp`. Compressed, the page costs iotd ~30 KB instead of
//! ~87 KB, with no decompressor in the binary: browsers take gzip.

use std::path::PathBuf;

use base64::Engine as _;
use sha2::Digest as _;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo::rustc-link-arg-bin=iotd=-Wl,-z,pack-relative-relocs");
    }

    let page = PathBuf::from("page/dist/index.html");
    println!("cargo::rerun-if-changed={}", page.display());
    let html = std::fs::read_to_string(&page)
        .unwrap_or_else(|e| panic!("reading the installer's page {}: {e}", page.display()));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    let mut compressed = Vec::new();
    zopfli::compress(
        zopfli::Options::default(),
        zopfli::Format::Gzip,
        html.as_bytes(),
        &mut compressed,
    )
    .unwrap_or_else(|e| panic!("compressing {}: {e}", page.display()));
    write(&out.join("page.html.gz"), &compressed);

    let script = inline(&html, "<script>", "</script>");
    let style = inline(&html, "<style>", "</style>");
    let hash = |text: &str| {
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text.as_bytes()))
    };
    // The page talks to the gateway that served it (fetch, EventSource) and may show the
    // camera's stream in a <video>; it loads nothing else and is never framed.
    let csp = format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; \
         media-src 'self' blob: mediastream:; img-src 'self' data:; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'",
        hash(script),
        hash(style)
    );
    write(&out.join("page.csp"), csp.as_bytes());
}

/// The text between the only `open` and its `close`.
fn inline<'a>(html: &'a str, open: &str, close: &str) -> &'a str {
    let mut parts = html.split(open);
    let (Some(_), Some(rest), None) = (parts.next(), parts.next(), parts.next()) else {
        panic!("the installer's page must have exactly one {open}");
    };
    rest.split_once(close)
        .unwrap_or_else(|| panic!("the installer's page has {open} without {close}"))
        .0
}

fn write(path: &std::path::Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
