//! The model's rules, called as a driver's user calls them.

use std::ffi::{c_uint, c_void};
use std::ptr::null_mut;

use cudarc::driver::sys::{
    CUcontext, CUdeviceptr, CUmemorytype, CUpointer_attribute as P, CUresult, CUstream,
    CUstreamCaptureMode as Mode,
};

use crate::device::{cuCtxSetCurrent, cuDevicePrimaryCtxRetain};
use crate::memory::{cuMemAlloc_v2, cuMemFree_v2, cuMemsetD8Async, cuPointerGetAttributes};
use crate::work::{cuStreamBeginCapture_v2, cuStreamCreate, cuStreamEndCapture};

/// The driver's state is the process's: a global-mode capture in one test
/// would forbid another's allocations. One test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Binds the primary context to the calling thread, and holds the turn.
fn bind() -> (CUcontext, std::sync::MutexGuard<'static, ()>) {
    let turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut ctx = null_mut();
    // SAFETY: `ctx` is writable.
    assert_eq!(
        unsafe { cuDevicePrimaryCtxRetain(&mut ctx, 0) },
        CUresult::CUDA_SUCCESS
    );
    assert_eq!(cuCtxSetCurrent(ctx), CUresult::CUDA_SUCCESS);
    (ctx, turn)
}

fn stream() -> CUstream {
    let mut s = null_mut();
    // SAFETY: `s` is writable.
    assert_eq!(unsafe { cuStreamCreate(&mut s, 0) }, CUresult::CUDA_SUCCESS);
    s
}

fn alloc(bytes: usize) -> Result<CUdeviceptr, CUresult> {
    let mut p = 0;
    // SAFETY: `p` is writable.
    match unsafe { cuMemAlloc_v2(&mut p, bytes) } {
        CUresult::CUDA_SUCCESS => Ok(p),
        e => Err(e),
    }
}

/// The end of a capture: its graph, or the error.
fn end(s: CUstream) -> CUresult {
    let mut graph = null_mut();
    // SAFETY: `graph` is writable.
    unsafe { cuStreamEndCapture(s, &mut graph) }
}

#[test]
fn an_allocation_during_a_thread_local_capture_fails_and_invalidates_it() {
    let _turn = bind();
    let s = stream();
    let mode = Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL as c_uint;
    assert_eq!(cuStreamBeginCapture_v2(s, mode), CUresult::CUDA_SUCCESS);
    assert_eq!(
        alloc(64),
        Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
    );
    assert_eq!(end(s), CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    // Relaxed mode allows it, and the capture survives.
    let mode = Mode::CU_STREAM_CAPTURE_MODE_RELAXED as c_uint;
    assert_eq!(cuStreamBeginCapture_v2(s, mode), CUresult::CUDA_SUCCESS);
    let p = alloc(64).unwrap();
    assert_eq!(end(s), CUresult::CUDA_SUCCESS);
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
}

#[test]
fn a_captured_set_runs_at_replay_not_before() {
    use crate::work::{cuGraphInstantiateWithFlags, cuGraphLaunch};
    let _turn = bind();
    let s = stream();
    let p = alloc(16).unwrap();
    assert_eq!(cuMemsetD8Async(p, 0, 16, s), CUresult::CUDA_SUCCESS);
    let mode = Mode::CU_STREAM_CAPTURE_MODE_GLOBAL as c_uint;
    assert_eq!(cuStreamBeginCapture_v2(s, mode), CUresult::CUDA_SUCCESS);
    assert_eq!(cuMemsetD8Async(p, 7, 16, s), CUresult::CUDA_SUCCESS);
    let mut graph = null_mut();
    // SAFETY: `graph` is writable.
    assert_eq!(
        unsafe { cuStreamEndCapture(s, &mut graph) },
        CUresult::CUDA_SUCCESS
    );
    // SAFETY: `p` holds 16 bytes, written by the set before the capture.
    let bytes = || unsafe { std::slice::from_raw_parts(p as *const u8, 16) }.to_vec();
    assert_eq!(bytes(), [0; 16]);
    let mut exec = null_mut();
    // SAFETY: `exec` is writable, `graph` came from the capture.
    assert_eq!(
        unsafe { cuGraphInstantiateWithFlags(&mut exec, graph, 0) },
        CUresult::CUDA_SUCCESS
    );
    // SAFETY: `exec` was just instantiated.
    assert_eq!(unsafe { cuGraphLaunch(exec, s) }, CUresult::CUDA_SUCCESS);
    assert_eq!(bytes(), [7; 16]);
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
}

#[test]
fn copies_and_sets_must_stay_inside_one_allocation() {
    let _turn = bind();
    let p = alloc(16).unwrap();
    assert_eq!(
        cuMemsetD8Async(p + 8, 1, 8, null_mut()),
        CUresult::CUDA_SUCCESS
    );
    assert_eq!(
        cuMemsetD8Async(p + 8, 1, 9, null_mut()),
        CUresult::CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_ERROR_INVALID_VALUE);
}

/// Memory type, context, range start and size of `addr`.
fn attributes(addr: u64) -> (u32, CUcontext, u64, usize) {
    let (mut kind, mut start, mut size) = (0u32, 0u64, 0usize);
    let mut ctx: CUcontext = null_mut();
    let which = [
        P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE as c_uint,
        P::CU_POINTER_ATTRIBUTE_CONTEXT as c_uint,
        P::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR as c_uint,
        P::CU_POINTER_ATTRIBUTE_RANGE_SIZE as c_uint,
    ];
    let mut data: [*mut c_void; 4] = [
        (&raw mut kind).cast(),
        (&raw mut ctx).cast(),
        (&raw mut start).cast(),
        (&raw mut size).cast(),
    ];
    // SAFETY: each entry of `data` points to a local of its attribute's type.
    let done = unsafe { cuPointerGetAttributes(4, which.as_ptr(), data.as_mut_ptr(), addr) };
    assert_eq!(done, CUresult::CUDA_SUCCESS);
    (kind, ctx, start, size)
}

#[test]
fn the_driver_knows_its_allocations_and_nothing_else() {
    let (ctx, _turn) = bind();
    let p = alloc(100).unwrap();
    let device = CUmemorytype::CU_MEMORYTYPE_DEVICE as u32;
    assert_eq!(attributes(p + 99), (device, ctx, p, 100));
    assert_eq!(attributes(p + 100).0, 0);
    let host = [0u8; 8];
    assert_eq!(attributes(host.as_ptr() as u64), (0, null_mut(), 0, 0));
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
    assert_eq!(attributes(p).0, 0);
}

#[test]
fn the_legacy_stream_may_not_wait_for_a_blocking_stream_being_captured() {
    let _turn = bind();
    let blocking = stream();
    let p = alloc(16).unwrap();
    let mode = Mode::CU_STREAM_CAPTURE_MODE_RELAXED as c_uint;
    assert_eq!(
        cuStreamBeginCapture_v2(blocking, mode),
        CUresult::CUDA_SUCCESS
    );
    assert_eq!(
        cuMemsetD8Async(p, 1, 16, null_mut()),
        CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
    );
    assert_eq!(
        end(blocking),
        CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
    );
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
}

/// The result of loading `image` into the current context.
fn load(image: &[u8]) -> CUresult {
    use crate::module::{cuModuleLoadData, cuModuleUnload};
    let mut module = null_mut();
    // SAFETY: `module` is writable; `image` is an ELF header or NUL-terminated PTX.
    let loaded = unsafe { cuModuleLoadData(&mut module, image.as_ptr().cast()) };
    if loaded == CUresult::CUDA_SUCCESS {
        assert_eq!(cuModuleUnload(module), CUresult::CUDA_SUCCESS);
    }
    loaded
}

/// A bare ELF64 header (no sections) of ELF ABI version `abi`, flags `flags`.
fn cubin(abi: u8, flags: u32) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[8] = abi;
    h[0x30..0x34].copy_from_slice(&flags.to_le_bytes());
    h
}

#[test]
fn a_9_0_device_loads_sm_90_cubins_and_older_ptx_only() {
    let _turn = bind();
    assert_eq!(load(&cubin(7, 0x5a055a)), CUresult::CUDA_SUCCESS);
    for (abi, flags) in [(7, 0x500550), (7, 0x4b054b), (8, 0xa006402), (8, 0xa007802)] {
        assert_eq!(
            load(&cubin(abi, flags)),
            CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU,
            "{flags:#x}"
        );
    }
    assert_eq!(
        load(b".version 8.7\n.target sm_75\n\0"),
        CUresult::CUDA_SUCCESS
    );
    assert_eq!(
        load(b".version 8.7\n.target sm_100\n\0"),
        CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
    );
}

#[test]
fn a_capturing_stream_may_not_be_queried_nor_the_legacy_stream_used() {
    use crate::work::{cuEventCreate, cuEventRecord, cuStreamQuery};
    let _turn = bind();
    let blocking = stream();
    let mut e = null_mut();
    // SAFETY: `e` is writable.
    assert_eq!(unsafe { cuEventCreate(&mut e, 0) }, CUresult::CUDA_SUCCESS);
    let mode = Mode::CU_STREAM_CAPTURE_MODE_RELAXED as c_uint;
    assert_eq!(
        cuStreamBeginCapture_v2(blocking, mode),
        CUresult::CUDA_SUCCESS
    );
    assert_eq!(
        cuEventRecord(e, null_mut()),
        CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
    );
    assert_eq!(
        end(blocking),
        CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
    );
    assert_eq!(
        cuStreamBeginCapture_v2(blocking, mode),
        CUresult::CUDA_SUCCESS
    );
    assert_eq!(
        cuStreamQuery(blocking),
        CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
    );
    assert_eq!(
        end(blocking),
        CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
    );
}

#[test]
fn bad_handles_are_errors_not_crashes() {
    use crate::work::{cuGraphDestroy, cuGraphExecDestroy};
    let (ctx, _turn) = bind();
    // SAFETY: null handles, which the driver refuses.
    unsafe {
        assert_eq!(
            cuGraphDestroy(null_mut()),
            CUresult::CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            cuGraphExecDestroy(null_mut()),
            CUresult::CUDA_ERROR_INVALID_VALUE
        );
    }
    // Without a current context, memory calls fail.
    let p = alloc(16).unwrap();
    assert_eq!(cuCtxSetCurrent(null_mut()), CUresult::CUDA_SUCCESS);
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_ERROR_INVALID_CONTEXT);
    assert_eq!(cuCtxSetCurrent(ctx), CUresult::CUDA_SUCCESS);
    assert_eq!(cuMemFree_v2(p), CUresult::CUDA_SUCCESS);
}
