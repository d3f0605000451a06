//! The loss on a CUDA device: [`MultiboxLoss`].

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice};

use crate::launch::{
    check_context, launch_call, read_status_word, DeviceStatus, DriverBackend, RawBuffers, RawCall,
    RawNormalizer, RawUpstream,
};
use crate::plan::{GridLimits, Pass, Residency, Step, MAX_BLOCKS_PER_SM, ROW_THREADS};
use crate::{device_memory, kernels, Error, Float, Label, Layout, MultiboxConfig, Result, Shape};

/// The inputs of one call, on the device. Any cudarc slice or view works
/// (`&CudaSlice<T>`, `&CudaView<T>`, ...). The shapes are those of
/// [`Layout::RowMajor`]; a channel-major call ([`CallOptions::layout`]) has
/// `[B, C, P]` logits and `[B, 4, P]` boxes (and gradients) instead.
pub struct Inputs<'a, T, L> {
    /// `[B, P, C]` logits.
    pub confidence: &'a dyn DevicePtr<T>,
    /// `[B, P, 4]` predicted box offsets.
    pub predicted_locations: &'a dyn DevicePtr<T>,
    /// `[B, P]` labels: -1 ignore, 0 background, 1..C-1 class.
    pub labels: &'a dyn DevicePtr<L>,
    /// `[B, P, 4]` encoded target box offsets.
    pub gt_locations: &'a dyn DevicePtr<T>,
}

/// Where a call writes the losses. Nothing is read back: the values stay on
/// the device until the caller copies them.
pub struct Outputs<'a> {
    /// One f32: sum of smooth-L1 over positives / the divisor (N by default,
    /// see [`Normalizer`]).
    pub regression_loss: &'a mut dyn DevicePtrMut<f32>,
    /// One f32: cross-entropy over positives and mined negatives / the divisor.
    pub classification_loss: &'a mut dyn DevicePtrMut<f32>,
    /// One i32: N, the batch's positives (whatever the normaliser).
    pub num_pos: &'a mut dyn DevicePtrMut<i32>,
    /// Optional `[B, P]` u8: 1 for each prior in the classification loss.
    pub mask: Option<&'a mut dyn DevicePtrMut<u8>>,
}

/// Where [`MultiboxLoss::forward_backward`] and [`MultiboxLoss::backward`]
/// write the gradients (every element is written).
pub struct Gradients<'a, T> {
    /// `[B, P, C]`: d loss / d confidence.
    pub confidence: &'a mut dyn DevicePtrMut<T>,
    /// `[B, P, 4]`: d loss / d predicted_locations.
    pub predicted_locations: &'a mut dyn DevicePtrMut<T>,
}

/// The upstream gradients of the two losses.
pub enum Upstream<'a> {
    /// Known on the host (1.0 and 1.0 for a plain sum of the losses).
    Host {
        /// d(total) / d(regression_loss).
        g_reg: f32,
        /// d(total) / d(classification_loss).
        g_cls: f32,
    },
    /// Two f32 `[g_reg, g_cls]` on the device, read by the kernels.
    Device(&'a dyn DevicePtr<f32>),
}

impl Default for Upstream<'_> {
    fn default() -> Self {
        Upstream::Host {
            g_reg: 1.0,
            g_cls: 1.0,
        }
    }
}

/// What the losses and gradients are divided by (SPEC.md, "Normalisation").
#[derive(Default)]
pub enum Normalizer<'a> {
    /// N, the batch's positive count (the reference's; the default).
    #[default]
    Positives,
    /// A divisor known on the host. `n <= 0` gives zero losses and
    /// gradients (as N == 0 does); a non-finite `n` gives NaN losses, and
    /// NaN gradients for the priors in the set (`-inf` too: non-finite
    /// comes first).
    Given(f32),
    /// One f32 on the device, read by the kernels when they run, never by
    /// the host: the positive count all-reduced across data-parallel ranks
    /// (NCCL), without a synchronisation, capturable in a graph. As `Given`.
    GivenOnDevice(&'a dyn DevicePtr<f32>),
    /// NVIDIA's SSD: each image's sums over its own positives (an image
    /// without positives adds 0), averaged over the B images.
    PerImage,
}

impl std::fmt::Debug for Normalizer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Normalizer::Positives => f.write_str("Positives"),
            Normalizer::Given(n) => f.debug_tuple("Given").field(n).finish(),
            Normalizer::GivenOnDevice(_) => f.write_str("GivenOnDevice(..)"),
            Normalizer::PerImage => f.write_str("PerImage"),
        }
    }
}

/// The per-call settings of [`MultiboxLoss::forward_with`] and
/// [`MultiboxLoss::forward_backward_with`]; the default is that of
/// [`MultiboxLoss::forward`]: row-major, normalised by N.
#[derive(Debug, Default)]
pub struct CallOptions<'a> {
    /// The layout of confidence, the locations and the gradients.
    pub layout: Layout,
    /// The divisor of the losses and gradients.
    pub normalizer: Normalizer<'a>,
}

/// The MultiBox loss on one CUDA context. Build it once (it loads the
/// kernels), then call it every step on the caller's stream: no allocation,
/// no host synchronisation, so the calls can be captured in a CUDA graph.
/// Dropping it waits for the device, so that work still queued finishes
/// before the kernels are unloaded.
pub struct MultiboxLoss {
    config: MultiboxConfig,
    ctx: Arc<CudaContext>,
    functions: HashMap<&'static str, CudaFunction>,
    grid_limits: GridLimits,
    /// What the raw entry points check addresses against.
    owner: device_memory::Owner,
}

impl std::fmt::Debug for MultiboxLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiboxLoss")
            .field("config", &self.config)
            .field("device", &self.ctx.ordinal())
            .finish()
    }
}

impl Drop for MultiboxLoss {
    /// Waits for the device before the kernels' modules are unloaded (which
    /// follows, as the fields drop): work queued through the loss may still
    /// be running on the caller's streams, and the driver does not promise
    /// that unloading a module waits for its kernels. Dropping a loss is
    /// rare, so a context-wide wait costs nothing that matters; but, as
    /// `TargetAssigner`'s drop, it is `cuCtxSynchronize`, which invalidates
    /// a graph capture in progress on this device in any thread, whatever
    /// its mode: do not drop a loss while capturing.
    fn drop(&mut self) {
        crate::launch::wait_for_context(&self.ctx);
    }
}

impl MultiboxLoss {
    /// Loads the kernels into `ctx`: the CUBIN for the device's architecture
    /// where this build has one, else the PTX.
    pub fn new(ctx: &Arc<CudaContext>, config: MultiboxConfig) -> Result<Self> {
        config.validate()?;
        let mut functions = HashMap::new();
        // One module per kernel source, each loaded once; its kernels are
        // every type instantiation of that step.
        for step in [Step::Rows, Step::Select, Step::Gradient] {
            let module = kernels::load_module(ctx, step.source())?;
            for name in step.kernel_names() {
                functions.insert(name, module.load_function(name)?);
            }
        }
        let grid_limits = resident_blocks(ctx, &functions)?;
        Ok(Self {
            config,
            ctx: ctx.clone(),
            functions,
            grid_limits,
            owner: device_memory::Owner::of(ctx),
        })
    }

    /// How many blocks of the row kernels the device keeps resident, by the
    /// shared memory a shape's tile takes: their grids (from the occupancy
    /// calculator, so there is no tail wave).
    pub fn grid_limits(&self) -> GridLimits {
        self.grid_limits
    }

    /// The configuration the loss was built with.
    pub fn config(&self) -> &MultiboxConfig {
        &self.config
    }

    /// The losses only: two kernel launches on `stream` (rows, selection),
    /// row-major, normalised by N ([`MultiboxLoss::forward_with`] for the
    /// other layout and normalisers).
    ///
    /// Besides the losses, it leaves the mining decisions in `workspace`
    /// (one key per prior, the per-image selections, the positive count,
    /// the divisor), from which [`MultiboxLoss::backward`] computes the
    /// gradients later.
    pub fn forward<T: Float, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        shape: Shape,
        inputs: &Inputs<'_, T, L>,
        outputs: &mut Outputs<'_>,
        workspace: &mut dyn DevicePtrMut<u8>,
    ) -> Result<()> {
        self.forward_with(
            stream,
            shape,
            inputs,
            outputs,
            workspace,
            CallOptions::default(),
        )
    }

    /// [`MultiboxLoss::forward`] in a chosen layout, with a chosen normaliser.
    pub fn forward_with<T: Float, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        shape: Shape,
        inputs: &Inputs<'_, T, L>,
        outputs: &mut Outputs<'_>,
        workspace: &mut dyn DevicePtrMut<u8>,
        options: CallOptions<'_>,
    ) -> Result<()> {
        self.call(
            stream,
            shape,
            inputs,
            Some(outputs),
            None,
            Upstream::default(),
            workspace,
            options,
        )
    }

    /// The gradients of an earlier [`MultiboxLoss::forward`]: one kernel
    /// launch on `stream`, with the upstream gradients known only now (from
    /// autograd, from a loss scaler on the device).
    ///
    /// The result is bit for bit that of [`MultiboxLoss::forward_backward`]
    /// with the same upstream, and each gradient is rounded to T once. The
    /// workspace is all it keeps between the two calls: a `[B, P]` u32 of
    /// keys, the positives' terms and a few bytes per image, no `[B, P, C]`
    /// buffer. The gradients are divided by what the forward divided the
    /// losses by, which the workspace holds.
    ///
    /// # Preconditions
    /// Checked: the shape, the lengths and the contexts, as for the forward.
    /// Not checkable on the host, and the caller's to keep:
    /// - `workspace` holds what the last `forward` on it wrote, and nothing
    ///   has written to it since (not another call of this loss, of this or
    ///   another shape);
    /// - that forward ran with this `shape` (and layout), on this loss (so
    ///   the same configuration), on inputs with the same contents as
    ///   `inputs` (the same buffers, unmodified, in the usual case);
    /// - the forward was queued on `stream`, or on a stream `stream` has
    ///   waited on since.
    ///
    /// Otherwise the gradients are wrong (computed from stale mining
    /// decisions), though every access stays in bounds: the keys are read
    /// as data, never as indices. What the device can tell, it does: where
    /// the last forward on the workspace was not of this shape, layout,
    /// input and label type and configuration, or the workspace is zeroed,
    /// every gradient element is NaN and [`MultiboxLoss::status`] says
    /// [`DeviceStatus::stale_workspace`]. A forward of this call on other
    /// inputs, or memory recycled from a workspace of this call, passes.
    pub fn backward<T: Float, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        shape: Shape,
        inputs: &Inputs<'_, T, L>,
        upstream: Upstream<'_>,
        gradients: &mut Gradients<'_, T>,
        workspace: &mut dyn DevicePtrMut<u8>,
    ) -> Result<()> {
        let layout = Layout::RowMajor;
        self.backward_with(
            stream, shape, inputs, upstream, gradients, workspace, layout,
        )
    }

    /// [`MultiboxLoss::backward`] of a forward in `layout` (its
    /// [`CallOptions::layout`]); no normaliser: the gradients use the
    /// forward's divisor, which the workspace holds.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with<T: Float, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        shape: Shape,
        inputs: &Inputs<'_, T, L>,
        upstream: Upstream<'_>,
        gradients: &mut Gradients<'_, T>,
        workspace: &mut dyn DevicePtrMut<u8>,
        layout: Layout,
    ) -> Result<()> {
        let options = CallOptions {
            layout,
            normalizer: Normalizer::Positives, // unused: the forward's divisor is in the workspace
        };
        self.call(
            stream,
            shape,
            inputs,
            None,
            Some(gradients),
            upstream,
            workspace,
            options,
        )
    }

    /// The losses and both gradients: three kernel launches on `stream`,
    /// row-major, normalised by N.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward<T: Float, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        shape: Shape,
        inputs: &Inputs<'_, T, L>,
        upstream: Upstream<'_>,
        gradients: &mut Gradients<'_, T>,
        outputs: &mut Outputs<'_>,
        workspace: &mut dyn DevicePtrMut<u8>,
    ) -> Result<()> {
        self.forward_backward_with(
            stream,
            shape,
            inputs,
            upstream,
            gradients,
            outputs,
            workspace,
            CallOptions::default(),
        )
    }

    /// [`MultiboxLoss::forward_backward`] in a chosen layout, with a chosen
    /// normaliser; the gradients are written in the inputs' layout.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_with<T: Float, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        shape: Shape,
        inputs: &Inputs<'_, T, L>,
        upstream: Upstream<'_>,
        gradients: &mut Gradients<'_, T>,
        outputs: &mut Outputs<'_>,
        workspace: &mut dyn DevicePtrMut<u8>,
        options: CallOptions<'_>,
    ) -> Result<()> {
        self.call(
            stream,
            shape,
            inputs,
            Some(outputs),
            Some(gradients),
            upstream,
            workspace,
            options,
        )
    }

    /// The pass follows from what is given: outputs for the forward,
    /// gradients for the backward.
    #[allow(clippy::too_many_arguments)]
    fn call<T: Float, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        shape: Shape,
        inputs: &Inputs<'_, T, L>,
        outputs: Option<&mut Outputs<'_>>,
        gradients: Option<&mut Gradients<'_, T>>,
        upstream: Upstream<'_>,
        workspace: &mut dyn DevicePtrMut<u8>,
        options: CallOptions<'_>,
    ) -> Result<()> {
        shape.validate()?;
        self.check_stream(stream)?;
        let n = shape.confidence_len();
        let loc = shape.locations_len();
        check("confidence", inputs.confidence, n, shape, self)?;
        check(
            "predicted_locations",
            inputs.predicted_locations,
            loc,
            shape,
            self,
        )?;
        check("labels", inputs.labels, shape.rows(), shape, self)?;
        check("gt_locations", inputs.gt_locations, loc, shape, self)?;
        if let Some(outputs) = outputs.as_deref() {
            check("regression_loss", &*outputs.regression_loss, 1, shape, self)?;
            check(
                "classification_loss",
                &*outputs.classification_loss,
                1,
                shape,
                self,
            )?;
            check("num_pos", &*outputs.num_pos, 1, shape, self)?;
            if let Some(mask) = outputs.mask.as_deref() {
                check("mask", mask, shape.rows(), shape, self)?;
            }
        }
        check_context(&self.ctx, "workspace", workspace.stream())?;
        if let Some(g) = gradients.as_deref() {
            check("grad_confidence", &*g.confidence, n, shape, self)?;
            check("grad_locations", &*g.predicted_locations, loc, shape, self)?;
        }
        if let Upstream::Device(u) = &upstream {
            check("upstream", *u, 2, shape, self)?;
        }
        if let Normalizer::GivenOnDevice(n) = &options.normalizer {
            check("normalizer", *n, 1, shape, self)?;
        }

        // The guards record cudarc's read/write events when they drop, after
        // the launches below were queued.
        let s = stream.as_ref();
        let (confidence, _g1) = inputs.confidence.device_ptr(s);
        let (predicted_locations, _g2) = inputs.predicted_locations.device_ptr(s);
        let (labels, _g3) = inputs.labels.device_ptr(s);
        let (gt_locations, _g4) = inputs.gt_locations.device_ptr(s);
        let workspace_bytes = workspace.num_bytes();
        let (workspace, _g5) = workspace.device_ptr_mut(s);
        let pass = match (outputs.is_some(), gradients.is_some()) {
            (true, true) => Pass::ForwardBackward,
            (false, true) => Pass::Backward,
            _ => Pass::Forward,
        };
        let (mut regression_loss, mut classification_loss, mut num_pos, mut mask) = (0, 0, 0, 0);
        let (mut _g6, mut _g7, mut _g8, mut _g9) = (None, None, None, None);
        if let Some(outputs) = outputs {
            let (p, g) = outputs.regression_loss.device_ptr_mut(s);
            (regression_loss, _g6) = (p, Some(g));
            let (p, g) = outputs.classification_loss.device_ptr_mut(s);
            (classification_loss, _g7) = (p, Some(g));
            let (p, g) = outputs.num_pos.device_ptr_mut(s);
            (num_pos, _g8) = (p, Some(g));
            if let Some(m) = outputs.mask.as_deref_mut() {
                let (p, g) = m.device_ptr_mut(s);
                (mask, _g9) = (p, Some(g));
            }
        }
        let (grad_confidence, grad_locations, _g10, _g11) = match gradients {
            Some(g) => {
                let (c, gc) = g.confidence.device_ptr_mut(s);
                let (l, gl) = g.predicted_locations.device_ptr_mut(s);
                (c, l, Some(gc), Some(gl))
            }
            None => (0, 0, None, None),
        };
        let (upstream, _g12) = match upstream {
            Upstream::Host { g_reg, g_cls } => (RawUpstream::Host { g_reg, g_cls }, None),
            Upstream::Device(u) => {
                let (p, g) = u.device_ptr(s);
                (RawUpstream::Device(p), Some(g))
            }
        };
        let (normalizer, _g13) = match options.normalizer {
            Normalizer::Positives => (RawNormalizer::Positives, None),
            Normalizer::Given(n) => (RawNormalizer::Given(n), None),
            Normalizer::GivenOnDevice(n) => {
                let (p, g) = n.device_ptr(s);
                (RawNormalizer::GivenOnDevice(p), Some(g))
            }
            Normalizer::PerImage => (RawNormalizer::PerImage, None),
        };
        let call = RawCall {
            shape,
            dtype: T::DTYPE,
            label_type: L::LABEL_TYPE,
            buffers: RawBuffers {
                confidence,
                predicted_locations,
                labels,
                gt_locations,
                grad_confidence,
                grad_locations,
                regression_loss,
                classification_loss,
                num_pos,
                mask,
                workspace,
                workspace_bytes,
            },
            upstream,
            pass,
            layout: options.layout,
            normalizer,
        };
        // SAFETY: every address comes from a `DevicePtr` of this context
        // whose length was checked against the shape above. cudarc's own
        // safe API trusts that trait (a safe one, so an implementation
        // could lie) as this does; its buffers, views and candle's storage
        // tell the truth. The guards keep the buffers borrowed until the
        // launches are queued; cudarc's stream ordering keeps them alive
        // for the work itself.
        unsafe { self.launch(&call, stream.cu_stream(), false) }
    }

    /// The raw entry point, for other frameworks (PyTorch, C++): device
    /// addresses and a `CUstream` of this loss's context.
    ///
    /// Validates the shape, the configuration, null and misaligned addresses,
    /// the workspace size and overlaps before launching anything: no output
    /// may overlap an input, another output or the workspace, nor the
    /// workspace an input ([`Error::Overlap`]; a gradient is never computed
    /// in place over its input). It also asks the driver
    /// whether each address is memory of this loss's device
    /// ([`crate::device_memory`]): a host pointer (where the device cannot
    /// reach pageable host memory), another device's buffer, or one that
    /// ends in memory CUDA does not know is an error, not a fault that
    /// would poison the context. Launches 2 kernels
    /// ([`Pass::Forward`]), 1 ([`Pass::Backward`], with the preconditions of
    /// [`MultiboxLoss::backward`]) or 3 ([`Pass::ForwardBackward`]) on
    /// `stream`; allocates nothing, reads nothing back, so it can be
    /// captured in a CUDA graph.
    ///
    /// # Safety
    /// - Every address in `call.buffers` is a device allocation of this
    ///   loss's context, at least as large as the shape and types imply
    ///   (`B*P*C` elements of T for confidence and its gradient, `B*P*4` for
    ///   the locations and their gradient, `B*P` labels and mask bytes, one
    ///   element per loss output, [`crate::workspace_bytes`] of workspace),
    ///   and so is a device upstream (two f32, `call.upstream`) or divisor
    ///   (one f32, `call.normalizer`).
    /// - The buffers stay allocated, and untouched by other streams, until
    ///   the work queued on `stream` completes.
    /// - `stream` is a live stream of this loss's context (or null for the
    ///   legacy default stream).
    pub unsafe fn launch_raw(
        &self,
        call: &RawCall,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        // SAFETY: the caller's contract above is launch's.
        unsafe { self.launch(call, stream, true) }
    }

    /// The launch of every entry point; `check_memory` asks the driver about
    /// each address (the raw and C entry points' bare addresses; the typed
    /// ones' cudarc buffers were checked against this context already).
    ///
    /// # Safety
    /// As [`MultiboxLoss::launch_raw`].
    unsafe fn launch(
        &self,
        call: &RawCall,
        stream: cudarc::driver::sys::CUstream,
        check_memory: bool,
    ) -> Result<()> {
        // Every entry point (typed, raw, C) comes through here, so nsys
        // shows each call as one range with its kernels under it.
        #[cfg(feature = "nvtx")]
        let _range = nvtx::LocalRange::new(match call.pass {
            Pass::Forward => c"multibox::forward",
            Pass::Backward => c"multibox::backward",
            Pass::ForwardBackward => c"multibox::forward_backward",
        });
        self.ctx.bind_to_thread()?;
        let backend = DriverBackend {
            functions: &self.functions,
            stream,
            check_memory: check_memory.then_some(self.owner),
            grid_limits: self.grid_limits,
        };
        // SAFETY: the caller's contract is launch_call's.
        unsafe { launch_call(&self.config, call, &backend) }.map(|_| ())
    }

    /// Reads the device status word of the last forward (or fused
    /// forward-backward) call that used `workspace` with this `shape`; a
    /// backward call leaves it as its forward wrote it, unless it found no
    /// forward of its own call there
    /// ([`DeviceStatus::stale_workspace`]). This synchronises
    /// with `stream`; call it when you choose, for example once per epoch,
    /// or when a loss is NaN.
    pub fn status(
        &self,
        stream: &Arc<CudaStream>,
        shape: Shape,
        workspace: &dyn DevicePtr<u8>,
    ) -> Result<DeviceStatus> {
        self.check_stream(stream)?;
        check_context(&self.ctx, "workspace", workspace.stream())?;
        let (base, _guard) = workspace.device_ptr(stream);
        // SAFETY: the workspace is a live cudarc buffer of `workspace.len()`
        // bytes, and it and `stream` belong to this loss's context (checked
        // above).
        unsafe { self.status_raw(shape, base, workspace.len(), stream.cu_stream()) }
    }

    /// [`MultiboxLoss::status`] for the raw entry point: the workspace as a
    /// device address of `workspace_bytes` bytes, and a `CUstream` of this
    /// loss's context. Synchronises with `stream`.
    ///
    /// # Safety
    /// `workspace` is a device allocation of this loss's context of at least
    /// `workspace_bytes` bytes, and `stream` is a live stream of this context
    /// (or null for the legacy default stream).
    pub unsafe fn status_raw(
        &self,
        shape: Shape,
        workspace: u64,
        workspace_bytes: usize,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<DeviceStatus> {
        let offset = crate::launch::status_offset(shape)?;
        let too_small = |expected| Error::WorkspaceTooSmall {
            expected,
            actual: workspace_bytes,
            shape,
        };
        // SAFETY: the caller's contract above is read_status_word's.
        let bits = unsafe {
            read_status_word(
                &self.ctx,
                self.owner,
                workspace,
                workspace_bytes,
                offset,
                too_small,
                stream,
            )?
        };
        Ok(DeviceStatus::from_bits(bits))
    }

    fn check_stream(&self, stream: &Arc<CudaStream>) -> Result<()> {
        check_context(&self.ctx, "stream", stream)
    }
}

fn check<T>(
    name: &'static str,
    buffer: &dyn DeviceSlice<T>,
    expected: usize,
    shape: Shape,
    loss: &MultiboxLoss,
) -> Result<()> {
    check_context(&loss.ctx, name, buffer.stream())?;
    if buffer.len() != expected {
        return Err(Error::LengthMismatch {
            name,
            expected,
            actual: buffer.len(),
            shape,
        });
    }
    Ok(())
}

/// The step of the search for the shared memory k blocks may each take: the
/// granule in which sm_80 and later allocate shared memory to blocks.
const SHARED_GRANULE: usize = 128;

/// The device's multiprocessors, and how many blocks of kernel 1 and of
/// each of kernel 3's entries one holds by the shared memory they take:
/// for each count of blocks, the fewest bytes any type instantiation
/// allows, so that the limits hold whichever runs.
fn resident_blocks(
    ctx: &Arc<CudaContext>,
    functions: &HashMap<&'static str, CudaFunction>,
) -> Result<GridLimits> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
    let sms = ctx
        .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
        .max(1) as u32;
    let residency = |names: Vec<&'static str>| -> Result<Residency> {
        // Registers and threads first: they hold this many blocks at most,
        // whatever shared memory the blocks take.
        let mut most_blocks = u32::MAX;
        for &name in &names {
            let f = &functions[name];
            most_blocks = most_blocks.min(f.occupancy_max_active_blocks_per_multiprocessor(
                ROW_THREADS,
                0,
                None,
            )?);
        }
        let mut shared_for = [None; MAX_BLOCKS_PER_SM];
        for (k, bytes) in (1..=most_blocks).zip(shared_for.iter_mut()) {
            let mut fewest = usize::MAX;
            for &name in &names {
                let f = &functions[name];
                let mut most = f.occupancy_available_dynamic_smem_per_block(k, ROW_THREADS)?;
                // The block count is the calculator's own answer: where the
                // two disagree (older occupancy rules left out the 1 KiB an
                // SM reserves a block), step down to where k blocks fit.
                while most > 0
                    && f.occupancy_max_active_blocks_per_multiprocessor(ROW_THREADS, most, None)?
                        < k
                {
                    most = most.saturating_sub(SHARED_GRANULE);
                }
                fewest = fewest.min(most);
            }
            *bytes = Some(fewest.min(u32::MAX as usize) as u32);
        }
        Ok(Residency { shared_for })
    };
    Ok(GridLimits {
        sms,
        rows: residency(Step::Rows.kernel_names())?,
        gradient: residency(Step::Gradient.layout_kernel_names(Layout::RowMajor))?,
        gradient_channel_major: residency(
            Step::Gradient.layout_kernel_names(Layout::ChannelMajor),
        )?,
    })
}

/// The CUDA driver library's names, in the order cudarc tries them: the
/// development symlink, then the soname the driver installs; on Windows the
/// DLL.
const DRIVER_NAMES: &[&str] = if cfg!(windows) {
    &["nvcuda.dll"]
} else {
    &["libcuda.so", "libcuda.so.1"]
};

/// Whether the CUDA driver library can be loaded: where cudarc loads it at
/// run time, its first driver call panics without it. Asked here by the
/// driver's names rather than through cudarc's `is_culib_present`, which
/// exists only where cudarc loads the library: where it links the library
/// instead (candle's CUDA build, for one) the name resolves to the library
/// already mapped. Asked once, as the answer cannot change while the
/// process runs.
pub(crate) fn driver_library_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| {
        DRIVER_NAMES.iter().any(|&name| {
            // SAFETY: loading the driver library runs its initialisers,
            // which cudarc's own first call would run as well; the handle
            // is closed again at once.
            unsafe { libloading::Library::new(name) }.is_ok()
        })
    })
}

/// Opens CUDA device `ordinal`, or says why there is none: no driver library
/// (`libcuda.so`, `nvcuda.dll`) on this machine, or no such device. Unlike
/// `CudaContext::new`, it never panics when the driver is missing.
pub fn cuda_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_library_present() {
        return Err(Error::NoDevice(format!(
            "the CUDA driver library is not installed (none of {})",
            DRIVER_NAMES.join(", ")
        )));
    }
    let count = CudaContext::device_count()
        .map_err(|e| Error::NoDevice(format!("the CUDA driver failed: {e}")))?;
    if ordinal >= count as usize {
        return Err(Error::NoDevice(format!(
            "device {ordinal} requested, {count} CUDA device(s) present"
        )));
    }
    Ok(CudaContext::new(ordinal)?)
}
