//! Criterion: f32 linear layers at Whisper base's shapes (the encoder's
//! 1500 rows, a decoding step's one row, the 51,865-row output projection)
//! through `models::blas::Linear` (MKL's sgemm on Intel CPUs, our AVX-512
//! kernel on other AVX-512 CPUs, a step's few rows on our own kernels)
//! against candle's `Linear` (the `gemm` crate), in GFLOP/s.

use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn linear(c: &mut Criterion) {
    let mut g = c.benchmark_group("linear_f32");
    g.sample_size(10);
    // (rows, in, out): the encoder's attention projections, fc1 and fc2;
    // a decoding step's fc1 and output projection.
    let shapes = [
        (1500, 512, 512),
        (1500, 512, 2048),
        (1500, 2048, 512),
        (1, 512, 2048),
        (1, 512, 51865),
    ];
    for (rows, din, dout) in shapes {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (rows, din), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (dout, din), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.05, dout, &dev).unwrap();
        g.throughput(Throughput::Elements((2 * rows * din * dout) as u64));
        let name = format!("{rows}x{din}->{dout}");
        let ours = models::blas::Linear::new(w.clone(), Some(b.clone()));
        g.bench_function(format!("{name}/ours"), |bench| {
            bench.iter(|| ours.forward(&x).unwrap())
        });
        let candle = candle_nn::Linear::new(w, Some(b));
        g.bench_function(format!("{name}/candle"), |bench| {
            bench.iter(|| candle.forward(&x).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, linear);
criterion_main!(benches);
