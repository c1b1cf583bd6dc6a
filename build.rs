//! Whether the tests that need a real server (moto for AWS, OpenBao for Vault) run or are marked
//! ignored. They run under `CI=true` (where a missing server then fails them) or when the server's
//! variable is set (`tests/run` sets both); otherwise `cargo test` lists them as ignored, with the
//! reason, instead of counting a test that never ran as passed.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(apono_test_moto)");
    println!("cargo::rustc-check-cfg=cfg(apono_test_bao)");
    for var in ["CI", "APONO_TEST_MOTO_SERVER", "APONO_TEST_BAO"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty());
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if ci || set("APONO_TEST_MOTO_SERVER") {
        println!("cargo::rustc-cfg=apono_test_moto");
    }
    if ci || set("APONO_TEST_BAO") {
        println!("cargo::rustc-cfg=apono_test_bao");
    }
}
