//! The CPU reference (being written).
