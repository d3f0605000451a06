//! Device memory: host allocations the driver hands out, so that a device
//! address is a host address the emulated kernels can use, and the table of
//! them that copies, pointer queries and each launch's bounds check read.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::{c_uint, c_void};
use std::sync::Mutex;

use cudarc::driver::sys::{
    CUcontext, CUdeviceptr, CUmemorytype, CUpointer_attribute as P, CUresult, CUstream,
};

use crate::{call, device, put, work, Status};

/// The device's memory, as `cuDeviceTotalMem` and `cuMemGetInfo` say.
pub(crate) const TOTAL: usize = 16 << 30;

/// cudaMalloc's alignment, which the kernels' vector loads may rely on.
const ALIGN: usize = 256;

/// What a fresh allocation holds: NaN in every float type, -1 in every
/// integer type, so that a kernel reading what nothing wrote shows it.
const FRESH: u8 = 0xff;

struct Allocation {
    len: usize,
    context: usize,
}

/// Every live allocation by its first address.
static ALLOCATIONS: Mutex<BTreeMap<u64, Allocation>> = Mutex::new(BTreeMap::new());

fn allocations() -> std::sync::MutexGuard<'static, BTreeMap<u64, Allocation>> {
    ALLOCATIONS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The allocation holding `addr`: its start, length and context.
fn find(addr: u64) -> Option<(u64, usize, usize)> {
    let table = allocations();
    let (&start, a) = table.range(..=addr).next_back()?;
    (addr - start < a.len as u64).then_some((start, a.len, a.context))
}

/// Fails unless the `bytes` bytes from `addr` lie in one allocation (as the
/// driver's copies and sets require).
pub(crate) fn check(addr: u64, bytes: usize) -> Status {
    if bytes == 0 {
        return Ok(());
    }
    match find(addr) {
        Some((start, len, _)) if addr - start + bytes as u64 <= len as u64 => Ok(()),
        _ => Err(CUresult::CUDA_ERROR_INVALID_VALUE),
    }
}

/// Every live allocation as a region the next launch may read and write.
pub(crate) fn regions() -> Vec<multibox_emu::Region> {
    allocations()
        .iter()
        .map(|(&start, a)| multibox_emu::Region {
            name: format!("allocation of {} bytes at {start:#x}", a.len),
            start,
            len: a.len as u64,
            blocks: None,
            writable: true,
        })
        .collect()
}

/// `bytes` bytes of device memory: host memory, 256-byte aligned, filled with 0xff bytes.
///
/// # Safety
/// `dptr` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytes: usize) -> CUresult {
    call(|| {
        let context = device::current()? as usize;
        work::forbid_unsafe_call()?;
        if bytes == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let layout = Layout::from_size_align(bytes, ALIGN)
            .map_err(|_| CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
        // SAFETY: the layout's size is not zero.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        }
        // SAFETY: `ptr` holds `bytes` bytes.
        unsafe { ptr.write_bytes(FRESH, bytes) };
        allocations().insert(
            ptr as u64,
            Allocation {
                len: bytes,
                context,
            },
        );
        // SAFETY: the caller's promise.
        unsafe { put(dptr, ptr as u64) }
    })
}

/// Frees an allocation, given its first address.
#[no_mangle]
pub extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    call(|| {
        device::current()?;
        work::forbid_unsafe_call()?;
        let a = allocations()
            .remove(&dptr)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        let layout = Layout::from_size_align(a.len, ALIGN).expect("allocated with this layout");
        // SAFETY: allocated by cuMemAlloc_v2 with this layout, and removed
        // from the table, so freed once.
        unsafe { std::alloc::dealloc(dptr as *mut u8, layout) };
        Ok(())
    })
}

/// Free and total device memory.
///
/// # Safety
/// Both are valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    call(|| {
        let used: usize = allocations().values().map(|a| a.len).sum();
        // SAFETY: the caller's promise.
        unsafe {
            put(free, TOTAL.saturating_sub(used))?;
            put(total, TOTAL)
        }
    })
}

/// A copy of `bytes` bytes from `src` to `dst` on `stream` (null: the legacy
/// stream, which the driver's synchronous copies use), either end device
/// memory where `*_device` says so.
///
/// # Safety
/// A host end is valid for `bytes` bytes of reads (`src`) or writes (`dst`)
/// whenever the copy runs.
unsafe fn copy(
    dst: u64,
    dst_device: bool,
    src: u64,
    src_device: bool,
    bytes: usize,
    stream: CUstream,
    sync: bool,
) -> Status {
    if sync {
        device::current()?;
        work::forbid_unsafe_call()?;
    }
    if dst_device {
        check(dst, bytes)?;
    }
    if src_device {
        check(src, bytes)?;
    }
    work::submit(stream, work::Op::Copy { dst, src, bytes })
}

/// A synchronous copy to device memory.
///
/// # Safety
/// `src` is valid for `bytes` bytes of reads.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
) -> CUresult {
    // SAFETY: the caller's promise.
    call(|| unsafe {
        copy(
            dst,
            true,
            src as u64,
            false,
            bytes,
            std::ptr::null_mut(),
            true,
        )
    })
}

/// A synchronous copy from device memory.
///
/// # Safety
/// `dst` is valid for `bytes` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
) -> CUresult {
    // SAFETY: the caller's promise.
    call(|| unsafe {
        copy(
            dst as u64,
            false,
            src,
            true,
            bytes,
            std::ptr::null_mut(),
            true,
        )
    })
}

/// A synchronous copy within device memory.
#[no_mangle]
pub extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> CUresult {
    // SAFETY: both ends are device memory, checked against the table.
    call(|| unsafe { copy(dst, true, src, true, bytes, std::ptr::null_mut(), true) })
}

/// A copy to device memory queued on `stream`.
///
/// # Safety
/// `src` stays valid for `bytes` bytes of reads until the copy runs (at
/// once, or at each replay of a graph that captured it).
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: the caller's promise.
    call(|| unsafe { copy(dst, true, src as u64, false, bytes, stream, false) })
}

/// A copy from device memory queued on `stream`.
///
/// # Safety
/// As for `cuMemcpyHtoDAsync_v2`, for writes to `dst`.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: the caller's promise.
    call(|| unsafe { copy(dst as u64, false, src, true, bytes, stream, false) })
}

/// A copy within device memory queued on `stream`.
#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    // SAFETY: both ends are device memory, checked against the table.
    call(|| unsafe { copy(dst, true, src, true, bytes, stream, false) })
}

fn set(dst: u64, value: u8, bytes: usize, stream: CUstream, sync: bool) -> Status {
    if sync {
        device::current()?;
        work::forbid_unsafe_call()?;
    }
    check(dst, bytes)?;
    work::submit(stream, work::Op::Set { dst, value, bytes })
}

/// A synchronous byte set of device memory.
#[no_mangle]
pub extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, value: u8, bytes: usize) -> CUresult {
    call(|| set(dst, value, bytes, std::ptr::null_mut(), true))
}

/// A byte set of device memory queued on `stream`.
#[no_mangle]
pub extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    value: u8,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    call(|| set(dst, value, bytes, stream, false))
}

/// What `cuPointerGetAttributes` says of `addr`: device memory of its
/// context where an allocation holds it, else what the driver says of
/// memory it does not know (type 0, no context, ordinal -2, no range).
///
/// # Safety
/// `data` points to a value of the attribute's type.
unsafe fn write_attribute(attribute: c_uint, data: *mut c_void, addr: u64) -> Status {
    let found = find(addr);
    let is = |a: P| attribute == a as c_uint;
    // SAFETY: the caller's promise: `data` has the attribute's C type.
    unsafe {
        if is(P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE) {
            let t = if found.is_some() {
                CUmemorytype::CU_MEMORYTYPE_DEVICE as c_uint
            } else {
                0
            };
            put(data.cast::<c_uint>(), t)
        } else if is(P::CU_POINTER_ATTRIBUTE_IS_MANAGED) || is(P::CU_POINTER_ATTRIBUTE_MAPPED) {
            put(data.cast::<bool>(), false)
        } else if is(P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL) {
            put(data.cast::<i32>(), if found.is_some() { 0 } else { -2 })
        } else if is(P::CU_POINTER_ATTRIBUTE_CONTEXT) {
            put(
                data.cast::<CUcontext>(),
                found.map_or(std::ptr::null_mut(), |f| f.2 as CUcontext),
            )
        } else if is(P::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR)
            || is(P::CU_POINTER_ATTRIBUTE_DEVICE_POINTER)
        {
            put(
                data.cast::<CUdeviceptr>(),
                found.map_or(0, |f| {
                    if is(P::CU_POINTER_ATTRIBUTE_DEVICE_POINTER) {
                        addr
                    } else {
                        f.0
                    }
                }),
            )
        } else if is(P::CU_POINTER_ATTRIBUTE_RANGE_SIZE) {
            put(data.cast::<usize>(), found.map_or(0, |f| f.1))
        } else {
            Err(CUresult::CUDA_ERROR_NOT_SUPPORTED)
        }
    }
}

/// What the driver knows of `addr`, one value for each attribute asked.
///
/// # Safety
/// `attributes` and `data` hold `count` entries; each `data` entry points
/// to a value of its attribute's type.
#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttributes(
    count: c_uint,
    attributes: *const c_uint,
    data: *mut *mut c_void,
    addr: CUdeviceptr,
) -> CUresult {
    call(|| {
        if attributes.is_null() || data.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        for i in 0..count as usize {
            // SAFETY: i < count, the arrays' length, and the caller's promise
            // for what each entry points to.
            unsafe { write_attribute(*attributes.add(i), *data.add(i), addr)? };
        }
        Ok(())
    })
}

/// One attribute of `addr`, which must be device memory.
///
/// # Safety
/// `data` points to a value of the attribute's type.
#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttribute(
    data: *mut c_void,
    attribute: c_uint,
    addr: CUdeviceptr,
) -> CUresult {
    call(|| {
        // Unlike the plural form, the driver refuses memory it does not know.
        find(addr).ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        // SAFETY: the caller's promise.
        unsafe { write_attribute(attribute, data, addr) }
    })
}
