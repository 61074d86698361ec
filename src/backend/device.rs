//! Which device a rank computes on: `--device auto|cpu|cuda`. Asks the CUDA driver what this
//! machine has without ever panicking: cudarc's dynamic loading panics on a missing library
//! or symbol, so the library is looked for first and the driver version read before any
//! other call (an older driver lacks newer symbols). `auto` falls back to the CPU with a
//! notice; `cuda` without a usable GPU is one clear error. Rank `r` takes GPU
//! `r % visible count`.
use anyhow::bail;

/// What the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceRequest {
    /// A CUDA GPU when a driver and a GPU are present, else the CPU (with a notice).
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// A CUDA GPU, or an error saying why there is none.
    Cuda,
}

/// The device chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda {
        ordinal: usize,
        name: String,
        /// As the driver reports it: 1000 major + 10 minor (13000 is CUDA 13.0).
        driver_version: i32,
    },
}

/// The device and, when `auto` fell back to the CPU, a notice for rank 0 to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub device: Device,
    pub notice: Option<String>,
}

/// What the CUDA driver says about this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaProbe {
    /// This binary was built without the `cuda` feature.
    NotBuilt,
    /// No loadable libcuda.so.
    NoDriver,
    /// The driver supports an older CUDA than this build needs.
    DriverTooOld { version: i32 },
    /// The driver is there but cuInit or a device query failed.
    Failed { version: i32, error: String },
    /// Working driver; the visible devices' names (possibly none).
    Devices { version: i32, names: Vec<String> },
}

/// The CUDA version this build's cudarc binds to (feature `cuda-13000`): older drivers lack
/// symbols it loads.
pub const REQUIRED_DRIVER: i32 = 13000;

/// `13000` -> `"13.0"`.
pub fn cuda_version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Work that runs on whichever backend `--device` gives: the one place that knows how to
/// make each backend (see [`run_on`]).
pub trait OnBackend {
    type Out;
    fn run<B: crate::backend::Backend>(self, be: &B) -> anyhow::Result<Self::Out>;
}

/// Resolves `req` (GPU `local_rank % visible`), prints a fallback notice, makes the backend
/// (`tf32`: TF32 tensor-core GEMMs on a GPU) and runs `job` on it.
pub fn run_on<J: OnBackend>(
    req: DeviceRequest,
    local_rank: usize,
    tf32: bool,
    job: J,
) -> anyhow::Result<J::Out> {
    let chosen = resolve(req, local_rank)?;
    if let Some(notice) = &chosen.notice {
        println!("{notice}");
    }
    match chosen.device {
        Device::Cpu => job.run(&crate::backend::cpu::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda { ordinal, name, .. } => {
            let be = crate::backend::cuda::Cuda::new(
                ordinal,
                crate::backend::cuda::CudaOptions { tf32 },
            )?;
            println!("GPU {ordinal}: {name}{}", if tf32 { " (TF32)" } else { "" });
            job.run(&be)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda { .. } => {
            let _ = tf32;
            bail!("this binary was built without the `cuda` feature")
        }
    }
}

/// Resolves `req` for the rank with local rank `local_rank`. Never panics; with `Cpu` it
/// does not touch the CUDA libraries at all.
pub fn resolve(req: DeviceRequest, local_rank: usize) -> anyhow::Result<Resolved> {
    if req == DeviceRequest::Cpu {
        return decide(req, local_rank, &CudaProbe::NotBuilt);
    }
    decide(req, local_rank, &probe())
}

/// The decision for a given probe (separate from [`probe`] so every path is testable
/// without a GPU).
pub fn decide(
    req: DeviceRequest,
    local_rank: usize,
    probe: &CudaProbe,
) -> anyhow::Result<Resolved> {
    let cpu = |notice: Option<String>| Resolved {
        device: Device::Cpu,
        notice,
    };
    let why = match (req, probe) {
        (DeviceRequest::Cpu, _) => return Ok(cpu(None)),
        (_, CudaProbe::Devices { version, names }) if !names.is_empty() => {
            let ordinal = local_rank % names.len();
            return Ok(Resolved {
                device: Device::Cuda {
                    ordinal,
                    name: names[ordinal].clone(),
                    driver_version: *version,
                },
                notice: None,
            });
        }
        (_, CudaProbe::NotBuilt) => "this mtx-hpc was built without the `cuda` feature".to_string(),
        (_, CudaProbe::NoDriver) => "no CUDA driver (libcuda.so) found on this machine".to_string(),
        (_, CudaProbe::DriverTooOld { version }) => format!(
            "the CUDA driver supports CUDA {}, this build needs {} or newer (update the NVIDIA driver)",
            cuda_version_string(*version),
            cuda_version_string(REQUIRED_DRIVER)
        ),
        (_, CudaProbe::Failed { version, error }) => format!(
            "the CUDA driver (CUDA {}) failed to start: {error}",
            cuda_version_string(*version)
        ),
        (_, CudaProbe::Devices { version, .. }) => format!(
            "the CUDA driver (CUDA {}) sees no GPU (check CUDA_VISIBLE_DEVICES and nvidia-smi)",
            cuda_version_string(*version)
        ),
    };
    match req {
        DeviceRequest::Cuda => bail!("--device cuda: {why}. HINT: use --device cpu (or auto)"),
        _ => Ok(cpu(Some(format!(
            "--device auto: {why}; running on the CPU"
        )))),
    }
}

/// Asks the driver, in an order that cannot panic on a machine without CUDA or with an old
/// driver: library present, version, then cuInit and the devices.
#[cfg(feature = "cuda")]
pub fn probe() -> CudaProbe {
    use cudarc::driver::{result, sys};
    // SAFETY: only tries to open the library.
    if !unsafe { sys::is_culib_present() } {
        return CudaProbe::NoDriver;
    }
    // cuDriverGetVersion exists in every driver; the rest may not in an older one.
    // catch_unwind is the last resort should a symbol still be missing.
    let run = || -> CudaProbe {
        let mut version = 0i32;
        // SAFETY: writes one int.
        let r = unsafe { sys::cuDriverGetVersion(&mut version) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return CudaProbe::Failed {
                version: 0,
                error: format!("cuDriverGetVersion: {r:?}"),
            };
        }
        if version < REQUIRED_DRIVER {
            return CudaProbe::DriverTooOld { version };
        }
        match result::init() {
            Ok(()) => {}
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => {
                return CudaProbe::Devices {
                    version,
                    names: Vec::new(),
                };
            }
            Err(e) => {
                return CudaProbe::Failed {
                    version,
                    error: format!("cuInit: {e:?}"),
                };
            }
        }
        let count = match result::device::get_count() {
            Ok(c) => c.max(0) as usize,
            Err(e) => {
                return CudaProbe::Failed {
                    version,
                    error: format!("cuDeviceGetCount: {e:?}"),
                };
            }
        };
        let names = (0..count)
            .map(|i| {
                result::device::get(i as i32)
                    .and_then(result::device::get_name)
                    .unwrap_or_else(|e| format!("GPU {i} (name unavailable: {e:?})"))
            })
            .collect();
        CudaProbe::Devices { version, names }
    };
    std::panic::catch_unwind(run).unwrap_or_else(|p| CudaProbe::Failed {
        version: 0,
        error: format!(
            "the CUDA library panicked: {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        ),
    })
}

/// Without the `cuda` feature there is nothing to ask.
#[cfg(not(feature = "cuda"))]
pub fn probe() -> CudaProbe {
    CudaProbe::NotBuilt
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(n: usize) -> CudaProbe {
        CudaProbe::Devices {
            version: 13000,
            names: (0..n).map(|i| format!("GPU{i}")).collect(),
        }
    }

    #[test]
    fn ranks_take_gpus_round_robin() {
        for (rank, want) in [(0, 0), (1, 1), (2, 2), (3, 0), (7, 1)] {
            let r = decide(DeviceRequest::Auto, rank, &gpus(3)).unwrap();
            assert_eq!(
                r.device,
                Device::Cuda {
                    ordinal: want,
                    name: format!("GPU{want}"),
                    driver_version: 13000
                }
            );
            assert_eq!(r.notice, None);
            assert_eq!(decide(DeviceRequest::Cuda, rank, &gpus(3)).unwrap(), r);
        }
    }

    #[test]
    fn cpu_is_always_the_cpu_without_a_notice() {
        for p in [gpus(2), CudaProbe::NoDriver, CudaProbe::NotBuilt] {
            let r = decide(DeviceRequest::Cpu, 5, &p).unwrap();
            assert_eq!(
                r,
                Resolved {
                    device: Device::Cpu,
                    notice: None
                }
            );
        }
        assert_eq!(resolve(DeviceRequest::Cpu, 0).unwrap().device, Device::Cpu);
    }

    #[test]
    fn every_unusable_machine_is_an_error_for_cuda_and_a_notice_for_auto() {
        let cases = [
            (CudaProbe::NotBuilt, "built without the `cuda` feature"),
            (
                CudaProbe::NoDriver,
                "no CUDA driver (libcuda.so) found on this machine",
            ),
            (
                CudaProbe::DriverTooOld { version: 12040 },
                "supports CUDA 12.4, this build needs 13.0",
            ),
            (
                CudaProbe::Failed {
                    version: 13000,
                    error: "cuInit: boom".into(),
                },
                "cuInit: boom",
            ),
            (gpus(0), "sees no GPU"),
        ];
        for (probe, why) in cases {
            let err = decide(DeviceRequest::Cuda, 0, &probe)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("--device cuda: "), "{err}");
            assert!(err.contains(why), "{err}");
            assert!(err.contains("--device cpu"), "{err}");
            let r = decide(DeviceRequest::Auto, 0, &probe).unwrap();
            assert_eq!(r.device, Device::Cpu);
            let notice = r.notice.expect("auto explains its fallback");
            assert!(
                notice.contains(why) && notice.contains("running on the CPU"),
                "{notice}"
            );
        }
    }

    #[test]
    fn version_strings() {
        assert_eq!(cuda_version_string(13000), "13.0");
        assert_eq!(cuda_version_string(12090), "12.9");
    }

    #[test]
    fn device_request_parses_from_the_command_line() {
        use clap::ValueEnum;
        assert_eq!(
            DeviceRequest::from_str("cuda", false),
            Ok(DeviceRequest::Cuda)
        );
        assert_eq!(
            DeviceRequest::from_str("auto", false),
            Ok(DeviceRequest::Auto)
        );
        assert_eq!(
            DeviceRequest::from_str("cpu", false),
            Ok(DeviceRequest::Cpu)
        );
        assert!(DeviceRequest::from_str("gpu", false).is_err());
        assert_eq!(DeviceRequest::default(), DeviceRequest::Auto);
    }

    /// On this machine, for real: whatever the probe finds, resolving never panics, and a
    /// machine without a usable GPU gives the error and the fallback.
    #[test]
    fn resolving_on_this_machine_never_panics() {
        let probe = probe();
        let cuda = resolve(DeviceRequest::Cuda, 0);
        let auto = resolve(DeviceRequest::Auto, 0).expect("auto always resolves");
        match probe {
            CudaProbe::Devices { ref names, .. } if !names.is_empty() => {
                assert!(matches!(cuda.unwrap().device, Device::Cuda { .. }));
                assert!(matches!(auto.device, Device::Cuda { .. }));
            }
            _ => {
                let e = cuda.unwrap_err().to_string();
                assert!(e.starts_with("--device cuda: "), "{e}");
                assert_eq!(auto.device, Device::Cpu);
                assert!(auto.notice.is_some());
            }
        }
    }

    /// This build machine has no NVIDIA driver: the exact message users see.
    #[cfg(feature = "cuda")]
    #[test]
    fn without_a_driver_cuda_is_one_clear_error() {
        if probe() != CudaProbe::NoDriver {
            eprintln!("skipped: this machine has a CUDA driver");
            return;
        }
        let e = resolve(DeviceRequest::Cuda, 3).unwrap_err().to_string();
        assert_eq!(
            e,
            "--device cuda: no CUDA driver (libcuda.so) found on this machine. \
             HINT: use --device cpu (or auto)"
        );
    }
}
