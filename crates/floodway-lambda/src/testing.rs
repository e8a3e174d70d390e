//! The Node peer, for interop tests: scripts of `interop/als` run by Node against the
//! aws-lambda-stream and aws-kms-ee that `scripts/test` installs from npm (pinned by
//! `interop/als/package-lock.json`) into `target/als`.
//!
//! Node is `$FLOODWAY_NODE` or `node` on `PATH`; the packages are in `$FLOODWAY_ALS_DIR`, else
//! `target/als` of this repository. When either is missing the call panics and says how to
//! install it: an interop test must fail, not pass, without its peer.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// This repository's `interop/als`, where the scripts are.
fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/als")
}

/// The `node_modules` holding aws-lambda-stream.
///
/// # Panics
/// When aws-lambda-stream is not installed there.
pub fn node_modules() -> PathBuf {
    let dir = std::env::var_os("FLOODWAY_ALS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/als"));
    let modules = dir.join("node_modules");
    assert!(
        modules.join("aws-lambda-stream").is_dir(),
        "aws-lambda-stream is not installed in {}: run scripts/test (it installs the npm \
         packages pinned in interop/als), or set FLOODWAY_ALS_DIR",
        dir.display()
    );
    modules
}

/// Runs `interop/als/<script>` with Node, `input` on its stdin, in region `us-west-2`; its
/// output, as JSON.
///
/// # Panics
/// When Node or aws-lambda-stream is missing, or the script fails.
pub fn run_script(script: &str, input: &Value) -> Value {
    run_script_with(script, input, &[])
}

/// [`run_script`] with more environment variables (an AWS endpoint, credentials).
///
/// # Panics
/// As [`run_script`].
pub fn run_script_with(script: &str, input: &Value, env: &[(&str, &str)]) -> Value {
    let modules = node_modules();
    let node = std::env::var("FLOODWAY_NODE").unwrap_or_else(|_| "node".into());
    let mut child = Command::new(&node)
        .arg(scripts().join(script))
        .env("NODE_PATH", &modules)
        .env("AWS_REGION", "us-west-2")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("`{node}` does not run ({e}): install Node.js, or set FLOODWAY_NODE")
        });
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.to_string().as_bytes())
            .expect("the script reads its input");
    }
    let out = child.wait_with_output().expect("the script ends");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{script} printed no JSON ({e})"))
}
