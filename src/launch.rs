//! One call's launch sequence, written once for every backend: the CUDA
//! driver ([`DriverBackend`], which the target assigner's launches use
//! too), the CPU emulator in the tests.
//!
//! Everything a call needs is validated here, before the first launch.

use std::collections::HashMap;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

use crate::plan::{
    layout_code, GridLimits, LaunchPlan, MultiboxParams, Pass, NORMALIZER_GIVEN,
    NORMALIZER_PER_IMAGE, NORMALIZER_POSITIVES,
};
use crate::{device_memory, DType, Error, LabelType, Layout, MultiboxConfig, Result, Shape};

/// Where kernels run. The crate's own implementation drives the CUDA driver;
/// the test suite plugs in a CPU emulator of the same kernels, so both run
/// the same launch sequence.
pub trait Backend {
    /// Launches `kernel` with `grid` x `block` threads, `shared_bytes` of
    /// dynamic shared memory, and `params` (the bytes of the kernel's
    /// `#[repr(C)]` argument struct) as its single argument.
    ///
    /// # Safety
    /// The addresses inside `params` must be valid for what the kernel reads
    /// and writes on this backend, and stay valid until the work completes.
    unsafe fn launch(
        &self,
        kernel: &'static str,
        grid: u32,
        block: u32,
        shared_bytes: u32,
        params: &[u8],
    ) -> Result<()>;

    /// How many blocks of the row kernels this backend's device keeps
    /// resident ([`crate::plan::GridLimits`]); the default knows no device.
    fn grid_limits(&self) -> GridLimits {
        GridLimits::default()
    }

    /// Checks, before anything is launched, that the `bytes` bytes from
    /// `addr` that a call's kernels may touch as `name` are memory they can
    /// reach. The default trusts the caller; the driver backend of the raw
    /// entry points asks the driver ([`crate::device_memory`]).
    fn check_buffer(&self, name: &'static str, addr: u64, bytes: usize) -> Result<()> {
        let _ = (name, addr, bytes);
        Ok(())
    }
}

/// The [`Backend`] of a GPU: kernels loaded in a context, launched through
/// the CUDA driver on one stream. The loss's and the assigner's.
pub(crate) struct DriverBackend<'a> {
    pub functions: &'a HashMap<&'static str, CudaFunction>,
    pub stream: cudarc::driver::sys::CUstream,
    /// The context and device to check each address against (the raw and
    /// C entry points' bare addresses), if any.
    pub check_memory: Option<device_memory::Owner>,
    pub grid_limits: GridLimits,
}

impl Backend for DriverBackend<'_> {
    fn grid_limits(&self) -> GridLimits {
        self.grid_limits
    }

    fn check_buffer(&self, name: &'static str, addr: u64, bytes: usize) -> Result<()> {
        match self.check_memory {
            Some(owner) => device_memory::check(owner, name, addr, bytes),
            None => Ok(()),
        }
    }

    unsafe fn launch(
        &self,
        kernel: &'static str,
        grid: u32,
        block: u32,
        shared_bytes: u32,
        params: &[u8],
    ) -> Result<()> {
        let function = self.functions.get(kernel).ok_or_else(|| Error::Launch {
            kernel,
            message: "not loaded".into(),
        })?;
        // cuLaunchKernel reads (never writes) the argument bytes during the
        // call, so pointing at the caller's bytes needs no copy.
        let mut args = [params.as_ptr().cast_mut().cast::<std::ffi::c_void>()];
        // SAFETY: every kernel takes exactly one argument, the params struct
        // (MultiboxParams or TargetParams, 8-byte aligned) whose bytes
        // `args[0]` points to; the caller vouches for the addresses inside it.
        unsafe {
            cudarc::driver::result::launch_kernel(
                function.cu_function(),
                (grid, 1, 1),
                (block, 1, 1),
                shared_bytes,
                self.stream,
                &mut args,
            )?;
        }
        Ok(())
    }
}

/// Fails with [`Error::WrongContext`] unless `stream` (a caller's stream, or
/// the one a buffer was allocated on) belongs to `ctx`: kernels loaded in
/// one context cannot run on another's stream or reach its memory.
pub(crate) fn check_context(
    ctx: &CudaContext,
    name: &'static str,
    stream: &CudaStream,
) -> Result<()> {
    if stream.context().cu_ctx() != ctx.cu_ctx() {
        return Err(Error::WrongContext {
            name,
            expected_ordinal: ctx.ordinal(),
        });
    }
    Ok(())
}

/// Waits for all work queued in `ctx` (`cuCtxSynchronize`): the drops of
/// the loss and the assigner, before their modules and priors go.
/// cudarc's `CudaContext::synchronize` first hands back an error an earlier
/// cudarc drop recorded on the context (a failed free, say) and then does
/// not wait, so that error is taken first and recorded again after the
/// wait, for the caller's next cudarc call to report, as is the wait's own.
pub(crate) fn wait_for_context(ctx: &CudaContext) {
    let recorded = ctx.check_err();
    ctx.record_err(ctx.synchronize());
    ctx.record_err(recorded);
}

/// Reads the status word at byte `offset` of a workspace (the loss's or the
/// assigner's) of `workspace_bytes` bytes, after checking that it is not
/// null, that it holds the word (else `too_small(offset + 4)`, the error
/// naming the caller's shape), and that the driver knows it as memory of
/// `owner`. Synchronises with `stream`.
///
/// # Safety
/// `workspace` is a device allocation of `ctx` of at least
/// `workspace_bytes` bytes, and `stream` is a live stream of `ctx`, or null
/// for the legacy default stream.
pub(crate) unsafe fn read_status_word(
    ctx: &CudaContext,
    owner: device_memory::Owner,
    workspace: u64,
    workspace_bytes: usize,
    offset: usize,
    too_small: impl FnOnce(usize) -> Error,
    stream: cudarc::driver::sys::CUstream,
) -> Result<u32> {
    if workspace == 0 {
        return Err(Error::NullPointer { name: "workspace" });
    }
    if workspace_bytes < offset + 4 {
        return Err(too_small(offset + 4));
    }
    // The copy below is a raw driver call: it runs in the thread's current
    // context, which must be `ctx`.
    ctx.bind_to_thread()?;
    device_memory::check(owner, "workspace", workspace, offset + 4)?;
    let mut bits = [0u32; 1];
    // SAFETY: the word lies inside the workspace (its size was checked
    // above), the destination is 4 bytes of host memory, and the stream is
    // synchronised before `bits` is read.
    unsafe {
        cudarc::driver::result::memcpy_dtoh_async(&mut bits, workspace + offset as u64, stream)?;
        cudarc::driver::result::stream::synchronize(stream)?;
    }
    Ok(bits[0])
}

/// The upstream gradients `g_reg` and `g_cls` (they carry loss scaling and
/// loss weights).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RawUpstream {
    /// Values known on the host.
    Host {
        /// d(total) / d(regression_loss).
        g_reg: f32,
        /// d(total) / d(classification_loss).
        g_cls: f32,
    },
    /// Device address of two f32, `[g_reg, g_cls]`, read by the kernels
    /// (so a loss scaler's value needs no round-trip to the host).
    Device(u64),
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream::Host {
            g_reg: 1.0,
            g_cls: 1.0,
        }
    }
}

/// What the losses and gradients are divided by (SPEC.md, "Normalisation"),
/// for the raw entry point.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RawNormalizer {
    /// N, the batch's positive count (the default).
    #[default]
    Positives,
    /// A divisor known on the host: `n <= 0` gives zero losses and
    /// gradients, a non-finite `n` NaN losses.
    Given(f32),
    /// Device address of one f32 divisor, read by the kernels when they run
    /// (an all-reduced count needs no trip to the host); as `Given`.
    GivenOnDevice(u64),
    /// Each image by its own positive count, averaged over the images.
    PerImage,
}

/// Device addresses of one call's buffers, for the raw entry point
/// ([`crate::MultiboxLoss::launch_raw`]). Arrays are contiguous, in the
/// call's [`Layout`] (the shapes below are row-major's; channel-major has
/// `[B, C, P]` and `[B, 4, P]`), of the element types the call names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawBuffers {
    /// `[B, P, C]` logits, T.
    pub confidence: u64,
    /// `[B, P, 4]` predicted box offsets, T.
    pub predicted_locations: u64,
    /// `[B, P]` labels, i32 or i64.
    pub labels: u64,
    /// `[B, P, 4]` target box offsets, T.
    pub gt_locations: u64,
    /// `[B, P, C]` gradient of the logits, T; a pass that writes gradients
    /// only (else ignored, may be 0).
    pub grad_confidence: u64,
    /// `[B, P, 4]` gradient of the predicted offsets, T; as `grad_confidence`.
    pub grad_locations: u64,
    /// One f32; a pass that runs the forward only (else ignored, may be 0).
    pub regression_loss: u64,
    /// One f32; as `regression_loss`.
    pub classification_loss: u64,
    /// One i32; as `regression_loss`.
    pub num_pos: u64,
    /// `[B, P]` u8 mask of the priors in the classification loss, or 0 for
    /// none; written by the forward.
    pub mask: u64,
    /// At least [`crate::workspace_bytes`] bytes, 256-byte aligned. The
    /// forward fills it; a [`Pass::Backward`] reads what the forward left.
    pub workspace: u64,
    /// Size of the workspace in bytes.
    pub workspace_bytes: usize,
}

/// Everything one raw call needs besides the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawCall {
    /// The batch shape.
    pub shape: Shape,
    /// Element type of confidence, the locations and the gradients.
    pub dtype: DType,
    /// Element type of labels.
    pub label_type: LabelType,
    /// Device addresses.
    pub buffers: RawBuffers,
    /// Upstream gradients (ignored by [`Pass::Forward`]).
    pub upstream: RawUpstream,
    /// What the call computes: the losses, the gradients, or both.
    /// [`Pass::from_backward`] maps the older `backward: bool` flag.
    pub pass: Pass,
    /// The layout of confidence, the locations and the gradients.
    pub layout: Layout,
    /// The divisor of the losses and gradients. Ignored by [`Pass::Backward`]:
    /// the forward left the divisor it used in the workspace.
    pub normalizer: RawNormalizer,
}

/// Validates `call` and launches its kernels on `backend`, in order.
///
/// A call in which an output (a loss, `num_pos`, the mask, a gradient)
/// overlaps an input, another output or the workspace, or the workspace
/// overlaps an input, is refused with [`Error::Overlap`]. That includes a
/// gradient over its own input: kernel 3 reads a row's logits as the whole
/// 16-byte words that cover it, bytes of the neighbouring rows included,
/// which other blocks may be writing. Inputs (the device upstream and
/// divisor included) may overlap one another.
///
/// # Safety
/// Every address in `call.buffers`, and a device upstream (two f32) or
/// divisor (one f32) named by `call.upstream` or `call.normalizer`, must
/// point to memory that `backend` can access, of at least the size the
/// shape and types imply, and stay valid until the launched work completes.
pub unsafe fn launch_call<B: Backend + ?Sized>(
    config: &MultiboxConfig,
    call: &RawCall,
    backend: &B,
) -> Result<LaunchPlan> {
    config.validate()?;
    let plan = LaunchPlan::with_limits(call.shape, call.dtype, call.layout, backend.grid_limits())?;
    let params = params(config, call, &plan)?;
    let extents = buffer_extents(call, &plan);
    check_overlaps(&extents)?;
    for Extent {
        name, addr, bytes, ..
    } in extents
    {
        if addr != 0 {
            backend.check_buffer(name, addr, bytes)?;
        }
    }
    for launch in plan.launches(call.pass) {
        let kernel = launch
            .step
            .kernel_name(call.dtype, call.label_type, call.layout);
        // SAFETY: `params` holds the addresses the caller vouched for (their
        // sizes included), checked above for null, alignment and overlaps,
        // and by `backend` where it can, in the layout of MultiboxParams.
        unsafe {
            backend.launch(
                kernel,
                launch.grid,
                launch.block,
                launch.shared_bytes,
                bytemuck::bytes_of(&params),
            )?
        };
    }
    Ok(plan)
}

/// Checks the addresses of `call` and builds the kernels' argument struct.
fn params(config: &MultiboxConfig, call: &RawCall, plan: &LaunchPlan) -> Result<MultiboxParams> {
    let b = &call.buffers;
    let t = call.dtype.size();
    let l = call.label_type.size();
    let (forward, backward) = (call.pass.runs_forward(), call.pass.writes_gradients());
    // A fixed array, not a Vec: a call allocates nothing. The last field
    // says whether this pass uses the buffer: every pass reads the inputs
    // and the workspace; the forward writes the losses, the backward the
    // gradients.
    let required = [
        ("confidence", b.confidence, t, true),
        ("predicted_locations", b.predicted_locations, t, true),
        ("labels", b.labels, l, true),
        ("gt_locations", b.gt_locations, t, true),
        ("regression_loss", b.regression_loss, 4, forward),
        ("classification_loss", b.classification_loss, 4, forward),
        ("num_pos", b.num_pos, 4, forward),
        ("workspace", b.workspace, 256, true),
        ("grad_confidence", b.grad_confidence, t, backward),
        ("grad_locations", b.grad_locations, t, backward),
    ];
    for &(name, addr, align, used) in &required {
        if !used {
            continue;
        }
        if addr == 0 {
            return Err(Error::NullPointer { name });
        }
        check_alignment(name, addr, align)?;
    }
    // The mask (bytes) is optional and needs no alignment.
    if b.workspace_bytes < plan.workspace.bytes {
        return Err(Error::WorkspaceTooSmall {
            expected: plan.workspace.bytes,
            actual: b.workspace_bytes,
            shape: call.shape,
        });
    }
    let (upstream, g_reg, g_cls) = match call.upstream {
        RawUpstream::Host { g_reg, g_cls } if backward => {
            for (name, value) in [("g_reg", g_reg), ("g_cls", g_cls)] {
                if !value.is_finite() {
                    return Err(Error::InvalidUpstream { name, value });
                }
            }
            (0, g_reg, g_cls)
        }
        RawUpstream::Device(addr) if backward => {
            if addr == 0 {
                return Err(Error::NullPointer { name: "upstream" });
            }
            check_alignment("upstream", addr, 4)?;
            (addr, 0.0, 0.0)
        }
        // The forward alone never reads the upstream gradients.
        RawUpstream::Host { .. } | RawUpstream::Device(_) => (0, 0.0, 0.0),
    };
    let (normalizer_kind, normalizer, normalizer_value) = match call.normalizer {
        RawNormalizer::Positives => (NORMALIZER_POSITIVES, 0, 0.0),
        RawNormalizer::Given(n) => (NORMALIZER_GIVEN, 0, n),
        RawNormalizer::GivenOnDevice(addr) => {
            if forward {
                if addr == 0 {
                    return Err(Error::NullPointer { name: "normalizer" });
                }
                check_alignment("normalizer", addr, 4)?;
            }
            (NORMALIZER_GIVEN, addr, 0.0)
        }
        RawNormalizer::PerImage => (NORMALIZER_PER_IMAGE, 0, 0.0),
    };
    let ws = &plan.workspace;
    let at = |s: crate::plan::Section| b.workspace + s.offset as u64;
    let shape = call.shape;
    Ok(MultiboxParams {
        confidence: b.confidence,
        predicted_locations: b.predicted_locations,
        labels: b.labels,
        gt_locations: b.gt_locations,
        upstream,
        grad_confidence: if backward { b.grad_confidence } else { 0 },
        grad_locations: if backward { b.grad_locations } else { 0 },
        // The backward writes no loss and no mask: null them so that a
        // stale address in a reused call struct is never written.
        regression_loss: if forward { b.regression_loss } else { 0 },
        classification_loss: if forward { b.classification_loss } else { 0 },
        num_pos: if forward { b.num_pos } else { 0 },
        mask: if forward { b.mask } else { 0 },
        normalizer: if forward { normalizer } else { 0 },
        keys: at(ws.keys),
        terms: at(ws.terms),
        block_status: at(ws.block_status),
        images: at(ws.images),
        totals: at(ws.totals),
        // LaunchPlan::new validated that these fit in 32 bits.
        batch: shape.batch as u32,
        priors: shape.priors as u32,
        classes: shape.classes as u32,
        lanes_per_row: plan.lanes_per_row,
        set_lanes: plan.set_lanes,
        row_blocks: plan.rows.grid,
        min_negatives: config.min_negatives_per_image,
        neg_pos_ratio: config.neg_pos_ratio,
        beta: config.beta,
        g_reg,
        g_cls,
        tile_rows: plan.tile_rows,
        layout: layout_code(call.layout),
        normalizer_kind,
        normalizer_value,
        gradient_tile_rows: plan.gradient_tile_rows,
        set_copy_lanes: plan.set_copy_lanes,
        set_slot_bytes: plan.set_slot_bytes,
        plane_stride: plan.plane_stride,
        gradient_plane_rows: plan.gradient_plane_rows,
        gradient_plane_stride: plan.gradient_plane_stride,
        select_staged_keys: u32::from(plan.select.shared_bytes != 0),
        forward_stamp: forward_stamp(config, call),
        // A forward_backward's kernel 3 follows its own kernel 2.
        check_forward_stamp: u32::from(call.pass == Pass::Backward),
    })
}

/// What a forward leaves in the workspace (`Totals::forward_stamp`) and a
/// backward checks before it trusts the mining decisions there: a hash
/// (FNV-1a) of everything those decisions depend on but the inputs'
/// contents: the shape, the layout, the types and the configuration. Never
/// 0, so that a zeroed workspace never passes; random bytes, or another
/// call's stamp, pass by a 2^-32 chance. The normaliser is left out: the
/// backward uses the forward's, whatever it is given.
fn forward_stamp(config: &MultiboxConfig, call: &RawCall) -> u32 {
    let shape = call.shape;
    // LaunchPlan::new validated that the shape fits in 32 bits.
    let words = [
        shape.batch as u32,
        shape.priors as u32,
        shape.classes as u32,
        call.dtype as u32,
        call.label_type as u32,
        layout_code(call.layout),
        config.neg_pos_ratio.to_bits(),
        config.min_negatives_per_image,
        config.beta.to_bits(),
    ];
    let hash = words
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .fold(0x811c_9dc5_u32, |h, byte| {
            (h ^ u32::from(byte)).wrapping_mul(0x0100_0193)
        });
    hash.max(1)
}

/// One buffer a call's kernels touch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Extent {
    /// The argument's name.
    pub name: &'static str,
    /// Its address; 0 where the pass does not use it.
    pub addr: u64,
    /// The bytes the kernels may read or write from there.
    pub bytes: usize,
    /// Whether they write any of it.
    pub written: bool,
}

/// Refuses two extents that overlap where the kernels write either one
/// ([`Error::Overlap`], naming them in `extents`' order). Unused (address
/// 0) and empty extents overlap nothing; two read-only ones may overlap.
pub(crate) fn check_overlaps(extents: &[Extent]) -> Result<()> {
    let used = |e: &&Extent| e.addr != 0 && e.bytes != 0;
    for (i, a) in extents.iter().enumerate().filter(|(_, e)| used(e)) {
        for b in extents[i + 1..].iter().filter(used) {
            // In u128: a made-up address near the top of the address space
            // must not wrap around.
            let end = |e: &Extent| u128::from(e.addr) + e.bytes as u128;
            if (a.written || b.written)
                && u128::from(a.addr) < end(b)
                && u128::from(b.addr) < end(a)
            {
                return Err(Error::Overlap {
                    a: a.name,
                    b: b.name,
                });
            }
        }
    }
    Ok(())
}

/// Every buffer this call's pass touches: its name, address (0 where the
/// pass does not use it), the bytes the kernels may read or write from
/// there, and whether they write it. A fixed array, so a call allocates
/// nothing.
fn buffer_extents(call: &RawCall, plan: &LaunchPlan) -> [Extent; 13] {
    let b = &call.buffers;
    let shape = call.shape;
    let (t, l) = (call.dtype.size(), call.label_type.size());
    let (forward, backward) = (call.pass.runs_forward(), call.pass.writes_gradients());
    let when = |used: bool, addr: u64| if used { addr } else { 0 };
    let upstream = match call.upstream {
        RawUpstream::Device(addr) => when(backward, addr),
        RawUpstream::Host { .. } => 0,
    };
    let normalizer = match call.normalizer {
        RawNormalizer::GivenOnDevice(addr) => when(forward, addr),
        _ => 0,
    };
    let read = |name, addr, bytes| Extent {
        name,
        addr,
        bytes,
        written: false,
    };
    let written = |name, addr, bytes| Extent {
        name,
        addr,
        bytes,
        written: true,
    };
    let (logits, boxes) = (shape.confidence_len() * t, shape.locations_len() * t);
    [
        read("confidence", b.confidence, logits),
        read("predicted_locations", b.predicted_locations, boxes),
        read("labels", b.labels, shape.rows() * l),
        read("gt_locations", b.gt_locations, boxes),
        // The forward fills it; the backward reads what the forward left.
        written("workspace", b.workspace, plan.workspace.bytes),
        written("regression_loss", when(forward, b.regression_loss), 4),
        written(
            "classification_loss",
            when(forward, b.classification_loss),
            4,
        ),
        written("num_pos", when(forward, b.num_pos), 4),
        written("mask", when(forward, b.mask), shape.rows()),
        read("normalizer", normalizer, 4),
        written("grad_confidence", when(backward, b.grad_confidence), logits),
        written("grad_locations", when(backward, b.grad_locations), boxes),
        read("upstream", upstream, 8),
    ]
}

pub(crate) fn check_alignment(name: &'static str, addr: u64, align: usize) -> Result<()> {
    if !addr.is_multiple_of(align as u64) {
        return Err(Error::Misaligned { name, align, addr });
    }
    Ok(())
}

/// What the kernels saw that only the device can see. Read it with
/// [`crate::MultiboxLoss::status`] when you choose (it synchronises).
/// Later versions may add flags: build one with [`DeviceStatus::from_bits`]
/// or `Default`, and test it with [`DeviceStatus::is_ok`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DeviceStatus {
    /// A label outside `-1..C` was found; both losses are NaN for that call,
    /// and the prior was treated as ignored (never used as an index).
    pub invalid_label: bool,
    /// A NaN or infinity was among the logits (every prior's, ignored ones
    /// included) or a positive's box offset differences (predicted minus
    /// target, in f32: two finite offsets of opposite sign beyond about
    /// 1.7e38 overflow too); it propagates into the losses as in the
    /// reference.
    pub nonfinite_input: bool,
    /// A backward found that the workspace's last forward was not of its
    /// own call (another shape, layout, input or label type or
    /// configuration), or that no forward had written it (it found zeros or
    /// other bytes): every gradient element it wrote is NaN. It replaces
    /// the word's other flags.
    pub stale_workspace: bool,
}

impl DeviceStatus {
    /// Decodes the status word.
    pub fn from_bits(bits: u32) -> Self {
        Self {
            invalid_label: bits & crate::plan::STATUS_INVALID_LABEL != 0,
            nonfinite_input: bits & crate::plan::STATUS_NONFINITE_INPUT != 0,
            stale_workspace: bits & crate::plan::STATUS_STALE_WORKSPACE != 0,
        }
    }

    /// No flag is set.
    pub fn is_ok(&self) -> bool {
        !self.invalid_label && !self.nonfinite_input && !self.stale_workspace
    }
}

/// Where the status word lives in a workspace for `shape`.
pub(crate) fn status_offset(shape: Shape) -> Result<usize> {
    Ok(LaunchPlan::new(shape)?.workspace.status_offset())
}
