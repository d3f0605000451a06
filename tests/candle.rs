//! The candle adapter (feature `candle`) on CPU tensors: the losses and the
//! gradients candle's autograd returns are the CPU reference's, rounded once
//! to the input type, for any upstream gradients; bad input is an error.
//! With the feature `candle-cuda`, the same on a GPU when there is one (the
//! test says why it is skipped otherwise, and fails under
//! MULTIBOX_REQUIRE_GPU=1).
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};
use multibox::candle::multibox_loss;
use multibox::reference::{self, Upstream};
use multibox::synthetic::{Batch, BatchSpec};
use multibox::{MultiboxConfig, Shape};

#[cfg(feature = "candle-cuda")]
mod common;
#[cfg(feature = "candle-cuda")]
use common::check::ulp_distance;

fn tensors<T: multibox::Float + candle_core::WithDType>(
    batch: &Batch<T, i64>,
    shape: Shape,
) -> candle_core::Result<(Var, Var, Tensor, Tensor)> {
    let (b, p, c) = (shape.batch, shape.priors, shape.classes);
    let dev = Device::Cpu;
    Ok((
        Var::from_tensor(&Tensor::from_slice(&batch.confidence, (b, p, c), &dev)?)?,
        Var::from_tensor(&Tensor::from_slice(
            &batch.predicted_locations,
            (b, p, 4),
            &dev,
        )?)?,
        Tensor::from_slice(&batch.labels, (b, p), &dev)?,
        Tensor::from_slice(&batch.gt_locations, (b, p, 4), &dev)?,
    ))
}

/// N as a number, once it is checked to be a 0-dim u32 tensor on the
/// losses' device, outside the autograd graph.
fn num_pos(loss: &multibox::candle::MultiboxLosses) -> candle_core::Result<u64> {
    let n = &loss.num_pos;
    assert_eq!(n.dtype(), DType::U32);
    assert!(n.dims().is_empty(), "num_pos has shape {:?}", n.dims());
    assert!(n.device().same_device(loss.regression_loss.device()));
    assert!(!n.track_op(), "num_pos is not differentiable");
    Ok(n.to_device(&Device::Cpu)?.to_scalar::<u32>()?.into())
}

/// The two losses are the reference's, rounded once to f32, and N is its N.
fn assert_losses_are(
    loss: &multibox::candle::MultiboxLosses,
    want: &reference::Output,
) -> candle_core::Result<()> {
    assert_eq!(num_pos(loss)?, want.losses.num_pos);
    assert_eq!(
        loss.regression_loss.to_scalar::<f32>()?,
        want.losses.regression_loss as f32
    );
    assert_eq!(
        loss.classification_loss.to_scalar::<f32>()?,
        want.losses.classification_loss as f32
    );
    Ok(())
}

/// Losses, then d(g_reg * reg + g_cls * cls) through candle, against the reference.
fn matches_reference<T: multibox::Float + candle_core::WithDType>(
    shape: Shape,
    g_reg: f32,
    g_cls: f32,
) -> candle_core::Result<()> {
    let config = MultiboxConfig::default();
    let batch = Batch::<T, i64>::generate(shape, BatchSpec::default());
    let (confidence, predicted, labels, gt) = tensors(&batch, shape)?;

    let loss = multibox_loss(&config, &confidence, &predicted, &labels, &gt)?;
    let total =
        ((&loss.regression_loss * g_reg as f64)? + (&loss.classification_loss * g_cls as f64)?)?;
    let grads = total.backward()?;

    let want = reference::forward_backward(
        &config,
        shape,
        &batch.reference_inputs(),
        Upstream { g_reg, g_cls },
    )
    .map_err(candle_core::Error::wrap)?;
    assert!(want.losses.num_pos > 0);
    assert_losses_are(&loss, &want)?;
    let grad_confidence = grads
        .get(&confidence)
        .expect("d confidence")
        .flatten_all()?
        .to_vec1::<T>()?;
    let grad_locations = grads
        .get(&predicted)
        .expect("d locations")
        .flatten_all()?
        .to_vec1::<T>()?;
    assert!(
        grad_confidence == want.grad_confidence_as::<T>(),
        "grad_confidence differs"
    );
    assert!(
        grad_locations == want.grad_locations_as::<T>(),
        "grad_locations differs"
    );
    assert!(grads.get(&gt).is_none(), "gt_locations gets no gradient");
    Ok(())
}

#[test]
fn f32_losses_and_gradients_are_the_references() -> candle_core::Result<()> {
    matches_reference::<f32>(Shape::new(2, 300, 21), 1.0, 1.0)
}

#[test]
fn upstream_gradients_scale_each_loss() -> candle_core::Result<()> {
    matches_reference::<f32>(Shape::new(2, 100, 5), 2.0, 0.25)
}

#[test]
fn a_non_finite_upstream_gradient_is_refused_on_the_cpu() -> candle_core::Result<()> {
    // The CPU backward reads the upstream on the host, as the crate's host
    // upstream, and refuses it as that does (module docs).
    let dev = Device::Cpu;
    let confidence = Var::from_tensor(&Tensor::zeros((1, 3, 2), DType::F32, &dev)?)?;
    let predicted = Var::from_tensor(&Tensor::zeros((1, 3, 4), DType::F32, &dev)?)?;
    let labels = Tensor::new(&[[1i64, 0, 0]], &dev)?;
    let gt = Tensor::zeros((1, 3, 4), DType::F32, &dev)?;
    let loss = multibox_loss(
        &MultiboxConfig::default(),
        &confidence,
        &predicted,
        &labels,
        &gt,
    )?;
    let scaled = (loss.classification_loss * f64::NAN)?;
    let err = (&loss.regression_loss + &scaled)?
        .backward()
        .expect_err("a NaN upstream gradient is refused");
    assert!(
        err.to_string().contains("g_cls") && err.to_string().contains("not a finite number"),
        "{err}"
    );
    Ok(())
}

#[test]
fn f16_inputs() -> candle_core::Result<()> {
    matches_reference::<f16>(Shape::new(1, 200, 8), 1.0, 1.0)
}

#[test]
fn bf16_inputs() -> candle_core::Result<()> {
    matches_reference::<bf16>(Shape::new(2, 50, 6), 0.5, 3.0)
}

/// Views as a candle model makes them: logits transposed out of a
/// channel-major `Var`, boxes narrowed out of a wider one, strided labels
/// and targets at an offset. The losses are the reference's, and the
/// gradients reach the parent `Var`s in their own layout, zero in the
/// columns the view leaves out.
#[test]
fn strided_views_and_their_gradients() -> candle_core::Result<()> {
    let shape = Shape::new(2, 300, 5);
    let (b, p, c) = (shape.batch, shape.priors, shape.classes);
    let config = MultiboxConfig::default();
    let batch = Batch::<f32, i64>::generate(shape, BatchSpec::default());
    let (confidence, predicted, labels, gt) = tensors(&batch, shape)?;
    let dev = Device::Cpu;

    let channel_major = Var::from_tensor(&confidence.transpose(1, 2)?.contiguous()?)?;
    let confidence_view = channel_major.transpose(1, 2)?;
    let padding = Tensor::ones((b, p, 3), DType::F32, &dev)?;
    let wide = Var::from_tensor(&Tensor::cat(&[predicted.as_tensor(), &padding], 2)?)?;
    let predicted_view = wide.narrow(2, 0, 4)?;
    let labels_view = labels.t()?.contiguous()?.t()?;
    let gt_view =
        Tensor::cat(&[&Tensor::zeros((1, p, 4), DType::F32, &dev)?, &gt], 0)?.narrow(0, 1, b)?;
    for view in [&confidence_view, &predicted_view, &labels_view] {
        assert!(!view.is_contiguous());
    }

    let loss = multibox_loss(
        &config,
        &confidence_view,
        &predicted_view,
        &labels_view,
        &gt_view,
    )?;
    let grads = (&loss.regression_loss + &loss.classification_loss)?.backward()?;
    let want = reference::forward_backward(
        &config,
        shape,
        &batch.reference_inputs(),
        Upstream::default(),
    )
    .map_err(candle_core::Error::wrap)?;
    assert!(want.losses.num_pos > 0);
    assert_losses_are(&loss, &want)?;
    let d_channel_major = grads.get(&channel_major).expect("d confidence");
    assert_eq!(d_channel_major.dims(), [b, c, p]);
    let d_confidence = d_channel_major
        .transpose(1, 2)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert!(d_confidence == want.grad_confidence_as::<f32>());
    let d_wide = grads.get(&wide).expect("d locations");
    let d_locations = d_wide.narrow(2, 0, 4)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(d_locations == want.grad_locations_as::<f32>());
    assert!(d_wide
        .narrow(2, 4, 3)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|&g| g == 0.0));
    Ok(())
}

/// Every integer dtype candle has serves as labels on the CPU, with the same
/// results (the unsigned ones without the -1 of ignored priors); CUDA:
/// `cuda_label_dtypes`.
#[test]
fn every_integer_label_dtype() -> candle_core::Result<()> {
    let shape = Shape::new(2, 300, 5);
    let config = MultiboxConfig::default();
    let batch = Batch::<f32, i64>::generate(shape, BatchSpec::default());
    let (confidence, predicted, labels, gt) = tensors(&batch, shape)?;
    let losses = |labels: &Tensor| -> candle_core::Result<(f32, f32, u64)> {
        let loss = multibox_loss(&config, &confidence, &predicted, labels, &gt)?;
        Ok((
            loss.regression_loss.to_scalar()?,
            loss.classification_loss.to_scalar()?,
            num_pos(&loss)?,
        ))
    };
    let signed = losses(&labels)?;
    assert_eq!(losses(&labels.to_dtype(DType::I32)?)?, signed);
    assert_eq!(losses(&labels.to_dtype(DType::I16)?)?, signed);
    let not_ignored = labels.maximum(0i64)?;
    let unsigned = losses(&not_ignored)?;
    assert!(unsigned.2 > 0);
    for dtype in [DType::U8, DType::U32, DType::I16, DType::I32] {
        assert_eq!(
            losses(&not_ignored.to_dtype(dtype)?)?,
            unsigned,
            "{dtype:?}"
        );
    }
    let err = losses(&labels.to_dtype(DType::F32)?)
        .unwrap_err()
        .to_string();
    assert!(err.contains("label"), "{err}");
    Ok(())
}

#[test]
fn hand_computed_case() -> candle_core::Result<()> {
    // One image, three priors, two classes, zero logits: CE ln 2 each; the
    // tie between the two background priors goes to the lower index.
    let dev = Device::Cpu;
    let config = MultiboxConfig {
        neg_pos_ratio: 1.0,
        ..Default::default()
    };
    let confidence = Var::from_tensor(&Tensor::zeros((1, 3, 2), DType::F32, &dev)?)?;
    let predicted = Var::from_tensor(&Tensor::new(
        &[[[0.5f32, 0., 0., 2.], [0.; 4], [0.; 4]]],
        &dev,
    )?)?;
    let labels = Tensor::new(&[[1i32, 0, 0]], &dev)?;
    let gt = Tensor::zeros((1, 3, 4), DType::F32, &dev)?;
    let loss = multibox_loss(&config, &confidence, &predicted, &labels, &gt)?;
    assert_eq!(num_pos(&loss)?, 1);
    assert_eq!(loss.regression_loss.to_scalar::<f32>()?, 1.625);
    assert!((loss.classification_loss.to_scalar::<f32>()? - 2.0 * 2f32.ln()).abs() < 1e-6);
    let grads = (&loss.regression_loss + &loss.classification_loss)?.backward()?;
    let d_conf = grads
        .get(&confidence)
        .unwrap()
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(d_conf, [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]);
    let d_loc = grads
        .get(&predicted)
        .unwrap()
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(d_loc[..4], [0.5, 0.0, 0.0, 1.0]);
    assert!(d_loc[4..].iter().all(|&g| g == 0.0));
    Ok(())
}

/// Channel-major tensors under a given divisor and per image: the
/// reference's results in that layout, gradients in that layout too.
#[test]
fn channel_major_and_normalisers() -> candle_core::Result<()> {
    use multibox::candle::{multibox_loss_with, Normalizer, Options};
    use multibox::Layout;
    let shape = Shape::new(3, 50, 6);
    let (b, p, c) = (shape.batch, shape.priors, shape.classes);
    let config = MultiboxConfig::default();
    let cm = Layout::ChannelMajor;
    let batch = Batch::<f32, i64>::generate(shape, BatchSpec::default()).in_layout(cm);
    let dev = Device::Cpu;
    let conf_var = Var::from_tensor(&Tensor::from_slice(&batch.confidence, (b, c, p), &dev)?)?;
    let pred_var = Var::from_tensor(&Tensor::from_slice(
        &batch.predicted_locations,
        (b, 4, p),
        &dev,
    )?)?;
    let labels = Tensor::from_slice(&batch.labels, (b, p), &dev)?;
    let gt_t = Tensor::from_slice(&batch.gt_locations, (b, 4, p), &dev)?;
    for normalizer in [Normalizer::Given(7.5), Normalizer::PerImage] {
        let options = Options {
            layout: cm,
            normalizer,
        };
        let loss = multibox_loss_with(&config, &conf_var, &pred_var, &labels, &gt_t, &options)?;
        let grads = (&loss.regression_loss + &loss.classification_loss)?.backward()?;
        let want = reference::forward_backward_with(
            &config,
            shape,
            &batch.reference_inputs(),
            Upstream::default(),
            &options,
        )
        .map_err(candle_core::Error::wrap)?;
        assert_losses_are(&loss, &want)?;
        let d_conf = grads.get(&conf_var).unwrap();
        assert_eq!(d_conf.dims(), [b, c, p]);
        assert_eq!(
            d_conf.flatten_all()?.to_vec1::<f32>()?,
            want.grad_confidence_as::<f32>()
        );
        let d_loc = grads
            .get(&pred_var)
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(d_loc, want.grad_locations_as::<f32>());
    }
    // A row-major shape is refused in the channel-major layout.
    let options = Options {
        layout: cm,
        ..Default::default()
    };
    let row_major = Tensor::from_slice(&batch.confidence, (b, p, c), &dev)?;
    let err =
        multibox_loss_with(&config, &row_major, &pred_var, &labels, &gt_t, &options).unwrap_err();
    assert!(err.to_string().contains("predicted_locations"), "{err}");
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let config = MultiboxConfig::default();
    let confidence = Tensor::zeros((1, 3, 2), DType::F32, &dev)?;
    let locations = Tensor::zeros((1, 3, 4), DType::F32, &dev)?;
    let labels = Tensor::new(&[[1i64, 0, 0]], &dev)?;
    let err = |r: candle_core::Result<_>| {
        r.err()
            .map(|e: candle_core::Error| e.to_string())
            .unwrap_or_default()
    };

    let short = Tensor::zeros((1, 2, 4), DType::F32, &dev)?;
    assert!(err(multibox_loss(
        &config,
        &confidence,
        &short,
        &labels,
        &locations
    ))
    .contains("predicted_locations"));
    let float_labels = labels.to_dtype(DType::F32)?;
    assert!(err(multibox_loss(
        &config,
        &confidence,
        &locations,
        &float_labels,
        &locations
    ))
    .contains("labels"));
    let f64_confidence = confidence.to_dtype(DType::F64)?;
    assert!(err(multibox_loss(
        &config,
        &f64_confidence,
        &locations,
        &labels,
        &locations
    ))
    .contains("f32, f16 or bf16"));
    let bad_labels = Tensor::new(&[[1i64, 7, 0]], &dev)?;
    assert!(err(multibox_loss(
        &config,
        &confidence,
        &locations,
        &bad_labels,
        &locations
    ))
    .contains("label 7"));
    let one_class = Tensor::zeros((1, 3, 1), DType::F32, &dev)?;
    assert!(err(multibox_loss(
        &config, &one_class, &locations, &labels, &locations
    ))
    .contains("C (classes)"));
    Ok(())
}

/// Device 0 for a CUDA test named `test`; None, said on stderr, without a
/// GPU, unless MULTIBOX_REQUIRE_GPU=1, which makes that a failure.
#[cfg(feature = "candle-cuda")]
fn cuda_device(test: &str) -> candle_core::Result<Option<Device>> {
    match multibox::cuda_context(0) {
        Ok(_) => Ok(Some(Device::new_cuda(0)?)),
        Err(why) => {
            if std::env::var("MULTIBOX_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: MULTIBOX_REQUIRE_GPU=1, but {why}");
            }
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{test}: skipped, {why}");
            Ok(None)
        }
    }
}

/// On CUDA the labels go to the kernels as i64 or i32, through candle's own
/// copy or conversion. Those it has kernels for (i64 strided or not, u32,
/// u8, contiguous i32) give the CPU's losses; those candle 0.11 cannot
/// convert on CUDA (i16, strided i32) give an error that names the labels
/// and what to pass, or, with a candle that can, the same losses.
#[cfg(feature = "candle-cuda")]
#[test]
fn cuda_label_dtypes() -> candle_core::Result<()> {
    let Some(device) = cuda_device("cuda_label_dtypes")? else {
        return Ok(());
    };
    let shape = Shape::new(2, 300, 5);
    let config = MultiboxConfig::default();
    let batch = Batch::<f32, i64>::generate(shape, BatchSpec::default());
    let (confidence, predicted, labels, gt) = tensors(&batch, shape)?;
    let on = |t: &Tensor| t.to_device(&device);
    let (confidence, predicted, gt) = (
        on(confidence.as_tensor())?,
        on(predicted.as_tensor())?,
        on(&gt)?,
    );
    let losses = |labels: &Tensor| -> candle_core::Result<(f32, f32, u64)> {
        let loss = multibox_loss(&config, &confidence, &predicted, labels, &gt)?;
        Ok((
            loss.regression_loss.to_device(&Device::Cpu)?.to_scalar()?,
            loss.classification_loss
                .to_device(&Device::Cpu)?
                .to_scalar()?,
            num_pos(&loss)?,
        ))
    };
    let want = losses(&on(&labels)?)?;
    // A strided [B, P] view: the transpose of a contiguous [P, B] tensor.
    let strided = |dtype: DType| -> candle_core::Result<Tensor> {
        on(&labels.t()?.contiguous()?.to_dtype(dtype)?)?.t()
    };
    let unsigned = labels.maximum(0i64)?;
    let want_unsigned = losses(&on(&unsigned)?)?;
    assert_eq!(losses(&strided(DType::I64)?)?, want);
    assert_eq!(losses(&on(&labels.to_dtype(DType::I32)?)?)?, want);
    for dtype in [DType::U32, DType::U8] {
        assert_eq!(losses(&on(&unsigned.to_dtype(dtype)?)?)?, want_unsigned);
    }
    for labels in [on(&labels.to_dtype(DType::I16)?)?, strided(DType::I32)?] {
        match losses(&labels) {
            Ok(got) => assert_eq!(got, want),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("labels on CUDA") && text.contains("pass i64, u32 or u8 labels"),
                    "{text}"
                );
            }
        }
    }
    Ok(())
}

/// The CUDA path (feature `candle-cuda`): the same batch on the GPU gives the
/// reference's losses, `num_pos` and gradients (f32 and f16, upstream
/// gradients other than 1), through candle's autograd on candle's stream.
#[cfg(feature = "candle-cuda")]
#[test]
fn cuda_tensors_match_the_reference() -> candle_core::Result<()> {
    let Some(device) = cuda_device("cuda_tensors_match_the_reference")? else {
        return Ok(());
    };
    fn check<T: multibox::Float + candle_core::WithDType>(
        device: &Device,
    ) -> candle_core::Result<()> {
        let shape = Shape::new(3, 3000, 21);
        let (g_reg, g_cls) = (0.5f32, 2.0f32);
        let config = MultiboxConfig::default();
        let batch = Batch::<T, i64>::generate(shape, BatchSpec::default());
        let (confidence, predicted, labels, gt) = tensors(&batch, shape)?;
        let on = |t: &Tensor| t.to_device(device);
        let confidence = Var::from_tensor(&on(confidence.as_tensor())?)?;
        let predicted = Var::from_tensor(&on(predicted.as_tensor())?)?;
        let (labels, gt) = (on(&labels)?, on(&gt)?);

        let loss = multibox_loss(&config, &confidence, &predicted, &labels, &gt)?;
        let total = ((&loss.regression_loss * g_reg as f64)?
            + (&loss.classification_loss * g_cls as f64)?)?;
        let grads = total.backward()?;
        let want = reference::forward_backward(
            &config,
            shape,
            &batch.reference_inputs(),
            Upstream { g_reg, g_cls },
        )
        .map_err(candle_core::Error::wrap)?;
        assert_eq!(num_pos(&loss)?, want.losses.num_pos);
        let rel = |got: f32, want: f64| ((got as f64 - want) / want.abs().max(1e-30)).abs();
        let reg = loss
            .regression_loss
            .to_device(&Device::Cpu)?
            .to_scalar::<f32>()?;
        let cls = loss
            .classification_loss
            .to_device(&Device::Cpu)?
            .to_scalar::<f32>()?;
        // SPEC.md's precision: losses within 1e-6 relative; f32 gradients
        // within 1e-6 of the largest, f16 ones within an ulp of the
        // reference rounded to f16. A NaN fails every comparison.
        assert!(
            rel(reg, want.losses.regression_loss) <= 1e-6,
            "regression {reg}"
        );
        assert!(
            rel(cls, want.losses.classification_loss) <= 1e-6,
            "classification {cls}"
        );
        let dtype = <T as multibox::Float>::DTYPE;
        for (var, want) in [
            (&confidence, &want.grad_confidence),
            (&predicted, &want.grad_locations),
        ] {
            let got: Vec<T> = grads
                .get(var)
                .expect("a gradient")
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1()?;
            assert_eq!(got.len(), want.len(), "{dtype:?} gradient length");
            let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                let g32 = multibox::Float::to_f32(g);
                let within = match dtype {
                    multibox::DType::F32 => (f64::from(g32) - w).abs() <= 1e-6 * scale,
                    _ => {
                        ulp_distance(g, <T as multibox::Float>::from_f64(w)).is_some_and(|d| d <= 1)
                    }
                };
                assert!(within, "{dtype:?} gradient {i}: {g32} against {w}");
            }
        }
        Ok(())
    }
    check::<f32>(&device)?;
    check::<f16>(&device)?;
    Ok(())
}
