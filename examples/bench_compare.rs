//! Our losses on inputs written by another program, for
//! `scripts/pytorch_baseline.py` to compare with PyTorch's.
//!
//!     cargo run --release --example bench_compare -- DIR [--cpu]
//!
//! DIR holds one folder per case in the layout of `tests/goldens/` (see its
//! README.md): `case.json` (`batch`, `priors`, `classes`, `neg_pos_ratio`,
//! `input_dtype` f32/f16/bf16, `label_dtype` i64/i32) and the raw
//! little-endian inputs `confidence.bin`, `locations.bin`, `gt_locations.bin`
//! (float32, already rounded to the input dtype) and `labels.bin`. Only the
//! inputs are read. For each case, one JSON line on stdout: the case, the
//! backend (`gpu` on device 0, else `cpu reference`; `--cpu` forces the
//! latter), the two losses, `num_pos` and the device status.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use multibox::cudarc::driver::{CudaContext, DeviceRepr, ValidAsZeroBits};
use multibox::{reference, Float, Label, MultiboxConfig, MultiboxLoss, Shape};
use serde_json::{json, Value};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let force_cpu = args.iter().any(|a| a == "--cpu");
    let Some(dir) = args.iter().find(|a| !a.starts_with("--")) else {
        bail!("usage: bench_compare DIR [--cpu]");
    };
    let gpu = if force_cpu {
        None
    } else {
        match multibox::cuda_context(0) {
            Ok(ctx) => Some(ctx),
            Err(why) => {
                eprintln!("bench_compare: no GPU ({why}); using the CPU reference");
                None
            }
        }
    };
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {dir}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").is_file())
        .collect();
    cases.sort();
    for case in cases {
        let line = run_case(&case, gpu.as_ref())
            .unwrap_or_else(|e| json!({"case": name_of(&case), "error": format!("{e:#}")}));
        println!("{line}");
    }
    Ok(())
}

fn name_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn run_case(dir: &Path, gpu: Option<&std::sync::Arc<CudaContext>>) -> Result<Value> {
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("case.json"))?)?;
    let uint = |k: &str| {
        meta[k]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("case.json: `{k}` is not an unsigned integer"))
    };
    let text = |k: &str| {
        meta[k]
            .as_str()
            .with_context(|| format!("case.json: `{k}` is not a string"))
    };
    let shape = Shape::new(uint("batch")?, uint("priors")?, uint("classes")?);
    let config = MultiboxConfig {
        neg_pos_ratio: meta["neg_pos_ratio"]
            .as_f64()
            .context("case.json: `neg_pos_ratio` is not a number")? as f32,
        ..Default::default()
    };
    let case = Case {
        dir,
        shape,
        config,
        gpu,
    };
    match (text("input_dtype")?, text("label_dtype")?) {
        ("f32", "i64") => case.run::<f32, i64>(),
        ("f16", "i64") => case.run::<f16, i64>(),
        ("bf16", "i64") => case.run::<bf16, i64>(),
        ("f32", "i32") => case.run::<f32, i32>(),
        ("f16", "i32") => case.run::<f16, i32>(),
        ("bf16", "i32") => case.run::<bf16, i32>(),
        (t, l) => bail!("unsupported input_dtype {t:?} / label_dtype {l:?}"),
    }
}

struct Case<'a> {
    dir: &'a Path,
    shape: Shape,
    config: MultiboxConfig,
    gpu: Option<&'a std::sync::Arc<CudaContext>>,
}

fn read_bin<E: bytemuck::Pod>(path: &Path, len: usize) -> Result<Vec<E>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let want = len * std::mem::size_of::<E>();
    if bytes.len() != want {
        bail!("{}: {} bytes, expected {want}", path.display(), bytes.len());
    }
    Ok(bytes
        .chunks_exact(std::mem::size_of::<E>())
        .map(bytemuck::pod_read_unaligned)
        .collect())
}

impl Case<'_> {
    fn run<T, L>(&self) -> Result<Value>
    where
        T: Float + DeviceRepr + ValidAsZeroBits,
        L: Label + DeviceRepr,
    {
        let s = self.shape;
        let floats = |name: &str, len: usize| -> Result<Vec<T>> {
            Ok(read_bin::<f32>(&self.dir.join(name), len)?
                .into_iter()
                .map(T::from_f32)
                .collect())
        };
        let confidence = floats("confidence.bin", s.confidence_len())?;
        let predicted_locations = floats("locations.bin", s.locations_len())?;
        let gt_locations = floats("gt_locations.bin", s.locations_len())?;
        let labels: Vec<L> = match L::LABEL_TYPE {
            multibox::LabelType::I64 => read_bin::<i64>(&self.dir.join("labels.bin"), s.rows())?
                .into_iter()
                .map(L::from_i64)
                .collect(),
            multibox::LabelType::I32 => read_bin::<i32>(&self.dir.join("labels.bin"), s.rows())?
                .into_iter()
                .map(|x| L::from_i64(i64::from(x)))
                .collect(),
        };
        let name = name_of(self.dir);
        let Some(ctx) = self.gpu else {
            let out = reference::forward_backward(
                &self.config,
                s,
                &reference::Inputs {
                    confidence: &confidence,
                    predicted_locations: &predicted_locations,
                    labels: &labels,
                    gt_locations: &gt_locations,
                },
                Default::default(),
            )?;
            return Ok(json!({
                "case": name,
                "backend": "cpu reference",
                "regression_loss": out.losses.regression_loss,
                "classification_loss": out.losses.classification_loss,
                "num_pos": out.losses.num_pos,
                "status": "ok",
            }));
        };

        let stream = ctx.default_stream();
        let loss = MultiboxLoss::new(ctx, self.config)?;
        let confidence = stream.clone_htod(&confidence)?;
        let predicted_locations = stream.clone_htod(&predicted_locations)?;
        let labels = stream.clone_htod(&labels)?;
        let gt_locations = stream.clone_htod(&gt_locations)?;
        let mut grad_confidence = stream.alloc_zeros::<T>(s.confidence_len())?;
        let mut grad_locations = stream.alloc_zeros::<T>(s.locations_len())?;
        let mut reg = stream.alloc_zeros::<f32>(1)?;
        let mut cls = stream.alloc_zeros::<f32>(1)?;
        let mut num_pos = stream.alloc_zeros::<i32>(1)?;
        let mut workspace = stream.alloc_zeros::<u8>(multibox::workspace_bytes(s)?)?;
        loss.forward_backward(
            &stream,
            s,
            &multibox::Inputs {
                confidence: &confidence,
                predicted_locations: &predicted_locations,
                labels: &labels,
                gt_locations: &gt_locations,
            },
            multibox::Upstream::default(),
            &mut multibox::Gradients {
                confidence: &mut grad_confidence,
                predicted_locations: &mut grad_locations,
            },
            &mut multibox::Outputs {
                regression_loss: &mut reg,
                classification_loss: &mut cls,
                num_pos: &mut num_pos,
                mask: None,
            },
            &mut workspace,
        )?;
        let status = loss.status(&stream, s, &workspace)?;
        Ok(json!({
            "case": name,
            "backend": format!("gpu ({})", ctx.name()?),
            "regression_loss": stream.clone_dtoh(&reg)?[0],
            "classification_loss": stream.clone_dtoh(&cls)?[0],
            "num_pos": stream.clone_dtoh(&num_pos)?[0],
            "status": if status.is_ok() { "ok".to_string() } else { format!("{status:?}") },
        }))
    }
}
