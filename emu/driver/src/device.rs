//! The one device, its attributes, and contexts: the primary one and any
//! the caller creates, each thread's stack of current contexts.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint};
use std::sync::OnceLock;

use cudarc::driver::sys::{CUcontext, CUdevice, CUdevice_attribute as A, CUresult};

use crate::{call, put, work, Status};

/// The device's name, as `cuDeviceGetName` gives it.
const NAME: &str = "multibox emulator (CPU)";

/// The compute capability: 9.0, an H100's or H200's.
pub(crate) const CC_MAJOR: u32 = 9;
/// See [`CC_MAJOR`].
pub(crate) const CC_MINOR: u32 = 0;

/// Multiprocessors: few, so that the row kernels' grids are small and their
/// grid-stride loops take several turns even on small test batches.
pub(crate) const SMS: i32 = 8;

/// Shared memory of one multiprocessor, of which a block may take all but
/// [`RESERVED_SHARED`] (sm_90's figures).
pub(crate) const SHARED_PER_SM: usize = 228 * 1024;
/// What the driver sets aside of a multiprocessor's shared memory per block.
pub(crate) const RESERVED_SHARED: usize = 1024;
/// The most dynamic shared memory a block may take once its function allows
/// it (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
pub(crate) const SHARED_PER_BLOCK_OPTIN: usize = SHARED_PER_SM - RESERVED_SHARED;
/// The most a block may take without that attribute.
pub(crate) const SHARED_PER_BLOCK: usize = 48 * 1024;
/// Threads one multiprocessor holds.
pub(crate) const THREADS_PER_SM: usize = 2048;
/// Registers of one multiprocessor.
pub(crate) const REGISTERS_PER_SM: usize = 65536;
/// Blocks one multiprocessor holds.
pub(crate) const BLOCKS_PER_SM: usize = 32;

/// The device's answer for `attribute`: sm_90's figures where a caller
/// could act on them, 0 for the rest.
fn attribute(attribute: c_uint) -> c_int {
    let is = |a: A| attribute == a as c_uint;
    if is(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) {
        CC_MAJOR as c_int
    } else if is(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) {
        CC_MINOR as c_int
    } else if is(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) {
        SMS
    } else if is(A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
        || is(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X)
        || is(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y)
    {
        1024
    } else if is(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z) {
        64
    } else if is(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X) {
        i32::MAX
    } else if is(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y) || is(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z)
    {
        65535
    } else if is(A::CU_DEVICE_ATTRIBUTE_WARP_SIZE) {
        32
    } else if is(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK) {
        SHARED_PER_BLOCK as c_int
    } else if is(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN) {
        SHARED_PER_BLOCK_OPTIN as c_int
    } else if is(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR) {
        SHARED_PER_SM as c_int
    } else if is(A::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK) {
        RESERVED_SHARED as c_int
    } else if is(A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR) {
        THREADS_PER_SM as c_int
    } else if is(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR) {
        BLOCKS_PER_SM as c_int
    } else if is(A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK)
        || is(A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR)
    {
        REGISTERS_PER_SM as c_int
    } else if is(A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING) {
        1
    } else if is(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE) {
        50 * 1024 * 1024
    } else {
        // Among them: no memory pools (cudarc allocates synchronously), no
        // access to pageable host memory, no managed memory.
        0
    }
}

/// A context: the primary one, or one a caller created.
pub(crate) struct Context {
    _primary: bool,
}

/// The primary context, created on first use and never destroyed.
fn primary() -> CUcontext {
    static PRIMARY: OnceLock<usize> = OnceLock::new();
    *PRIMARY.get_or_init(|| Box::into_raw(Box::new(Context { _primary: true })) as usize)
        as CUcontext
}

thread_local! {
    /// The thread's context stack; the last is current.
    static CURRENT: RefCell<Vec<CUcontext>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's current context, if any.
pub(crate) fn current() -> Result<CUcontext, CUresult> {
    CURRENT
        .with_borrow(|stack| stack.last().copied())
        .ok_or(CUresult::CUDA_ERROR_INVALID_CONTEXT)
}

fn check_device(dev: CUdevice) -> Status {
    if dev == 0 {
        Ok(())
    } else {
        Err(CUresult::CUDA_ERROR_INVALID_DEVICE)
    }
}

/// Nothing to initialise: the device exists from the start.
#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    CUresult::CUDA_SUCCESS
}

/// The CUDA API version this model follows: 12.8.
///
/// # Safety
/// `version` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    // SAFETY: the caller's promise.
    call(|| unsafe { put(version, 12080) })
}

/// One device.
///
/// # Safety
/// `count` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    // SAFETY: the caller's promise.
    call(|| unsafe { put(count, 1) })
}

/// Device 0, the only one.
///
/// # Safety
/// `device` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    call(|| {
        check_device(ordinal)?;
        // SAFETY: the caller's promise.
        unsafe { put(device, 0) }
    })
}

/// "multibox emulator (CPU)", cut to `len - 1` bytes and terminated.
///
/// # Safety
/// `name` is valid for `len` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    call(|| {
        check_device(dev)?;
        if name.is_null() || len <= 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let n = NAME.len().min(len as usize - 1);
        // SAFETY: n + 1 <= len bytes, which the caller lets us write.
        unsafe {
            std::ptr::copy_nonoverlapping(NAME.as_ptr().cast(), name, n);
            name.add(n).write(0);
        }
        Ok(())
    })
}

/// An attribute of the device (see `attribute`).
///
/// # Safety
/// `value` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attrib: c_uint,
    dev: CUdevice,
) -> CUresult {
    call(|| {
        check_device(dev)?;
        // SAFETY: the caller's promise.
        unsafe { put(value, attribute(attrib)) }
    })
}

/// The device's memory: 16 GiB, of host memory.
///
/// # Safety
/// `bytes` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    call(|| {
        check_device(dev)?;
        // SAFETY: the caller's promise.
        unsafe { put(bytes, crate::memory::TOTAL) }
    })
}

/// The primary context, made on first use.
///
/// # Safety
/// `ctx` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    call(|| {
        check_device(dev)?;
        // SAFETY: the caller's promise.
        unsafe { put(ctx, primary()) }
    })
}

/// Nothing to release: the primary context lives as long as the process.
#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    call(|| check_device(dev))
}

/// Replaces the top of the thread's context stack; null pops it.
#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    call(|| {
        CURRENT.with_borrow_mut(|stack| {
            stack.pop();
            if !ctx.is_null() {
                stack.push(ctx);
            }
        });
        Ok(())
    })
}

/// The top of the thread's context stack, or null.
///
/// # Safety
/// `ctx` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut CUcontext) -> CUresult {
    let top = CURRENT.with_borrow(|stack| stack.last().copied());
    // SAFETY: the caller's promise.
    call(|| unsafe { put(ctx, top.unwrap_or(std::ptr::null_mut())) })
}

/// Pushes a context on the thread's stack.
#[no_mangle]
pub extern "C" fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    call(|| {
        if ctx.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        CURRENT.with_borrow_mut(|stack| stack.push(ctx));
        Ok(())
    })
}

/// Pops the thread's current context.
///
/// # Safety
/// `ctx` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(ctx: *mut CUcontext) -> CUresult {
    call(|| {
        let top = CURRENT
            .with_borrow_mut(|stack| stack.pop())
            .ok_or(CUresult::CUDA_ERROR_INVALID_CONTEXT)?;
        if !ctx.is_null() {
            // SAFETY: the caller's promise.
            unsafe { ctx.write(top) };
        }
        Ok(())
    })
}

/// Device 0, where a context is current.
///
/// # Safety
/// `device` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    call(|| {
        current()?;
        // SAFETY: the caller's promise.
        unsafe { put(device, 0) }
    })
}

/// A new context, pushed on the thread's stack.
///
/// # Safety
/// `ctx` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(
    ctx: *mut CUcontext,
    _flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    call(|| {
        check_device(dev)?;
        // Never freed: a handle compared after its context is destroyed
        // must not name a newer one.
        let new = Box::into_raw(Box::new(Context { _primary: false })).cast();
        // SAFETY: the caller's promise.
        unsafe { put(ctx, new)? };
        CURRENT.with_borrow_mut(|stack| stack.push(new));
        Ok(())
    })
}

/// Unbinds a created context from the calling thread (the primary one cannot be destroyed).
#[no_mangle]
pub extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    call(|| {
        if ctx.is_null() || ctx == primary() {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        CURRENT.with_borrow_mut(|stack| stack.retain(|&c| c != ctx));
        Ok(())
    })
}

/// Work has run already; invalidates the context's captures (see `work::context_synchronize`).
#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    call(|| {
        let ctx = current()?;
        work::context_synchronize(ctx as usize)
    })
}

/// Priorities 0 (least) to -5 (greatest), as on recent GPUs; they change nothing here.
///
/// # Safety
/// Both are valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(
    least: *mut c_int,
    greatest: *mut c_int,
) -> CUresult {
    call(|| {
        // SAFETY: the caller's promise; either may be null.
        unsafe {
            if !least.is_null() {
                least.write(0);
            }
            if !greatest.is_null() {
                greatest.write(-5);
            }
        }
        Ok(())
    })
}
