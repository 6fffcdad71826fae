// inkwell is built with `no-libffi-linking`: LLVM's static libraries still need libffi, which
// Debian ships as a position-independent static archive (libffi-dev: libffi_pic.a).
fn main() {
    println!("cargo:rustc-link-lib=static=ffi_pic");
    println!("cargo:rustc-link-search=native=/usr/lib/x86_64-linux-gnu");
}
