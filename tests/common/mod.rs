//! Helpers shared by the integration tests: run the built binary, run the project's Python.
#![allow(dead_code)]
use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `mtx-hpc` with `args`.
pub fn mtx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mtx-hpc"))
        .args(args)
        .output()
        .expect("cannot start mtx-hpc")
}

/// The project's Python (scripts/setup.sh makes .venv); a missing one fails the test loudly.
pub fn python_bin() -> PathBuf {
    let py = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"));
    assert!(
        py.exists(),
        "{} is missing: run scripts/setup.sh first",
        py.display()
    );
    py
}

/// Runs the project's Python with `args`, panics with its stderr on failure, returns stdout.
pub fn python(args: &[&str]) -> String {
    let out = Command::new(python_bin())
        .args(args)
        .output()
        .expect("cannot start python");
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
