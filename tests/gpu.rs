//! The kernels on a real GPU: the same checks as on the emulator, plus what
//! only a GPU can show (CUDA-graph capture and replay, bit-identical results
//! across runs with real parallelism). Without a GPU each test prints why it
//! is skipped; with MULTIBOX_REQUIRE_GPU=1 it fails instead. The golden cases
//! run on the GPU in tests/goldens.rs. `scripts/emulated-gpu-tests` runs
//! these tests on the emulated driver of `emu/driver`.

mod common;

use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use common::emulated::{self, Call, HostInputs, KernelOutput, Normalizer, Upstream};
use common::gpu::{self, DeviceCall};
use multibox::cudarc::driver::CudaContext;
use multibox::synthetic::{Batch, BatchSpec};
use multibox::{CallOptions, Error, Layout, MultiboxConfig, MultiboxLoss, Shape};

fn batch(shape: Shape, seed: u64) -> Batch<f32, i64> {
    Batch::generate(
        shape,
        BatchSpec {
            seed,
            ignored_fraction: 0.01,
            ..Default::default()
        },
    )
}

fn host(b: &Batch<f32, i64>) -> HostInputs<'_, f32, i64> {
    HostInputs {
        confidence: &b.confidence,
        predicted_locations: &b.predicted_locations,
        labels: &b.labels,
        gt_locations: &b.gt_locations,
    }
}

/// Runs `b` on the GPU and on the emulated kernels and checks that they
/// agree: status clean, the same positives, the same losses to 1e-6, and
/// gradients within 2e-6 of the largest (each is within SPEC.md's 1e-6 of
/// the f64 reference). expf differs between the GPU
/// and the CPU's libm by an ulp or two, which can reorder keys within
/// rounding: a negative that one mines and the other does not is allowed
/// (at most one such pair an image, at its boundary), and its row's
/// gradients are left out. The goldens hold both to the f64 reference.
/// Returns the GPU's output.
fn gpu_matches_emulated(
    ctx: &Arc<CudaContext>,
    config: &MultiboxConfig,
    shape: Shape,
    b: &Batch<f32, i64>,
) -> KernelOutput<f32> {
    let on_gpu = gpu::run(ctx, config, shape, &host(b), Call::default()).unwrap();
    let emulated = emulated::run(config, shape, &host(b), Call::default()).unwrap();
    assert!(on_gpu.status.is_ok(), "{shape}: {:?}", on_gpu.status);
    assert_eq!(on_gpu.num_pos, emulated.num_pos, "{shape}");
    let rel = |a: f32, b: f32| ((a - b) / b.abs().max(1e-30)).abs();
    for (what, got, want) in [
        (
            "classification",
            on_gpu.classification_loss,
            emulated.classification_loss,
        ),
        (
            "regression",
            on_gpu.regression_loss,
            emulated.regression_loss,
        ),
    ] {
        assert!(
            rel(got, want) < 1e-6,
            "{shape}: {what} loss {got} against {want}"
        );
    }
    let swapped: Vec<usize> = (0..shape.rows())
        .filter(|&r| on_gpu.mask[r] != emulated.mask[r])
        .collect();
    assert!(
        swapped.len() <= 2 * shape.batch && swapped.iter().all(|&r| b.labels[r] == 0),
        "{shape}: the GPU and the emulator chose different sets at rows {swapped:?}"
    );
    let c = shape.classes;
    for (what, got, want, width) in [
        (
            "confidence",
            &on_gpu.grad_confidence,
            &emulated.grad_confidence,
            c,
        ),
        (
            "locations",
            &on_gpu.grad_locations,
            &emulated.grad_locations,
            4,
        ),
    ] {
        assert_eq!(got.len(), want.len(), "{shape}: {what} gradient length");
        let tolerance = 2e-6 * common::check::max_abs(want);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let row = i / width;
            let close = f64::from((g - w).abs()) <= tolerance;
            assert!(
                close || swapped.contains(&row),
                "{shape}: {what} gradient {i} (row {row}) {g} against {w}"
            );
        }
    }
    on_gpu
}

#[test]
fn gpu_matches_the_emulated_kernels() {
    let Some(ctx) = gpu::device("gpu_matches_the_emulated_kernels") else {
        return;
    };
    let config = MultiboxConfig::default();
    for (shape, seed) in [
        (Shape::new(4, 3000, 21), 1),
        (Shape::new(2, 8732, 81), 2),
        (Shape::new(3, 17, 3), 3),
    ] {
        gpu_matches_emulated(&ctx, &config, shape, &batch(shape, seed));
    }
}

/// Kernel 1 sums a row at its own logit's shift and gives a row whose sum
/// would overflow there a second try at its maximum's, the row's whole warp
/// with it (a vote and shuffles). On the GPU too: rows with a class 100
/// above their own, and rows whose sum is just under 2^128 over an own
/// term below 1, between ordinary rows of the same warps, give finite
/// losses, the emulated kernels' to 1e-6, and channel-major the row-major
/// bits.
#[test]
fn gpu_rows_far_from_their_own_class_take_a_second_try() {
    let Some(ctx) = gpu::device("gpu_rows_far_from_their_own_class_take_a_second_try") else {
        return;
    };
    let config = MultiboxConfig::default();
    for (shape, seed) in [(Shape::new(4, 3000, 21), 21), (Shape::new(2, 8732, 81), 22)] {
        let mut b = batch(shape, seed);
        let c = shape.classes;
        // Fewer such rows than the mined negatives (3 per positive), so
        // that the mined set's edge lies among the ordinary rows.
        for row in (0..shape.rows()).step_by(29) {
            let own = b.labels[row].max(0) as usize;
            let far = if own == 1 { 2 } else { 1 };
            let x = &mut b.confidence[row * c..(row + 1) * c];
            if row % 2 == 0 {
                x[far] = x[own] + 100.0;
            } else {
                x[own] = -0.3;
                x[far] = 88.5;
            }
        }
        let on_gpu = gpu_matches_emulated(&ctx, &config, shape, &b);
        assert!(on_gpu.classification_loss.is_finite(), "{shape}");
        let run =
            |inputs: &HostInputs<'_, f32, i64>, call| gpu::run(&ctx, &config, shape, inputs, call);
        emulated::assert_channel_major_is_row_major(
            &format!("{shape}, rows far from their own class"),
            shape,
            &host(&b),
            Call::default(),
            &on_gpu,
            run,
        );
    }
}

/// forward, then backward on the same workspace, equals forward_backward
/// bit for bit on the GPU too (upstream from the host and from device memory).
#[test]
fn gpu_forward_then_backward_equals_forward_backward() {
    let Some(ctx) = gpu::device("gpu_forward_then_backward_equals_forward_backward") else {
        return;
    };
    let config = MultiboxConfig::default();
    for (shape, seed) in [(Shape::new(4, 3000, 21), 5), (Shape::new(2, 8732, 81), 6)] {
        let b = batch(shape, seed);
        for upstream in [Upstream::Host(0.5, 3.0), Upstream::Device(0.25, 1024.0)] {
            let fused = Call {
                upstream,
                ..Call::default()
            };
            let split = Call {
                split: true,
                ..fused
            };
            let a = gpu::run(&ctx, &config, shape, &host(&b), fused).unwrap();
            let s = gpu::run(&ctx, &config, shape, &host(&b), split).unwrap();
            assert_eq!(a, s, "{shape} {upstream:?}");
            let bits = |g: &[f32]| g.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.grad_confidence), bits(&s.grad_confidence));
        }
    }
}

#[test]
fn gpu_results_are_bit_identical_run_after_run() {
    let Some(ctx) = gpu::device("gpu_results_are_bit_identical_run_after_run") else {
        return;
    };
    let shape = Shape::new(32, 3000, 21);
    let b = batch(shape, 4);
    let stream = ctx.default_stream();
    let loss = MultiboxLoss::new(&ctx, MultiboxConfig::default()).unwrap();
    let mut call = DeviceCall::new(&stream, shape, &host(&b)).unwrap();
    call.launch(&loss, &stream, Call::default()).unwrap();
    let first = call.read(&loss, &stream, Call::default()).unwrap();
    for _ in 0..20 {
        call.launch(&loss, &stream, Call::default()).unwrap();
    }
    let last = call.read(&loss, &stream, Call::default()).unwrap();
    assert_eq!(
        first.regression_loss.to_bits(),
        last.regression_loss.to_bits()
    );
    assert_eq!(
        first.classification_loss.to_bits(),
        last.classification_loss.to_bits()
    );
    assert_eq!(first.mask, last.mask);
    assert!(first
        .grad_confidence
        .iter()
        .zip(&last.grad_confidence)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// The turns that keep a capturing test apart from the others (no GPU
/// needed): a nested turn takes no second lock, and a turn alone waits for
/// the shared ones to end.
#[test]
fn a_capturing_test_waits_for_the_others_to_leave_the_device() {
    let shared = gpu::take_turn("shared", false).expect("a turn");
    assert!(gpu::take_turn("nested", false).is_none());
    let (sender, receiver) = mpsc::channel();
    let capturing = thread::spawn(move || {
        let turn = gpu::take_turn("alone", true).expect("a turn");
        sender.send(()).unwrap();
        drop(turn);
    });
    // Not a timing: nothing can arrive while this thread holds its turn.
    assert!(receiver.recv_timeout(Duration::from_millis(100)).is_err());
    drop(shared);
    receiver
        .recv()
        .expect("the turn alone, once the shared one ended");
    capturing.join().unwrap();
    assert!(gpu::take_turn("again", false).is_some());
}

#[test]
fn a_captured_cuda_graph_replays_the_same_outputs() {
    let Some(ctx) = gpu::device_alone("a_captured_cuda_graph_replays_the_same_outputs") else {
        return;
    };
    // cudarc's event tracking records events around buffer use, which
    // stream capture does not allow across streams; a captured training step
    // turns it off.
    // SAFETY: no other stream of this test's context uses these buffers.
    unsafe { ctx.disable_event_tracking() };
    let shape = Shape::new(8, 3000, 21);
    let b = batch(shape, 5);
    let stream = ctx.new_stream().unwrap();
    let loss = MultiboxLoss::new(&ctx, MultiboxConfig::default()).unwrap();
    let mut direct = DeviceCall::new(&stream, shape, &host(&b)).unwrap();
    direct.launch(&loss, &stream, Call::default()).unwrap();
    let want = direct.read(&loss, &stream, Call::default()).unwrap();

    let mut captured = DeviceCall::new(&stream, shape, &host(&b)).unwrap();
    stream.synchronize().unwrap();
    stream
        .begin_capture(
            multibox::cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .unwrap();
    captured.launch(&loss, &stream, Call::default()).unwrap();
    let graph = stream.end_capture(multibox::cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).unwrap().expect("a graph");
    for _ in 0..3 {
        graph.launch().unwrap();
    }
    let got = captured.read(&loss, &stream, Call::default()).unwrap();
    assert_eq!(got, want);
}

/// Bad input that only the device sees (SPEC.md, "Bad input"), read back
/// through `MultiboxLoss::status` as a user reads it: a label outside
/// -1..C-1 makes both losses NaN and sets `invalid_label`; a NaN logit sets
/// `nonfinite_input`; a clean batch leaves the word clean. The emulated
/// kernels record the same.
#[test]
fn gpu_records_bad_labels_and_non_finite_logits_in_the_status() {
    let Some(ctx) = gpu::device("gpu_records_bad_labels_and_non_finite_logits_in_the_status")
    else {
        return;
    };
    let config = MultiboxConfig::default();
    let shape = Shape::new(2, 300, 21);
    let run = |b: &Batch<f32, i64>| {
        let on_gpu = gpu::run(&ctx, &config, shape, &host(b), Call::default()).unwrap();
        let emulated = emulated::run(&config, shape, &host(b), Call::default()).unwrap();
        assert_eq!(on_gpu.status, emulated.status);
        on_gpu
    };
    assert!(run(&batch(shape, 8)).status.is_ok());

    let mut bad_label = batch(shape, 8);
    bad_label.labels[5] = 21; // C
    let out = run(&bad_label);
    assert!(
        out.status.invalid_label && !out.status.nonfinite_input,
        "{:?}",
        out.status
    );
    assert!(out.regression_loss.is_nan() && out.classification_loss.is_nan());

    let mut nan_logit = batch(shape, 8);
    nan_logit.confidence[7 * 21 + 3] = f32::NAN;
    let out = run(&nan_logit);
    assert!(
        out.status.nonfinite_input && !out.status.invalid_label,
        "{:?}",
        out.status
    );
}

/// A backward whose workspace's last forward was not of its own call, or
/// that finds none, writes NaN over both gradients and says
/// `stale_workspace`, as the emulated kernels do, for each of
/// `stale_forwards`; after its own forward it passes. The gradients start
/// as zeros, so that NaN is the kernel's.
#[test]
fn gpu_backward_on_a_stale_workspace_gives_nan_and_says_so() {
    let Some(ctx) = gpu::device("gpu_backward_on_a_stale_workspace_gives_nan_and_says_so") else {
        return;
    };
    let config = MultiboxConfig::default();
    let shape = Shape::new(3, 700, 21);
    let b = batch(shape, 10);
    let stream = ctx.default_stream();
    let loss = MultiboxLoss::new(&ctx, config).unwrap();
    let mut forwards = emulated::stale_forwards(multibox::LabelType::I64);
    forwards.push(("its own forward", emulated::Forward::Same, 0xab));
    for layout in [Layout::RowMajor, Layout::ChannelMajor] {
        for &(what, forward, fill) in &forwards {
            let call = Call {
                split: true,
                forward,
                fill,
                layout,
                ..Call::default()
            };
            let mut d = DeviceCall::filled(&stream, shape, &host(&b), fill).unwrap();
            stream.memset_zeros(&mut d.grad_confidence).unwrap();
            stream.memset_zeros(&mut d.grad_locations).unwrap();
            d.launch(&loss, &stream, call).unwrap();
            let on_gpu = d.read(&loss, &stream, call).unwrap();
            let emulated = emulated::run(&config, shape, &host(&b), call).unwrap();
            let what = format!("{layout:?}: {what}");
            assert_eq!(on_gpu.status, emulated.status, "{what}");
            let own = matches!(forward, emulated::Forward::Same);
            assert_eq!(on_gpu.status.stale_workspace, !own, "{what}");
            let all = |test: fn(f32) -> bool| {
                let mut gradients = on_gpu.grad_confidence.iter().chain(&on_gpu.grad_locations);
                gradients.all(|&g| test(g))
            };
            assert!(
                if own {
                    all(f32::is_finite)
                } else {
                    all(f32::is_nan)
                },
                "{what}"
            );
        }
    }
}

#[test]
fn gpu_refuses_bad_calls_before_launching() {
    let Some(ctx) = gpu::device("gpu_refuses_bad_calls_before_launching") else {
        return;
    };
    let shape = Shape::new(2, 100, 21);
    let b = batch(shape, 6);
    let stream = ctx.default_stream();
    let loss = MultiboxLoss::new(&ctx, MultiboxConfig::default()).unwrap();
    let mut call = DeviceCall::new(&stream, shape, &host(&b)).unwrap();
    call.shape = Shape::new(2, 101, 21);
    assert!(matches!(
        call.launch(&loss, &stream, Call::default()),
        Err(Error::LengthMismatch {
            name: "confidence",
            ..
        })
    ));
    call.shape = shape;
    call.workspace = stream.alloc_zeros::<u8>(8).unwrap();
    assert!(matches!(
        call.launch(&loss, &stream, Call::default()),
        Err(Error::WorkspaceTooSmall { .. })
    ));
    // The status word (bytes 8..12 of `Totals`, first in every workspace)
    // lies past the 8 bytes: refused, not read.
    assert!(matches!(
        loss.status(&stream, shape, &call.workspace),
        Err(Error::WorkspaceTooSmall {
            expected: 12,
            actual: 8,
            ..
        })
    ));
}

/// The raw entry point asks the driver about every address: host memory,
/// which a kernel would fault on (and poison the context), is an error
/// that names the buffer, and the context still works afterwards.
#[test]
fn gpu_raw_calls_refuse_memory_the_kernels_cannot_use() {
    let Some(ctx) = gpu::device("gpu_raw_calls_refuse_memory_the_kernels_cannot_use") else {
        return;
    };
    let shape = Shape::new(2, 100, 21);
    let b = batch(shape, 7);
    let stream = ctx.default_stream();
    let loss = MultiboxLoss::new(&ctx, MultiboxConfig::default()).unwrap();
    let call = DeviceCall::new(&stream, shape, &host(&b)).unwrap();
    let raw = call.raw_call(&stream);
    // SAFETY: the addresses are `call`'s live buffers, sized for `shape`.
    unsafe { loss.launch_raw(&raw, stream.cu_stream()) }.unwrap();

    use multibox::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS;
    if ctx
        .attribute(CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS)
        .unwrap()
        == 1
    {
        // HMM or ATS: the kernels can use malloc'd memory, which passes.
        eprintln!(
            "host memory is usable by this device (pageable memory access): refusal not checked"
        );
        return;
    }
    let on_the_host = vec![0.0f32; shape.confidence_len()];
    for name in ["confidence", "labels", "grad_locations"] {
        let mut bad = raw;
        let host = on_the_host.as_ptr() as u64;
        match name {
            "confidence" => bad.buffers.confidence = host,
            "labels" => bad.buffers.labels = host,
            _ => bad.buffers.grad_locations = host,
        }
        // SAFETY: the call is refused before any launch (the point of the test).
        let e = unsafe { loss.launch_raw(&bad, stream.cu_stream()) }.unwrap_err();
        assert!(
            matches!(e, Error::NotDeviceMemory { name: n, .. } if n == name),
            "{name}: {e:?}"
        );
    }
    // Nothing faulted: the context still runs the good call.
    // SAFETY: as above.
    unsafe { loss.launch_raw(&raw, stream.cu_stream()) }.unwrap();
    stream.synchronize().unwrap();
}

/// On the GPU too, a channel-major call is the row-major call on the
/// transposed inputs, bit for bit, under every normaliser.
#[test]
fn gpu_channel_major_is_the_row_major_call_bit_for_bit() {
    let Some(ctx) = gpu::device("gpu_channel_major_is_the_row_major_call_bit_for_bit") else {
        return;
    };
    let config = MultiboxConfig::default();
    for (shape, seed) in [(Shape::new(4, 3000, 21), 11), (Shape::new(2, 8732, 81), 12)] {
        let b = batch(shape, seed);
        for normalizer in [
            Normalizer::Positives,
            Normalizer::Given(77.5),
            Normalizer::GivenOnDevice(77.5),
            Normalizer::PerImage,
        ] {
            let what = format!("{shape} {normalizer:?}");
            let call = Call {
                normalizer,
                ..Call::default()
            };
            let run = |inputs: &HostInputs<'_, f32, i64>, call| {
                gpu::run(&ctx, &config, shape, inputs, call)
            };
            let row_major = run(&host(&b), call).unwrap();
            emulated::assert_channel_major_is_row_major(
                &what,
                shape,
                &host(&b),
                call,
                &row_major,
                run,
            );
        }
    }
}

/// A divisor in device memory is read when the kernels run: a captured
/// graph replayed after the buffer changed divides by the new value, with
/// no host round-trip (what an all-reduced count needs).
#[test]
fn a_captured_graph_reads_the_device_divisor_at_each_replay() {
    let Some(ctx) = gpu::device_alone("a_captured_graph_reads_the_device_divisor_at_each_replay")
    else {
        return;
    };
    // SAFETY: no other stream of this test's context uses these buffers.
    unsafe { ctx.disable_event_tracking() };
    let shape = Shape::new(8, 3000, 21);
    let b = batch(shape, 13);
    let stream = ctx.new_stream().unwrap();
    let loss = MultiboxLoss::new(&ctx, MultiboxConfig::default()).unwrap();
    let mut d = DeviceCall::new(&stream, shape, &host(&b)).unwrap();
    stream.memcpy_htod(&[2.0f32], &mut d.normalizer).unwrap();
    stream.synchronize().unwrap();
    stream
        .begin_capture(
            multibox::cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .unwrap();
    loss.forward_with(
        &stream,
        shape,
        &multibox::Inputs {
            confidence: &d.confidence,
            predicted_locations: &d.predicted_locations,
            labels: &d.labels,
            gt_locations: &d.gt_locations,
        },
        &mut multibox::Outputs {
            regression_loss: &mut d.regression_loss,
            classification_loss: &mut d.classification_loss,
            num_pos: &mut d.num_pos,
            mask: None,
        },
        &mut d.workspace,
        CallOptions {
            layout: Layout::RowMajor,
            normalizer: multibox::Normalizer::GivenOnDevice(&d.normalizer),
        },
    )
    .unwrap();
    let graph = stream.end_capture(multibox::cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).unwrap().expect("a graph");
    let mut losses = Vec::new();
    for n in [2.0f32, 4.0] {
        stream.memcpy_htod(&[n], &mut d.normalizer).unwrap();
        graph.launch().unwrap();
        let reg = stream.clone_dtoh(&d.regression_loss).unwrap()[0];
        let cls = stream.clone_dtoh(&d.classification_loss).unwrap()[0];
        losses.push((reg, cls));
    }
    // Sums divided by 2 and by 4: exactly a factor of 2 apart.
    assert!(losses[0].1 > 0.0);
    assert_eq!(losses[0].0, 2.0 * losses[1].0);
    assert_eq!(losses[0].1, 2.0 * losses[1].1);
}

/// The occupancy the loss asked the driver for: every kernel fits a block
/// an SM with its largest tile, more shared memory never means more blocks,
/// and on sm_90 the counts tests/plan.rs plans with (kernel 1 at 4 blocks,
/// kernel 3's entries at 5, the row-major one even with C = 81's bf16
/// tile).
#[test]
fn the_grids_follow_the_drivers_occupancy() {
    use cudarc::driver::sys::CUdevice_attribute::*;
    use multibox::plan::{GRADIENT_TILE_BYTES, ROW_TILE_BYTES};
    let Some(ctx) = gpu::device("the_grids_follow_the_drivers_occupancy") else {
        return;
    };
    let loss = MultiboxLoss::new(&ctx, MultiboxConfig::default()).unwrap();
    let limits = loss.grid_limits();
    let sms = ctx
        .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .unwrap();
    assert_eq!(limits.sms, sms as u32);
    for (what, residency, tile) in [
        ("kernel 1", limits.rows, ROW_TILE_BYTES),
        ("kernel 3", limits.gradient, GRADIENT_TILE_BYTES),
        (
            "kernel 3, channel-major",
            limits.gradient_channel_major,
            GRADIENT_TILE_BYTES,
        ),
    ] {
        let most = residency.shared_for;
        assert!(
            most[0].is_some_and(|b| b as usize >= tile),
            "{what}: {most:?}"
        );
        assert!(
            most.windows(2).all(|w| w[1].is_none() || w[1] <= w[0]),
            "{what}: {most:?}"
        );
    }
    let major = ctx
        .attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .unwrap();
    if major == 9 {
        assert_eq!(limits.rows.blocks(0), 4);
        assert_eq!(limits.gradient.blocks(41_504), 5);
        assert_eq!(limits.gradient.blocks(42_528), 4); // C = 83's f16 tile
        assert_eq!(limits.gradient_channel_major.blocks(0), 5);
    }
}

/// The C ABI leaves the calling thread's current context as it found it,
/// where cudarc would leave the device's primary context bound: a C or C++
/// caller's runtime API takes its current device from that context.
#[test]
fn c_abi_calls_leave_the_callers_context_current() {
    use multibox::capi::{self, multibox_status_code::MULTIBOX_OK};
    use multibox::cudarc::driver::{result, sys};
    let Some(ctx) = gpu::device("c_abi_calls_leave_the_callers_context_current") else {
        return;
    };
    let shape = Shape::new(2, 100, 21);
    let b = batch(shape, 11);
    let stream = ctx.default_stream();
    let buffers = DeviceCall::new(&stream, shape, &host(&b)).unwrap();
    let raw = buffers.raw_call(&stream).buffers;
    let mut call = std::mem::MaybeUninit::uninit();
    // SAFETY: `call` is a writable multibox_call.
    assert_eq!(
        unsafe { capi::multibox_call_default(call.as_mut_ptr()) },
        MULTIBOX_OK
    );
    // SAFETY: written just above.
    let mut call = unsafe { call.assume_init() };
    call.shape = capi::multibox_shape {
        batch: 2,
        priors: 100,
        classes: 21,
    };
    call.dtype = capi::multibox_dtype::MULTIBOX_F32 as i32;
    call.label_type = capi::multibox_label_type::MULTIBOX_I64 as i32;
    call.confidence = raw.confidence;
    call.predicted_locations = raw.predicted_locations;
    call.labels = raw.labels;
    call.gt_locations = raw.gt_locations;
    call.grad_confidence = raw.grad_confidence;
    call.grad_locations = raw.grad_locations;
    call.regression_loss = raw.regression_loss;
    call.classification_loss = raw.classification_loss;
    call.num_pos = raw.num_pos;
    call.workspace = raw.workspace;
    call.workspace_bytes = raw.workspace_bytes;
    stream.synchronize().unwrap();

    let current = || {
        result::ctx::get_current()
            .unwrap()
            .unwrap_or(std::ptr::null_mut())
    };
    // A context of the caller's own (not the primary one the crate uses),
    // then none at all.
    let (mut device, mut own) = (0, std::ptr::null_mut());
    // SAFETY: the driver is initialised (gpu::device made a context of
    // device 0); both out-parameters are writable.
    unsafe { sys::cuDeviceGet(&mut device, 0) }
        .result()
        .unwrap();
    // SAFETY: as above.
    unsafe { sys::cuCtxCreate_v2(&mut own, 0, device) }
        .result()
        .unwrap();
    for previous in [own, std::ptr::null_mut()] {
        // SAFETY: `own` is live until the end of the test; null unbinds.
        unsafe { result::ctx::set_current(previous) }.unwrap();
        // Null pops one context off the thread's stack, and cuCtxCreate
        // pushed `own` above the primary context: pop until none is left.
        while previous.is_null() && !current().is_null() {
            // SAFETY: as above.
            unsafe { result::ctx::set_current(previous) }.unwrap();
        }
        let mut loss = std::ptr::null_mut();
        // SAFETY: a NULL config means the defaults; `loss` is writable.
        let code = unsafe { capi::multibox_loss_create(0, std::ptr::null(), &mut loss) };
        assert_eq!(code, MULTIBOX_OK);
        assert_eq!(current(), previous, "after multibox_loss_create");
        // SAFETY: the addresses are `buffers`' live allocations in the
        // primary context of device 0, sized for `shape`; NULL stream.
        let code = unsafe { capi::multibox_forward_backward(loss, &call, std::ptr::null_mut()) };
        assert_eq!(code, MULTIBOX_OK);
        assert_eq!(current(), previous, "after multibox_forward_backward");
        // SAFETY: from multibox_loss_create, not used again.
        assert_eq!(unsafe { capi::multibox_loss_destroy(loss) }, MULTIBOX_OK);
        assert_eq!(current(), previous, "after multibox_loss_destroy");
    }
    // SAFETY: `own` is no longer current or used.
    unsafe { sys::cuCtxDestroy_v2(own) }.result().unwrap();
    // The calls ran: the losses are finite.
    let losses = stream.clone_dtoh(&buffers.regression_loss).unwrap();
    assert!(losses[0].is_finite(), "{losses:?}");
}

/// Dropping a loss or an assigner waits for the device even when cudarc
/// holds an error that an earlier drop recorded on the context (cudarc's
/// `CudaContext::synchronize` would hand that error back without waiting,
/// and clear it), and leaves the error recorded for the caller's next call.
#[test]
fn drops_keep_an_error_cudarc_recorded_on_the_context() {
    use multibox::cudarc::driver::{sys::CUresult, DriverError};
    use multibox::targets::{priors, TargetAssigner, TargetConfig};
    // Alone: the error is recorded on the context every test shares.
    let Some(ctx) = gpu::device_alone("drops_keep_an_error_cudarc_recorded_on_the_context") else {
        return;
    };
    let recorded = DriverError(CUresult::CUDA_ERROR_NOT_PERMITTED);
    let loss = MultiboxLoss::new(&ctx, MultiboxConfig::default()).unwrap();
    let assigner =
        TargetAssigner::new(&ctx, &priors::ssdlite300(), TargetConfig::default()).unwrap();
    ctx.record_err::<()>(Err(recorded));
    drop(loss);
    assert_eq!(ctx.check_err(), Err(recorded), "after the loss's drop");
    ctx.record_err::<()>(Err(recorded));
    drop(assigner);
    assert_eq!(ctx.check_err(), Err(recorded), "after the assigner's drop");
    assert_eq!(ctx.check_err(), Ok(()));
}

/// `cuda_context` answers with an error, never a panic, where there is no
/// such device: an ordinal past the devices names their count, and a
/// machine without the driver library says that instead.
#[test]
fn cuda_context_says_why_there_is_no_device() {
    let why = match multibox::cuda_context(1 << 20) {
        Err(Error::NoDevice(why)) => why,
        Err(e) => panic!("expected Error::NoDevice, got {e}"),
        Ok(_) => panic!("device 1048576 opened"),
    };
    let no_driver = why.starts_with("the CUDA driver library is not installed (none of ");
    assert!(
        no_driver
            || why.starts_with("device 1048576 requested, ")
            || why.starts_with("the CUDA driver failed"),
        "{why}"
    );
}
