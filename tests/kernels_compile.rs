//! CI's kernel check, no GPU needed: every `kernels/*.cu` compiles with NVRTC to PTX for
//! sm_90 (the GPU machine's H100/H200) and that PTX assembles with `ptxas -arch=sm_90`, both
//! from the CUDA 13.0 wheels scripts/setup.sh installs into `.venv`. A missing wheel is a
//! failure, not a skip: the project's set-up installs it.
//!
//! libnvrtc is found through LD_LIBRARY_PATH, which the dynamic loader reads only at process
//! start, so a test that finds it unset re-runs itself (just that test) with it set.
#![cfg(feature = "cuda")]

use mtx_hpc::backend::cuda::kernels::{self, KernelError};
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCH: (u32, u32) = (9, 0);
const CHILD_MARK: &str = "MTX_KERNELS_COMPILE_CHILD";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `.venv/lib/python3.*/site-packages/nvidia/cu13` of the CUDA 13 wheels.
fn wheel_dir() -> PathBuf {
    let lib = root().join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("site-packages/nvidia/cu13"))
            .find(|p| p.join("lib/libnvrtc.so.13").exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the NVRTC 13.0 wheel is not installed: no {}/python3.*/site-packages/nvidia/cu13/lib/libnvrtc.so.13. \
             HINT: run scripts/setup.sh (it installs nvidia-cuda-nvrtc==13.0.* and nvidia-cuda-nvcc==13.0.* into .venv)",
            lib.display()
        )
    })
}

/// Runs `body` in a process whose LD_LIBRARY_PATH holds the wheel's lib folder: directly
/// when it already does, else by re-running this test binary on test `name` alone.
fn with_wheel_libraries(name: &str, body: impl FnOnce(&Path)) {
    let wheel = wheel_dir();
    let lib = wheel.join("lib");
    let current = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    if std::env::var_os(CHILD_MARK).is_some() || current.split(':').any(|p| Path::new(p) == lib) {
        assert!(
            kernels::nvrtc_present(),
            "libnvrtc.so.13 does not load from {} (LD_LIBRARY_PATH={current})",
            lib.display()
        );
        body(&wheel);
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let path = if current.is_empty() {
        lib.display().to_string()
    } else {
        format!("{}:{current}", lib.display())
    };
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", path)
        .env(CHILD_MARK, "1")
        .output()
        .expect("re-running the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{name} failed in the child process:\n{text}"
    );
    assert!(
        text.contains("1 passed"),
        "{name} did not run in the child process:\n{text}"
    );
    println!("{text}");
}

#[test]
fn every_kernel_file_is_in_the_table() {
    let mut on_disk: Vec<String> = std::fs::read_dir(root().join("kernels"))
        .expect("kernels/")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = kernels::FILES.iter().map(|f| f.file.to_string()).collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "kernels/*.cu and backend::cuda::kernels::FILES differ"
    );
    for f in kernels::FILES {
        let text = std::fs::read_to_string(root().join("kernels").join(f.file)).unwrap();
        assert_eq!(
            text, f.source,
            "{} embedded text differs from the file",
            f.file
        );
    }
}

#[test]
fn every_kernel_compiles_with_nvrtc_and_assembles_with_ptxas_for_sm90() {
    with_wheel_libraries(
        "every_kernel_compiles_with_nvrtc_and_assembles_with_ptxas_for_sm90",
        |wheel| {
            let ptxas = wheel.join("bin/ptxas");
            assert!(
                ptxas.exists(),
                "ptxas not found at {}. HINT: run scripts/setup.sh (nvidia-cuda-nvcc==13.0.*)",
                ptxas.display()
            );
            let dir = tempfile::tempdir().unwrap();
            let mut failures = Vec::new();
            for f in kernels::FILES {
                let ptx = match kernels::compile(f.file, f.source, ARCH.0, ARCH.1) {
                    Ok(p) => p,
                    Err(e) => {
                        failures.push(e.to_string());
                        continue;
                    }
                };
                let entries = kernels::ptx_entries(&ptx);
                for k in f.kernels {
                    if !entries.iter().any(|e| e == k) {
                        failures.push(format!("kernels/{}: no entry point {k} in the PTX", f.file));
                    }
                }
                let path = dir.path().join(f.file.replace(".cu", ".ptx"));
                std::fs::write(&path, &ptx).unwrap();
                let out = Command::new(&ptxas)
                    .args(["-arch=sm_90", "-v", "-o"])
                    .arg(dir.path().join(f.file.replace(".cu", ".cubin")))
                    .arg(&path)
                    .output()
                    .expect("running ptxas");
                let log = String::from_utf8_lossy(&out.stderr);
                if !out.status.success() {
                    failures.push(format!(
                        "kernels/{}: ptxas -arch=sm_90 failed:\n{log}",
                        f.file
                    ));
                } else {
                    // Register use and spills, for the reader of the test log.
                    let summary: Vec<&str> = log
                        .lines()
                        .filter(|l| {
                            l.contains("Compiling entry")
                                || l.contains("registers")
                                || l.contains("spill")
                        })
                        .collect();
                    println!("kernels/{}:\n{}", f.file, summary.join("\n"));
                }
            }
            assert!(failures.is_empty(), "{}", failures.join("\n\n"));
        },
    );
}

#[test]
fn a_broken_kernel_is_an_error_naming_the_file_with_nvrtc_s_log() {
    with_wheel_libraries(
        "a_broken_kernel_is_an_error_naming_the_file_with_nvrtc_s_log",
        |_| {
            let src =
                "extern \"C\" __global__ void broken(float* x) {\n    x[0] = undefined_name;\n}\n";
            let err = kernels::compile("broken.cu", src, ARCH.0, ARCH.1).unwrap_err();
            let KernelError::Compile {
                ref file, ref log, ..
            } = err
            else {
                panic!("expected a compile error, got {err:?}");
            };
            assert_eq!(file, "broken.cu");
            // NVRTC's log, with the line inside the file (the #line after the prelude).
            assert!(log.contains("undefined_name"), "log: {log}");
            assert!(log.contains("broken.cu(2)"), "log: {log}");
            let msg = err.to_string();
            assert!(
                msg.contains("kernels/broken.cu") && msg.contains("undefined_name"),
                "{msg}"
            );
        },
    );
}
