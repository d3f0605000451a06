//! The element types the kernels take: f32 / f16 / bf16 inputs, i32 / i64 labels.

use half::{bf16, f16};

/// The storage type of `confidence`, the locations and the gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `f32`.
    F32,
    /// IEEE binary16 (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`).
    BF16,
}

impl DType {
    /// The suffix of kernel names (`multibox_..._f16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// The integer type of `labels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabelType {
    /// `i32`.
    I32,
    /// `i64` (PyTorch's default for class indices).
    I64,
}

impl LabelType {
    /// The suffix of kernel names (`multibox_..._i64`).
    pub const fn name(self) -> &'static str {
        match self {
            LabelType::I32 => "i32",
            LabelType::I64 => "i64",
        }
    }

    /// Bytes per label.
    pub const fn size(self) -> usize {
        match self {
            LabelType::I32 => 4,
            LabelType::I64 => 8,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// An input element type: `f32`, [`half::f16`] or [`half::bf16`].
pub trait Float:
    sealed::Sealed
    + cudarc::driver::DeviceRepr
    + bytemuck::Pod
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type (to nearest, ties to even).
    fn from_f32(x: f32) -> Self;
    /// Rounds an f64 to this type, through f32 (which the kernels also compute in).
    fn from_f64(x: f64) -> Self {
        Self::from_f32(x as f32)
    }
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Float for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn from_f64(x: f64) -> Self {
        // Rounding twice (f64 -> f32 -> f16) can be off by one ulp, and so is
        // `half`'s `from_f64`, which drops the low 32 mantissa bits before
        // rounding; rounding to odd first makes the second rounding exact.
        f16::from_f32(f64_to_f32_round_to_odd(x))
    }
}

impl Float for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn from_f64(x: f64) -> Self {
        bf16::from_f32(f64_to_f32_round_to_odd(x)) // see `f16::from_f64`
    }
}

/// `x` rounded to f32 toward zero, with the last bit set if that was
/// inexact ("round to odd"). f32 keeps at least two more bits than f16 and
/// bf16, so rounding this to nearest-even gives the correctly rounded
/// f16 / bf16 of `x` (Boldo and Melquiond, "When double rounding is odd").
fn f64_to_f32_round_to_odd(x: f64) -> f32 {
    let nearest = x as f32;
    if f64::from(nearest) == x || x.is_nan() {
        return nearest;
    }
    let bits = nearest.to_bits();
    // Sign-magnitude: one less is one step toward zero (inf becomes f32::MAX).
    let toward_zero = if f64::from(nearest).abs() > x.abs() {
        bits - 1
    } else {
        bits
    };
    f32::from_bits(toward_zero | 1)
}

/// A label element type: `i32` or `i64`.
pub trait Label:
    sealed::Sealed
    + cudarc::driver::DeviceRepr
    + bytemuck::Pod
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    /// The runtime tag of this type.
    const LABEL_TYPE: LabelType;
    /// Widens to i64.
    fn to_i64(self) -> i64;
    /// Narrows from i64 (for building inputs; panics on overflow in debug builds).
    fn from_i64(x: i64) -> Self;
}

impl Label for i32 {
    const LABEL_TYPE: LabelType = LabelType::I32;
    fn to_i64(self) -> i64 {
        i64::from(self)
    }
    fn from_i64(x: i64) -> Self {
        x as i32
    }
}

impl Label for i64 {
    const LABEL_TYPE: LabelType = LabelType::I64;
    fn to_i64(self) -> i64 {
        self
    }
    fn from_i64(x: i64) -> Self {
        x
    }
}
