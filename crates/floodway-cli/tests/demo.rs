//! The demo runs end to end and checks itself (it fails if the view is wrong or a fault is
//! left after resubmission).

use std::process::Command;

#[test]
fn demo_runs_and_checks_its_view() {
    let out = Command::new(env!("CARGO_BIN_EXE_floodway"))
        .args(["demo", "--events", "8000", "--outage", "1", "--seed", "3"])
        .output()
        .expect("the floodway binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("view: matches the valid events"),
        "{stdout}"
    );
    assert!(stdout.contains("yes: zero lost, zero doubled"), "{stdout}");
    assert!(
        stdout.contains("still failing                                0"),
        "{stdout}"
    );
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
