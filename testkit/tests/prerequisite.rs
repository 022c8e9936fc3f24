//! What a test with a missing prerequisite does, seen from outside: the test binary is run again
//! with `CI` set and unset, and must fail under CI and pass (saying SKIPPED) elsewhere.

use std::process::Command;

use pleiades_testkit::prerequisite::{command, require};

/// Only does something when run by the test below (its child process).
#[test]
fn child_needs_a_tool_that_is_not_installed() {
    if std::env::var_os("PLEIADES_PREREQUISITE_CHILD").is_none() {
        return;
    }
    let Some(_tool) = require("child", command("pleiades-no-such-tool")) else { return };
    unreachable!("the tool does not exist");
}

fn run_child(ci: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_needs_a_tool_that_is_not_installed", "--test-threads=1"])
        .env("PLEIADES_PREREQUISITE_CHILD", "1")
        .env("CI", ci)
        .output()
        .unwrap()
}

#[test]
fn a_missing_prerequisite_fails_under_ci_and_skips_loudly_elsewhere() {
    let ci = run_child("true");
    let text = format!("{}{}", String::from_utf8_lossy(&ci.stdout), String::from_utf8_lossy(&ci.stderr));
    assert!(!ci.status.success(), "under CI the test must fail:\n{text}");
    assert!(text.contains("a prerequisite is missing under CI"), "{text}");

    let local = run_child("false");
    let stderr = String::from_utf8_lossy(&local.stderr);
    assert!(local.status.success(), "outside CI the test skips: {stderr}");
    assert!(stderr.contains("*** SKIPPED child"), "the skip is said on the terminal: {stderr}");
}
