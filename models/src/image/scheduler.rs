//! The samplers the supported checkpoints name in
//! `scheduler/scheduler_config.json`, following diffusers'
//! `scheduling_euler_discrete.py`, `scheduling_euler_ancestral_discrete.py`
//! and `scheduling_ddim.py`: the same betas (computed in f32 as torch
//! does), timestep spacings, sigmas and update rules. Anything else is
//! refused at load.

use candle_core::{Result, Tensor};

use super::config::{default_spacing, SchedulerConfig};
use crate::ModelError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Euler,
    EulerAncestral,
    Ddim,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// A sampler ready for one run of `steps` steps.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub kind: Kind,
    prediction: Prediction,
    /// What the UNet is given at each step.
    pub timesteps: Vec<f64>,
    /// Euler: one sigma per step and the final one.
    sigmas: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    train_steps: usize,
    steps: usize,
    clip_sample: Option<f64>,
    pub init_noise_sigma: f64,
}

/// The validated config: what [`Scheduler::new`] needs per run.
#[derive(Debug, Clone)]
pub struct SchedulerSpec {
    kind: Kind,
    prediction: Prediction,
    spacing: Spacing,
    config: SchedulerConfig,
}

fn refuse(field: &str, value: impl std::fmt::Debug) -> ModelError {
    ModelError::Format(format!(
        "scheduler/scheduler_config.json: {field} = {value:?} is not supported (Euler, Euler ancestral and DDIM with linear or scaled_linear betas are)"
    ))
}

impl SchedulerSpec {
    pub fn new(config: SchedulerConfig) -> std::result::Result<Self, ModelError> {
        let kind = match config.class_name.as_str() {
            "EulerDiscreteScheduler" => Kind::Euler,
            "EulerAncestralDiscreteScheduler" => Kind::EulerAncestral,
            "DDIMScheduler" => Kind::Ddim,
            other => return Err(refuse("_class_name", other)),
        };
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => return Err(refuse("prediction_type", other)),
        };
        let spacing_name = config
            .timestep_spacing
            .clone()
            .unwrap_or_else(|| default_spacing(&config.class_name));
        let spacing = match spacing_name.as_str() {
            "linspace" => Spacing::Linspace,
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            other => return Err(refuse("timestep_spacing", other)),
        };
        if !matches!(config.beta_schedule.as_str(), "linear" | "scaled_linear") {
            return Err(refuse("beta_schedule", &config.beta_schedule));
        }
        if config.trained_betas.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(refuse("trained_betas", "set"));
        }
        if config.rescale_betas_zero_snr {
            return Err(refuse("rescale_betas_zero_snr", true));
        }
        if config.thresholding {
            return Err(refuse("thresholding", true));
        }
        if kind == Kind::Euler {
            for (name, v) in [
                ("use_karras_sigmas", config.use_karras_sigmas),
                ("use_exponential_sigmas", config.use_exponential_sigmas),
                ("use_beta_sigmas", config.use_beta_sigmas),
            ] {
                if v == Some(true) {
                    return Err(refuse(name, true));
                }
            }
            if config.interpolation_type != "linear" {
                return Err(refuse("interpolation_type", &config.interpolation_type));
            }
            if config.timestep_type != "discrete" {
                return Err(refuse("timestep_type", &config.timestep_type));
            }
            if !matches!(config.final_sigmas_type.as_str(), "zero" | "sigma_min") {
                return Err(refuse("final_sigmas_type", &config.final_sigmas_type));
            }
        }
        if config.num_train_timesteps == 0 {
            return Err(refuse("num_train_timesteps", 0));
        }
        Ok(Self {
            kind,
            prediction,
            spacing,
            config,
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `set_timesteps(steps)`.
    pub fn build(&self, steps: usize) -> Scheduler {
        let c = &self.config;
        let t_train = c.num_train_timesteps;
        // betas and alphas_cumprod in f32, as torch computes them.
        let betas: Vec<f32> = match c.beta_schedule.as_str() {
            "scaled_linear" => linspace_f32(
                c.beta_start.sqrt() as f32,
                c.beta_end.sqrt() as f32,
                t_train,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            _ => linspace_f32(c.beta_start as f32, c.beta_end as f32, t_train),
        };
        let mut alphas_cumprod = Vec::with_capacity(t_train);
        let mut acc = 1f32;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let timesteps: Vec<f64> = match (self.kind, self.spacing) {
            (Kind::Ddim, Spacing::Linspace) => linspace_f64(0.0, (t_train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even())
                .collect(),
            (_, Spacing::Linspace) => linspace_f64(0.0, (t_train - 1) as f64, steps)
                .into_iter()
                .map(|t| t as f32 as f64)
                .rev()
                .collect(),
            (_, Spacing::Leading) => {
                let ratio = t_train / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + c.steps_offset) as f64)
                    .collect()
            }
            (_, Spacing::Trailing) => {
                let ratio = t_train as f64 / steps as f64;
                let mut out = Vec::new();
                let mut x = t_train as f64;
                while x > 0.0 && out.len() < steps {
                    out.push(x.round_ties_even() - 1.0);
                    x -= ratio;
                }
                out
            }
        };
        let (sigmas, init_noise_sigma) = match self.kind {
            Kind::Ddim => (Vec::new(), 1.0),
            Kind::Euler | Kind::EulerAncestral => {
                let all: Vec<f32> = alphas_cumprod
                    .iter()
                    .map(|a| ((1.0 - a) / a).sqrt())
                    .collect();
                let mut sigmas: Vec<f64> = timesteps
                    .iter()
                    .map(|&t| interp(t, &all) as f32 as f64)
                    .collect();
                let last = if self.kind == Kind::Euler && c.final_sigmas_type == "sigma_min" {
                    all[0] as f64
                } else {
                    0.0
                };
                sigmas.push(last);
                let max = sigmas.iter().copied().fold(0.0, f64::max);
                let init = if self.spacing == Spacing::Leading {
                    (max * max + 1.0).sqrt()
                } else {
                    max
                };
                (sigmas, init)
            }
        };
        let final_alpha_cumprod = if c.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0] as f64
        };
        let clip_sample = match (self.kind, c.clip_sample.unwrap_or(true)) {
            (Kind::Ddim, true) => Some(c.clip_sample_range.unwrap_or(1.0)),
            _ => None,
        };
        Scheduler {
            kind: self.kind,
            prediction: self.prediction,
            timesteps,
            sigmas,
            alphas_cumprod,
            final_alpha_cumprod,
            train_steps: t_train,
            steps,
            clip_sample,
            init_noise_sigma,
        }
    }
}

fn linspace_f32(a: f32, b: f32, n: usize) -> Vec<f32> {
    // torch.linspace: start + i * step, the second half from the end.
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                a + step * i as f32
            } else {
                b - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

fn linspace_f64(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f64;
    (0..n).map(|i| a + step * i as f64).collect()
}

/// `np.interp(t, arange(len(ys)), ys)`.
fn interp(t: f64, ys: &[f32]) -> f64 {
    if t <= 0.0 {
        return ys[0] as f64;
    }
    let last = ys.len() - 1;
    if t >= last as f64 {
        return ys[last] as f64;
    }
    let i = t.floor() as usize;
    let f = t - i as f64;
    ys[i] as f64 + (ys[i + 1] as f64 - ys[i] as f64) * f
}

impl Scheduler {
    /// `scale_model_input`.
    pub fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        match self.kind {
            Kind::Ddim => Ok(sample.clone()),
            _ => {
                let s = self.sigmas[step];
                sample / (s * s + 1.0).sqrt()
            }
        }
    }

    /// `step`: the sample for the next timestep. `noise` (Euler ancestral
    /// only): standard normal noise of the sample's shape.
    pub fn step(
        &self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self.kind {
            Kind::Euler | Kind::EulerAncestral => {
                let sigma = self.sigmas[step];
                let x0 = match self.prediction {
                    Prediction::Epsilon => (sample - (model_output * sigma)?)?,
                    Prediction::VPrediction => {
                        let a = (model_output * (-sigma / (sigma * sigma + 1.0).sqrt()))?;
                        (a + (sample / (sigma * sigma + 1.0))?)?
                    }
                    Prediction::Sample => model_output.clone(),
                };
                let derivative = ((sample - &x0)? / sigma)?;
                let next = self.sigmas[step + 1];
                if self.kind == Kind::Euler {
                    return sample + (derivative * (next - sigma))?;
                }
                let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
                let down = (next * next - up * up).sqrt();
                let prev = (sample + (derivative * (down - sigma))?)?;
                match noise {
                    Some(n) if up > 0.0 => prev + (n * up)?,
                    _ => Ok(prev),
                }
            }
            Kind::Ddim => {
                let t = self.timesteps[step] as usize;
                let prev_t = t as i64 - (self.train_steps / self.steps) as i64;
                let a_t = self.alphas_cumprod[t] as f64;
                let a_prev = if prev_t >= 0 {
                    self.alphas_cumprod[prev_t as usize] as f64
                } else {
                    self.final_alpha_cumprod
                };
                let b_t = 1.0 - a_t;
                let (x0, eps) = match self.prediction {
                    Prediction::Epsilon => {
                        let x0 = ((sample - (model_output * b_t.sqrt())?)? / a_t.sqrt())?;
                        (x0, model_output.clone())
                    }
                    Prediction::Sample => {
                        let eps = ((sample - (model_output * a_t.sqrt())?)? / b_t.sqrt())?;
                        (model_output.clone(), eps)
                    }
                    Prediction::VPrediction => {
                        let x0 = ((sample * a_t.sqrt())? - (model_output * b_t.sqrt())?)?;
                        let eps = ((model_output * a_t.sqrt())? + (sample * b_t.sqrt())?)?;
                        (x0, eps)
                    }
                };
                let x0 = match self.clip_sample {
                    Some(r) => x0.clamp(-r, r)?,
                    None => x0,
                };
                (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(class: &str, spacing: &str) -> SchedulerSpec {
        let config: SchedulerConfig = serde_json::from_value(serde_json::json!({
            "_class_name": class,
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1,
            "timestep_spacing": spacing, "clip_sample": false, "set_alpha_to_one": false
        }))
        .unwrap();
        SchedulerSpec::new(config).unwrap()
    }

    #[test]
    fn timesteps_follow_each_spacing() {
        assert_eq!(
            spec("EulerDiscreteScheduler", "trailing")
                .build(4)
                .timesteps,
            vec![999.0, 749.0, 499.0, 249.0]
        );
        assert_eq!(
            spec("DDIMScheduler", "leading").build(4).timesteps,
            vec![751.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(
            spec("EulerDiscreteScheduler", "trailing")
                .build(1)
                .timesteps,
            vec![999.0]
        );
        let lin = spec("EulerDiscreteScheduler", "linspace")
            .build(3)
            .timesteps;
        assert_eq!(lin, vec![999.0, 499.5, 0.0]);
    }

    #[test]
    fn an_unknown_sampler_is_refused_by_name() {
        let config: SchedulerConfig = serde_json::from_value(serde_json::json!({
            "_class_name": "LCMScheduler"
        }))
        .unwrap();
        let err = SchedulerSpec::new(config).unwrap_err().to_string();
        assert!(err.contains("LCMScheduler"), "{err}");
    }
}
