//! The loss for candle training loops (feature `candle`): [`multibox_loss`]
//! on candle tensors, differentiable with respect to `confidence` and
//! `predicted_locations` through candle's autograd.
//!
//! **CPU tensors only.** The forward and backward run the crate's CPU
//! reference ([`crate::reference`]: f64 arithmetic, results rounded once to
//! the input type). A CUDA path (candle's `cuda_fwd` over
//! [`crate::MultiboxLoss::launch_raw`]) is not built: candle's `cuda`
//! feature needs `nvcc` and the CUDA toolkit, which the machines this crate
//! is built and tested on do not have. CUDA tensors get an error that says
//! so, never a silent copy to the host.
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
//! assert_eq!(loss.num_pos, 1);
//! assert_eq!(loss.regression_loss.to_scalar::<f32>()?, 1.625);
//! let d_loc = grads.get(&predicted).unwrap().flatten_all()?.to_vec1::<f32>()?;
//! assert_eq!(d_loc[..4], [0.5, 0.0, 0.0, 1.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Tensor};
use half::{bf16, f16};

use crate::reference::{self, Inputs, Upstream};
use crate::{Float, MultiboxConfig, Shape};

/// The losses of one call, as candle scalars (f32) in the autograd graph.
#[derive(Debug, Clone)]
pub struct MultiboxLosses {
    /// Smooth-L1 over positives / N: a 0-dim f32 tensor.
    pub regression_loss: Tensor,
    /// Cross-entropy over positives and mined negatives / N: a 0-dim f32 tensor.
    pub classification_loss: Tensor,
    /// N, the positives in the batch.
    pub num_pos: u64,
}

/// The MultiBox loss of `confidence` `[B, P, C]` and `predicted_locations`
/// `[B, P, 4]` (f32, f16 or bf16, one dtype), against `labels` `[B, P]` (an
/// integer dtype: -1 ignore, 0 background, 1..C-1 class) and
/// `gt_locations` `[B, P, 4]` (converted to the inputs' dtype).
///
/// `backward` on any function of the two losses gives the gradients of
/// `confidence` and `predicted_locations`, computed by the CPU reference
/// with the upstream gradients of the two losses.
///
/// # Errors
/// Shapes that do not agree, dtypes outside the above, tensors not on the
/// CPU, and every error of [`reference::forward`] (wrapped).
pub fn multibox_loss(
    config: &MultiboxConfig,
    confidence: &Tensor,
    predicted_locations: &Tensor,
    labels: &Tensor,
    gt_locations: &Tensor,
) -> candle_core::Result<MultiboxLosses> {
    let (b, p, c) = confidence.dims3()?;
    let shape = Shape::new(b, p, c);
    for (name, t, dims) in [
        ("predicted_locations", predicted_locations, vec![b, p, 4]),
        ("labels", labels, vec![b, p]),
        ("gt_locations", gt_locations, vec![b, p, 4]),
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
        ("confidence", confidence),
        ("predicted_locations", predicted_locations),
        ("labels", labels),
        ("gt_locations", gt_locations),
    ] {
        if !t.device().is_cpu() {
            candle_core::bail!(
                "multibox: `{name}` is on {:?}; the candle adapter runs on CPU tensors only \
                 (its CUDA path is not built; use multibox::MultiboxLoss or the C ABI on the GPU)",
                t.device()
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
    let labels: Vec<i64> = match labels.dtype() {
        DType::I64 | DType::I32 | DType::I16 | DType::U32 | DType::U8 => {
            labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?
        }
        other => candle_core::bail!("multibox: labels are {other:?}; an integer dtype expected"),
    };
    let num_pos = labels.iter().filter(|&&l| l > 0).count() as u64;
    let op = MultiboxOp {
        config: *config,
        shape,
        labels,
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
        num_pos,
    })
}

/// The candle op: arguments `(confidence, predicted_locations, gt_locations)`,
/// result `[regression_loss, classification_loss]` (f32).
struct MultiboxOp {
    config: MultiboxConfig,
    shape: Shape,
    labels: Vec<i64>,
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
        let out = match upstream {
            Some(u) => reference::forward_backward(&self.config, self.shape, &inputs, u),
            None => reference::forward(&self.config, self.shape, &inputs),
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

    fn bwd(
        &self,
        confidence: &Tensor,
        predicted_locations: &Tensor,
        gt_locations: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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
