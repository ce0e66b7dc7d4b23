//! Criterion: the 3x3 convolutions of SD's VAE decoder (512x512 output)
//! and UNet (64x64 latents), and Wan's causal 3x3x3, through `FrameConv`, Winograd's F(2x2, 3x3) against
//! the im2col product, in GFLOP/s of the direct convolution.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use models::conv::FrameConv;

fn conv(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv3x3");
    g.sample_size(10);
    // (frames, kt, cin, cout, size): SD VAE decoder levels, Wan's 3-D.
    let shapes = [
        (1, 1, 512, 512, 64),
        (1, 1, 512, 512, 128),
        (1, 1, 256, 256, 256),
        (1, 1, 128, 128, 512),
        (4, 3, 96, 96, 128),
        // SD 2's UNet levels at 512x512 (64x64 latents).
        (1, 1, 320, 320, 64),
        (1, 1, 640, 640, 32),
        (1, 1, 1280, 1280, 16),
        (1, 1, 1280, 1280, 8),
    ];
    for (frames, kt, cin, cout, size) in shapes {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (frames + kt - 1, cin, size, size), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (cout, cin, kt, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.05, cout, &dev).unwrap();
        let flops = 2 * frames * cout * cin * kt * 9 * size * size;
        g.throughput(Throughput::Elements(flops as u64));
        let name = format!("{frames}x{kt}x{cin}->{cout}@{size}");
        let wino = FrameConv::new(&w, Some(b.clone()), 1, 1, 1).unwrap();
        g.bench_function(format!("{name}/winograd"), |bench| {
            bench.iter(|| wino.forward(&x).unwrap())
        });
        let im2col = FrameConv::new_im2col(&w, Some(b.clone()), 1, 1, 1).unwrap();
        g.bench_function(format!("{name}/im2col"), |bench| {
            bench.iter(|| im2col.forward(&x).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, conv);
criterion_main!(benches);
