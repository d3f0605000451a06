//! The embedded kernel images.

/// Kind of an embedded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// Machine code for exactly one architecture.
    Cubin,
    /// PTX that the driver compiles for the device at load time.
    Ptx,
}

/// One compiled kernel source for one target.
#[derive(Debug)]
pub(crate) struct EmbeddedImage {
    pub source: &'static str,
    pub arch: u32,
    pub kind: ImageKind,
    pub bytes: &'static [u8],
}

/// What ptxas reported for one kernel on one architecture.
#[derive(Debug, Clone, Copy)]
pub struct KernelReport {
    /// Kernel symbol.
    pub kernel: &'static str,
    /// Source file stem in `kernels/`.
    pub source: &'static str,
    /// SM version (75 = sm_75).
    pub arch: u32,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes spilled to local memory (stores).
    pub spill_store_bytes: u32,
    /// Bytes reloaded from spills.
    pub spill_load_bytes: u32,
    /// Stack frame bytes.
    pub stack_frame_bytes: u32,
    /// Static shared memory bytes.
    pub static_shared_bytes: u32,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
