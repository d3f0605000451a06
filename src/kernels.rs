//! The kernels compiled by build.rs: the embedded CUBIN and PTX images, the
//! choice of image for a device, and what ptxas reported for each kernel.

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

/// The image to load on a device of compute capability `major.minor`: the
/// CUBIN of the same major version with the highest minor not above the
/// device's (CUDA's binary compatibility rule), else the PTX, which the
/// driver compiles for the device.
pub(crate) fn image_for(source: &str, major: i32, minor: i32) -> Option<&'static EmbeddedImage> {
    let device = (major * 10 + minor) as u32;
    let same_source = || IMAGES.iter().filter(move |i| i.source == source);
    same_source()
        .filter(|i| i.kind == ImageKind::Cubin && i.arch / 10 == device / 10 && i.arch <= device)
        .max_by_key(|i| i.arch)
        .or_else(|| same_source().find(|i| i.kind == ImageKind::Ptx && i.arch <= device))
}

/// The stems of the kernel sources compiled into this build (`rows`, `select`, ...).
pub fn sources() -> Vec<&'static str> {
    let mut s: Vec<&'static str> = IMAGES.iter().map(|i| i.source).collect();
    s.dedup();
    s
}

/// `(arch, kind)` of every image embedded for `source`.
pub fn images_of(source: &str) -> Vec<(u32, ImageKind)> {
    IMAGES
        .iter()
        .filter(|i| i.source == source)
        .map(|i| (i.arch, i.kind))
        .collect()
}
