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
