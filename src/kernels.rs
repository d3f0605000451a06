//! The kernels compiled by build.rs: the embedded CUBIN and PTX images, the
//! choice of image for a device, and what ptxas reported for each kernel.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule};

use crate::{Error, Result};

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

/// [`image_for`], or why this build has no image of `source` for the
/// device, in words that say what to do.
pub(crate) fn image_or_why(
    source: &str,
    major: i32,
    minor: i32,
) -> std::result::Result<&'static EmbeddedImage, String> {
    image_for(source, major, minor).ok_or_else(|| {
        match IMAGES.iter().filter(|i| i.source == source).map(|i| i.arch).min() {
            None => format!(
                "this build of multibox has no `{source}` kernels: it was built with MULTIBOX_SKIP_KERNELS=1"
            ),
            Some(oldest) => format!(
                "sm_{major}{minor} is older than sm_{oldest}, the oldest architecture multibox's kernels are built for"
            ),
        }
    })
}

/// Loads the kernels of `source` (`rows`, `select`, ...) for `ctx`'s device
/// as one module: the CUBIN for its architecture where this build has one,
/// else the PTX ([`image_for`]).
pub(crate) fn load_module(ctx: &Arc<CudaContext>, source: &str) -> Result<Arc<CudaModule>> {
    let (major, minor) = ctx.compute_capability()?;
    let image = image_or_why(source, major, minor).map_err(Error::NoKernels)?;
    Ok(ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.bytes.to_vec()))?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_device_gets_the_image_of_its_architecture_or_a_reason() {
        if sources().is_empty() {
            // A MULTIBOX_SKIP_KERNELS=1 build: the reason says so.
            let why = image_or_why("rows", 9, 0).unwrap_err();
            assert!(why.contains("MULTIBOX_SKIP_KERNELS=1"), "{why}");
            return;
        }
        let pick = |major, minor| image_or_why("rows", major, minor).map(|i| (i.arch, i.kind));
        assert_eq!(pick(9, 0), Ok((90, ImageKind::Cubin)));
        // CUDA's binary compatibility: the same major, the highest minor not above.
        assert_eq!(pick(8, 7), Ok((86, ImageKind::Cubin)));
        assert_eq!(pick(12, 1), Ok((120, ImageKind::Cubin)));
        // A major without a CUBIN runs the PTX.
        assert_eq!(pick(11, 0), Ok((75, ImageKind::Ptx)));
        let why = pick(7, 0).unwrap_err();
        assert!(why.contains("sm_70 is older than sm_75"), "{why}");
        let why = image_or_why("no_such_source", 9, 0).unwrap_err();
        assert!(why.contains("MULTIBOX_SKIP_KERNELS=1"), "{why}");
    }
}
