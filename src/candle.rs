//! The loss for candle training loops (feature `candle`): [`multibox_loss`]
//! on candle tensors, differentiable with respect to `confidence` and
//! `predicted_locations` through candle's autograd.
//!
//! - **CPU tensors**: the forward and backward run the crate's CPU reference
//!   ([`crate::reference`]: f64 arithmetic, results rounded once to the input
//!   type). The backward reads candle's upstream gradients on the host and
//!   refuses a non-finite one ([`crate::Error::InvalidUpstream`]), as the
//!   crate's host-side upstream does; on CUDA they stay in device memory,
//!   unread by the host, and a NaN or infinite one gives NaN gradients for
//!   the rows it scales, as in PyTorch.
//! - **CUDA tensors** (feature `candle-cuda`): the kernels, on candle's own
//!   stream, through [`crate::MultiboxLoss`] (one per CUDA context and
//!   configuration, built on first use). The forward runs kernels 1 and 2 and
//!   keeps its workspace in the op; the backward runs kernel 3 with candle's
//!   upstream gradients read from device memory, each gradient rounded once.
//!   Nothing is read back: `MultiboxLosses::num_pos` is a tensor the forward's
//!   kernels write, so a step that never reads it never waits on the GPU. An
//!   invalid label is an error on the CPU, and on CUDA makes both losses NaN
//!   (the kernels see it on the device, and the adapter reads no status word).
//!   The loaded kernels are kept for the life of the process, per context and
//!   configuration: keep `MultiboxConfig` fixed rather than scheduled. candle's
//!   `cuda` feature compiles candle's own kernels with `nvcc` at build time:
//!   `scripts/setup-nvcc` installs one from PyPI (see the README). Without
//!   `candle-cuda`, CUDA tensors get an error that says so, never a silent copy
//!   to the host.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use multibox::MultiboxConfig;
//!
//! let dev = Device::Cpu;
//! let config = MultiboxConfig { neg_pos_ratio: 1.0, ..Default::default() };
//! let confidence = Var::from_tensor(&Tensor::zeros((1, 3, 2), candle_core::DType::F32, &dev)?)?;
//! let predicted = Var::from_tensor(&Tensor::new(&[[[0.5f32, 0., 0., 2.], [0.; 4], [0.; 4]]], &dev)?)?;
//! let labels = Tensor::new(&[[1i64, 0, 0]], &dev)?;
//! let gt = Tensor::zeros((1, 3, 4), candle_core::DType::F32, &dev)?;
//!
//! let loss = multibox::candle::multibox_loss(&config, &confidence, &predicted, &labels, &gt)?;
//! let total = (&loss.regression_loss + &loss.classification_loss)?;
//! let grads = total.backward()?;
//! assert_eq!(loss.num_pos.to_scalar::<u32>()?, 1);
//! assert_eq!(loss.regression_loss.to_scalar::<f32>()?, 1.625);
//! let d_loc = grads.get(&predicted).unwrap().flatten_all()?.to_vec1::<f32>()?;
//! assert_eq!(d_loc[..4], [0.5, 0.0, 0.0, 1.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Tensor};
use half::{bf16, f16};

use crate::reference::{self, Inputs, Upstream};
/// The per-call settings: the layout and the normaliser (the CPU
/// reference's, a divisor known on the host).
pub use crate::reference::{Normalizer, Options};
use crate::{Float, MultiboxConfig, Shape};

#[cfg(feature = "candle-cuda")]
use cuda::CudaState;

/// The losses of one call, as candle scalars in the autograd graph: f32
/// whatever the inputs' dtype, as the sums are f32 (`.to_dtype(DType::BF16)`
/// before adding one to a bf16 loss).
#[derive(Debug, Clone)]
pub struct MultiboxLosses {
    /// Smooth-L1 over positives / the divisor (N by default): a 0-dim f32 tensor.
    pub regression_loss: Tensor,
    /// Cross-entropy over positives and mined negatives / the divisor: a 0-dim f32 tensor.
    pub classification_loss: Tensor,
    /// N, the positives in the batch (whatever the normaliser): a 0-dim u32
    /// tensor on the inputs' device, outside the autograd graph. On CUDA the
    /// forward's kernels write it; reading it (`to_scalar::<u32>()`) waits
    /// for them.
    pub num_pos: Tensor,
}

/// The MultiBox loss of `confidence` `[B, P, C]` and `predicted_locations`
/// `[B, P, 4]` (f32, f16 or bf16, one dtype), against `labels` `[B, P]` (an
/// integer dtype: -1 ignore, 0 background, 1..C-1 class; on CUDA i64, u32,
/// u8 or contiguous i32, as candle has no CUDA kernel that converts i16 or
/// copies strided i32) and `gt_locations` `[B, P, 4]` (converted to the
/// inputs' dtype).
///
/// `backward` on any function of the two losses gives the gradients of
/// `confidence` and `predicted_locations` with the upstream gradients of
/// the two losses: from the CPU reference on CPU tensors, from kernel 3 on
/// CUDA ones (feature `candle-cuda`).
///
/// # Errors
/// Shapes that do not agree, dtypes outside the above, tensors on
/// different devices or on a device this build does not serve (CUDA
/// without `candle-cuda`), and on the CPU every error of
/// [`reference::forward`] (wrapped), an invalid label included. On CUDA an
/// invalid label is no error: both losses come out NaN, as SPEC.md's bad
/// input asks of the kernels, so a step that skips non-finite losses skips
/// it.
pub fn multibox_loss(
    config: &MultiboxConfig,
    confidence: &Tensor,
    predicted_locations: &Tensor,
    labels: &Tensor,
    gt_locations: &Tensor,
) -> candle_core::Result<MultiboxLosses> {
    let options = Options::default();
    multibox_loss_with(
        config,
        confidence,
        predicted_locations,
        labels,
        gt_locations,
        &options,
    )
}

/// [`multibox_loss`] in a chosen layout ([`Options::layout`]: channel-major
/// takes `[B, C, P]` logits and `[B, 4, P]` boxes, and gives gradients in
/// that layout) with a chosen normaliser ([`Options::normalizer`]; a divisor
/// in device memory is [`crate::MultiboxLoss::forward_with`]'s).
///
/// # Errors
/// As [`multibox_loss`], with the shapes of the layout.
pub fn multibox_loss_with(
    config: &MultiboxConfig,
    confidence: &Tensor,
    predicted_locations: &Tensor,
    labels: &Tensor,
    gt_locations: &Tensor,
    options: &Options,
) -> candle_core::Result<MultiboxLosses> {
    let (b, p, c, boxes) = match options.layout {
        crate::Layout::RowMajor => {
            let (b, p, c) = confidence.dims3()?;
            (b, p, c, vec![b, p, 4])
        }
        crate::Layout::ChannelMajor => {
            let (b, c, p) = confidence.dims3()?;
            (b, p, c, vec![b, 4, p])
        }
    };
    let shape = Shape::new(b, p, c);
    for (name, t, dims) in [
        ("predicted_locations", predicted_locations, boxes.clone()),
        ("labels", labels, vec![b, p]),
        ("gt_locations", gt_locations, boxes),
    ] {
        if t.dims() != dims.as_slice() {
            candle_core::bail!(
                "multibox: `{name}` has shape {:?}, confidence {:?} needs {dims:?}",
                t.dims(),
                confidence.dims()
            );
        }
    }
    for (name, t) in [
        ("predicted_locations", predicted_locations),
        ("labels", labels),
        ("gt_locations", gt_locations),
    ] {
        if !t.device().same_device(confidence.device()) {
            candle_core::bail!(
                "multibox: `{name}` is on {:?}, confidence on {:?}; all four tensors must be on one device",
                t.device(),
                confidence.device()
            );
        }
    }
    let dtype = confidence.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        candle_core::bail!("multibox: confidence is {dtype:?}; f32, f16 or bf16 expected");
    }
    if predicted_locations.dtype() != dtype {
        candle_core::bail!(
            "multibox: predicted_locations is {:?}, confidence {dtype:?}; they must match",
            predicted_locations.dtype()
        );
    }
    if !matches!(
        labels.dtype(),
        DType::I64 | DType::I32 | DType::I16 | DType::U32 | DType::U8
    ) {
        candle_core::bail!(
            "multibox: labels are {:?}; an integer dtype expected",
            labels.dtype()
        );
    }
    if confidence.device().is_cuda() {
        #[cfg(feature = "candle-cuda")]
        return cuda::multibox_loss(
            config,
            shape,
            *options,
            confidence,
            predicted_locations,
            labels,
            gt_locations,
        );
        #[cfg(not(feature = "candle-cuda"))]
        candle_core::bail!(
            "multibox: the tensors are on {:?}, and this build of the candle adapter runs on CPU \
             tensors only: enable the feature `candle-cuda` (candle's CUDA build needs nvcc, see \
             the README) or use multibox::MultiboxLoss or the C ABI on the GPU",
            confidence.device()
        );
    }
    if !confidence.device().is_cpu() {
        candle_core::bail!(
            "multibox: the tensors are on {:?}; the candle adapter runs on CPU and CUDA tensors",
            confidence.device()
        );
    }
    // The dtypes were checked above, for both devices.
    let labels: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    let num_pos = labels.iter().filter(|&&l| l > 0).count();
    let num_pos = u32::try_from(num_pos).map_err(|_| {
        candle_core::Error::Msg(format!("multibox: {num_pos} positives overflow u32"))
    })?;
    let op = MultiboxOp {
        config: *config,
        shape,
        options: *options,
        labels,
        #[cfg(feature = "candle-cuda")]
        cuda: Default::default(),
    };
    let gt_locations = gt_locations.to_dtype(dtype)?;
    let losses = confidence.contiguous()?.apply_op3(
        &predicted_locations.contiguous()?,
        &gt_locations.contiguous()?,
        op,
    )?;
    Ok(MultiboxLosses {
        regression_loss: losses.get(0)?,
        classification_loss: losses.get(1)?,
        num_pos: Tensor::new(num_pos, confidence.device())?,
    })
}

/// The candle op: arguments `(confidence, predicted_locations, gt_locations)`,
/// result `[regression_loss, classification_loss]` (f32).
struct MultiboxOp {
    config: MultiboxConfig,
    shape: Shape,
    options: Options,
    /// On the host, for the CPU reference (empty on CUDA).
    labels: Vec<i64>,
    /// CUDA: the labels on the device, and the forward's workspace for the
    /// backward.
    #[cfg(feature = "candle-cuda")]
    cuda: std::sync::Arc<std::sync::Mutex<CudaState>>,
}

/// A contiguous CPU tensor's elements.
fn elements<'a, T>(data: &'a [T], layout: &Layout, name: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("multibox: `{name}` is not contiguous"),
    }
}

impl MultiboxOp {
    fn run<T: Float>(
        &self,
        confidence: &[T],
        predicted_locations: &[T],
        gt_locations: &[T],
        upstream: Option<Upstream>,
    ) -> candle_core::Result<reference::Output> {
        let inputs = Inputs {
            confidence,
            predicted_locations,
            labels: &self.labels,
            gt_locations,
        };
        let (config, shape, options) = (&self.config, self.shape, &self.options);
        let out = match upstream {
            Some(u) => reference::forward_backward_with(config, shape, &inputs, u, options),
            None => reference::forward_with(config, shape, &inputs, options),
        };
        out.map_err(candle_core::Error::wrap)
    }

    /// Forward (`upstream` None) or forward and backward on three CPU storages.
    fn run_storage(
        &self,
        s: [(&CpuStorage, &Layout); 3],
        upstream: Option<Upstream>,
    ) -> candle_core::Result<reference::Output> {
        let names = ["confidence", "predicted_locations", "gt_locations"];
        macro_rules! typed {
            ($variant:ident) => {{
                let mut args = Vec::with_capacity(3);
                for ((storage, layout), name) in s.into_iter().zip(names) {
                    match storage {
                        CpuStorage::$variant(data) => args.push(elements(data, layout, name)?),
                        other => candle_core::bail!(
                            "multibox: `{name}` is {:?}, confidence {:?}",
                            other.dtype(),
                            s[0].0.dtype()
                        ),
                    }
                }
                self.run(args[0], args[1], args[2], upstream)
            }};
        }
        match s[0].0 {
            CpuStorage::F32(_) => typed!(F32),
            CpuStorage::F16(_) => typed!(F16),
            CpuStorage::BF16(_) => typed!(BF16),
            other => candle_core::bail!(
                "multibox: confidence is {:?}; f32, f16 or bf16 expected",
                other.dtype()
            ),
        }
    }
}

impl candle_core::CustomOp3 for MultiboxOp {
    fn name(&self) -> &'static str {
        "multibox-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let out = self.run_storage([(s1, l1), (s2, l2), (s3, l3)], None)?;
        // The kernels write f32 losses; so does the adapter.
        let losses = vec![
            out.losses.regression_loss as f32,
            out.losses.classification_loss as f32,
        ];
        Ok((CpuStorage::F32(losses), candle_core::Shape::from(2)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        cuda::forward(self, [(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        confidence: &Tensor,
        predicted_locations: &Tensor,
        gt_locations: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if confidence.device().is_cuda() {
            return cuda::backward(
                self,
                confidence,
                predicted_locations,
                gt_locations,
                grad_res,
            );
        }
        let g = grad_res.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let upstream = Upstream {
            g_reg: g[0],
            g_cls: g[1],
        };
        let dtype = confidence.dtype();
        // The forward again, with gradients: the reference keeps no state
        // between calls (the CPU path favours simplicity over speed).
        let out = {
            let (s1, l1) = confidence.storage_and_layout();
            let (s2, l2) = predicted_locations.storage_and_layout();
            let (s3, l3) = gt_locations.storage_and_layout();
            match (&*s1, &*s2, &*s3) {
                (
                    candle_core::Storage::Cpu(c1),
                    candle_core::Storage::Cpu(c2),
                    candle_core::Storage::Cpu(c3),
                ) => self.run_storage([(c1, l1), (c2, l2), (c3, l3)], Some(upstream))?,
                _ => candle_core::bail!("multibox: backward on CPU tensors only"),
            }
        };
        let device = confidence.device();
        let tensor = |grad: &[f64], dims: &[usize]| -> candle_core::Result<Tensor> {
            match dtype {
                DType::F16 => Tensor::from_vec(to::<f16>(grad), dims, device),
                DType::BF16 => Tensor::from_vec(to::<bf16>(grad), dims, device),
                _ => Tensor::from_vec(to::<f32>(grad), dims, device),
            }
        };
        let grad_confidence = tensor(&out.grad_confidence, confidence.dims())?;
        let grad_locations = tensor(&out.grad_locations, predicted_locations.dims())?;
        Ok((Some(grad_confidence), Some(grad_locations), None))
    }
}

/// Rounds f64 gradients once to `T`, as the kernels write them.
fn to<T: Float>(grad: &[f64]) -> Vec<T> {
    grad.iter().map(|&g| T::from_f64(g)).collect()
}

/// The CUDA path: [`crate::MultiboxLoss`] on candle's stream.
#[cfg(feature = "candle-cuda")]
mod cuda {
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::CudaDType;
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, DType, Layout, Storage, Tensor};
    use cudarc::driver::{CudaSlice, CudaStream, CudaView, DeviceRepr};
    use half::{bf16, f16};

    use super::{MultiboxLosses, MultiboxOp};
    use crate::{Float, Gradients, Inputs, MultiboxConfig, MultiboxLoss, Outputs, Shape};

    /// What the forward leaves for the backward, shared by the op and the caller.
    #[derive(Default)]
    pub(super) struct CudaState {
        /// `[B, P]` labels on the device, i32 or i64, contiguous.
        labels: Option<Tensor>,
        /// The forward's workspace: the mining decisions kernel 3 reads.
        workspace: Option<CudaSlice<u8>>,
        /// The forward's `num_pos`: one u32, which the kernels write as an
        /// i32 (never negative, so the bits are the same number).
        num_pos: Option<CudaSlice<u32>>,
    }

    fn err(e: impl std::fmt::Display) -> candle_core::Error {
        candle_core::Error::Cuda(format!("multibox: {e}").into())
    }

    fn lock(state: &Mutex<CudaState>) -> candle_core::Result<std::sync::MutexGuard<'_, CudaState>> {
        state
            .lock()
            .map_err(|_| err("the op's state was poisoned by an earlier panic"))
    }

    /// One loss per CUDA context and configuration: building one loads the
    /// kernels, which is the expensive part.
    fn loss_for(
        stream: &Arc<CudaStream>,
        config: &MultiboxConfig,
    ) -> candle_core::Result<Arc<MultiboxLoss>> {
        type Cache = Mutex<Vec<(usize, MultiboxConfig, Arc<MultiboxLoss>)>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let ctx = stream.context();
        let key = ctx.cu_ctx() as usize;
        let mut cache = CACHE
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| err("the loss cache was poisoned by an earlier panic"))?;
        if let Some((_, _, loss)) = cache.iter().find(|(k, c, _)| *k == key && c == config) {
            return Ok(loss.clone());
        }
        let loss = Arc::new(MultiboxLoss::new(ctx, *config).map_err(err)?);
        cache.push((key, *config, loss.clone()));
        Ok(loss)
    }

    /// The elements of a contiguous CUDA storage, as a view.
    fn view<'a, T: CudaDType>(
        storage: &'a CudaStorage,
        layout: &Layout,
        name: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let slice = storage.as_cuda_slice::<T>()?;
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(slice.slice(start..end)),
            None => Err(err(format!("`{name}` is not contiguous"))),
        }
    }

    /// `labels` as the kernels read them: i64 or i32, contiguous, on the
    /// device. The copy or conversion is candle's, and candle 0.11's CUDA
    /// kernels cannot convert i16 nor copy a strided i32 tensor: the
    /// driver's "named symbol not found" would name neither the labels nor
    /// their dtype, so for those two the error says what to pass instead.
    fn device_labels(labels: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = labels.dtype();
        let prepared = match dtype {
            DType::I64 | DType::I32 => labels.contiguous(),
            _ => labels.to_dtype(DType::I64),
        };
        prepared.map_err(|e| match dtype {
            DType::I16 | DType::I32 => err(format!(
                "the {dtype:?} labels could not be made contiguous i64 or i32 labels on CUDA \
                 ({e}): candle's CUDA kernels convert no i16 and copy no strided i32; pass \
                 i64, u32 or u8 labels, or contiguous i32 ones"
            )),
            _ => e,
        })
    }

    /// The CUDA half of `multibox_loss`: labels kept on the device, the op
    /// applied, `num_pos` handed on as a tensor (nothing is read back).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn multibox_loss(
        config: &MultiboxConfig,
        shape: Shape,
        options: super::Options,
        confidence: &Tensor,
        predicted_locations: &Tensor,
        labels: &Tensor,
        gt_locations: &Tensor,
    ) -> candle_core::Result<MultiboxLosses> {
        // The dtypes were checked by the caller (the module's multibox_loss).
        let dtype = confidence.dtype();
        let labels = device_labels(labels)?;
        let state = Arc::new(Mutex::new(CudaState {
            labels: Some(labels),
            ..Default::default()
        }));
        let op = MultiboxOp {
            config: *config,
            shape,
            options,
            labels: Vec::new(),
            cuda: state.clone(),
        };
        let gt_locations = gt_locations.to_dtype(dtype)?;
        let losses = confidence.contiguous()?.apply_op3(
            &predicted_locations.contiguous()?,
            &gt_locations.contiguous()?,
            op,
        )?;
        let num_pos = lock(&state)?
            .num_pos
            .take()
            .ok_or_else(|| err("the forward did not run"))?;
        let device = confidence.device().as_cuda_device()?.clone();
        let num_pos = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(num_pos, device)),
            (),
            BackpropOp::none(),
            false,
        );
        Ok(MultiboxLosses {
            regression_loss: losses.get(0)?,
            classification_loss: losses.get(1)?,
            num_pos,
        })
    }

    /// The labels tensor's elements on the device.
    fn labels_view<'a, L: CudaDType>(
        storage: &'a CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<CudaView<'a, L>> {
        view::<L>(storage, layout, "labels")
    }

    /// Kernels 1 and 2: the losses into a 2-element f32 storage; the
    /// workspace and `num_pos` into the op's state.
    pub(super) fn forward(
        op: &MultiboxOp,
        s: [(&CudaStorage, &Layout); 3],
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        match s[0].0.dtype() {
            DType::F32 => forward_typed::<f32>(op, s),
            DType::F16 => forward_typed::<f16>(op, s),
            DType::BF16 => forward_typed::<bf16>(op, s),
            other => {
                candle_core::bail!("multibox: confidence is {other:?}; f32, f16 or bf16 expected")
            }
        }
    }

    fn forward_typed<T: Float + CudaDType + DeviceRepr>(
        op: &MultiboxOp,
        s: [(&CudaStorage, &Layout); 3],
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        let device = s[0].0.device.clone();
        let stream = device.cuda_stream();
        let loss = loss_for(&stream, &op.config)?;
        let mut state = lock(&op.cuda)?;
        let labels = state.labels.clone().ok_or_else(|| err("no labels"))?;
        let (labels_storage, labels_layout) = labels.storage_and_layout();
        let Storage::Cuda(labels_storage) = &*labels_storage else {
            candle_core::bail!("multibox: labels are not on the GPU");
        };
        let workspace_bytes = crate::workspace_bytes(op.shape).map_err(err)?;
        // SAFETY: every bit pattern is a valid f32, u32 and u8, and none of
        // the three is read before it is written: kernel 2 writes both
        // losses and `num_pos`, and the kernels need no zeroed workspace
        // (kernel 1 resets the count kernel 2 reads; the PyTorch op passes
        // `torch.empty` too). No memset, so no launch beyond the kernels.
        let (mut losses, mut num_pos, mut workspace) = unsafe {
            (
                stream.alloc::<f32>(2).map_err(err)?,
                stream.alloc::<u32>(1).map_err(err)?,
                stream.alloc::<u8>(workspace_bytes).map_err(err)?,
            )
        };
        {
            let confidence = view::<T>(s[0].0, s[0].1, "confidence")?;
            let predicted_locations = view::<T>(s[1].0, s[1].1, "predicted_locations")?;
            let gt_locations = view::<T>(s[2].0, s[2].1, "gt_locations")?;
            let (mut reg, mut cls) = losses.split_at_mut(1);
            // SAFETY: i32 and u32 have one size and alignment, and every bit
            // pattern is a valid value of either; the view covers the one
            // element `num_pos` holds.
            let mut num_pos_i32 = unsafe { num_pos.transmute_mut::<i32>(1) }
                .ok_or_else(|| err("num_pos: one i32 does not fit in one u32"))?;
            let mut outputs = Outputs {
                regression_loss: &mut reg,
                classification_loss: &mut cls,
                num_pos: &mut num_pos_i32,
                mask: None,
            };
            macro_rules! run {
                ($l:ty) => {{
                    let labels = labels_view::<$l>(labels_storage, labels_layout)?;
                    let inputs = Inputs {
                        confidence: &confidence,
                        predicted_locations: &predicted_locations,
                        labels: &labels,
                        gt_locations: &gt_locations,
                    };
                    let options = crate::CallOptions {
                        layout: op.options.layout,
                        normalizer: match op.options.normalizer {
                            super::Normalizer::Positives => crate::Normalizer::Positives,
                            super::Normalizer::Given(n) => crate::Normalizer::Given(n),
                            super::Normalizer::PerImage => crate::Normalizer::PerImage,
                        },
                    };
                    loss.forward_with(
                        &stream,
                        op.shape,
                        &inputs,
                        &mut outputs,
                        &mut workspace,
                        options,
                    )
                }};
            }
            match labels.dtype() {
                DType::I32 => run!(i32),
                _ => run!(i64),
            }
            .map_err(err)?;
        }
        state.workspace = Some(workspace);
        state.num_pos = Some(num_pos);
        Ok((
            CudaStorage::wrap_cuda_slice(losses, device),
            candle_core::Shape::from(2),
        ))
    }

    /// The gradients as one candle op with no backward of its own: kernel 3
    /// into one flat `[B*P*C + B*P*4]` buffer of T, split by the caller.
    struct GradientOp {
        shape: Shape,
        config: MultiboxConfig,
        layout: crate::Layout,
        state: Arc<Mutex<CudaState>>,
        /// `[2]` f32 on the device: `[g_reg, g_cls]`.
        upstream: Tensor,
    }

    impl candle_core::CustomOp3 for GradientOp {
        fn name(&self) -> &'static str {
            "multibox-loss-gradient"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("multibox: the CUDA gradient op got CPU tensors")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
            let s = [(s1, l1), (s2, l2), (s3, l3)];
            match s1.dtype() {
                DType::F32 => self.run::<f32>(s),
                DType::F16 => self.run::<f16>(s),
                DType::BF16 => self.run::<bf16>(s),
                other => candle_core::bail!(
                    "multibox: confidence is {other:?}; f32, f16 or bf16 expected"
                ),
            }
        }
    }

    impl GradientOp {
        fn run<T: Float + CudaDType + DeviceRepr>(
            &self,
            s: [(&CudaStorage, &Layout); 3],
        ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
            let device = s[0].0.device.clone();
            let stream = device.cuda_stream();
            let loss = loss_for(&stream, &self.config)?;
            let mut state = lock(&self.state)?;
            let labels = state.labels.clone().ok_or_else(|| err("no labels"))?;
            let (labels_storage, labels_layout) = labels.storage_and_layout();
            let Storage::Cuda(labels_storage) = &*labels_storage else {
                candle_core::bail!("multibox: labels are not on the GPU");
            };
            let (upstream_storage, upstream_layout) = self.upstream.storage_and_layout();
            let Storage::Cuda(upstream_storage) = &*upstream_storage else {
                candle_core::bail!("multibox: the upstream gradient is not on the GPU");
            };
            let upstream = view::<f32>(upstream_storage, upstream_layout, "upstream")?;
            let workspace = state
                .workspace
                .as_mut()
                .ok_or_else(|| err("backward before forward: no workspace"))?;
            let (n, m) = (self.shape.confidence_len(), self.shape.locations_len());
            // SAFETY: every bit pattern is a valid T (f32, f16 or bf16), and
            // kernel 3 writes every element of both gradients, so nothing
            // unwritten is ever read. Zeroing it first would be a memset of
            // the gradients' whole size for nothing.
            let mut grads = unsafe { stream.alloc::<T>(n + m) }.map_err(err)?;
            {
                let confidence = view::<T>(s[0].0, s[0].1, "confidence")?;
                let predicted_locations = view::<T>(s[1].0, s[1].1, "predicted_locations")?;
                let gt_locations = view::<T>(s[2].0, s[2].1, "gt_locations")?;
                let (mut grad_confidence, mut grad_locations) = grads.split_at_mut(n);
                let mut gradients = Gradients {
                    confidence: &mut grad_confidence,
                    predicted_locations: &mut grad_locations,
                };
                macro_rules! run {
                    ($l:ty) => {{
                        let labels = labels_view::<$l>(labels_storage, labels_layout)?;
                        let inputs = Inputs {
                            confidence: &confidence,
                            predicted_locations: &predicted_locations,
                            labels: &labels,
                            gt_locations: &gt_locations,
                        };
                        loss.backward_with(
                            &stream,
                            self.shape,
                            &inputs,
                            crate::Upstream::Device(&upstream),
                            &mut gradients,
                            workspace,
                            self.layout,
                        )
                    }};
                }
                match labels.dtype() {
                    DType::I32 => run!(i32),
                    _ => run!(i64),
                }
                .map_err(err)?;
            }
            Ok((
                CudaStorage::wrap_cuda_slice(grads, device),
                candle_core::Shape::from(n + m),
            ))
        }
    }

    /// Kernel 3 with candle's upstream gradients (`grad_res`, on the device).
    pub(super) fn backward(
        op: &MultiboxOp,
        confidence: &Tensor,
        predicted_locations: &Tensor,
        gt_locations: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gradient = GradientOp {
            shape: op.shape,
            config: op.config,
            layout: op.options.layout,
            state: op.cuda.clone(),
            upstream: grad_res.to_dtype(DType::F32)?.contiguous()?,
        };
        let grads = confidence.apply_op3_no_bwd(predicted_locations, gt_locations, &gradient)?;
        let (n, m) = (op.shape.confidence_len(), op.shape.locations_len());
        let grad_confidence = grads.narrow(0, 0, n)?.reshape(confidence.dims())?;
        let grad_locations = grads.narrow(0, n, m)?.reshape(predicted_locations.dims())?;
        Ok((Some(grad_confidence), Some(grad_locations), None))
    }
}
