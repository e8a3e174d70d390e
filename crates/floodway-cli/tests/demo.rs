//! The demo runs end to end on a real hub file and a real HTTP service, and checks itself (it
//! fails if the view is wrong, an outage faulted anything, or a fault is left after the fix).

use std::process::Command;

#[test]
fn demo_runs_and_checks_its_view() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_floodway"))
        .args([
            "demo", "--events", "8000", "--outage", "1", "--seed", "3", "--dir",
        ])
        .arg(dir.path())
        .output()
        .expect("the floodway binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("yes: zero lost, zero doubled"), "{stdout}");
    assert!(
        stdout.contains("faults caused by the outage                      0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("still failing                                    0"),
        "{stdout}"
    );
    assert!(
        dir.path().join("demo.db").exists(),
        "the hub is kept in --dir"
    );
    // A second run refuses to reuse the hub rather than mixing two demos.
    let again = Command::new(env!("CARGO_BIN_EXE_floodway"))
        .args(["demo", "--events", "10", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("starts from a fresh hub"));
}

#[test]
fn bad_arguments_say_what_is_wrong() {
    let out = Command::new(env!("CARGO_BIN_EXE_floodway"))
        .args(["demo", "--events", "0"])
        .output()
        .expect("the floodway binary runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--events must be at least 1"), "{stderr}");
}

/// The control-services demo on the real clock: every order one outcome, expiries on time.
#[test]
fn the_control_services_demo_ends_with_one_outcome_per_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(dir.path())
        .args([
            "cep", "demo", "--orders", "300", "--over", "1", "--window", "1s",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("an order with more than one outcome: 0"),
        "{text}"
    );
    assert!(
        text.contains("every order has exactly one outcome, and every expiry came within a second"),
        "{text}"
    );
}
