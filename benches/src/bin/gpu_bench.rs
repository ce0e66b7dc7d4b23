//! Decode speed of the text model on a GPU (or any device), from
//! random-weight checkpoints of real shapes built in memory: nothing to
//! download on the GPU host, and a small binary to copy there (candle and
//! the text model only). `benches/gpu.sh` builds and runs it.
//!
//! `gpu_bench [SHAPE] [STEPS]`: SHAPE is `smollm2-135m`, `llama-3.2-1b` or
//! `all` (default), STEPS decode steps per measurement (default 64). Env:
//! `DEVICE` (default `cuda`), `WEIGHTS` (`q8_0`, the default, or `f16`),
//! `GPU_BANDWIDTH_GBS` (memory bandwidth for the bound; default 3350, an
//! H100 SXM's HBM3). Prints one JSON line per shape: batch-1, batch-8 and
//! num_options=3 decode tokens/s, and the bandwidth bound at batch 1 (weight
//! bytes read once per step, for the weights as loaded and for f16 weights).

use std::io::Cursor;
use std::time::Instant;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use models::text::quantized_llama::{QuantizedLlama, SeqCache};

struct Shape {
    name: &'static str,
    dim: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ff: usize,
    vocab: usize,
    rope_theta: f32,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "smollm2-135m",
        dim: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        ff: 1536,
        vocab: 49152,
        rope_theta: 100_000.,
    },
    Shape {
        name: "llama-3.2-1b",
        dim: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        ff: 8192,
        vocab: 128_256,
        rope_theta: 500_000.,
    },
];

const PROMPT: usize = 128;

/// A GGUF of `shape` with random weights (tied embeddings, as both models
/// have), in memory. Returns the file and the parameter count.
fn checkpoint(shape: &Shape, dtype: GgmlDType) -> candle_core::Result<(Vec<u8>, usize)> {
    let cpu = Device::Cpu;
    let hd = shape.dim / shape.heads;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut params = 0;
    let mut add = |name: String, rows: usize, cols: usize| -> candle_core::Result<()> {
        let t = (Tensor::randn(0f32, 1., (rows, cols), &cpu)? * 0.02)?;
        params += rows * cols;
        tensors.push((name, QTensor::quantize(&t, dtype)?));
        Ok(())
    };
    add("token_embd.weight".into(), shape.vocab, shape.dim)?;
    for i in 0..shape.layers {
        add(
            format!("blk.{i}.attn_q.weight"),
            shape.heads * hd,
            shape.dim,
        )?;
        add(
            format!("blk.{i}.attn_k.weight"),
            shape.kv_heads * hd,
            shape.dim,
        )?;
        add(
            format!("blk.{i}.attn_v.weight"),
            shape.kv_heads * hd,
            shape.dim,
        )?;
        add(
            format!("blk.{i}.attn_output.weight"),
            shape.dim,
            shape.heads * hd,
        )?;
        add(format!("blk.{i}.ffn_gate.weight"), shape.ff, shape.dim)?;
        add(format!("blk.{i}.ffn_up.weight"), shape.ff, shape.dim)?;
        add(format!("blk.{i}.ffn_down.weight"), shape.dim, shape.ff)?;
    }
    let ones = Tensor::ones(shape.dim, candle_core::DType::F32, &cpu)?;
    tensors.push((
        "output_norm.weight".into(),
        QTensor::quantize(&ones, GgmlDType::F32)?,
    ));
    for i in 0..shape.layers {
        for n in ["attn_norm", "ffn_norm"] {
            tensors.push((
                format!("blk.{i}.{n}.weight"),
                QTensor::quantize(&ones, GgmlDType::F32)?,
            ));
        }
    }
    let meta = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(shape.layers as u32)),
        ("llama.attention.head_count", Value::U32(shape.heads as u32)),
        (
            "llama.attention.head_count_kv",
            Value::U32(shape.kv_heads as u32),
        ),
        ("llama.embedding_length", Value::U32(shape.dim as u32)),
        ("llama.rope.dimension_count", Value::U32(hd as u32)),
        ("llama.context_length", Value::U32(2048)),
        ("llama.rope.freq_base", Value::F32(shape.rope_theta)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
    ];
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = Cursor::new(Vec::new());
    gguf_file::write(&mut file, &meta, &refs)?;
    Ok((file.into_inner(), params))
}

/// Decode tokens/s of `rows` sequences stepping together after a
/// `PROMPT`-token prefill each.
fn decode_rate(
    model: &QuantizedLlama,
    rows: usize,
    steps: usize,
    device: &Device,
) -> candle_core::Result<f64> {
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| 1 + i * 7 % 1000).collect();
    let mut caches: Vec<SeqCache> = Vec::with_capacity(rows);
    for _ in 0..rows {
        let mut c = model.new_cache(PROMPT + steps + 8)?;
        model.forward(&prompt, &mut c)?;
        caches.push(c);
    }
    let step = |caches: &mut Vec<SeqCache>, token: u32| -> candle_core::Result<()> {
        let tokens = vec![token; rows];
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let logits = model.forward_rows(&tokens, 1, &mut refs)?;
        // Sampling needs the logits on the host: wait for the step.
        logits.argmax(1)?.to_vec1::<u32>()?;
        Ok(())
    };
    for _ in 0..4 {
        step(&mut caches, 5)?;
    }
    device.synchronize()?;
    let started = Instant::now();
    for i in 0..steps {
        step(&mut caches, 10 + i as u32)?;
    }
    device.synchronize()?;
    Ok((rows * steps) as f64 / started.elapsed().as_secs_f64())
}

fn main() -> candle_core::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let steps: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().expect("STEPS is a number"))
        .unwrap_or(64);
    let device =
        models::device::select_device(&std::env::var("DEVICE").unwrap_or_else(|_| "cuda".into()))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let dtype = match std::env::var("WEIGHTS").as_deref() {
        Ok("f16") => GgmlDType::F16,
        _ => GgmlDType::Q8_0,
    };
    let bandwidth: f64 = std::env::var("GPU_BANDWIDTH_GBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3350.);
    for shape in SHAPES.iter().filter(|s| which == "all" || which == s.name) {
        let (file, params) = checkpoint(shape, dtype)?;
        let ct = gguf_file::Content::read(&mut Cursor::new(&file))?;
        let model = QuantizedLlama::from_gguf(&ct, &mut Cursor::new(&file), &device, false)?;
        drop(file);
        // Bytes one decode step reads: every weight once (the tied
        // embedding as the output projection; norms are noise). F16 and F32
        // checkpoints run as f32 tensors in candle.
        let bytes_per_param = match dtype {
            GgmlDType::Q8_0 => 34. / 32.,
            _ => 4.,
        };
        let read = params as f64 * bytes_per_param;
        let b1 = decode_rate(&model, 1, steps, &device)?;
        let b8 = decode_rate(&model, 8, steps, &device)?;
        let o3 = decode_rate(&model, 3, steps, &device)?;
        let bound = bandwidth * 1e9 / read;
        let bound_f16 = bandwidth * 1e9 / (params as f64 * 2.);
        println!(
            "{}",
            serde_json::json!({
                "shape": shape.name,
                "device": format!("{device:?}"),
                "weights": format!("{dtype:?}"),
                "params": params,
                "batch1_tok_s": b1,
                "batch8_tok_s": b8,
                "options3_tok_s": o3,
                "bound_batch1_tok_s": bound,
                "bound_batch1_f16_tok_s": bound_f16,
                "batch1_of_bound": b1 / bound,
            })
        );
    }
    Ok(())
}
