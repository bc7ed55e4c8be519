//! The runtime itself: adapter, limits, chunking rules, readback.

mod common;

use common::*;
use memit_gpu::{Activation, DType, GpuContext, GpuError, GpuOptions, MatmulSpec, MatrixView, Work};

#[test]
fn opens_an_adapter_with_its_real_limits() {
    let ctx = ctx();
    let limits = ctx.limits();
    // The WebGPU default binding limit is 128 MiB; we request what the
    // adapter really has, which is never less.
    assert!(limits.max_storage_buffer_binding_size >= 128 << 20, "{limits:?}");
    assert!(ctx.chunk_bytes() <= limits.max_storage_buffer_binding_size);
    assert!(!ctx.adapter_info().name.is_empty());
}

#[test]
fn adapter_filter_that_matches_nothing_is_a_clear_error() {
    let err = pollster::block_on(GpuContext::new(GpuOptions {
        adapter_name: Some("no-such-adapter-xyz".into()),
        ..Default::default()
    }))
    .unwrap_err();
    assert!(matches!(err, GpuError::NoAdapter { .. }), "{err}");
    assert!(err.to_string().contains("mesa-vulkan-drivers"), "{err}");
}

#[test]
fn tensors_split_at_the_chunk_limit_and_read_back_whole() {
    let ctx = tiny_chunk_ctx();
    assert_eq!(ctx.chunk_bytes(), 4096);
    let mut rng = Rng::new(3);
    for (shape, dtype) in [(vec![1000usize, 3], DType::F32), (vec![777, 5], DType::F16), (vec![3], DType::F32), (vec![10, 1, 1024], DType::F32)] {
        let numel: usize = shape.iter().product();
        let data = rng.vec(numel, 1.0);
        let t = ctx.upload(&shape, &data, dtype).unwrap();
        let row_bytes = (t.row_len() * dtype.size()) as u64;
        let rows_per_chunk = (4096 / row_bytes) as usize;
        assert_eq!(t.n_chunks(), shape[0].div_ceil(rows_per_chunk).max(1), "{shape:?}");
        let want = if dtype == DType::F16 { f16_round(&data) } else { data };
        assert_eq!(read(&ctx, &t), want, "{shape:?} {dtype:?}");
        // Odd-offset f16 views read back correctly too.
        let view = t.slice_rows(1..shape[0]).unwrap();
        assert_eq!(read(&ctx, &view), want[t.row_len()..].to_vec());
    }
    let err = ctx.zeros(&[2, 2000], DType::F32).unwrap_err();
    assert!(matches!(err, GpuError::RowTooLarge { .. }), "{err}");
}

#[test]
fn reshape_keeps_rows_within_chunks() {
    let ctx = tiny_chunk_ctx();
    let t = ctx.zeros(&[4, 256, 4], DType::F32).unwrap(); // one 4 KiB row per chunk
    assert_eq!(t.n_chunks(), 4);
    assert!(t.reshape(&[1024, 4]).is_ok());
    assert!(t.reshape(&[2, 2048]).is_err(), "a new row would span two buffers");
}

#[test]
fn sync_waits_for_queued_work() {
    let ctx = ctx();
    let t = ctx.zeros(&[64], DType::F32).unwrap();
    ctx.fill(&t, 3.0).unwrap();
    pollster::block_on(ctx.sync()).unwrap();
    assert!(read(&ctx, &t).iter().all(|&v| v == 3.0));
}

#[test]
fn memory_meter_counts_live_and_peak_tensor_bytes() {
    // Its own context: other tests' tensors must not move the counts.
    let ctx = pollster::block_on(GpuContext::new(GpuOptions { max_chunk_bytes: Some(4096), ..Default::default() })).expect("a GPU adapter");
    let start = ctx.memory();
    ctx.reset_peak_memory();
    let a = ctx.zeros(&[100, 30], DType::F32).unwrap(); // 12,000 bytes over 3 chunks (34 rows each: 4,080 + 4,080 + 3,840)
    let b = ctx.zeros(&[10, 10], DType::F16).unwrap(); // 200 bytes
    assert_eq!(ctx.memory().live_bytes - start.live_bytes, 12_000 + 200);
    let view = a.slice_rows(10..20).unwrap(); // shares a's first chunk
    drop(a);
    assert_eq!(ctx.memory().live_bytes - start.live_bytes, 4_080 + 200, "a view keeps only the chunk it lies in alive");
    drop(view);
    drop(b);
    let end = ctx.memory();
    assert_eq!(end.live_bytes, start.live_bytes);
    assert_eq!(end.peak_bytes - start.live_bytes, 12_200);
}

#[test]
fn a_buffer_bound_writably_twice_is_refused_as_webgpu_would() {
    let ctx = ctx();
    let t = ctx.upload(&[4, 8], &[1.0; 32], DType::F32).unwrap();
    let view = |offset| MatrixView { tensor: &t, offset, rows: 2, cols: 2, ld: 8 };
    // Disjoint regions, but one buffer as an input and as the output.
    let err = ctx.matmul_views(view(0), view(2), view(20), MatmulSpec::default()).unwrap_err();
    assert!(matches!(err, GpuError::Validation(_)), "{err}");
    assert!(err.to_string().contains("writable binding 3"), "{err}");
    // Inputs may share a buffer with each other.
    let out = ctx.zeros(&[2, 2], DType::F32).unwrap();
    let c = MatrixView { tensor: &out, offset: 0, rows: 2, cols: 2, ld: 2 };
    ctx.matmul_views(view(0), view(2), c, MatmulSpec::default()).unwrap();
    assert_eq!(pollster::block_on(ctx.read(&out)).unwrap(), vec![2.0; 4]);
}

/// OpenGL is used only when asked for, and a software OpenGL renderer
/// (llvmpipe, ~10x slower than lavapipe) never: asking for it on a machine
/// whose only OpenGL is software is an error that says what to install.
#[test]
fn software_opengl_is_never_used() {
    match pollster::block_on(GpuContext::new(GpuOptions { backends: Some(wgpu::Backends::GL), ..Default::default() })) {
        Ok(ctx) => assert_ne!(ctx.adapter_info().device_type, wgpu::DeviceType::Cpu, "{:?}", ctx.adapter_info()),
        Err(GpuError::SoftwareOpenGl { adapter }) => assert!(!adapter.is_empty()),
        Err(GpuError::NoAdapter { .. }) => {}
        Err(other) => panic!("{other}"),
    }
    // The default never reaches OpenGL.
    let ctx = pollster::block_on(GpuContext::new(GpuOptions::default())).expect("a Vulkan adapter (install mesa-vulkan-drivers)");
    assert_ne!(ctx.adapter_info().backend, wgpu::Backend::Gl);
}

/// Profiling times every dispatch with GPU timestamps, names its kernel
/// and, for products, its shape and work; results are the same as without.
#[test]
fn profiling_times_each_dispatch_and_changes_no_result() {
    let ctx = ctx();
    let mut rng = Rng::new(5);
    let (m, k, n) = (70, 33, 20);
    let a = ctx.upload(&[m, k], &rng.vec(m * k, 1.0), DType::F32).unwrap();
    let b = ctx.upload(&[k, n], &rng.vec(k * n, 1.0), DType::F32).unwrap();
    let plain = read(&ctx, &ctx.matmul(&a, &b, false, false).unwrap());
    match ctx.start_profiling() {
        Err(GpuError::NoTimestamps { .. }) => {
            // Adapters without timestamp queries say so; lavapipe has them.
            assert!(!ctx.adapter_info().name.contains("llvmpipe"), "lavapipe has timestamp queries");
            return;
        }
        other => other.unwrap(),
    }
    let c = ctx.matmul(&a, &b, false, false).unwrap();
    let d = ctx.activation(&c, Activation::Relu).unwrap();
    let profiled = read(&ctx, &c);
    read(&ctx, &d);
    let timings = ctx.finish_profiling().unwrap();
    assert_eq!(profiled, plain);
    let kernels: Vec<&str> = timings.iter().map(|t| t.kernel.as_str()).collect();
    assert_eq!(kernels, ["matmul::matmul", "activation::apply"]);
    assert_eq!(timings[0].work, Some(Work { m: 70, n: 20, k: 33, batch: 1, flops: 2 * 70 * 20 * 33 }));
    assert_eq!(timings[1].work, None);
    assert!(timings.iter().all(|t| t.nanos.is_finite() && t.nanos >= 0.0));
    assert!(timings[0].nanos > 0.0, "a 70x33x20 product takes measurable time");
    // After finishing, dispatches are no longer timed.
    ctx.matmul(&a, &b, false, false).unwrap();
    assert!(ctx.finish_profiling().unwrap().is_empty());
}
