//! The launch plan is a pure function of the shape: check its invariants.

use multibox::plan::{
    lanes_per_row, LaunchPlan, Step, MAX_ROW_BLOCKS, ROW_THREADS, SELECT_KEYS_BYTES, SELECT_THREADS,
};
use multibox::plan::{GridLimits, Residency, MAX_BLOCKS_PER_SM, SECTION_GAP};
use multibox::{DType, LabelType, Layout, Pass, Shape};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

#[test]
fn kernel_1_takes_the_fewest_lanes_whose_tile_fits() {
    use multibox::plan::{row_tile_bytes, ROW_TILE_BYTES};
    for dtype in DTYPES {
        for classes in 2..=3000 {
            let lanes = lanes_per_row(classes, dtype);
            assert!(
                lanes.is_power_of_two() && lanes <= 32,
                "C={classes}: {lanes}"
            );
            let bytes = |lanes: u32| row_tile_bytes(classes, ROW_THREADS / lanes, dtype) as usize;
            if lanes < 32 {
                assert!(bytes(lanes) <= ROW_TILE_BYTES, "C={classes} {dtype:?}");
            }
            if lanes > 1 {
                assert!(
                    bytes(lanes / 2) > ROW_TILE_BYTES,
                    "C={classes} {dtype:?}: {lanes} lanes is more than needed"
                );
            }
        }
    }
    // A thread per row for the common SSD shapes in half precision: VOC's
    // 21 classes, COCO's 81, and torchvision's SSDLite's 91.
    assert_eq!(lanes_per_row(21, DType::F32), 1);
    assert_eq!(lanes_per_row(45, DType::F32), 1);
    assert_eq!(lanes_per_row(46, DType::F32), 2);
    assert_eq!(lanes_per_row(81, DType::BF16), 1);
    assert_eq!(lanes_per_row(91, DType::F16), 1);
    assert_eq!(lanes_per_row(91, DType::BF16), 1);
    assert_eq!(lanes_per_row(92, DType::F16), 2);
    assert_eq!(lanes_per_row(81, DType::F32), 2);
    assert_eq!(lanes_per_row(5000, DType::F32), 32);
}

/// The fewest power-of-two lanes, up to a warp, that leave each lane at
/// most `share` of `classes`.
fn fewest_lanes(classes: usize, share: usize) -> u32 {
    (0..=5)
        .map(|k| 1u32 << k)
        .find(|&lanes| classes.div_ceil(lanes as usize) <= share)
        .unwrap_or(32)
}

/// The most 16-byte words a row of `classes` elements covers, counted
/// from every element of a word it can start at.
fn most_words(classes: usize, dtype: DType) -> usize {
    let per_word = 16 / dtype.size();
    (0..per_word)
        .map(|phase| (phase + classes).div_ceil(per_word))
        .max()
        .unwrap()
}

#[test]
fn kernel_3_lanes_are_the_fewest_that_leave_each_lane_its_share() {
    use multibox::plan::{gradient_tile_rows, set_copy_lanes, set_lanes};
    for dtype in DTYPES {
        for classes in 2..=1000 {
            // 16 classes a lane where the row-major tile is staged, whatever
            // layout the call uses; 4 where rows are read from global memory.
            let staged = gradient_tile_rows(classes, Layout::RowMajor, dtype) != 0;
            let share = if staged { 16 } else { 4 };
            assert_eq!(
                set_lanes(classes, dtype),
                fewest_lanes(classes, share),
                "C={classes} {dtype:?}"
            );
            // The copy: a lane for each 16-byte word a row can cover,
            // from whichever element of a word it starts at, and whole
            // lane groups per round.
            let words = most_words(classes, dtype);
            let copy = set_copy_lanes(classes, dtype);
            assert!(
                copy.is_power_of_two() && copy <= 32,
                "C={classes} {dtype:?}"
            );
            assert!(copy >= set_lanes(classes, dtype), "C={classes} {dtype:?}");
            assert!(copy as usize >= words.min(32), "C={classes} {dtype:?}");
            assert!(
                copy == 1 || copy / 2 < words as u32 || copy / 2 < set_lanes(classes, dtype),
                "C={classes} {dtype:?}: not the fewest"
            );
            if staged {
                assert!(words <= 16, "a staged row is one round of loads");
            }
        }
    }
    assert_eq!(set_lanes(21, DType::F16), 2);
    assert_eq!(set_lanes(21, DType::F32), 2);
    assert_eq!(set_lanes(81, DType::BF16), 8);
    assert_eq!(set_lanes(83, DType::BF16), 8);
    assert_eq!(set_lanes(84, DType::BF16), 32);
    assert_eq!(set_lanes(81, DType::F32), 32);
    assert_eq!(set_lanes(3, DType::F32), 1);
    assert_eq!(set_copy_lanes(21, DType::F16), 4);
    assert_eq!(set_copy_lanes(81, DType::BF16), 16);
    assert_eq!(set_copy_lanes(41, DType::F32), 16);
    // The plan carries the same for either layout.
    for layout in [Layout::RowMajor, Layout::ChannelMajor] {
        let plan = LaunchPlan::with_limits(
            Shape::new(2, 100, 81),
            DType::BF16,
            layout,
            GridLimits::default(),
        )
        .unwrap();
        assert_eq!((plan.set_lanes, plan.set_copy_lanes), (8, 16));
    }
}

#[test]
fn workspace_sections_are_aligned_disjoint_and_large_enough() {
    for shape in [
        Shape::new(1, 1, 2),
        Shape::new(1, 17, 3),
        Shape::new(32, 3000, 21),
        Shape::new(256, 8732, 81),
        Shape::new(7, 20000, 200),
    ] {
        let plan = LaunchPlan::new(shape).unwrap();
        let ws = plan.workspace;
        let sections = [ws.totals, ws.keys, ws.terms, ws.block_status, ws.images];
        for pair in sections.windows(2) {
            assert!(
                pair[0].offset + pair[0].len + SECTION_GAP <= pair[1].offset,
                "{shape}: sections overlap or touch"
            );
        }
        for s in sections {
            assert_eq!(s.offset % 256, 0, "{shape}: section not 256-byte aligned");
        }
        assert_eq!(ws.keys.len, shape.rows() * 4);
        assert_eq!(ws.terms.len, shape.rows() * 8);
        assert_eq!(ws.images.len, shape.batch * 32);
        // Totals at offset 0 whatever the shape: a forward of any shape
        // overwrites the stamp that a backward checks.
        assert_eq!((ws.totals.offset, ws.totals.len), (0, 32));
        assert_eq!(ws.bytes, ws.images.offset + ws.images.len);
        assert_eq!(multibox::workspace_bytes(shape).unwrap(), ws.bytes);
        // One status word per block of kernel 1, whatever the type and the
        // layout: the workspace is the same for all.
        for dtype in DTYPES {
            for layout in [Layout::RowMajor, Layout::ChannelMajor] {
                let plan =
                    LaunchPlan::with_limits(shape, dtype, layout, GridLimits::default()).unwrap();
                assert_eq!(plan.workspace, ws, "{shape} {dtype:?} {layout:?}");
                assert!(ws.block_status.len >= plan.rows.grid as usize * 4);
            }
        }
    }
}

#[test]
fn grids_cover_every_row_and_image() {
    for shape in [
        Shape::new(1, 1, 2),
        Shape::new(4, 3000, 21),
        Shape::new(256, 8732, 81),
    ] {
        for (dtype, layout) in DTYPES
            .into_iter()
            .flat_map(|d| [(d, Layout::RowMajor), (d, Layout::ChannelMajor)])
        {
            let plan =
                LaunchPlan::with_limits(shape, dtype, layout, GridLimits::default()).unwrap();
            // Kernel 1 walks tiles of one step of the lane groups with a
            // block stride, staged or not; a channel-major tile stays inside
            // one image.
            let turn = (ROW_THREADS / plan.lanes_per_row) as usize;
            let tiles = |tile: usize| match layout {
                Layout::RowMajor => shape.rows().div_ceil(tile),
                Layout::ChannelMajor => shape.batch * shape.priors.div_ceil(tile),
            };
            let most = |n: usize| n.min(MAX_ROW_BLOCKS as usize);
            assert_eq!(
                plan.rows.grid as usize,
                most(tiles(turn)),
                "{shape} {layout:?}"
            );
            assert!(plan.rows.grid >= 1);
            // Kernel 3 walks tiles of one row per thread.
            assert_eq!(
                plan.gradient.grid as usize,
                most(tiles(ROW_THREADS as usize))
            );
        }
        let plan = LaunchPlan::new(shape).unwrap();
        assert_eq!(plan.layout, Layout::RowMajor);
        assert_eq!(plan.gradient.block, ROW_THREADS);
        assert_eq!(plan.select.grid as usize, shape.batch);
        assert_eq!(plan.select.block, SELECT_THREADS);
        let steps = |pass| plan.launches(pass).map(|l| l.step).collect::<Vec<Step>>();
        assert_eq!(steps(Pass::Forward), [Step::Rows, Step::Select]);
        assert_eq!(steps(Pass::Backward), [Step::Gradient]);
        assert_eq!(
            steps(Pass::ForwardBackward),
            [Step::Rows, Step::Select, Step::Gradient]
        );
        assert_eq!(Pass::from_backward(true), Pass::ForwardBackward);
        assert_eq!(Pass::from_backward(false), Pass::Forward);
    }
}

#[test]
fn kernel_names_say_the_step_types_and_layout() {
    use Layout::{ChannelMajor, RowMajor};
    assert_eq!(
        Step::Rows.kernel_name(DType::F16, LabelType::I64, ChannelMajor),
        "multibox_rows_f16_i64"
    );
    assert_eq!(
        Step::Gradient.kernel_name(DType::BF16, LabelType::I32, RowMajor),
        "multibox_gradient_bf16_i32"
    );
    assert_eq!(
        Step::Gradient.kernel_name(DType::BF16, LabelType::I32, ChannelMajor),
        "multibox_gradient_channel_major_bf16_i32"
    );
    assert_eq!(
        Step::Select.kernel_name(DType::F32, LabelType::I64, RowMajor),
        "multibox_select"
    );
    // Kernels 1 and 2 serve both layouts; kernel 3 has an entry per layout.
    for step in [Step::Rows, Step::Select] {
        assert_eq!(
            step.layout_kernel_names(RowMajor),
            step.layout_kernel_names(ChannelMajor)
        );
    }
    assert_eq!(Step::Gradient.layout_kernel_names(RowMajor).len(), 6);
    assert_eq!(Step::Gradient.layout_kernel_names(ChannelMajor).len(), 6);
    let names = Step::all_kernel_names();
    assert_eq!(names.len(), 19);
    let unique: std::collections::HashSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len());
}

/// The selection keeps an image's keys in shared memory where they fit
/// SELECT_KEYS_BYTES (SSDLite's and SSD300's priors do), and launches with
/// exactly those bytes; longer images (SSD512's 24,564 priors) read them
/// from global memory, with no dynamic shared memory. Whatever the type and
/// layout: the selection works on keys only.
#[test]
fn the_selection_keeps_an_images_keys_in_shared_memory_where_they_fit() {
    let most = SELECT_KEYS_BYTES / 4;
    assert_eq!(most, 9_984);
    for (priors, bytes) in [
        (1, 4),
        (3_000, 12_000),
        (8_732, 34_928),
        (most, 39_936),
        (most + 1, 0),
        (24_564, 0),
    ] {
        for (dtype, layout) in DTYPES
            .into_iter()
            .flat_map(|d| [(d, Layout::RowMajor), (d, Layout::ChannelMajor)])
        {
            let shape = Shape::new(3, priors, 21);
            let plan =
                LaunchPlan::with_limits(shape, dtype, layout, GridLimits::default()).unwrap();
            assert_eq!(
                plan.select.shared_bytes, bytes,
                "{shape} {dtype:?} {layout:?}"
            );
        }
    }
}

#[test]
fn the_plan_rejects_what_the_shape_rejects() {
    assert!(LaunchPlan::new(Shape::new(0, 10, 3)).is_err());
    assert!(LaunchPlan::new(Shape::new(2, 10, 1)).is_err());
    assert!(LaunchPlan::new(Shape::new(1 << 16, 1 << 16, 2)).is_err());
}

#[test]
fn regions_give_each_kernel_its_buffers_and_the_selection_one_image_per_block() {
    use multibox::{RawBuffers, RawCall, RawUpstream};
    let shape = Shape::new(3, 1000, 21);
    let plan = LaunchPlan::new(shape).unwrap();
    let call = RawCall {
        shape,
        dtype: DType::F16,
        label_type: LabelType::I64,
        buffers: RawBuffers {
            confidence: 0x10_0000,
            predicted_locations: 0x20_0000,
            labels: 0x30_0000,
            gt_locations: 0x40_0000,
            grad_confidence: 0x50_0000,
            grad_locations: 0x60_0000,
            regression_loss: 0x70_0000,
            classification_loss: 0x70_0100,
            num_pos: 0x70_0200,
            mask: 0x80_0000,
            workspace: 0x90_0000,
            workspace_bytes: plan.workspace.bytes,
        },
        upstream: RawUpstream::Device(0x70_0300),
        pass: multibox::plan::Pass::ForwardBackward,
        layout: Layout::RowMajor,
        normalizer: multibox::RawNormalizer::GivenOnDevice(0x70_0400),
    };
    let find = |step, name: &str| {
        plan.regions(step, &call)
            .into_iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{step:?} has no {name}"))
    };
    let confidence = find(Step::Rows, "confidence");
    assert_eq!(
        (confidence.len, confidence.writable),
        (3 * 1000 * 21 * 2, false)
    );
    assert_eq!(find(Step::Rows, "labels").len, 3 * 1000 * 8);
    assert!(find(Step::Rows, "keys").writable);
    assert!(!find(Step::Gradient, "keys").writable);
    assert!(find(Step::Gradient, "grad_confidence").writable);
    assert_eq!(find(Step::Gradient, "upstream").len, 8);
    // Kernel 3 reads the forward's divisor and stamp (Totals from
    // normalizer_kind on), and only its block 0 may write the status word
    // before them, for a stale workspace.
    let totals = 0x90_0000 + plan.workspace.totals.offset as u64;
    let read = find(Step::Gradient, "totals");
    assert_eq!(
        (read.addr, read.len, read.writable, read.blocks),
        (totals + 12, 20, false, None)
    );
    let status = find(Step::Gradient, "totals.status");
    assert_eq!(
        (status.addr, status.len, status.writable, status.blocks),
        (totals + 8, 4, true, Some(0..1))
    );
    // The device-side divisor is read by the selection's last block only.
    let n = find(Step::Select, "normalizer");
    assert_eq!((n.addr, n.len, n.writable), (0x70_0400, 4, false));
    assert!(plan
        .regions(Step::Rows, &call)
        .iter()
        .all(|r| r.name != "normalizer"));
    assert!(find(Step::Rows, "terms").writable);
    for image in 0..3u32 {
        let keys = find(Step::Select, &format!("keys[image {image}]"));
        assert_eq!(keys.blocks, Some(image..image + 1));
        assert_eq!(
            keys.addr,
            0x90_0000 + plan.workspace.keys.offset as u64 + u64::from(image) * 4000
        );
        assert_eq!(keys.len, 4000);
        let terms = find(Step::Select, &format!("terms[image {image}]"));
        assert_eq!(terms.blocks, Some(image..image + 1));
        assert_eq!(
            (terms.addr, terms.len, terms.writable),
            (
                0x90_0000 + plan.workspace.terms.offset as u64 + u64::from(image) * 8000,
                8000,
                false
            )
        );
        let mask = find(Step::Select, &format!("mask[image {image}]"));
        assert_eq!(
            (mask.addr, mask.len),
            (0x80_0000 + u64::from(image) * 1000, 1000)
        );
    }
    // Read-only inputs are never writable, and no kernel reaches a gradient
    // it does not write.
    for step in [Step::Rows, Step::Select, Step::Gradient] {
        for r in plan.regions(step, &call) {
            if [
                "confidence",
                "predicted_locations",
                "labels",
                "gt_locations",
            ]
            .contains(&r.name.as_str())
            {
                assert!(!r.writable, "{step:?} {}", r.name);
            }
            if r.name.starts_with("grad_") {
                assert_eq!(step, Step::Gradient);
            }
        }
    }
}

#[test]
fn kernel_1_tiles_are_one_step_and_fit_shared_memory() {
    use multibox::plan::{tile_rows, ROW_TILE_BYTES};
    for dtype in DTYPES {
        let size = dtype.size();
        let per_word = 16 / size;
        for classes in [2, 3, 21, 81, 91, 200, 1000, 5000, 100_000] {
            // Every residue of P modulo 8 (a 16-byte word of f16/bf16).
            for priors in [3000, 3001, 3002, 3003, 8732, 3005, 3006, 3007] {
                let shape = Shape::new(2, priors, classes);
                for layout in [Layout::RowMajor, Layout::ChannelMajor] {
                    let what = format!("C={classes} P={priors} {dtype:?} {layout:?}");
                    let plan = LaunchPlan::with_limits(shape, dtype, layout, GridLimits::default())
                        .unwrap();
                    let step = ROW_THREADS / plan.lanes_per_row;
                    assert_eq!(plan.lanes_per_row, lanes_per_row(classes, dtype));
                    assert_eq!(
                        plan.tile_rows,
                        tile_rows(shape, plan.lanes_per_row, layout, dtype)
                    );
                    // Channel-major planes keep their global offset within 16
                    // bytes: the stride is the tile padded to P's residue,
                    // and f32 with lane groups may take a few words more
                    // (rows_plane_stride, checked below).
                    let stride = if layout == Layout::ChannelMajor && plan.tile_rows != 0 {
                        plan.plane_stride as usize
                    } else {
                        step as usize + (priors % per_word)
                    };
                    let least = step as usize + (priors % per_word);
                    assert!(
                        (least..least + 8 * per_word).contains(&stride),
                        "{what}: stride {stride}"
                    );
                    // Row-major: the tile as in global memory plus 32 bytes
                    // (its offset in a 16-byte line, the last row's last
                    // 16-byte load); channel-major: C planes `stride` apart,
                    // after the first one's offset within 16 bytes.
                    let bytes = match layout {
                        Layout::RowMajor => step as usize * classes * size + 32,
                        Layout::ChannelMajor => 16 - size + stride * size * classes,
                    };
                    if bytes <= ROW_TILE_BYTES {
                        assert_eq!(plan.tile_rows, step, "{what}");
                        assert_eq!(plan.rows.shared_bytes as usize, bytes, "{what}");
                    } else {
                        assert_eq!(plan.tile_rows, 0, "{what}");
                        assert_eq!(plan.rows.shared_bytes, 0, "{what}");
                    }
                    if layout == Layout::ChannelMajor && plan.tile_rows != 0 {
                        assert_eq!(plan.plane_stride as usize, stride, "{what}");
                        assert_eq!(stride % per_word, priors % per_word, "{what}");
                    } else {
                        assert_eq!(plan.plane_stride, 0, "{what}");
                    }
                }
            }
        }
    }
    // Rows of millions of classes: their tile's bytes overflow u32, and must
    // not wrap around to a size that seems to fit.
    for classes in [1 << 22, 1 << 23] {
        for dtype in DTYPES {
            for layout in [Layout::RowMajor, Layout::ChannelMajor] {
                let plan = LaunchPlan::with_limits(
                    Shape::new(1, 2, classes),
                    dtype,
                    layout,
                    GridLimits::default(),
                )
                .unwrap();
                assert_eq!(plan.lanes_per_row, 32, "C={classes} {dtype:?}");
                assert_eq!(
                    (plan.tile_rows, plan.rows.shared_bytes),
                    (0, 0),
                    "C={classes} {dtype:?}"
                );
            }
        }
    }
    let shape = |classes| Shape::new(2, 8732, classes);
    assert_eq!(tile_rows(shape(21), 1, Layout::RowMajor, DType::F32), 256);
    assert_eq!(tile_rows(shape(81), 1, Layout::RowMajor, DType::BF16), 256);
    assert_eq!(
        tile_rows(shape(81), 1, Layout::ChannelMajor, DType::BF16),
        256
    );
    assert_eq!(tile_rows(shape(81), 2, Layout::RowMajor, DType::F32), 128);
    assert_eq!(tile_rows(shape(5000), 32, Layout::RowMajor, DType::F32), 0);
    // A thread per prior up to C = 91 channel-major in the half types when
    // P is a multiple of 8 (SSDLite's 3,000 priors): no plane is padded.
    assert_eq!(
        tile_rows(Shape::new(2, 3000, 91), 1, Layout::ChannelMajor, DType::F16),
        256
    );
}

#[test]
fn kernel_3_stages_tiles_that_fit_shared_memory() {
    use multibox::plan::{gradient_plane_rows, gradient_tile_rows, GRADIENT_TILE_BYTES};
    for dtype in DTYPES {
        let size = dtype.size();
        let per_word = 16 / size;
        for classes in [
            2, 3, 21, 41, 42, 81, 83, 84, 91, 167, 168, 200, 335, 672, 5000,
        ] {
            // Every residue of P modulo 8 (a 16-byte word of f16/bf16).
            for priors in [3000, 3001, 3002, 3003, 8732, 3005, 3006, 3007] {
                let shape = Shape::new(2, priors, classes);
                // Row-major: 256 rows of gradients as they lie in global
                // memory, plus 32 bytes: their offset in a 16-byte line, and
                // the last word's end. Channel-major: C planes of a part's
                // logits, padded to P's residue, after the first plane's
                // offset within 16 bytes; the largest part that fits.
                // The planes are a 16-byte word further apart where they
                // would otherwise be a multiple of 32 bytes apart (banks).
                let row_bytes = 256 * classes * size + 32;
                let stride = |rows: usize| {
                    let stride = rows + priors % per_word;
                    stride
                        + if (stride * size).is_multiple_of(32) {
                            per_word
                        } else {
                            0
                        }
                };
                let plane_bytes = |rows: usize| 16 - size + stride(rows) * size * classes;
                let part = [256, 128, 64, 32]
                    .into_iter()
                    .find(|&rows| plane_bytes(rows) <= GRADIENT_TILE_BYTES);
                for layout in [Layout::RowMajor, Layout::ChannelMajor] {
                    let plan = LaunchPlan::with_limits(shape, dtype, layout, GridLimits::default())
                        .unwrap();
                    let what = format!("C={classes} P={priors} {dtype:?} {layout:?}");
                    assert_eq!(
                        plan.gradient_tile_rows,
                        gradient_tile_rows(classes, layout, dtype)
                    );
                    assert_eq!(
                        plan.gradient_plane_rows,
                        gradient_plane_rows(shape, layout, dtype)
                    );
                    let rows_staged =
                        row_bytes <= GRADIENT_TILE_BYTES && layout == Layout::RowMajor;
                    let part = part.filter(|_| layout == Layout::ChannelMajor);
                    assert_eq!(
                        plan.gradient_tile_rows,
                        if rows_staged { 256 } else { 0 },
                        "{what}"
                    );
                    assert_eq!(
                        plan.gradient_plane_rows as usize,
                        part.unwrap_or(0),
                        "{what}"
                    );
                    assert_eq!(
                        plan.gradient_plane_stride as usize,
                        part.map_or(0, stride),
                        "{what}"
                    );
                    // Unstaged row-major rows get a slot per lane group instead,
                    // when those fit.
                    let groups = (256 / plan.set_lanes) as usize;
                    let slots = groups * plan.set_slot_bytes as usize;
                    let bytes = match (rows_staged, part) {
                        (true, _) => row_bytes,
                        (_, Some(rows)) => plane_bytes(rows),
                        _ => slots,
                    };
                    assert_eq!(plan.gradient.shared_bytes as usize, bytes, "{what}");
                    assert!(plan.gradient.shared_bytes as usize <= GRADIENT_TILE_BYTES);
                }
            }
        }
    }
    // Channel-major: the whole tile for VOC in every type and for COCO in
    // the half types at SSD300's 8,732 priors, halves for f32 COCO; 32
    // priors at C = 537 in f16 when P is a multiple of 8, none above.
    let ssd = |classes| Shape::new(2, 8732, classes);
    let rows = |shape, dtype| gradient_plane_rows(shape, Layout::ChannelMajor, dtype);
    assert_eq!(rows(ssd(21), DType::F32), 256);
    assert_eq!(rows(ssd(81), DType::BF16), 256);
    assert_eq!(rows(ssd(81), DType::F32), 128);
    assert_eq!(rows(Shape::new(2, 3000, 537), DType::F16), 32);
    assert_eq!(rows(Shape::new(2, 3000, 538), DType::F16), 0);
    assert_eq!(
        gradient_plane_rows(ssd(21), Layout::RowMajor, DType::F16),
        0
    );
    // The common shapes: VOC in every type, COCO in the half types.
    assert_eq!(gradient_tile_rows(21, Layout::RowMajor, DType::F32), 256);
    assert_eq!(gradient_tile_rows(41, Layout::RowMajor, DType::F32), 256);
    assert_eq!(gradient_tile_rows(42, Layout::RowMajor, DType::F32), 0);
    assert_eq!(gradient_tile_rows(81, Layout::RowMajor, DType::BF16), 256);
    assert_eq!(gradient_tile_rows(83, Layout::RowMajor, DType::F16), 256);
    assert_eq!(gradient_tile_rows(84, Layout::RowMajor, DType::F16), 0);
}

/// Row-major rows too long for kernel 3's tile: each lane group gets a
/// slot for its set row, the 16-byte words a row can cover, while the
/// block's slots fit `GRADIENT_TILE_BYTES`; none for a staged tile or
/// channel-major.
#[test]
fn kernel_3_gives_unstaged_set_rows_a_slot_per_lane_group() {
    use multibox::plan::{gradient_tile_rows, set_lanes, set_slot_bytes, GRADIENT_TILE_BYTES};
    for dtype in DTYPES {
        for classes in 2..=3000 {
            let unstaged = gradient_tile_rows(classes, Layout::RowMajor, dtype) == 0;
            let words = most_words(classes, dtype);
            let groups = (256 / set_lanes(classes, dtype)) as usize;
            let fits = groups * words * 16 <= GRADIENT_TILE_BYTES;
            let what = format!("C={classes} {dtype:?}");
            assert_eq!(
                set_slot_bytes(classes, Layout::RowMajor, dtype) as usize,
                if unstaged && fits { words * 16 } else { 0 },
                "{what}"
            );
            assert_eq!(set_slot_bytes(classes, Layout::ChannelMajor, dtype), 0);
        }
    }
    // SSD300 on COCO in f32: eight slots of 336 bytes; rows too long for
    // the slots are read from global memory.
    assert_eq!(set_slot_bytes(81, Layout::RowMajor, DType::F32), 336);
    assert_eq!(set_slot_bytes(1341, Layout::RowMajor, DType::F32), 5376);
    assert_eq!(set_slot_bytes(1342, Layout::RowMajor, DType::F32), 0);
    assert_eq!(set_slot_bytes(2681, Layout::RowMajor, DType::BF16), 5376);
    assert_eq!(set_slot_bytes(2682, Layout::RowMajor, DType::BF16), 0);
    assert_eq!(set_slot_bytes(21, Layout::RowMajor, DType::F32), 0);
}

/// An H100 (or H200) multiprocessor's residency for a kernel of 256-thread
/// blocks with `registers` a thread and `static_shared` bytes, by CUDA's
/// occupancy rules as its occupancy header (CUDA 13) states them: 64 Ki
/// registers, allocated 256 a warp; 2,048 threads; 228 KiB of shared
/// memory, a block's (its static and dynamic bytes and 1 KiB the SM
/// reserves for it) taken in 128-byte granules. The 48 KiB a block may take
/// without opting in to more is left out: the plan's tiles stay below it.
fn h100(registers: u32, static_shared: u32) -> Residency {
    let per_block = (registers * 32).next_multiple_of(256) * (ROW_THREADS / 32);
    let by_registers = (65536 / per_block).min(2048 / ROW_THREADS) as usize;
    let mut shared_for = [None; MAX_BLOCKS_PER_SM];
    for (k, bytes) in (1..=by_registers as u32).zip(shared_for.iter_mut()) {
        let each = (228 * 1024 / k) / 128 * 128;
        *bytes = Some(each - 1024 - static_shared);
    }
    Residency { shared_for }
}

#[test]
fn grids_stop_at_the_blocks_the_device_holds_for_the_shapes_tile() {
    // Kernel 1 at 64 registers, kernel 3's entries at 48 (sm_90, the landed
    // kernels).
    let limits = GridLimits {
        sms: 132,
        rows: h100(64, 2080),
        gradient: h100(48, 3888),
        gradient_channel_major: h100(48, 4720),
    };
    assert_eq!(limits.rows.blocks(0), 4);
    assert_eq!(limits.gradient.blocks(0), 5);
    assert_eq!(limits.gradient_channel_major.blocks(0), 5);
    let plan =
        |shape, dtype, layout| LaunchPlan::with_limits(shape, dtype, layout, limits).unwrap();

    // SSD300 on COCO: kernel 3's row-major tile (256 rows x 81 x 2 bytes,
    // and 32 for the copy's ends) still lets 5 blocks share an SM; the
    // channel-major planes, padded and skewed, 4.
    let coco = Shape::new(256, 8732, 81);
    let rows = plan(coco, DType::BF16, Layout::RowMajor);
    assert_eq!(rows.gradient.shared_bytes, 41_504);
    assert_eq!((rows.rows.grid, rows.gradient.grid), (528, 660));
    let columns = plan(coco, DType::BF16, Layout::ChannelMajor);
    assert_eq!((columns.rows.grid, columns.gradient.grid), (528, 528));
    // SSDLite on VOC at a large batch: small tiles, 5 blocks either way.
    let voc = Shape::new(256, 3000, 21);
    for layout in [Layout::RowMajor, Layout::ChannelMajor] {
        assert_eq!(plan(voc, DType::F16, layout).gradient.grid, 660);
    }
    // f32 at C = 81: a set row's slot for each of 8 lane groups, under 3
    // KiB in all, 5 blocks.
    let f32_rows = plan(coco, DType::F32, Layout::RowMajor);
    assert!(f32_rows.gradient.shared_bytes < 3 * 1024);
    assert_eq!(f32_rows.gradient.grid, 660);
    // A shape's tile past what 5 blocks may each take (41,680 bytes): 4.
    assert_eq!(limits.gradient.shared_for[4], Some(41_680));
    let wide = Shape::new(256, 8732, 83);
    let wide_rows = plan(wide, DType::F16, Layout::RowMajor);
    assert_eq!(wide_rows.gradient.shared_bytes, 42_528);
    assert_eq!(wide_rows.gradient.grid, 528);

    // The workspace is the same on every device.
    let free = LaunchPlan::new(coco).unwrap();
    assert_eq!(rows.workspace, free.workspace);
    assert_eq!(columns.workspace, free.workspace);
    // Without a device, the grids stop at MAX_ROW_BLOCKS.
    assert_eq!(free.rows.grid, MAX_ROW_BLOCKS);
    assert_eq!(free.gradient.grid, MAX_ROW_BLOCKS);

    // A small shape needs fewer blocks than the device holds.
    let small = Shape::new(1, 300, 21);
    for layout in [Layout::RowMajor, Layout::ChannelMajor] {
        let p = plan(small, DType::F32, layout);
        assert_eq!((p.rows.grid, p.gradient.grid), (2, 2)); // tiles of 256 rows
        assert_eq!(p.workspace, LaunchPlan::new(small).unwrap().workspace);
    }
    // A residency with no block (an occupancy query that found none) still
    // launches a block an SM.
    let none = GridLimits {
        rows: Residency::uniform(0),
        gradient_channel_major: Residency::uniform(0),
        ..limits
    };
    let p = LaunchPlan::with_limits(coco, DType::F32, Layout::ChannelMajor, none).unwrap();
    assert_eq!((p.rows.grid, p.gradient.grid), (132, 132));
    // Fixed small grids, as the tests' few-block runs use them.
    let few = LaunchPlan::with_limits(
        coco,
        DType::F16,
        Layout::ChannelMajor,
        GridLimits::at_most(2, 3),
    )
    .unwrap();
    assert_eq!((few.rows.grid, few.gradient.grid), (2, 3));
}

/// Kernel 1's channel-major passes read, in each lane group's place, its
/// lane s's class `s * per` of R = 32 / lanes consecutive priors. The f32
/// plane stride spreads those runs over all 32 banks where P's residue and
/// the 48 KiB tile allow (rows_plane_stride), and is P's least otherwise.
#[test]
fn f32_lane_groups_read_channel_major_planes_on_distinct_banks() {
    use multibox::plan::{
        lanes_per_row, plane_stride, rows_plane_stride, tile_rows, ROW_TILE_BYTES,
    };
    // The banks one warp read touches, f32: lane t reads element
    // t / lanes + (t % lanes) * per * stride.
    let banks = |stride: u32, classes: usize, lanes: u32| -> Vec<usize> {
        let per = classes.div_ceil(lanes as usize);
        let mut b: Vec<usize> = (0..32usize)
            .filter(|t| t % lanes as usize * per < classes)
            .map(|t| (t / lanes as usize + t % lanes as usize * per * stride as usize) % 32)
            .collect();
        b.sort_unstable();
        b
    };
    for (priors, classes, spread) in [
        (8732, 81, true),
        (3000, 81, true),
        (2000, 60, true),
        (3000, 46, true),
        // P = 2 modulo 4: no stride keeps P's residue and spreads them.
        (3234, 81, false),
        // The spreading stride's tile would pass 48 KiB.
        (8732, 91, false),
    ] {
        let shape = Shape::new(2, priors, classes);
        let lanes = lanes_per_row(classes, DType::F32);
        assert_eq!(lanes, 2, "C = {classes}");
        let rows = tile_rows(shape, lanes, Layout::ChannelMajor, DType::F32);
        assert_eq!(rows, 128);
        let least = plane_stride(priors, rows, DType::F32);
        let stride = rows_plane_stride(shape, rows, DType::F32);
        let what = format!("P = {priors}, C = {classes}: stride {stride}");
        assert_eq!(stride % 4, (priors % 4) as u32, "{what}");
        assert!(
            12 + stride as usize * 4 * classes <= ROW_TILE_BYTES,
            "{what}"
        );
        let plan = LaunchPlan::with_limits(
            shape,
            DType::F32,
            Layout::ChannelMajor,
            GridLimits::default(),
        )
        .unwrap();
        assert_eq!(plan.plane_stride, stride, "{what}");
        assert_eq!(
            plan.rows.shared_bytes as usize,
            12 + stride as usize * 4 * classes,
            "{what}"
        );
        if spread {
            assert_eq!(
                banks(stride, classes, lanes),
                (0..32).collect::<Vec<_>>(),
                "{what}"
            );
            // The least stride, a multiple of 32 here, doubles up every bank.
            assert_eq!(
                banks(least, classes, lanes)
                    .windows(2)
                    .filter(|w| w[0] == w[1])
                    .count(),
                16
            );
        } else {
            assert_eq!(stride, least, "{what}");
        }
    }
    // The half types (one lane a row up to C = 91) keep the least stride.
    let shape = Shape::new(2, 8732, 81);
    for dtype in [DType::F16, DType::BF16] {
        let rows = tile_rows(shape, lanes_per_row(81, dtype), Layout::ChannelMajor, dtype);
        assert_eq!(
            rows_plane_stride(shape, rows, dtype),
            plane_stride(8732, rows, dtype)
        );
    }
    // Any tile the function is asked about, the plan's or not (fewer than 8
    // rows: more than a warp's lanes a row), gets a stride that keeps P's
    // residue, and the least one where no warp reads several rows.
    for tile in 0..=256 {
        for (priors, classes) in [(4, 64), (8732, 2), (8732, 81), (3000, 64), (8730, 21)] {
            let shape = Shape::new(1, priors, classes);
            let stride = rows_plane_stride(shape, tile, DType::F32);
            let what = format!("tile {tile}, P = {priors}, C = {classes}");
            assert!(stride >= tile, "{what}");
            assert_eq!(stride as usize % 4, priors % 4, "{what}");
            if tile < 8 {
                assert_eq!(stride, plane_stride(priors, tile, DType::F32), "{what}");
            }
        }
    }
}

#[test]
fn target_regions_give_each_image_its_blocks_and_rows() {
    use multibox::targets::plan::{TargetPlan, TargetStep};
    use multibox::targets::{RawTargetBuffers, RawTargetCall, TargetShape};
    // B = 3, P = 300 (2 tiles of 256 priors per image), T = 5, f16 offsets,
    // i64 labels; each buffer at its own made-up address.
    let shape = TargetShape::new(3, 300, 5);
    let plan = TargetPlan::new(shape).unwrap();
    let call = RawTargetCall {
        shape,
        dtype: DType::F16,
        label_type: LabelType::I64,
        buffers: RawTargetBuffers {
            priors: 1 << 20,
            gt_boxes: 2 << 20,
            gt_labels: 3 << 20,
            gt_counts: 4 << 20,
            labels: 5 << 20,
            gt_locations: 6 << 20,
            workspace: 7 << 20,
            workspace_bytes: plan.workspace.bytes,
        },
    };
    let find = |regions: &[multibox::plan::Region], name: &str| {
        regions
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no region {name}"))
            .clone()
    };
    let reset = plan.regions(TargetStep::Reset, &call);
    assert_eq!(reset.len(), 2);
    assert_eq!(find(&reset, "box_best").len, 3 * 5 * 8);
    assert!(find(&reset, "status").writable);

    let ws = call.buffers.workspace;
    for step in [TargetStep::Match, TargetStep::Encode] {
        let regions = plan.regions(step, &call);
        let encode = step == TargetStep::Encode;
        let priors = find(&regions, "priors");
        assert_eq!(
            (priors.addr, priors.len, priors.writable),
            (1 << 20, 300 * 16, false)
        );
        assert_eq!(priors.blocks, None);
        assert_eq!(regions.iter().any(|r| r.name == "status"), !encode);
        for image in 0..3u32 {
            let region = |name: &str| find(&regions, &format!("{name}[image {image}]"));
            let i = image as u64;
            // (region, address, bytes, written by this step)
            let mut want = vec![
                ("gt_counts", (4 << 20) + 4 * i, 4, false),
                ("gt_boxes", (2 << 20) + 5 * 16 * i, 5 * 16, false),
                ("gt_labels", (3 << 20) + 5 * 8 * i, 5 * 8, false),
                (
                    "box_best",
                    ws + plan.workspace.box_best.offset as u64 + 40 * i,
                    40,
                    !encode,
                ),
                (
                    "prior_best",
                    ws + plan.workspace.prior_best.offset as u64 + 2400 * i,
                    2400,
                    !encode,
                ),
            ];
            if encode {
                want.push(("labels", (5 << 20) + 300 * 8 * i, 300 * 8, true));
                want.push(("gt_locations", (6 << 20) + 300 * 8 * i, 300 * 8, true));
            }
            for (name, addr, len, writable) in want {
                let r = region(name);
                assert_eq!(
                    (r.addr, r.len, r.writable),
                    (addr, len, writable),
                    "{step:?} {name}[{image}]"
                );
                assert_eq!(
                    r.blocks,
                    Some(2 * image..2 * image + 2),
                    "{step:?} {name}[{image}]"
                );
            }
        }
        let per_image = if encode { 7 } else { 5 };
        assert_eq!(
            regions.len(),
            1 + 3 * per_image + usize::from(!encode),
            "{step:?}"
        );
    }
}
