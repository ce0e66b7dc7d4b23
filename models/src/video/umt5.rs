//! Wan's text side: the UMT5 encoder (transformers' `modeling_umt5.py`,
//! encoder stack only: T5's unscaled attention with a relative position
//! bias in every layer, RMS layer norms, the gated-GELU feed-forward) and
//! the tokenizer as the Wan pipeline calls it (`prompt_clean`, `</s>`
//! added, cut to the maximum length).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, linear_no_bias, Activation, Embedding, Linear, VarBuilder};
use unicode_normalization::UnicodeNormalization;

use super::config::Umt5Config;
use crate::ModelError;

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        y.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    bias: Embedding,
    heads: usize,
    d_kv: usize,
    buckets: usize,
    max_distance: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: &Umt5Config) -> candle_core::Result<Self> {
        let inner = c.num_heads * c.d_kv;
        Ok(Self {
            q: linear_no_bias(c.d_model, inner, vb.pp("q"))?,
            k: linear_no_bias(c.d_model, inner, vb.pp("k"))?,
            v: linear_no_bias(c.d_model, inner, vb.pp("v"))?,
            o: linear_no_bias(inner, c.d_model, vb.pp("o"))?,
            bias: embedding(
                c.relative_attention_num_buckets,
                c.num_heads,
                vb.pp("relative_attention_bias"),
            )?,
            heads: c.num_heads,
            d_kv: c.d_kv,
            buckets: c.relative_attention_num_buckets,
            max_distance: c.relative_attention_max_distance,
        })
    }

    /// The bidirectional bucket of `memory - context` (T5's
    /// `_relative_position_bucket`, encoder side).
    fn bucket(&self, relative: i64) -> u32 {
        let half = (self.buckets / 2) as i64;
        let mut bucket = if relative > 0 { half } else { 0 };
        let rel = relative.abs();
        let max_exact = half / 2;
        if rel < max_exact {
            bucket += rel;
        } else {
            // float32 as torch computes it, then truncated.
            let ratio = ((rel as f32 / max_exact as f32).ln()
                / (self.max_distance as f32 / max_exact as f32).ln())
                * (half - max_exact) as f32;
            let large = (max_exact + ratio as i64).min(half - 1);
            bucket += large;
        }
        bucket as u32
    }

    fn position_bias(&self, len: usize, device: &Device) -> candle_core::Result<Tensor> {
        let mut ids = Vec::with_capacity(len * len);
        for q in 0..len as i64 {
            for k in 0..len as i64 {
                ids.push(self.bucket(k - q));
            }
        }
        let ids = Tensor::from_vec(ids, (len, len), device)?;
        // (len, len, heads) → (1, heads, len, len)
        self.bias.forward(&ids)?.permute((2, 0, 1))?.unsqueeze(0)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, len, self.heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        // T5 does not scale the scores.
        let scores = q.matmul(&k.t()?)?;
        let bias = self
            .position_bias(len, x.device())?
            .to_dtype(scores.dtype())?;
        let scores = scores.broadcast_add(&bias)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, len, self.heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

struct FeedForward {
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
    act: Activation,
}

impl FeedForward {
    fn new(vb: VarBuilder, c: &Umt5Config) -> Result<Self, ModelError> {
        let (gated, act) = c.feed_forward()?;
        Ok(if gated {
            Self {
                wi_0: linear_no_bias(c.d_model, c.d_ff, vb.pp("wi_0"))?,
                wi_1: Some(linear_no_bias(c.d_model, c.d_ff, vb.pp("wi_1"))?),
                wo: linear_no_bias(c.d_ff, c.d_model, vb.pp("wo"))?,
                act,
            }
        } else {
            Self {
                wi_0: linear_no_bias(c.d_model, c.d_ff, vb.pp("wi"))?,
                wi_1: None,
                wo: linear_no_bias(c.d_ff, c.d_model, vb.pp("wo"))?,
                act,
            }
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act.forward(&self.wi_0.forward(x)?)?;
        let h = match &self.wi_1 {
            Some(wi_1) => (h * wi_1.forward(x)?)?,
            None => h,
        };
        self.wo.forward(&h)
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

/// The UMT5 encoder stack.
pub struct Umt5Encoder {
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    pub config: Umt5Config,
}

impl Umt5Encoder {
    pub fn new(vb: VarBuilder, config: &Umt5Config) -> Result<Self, ModelError> {
        config.check()?;
        let embed = embedding(config.vocab_size, config.d_model, vb.pp("shared"))?;
        let enc = vb.pp("encoder");
        let eps = config.layer_norm_epsilon;
        let mut blocks = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let b = enc.pp(format!("block.{i}"));
            blocks.push(Block {
                attn_norm: RmsNorm::new(b.pp("layer.0.layer_norm"), config.d_model, eps)?,
                attn: Attention::new(b.pp("layer.0.SelfAttention"), config)?,
                ff_norm: RmsNorm::new(b.pp("layer.1.layer_norm"), config.d_model, eps)?,
                ff: FeedForward::new(b.pp("layer.1.DenseReluDense"), config)?,
            });
        }
        Ok(Self {
            embed,
            blocks,
            final_norm: RmsNorm::new(enc.pp("final_layer_norm"), config.d_model, eps)?,
            config: config.clone(),
        })
    }

    /// The last hidden states of the prompt's own tokens, `(1, n, d_model)`
    /// (padding is masked out in transformers, so it is simply left off).
    pub fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor, ModelError> {
        let ids = Tensor::from_vec(ids.to_vec(), (1, ids.len()), device)?;
        let mut x = self.embed.forward(&ids)?;
        for b in &self.blocks {
            let h = b.attn.forward(&b.attn_norm.forward(&x)?)?;
            x = (x + h)?;
            let h = b.ff.forward(&b.ff_norm.forward(&x)?)?;
            x = (x + h)?;
        }
        Ok(self.final_norm.forward(&x)?)
    }
}

/// The Wan pipeline's `prompt_clean`: ftfy's fixes that apply to typed
/// text (NFC, straight quotes, Latin ligatures, full-width forms), HTML
/// entities decoded twice, whitespace collapsed, trimmed.
pub fn prompt_clean(text: &str) -> String {
    let fixed: String = text
        .nfc()
        .map(|c| match c {
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' => '\'',
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' => '"',
            _ => c,
        })
        .flat_map(|c| {
            let s: String = match c {
                '\u{FB00}'..='\u{FB06}' | '\u{FF01}'..='\u{FF5E}' | '\u{3000}' => {
                    std::iter::once(c).nfkc().collect()
                }
                _ => c.to_string(),
            };
            s.chars().collect::<Vec<_>>()
        })
        .collect();
    let once = html_escape::decode_html_entities(&fixed).into_owned();
    let twice = html_escape::decode_html_entities(&once).into_owned();
    twice.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Wan's tokenizer: the checkpoint's `tokenizer/tokenizer.json` (T5's
/// SentencePiece unigram as transformers' `T5TokenizerFast` saves it).
pub struct WanTokenizer {
    tokenizer: tokenizers::Tokenizer,
    eos: u32,
}

impl WanTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let file = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", file.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let eos = tokenizer
            .token_to_id("</s>")
            .ok_or_else(|| ModelError::Tokenizer(format!("{}: no </s> token", file.display())))?;
        Ok(Self { tokenizer, eos })
    }

    pub fn from_tokenizer(tokenizer: tokenizers::Tokenizer) -> Result<Self, ModelError> {
        let eos = tokenizer
            .token_to_id("</s>")
            .ok_or_else(|| ModelError::Tokenizer("no </s> token".into()))?;
        Ok(Self { tokenizer, eos })
    }

    /// The prompt's ids after `prompt_clean`, `</s>` last, at most
    /// `max_len` in all (transformers' truncation keeps the `</s>`).
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(prompt_clean(prompt), false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids: Vec<u32> = enc
            .get_ids()
            .iter()
            .take(max_len.saturating_sub(1))
            .copied()
            .collect();
        ids.push(self.eos);
        Ok(ids)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_clean_follows_the_pipeline() {
        assert_eq!(prompt_clean("  a\tcat \n\n sleeps "), "a cat sleeps");
        assert_eq!(prompt_clean("Tom &amp;amp; Jerry"), "Tom & Jerry");
        assert_eq!(
            prompt_clean("\u{201C}hi\u{201D} it\u{2019}s"),
            "\"hi\" it's"
        );
        assert_eq!(prompt_clean("\u{FB01}ne \u{FF21}"), "fine A");
    }
}
