//! Device selection: `cuda`, `cuda:N`, `cpu`, or `auto` (CUDA when built with
//! it and present).

pub use candle_core::Device;

use crate::ModelError;

pub fn select_device(spec: &str) -> Result<Device, ModelError> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()
                .map_err(|_| {
                    ModelError::Invalid(format!("DEVICE {s:?}: expected cuda:N with N a number"))
                })?;
            Device::new_cuda(ordinal.unwrap_or(0)).map_err(ModelError::from)
        }
        other => Err(ModelError::Invalid(format!(
            "DEVICE {other:?}: expected cpu, cuda, cuda:N or auto"
        ))),
    }
}

/// Once per process, before the first MKL call (every model's `load` calls
/// it): Intel OpenMP's threads go to sleep as soon as a parallel region
/// ends (`KMP_BLOCKTIME=0` unless set) instead of spinning for 200 ms
/// against candle's and rayon's threads between matrix products, and MKL
/// uses as many threads as candle (`RAYON_NUM_THREADS`, else every core)
/// unless `MKL_NUM_THREADS` or `OMP_NUM_THREADS` say otherwise. Nothing
/// without the `mkl` feature.
pub fn cpu_math_init() {
    #[cfg(feature = "mkl")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            unsafe extern "C" {
                fn kmp_set_defaults(settings: *const std::ffi::c_char);
                fn MKL_Set_Num_Threads(threads: i32);
            }
            // SAFETY: both take plain values (a NUL-terminated string that
            // lives for the program) and only set the runtimes' defaults.
            unsafe {
                if std::env::var_os("KMP_BLOCKTIME").is_none() {
                    kmp_set_defaults(c"KMP_BLOCKTIME=0".as_ptr());
                }
                if std::env::var_os("MKL_NUM_THREADS").is_none()
                    && std::env::var_os("OMP_NUM_THREADS").is_none()
                {
                    MKL_Set_Num_Threads(candle_core::utils::get_num_threads() as i32);
                }
            }
        });
    }
}
