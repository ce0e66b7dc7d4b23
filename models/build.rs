// espeak-rs-sys builds espeak-ng against the system libsonic (Debian's
// libsonic-dev) when it finds it, but does not link it.
fn main() {
    println!("cargo:rustc-link-lib=sonic");
}
