//! Criterion: the text model's quantized matrix products on the CPU at
//! SmolLM2-135M's shapes (q/k/v fused 960×576, gate/up fused 3072×576,
//! down 576×1536, the tied output head 49152×576 in Q8_0), for 1 row
//! (decoding one sequence: the weights stream from memory once per token,
//! so the figure is bytes of weights read per second) and 8 rows (a batch),
//! ours against candle's QMatMul on the same tensor.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use models::text::q4::Q4Matrix;
use models::text::q8::Q8Matrix;

fn quant_matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("quant_matmul");
    g.sample_size(20);
    let dev = Device::Cpu;
    let shapes = [
        ("qkv", GgmlDType::Q4_1, 960, 576),
        ("gate_up", GgmlDType::Q4_1, 3072, 576),
        ("down", GgmlDType::Q4_1, 576, 1536),
        ("output", GgmlDType::Q8_0, 49152, 576),
    ];
    for (name, dtype, n, k) in shapes {
        let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
        let qt = QTensor::quantize(&w, dtype).unwrap();
        let bytes = qt.storage_size_in_bytes() as u64;
        let ours: Box<dyn Fn(&Tensor) -> Tensor> = match dtype {
            GgmlDType::Q4_1 => {
                let m = Q4Matrix::from_qtensor(&qt)
                    .unwrap()
                    .expect("an x86 CPU with AVX2");
                Box::new(move |x| m.forward(x).unwrap())
            }
            _ if !models::text::q8::available() => continue,
            _ => {
                let m = Q8Matrix::from_qtensor(&qt).unwrap().expect("Q8_0");
                Box::new(move |x| m.forward(x).unwrap())
            }
        };
        let theirs = QMatMul::from_qtensor(qt).unwrap();
        for rows in [1, 8] {
            let x = Tensor::randn(0f32, 1., (rows, k), &dev).unwrap();
            g.throughput(Throughput::Bytes(bytes));
            g.bench_function(
                format!("{name} {dtype:?} {n}x{k}, {rows} row(s)/ours"),
                |b| b.iter(|| ours(&x)),
            );
            g.bench_function(
                format!("{name} {dtype:?} {n}x{k}, {rows} row(s)/candle"),
                |b| b.iter(|| theirs.forward(&x).unwrap()),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, quant_matmul);
criterion_main!(benches);
