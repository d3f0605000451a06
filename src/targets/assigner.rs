//! Target assignment on a CUDA device: [`TargetAssigner`].

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice,
};

use super::launch::{launch_assign, RawTargetBuffers, RawTargetCall};
use super::plan::{TargetPlan, TargetStep};
use super::{validate_priors, TargetConfig, TargetShape, TargetStatus};
use crate::launch::{check_context, read_status_word, DriverBackend};
use crate::plan::GridLimits;
use crate::{device_memory, kernels, Error, Float, Label, Result};

/// The inputs of one assignment, on the device (any cudarc slice or view).
pub struct TargetInputs<'a, L> {
    /// `[B, T, 4]` corner-form boxes; rows past `gt_counts[b]` are padding, never read.
    pub gt_boxes: &'a dyn DevicePtr<f32>,
    /// `[B, T]` box labels, classes 1..C-1.
    pub gt_labels: &'a dyn DevicePtr<L>,
    /// `[B]` boxes per image.
    pub gt_counts: &'a dyn DevicePtr<i32>,
}

/// Where an assignment writes (every element is written): the loss's
/// `labels` and `gt_locations`.
pub struct TargetOutputs<'a, T, L> {
    /// `[B, P]`: 0 background, else the matched box's label.
    pub labels: &'a mut dyn DevicePtrMut<L>,
    /// `[B, P, 4]`: each prior's best box, encoded.
    pub gt_locations: &'a mut dyn DevicePtrMut<T>,
}

/// Target assignment on one CUDA context. Build it once with the priors
/// (uploaded here, once) and the settings, then call [`TargetAssigner::assign`]
/// every step on the caller's stream, before the loss: three launches, no
/// allocation, no host synchronisation, capturable in a CUDA graph.
///
/// Targets, then the loss (the README's example):
///
/// ```
/// use multibox::cudarc::driver::CudaSlice;
/// use multibox::targets::{priors, TargetAssigner, TargetConfig, TargetInputs, TargetOutputs};
/// use multibox::{Gradients, Inputs, MultiboxConfig, MultiboxLoss, Outputs, Shape, Upstream};
///
/// let priors = priors::ssdlite300(); // [3000, 4] center form, as the reference's config.priors
/// let (batch, max_boxes) = (2, 3); // B images padded to T box rows
/// let shape = Shape::new(batch, priors.len() / 4, 21);
/// // [B, T, 4] corner form, [B, T] classes 1..C-1, [B] rows used; padding is never read.
/// let gt_boxes = [0.1, 0.1, 0.4, 0.5, 0.5, 0.5, 0.9, 0.8, 0.0, 0.0, 0.0, 0.0,
///                 0.2, 0.3, 0.6, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0f32];
/// let gt_labels = [3i64, 7, 0, 12, 0, 0];
/// let gt_counts = [2i32, 1];
///
/// // Without a GPU: the CPU references (targets in f32, bit for bit; loss in f64).
/// let t = multibox::targets::reference::assign::<i64>(&TargetConfig::default(),
///     multibox::targets::TargetShape::new(batch, shape.priors, max_boxes), &priors, &gt_boxes, &gt_labels, &gt_counts)?;
/// println!("{} positive priors", t.labels.iter().filter(|&&l| l > 0).count());
///
/// if let Ok(ctx) = multibox::cuda_context(0) {
///     let stream = ctx.default_stream();
///     let assigner = TargetAssigner::new(&ctx, &priors, TargetConfig::default())?; // once: kernels, priors uploaded
///     let loss = MultiboxLoss::new(&ctx, MultiboxConfig::default())?;
///     let (boxes, box_labels, counts) = (stream.clone_htod(&gt_boxes)?, stream.clone_htod(&gt_labels)?, stream.clone_htod(&gt_counts)?);
///     let mut labels: CudaSlice<i64> = stream.alloc_zeros(shape.rows())?;
///     let mut gt_locations: CudaSlice<f32> = stream.alloc_zeros(shape.locations_len())?;
///     let mut target_ws = stream.alloc_zeros::<u8>(assigner.workspace_bytes(batch, max_boxes)?)?;
///     // Three launches; nothing read back.
///     assigner.assign(&stream, batch, max_boxes,
///         &TargetInputs { gt_boxes: &boxes, gt_labels: &box_labels, gt_counts: &counts },
///         &mut TargetOutputs { labels: &mut labels, gt_locations: &mut gt_locations },
///         &mut target_ws)?;
///
///     // The network's outputs would go here.
///     let confidence: CudaSlice<f32> = stream.alloc_zeros(shape.confidence_len())?;
///     let predicted_locations: CudaSlice<f32> = stream.alloc_zeros(shape.locations_len())?;
///     let mut grad_confidence: CudaSlice<f32> = stream.alloc_zeros(shape.confidence_len())?;
///     let mut grad_locations: CudaSlice<f32> = stream.alloc_zeros(shape.locations_len())?;
///     let (mut reg, mut cls, mut num_pos) = (stream.alloc_zeros::<f32>(1)?, stream.alloc_zeros::<f32>(1)?, stream.alloc_zeros::<i32>(1)?);
///     let mut loss_ws = stream.alloc_zeros::<u8>(multibox::workspace_bytes(shape)?)?;
///     loss.forward_backward(&stream, shape,
///         &Inputs { confidence: &confidence, predicted_locations: &predicted_locations, labels: &labels, gt_locations: &gt_locations },
///         Upstream::default(),
///         &mut Gradients { confidence: &mut grad_confidence, predicted_locations: &mut grad_locations },
///         &mut Outputs { regression_loss: &mut reg, classification_loss: &mut cls, num_pos: &mut num_pos, mask: None },
///         &mut loss_ws)?;
/// }
/// # Ok::<(), multibox::Error>(())
/// ```
pub struct TargetAssigner {
    config: TargetConfig,
    ctx: Arc<CudaContext>,
    // Kept alive for `priors_addr`; never written after the upload.
    _priors: CudaSlice<f32>,
    priors_addr: u64,
    num_priors: usize,
    functions: HashMap<&'static str, CudaFunction>,
    /// What the raw entry point checks addresses against.
    owner: device_memory::Owner,
}

impl Drop for TargetAssigner {
    /// Waits for the device before the priors are freed: the calls read them
    /// through their bare address, with no cudarc event that would order the
    /// free after work queued on the caller's streams (a non-blocking stream
    /// does not wait for the one cudarc frees on). Dropping an assigner is
    /// rare, so a context-wide wait costs nothing that matters; but it is
    /// `cuCtxSynchronize`, which invalidates a graph capture in progress on
    /// this device in any thread, whatever its mode (so do not drop an
    /// assigner while capturing), and a graph that captured the assigner's
    /// launches must not be launched after the drop.
    fn drop(&mut self) {
        crate::launch::wait_for_context(&self.ctx);
    }
}

impl std::fmt::Debug for TargetAssigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetAssigner")
            .field("config", &self.config)
            .field("priors", &self.num_priors)
            .field("device", &self.ctx.ordinal())
            .finish()
    }
}

impl TargetAssigner {
    /// Loads the kernels into `ctx` and uploads `priors` (`[P, 4]` center
    /// form, flattened; for example [`super::priors::ssd300`]). Validates the
    /// settings and the priors (finite, positive sizes).
    pub fn new(ctx: &Arc<CudaContext>, priors: &[f32], config: TargetConfig) -> Result<Self> {
        config.validate()?;
        let num_priors = validate_priors(priors)?;
        let module = kernels::load_module(ctx, TargetStep::Match.source())?;
        let mut functions = HashMap::new();
        for name in TargetStep::all_kernel_names() {
            functions.insert(name, module.load_function(name)?);
        }
        let stream = ctx.default_stream();
        let priors = stream.clone_htod(priors)?;
        stream.synchronize()?;
        // The upload is complete and nothing writes the priors again, so the
        // calls read them through the bare address, with no cudarc event on
        // any stream (a graph capture on the caller's stream stays legal).
        let priors_addr = {
            let (addr, _guard) = priors.device_ptr(&stream);
            addr
        };
        Ok(Self {
            config,
            ctx: ctx.clone(),
            _priors: priors,
            priors_addr,
            num_priors,
            functions,
            owner: device_memory::Owner::of(ctx),
        })
    }

    /// The settings the assigner was built with.
    pub fn config(&self) -> &TargetConfig {
        &self.config
    }

    /// P, the number of priors.
    pub fn num_priors(&self) -> usize {
        self.num_priors
    }

    /// The shape of a batch of `batch` images padded to `max_boxes` boxes.
    pub fn shape(&self, batch: usize, max_boxes: usize) -> TargetShape {
        TargetShape::new(batch, self.num_priors, max_boxes)
    }

    /// Bytes of workspace [`TargetAssigner::assign`] needs for this batch.
    pub fn workspace_bytes(&self, batch: usize, max_boxes: usize) -> Result<usize> {
        super::plan::workspace_bytes(self.shape(batch, max_boxes))
    }

    /// Assigns targets for a batch of `batch` images with `max_boxes` box
    /// rows each: three kernel launches on `stream`, nothing read back.
    /// `T` is the loss's element type, `L` its label type.
    pub fn assign<T: Float, L: Label>(
        &self,
        stream: &Arc<CudaStream>,
        batch: usize,
        max_boxes: usize,
        inputs: &TargetInputs<'_, L>,
        outputs: &mut TargetOutputs<'_, T, L>,
        workspace: &mut dyn DevicePtrMut<u8>,
    ) -> Result<()> {
        let shape = self.shape(batch, max_boxes);
        shape.validate()?;
        check_context(&self.ctx, "stream", stream)?;
        self.check("gt_boxes", inputs.gt_boxes, shape.boxes_len(), shape)?;
        self.check("gt_labels", inputs.gt_labels, shape.box_labels_len(), shape)?;
        self.check("gt_counts", inputs.gt_counts, shape.batch, shape)?;
        self.check("labels", &*outputs.labels, shape.labels_len(), shape)?;
        self.check(
            "gt_locations",
            &*outputs.gt_locations,
            shape.locations_len(),
            shape,
        )?;
        check_context(&self.ctx, "workspace", workspace.stream())?;

        // The guards record cudarc's events when they drop, after the
        // launches were queued.
        let s = stream.as_ref();
        let (gt_boxes, _g1) = inputs.gt_boxes.device_ptr(s);
        let (gt_labels, _g2) = inputs.gt_labels.device_ptr(s);
        let (gt_counts, _g3) = inputs.gt_counts.device_ptr(s);
        let (labels, _g4) = outputs.labels.device_ptr_mut(s);
        let (gt_locations, _g5) = outputs.gt_locations.device_ptr_mut(s);
        let workspace_bytes = workspace.num_bytes();
        let (workspace, _g6) = workspace.device_ptr_mut(s);
        let call = RawTargetCall {
            shape,
            dtype: T::DTYPE,
            label_type: L::LABEL_TYPE,
            buffers: RawTargetBuffers {
                priors: 0,
                gt_boxes,
                gt_labels,
                gt_counts,
                labels,
                gt_locations,
                workspace,
                workspace_bytes,
            },
        };
        // SAFETY: every address comes from a `DevicePtr` of this context
        // whose length was checked against the shape above (a safe trait
        // that cudarc's own API trusts as this does); the guards keep them
        // borrowed until the launches are queued, and cudarc's stream
        // ordering keeps them alive for the work.
        unsafe { self.launch(&call, stream.cu_stream(), false) }
    }

    /// The raw entry point, for other frameworks: device addresses and a
    /// `CUstream` of this assigner's context. `call.buffers.priors` = 0 uses
    /// the assigner's own priors (then `call.shape.priors` must be P);
    /// another address uses those priors instead, checked as every address
    /// is but not validated (finite, positive sizes) as [`TargetAssigner::new`]
    /// validates its own.
    ///
    /// Validates the shape, the settings, null and misaligned addresses, the
    /// workspace size and overlaps (no output may overlap an input, another
    /// output or the workspace, nor the workspace an input:
    /// [`Error::Overlap`]) before launching anything, and asks the driver
    /// whether each address is memory of this assigner's device
    /// ([`crate::device_memory`]); launches three kernels
    /// on `stream`, allocates nothing, reads nothing back.
    ///
    /// # Safety
    /// - Every address in `call.buffers` is a device allocation of this
    ///   context at least as large as the shape and types imply (`P*4` f32
    ///   priors, `B*T*4` f32 boxes, `B*T` box labels, `B` i32 counts, `B*P`
    ///   labels, `B*P*4` offsets, [`super::plan::workspace_bytes`] of workspace).
    /// - The buffers stay allocated, and untouched by other streams, until
    ///   the work queued on `stream` completes.
    /// - `stream` is a live stream of this context (or null for the legacy
    ///   default stream).
    pub unsafe fn launch_raw(
        &self,
        call: &RawTargetCall,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        // SAFETY: the caller's contract above is launch's.
        unsafe { self.launch(call, stream, true) }
    }

    /// The launch of both entry points; `check_memory` asks the driver
    /// about each address (the raw entry point's bare addresses).
    ///
    /// # Safety
    /// As [`TargetAssigner::launch_raw`].
    unsafe fn launch(
        &self,
        call: &RawTargetCall,
        stream: cudarc::driver::sys::CUstream,
        check_memory: bool,
    ) -> Result<()> {
        #[cfg(feature = "nvtx")]
        let _range = nvtx::LocalRange::new(c"multibox::assign_targets");
        // The shape first: the length below is a product of its sizes.
        call.shape.validate()?;
        let mut call = *call;
        if call.buffers.priors == 0 {
            if call.shape.priors != self.num_priors {
                return Err(Error::TargetLengthMismatch {
                    name: "priors",
                    expected: call.shape.priors * 4,
                    actual: self.num_priors * 4,
                    shape: call.shape,
                });
            }
            call.buffers.priors = self.priors_addr;
        }
        self.ctx.bind_to_thread()?;
        let backend = DriverBackend {
            functions: &self.functions,
            stream,
            check_memory: check_memory.then_some(self.owner),
            grid_limits: GridLimits::default(),
        };
        // SAFETY: the caller's contract above is launch_assign's; the
        // assigner's priors live as long as `self`.
        unsafe { launch_assign(&self.config, &call, &backend) }.map(|_| ())
    }

    /// Reads the status word of the last assignment that used `workspace`
    /// for a batch of this size. Synchronises with `stream`: call it when
    /// you choose (once per epoch, or when a loss looks wrong).
    pub fn status(
        &self,
        stream: &Arc<CudaStream>,
        batch: usize,
        max_boxes: usize,
        workspace: &dyn DevicePtr<u8>,
    ) -> Result<TargetStatus> {
        check_context(&self.ctx, "stream", stream)?;
        check_context(&self.ctx, "workspace", workspace.stream())?;
        let (base, _guard) = workspace.device_ptr(stream);
        // SAFETY: the workspace is a live cudarc buffer of `workspace.len()`
        // bytes, and it and `stream` belong to this context (checked above).
        unsafe {
            self.status_raw(
                self.shape(batch, max_boxes),
                base,
                workspace.len(),
                stream.cu_stream(),
            )
        }
    }

    /// [`TargetAssigner::status`] for the raw entry point. Synchronises with `stream`.
    ///
    /// # Safety
    /// `workspace` is a device allocation of this context of at least
    /// `workspace_bytes` bytes, and `stream` is a live stream of this context
    /// (or null for the legacy default stream).
    pub unsafe fn status_raw(
        &self,
        shape: TargetShape,
        workspace: u64,
        workspace_bytes: usize,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<TargetStatus> {
        let section = TargetPlan::new(shape)?.workspace.status;
        let too_small = |expected| Error::TargetWorkspaceTooSmall {
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
                section.offset,
                too_small,
                stream,
            )?
        };
        Ok(TargetStatus::from_bits(bits))
    }

    fn check<E>(
        &self,
        name: &'static str,
        buffer: &dyn DeviceSlice<E>,
        expected: usize,
        shape: TargetShape,
    ) -> Result<()> {
        check_context(&self.ctx, name, buffer.stream())?;
        if buffer.len() != expected {
            return Err(Error::TargetLengthMismatch {
                name,
                expected,
                actual: buffer.len(),
                shape,
            });
        }
        Ok(())
    }
}
