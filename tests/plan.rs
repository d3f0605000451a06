//! The launch plan is a pure function of the shape: check its invariants.

use multibox::plan::{
    lanes_per_row, LaunchPlan, Step, MAX_ROW_BLOCKS, ROW_THREADS, SELECT_THREADS,
};
use multibox::{DType, LabelType, Pass, Shape};

#[test]
fn lanes_per_row_leave_at_most_four_classes_per_lane() {
    for classes in 2..=1000 {
        let lanes = lanes_per_row(classes);
        assert!(
            lanes.is_power_of_two() && lanes <= 32,
            "C={classes}: {lanes}"
        );
        if lanes < 32 {
            assert!(
                classes.div_ceil(lanes as usize) <= 4,
                "C={classes}: {lanes} lanes"
            );
        }
        if lanes > 1 {
            assert!(
                classes.div_ceil(lanes as usize / 2) > 4,
                "C={classes}: {lanes} lanes is more than needed"
            );
        }
    }
    assert_eq!(lanes_per_row(21), 8);
    assert_eq!(lanes_per_row(81), 32);
    assert_eq!(lanes_per_row(3), 1);
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
        let sections = [ws.keys, ws.partials, ws.images, ws.totals];
        for pair in sections.windows(2) {
            assert!(
                pair[0].offset + pair[0].len <= pair[1].offset,
                "{shape}: overlapping sections"
            );
        }
        for s in sections {
            assert_eq!(s.offset % 256, 0, "{shape}: section not 256-byte aligned");
        }
        assert_eq!(ws.keys.len, shape.rows() * 4);
        assert_eq!(ws.partials.len, plan.rows.grid as usize * 16);
        assert_eq!(ws.images.len, shape.batch * 16);
        assert_eq!(ws.bytes, ws.totals.offset + 16);
        assert_eq!(multibox::workspace_bytes(shape).unwrap(), ws.bytes);
    }
}

#[test]
fn grids_cover_every_row_and_image() {
    for shape in [
        Shape::new(1, 1, 2),
        Shape::new(4, 3000, 21),
        Shape::new(256, 8732, 81),
    ] {
        let plan = LaunchPlan::new(shape).unwrap();
        let rows_per_step = (ROW_THREADS / plan.lanes_per_row) as usize;
        let steps = shape.rows().div_ceil(rows_per_step);
        // Kernels 1 and 3 walk the rows with a block stride; every step is one block's turn.
        assert_eq!(plan.rows.grid as usize, steps.min(MAX_ROW_BLOCKS as usize));
        assert!(plan.rows.grid >= 1);
        assert_eq!(
            plan.rows,
            multibox::plan::Launch {
                step: Step::Rows,
                ..plan.gradient
            }
        );
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
fn kernel_names_say_the_step_and_types() {
    assert_eq!(
        Step::Rows.kernel_name(DType::F16, LabelType::I64),
        "multibox_rows_f16_i64"
    );
    assert_eq!(
        Step::Gradient.kernel_name(DType::BF16, LabelType::I32),
        "multibox_gradient_bf16_i32"
    );
    assert_eq!(
        Step::Select.kernel_name(DType::F32, LabelType::I64),
        "multibox_select"
    );
    let names = Step::all_kernel_names();
    assert_eq!(names.len(), 13);
    let unique: std::collections::HashSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len());
}

#[test]
fn the_plan_rejects_what_the_shape_rejects() {
    assert!(LaunchPlan::new(Shape::new(0, 10, 3)).is_err());
    assert!(LaunchPlan::new(Shape::new(2, 10, 1)).is_err());
    assert!(LaunchPlan::new(Shape::new(1 << 16, 1 << 16, 2)).is_err());
}
