//! The crate's own kernels run on the CPU through the emulator (emu/), driven
//! by the same `launch_call` as the GPU: tests hold no launch sequence of
//! their own.

use std::cell::RefCell;

use multibox::plan::{GridLimits, LaunchPlan};
use multibox::{
    launch_call, Backend, DType, DeviceStatus, Float, Label, LabelType, Layout, MultiboxConfig,
    Pass, RawBuffers, RawCall, RawNormalizer, RawUpstream, Shape,
};
use multibox_emu::{Arch, Checks, Region, RegionTraffic, Traffic};

/// The emulator as a launch backend, with its checker: data races always
/// (unless `MULTIBOX_EMU_RACECHECK=0`), and, for a call it was made for
/// ([`Emulator::for_call`]), the bounds of [`LaunchPlan::regions`]: each
/// kernel may touch its regions only.
pub struct Emulator {
    /// Per kernel: the regions it may touch (none listed: no bounds check).
    regions: Vec<(&'static str, Vec<Region>)>,
    /// Check for data races (default: [`multibox_emu::races_checked_by_default`]).
    pub races: bool,
    /// Model each launch's memory traffic into `traffic`.
    pub model_traffic: bool,
    /// Per launch, in order: the kernel and its traffic model.
    pub traffic: RefCell<Vec<(&'static str, Traffic)>>,
    /// The device this emulator pretends to be: few resident blocks make
    /// every block of the row kernels walk several tiles.
    pub grid_limits: GridLimits,
    /// Run each launch's blocks last to first (a GPU promises no order).
    pub reverse_blocks: bool,
    /// The device math model's seed ([`multibox_emu::Checks::device_math`]):
    /// exp and log within CUDA's error bounds instead of the host's.
    pub device_math: Option<u32>,
    /// Which build of the kernels runs ([`multibox_emu::Arch`]).
    pub arch: Arch,
}

impl Emulator {
    /// An emulator that holds each kernel of `call` to its regions.
    pub fn for_call(plan: &LaunchPlan, call: &RawCall) -> Self {
        Self::with_regions(plan.launches(Pass::ForwardBackward).map(|launch| {
            (
                launch
                    .step
                    .kernel_name(call.dtype, call.label_type, call.layout),
                plan.regions(launch.step, call),
            )
        }))
    }

    /// An emulator that holds each named kernel to its plan's regions (a
    /// kernel not named is not bounds-checked).
    pub fn with_regions(
        kernels: impl IntoIterator<Item = (&'static str, Vec<multibox::plan::Region>)>,
    ) -> Self {
        let regions = kernels
            .into_iter()
            .map(|(kernel, regions)| {
                let regions = regions
                    .into_iter()
                    .map(|r| Region {
                        name: r.name,
                        start: r.addr,
                        len: r.len as u64,
                        blocks: r.blocks,
                        writable: r.writable,
                    })
                    .collect();
                (kernel, regions)
            })
            .collect();
        Self {
            regions,
            ..Self::default()
        }
    }
}

impl Default for Emulator {
    fn default() -> Self {
        Self {
            regions: Vec::new(),
            races: multibox_emu::races_checked_by_default(),
            model_traffic: false,
            traffic: RefCell::default(),
            grid_limits: GridLimits::default(),
            reverse_blocks: false,
            device_math: None,
            arch: Arch::default(),
        }
    }
}

impl Backend for Emulator {
    fn grid_limits(&self) -> GridLimits {
        self.grid_limits
    }

    unsafe fn launch(
        &self,
        kernel: &'static str,
        grid: u32,
        block: u32,
        shared_bytes: u32,
        params: &[u8],
    ) -> multibox::Result<()> {
        let checks = Checks {
            races: self.races,
            traffic: self.model_traffic,
            // AddressSanitizer builds have no checker; ASan watches the bounds.
            regions: self
                .regions
                .iter()
                .find(|(k, _)| *k == kernel && multibox_emu::checks_available())
                .map(|(_, r)| r.clone())
                .unwrap_or_default(),
            reverse_blocks: self.reverse_blocks,
            device_math: self.device_math,
            arch: self.arch,
        };
        // SAFETY: launch_call's caller vouched for the addresses in params;
        // here they are host addresses of live Vecs (see `run`).
        let traffic = unsafe {
            multibox_emu::launch_checked(
                kernel,
                [grid, 1, 1],
                [block, 1, 1],
                shared_bytes,
                params,
                &checks,
            )
        }
        .map_err(|e| multibox::Error::Launch {
            kernel,
            message: e.message,
        })?;
        if let Some(traffic) = traffic {
            self.traffic.borrow_mut().push((kernel, traffic));
        }
        Ok(())
    }
}

/// Upstream gradients for an emulated call.
#[derive(Debug, Clone, Copy)]
pub enum Upstream {
    /// Passed by value.
    Host(f32, f32),
    /// Read by the kernels from "device" memory.
    Device(f32, f32),
}

/// The normaliser of an emulated call.
#[derive(Debug, Clone, Copy, Default)]
pub enum Normalizer {
    #[default]
    Positives,
    /// Passed by value.
    Given(f32),
    /// Read by the kernels from "device" memory.
    GivenOnDevice(f32),
    PerImage,
}

impl Normalizer {
    /// The reference's form of it.
    pub fn reference(self) -> multibox::reference::Normalizer {
        use multibox::reference::Normalizer as R;
        match self {
            Normalizer::Positives => R::Positives,
            Normalizer::Given(n) | Normalizer::GivenOnDevice(n) => R::Given(n),
            Normalizer::PerImage => R::PerImage,
        }
    }
}

/// What a call of the kernels wrote (on the emulator or the GPU).
#[derive(Debug, Clone, PartialEq)]
pub struct KernelOutput<T> {
    pub regression_loss: f32,
    pub classification_loss: f32,
    pub num_pos: i32,
    pub mask: Vec<u8>,
    pub grad_confidence: Vec<T>,
    pub grad_locations: Vec<T>,
    pub status: DeviceStatus,
    /// Per launch: the kernel and its traffic model, if asked for.
    pub traffic: Vec<(&'static str, Traffic)>,
}

/// How one emulated call is made.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub upstream: Upstream,
    /// Gradients too, or the losses only.
    pub backward: bool,
    /// With `backward`: the forward, then the backward as a call of its own
    /// on the same workspace (instead of one forward_backward call).
    pub split: bool,
    /// With `split`: which forward runs before the backward.
    pub forward: Forward,
    /// Ask for the mined mask.
    pub with_mask: bool,
    /// The byte every output and the workspace start with.
    pub fill: u8,
    /// Model each launch's memory traffic (`KernelOutput::traffic`).
    pub model_traffic: bool,
    /// Check for data races (the shadow memory costs ~18 bytes per byte
    /// touched: large shapes may turn it off).
    pub races: bool,
    /// Start the gradient buffers one element past an allocation's start:
    /// only element-aligned, as a slice of a user's tensor can be.
    pub misaligned: bool,
    /// The resident blocks of the device the emulator pretends to be.
    pub grid_limits: GridLimits,
    /// The layout of the inputs (and the gradients).
    pub layout: Layout,
    pub normalizer: Normalizer,
    /// Run each launch's blocks last to first ([`Emulator::reverse_blocks`]);
    /// the GPU ignores it.
    pub reverse_blocks: bool,
    /// The device math model's seed ([`Emulator::device_math`]); the GPU
    /// ignores it.
    pub device_math: Option<u32>,
    /// The kernels as sm_75 or as sm_90 runs them ([`Emulator::arch`]); the
    /// GPU runs its own.
    pub arch: Arch,
}

impl Default for Call {
    fn default() -> Self {
        Self {
            upstream: Upstream::Host(1.0, 1.0),
            backward: true,
            split: false,
            forward: Forward::Same,
            with_mask: true,
            fill: 0xab,
            model_traffic: false,
            races: multibox_emu::races_checked_by_default(),
            misaligned: false,
            grid_limits: GridLimits::default(),
            layout: Layout::RowMajor,
            normalizer: Normalizer::Positives,
            reverse_blocks: false,
            device_math: None,
            arch: Arch::default(),
        }
    }
}

/// The forward before a split call's backward ([`Call::forward`]).
#[derive(Debug, Clone, Copy, Default)]
pub enum Forward {
    /// The backward's own call's.
    #[default]
    Same,
    /// None: the backward finds the workspace as [`Call::fill`] left it.
    Nothing,
    /// The backward's own, then another call's on the same buffers and
    /// workspace: the backward's call and configuration, edited.
    Other(fn(&mut RawCall, &mut MultiboxConfig)),
}

/// Forwards whose workspace a backward of its own call must not trust
/// (what [`Forward::Other`] edits, or none), each with its
/// [`Call::fill`]: none on a zeroed and on a garbage workspace, and, after
/// the backward's own, the forward of another layout, shape, input type,
/// label type (narrower only: every edit keeps the forward's reads within
/// the backward's buffers) or configuration. For shapes of B >= 2, P >= 2
/// and C >= 3.
pub fn stale_forwards(labels: LabelType) -> Vec<(&'static str, Forward, u8)> {
    let mut forwards = vec![
        ("no forward, zeroed", Forward::Nothing, 0x00),
        ("no forward, garbage", Forward::Nothing, 0xab),
        (
            "another layout",
            Forward::Other(|c, _| {
                c.layout = match c.layout {
                    Layout::RowMajor => Layout::ChannelMajor,
                    Layout::ChannelMajor => Layout::RowMajor,
                }
            }),
            0x00,
        ),
        (
            "one image fewer",
            Forward::Other(|c, _| {
                c.shape = Shape::new(c.shape.batch - 1, c.shape.priors, c.shape.classes)
            }),
            0x00,
        ),
        (
            "one prior fewer",
            Forward::Other(|c, _| {
                c.shape = Shape::new(c.shape.batch, c.shape.priors - 1, c.shape.classes)
            }),
            0x00,
        ),
        (
            "one class fewer",
            Forward::Other(|c, _| {
                c.shape = Shape::new(c.shape.batch, c.shape.priors, c.shape.classes - 1)
            }),
            0x00,
        ),
        (
            "another input type",
            Forward::Other(|c, _| {
                c.dtype = match c.dtype {
                    DType::F32 | DType::BF16 => DType::F16,
                    DType::F16 => DType::BF16,
                }
            }),
            0x00,
        ),
        (
            "another neg_pos_ratio",
            Forward::Other(|_, k| k.neg_pos_ratio += 1.0),
            0x00,
        ),
        (
            "another min_negatives_per_image",
            Forward::Other(|_, k| k.min_negatives_per_image += 1),
            0x00,
        ),
        ("another beta", Forward::Other(|_, k| k.beta *= 0.5), 0x00),
    ];
    if labels == LabelType::I64 {
        forwards.push((
            "another label type",
            Forward::Other(|c, _| c.label_type = LabelType::I32),
            0x00,
        ));
    }
    forwards
}

/// Inputs of one emulated call.
pub struct HostInputs<'a, T, L> {
    pub confidence: &'a [T],
    pub predicted_locations: &'a [T],
    pub labels: &'a [L],
    pub gt_locations: &'a [T],
}

/// A buffer placed as a device allocator places a tensor: its first element
/// 256-byte aligned (cudaMalloc and PyTorch's caching allocator align more),
/// or `skip` elements past that, as a slice of a tensor can start. Host
/// allocations are only 16-byte aligned, which would make every 512-byte
/// warp request of the traffic model straddle one sector more than on a
/// device.
pub struct Placed<T> {
    storage: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> Placed<T> {
    /// `len` elements of `fill` (garbage, so that a kernel that relies on
    /// zeroed memory fails).
    pub fn filled(len: usize, fill: T, skip: usize) -> Self {
        let storage = vec![fill; len + skip + 256 / std::mem::size_of::<T>().max(1)];
        let start = storage.as_ptr().align_offset(256) + skip;
        assert!(start + len <= storage.len(), "cannot place {len} elements");
        Self {
            storage,
            start,
            len,
        }
    }

    /// A placed copy of `data`.
    pub fn copy_of(data: &[T], skip: usize) -> Self {
        let mut placed = Self::filled(data.len(), T::default(), skip);
        placed.as_mut_slice().copy_from_slice(data);
        placed
    }

    pub fn as_slice(&self) -> &[T] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.storage[self.start..self.start + self.len]
    }

    pub fn addr(&mut self) -> u64 {
        self.as_mut_slice().as_mut_ptr() as u64
    }

    pub fn into_vec(self) -> Vec<T> {
        self.as_slice().to_vec()
    }
}

/// A synthetic batch's four inputs, each [`Placed`] `skip` elements past
/// 256-byte alignment: what the traffic model should see.
pub struct PlacedInputs<T, L> {
    confidence: Placed<T>,
    predicted_locations: Placed<T>,
    labels: Placed<L>,
    gt_locations: Placed<T>,
}

impl<T: Copy + Default, L: Copy + Default> PlacedInputs<T, L> {
    pub fn new(batch: &multibox::synthetic::Batch<T, L>, skip: usize) -> Self {
        Self {
            confidence: Placed::copy_of(&batch.confidence, skip),
            predicted_locations: Placed::copy_of(&batch.predicted_locations, skip),
            labels: Placed::copy_of(&batch.labels, skip),
            gt_locations: Placed::copy_of(&batch.gt_locations, skip),
        }
    }

    pub fn host(&self) -> HostInputs<'_, T, L> {
        HostInputs {
            confidence: self.confidence.as_slice(),
            predicted_locations: self.predicted_locations.as_slice(),
            labels: self.labels.as_slice(),
            gt_locations: self.gt_locations.as_slice(),
        }
    }
}

/// A buffer's traffic in one launch: its regions (`keys`, or `keys[image
/// 3]` where a kernel registers a buffer per image) summed.
pub fn buffer_traffic(traffic: &Traffic, buffer: &str) -> RegionTraffic {
    let mut sum = RegionTraffic::default();
    for (_, t) in traffic
        .regions
        .iter()
        .filter(|(name, _)| name.split('[').next() == Some(buffer))
    {
        for (a, b) in [
            (&mut sum.loads, &t.loads),
            (&mut sum.stores, &t.stores),
            (&mut sum.atomics, &t.atomics),
        ] {
            a.requests += b.requests;
            a.sectors += b.sectors;
            a.bytes += b.bytes;
            a.used_bytes += b.used_bytes;
        }
        sum.unique_sectors += t.unique_sectors;
    }
    sum
}

/// `MULTIBOX_SKIP_EMULATOR=1`: the golden tests leave the emulated kernels
/// out. scripts/gpu-check sets it on a GPU machine, where the GPU's results
/// are what is new and CI has run the emulator already; each of its
/// compute-sanitizer runs would spend ~15 s on the emulator otherwise.
pub fn skipped() -> bool {
    std::env::var("MULTIBOX_SKIP_EMULATOR").as_deref() == Ok("1")
}

/// Runs one call of the real kernels on the emulator. Outputs and the
/// workspace start as garbage (`call.fill` bytes), so every element the test
/// reads was written by a kernel.
pub fn run<T: Float, L: Label>(
    config: &MultiboxConfig,
    shape: Shape,
    inputs: &HostInputs<'_, T, L>,
    call: Call,
) -> multibox::Result<KernelOutput<T>> {
    let Call {
        upstream,
        backward,
        split,
        with_mask,
        fill,
        ..
    } = call;
    let garbage: T = bytemuck::cast_slice::<u8, T>(&[fill; 4][..std::mem::size_of::<T>()])[0];
    let skip = usize::from(call.misaligned);
    let outputs = |len: usize| Placed::filled(if backward { len } else { 0 }, garbage, skip);
    let mut grad_confidence = outputs(shape.confidence_len());
    let mut grad_locations = outputs(shape.locations_len());
    let mut losses = [f32::from_bits(u32::from_ne_bytes([fill; 4])); 2];
    let mut num_pos = [-7i32];
    let mut mask = vec![fill; if with_mask { shape.rows() } else { 0 }];
    let plan = LaunchPlan::with_limits(shape, T::DTYPE, call.layout, call.grid_limits)?;
    let mut workspace = Placed::filled(plan.workspace.bytes, fill, 0);
    // Two f32 in "device" memory, read by the kernels when asked to.
    let device_upstream = match upstream {
        Upstream::Device(g_reg, g_cls) => [g_reg, g_cls],
        Upstream::Host(..) => [0.0; 2],
    };
    let upstream = match upstream {
        Upstream::Host(g_reg, g_cls) => RawUpstream::Host { g_reg, g_cls },
        Upstream::Device(..) => RawUpstream::Device(device_upstream.as_ptr() as u64),
    };
    let device_normalizer = [match call.normalizer {
        Normalizer::GivenOnDevice(n) => n,
        _ => 0.0,
    }];
    let normalizer = match call.normalizer {
        Normalizer::Positives => RawNormalizer::Positives,
        Normalizer::Given(n) => RawNormalizer::Given(n),
        Normalizer::GivenOnDevice(_) => {
            RawNormalizer::GivenOnDevice(device_normalizer.as_ptr() as u64)
        }
        Normalizer::PerImage => RawNormalizer::PerImage,
    };
    let addr = |s: &[T]| s.as_ptr() as u64;
    let raw = RawCall {
        shape,
        dtype: T::DTYPE,
        label_type: L::LABEL_TYPE,
        buffers: RawBuffers {
            confidence: addr(inputs.confidence),
            predicted_locations: addr(inputs.predicted_locations),
            labels: inputs.labels.as_ptr() as u64,
            gt_locations: addr(inputs.gt_locations),
            grad_confidence: grad_confidence.addr(),
            grad_locations: grad_locations.addr(),
            regression_loss: &mut losses[0] as *mut f32 as u64,
            classification_loss: &mut losses[1] as *mut f32 as u64,
            num_pos: num_pos.as_mut_ptr() as u64,
            mask: if with_mask {
                mask.as_mut_ptr() as u64
            } else {
                0
            },
            workspace: workspace.addr(),
            workspace_bytes: plan.workspace.bytes,
        },
        upstream,
        pass: Pass::from_backward(backward),
        layout: call.layout,
        normalizer,
    };
    check_lengths(shape, inputs);
    let emulator_for = |plan: &LaunchPlan, raw: &RawCall| {
        let mut emulator = Emulator::for_call(plan, raw);
        emulator.model_traffic = call.model_traffic;
        emulator.races = call.races;
        emulator.grid_limits = call.grid_limits;
        emulator.reverse_blocks = call.reverse_blocks;
        emulator.device_math = call.device_math;
        emulator.arch = call.arch;
        emulator
    };
    let emulator = emulator_for(&plan, &raw);
    if backward && split {
        let forward = RawCall {
            pass: Pass::Forward,
            ..raw
        };
        // The backward needs no loss output: give it none, so that a write
        // to one would fault.
        let mut backward = RawCall {
            pass: Pass::Backward,
            ..raw
        };
        backward.buffers.regression_loss = 0;
        backward.buffers.classification_loss = 0;
        backward.buffers.num_pos = 0;
        backward.buffers.mask = 0;
        // SAFETY: as below; the backward reads the workspace the forward
        // filled, on the same inputs (another call's forward reads no more
        // of them than the backward's shape and types cover, and fits the
        // workspace, or is refused).
        unsafe {
            if !matches!(call.forward, Forward::Nothing) {
                launch_call(config, &forward, &emulator)?;
            }
            if let Forward::Other(edit) = call.forward {
                let (mut other, mut other_config) = (forward, *config);
                edit(&mut other, &mut other_config);
                let other_plan = LaunchPlan::with_limits(
                    other.shape,
                    other.dtype,
                    other.layout,
                    call.grid_limits,
                )?;
                launch_call(&other_config, &other, &emulator_for(&other_plan, &other))?;
            }
            launch_call(config, &backward, &emulator)?;
        }
    } else {
        // SAFETY: every address points into a live Vec of the length the
        // shape requires (checked above for the inputs, allocated so for the
        // outputs); the emulator runs synchronously, so they outlive the work.
        unsafe { launch_call(config, &raw, &emulator)? };
    }
    let status_at = plan.workspace.status_offset();
    let status_bytes = workspace.as_slice()[status_at..status_at + 4]
        .try_into()
        .unwrap();
    Ok(KernelOutput {
        regression_loss: losses[0],
        classification_loss: losses[1],
        num_pos: num_pos[0],
        mask,
        grad_confidence: grad_confidence.into_vec(),
        grad_locations: grad_locations.into_vec(),
        status: DeviceStatus::from_bits(u32::from_le_bytes(status_bytes)),
        traffic: emulator.traffic.into_inner(),
    })
}

fn check_lengths<T, L>(shape: Shape, inputs: &HostInputs<'_, T, L>) {
    assert_eq!(
        inputs.confidence.len(),
        shape.confidence_len(),
        "confidence"
    );
    assert_eq!(
        inputs.predicted_locations.len(),
        shape.locations_len(),
        "predicted_locations"
    );
    assert_eq!(inputs.labels.len(), shape.rows(), "labels");
    assert_eq!(
        inputs.gt_locations.len(),
        shape.locations_len(),
        "gt_locations"
    );
}

/// Runs `inputs` (row-major) transposed to channel-major through `run`, on
/// the emulator or the GPU, and requires every output bit of `row_major`,
/// the row-major call's result: the mask, `num_pos`, the losses, and the
/// gradients once transposed back.
pub fn assert_channel_major_is_row_major<T: Float, L: Label>(
    what: &str,
    shape: Shape,
    inputs: &HostInputs<'_, T, L>,
    call: Call,
    row_major: &KernelOutput<T>,
    run: impl Fn(&HostInputs<'_, T, L>, Call) -> multibox::Result<KernelOutput<T>>,
) {
    let (rm, cm) = (Layout::RowMajor, Layout::ChannelMajor);
    let confidence = rm.convert(inputs.confidence, shape, shape.classes, cm);
    let predicted_locations = rm.convert(inputs.predicted_locations, shape, 4, cm);
    let gt_locations = rm.convert(inputs.gt_locations, shape, 4, cm);
    let transposed = HostInputs {
        confidence: &confidence,
        predicted_locations: &predicted_locations,
        labels: inputs.labels,
        gt_locations: &gt_locations,
    };
    let got = run(&transposed, Call { layout: cm, ..call })
        .unwrap_or_else(|e| panic!("{what} channel-major: {e}"));
    let got = KernelOutput {
        grad_confidence: cm.convert(&got.grad_confidence, shape, shape.classes, rm),
        grad_locations: cm.convert(&got.grad_locations, shape, 4, rm),
        ..got
    };
    assert_same_bits(&format!("{what} channel-major"), &got, row_major);
}

/// Asserts that two calls wrote the same bits: mask, num_pos, status,
/// losses and gradients (in one layout).
pub fn assert_same_bits<T: Float>(what: &str, got: &KernelOutput<T>, want: &KernelOutput<T>) {
    assert_eq!(got.mask, want.mask, "{what}: mask");
    assert_eq!(got.num_pos, want.num_pos, "{what}: num_pos");
    assert_eq!(got.status, want.status, "{what}: status");
    let bits = |o: &KernelOutput<T>| [o.regression_loss.to_bits(), o.classification_loss.to_bits()];
    assert_eq!(bits(got), bits(want), "{what}: losses");
    let same_bits = |a: &[T], b: &[T]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| bytemuck::bytes_of(x) == bytemuck::bytes_of(y))
    };
    assert!(
        same_bits(&got.grad_confidence, &want.grad_confidence),
        "{what}: grad_confidence"
    );
    assert!(
        same_bits(&got.grad_locations, &want.grad_locations),
        "{what}: grad_locations"
    );
}
