//! CLIP's text encoder, following transformers' `modeling_clip.py`
//! (`CLIPTextModel` and `CLIPTextModelWithProjection`) with every size,
//! the activation and the layer-norm epsilon read from the checkpoint's
//! `config.json`. candle-transformers has two CLIP text models, but one
//! fixes its sizes to a few presets and the other knows only `quick_gelu`,
//! while SD 2.x's OpenCLIP encoder uses exact (erf) GELU.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear};
use candle_nn::{LayerNormConfig, VarBuilder};

use super::config::ClipTextConfig;
use crate::ModelError;

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    GeluErf,
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> std::result::Result<Self, ModelError> {
        Ok(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            other => {
                return Err(ModelError::Format(format!(
                    "text_encoder/config.json: hidden_act {other:?} is not supported"
                )))
            }
        })
    }

    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702f64)?)?,
            Activation::GeluErf => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
        }
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim: d / c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let split = |x: Tensor| -> Result<Tensor> {
            x.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(xs)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let w = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let w = candle_nn::ops::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let o = w.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&o)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &ClipTextConfig, act: Activation) -> Result<Self> {
        let ln = LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        Ok(Self {
            layer_norm1: layer_norm(c.hidden_size, ln, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(vb.pp("self_attn"), c)?,
            layer_norm2: layer_norm(c.hidden_size, ln, vb.pp("layer_norm2"))?,
            fc1: linear(c.hidden_size, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(c.intermediate_size, c.hidden_size, vb.pp("mlp").pp("fc2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        let m = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.layer_norm2.forward(&h)?)?)?,
        )?;
        h + m
    }
}

/// What the pipelines read from one encoder run.
pub struct ClipTextOutput {
    /// After the final layer norm (`last_hidden_state`).
    pub last_hidden_state: Tensor,
    /// Input of the last encoder layer (`hidden_states[-2]`, SDXL's
    /// conditioning).
    pub penultimate: Tensor,
    /// `text_embeds` (pooled, projected) for a model with a projection, else
    /// the pooled output.
    pub pooled: Tensor,
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_token_id: Option<u32>,
}

impl ClipTextModel {
    /// `with_projection`: a `CLIPTextModelWithProjection` (SDXL's second
    /// encoder), whose `text_projection` makes the pooled embedding.
    pub fn new(
        vb: VarBuilder,
        c: &ClipTextConfig,
        with_projection: bool,
    ) -> std::result::Result<Self, ModelError> {
        let act = Activation::parse(&c.hidden_act)?;
        let tm = vb.pp("text_model");
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(tm.pp("encoder").pp("layers").pp(i), c, act))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = if with_projection {
            let p = c.projection_dim.ok_or_else(|| {
                ModelError::Format("text_encoder_2/config.json: projection_dim missing".into())
            })?;
            Some(linear_no_bias(c.hidden_size, p, vb.pp("text_projection"))?)
        } else {
            None
        };
        let ln = LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        Ok(Self {
            token_embedding: embedding(
                c.vocab_size,
                c.hidden_size,
                tm.pp("embeddings").pp("token_embedding"),
            )?,
            position_embedding: embedding(
                c.max_position_embeddings,
                c.hidden_size,
                tm.pp("embeddings").pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: layer_norm(c.hidden_size, ln, tm.pp("final_layer_norm"))?,
            text_projection,
            eos_token_id: c.eos_token_id,
        })
    }

    fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::MIN } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (1, 1, t, t), device)?.to_dtype(dtype)
    }

    /// Runs the encoder on `ids` (`[batch, seq]`, u32).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, t) = ids.dims2()?;
        let positions = Tensor::arange(0u32, t as u32, ids.device())?.unsqueeze(0)?;
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(t, xs.dtype(), ids.device())?;
        let mut penultimate = xs.clone();
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == n {
                penultimate = xs.clone();
            }
            xs = layer.forward(&xs, &mask)?;
        }
        let last = self.final_layer_norm.forward(&xs)?;
        // transformers: with the legacy eos id 2 the pooled token is the
        // largest id; else the first end token.
        let rows = ids.to_vec2::<u32>()?;
        let mut pooled = Vec::with_capacity(b);
        for (bi, row) in rows.iter().enumerate() {
            let at = match self.eos_token_id {
                Some(eos) if eos != 2 => row.iter().position(|&x| x == eos).unwrap_or(0),
                _ => {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&x| x == max).unwrap_or(0)
                }
            };
            pooled.push(last.i((bi, at))?.unsqueeze(0)?);
        }
        let pooled = Tensor::cat(&pooled, 0)?;
        let pooled = match &self.text_projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(ClipTextOutput {
            last_hidden_state: last,
            penultimate,
            pooled,
        })
    }
}
