//! multibox (skeleton)
pub mod kernels;
