//! What the driver knows of a device address.
//!
//! The raw and C entry points take bare addresses. A host pointer or
//! another device's buffer would reach the kernels and fault, and a fault
//! is sticky: it poisons the whole context, the framework's included. So
//! before launching, those entry points ask the driver about each buffer
//! (`cuPointerGetAttributes`: a lookup that neither synchronises nor
//! allocates, and is legal while a stream is captured), and [`judge`]
//! turns what it says into an error or a go-ahead. The typed entry points
//! take cudarc buffers, whose context and length are already checked, and
//! skip it.
//!
//! On a device that reaches pageable host memory (HMM, or ATS on Grace
//! Hopper) a malloc'd buffer is usable, and passes. The check refuses only
//! on a positive answer, never on a query the driver fails.
//!
//! The check is as strict as the driver's answers allow, and no stricter:
//! memory from a caching allocator lies inside a larger allocation, so a
//! buffer too short for the shape is only caught where it runs past the end
//! of that allocation into memory CUDA does not know.

use cudarc::driver::sys::{self, CUmemorytype, CUpointer_attribute};
use cudarc::driver::CudaContext;

use crate::{Error, Result};

/// What `cuPointerGetAttributes` says of one address. Every field is 0
/// where the driver knows no memory there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PointerInfo {
    /// `CUmemorytype`: host (pinned), device, array or unified; 0 where
    /// CUDA knows no allocation (malloc'd host memory, a freed buffer).
    pub memory_type: u32,
    /// Managed memory, which every device can reach.
    pub managed: bool,
    /// The device the memory is on (device memory).
    pub device_ordinal: i32,
    /// The context it was allocated in: 0 for memory of a pool or of the
    /// virtual memory API, which belongs to a device, not a context.
    pub context: u64,
    /// The allocation it lies in, where the driver says (else 0 and 0).
    pub range_start: u64,
    /// The allocation's size in bytes.
    pub range_size: u64,
}

/// The context and device whose kernels will read and write the buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The `CUcontext`, as an integer.
    pub context: u64,
    /// Its device's ordinal.
    pub ordinal: usize,
    /// The device reaches pageable host memory (HMM, or ATS on Grace
    /// Hopper): there, memory CUDA knows nothing of may be a host
    /// allocation the kernels can use, so it is not refused.
    pub pageable_memory_access: bool,
}

impl Owner {
    /// `ctx` and its device, asked once (when a loss or an assigner loads
    /// its kernels). A driver that cannot say whether the device reaches
    /// pageable memory is taken to say no: such memory would fault there.
    pub fn of(ctx: &CudaContext) -> Self {
        use sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS;
        Self {
            context: ctx.cu_ctx() as u64,
            ordinal: ctx.ordinal(),
            pageable_memory_access: ctx
                .attribute(CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS)
                .is_ok_and(|v| v == 1),
        }
    }
}

/// How far [`judge`] could see: the whole buffer, or only that it starts in
/// usable memory and runs past the end of the allocation it starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// All `bytes` lie in the allocation.
    Whole,
    /// The buffer runs past its allocation's end: the memory under its last
    /// byte decides (a mapping of the virtual memory API continues in the
    /// next one; unknown memory there is a buffer too short for the shape).
    PastItsAllocation,
}

/// Whether the kernels of `owner` can use `bytes` bytes from `addr`, which
/// the driver describes as `info`: memory CUDA knows (or any, where the
/// device reaches pageable host memory), on the owner's device (pinned host
/// and managed memory are reachable from every device), in the owner's
/// context where the memory has one. Only a positive answer refuses: a
/// field the driver left unset (a device ordinal of -1, a null context)
/// passes.
pub fn judge(
    name: &'static str,
    addr: u64,
    bytes: usize,
    info: &PointerInfo,
    owner: Owner,
) -> Result<Reach> {
    const HOST: u32 = CUmemorytype::CU_MEMORYTYPE_HOST as u32;
    const DEVICE: u32 = CUmemorytype::CU_MEMORYTYPE_DEVICE as u32;
    const UNIFIED: u32 = CUmemorytype::CU_MEMORYTYPE_UNIFIED as u32;
    let unusable = |reason: String| Error::NotDeviceMemory { name, addr, reason };
    match info.memory_type {
        0 if owner.pageable_memory_access => return Ok(Reach::Whole),
        0 => {
            return Err(unusable(
                "CUDA knows no allocation there (host memory from malloc, or a freed buffer?)"
                    .into(),
            ))
        }
        HOST | UNIFIED => {}
        DEVICE if info.managed => {}
        DEVICE => {
            let other_device =
                usize::try_from(info.device_ordinal).is_ok_and(|d| d != owner.ordinal);
            let other_context = info.context != 0 && info.context != owner.context;
            if other_device || other_context {
                return Err(Error::WrongContext {
                    name,
                    expected_ordinal: owner.ordinal,
                });
            }
        }
        _ => {
            return Err(unusable(
                "it is a CUDA array, not linear device memory".into(),
            ))
        }
    }
    let end = addr.saturating_add(bytes as u64);
    if info.range_size != 0 && end > info.range_start.saturating_add(info.range_size) {
        return Ok(Reach::PastItsAllocation);
    }
    Ok(Reach::Whole)
}

/// The end of a buffer that ran past its allocation ([`Reach::PastItsAllocation`]):
/// its last byte must be memory the owner can use too.
pub fn judge_end(
    name: &'static str,
    addr: u64,
    bytes: usize,
    first: &PointerInfo,
    last: &PointerInfo,
    owner: Owner,
) -> Result<()> {
    if last.memory_type == 0 && !owner.pageable_memory_access {
        let allocated = (first.range_start.saturating_add(first.range_size)).saturating_sub(addr);
        return Err(Error::NotDeviceMemory {
            name,
            addr,
            reason: format!(
                "the call needs {bytes} bytes from there, but its allocation ends {allocated} bytes in"
            ),
        });
    }
    judge(name, last_byte(addr, bytes), 1, last, owner).map(|_| ())
}

/// The address of a buffer's last byte (its first for an empty one),
/// without overflow for any address a caller passes.
fn last_byte(addr: u64, bytes: usize) -> u64 {
    addr.saturating_add((bytes as u64).saturating_sub(1))
}

/// Asks the driver about `addr` (the thread's current context must be
/// the owner's, or any where the memory is unified).
pub fn query(addr: u64) -> Result<PointerInfo> {
    use CUpointer_attribute::*;
    let mut memory_type = 0u32;
    // A C `bool` for some attributes and an int for others: a zeroed u32
    // reads true in both cases where any byte is set.
    let mut managed = 0u32;
    let mut device_ordinal = -1i32;
    let mut context: sys::CUcontext = std::ptr::null_mut();
    let mut range_start: sys::CUdeviceptr = 0;
    let mut range_size: usize = 0;
    let mut attributes = [
        CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        CU_POINTER_ATTRIBUTE_IS_MANAGED,
        CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        CU_POINTER_ATTRIBUTE_CONTEXT,
        CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        CU_POINTER_ATTRIBUTE_RANGE_SIZE,
    ];
    let mut data: [*mut std::ffi::c_void; 6] = [
        (&raw mut memory_type).cast(),
        (&raw mut managed).cast(),
        (&raw mut device_ordinal).cast(),
        (&raw mut context).cast(),
        (&raw mut range_start).cast(),
        (&raw mut range_size).cast(),
    ];
    // SAFETY: each pointer in `data` points to a live local of the type the
    // driver writes for the attribute beside it (unsigned int, bool into a
    // wider zeroed int, int, CUcontext, CUdeviceptr, size_t), and the
    // arrays have the length passed. The driver only reads `addr` as a
    // number; it never dereferences it.
    unsafe {
        sys::cuPointerGetAttributes(
            attributes.len() as u32,
            attributes.as_mut_ptr(),
            data.as_mut_ptr(),
            addr,
        )
        .result()?;
    }
    Ok(PointerInfo {
        memory_type,
        managed: managed != 0,
        device_ordinal,
        context: context as u64,
        range_start,
        range_size: range_size as u64,
    })
}

/// [`judge`] and, where needed, [`judge_end`], on what the driver says.
/// A query the driver fails (an attribute some memory or driver does not
/// support) leaves the buffer unjudged, as before the check existed: the
/// check refuses only on a positive answer.
pub fn check(owner: Owner, name: &'static str, addr: u64, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let Ok(first) = query(addr) else {
        return Ok(());
    };
    match judge(name, addr, bytes, &first, owner)? {
        Reach::Whole => Ok(()),
        Reach::PastItsAllocation => match query(last_byte(addr, bytes)) {
            Ok(last) => judge_end(name, addr, bytes, &first, &last, owner),
            Err(_) => Ok(()),
        },
    }
}
