//! diffusers' `UniPCMultistepScheduler` with flow sigmas and
//! `flow_prediction`, the scheduler Wan 2.1 and 2.2 ship: the same sigma
//! table (numpy float64, then float32), the same float32 scalar
//! arithmetic, the predictor (UniP) and corrector (UniC) in their B(h)
//! forms, lower orders to warm up and to finish.

use candle_core::Tensor;

use super::config::FlowSchedulerConfig;
use crate::ModelError;

/// A UniPC run over one schedule; `step` once per timestep, in order.
pub struct UniPc {
    config: FlowSchedulerConfig,
    sigmas: Vec<f32>,
    timesteps: Vec<i64>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    last_sample: Option<Tensor>,
    this_order: usize,
    step_index: usize,
}

impl UniPc {
    /// Checks the config names what is ported.
    pub fn check(config: &FlowSchedulerConfig) -> Result<(), ModelError> {
        let f = "scheduler/scheduler_config.json";
        let bad = |field: &str, value: String, why: &str| {
            Err(ModelError::Format(format!(
                "{f}: {field} = {value} is not supported ({why})"
            )))
        };
        if config.class_name != "UniPCMultistepScheduler" {
            return bad(
                "_class_name",
                config.class_name.clone(),
                "Wan checkpoints ship UniPCMultistepScheduler with flow sigmas; no other is ported",
            );
        }
        if config.use_flow_sigmas != Some(true) || config.prediction_type != "flow_prediction" {
            return bad(
                "use_flow_sigmas / prediction_type",
                format!("{:?} / {}", config.use_flow_sigmas, config.prediction_type),
                "Wan's flow matching: use_flow_sigmas true, flow_prediction",
            );
        }
        if !config.predict_x0
            || config.thresholding
            || config.solver_p.as_ref().is_some_and(|v| !v.is_null())
        {
            return bad(
                "predict_x0 / thresholding / solver_p",
                format!(
                    "{} / {} / {:?}",
                    config.predict_x0, config.thresholding, config.solver_p
                ),
                "only the data-prediction UniPC without thresholding",
            );
        }
        if !matches!(config.solver_type.as_str(), "bh1" | "bh2") {
            return bad("solver_type", config.solver_type.clone(), "bh1 or bh2");
        }
        if !(1..=3).contains(&config.solver_order) {
            return bad("solver_order", config.solver_order.to_string(), "1 to 3");
        }
        if config.use_dynamic_shifting
            || [
                config.use_karras_sigmas,
                config.use_exponential_sigmas,
                config.use_beta_sigmas,
            ]
            .contains(&Some(true))
        {
            return bad(
                "use_dynamic_shifting / use_*_sigmas",
                "true".into(),
                "flow sigmas with a fixed flow_shift only",
            );
        }
        if !matches!(config.final_sigmas_type.as_str(), "zero" | "sigma_min") {
            return bad(
                "final_sigmas_type",
                config.final_sigmas_type.clone(),
                "zero or sigma_min",
            );
        }
        Ok(())
    }

    /// `set_timesteps(steps)`.
    pub fn new(config: &FlowSchedulerConfig, steps: usize) -> Result<Self, ModelError> {
        Self::check(config)?;
        if steps == 0 {
            return Err(ModelError::Invalid("steps must be at least 1".into()));
        }
        let n = config.num_train_timesteps as f64;
        // np.linspace(1, 1 / N, steps + 1)
        let start = 1.0f64;
        let stop = 1.0 / n;
        let step = (stop - start) / steps as f64;
        let alphas: Vec<f64> = (0..=steps)
            .map(|i| {
                if i == steps {
                    stop
                } else {
                    start + i as f64 * step
                }
            })
            .collect();
        let shift = config.flow_shift;
        let shifted: Vec<f64> = alphas
            .iter()
            .map(|a| {
                let s = 1.0 - a;
                shift * s / (1.0 + (shift - 1.0) * s)
            })
            .collect();
        // flipped, last dropped
        let sig64: Vec<f64> = shifted.iter().rev().take(steps).copied().collect();
        let timesteps: Vec<i64> = sig64.iter().map(|s| (s * n) as i64).collect();
        let last = if config.final_sigmas_type == "sigma_min" {
            *sig64.last().expect("steps >= 1")
        } else {
            0.0
        };
        let mut sigmas: Vec<f32> = sig64.iter().map(|s| *s as f32).collect();
        sigmas.push(last as f32);
        Ok(Self {
            config: config.clone(),
            sigmas,
            timesteps,
            model_outputs: vec![None; config.solver_order],
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
            step_index: 0,
        })
    }

    /// The timesteps the model is called with, in order.
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    fn alpha_sigma(sigma: f32) -> (f32, f32) {
        (1.0 - sigma, sigma)
    }

    fn lambda(sigma: f32) -> f32 {
        let (a, s) = Self::alpha_sigma(sigma);
        a.ln() - s.ln()
    }

    /// h, hh, h_phi_1, B_h and the b vector of one update.
    fn coefficients(&self, sigma_t: f32, sigma_s0: f32, order: usize) -> (f32, f32, f32, Vec<f32>) {
        let h = Self::lambda(sigma_t) - Self::lambda(sigma_s0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0f32;
        let b_h = if self.config.solver_type == "bh1" {
            hh
        } else {
            hh.exp_m1()
        };
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (h, h_phi_1, b_h, b)
    }

    /// The predictor: x_{t} from the sample at s0 and the stored outputs.
    fn uni_p(&self, sample: &Tensor, order: usize) -> Result<Tensor, ModelError> {
        let i0 = self.step_index;
        let sigma_t = self.sigmas[i0 + 1];
        let sigma_s0 = self.sigmas[i0];
        let (alpha_t, sig_t) = Self::alpha_sigma(sigma_t);
        let (_, sig_s0) = Self::alpha_sigma(sigma_s0);
        let (h, h_phi_1, b_h, b) = self.coefficients(sigma_t, sigma_s0, order);
        let m = self.model_outputs.len();
        let m0 = self.model_outputs[m - 1]
            .as_ref()
            .expect("an output was stored");
        let lambda_s0 = Self::lambda(sigma_s0);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..order {
            let mi = self.model_outputs[m - 1 - i]
                .as_ref()
                .expect("warm-up keeps the order");
            let rk = (Self::lambda(self.sigmas[i0 - i]) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(((mi - m0)? / rk as f64)?);
        }
        rks.push(1.0);
        let mut x_t = ((sample * (sig_t / sig_s0) as f64)? - (m0 * (alpha_t * h_phi_1) as f64)?)?;
        if !d1s.is_empty() {
            let rhos: Vec<f32> = if order == 2 {
                vec![0.5]
            } else {
                let r = vandermonde(&rks, order - 1);
                solve(r, b[..order - 1].to_vec())
            };
            let mut res = (&d1s[0] * rhos[0] as f64)?;
            for (d, r) in d1s.iter().zip(&rhos).skip(1) {
                res = (res + (d * *r as f64)?)?;
            }
            x_t = (x_t - (res * (alpha_t * b_h) as f64)?)?;
        }
        Ok(x_t)
    }

    /// The corrector: refines this step's sample with its model output.
    fn uni_c(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor, ModelError> {
        let i0 = self.step_index;
        let sigma_t = self.sigmas[i0];
        let sigma_s0 = self.sigmas[i0 - 1];
        let (alpha_t, sig_t) = Self::alpha_sigma(sigma_t);
        let (_, sig_s0) = Self::alpha_sigma(sigma_s0);
        let (h, h_phi_1, b_h, b) = self.coefficients(sigma_t, sigma_s0, order);
        let m = self.model_outputs.len();
        let m0 = self.model_outputs[m - 1]
            .as_ref()
            .expect("an output was stored");
        let lambda_s0 = Self::lambda(sigma_s0);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..order {
            let mi = self.model_outputs[m - 1 - i]
                .as_ref()
                .expect("warm-up keeps the order");
            let rk = (Self::lambda(self.sigmas[i0 - (i + 1)]) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(((mi - m0)? / rk as f64)?);
        }
        rks.push(1.0);
        let rhos: Vec<f32> = if order == 1 {
            vec![0.5]
        } else {
            solve(vandermonde(&rks, order), b)
        };
        let x_t_ = ((last_sample * (sig_t / sig_s0) as f64)? - (m0 * (alpha_t * h_phi_1) as f64)?)?;
        let d1_t = (model_t - m0)?;
        let mut corr = (d1_t * *rhos.last().expect("order >= 1") as f64)?;
        for (d, r) in d1s.iter().zip(&rhos) {
            corr = (corr + (d * *r as f64)?)?;
        }
        Ok((x_t_ - (corr * (alpha_t * b_h) as f64)?)?)
    }

    /// One step: the model's flow prediction at the current timestep and
    /// the sample it was given → the sample at the next timestep.
    pub fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor, ModelError> {
        if self.step_index >= self.timesteps.len() {
            return Err(ModelError::Invalid("the schedule is finished".into()));
        }
        let sigma = self.sigmas[self.step_index];
        // flow_prediction: x0 = sample - sigma * v
        let converted = (sample - (model_output * sigma as f64)?)?;
        let use_corrector = self.step_index > 0
            && !self
                .config
                .disable_corrector
                .contains(&(self.step_index - 1))
            && self.last_sample.is_some();
        let sample = if use_corrector {
            let last = self.last_sample.take().expect("checked");
            self.uni_c(&converted, &last, self.this_order)?
        } else {
            sample.clone()
        };
        let order = self.config.solver_order;
        self.model_outputs.rotate_left(1);
        self.model_outputs[order - 1] = Some(converted);
        let this_order = if self.config.lower_order_final {
            order.min(self.timesteps.len() - self.step_index)
        } else {
            order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.uni_p(&sample, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev)
    }
}

/// R[i][j] = rks[j]^i, i < n, j < n (the leading n×n block).
fn vandermonde(rks: &[f32], n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| rks[..n].iter().map(|r| r.powi(i as i32)).collect())
        .collect()
}

/// Solves A x = b by Gaussian elimination with partial pivoting (f32, as
/// torch.linalg.solve on float32 tensors).
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|x, y| a[*x][col].abs().total_cmp(&a[*y][col].abs()))
            .expect("n > 0");
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col].clone();
            for (x, p) in a[row][col..n].iter_mut().zip(&pivot_row[col..n]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0f32; n];
    for row in (0..n).rev() {
        let s: f32 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(shift: f64) -> FlowSchedulerConfig {
        serde_json::from_value(serde_json::json!({
            "_class_name": "UniPCMultistepScheduler",
            "use_flow_sigmas": true,
            "prediction_type": "flow_prediction",
            "flow_shift": shift,
        }))
        .unwrap()
    }

    #[test]
    fn flow_sigmas_follow_diffusers() {
        // diffusers 0.35.2: UniPCMultistepScheduler(prediction_type=
        // "flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        // .set_timesteps(4): timesteps [999, 899, 749, 499].
        let s = UniPc::new(&config(3.0), 4).unwrap();
        assert_eq!(s.timesteps(), &[999, 899, 749, 499]);
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
        assert!((s.sigmas[0] - 0.999_666_45).abs() < 1e-6, "{}", s.sigmas[0]);
        assert!((s.sigmas[3] - 0.499_666_54).abs() < 1e-6, "{}", s.sigmas[3]);
    }

    #[test]
    fn solve_inverts_a_small_system() {
        let x = solve(vec![vec![1.0, 1.0], vec![0.5, 1.0]], vec![3.0, 2.0]);
        assert!(
            (x[0] - 2.0).abs() < 1e-6 && (x[1] - 1.0).abs() < 1e-6,
            "{x:?}"
        );
    }

    #[test]
    fn unsupported_schedulers_are_refused_by_name() {
        let mut c = config(3.0);
        c.class_name = "DPMSolverMultistepScheduler".into();
        let e = UniPc::new(&c, 4).err().unwrap().to_string();
        assert!(e.contains("_class_name") && e.contains("DPMSolver"), "{e}");
    }
}
