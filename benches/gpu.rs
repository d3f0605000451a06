//! `forward_backward` on the GPU at the shapes of SSD training, timed with
//! CUDA events.
//!
//!     cargo bench --bench gpu
//!
//! For each shape and input type (f32, f16, bf16; i64 labels) it prints:
//!
//! - the median device time of one call (CUDA events around each call, after
//!   a warm-up, over many calls; the calls rotate among several input sets
//!   whose bytes together exceed the L2 cache several times, so a repeated
//!   call does not read its inputs from L2),
//! - the median time of one replay of a CUDA graph holding the same call
//!   (the three launches without the host's launch gaps), and of graphs of
//!   its halves apart: the forward (the row walk and the selection) and the
//!   backward (the gradients), to show where the time goes,
//! - the fewest bytes a call must move (logits read and their gradient
//!   written, boxes read and their gradient written, labels read), the
//!   bandwidth that implies at the better of the two times, and its share of two
//!   ceilings: the device's datasheet peak where the device is in
//!   [`PEAK_BANDWIDTH`], and the bandwidth of a device-to-device copy
//!   measured at the start (bytes read and written), which is what a kernel
//!   that only streams memory can reach,
//! - `launch-bound` where one graph replay takes under 0.8 of a call: the
//!   device waited for the host's launches between the calls, so the call
//!   time measures the launch rate, and the graph time is the device's.
//!
//! With `MULTIBOX_BENCH_OUT=FILE` it also appends one JSON object per case
//! to FILE (read by `scripts/gpu-check`). Without a GPU it says why each case
//! is skipped and exits 0. A bench never asserts: it measures and reports.
//!
//! The row-major cases come first, then target assignment
//! ([`multibox::targets::TargetAssigner::assign`]) at B = 32 and 256, the
//! SSDLite-300 and SSD300 priors, T = 20 and 100 boxes per image (about T/2
//! real boxes each, the rest padding): the median device time of one call
//! and of one graph replay, as records with an `assign_case` key; then the
//! channel-major (`_cm`) cases.
//!
//! Environment: `MULTIBOX_BENCH_QUICK=1` times fewer calls (a smoke run);
//! `MULTIBOX_BENCH_DEADLINE_S=S` starts no case later than S seconds after
//! the bench started, and says which it left out.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use half::{bf16, f16};
use multibox::cudarc::driver::{
    sys, CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
};
use multibox::synthetic::{Batch, BatchSpec, BoxBatch};
use multibox::targets::{priors, TargetAssigner, TargetConfig, TargetInputs, TargetOutputs};
use multibox::{CallOptions, Float, Layout, MultiboxConfig, MultiboxLoss, Normalizer, Pass, Shape};

/// The shapes of SSD training that the crate is for, row-major and
/// normalised by N; then the `_cm` cases: channel-major inputs (`[B, C, P]`,
/// `[B, 4, P]`) normalised per image, NVIDIA's SSD recipe.
const CASES: &[(&str, Shape)] = &[
    ("ssdlite_voc", Shape::new(32, 3000, 21)),
    ("ssdlite_coco", Shape::new(32, 3000, 91)),
    ("ssd300_coco", Shape::new(32, 8732, 81)),
    ("ssd300_coco", Shape::new(256, 8732, 81)),
    ("ssdlite_voc_cm", Shape::new(32, 3000, 21)),
    ("ssd300_coco_cm", Shape::new(32, 8732, 81)),
    ("ssd300_coco_cm", Shape::new(256, 8732, 81)),
];

/// A case's layout and normaliser, from its name.
fn options(name: &str) -> (Layout, Normalizer<'static>) {
    if name.ends_with("_cm") {
        (Layout::ChannelMajor, Normalizer::PerImage)
    } else {
        (Layout::RowMajor, Normalizer::Positives)
    }
}

/// Peak DRAM bandwidth (bytes/s) of the GPUs we know, matched in this order
/// against a substring of the device name (so "H100 PCIe" before "H100").
/// Datasheet numbers: a measured device-to-device copy reaches about 90 %.
const PEAK_BANDWIDTH: &[(&str, f64)] = &[
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 864e9),
    ("L4", 300e9),
    ("A10", 600e9),
    ("RTX 4090", 1008e9),
    ("RTX 3090", 936e9),
    ("V100", 900e9),
    ("T4", 320e9),
];

/// An input type the bench can put on the device.
trait Elem: Float + DeviceRepr + ValidAsZeroBits {}
impl<T: Float + DeviceRepr + ValidAsZeroBits> Elem for T {}

/// L2 size assumed when the device does not say (H100/H200: 50 MB).
const DEFAULT_L2_BYTES: usize = 50 << 20;

/// Seconds of calls before each case's timing ([`Bench::warm_up`]).
const WARM_UP_S: f64 = 0.2;

fn main() {
    let started = Instant::now();
    // cargo bench passes `--bench` (and maybe a filter): a case runs when
    // its name contains every free argument.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let quick = std::env::var("MULTIBOX_BENCH_QUICK").is_ok_and(|v| v == "1");
    let out = match std::env::var_os("MULTIBOX_BENCH_OUT") {
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("cannot open MULTIBOX_BENCH_OUT={path:?}: {e}; not writing results");
                None
            }
        },
        None => None,
    };

    let ctx = match multibox::cuda_context(0) {
        Ok(ctx) => ctx,
        Err(why) => {
            for (name, shape) in CASES {
                for dtype in ["f32", "f16", "bf16"] {
                    println!("skipped {name} {shape} {dtype}: no GPU ({why})");
                }
            }
            for (name, batch, max_boxes) in assign_cases() {
                println!("skipped assign {name} B={batch} T={max_boxes}: no GPU ({why})");
            }
            return;
        }
    };
    let device = ctx.name().unwrap_or_else(|e| format!("unknown ({e})"));
    let peak = PEAK_BANDWIDTH
        .iter()
        .find(|(key, _)| device.contains(key))
        .map(|&(_, bw)| bw);
    let l2 = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .ok()
        .and_then(|b| usize::try_from(b).ok())
        .filter(|&b| b > 0)
        .unwrap_or(DEFAULT_L2_BYTES);
    println!(
        "device: {device}; L2 {} MB; peak DRAM bandwidth {}",
        l2 >> 20,
        peak.map_or("n/a (not in PEAK_BANDWIDTH)".to_string(), |p| format!(
            "{:.2} TB/s",
            p / 1e12
        ))
    );
    let copy = match copy_bandwidth(&ctx) {
        Ok(bw) => {
            println!(
                "device-to-device copy: {:.2} TB/s (read + written)",
                bw / 1e12
            );
            Some(bw)
        }
        Err(e) => {
            println!("device-to-device copy: not measured ({e:#})");
            None
        }
    };
    let deadline = std::env::var("MULTIBOX_BENCH_DEADLINE_S")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(|s| started + std::time::Duration::from_secs_f64(s.max(0.0)));
    let bench = Bench {
        ctx: &ctx,
        device: &device,
        peak,
        copy,
        l2,
        quick,
    };
    let mut run = Run {
        filters,
        deadline,
        left_out: Vec::new(),
        out,
    };

    run.loss_cases(&bench, false);
    println!();
    println!(
        "{:<16} {:>4} {:>5} {:>4} | {:>9} {:>9}",
        "assign", "B", "P", "T", "call us", "graph us"
    );
    for (name, batch, max_boxes) in assign_cases() {
        let id = format!("assign/{name}/{batch}/t{max_boxes}");
        if !run.wants(&id) || !run.in_time(id) {
            continue;
        }
        match bench.assign_case(name, batch, max_boxes) {
            Ok(record) => {
                println!("{}", record.row());
                run.write(record.json());
            }
            Err(e) => println!("failed  assign {name} B={batch} T={max_boxes}: {e:#}"),
        }
    }
    println!();
    run.loss_cases(&bench, true);
    if !run.left_out.is_empty() {
        println!(
            "deadline: {} cases not started ({})",
            run.left_out.len(),
            run.left_out.join(" ")
        );
    }
}

/// Which cases run, and where their records go.
struct Run {
    /// A case runs when its id contains every filter.
    filters: Vec<String>,
    /// No case starts after it (`MULTIBOX_BENCH_DEADLINE_S`).
    deadline: Option<Instant>,
    /// The cases the deadline left out.
    left_out: Vec<String>,
    /// `MULTIBOX_BENCH_OUT`.
    out: Option<std::fs::File>,
}

impl Run {
    /// Whether the case `id` passes the filters.
    fn wants(&self, id: &str) -> bool {
        self.filters.iter().all(|f| id.contains(f.as_str()))
    }

    /// Whether the case `id` may start now: before the deadline (else it is
    /// noted as left out).
    fn in_time(&mut self, id: String) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.left_out.push(id);
            return false;
        }
        true
    }

    fn write(&mut self, json: String) {
        if let Some(f) = self.out.as_mut() {
            if let Err(e) = writeln!(f, "{json}") {
                eprintln!("writing MULTIBOX_BENCH_OUT: {e}");
            }
        }
    }

    /// The row-major cases, or the channel-major (`_cm`) ones.
    fn loss_cases(&mut self, bench: &Bench, channel_major: bool) {
        println!(
            "{:<14} {:>4} {:>5} {:>3} {:>5} | {:>9} {:>9} | {:>7} {:>7} | {:>8} {:>8} {:>6} {:>6} | sets",
            "case",
            "B",
            "P",
            "C",
            "dtype",
            "call us",
            "graph us",
            "fwd us",
            "bwd us",
            "min MB",
            "GB/s",
            "%peak",
            "%copy"
        );
        for &(name, shape) in CASES
            .iter()
            .filter(|(n, _)| n.ends_with("_cm") == channel_major)
        {
            // One host batch per shape, in f32, converted per dtype (drawing
            // the 181 M logits of B=256 three times would take longer than
            // timing them), drawn for the first of its cases that runs.
            let mut host = None;
            for dtype in ["f32", "f16", "bf16"] {
                let id = format!("{name}/{}/{dtype}", shape.batch);
                if !self.wants(&id) || !self.in_time(id) {
                    continue;
                }
                let host = host.get_or_insert_with(|| synthetic_batch(shape, options(name).0));
                let result = match dtype {
                    "f32" => bench.case::<f32>(name, host),
                    "f16" => bench.case::<f16>(name, host),
                    _ => bench.case::<bf16>(name, host),
                };
                match result {
                    Ok(record) => {
                        println!("{}", record.row());
                        self.write(record.json());
                    }
                    Err(e) => println!("failed  {name} {shape} {dtype}: {e:#}"),
                }
            }
        }
    }
}

/// The bandwidth of a device-to-device copy of 1 GiB (bytes read plus
/// bytes written, per second): the median of 10, after 3 to warm up.
fn copy_bandwidth(ctx: &Arc<CudaContext>) -> Result<f64> {
    const BYTES: usize = 1 << 30;
    let stream = ctx.new_stream()?;
    let src = stream.alloc_zeros::<u8>(BYTES)?;
    let mut dst = stream.alloc_zeros::<u8>(BYTES)?;
    for _ in 0..3 {
        stream.memcpy_dtod(&src, &mut dst)?;
    }
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let events: Vec<_> = (0..=10)
        .map(|_| ctx.new_event(timing))
        .collect::<Result<_, _>>()?;
    events[0].record(&stream)?;
    for e in &events[1..] {
        stream.memcpy_dtod(&src, &mut dst)?;
        e.record(&stream)?;
    }
    stream.synchronize()?;
    let times: Vec<f64> = events
        .windows(2)
        .map(|w| w[0].elapsed_ms(&w[1]).map(|ms| f64::from(ms) * 1e-3))
        .collect::<Result<_, _>>()?;
    Ok(2.0 * BYTES as f64 / median(times))
}

/// Target assignment's cases: (priors, B, T).
fn assign_cases() -> Vec<(&'static str, usize, usize)> {
    let mut cases = Vec::new();
    for name in ["ssdlite300", "ssd300"] {
        for batch in [32, 256] {
            for max_boxes in [20, 100] {
                cases.push((name, batch, max_boxes));
            }
        }
    }
    cases
}

/// The buffers of one assignment.
struct AssignSet {
    gt_boxes: CudaSlice<f32>,
    gt_labels: CudaSlice<i64>,
    gt_counts: CudaSlice<i32>,
    labels: CudaSlice<i64>,
    gt_locations: CudaSlice<f32>,
    workspace: CudaSlice<u8>,
}

impl AssignSet {
    fn call(
        &mut self,
        assigner: &TargetAssigner,
        stream: &Arc<CudaStream>,
        batch: usize,
        max_boxes: usize,
    ) -> Result<()> {
        assigner.assign(
            stream,
            batch,
            max_boxes,
            &TargetInputs {
                gt_boxes: &self.gt_boxes,
                gt_labels: &self.gt_labels,
                gt_counts: &self.gt_counts,
            },
            &mut TargetOutputs {
                labels: &mut self.labels,
                gt_locations: &mut self.gt_locations,
            },
            &mut self.workspace,
        )?;
        Ok(())
    }
}

struct AssignRecord {
    name: String,
    batch: usize,
    priors: usize,
    max_boxes: usize,
    device: String,
    call_us: f64,
    graph_us: Option<f64>,
    graph_error: Option<String>,
    calls: usize,
}

impl AssignRecord {
    fn row(&self) -> String {
        let graph = self
            .graph_us
            .map_or(format!("{:>9}", "n/a"), |us| format!("{us:9.1}"));
        let mut row = format!(
            "{:<16} {:>4} {:>5} {:>4} | {:9.1} {graph}",
            self.name, self.batch, self.priors, self.max_boxes, self.call_us
        );
        if let Some(e) = &self.graph_error {
            row.push_str(&format!("  (graph: {e})"));
        }
        row
    }

    fn json(&self) -> String {
        serde_json::json!({
            "assign_case": self.name,
            "batch": self.batch,
            "priors": self.priors,
            "max_boxes": self.max_boxes,
            "labels": "i64",
            "device": self.device,
            "call_us": self.call_us,
            "graph_us": self.graph_us,
            "graph_error": self.graph_error,
            "calls": self.calls,
        })
        .to_string()
    }
}

/// A batch of the shape, drawn once for at most 32 images and repeated to B
/// (the timing does not depend on which images repeat), in `layout`.
fn synthetic_batch(shape: Shape, layout: Layout) -> Batch<f32, i64> {
    let drawn = Shape::new(shape.batch.min(32), shape.priors, shape.classes);
    let one = Batch::<f32, i64>::generate(drawn, BatchSpec::default());
    let repeat =
        |v: &[f32], len: usize| -> Vec<f32> { v.iter().copied().cycle().take(len).collect() };
    Batch {
        shape,
        confidence: repeat(&one.confidence, shape.confidence_len()),
        predicted_locations: repeat(&one.predicted_locations, shape.locations_len()),
        labels: one
            .labels
            .iter()
            .copied()
            .cycle()
            .take(shape.rows())
            .collect(),
        gt_locations: repeat(&one.gt_locations, shape.locations_len()),
    }
    .in_layout(layout)
}

struct Bench<'a> {
    ctx: &'a Arc<CudaContext>,
    device: &'a str,
    /// Datasheet DRAM bandwidth, bytes/s.
    peak: Option<f64>,
    /// Measured device-to-device copy bandwidth, bytes/s.
    copy: Option<f64>,
    l2: usize,
    quick: bool,
}

/// The buffers of one call: inputs, gradients and outputs.
struct CallSet<T> {
    confidence: CudaSlice<T>,
    predicted_locations: CudaSlice<T>,
    labels: CudaSlice<i64>,
    gt_locations: CudaSlice<T>,
    grad_confidence: CudaSlice<T>,
    grad_locations: CudaSlice<T>,
    regression_loss: CudaSlice<f32>,
    classification_loss: CudaSlice<f32>,
    num_pos: CudaSlice<i32>,
    workspace: CudaSlice<u8>,
}

impl<T: Elem> CallSet<T> {
    fn upload(stream: &Arc<CudaStream>, host: &Batch<T, i64>) -> Result<Self> {
        let shape = host.shape;
        Ok(Self {
            confidence: stream.clone_htod(&host.confidence)?,
            predicted_locations: stream.clone_htod(&host.predicted_locations)?,
            labels: stream.clone_htod(&host.labels)?,
            gt_locations: stream.clone_htod(&host.gt_locations)?,
            grad_confidence: stream.alloc_zeros(shape.confidence_len())?,
            grad_locations: stream.alloc_zeros(shape.locations_len())?,
            regression_loss: stream.alloc_zeros(1)?,
            classification_loss: stream.alloc_zeros(1)?,
            num_pos: stream.alloc_zeros(1)?,
            workspace: stream.alloc_zeros(multibox::workspace_bytes(shape)?)?,
        })
    }

    /// One call of `pass` on this set: the fused call the table is about,
    /// or one of its halves, timed apart to show where the time goes. A
    /// backward reads the workspace the set's last forward (or fused call)
    /// left.
    fn call(
        &mut self,
        loss: &MultiboxLoss,
        stream: &Arc<CudaStream>,
        shape: Shape,
        name: &str,
        pass: Pass,
    ) -> Result<()> {
        let (layout, normalizer) = options(name);
        let inputs = multibox::Inputs {
            confidence: &self.confidence,
            predicted_locations: &self.predicted_locations,
            labels: &self.labels,
            gt_locations: &self.gt_locations,
        };
        let mut gradients = multibox::Gradients {
            confidence: &mut self.grad_confidence,
            predicted_locations: &mut self.grad_locations,
        };
        let mut outputs = multibox::Outputs {
            regression_loss: &mut self.regression_loss,
            classification_loss: &mut self.classification_loss,
            num_pos: &mut self.num_pos,
            mask: None,
        };
        let upstream = multibox::Upstream::default();
        let options = CallOptions { layout, normalizer };
        let workspace = &mut self.workspace;
        match pass {
            Pass::ForwardBackward => loss.forward_backward_with(
                stream,
                shape,
                &inputs,
                upstream,
                &mut gradients,
                &mut outputs,
                workspace,
                options,
            )?,
            Pass::Forward => {
                loss.forward_with(stream, shape, &inputs, &mut outputs, workspace, options)?
            }
            Pass::Backward => loss.backward_with(
                stream,
                shape,
                &inputs,
                upstream,
                &mut gradients,
                workspace,
                layout,
            )?,
        }
        Ok(())
    }
}

struct Record {
    name: String,
    shape: Shape,
    dtype: &'static str,
    device: String,
    call_us: f64,
    graph_us: Option<f64>,
    graph_error: Option<String>,
    /// Graph replays of the forward alone and of the backward alone.
    forward_graph_us: Option<f64>,
    backward_graph_us: Option<f64>,
    bytes: usize,
    peak: Option<f64>,
    copy: Option<f64>,
    sets: usize,
    calls: usize,
}

impl Record {
    /// Bandwidth at the best of the two times (the graph's, where it ran).
    fn bandwidth(&self) -> f64 {
        let us = self.graph_us.unwrap_or(self.call_us).min(self.call_us);
        self.bytes as f64 / (us * 1e-6)
    }

    /// The share of `ceiling` (bytes/s) that `bandwidth` reaches, in %.
    fn pct_of(&self, ceiling: Option<f64>) -> Option<f64> {
        ceiling.map(|c| 100.0 * self.bandwidth() / c)
    }

    /// A graph replay (the same launches, issued by the device) is well
    /// under a call: the device waited for the host's launches. (The host's
    /// own issue time says less: once the launch queue is full, the host
    /// waits for the device too.)
    fn launch_bound(&self) -> bool {
        self.graph_us.is_some_and(|g| g < 0.8 * self.call_us)
    }

    fn row(&self) -> String {
        let us = |t: Option<f64>, width: usize| {
            t.map_or(format!("{:>width$}", "n/a"), |us| format!("{us:width$.1}"))
        };
        let graph = us(self.graph_us, 9);
        let (forward, backward) = (us(self.forward_graph_us, 7), us(self.backward_graph_us, 7));
        let pct = |ceiling| {
            self.pct_of(ceiling)
                .map_or(format!("{:>6}", "n/a"), |p| format!("{p:6.1}"))
        };
        let (peak, copy) = (pct(self.peak), pct(self.copy));
        let mut row = format!(
            "{:<14} {:>4} {:>5} {:>3} {:>5} | {:9.1} {graph} | {forward} {backward} | {:8.1} {:8.0} {peak} {copy} | {}",
            self.name,
            self.shape.batch,
            self.shape.priors,
            self.shape.classes,
            self.dtype,
            self.call_us,
            self.bytes as f64 / 1e6,
            self.bandwidth() / 1e9,
            self.sets,
        );
        if self.launch_bound() {
            row.push_str("  launch-bound");
        }
        if let Some(e) = &self.graph_error {
            row.push_str(&format!("  (graph: {e})"));
        }
        row
    }

    fn json(&self) -> String {
        serde_json::json!({
            "case": self.name,
            "batch": self.shape.batch,
            "priors": self.shape.priors,
            "classes": self.shape.classes,
            "dtype": self.dtype,
            "labels": "i64",
            "layout": format!("{:?}", options(&self.name).0),
            "normalizer": format!("{:?}", options(&self.name).1),
            "device": self.device,
            "call_us": self.call_us,
            "launch_bound": self.launch_bound(),
            "graph_us": self.graph_us,
            "graph_error": self.graph_error,
            "forward_graph_us": self.forward_graph_us,
            "backward_graph_us": self.backward_graph_us,
            "min_bytes": self.bytes,
            "gbps": self.bandwidth() / 1e9,
            "peak_gbps": self.peak.map(|p| p / 1e9),
            "peak_pct": self.pct_of(self.peak),
            "copy_gbps": self.copy.map(|c| c / 1e9),
            "copy_pct": self.pct_of(self.copy),
            "sets": self.sets,
            "calls": self.calls,
        })
        .to_string()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

impl Bench<'_> {
    /// Calls `call(i)` for i = 0, 1, ... in rounds of `round` calls until
    /// the device has been kept busy for [`WARM_UP_S`] (one round when
    /// quick): the module's load and the inputs' first touch, and the SM
    /// clock, which idles low and rises only under load, over longer than
    /// the timing loop of a small case lasts (2,000 calls of 12 µs).
    fn warm_up(
        &self,
        stream: &CudaStream,
        round: usize,
        mut call: impl FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        let busy = if self.quick { 0.0 } else { WARM_UP_S };
        let start = Instant::now();
        let mut i = 0;
        loop {
            for _ in 0..round {
                call(i)?;
                i += 1;
            }
            // Waiting each round: the host's clock then tracks the device's work.
            stream.synchronize()?;
            if start.elapsed().as_secs_f64() >= busy {
                return Ok(());
            }
        }
    }

    fn case<T: Elem>(&self, name: &str, host: &Batch<f32, i64>) -> Result<Record> {
        let shape = host.shape;
        let dtype = match T::DTYPE {
            multibox::DType::F32 => "f32",
            multibox::DType::F16 => "f16",
            multibox::DType::BF16 => "bf16",
        };
        // Graph capture needs a stream other than the legacy default one, and
        // cudarc's per-buffer events must stay out of the capture: every
        // buffer lives on this one stream, so nothing needs them.
        // SAFETY: all work below is on `stream`, which orders it.
        unsafe { self.ctx.disable_event_tracking() };
        let stream = self.ctx.new_stream()?;
        let loss = MultiboxLoss::new(self.ctx, MultiboxConfig::default())?;

        // Enough sets that together they hold 4x the L2 in inputs and
        // gradients, at most 16.
        let bytes = multibox::plan::bytes_floor(shape, T::DTYPE, multibox::LabelType::I64, true);
        let sets = (4 * self.l2).div_ceil(bytes).clamp(2, 16);
        let cast = |v: &[f32]| -> Vec<T> { v.iter().map(|&x| T::from_f32(x)).collect() };
        let host = Batch {
            shape,
            confidence: cast(&host.confidence),
            predicted_locations: cast(&host.predicted_locations),
            labels: host.labels.clone(),
            gt_locations: cast(&host.gt_locations),
        };
        let mut calls: Vec<CallSet<T>> = (0..sets)
            .map(|_| CallSet::upload(&stream, &host))
            .collect::<Result<_>>()
            .context("allocating the input sets")?;

        self.warm_up(&stream, sets.max(10), |i| {
            calls[i % sets].call(&loss, &stream, shape, name, Pass::ForwardBackward)
        })?;

        // As many calls as fit in ~0.3 s (0.05 s quick), at least 20.
        let start = Instant::now();
        for c in calls.iter_mut() {
            c.call(&loss, &stream, shape, name, Pass::ForwardBackward)?;
        }
        stream.synchronize()?;
        let per_call = start.elapsed().as_secs_f64() / sets as f64;
        let target = if self.quick { 0.05 } else { 0.3 };
        let n = ((target / per_call) as usize).clamp(20, if self.quick { 100 } else { 2000 });

        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events: Vec<_> = (0..=n)
            .map(|_| self.ctx.new_event(timing))
            .collect::<Result<_, _>>()?;
        // Back to back: event i, call i, event i+1, ... so that the device
        // never waits on the host between calls longer than the launches take.
        events[0].record(&stream)?;
        for i in 0..n {
            calls[i % sets].call(&loss, &stream, shape, name, Pass::ForwardBackward)?;
            events[i + 1].record(&stream)?;
        }
        stream.synchronize()?;
        let times: Vec<f64> = events
            .windows(2)
            .map(|w| w[0].elapsed_ms(&w[1]).map(|ms| f64::from(ms) * 1e3))
            .collect::<Result<_, _>>()?;
        let call_us = median(times);

        let mut graph = |pass, n| self.graph_time(&loss, &stream, name, shape, &mut calls, n, pass);
        let (graph_us, graph_error) = match graph(Pass::ForwardBackward, n) {
            Ok(us) => (Some(us), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        // The halves apart where the fused call captured (a failure there
        // is the fused call's, reported above), on a quarter of the
        // replays: a breakdown, which must not push later cases past the
        // bench's deadline.
        let (forward_graph_us, backward_graph_us) = if graph_us.is_some() {
            let n = (n / 4).max(20);
            (graph(Pass::Forward, n).ok(), graph(Pass::Backward, n).ok())
        } else {
            (None, None)
        };

        if let Ok(status) = loss.status(&stream, shape, &calls[0].workspace) {
            if !status.is_ok() {
                println!("note: {name} {dtype}: device status {status:?}");
            }
        }
        Ok(Record {
            name: name.to_string(),
            shape,
            dtype,
            device: self.device.to_string(),
            call_us,
            graph_us,
            graph_error,
            forward_graph_us,
            backward_graph_us,
            bytes,
            peak: self.peak,
            copy: self.copy,
            sets,
            calls: n,
        })
    }

    /// One graph per input set, each holding one call of `pass`; the
    /// median time of one replay, rotating among the graphs.
    #[allow(clippy::too_many_arguments)]
    fn graph_time<T: Elem>(
        &self,
        loss: &MultiboxLoss,
        stream: &Arc<CudaStream>,
        name: &str,
        shape: Shape,
        calls: &mut [CallSet<T>],
        n: usize,
        pass: Pass,
    ) -> Result<f64> {
        let mut graphs = Vec::with_capacity(calls.len());
        for c in calls.iter_mut() {
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
            let captured = c.call(loss, stream, shape, name, pass);
            // End the capture even when the call failed, so the stream is usable.
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            captured.with_context(|| format!("{pass:?} during capture"))?;
            let graph = graph?.context("the capture recorded no work")?;
            graph.upload()?;
            graphs.push(graph);
        }
        for g in graphs.iter().cycle().take(graphs.len().max(10)) {
            g.launch()?;
        }
        stream.synchronize()?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events: Vec<_> = (0..=n)
            .map(|_| self.ctx.new_event(timing))
            .collect::<Result<_, _>>()?;
        events[0].record(stream)?;
        for i in 0..n {
            graphs[i % graphs.len()].launch()?;
            events[i + 1].record(stream)?;
        }
        stream.synchronize()?;
        let times: Vec<f64> = events
            .windows(2)
            .map(|w| w[0].elapsed_ms(&w[1]).map(|ms| f64::from(ms) * 1e3))
            .collect::<Result<_, _>>()?;
        Ok(median(times))
    }

    /// Target assignment: median of `n` calls (CUDA events around each),
    /// rotating among four batches, then of one graph replay per batch.
    fn assign_case(&self, name: &str, batch: usize, max_boxes: usize) -> Result<AssignRecord> {
        // SAFETY: all work below is on `stream`, which orders it.
        unsafe { self.ctx.disable_event_tracking() };
        let stream = self.ctx.new_stream()?;
        let priors = if name == "ssd300" {
            priors::ssd300()
        } else {
            priors::ssdlite300()
        };
        let p = priors.len() / 4;
        let assigner = TargetAssigner::new(self.ctx, &priors, TargetConfig::default())?;
        let ws = assigner.workspace_bytes(batch, max_boxes)?;
        let mut sets: Vec<AssignSet> = (0..4u64)
            .map(|seed| -> Result<AssignSet> {
                let boxes = BoxBatch::generate(batch, max_boxes, 21, seed);
                Ok(AssignSet {
                    gt_boxes: stream.clone_htod(&boxes.gt_boxes)?,
                    gt_labels: stream.clone_htod(&boxes.gt_labels)?,
                    gt_counts: stream.clone_htod(&boxes.gt_counts)?,
                    labels: stream.alloc_zeros(batch * p)?,
                    gt_locations: stream.alloc_zeros(batch * p * 4)?,
                    workspace: stream.alloc_zeros(ws)?,
                })
            })
            .collect::<Result<_>>()?;
        self.warm_up(&stream, 10, |i| {
            sets[i % 4].call(&assigner, &stream, batch, max_boxes)
        })?;
        let start = Instant::now();
        for s in sets.iter_mut() {
            s.call(&assigner, &stream, batch, max_boxes)?;
        }
        stream.synchronize()?;
        let per_call = start.elapsed().as_secs_f64() / 4.0;
        let target = if self.quick { 0.05 } else { 0.3 };
        let n = ((target / per_call) as usize).clamp(20, if self.quick { 100 } else { 2000 });
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let time = |launch: &mut dyn FnMut(usize) -> Result<()>| -> Result<f64> {
            let events: Vec<_> = (0..=n)
                .map(|_| self.ctx.new_event(timing))
                .collect::<Result<_, _>>()?;
            events[0].record(&stream)?;
            for i in 0..n {
                launch(i)?;
                events[i + 1].record(&stream)?;
            }
            stream.synchronize()?;
            let times: Vec<f64> = events
                .windows(2)
                .map(|w| w[0].elapsed_ms(&w[1]).map(|ms| f64::from(ms) * 1e3))
                .collect::<Result<_, _>>()?;
            Ok(median(times))
        };
        let call_us = time(&mut |i| sets[i % 4].call(&assigner, &stream, batch, max_boxes))?;
        let graphs = (|| -> Result<Vec<_>> {
            let mut graphs = Vec::new();
            for s in sets.iter_mut() {
                stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                let captured = s.call(&assigner, &stream, batch, max_boxes);
                let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
                captured.context("assign during capture")?;
                let graph = graph?.context("the capture recorded no work")?;
                graph.upload()?;
                graphs.push(graph);
            }
            Ok(graphs)
        })();
        let (graph_us, graph_error) =
            match graphs.and_then(|g| time(&mut |i| Ok(g[i % g.len()].launch()?))) {
                Ok(us) => (Some(us), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
        Ok(AssignRecord {
            name: name.to_string(),
            batch,
            priors: p,
            max_boxes,
            device: self.device.to_string(),
            call_us,
            graph_us,
            graph_error,
            calls: n,
        })
    }
}
