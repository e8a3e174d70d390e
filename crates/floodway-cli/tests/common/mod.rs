//! Helpers shared by the command's tests.

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `floodway` binary in `dir` and waits for it.
pub(crate) fn floodway(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the floodway binary runs")
}

/// What a run printed, stdout then stderr.
pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
