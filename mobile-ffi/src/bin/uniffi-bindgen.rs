//! Generates the Kotlin, Swift and Python bindings from the compiled library:
//! `cargo run -p care-mobile-ffi --features bindgen-cli --bin uniffi-bindgen -- generate \
//!  --library target/debug/libcare_mobile_ffi.so --language kotlin --out-dir bindings`
fn main() {
    uniffi::uniffi_bindgen_main()
}
