//! Target assignment's kernels on the CPU emulator, driven by the crate's
//! own `launch_assign` (the launch sequence the GPU runs).

use multibox::targets::plan::TargetPlan;
use multibox::targets::{
    launch_assign, RawTargetBuffers, RawTargetCall, TargetConfig, TargetShape, TargetStatus,
};
use multibox::{Float, Label};

use super::emulated::Emulator;

/// What one emulated assignment wrote.
#[derive(Debug, Clone)]
pub struct Assigned<T, L> {
    pub labels: Vec<L>,
    pub gt_locations: Vec<T>,
    pub status: TargetStatus,
}

/// Guard elements on both sides of every output: a kernel that writes out
/// of bounds changes one of them.
const GUARD: usize = 64;
const FILL: u8 = 0xab;

/// A 256-byte aligned, garbage-filled buffer (the workspace).
struct Aligned {
    bytes: Vec<u8>,
    offset: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let bytes = vec![FILL; len + 512 + GUARD];
        let offset = bytes.as_ptr().align_offset(256) + 256;
        Self { bytes, offset }
    }
}

fn garbage<T: bytemuck::Pod>() -> T {
    bytemuck::pod_read_unaligned(&[FILL; 8][..std::mem::size_of::<T>()])
}

/// Runs the three kernels on host arrays, each held to its regions of the
/// plan: as sm_75 runs them, or with `gpu_like` (a seed) as sm_90 does with
/// the device math model on ([`Emulator::device_math`]: the logarithm of
/// the encoding within CUDA's bound instead of the host's). Outputs and the
/// workspace start as garbage, so every element read back was written; the
/// guards around the outputs must come back untouched (they also catch a
/// stray write where the checker is absent, in AddressSanitizer builds).
pub fn assign<T: Float, L: Label>(
    config: &TargetConfig,
    shape: TargetShape,
    priors: &[f32],
    gt_boxes: &[f32],
    gt_labels: &[L],
    gt_counts: &[i32],
    gpu_like: Option<u32>,
) -> multibox::Result<Assigned<T, L>> {
    assert_eq!(priors.len(), shape.priors_len());
    assert_eq!(gt_boxes.len(), shape.boxes_len());
    assert_eq!(gt_labels.len(), shape.box_labels_len());
    assert_eq!(gt_counts.len(), shape.batch);
    let mut labels = vec![garbage::<L>(); shape.labels_len() + 2 * GUARD];
    let mut locations = vec![garbage::<T>(); shape.locations_len() + 2 * GUARD];
    let plan = TargetPlan::new(shape)?;
    let mut workspace = Aligned::new(plan.workspace.bytes);
    let ws = workspace.bytes[workspace.offset..].as_mut_ptr() as u64;
    let call = RawTargetCall {
        shape,
        dtype: T::DTYPE,
        label_type: L::LABEL_TYPE,
        buffers: RawTargetBuffers {
            priors: priors.as_ptr() as u64,
            gt_boxes: gt_boxes.as_ptr() as u64,
            gt_labels: gt_labels.as_ptr() as u64,
            gt_counts: gt_counts.as_ptr() as u64,
            labels: labels[GUARD..].as_mut_ptr() as u64,
            gt_locations: locations[GUARD..].as_mut_ptr() as u64,
            workspace: ws,
            workspace_bytes: plan.workspace.bytes,
        },
    };
    // Each kernel held to the plan's regions: per image its boxes, counts,
    // workspace rows and outputs, for that image's blocks only.
    let mut emulator = Emulator::with_regions(plan.launches().map(|launch| {
        (
            launch.step.kernel_name(T::DTYPE, L::LABEL_TYPE),
            plan.regions(launch.step, &call),
        )
    }));
    emulator.device_math = gpu_like;
    if gpu_like.is_some() {
        emulator.arch = multibox_emu::Arch::Sm90;
    }
    // SAFETY: every address points into a live Vec of the length the shape
    // requires (asserted above, allocated so for the outputs); the emulator
    // runs synchronously.
    unsafe { launch_assign(config, &call, &emulator)? };
    let guard_ok = |bytes: &[u8]| bytes.iter().all(|&b| b == FILL);
    let lb: &[u8] = bytemuck::cast_slice(&labels);
    let tb: &[u8] = bytemuck::cast_slice(&locations);
    let (ls, ts) = (std::mem::size_of::<L>(), std::mem::size_of::<T>());
    assert!(
        guard_ok(&lb[..GUARD * ls]) && guard_ok(&lb[lb.len() - GUARD * ls..]),
        "labels written out of bounds"
    );
    assert!(
        guard_ok(&tb[..GUARD * ts]) && guard_ok(&tb[tb.len() - GUARD * ts..]),
        "gt_locations written out of bounds"
    );
    let w = &workspace.bytes;
    assert!(
        guard_ok(&w[workspace.offset + plan.workspace.bytes..][..GUARD]),
        "workspace written out of bounds"
    );
    let at = workspace.offset + plan.workspace.status.offset;
    let status = TargetStatus::from_bits(u32::from_ne_bytes(w[at..at + 4].try_into().unwrap()));
    Ok(Assigned {
        labels: labels[GUARD..GUARD + shape.labels_len()].to_vec(),
        gt_locations: locations[GUARD..GUARD + shape.locations_len()].to_vec(),
        status,
    })
}
