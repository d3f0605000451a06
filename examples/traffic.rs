//! The emulator's memory traffic model for one forward_backward call: per
//! kernel and buffer, the warp requests, 32-byte sectors per request, sector
//! efficiency and distinct sectors touched (the lower bound of DRAM
//! traffic), shared-memory bank conflicts and atomics, against the call's
//! bytes floor (inputs read once, gradients written once). A model of what
//! the kernels ask of memory, counted on the CPU; not a measured speed.
//!
//!     cargo run --release --example traffic -- 32x3000x21 f16
//!     cargo run --release --example traffic -- 32x8732x81 bf16 [i32] [channel-major] [sliced]
//!
//! The tensors start 256-byte aligned, as a device allocator places them;
//! `sliced` starts each one element later, as a slice of a tensor can.
use anyhow::{bail, Context, Result};
use multibox::synthetic::{Batch, BatchSpec};
use multibox::{DType, Float, Label, LabelType, Layout, MultiboxConfig, Shape};

#[path = "../tests/common/emulated.rs"]
#[allow(dead_code)]
mod emulated;

use emulated::{buffer_traffic, Call, PlacedInputs};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: traffic BxPxC f32|f16|bf16 [i64|i32] [row-major|channel-major] [sliced]";
    let dims: Vec<usize> = args
        .first()
        .context(usage)?
        .split('x')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context(usage)?;
    let [batch, priors, classes] = dims[..] else {
        bail!(usage)
    };
    let shape = Shape::new(batch, priors, classes);
    let dtype = match args.get(1).map(String::as_str) {
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        _ => bail!(usage),
    };
    let mut labels = LabelType::I64;
    let mut layout = Layout::RowMajor;
    let mut sliced = false;
    for arg in &args[2..] {
        match arg.as_str() {
            "i64" => labels = LabelType::I64,
            "i32" => labels = LabelType::I32,
            "row-major" => layout = Layout::RowMajor,
            "channel-major" => layout = Layout::ChannelMajor,
            "sliced" => sliced = true,
            _ => bail!(usage),
        }
    }
    match (dtype, labels) {
        (DType::F32, LabelType::I64) => report::<f32, i64>(shape, layout, sliced),
        (DType::F32, LabelType::I32) => report::<f32, i32>(shape, layout, sliced),
        (DType::F16, LabelType::I64) => report::<half::f16, i64>(shape, layout, sliced),
        (DType::F16, LabelType::I32) => report::<half::f16, i32>(shape, layout, sliced),
        (DType::BF16, LabelType::I64) => report::<half::bf16, i64>(shape, layout, sliced),
        (DType::BF16, LabelType::I32) => report::<half::bf16, i32>(shape, layout, sliced),
    }
}

fn report<T: Float, L: Label>(shape: Shape, layout: Layout, sliced: bool) -> Result<()> {
    let batch = Batch::<T, L>::generate(shape, BatchSpec::default()).in_layout(layout);
    let placed = PlacedInputs::new(&batch, usize::from(sliced));
    let inputs = placed.host();
    let call = Call {
        layout,
        model_traffic: true,
        // Race checking keeps a shadow of every byte touched; the model
        // needs none of it.
        races: false,
        misaligned: sliced,
        ..Call::default()
    };
    let out = emulated::run(&MultiboxConfig::default(), shape, &inputs, call)?;
    let floor = multibox::plan::bytes_floor(shape, T::DTYPE, L::LABEL_TYPE, true);
    println!(
        "traffic model: {}x{}x{} {:?} {:?} {layout:?}{}, forward_backward (emulator; a model, not a measurement)",
        shape.batch,
        shape.priors,
        shape.classes,
        T::DTYPE,
        L::LABEL_TYPE,
        if sliced { ", sliced (one element past 256-byte alignment)" } else { "" }
    );
    println!(
        "{:<28} {:<22} {:>6} {:>10} {:>7} {:>6} {:>12}",
        "kernel", "buffer", "kind", "requests", "sec/req", "eff", "unique MB"
    );
    let mut total = 0;
    for (kernel, traffic) in &out.traffic {
        // Per-image regions (keys[image 3]) are summed under their buffer.
        let mut buffers: Vec<&str> = Vec::new();
        for (name, _) in &traffic.regions {
            let base = name.split('[').next().unwrap_or(name);
            if !buffers.contains(&base) {
                buffers.push(base);
            }
        }
        let mut rows: Vec<(&str, multibox_emu::RegionTraffic)> = buffers
            .iter()
            .map(|&b| (b, buffer_traffic(traffic, b)))
            .collect();
        if traffic.unregistered != Default::default() {
            rows.push(("(unregistered)", traffic.unregistered));
        }
        for (name, t) in &rows {
            for (kind, a) in [
                ("load", &t.loads),
                ("store", &t.stores),
                ("atomic", &t.atomics),
            ] {
                if a.requests == 0 {
                    continue;
                }
                println!(
                    "{:<28} {:<22} {:>6} {:>10} {:>7.2} {:>5.0}% {:>12.3}",
                    kernel,
                    name,
                    kind,
                    a.requests,
                    a.sectors_per_request(),
                    100.0 * a.efficiency(),
                    t.unique_bytes() as f64 / 1e6
                );
            }
        }
        let s = &traffic.shared;
        let unique = traffic.unique_bytes();
        total += unique;
        println!(
            "{:<28} shared: {} requests, {:.2} ways on average, {} at worst, {} conflicted; atomics on one address: {} global, {} shared; unique DRAM {:.3} MB",
            kernel,
            s.requests,
            if s.requests == 0 { 0.0 } else { s.wavefronts as f64 / s.requests as f64 },
            s.max_ways,
            s.conflicted,
            traffic.max_global_atomics_per_address,
            traffic.max_shared_atomics_per_address,
            unique as f64 / 1e6
        );
    }
    println!(
        "total unique DRAM bytes {:.3} MB, bytes floor {:.3} MB: {:.2}x the floor",
        total as f64 / 1e6,
        floor as f64 / 1e6,
        total as f64 / floor as f64
    );
    set_rows_line(shape, T::DTYPE.size(), &out.mask, &out.traffic);
    if layout == Layout::ChannelMajor {
        second_read_line(total, floor, &out.traffic);
    }
    Ok(())
}

/// Channel-major, kernel 3's reads of the set's logits are whole sectors
/// of class planes, each holding 8 or 16 priors of which about one is in
/// the set: a second read of most of the logits' sectors, which no split
/// into a forward and a backward call avoids. This line gives the total
/// without it, to compare with row-major's.
fn second_read_line(total: u64, floor: usize, traffic: &[(&str, multibox_emu::Traffic)]) {
    let Some(logits) = kernel_3_logits(traffic) else {
        return;
    };
    let second = logits.unique_sectors * 32;
    println!(
        "of which kernel 3's second read of the set's logit sectors {:.3} MB; without it {:.2}x the floor",
        second as f64 / 1e6,
        (total - second) as f64 / floor as f64
    );
}

/// Kernel 3's loads of the logits (the set rows' second read), if it ran.
fn kernel_3_logits(
    traffic: &[(&str, multibox_emu::Traffic)],
) -> Option<multibox_emu::RegionTraffic> {
    let (_, t) = traffic
        .iter()
        .find(|(kernel, _)| kernel.starts_with("multibox_gradient"))?;
    Some(buffer_traffic(t, "confidence"))
}

/// Kernel 3 reads the logits of the classification set's rows (the mask)
/// a second time. A load's efficiency above counts every byte the lanes
/// ask for, and whole 16-byte words carry a neighbouring row's bytes too;
/// this line counts only the set's own logits, against the sectors its
/// loads fetch and against the distinct sectors they touch.
fn set_rows_line(
    shape: Shape,
    size: usize,
    mask: &[u8],
    traffic: &[(&str, multibox_emu::Traffic)],
) {
    let set = mask.iter().filter(|&&m| m != 0).count();
    let own = (set * shape.classes * size) as f64;
    let Some(logits) = kernel_3_logits(traffic) else {
        return;
    };
    let (sectors, unique) = (logits.loads.sectors, logits.unique_sectors);
    if sectors == 0 {
        return;
    }
    println!(
        "kernel 3's set rows: {set} of {} rows, {:.3} MB of logits: {:.0}% of the sectors their loads fetch, {:.0}% of the distinct sectors they touch",
        shape.rows(),
        own / 1e6,
        100.0 * own / (sectors * 32) as f64,
        100.0 * own / (unique * 32) as f64
    );
}
