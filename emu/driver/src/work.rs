//! Work on streams: copies, sets and kernel launches, run when they are
//! queued (so stream order always holds) unless the stream is capturing a
//! graph, which records them to run at each replay; events; and the
//! capture rules that forbid synchronising calls.

use std::collections::BTreeMap;
use std::ffi::{c_uint, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, ThreadId};
use std::time::Instant;

use cudarc::driver::sys::{
    CUcontext, CUevent, CUfunction, CUgraph, CUgraphExec, CUresult, CUstream,
    CUstreamCaptureMode as Mode, CUstreamCaptureStatus,
};

use crate::module::{self, Function};
use crate::{call, device, free_handle, memory, put, Status};

/// One piece of work.
#[derive(Clone)]
pub(crate) enum Op {
    /// `bytes` bytes from `src` to `dst` (host or device addresses).
    Copy { dst: u64, src: u64, bytes: usize },
    /// `bytes` bytes at `dst` set to `value`.
    Set { dst: u64, value: u8, bytes: usize },
    /// A kernel launch, its argument bytes copied when it was queued.
    Launch {
        function: &'static Function,
        grid: [u32; 3],
        block: [u32; 3],
        shared: u32,
        params: Vec<u8>,
    },
}

impl Op {
    /// Runs the work now.
    fn run(&self) -> Status {
        match self {
            // SAFETY: device ends were checked against the allocation table
            // when the copy was queued; host ends are the caller's promise.
            Op::Copy { dst, src, bytes } => unsafe {
                std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes);
            },
            // SAFETY: checked against the allocation table when queued.
            Op::Set { dst, value, bytes } => unsafe {
                std::ptr::write_bytes(*dst as *mut u8, *value, *bytes);
            },
            Op::Launch {
                function,
                grid,
                block,
                shared,
                params,
            } => {
                // A GPU promises no order among blocks: a launch runs them
                // last to first where a bit of its count's hash says so, an
                // order that differs from call to call (a plain alternation
                // would repeat with the three launches of a call).
                static LAUNCHES: AtomicUsize = AtomicUsize::new(0);
                let reverse_blocks = mix(LAUNCHES.fetch_add(1, Ordering::Relaxed) as u64) & 1 == 1;
                let checked = multibox_emu::checks_available();
                let checks = multibox_emu::Checks {
                    reverse_blocks,
                    races: multibox_emu::races_checked_by_default(),
                    regions: if checked {
                        memory::regions()
                    } else {
                        Vec::new()
                    },
                    arch: function.arch,
                    ..Default::default()
                };
                // SAFETY: the addresses in `params` are the caller's, who
                // vouches that they are device memory the kernel may use;
                // the checker stops any access outside every allocation.
                let done = unsafe {
                    multibox_emu::launch_checked(
                        &function.name,
                        *grid,
                        *block,
                        *shared,
                        params,
                        &checks,
                    )
                };
                if let Err(e) = done {
                    eprintln!("multibox-emu driver: {e}");
                    return Err(CUresult::CUDA_ERROR_LAUNCH_FAILED);
                }
            }
        }
        Ok(())
    }
}

/// splitmix64's finaliser: each bit of the output depends on every bit of
/// the input.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A capture in progress.
struct Capture {
    mode: c_uint,
    thread: ThreadId,
    context: usize,
    ops: Vec<Op>,
    invalidated: bool,
}

/// A stream, and the capture it is in, if any.
struct Stream {
    context: usize,
    /// Created without `CU_STREAM_NON_BLOCKING`: the legacy default stream
    /// waits for it, and it for the legacy stream.
    blocking: bool,
    capture: Option<Capture>,
}

/// Every stream a caller created, by handle; the legacy default stream
/// (null) is never captured and so needs no entry.
static STREAMS: Mutex<BTreeMap<usize, Stream>> = Mutex::new(BTreeMap::new());

fn streams() -> MutexGuard<'static, BTreeMap<usize, Stream>> {
    STREAMS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The entry of `stream` in `streams`.
fn entry(streams: &mut BTreeMap<usize, Stream>, stream: CUstream) -> Result<&mut Stream, CUresult> {
    streams
        .get_mut(&(stream as usize))
        .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)
}

/// Queues `op` on `stream`: records it where the stream is capturing, else
/// runs it.
pub(crate) fn submit(stream: CUstream, op: Op) -> Status {
    let mut streams = streams();
    if stream.is_null() {
        legacy_stream_use(&mut streams)?;
    } else if let Some(capture) = &mut entry(&mut streams, stream)?.capture {
        if capture.invalidated {
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
        }
        capture.ops.push(op);
        return Ok(());
    }
    drop(streams);
    op.run()
}

/// Invalidates every capture in progress on a stream `hit` picks, and
/// fails with `error`, saying `why`, where there was one.
fn invalidate(
    streams: &mut BTreeMap<usize, Stream>,
    hit: impl Fn(&Stream, &Capture) -> bool,
    error: CUresult,
    why: &str,
) -> Status {
    let mut any = false;
    for s in streams.values_mut() {
        if !s.capture.as_ref().is_some_and(|c| hit(s, c)) {
            continue;
        }
        if let Some(c) = &mut s.capture {
            c.invalidated = true;
            any = true;
        }
    }
    if any {
        eprintln!("multibox-emu driver: {why}");
        return Err(error);
    }
    Ok(())
}

/// Fails, and invalidates the captures, where a use of the legacy default
/// stream (work, a synchronisation, an event, a query) would make it wait
/// for a blocking stream of the current context that is being captured:
/// CUDA's implicit synchronisation, which a capture cannot hold.
fn legacy_stream_use(streams: &mut BTreeMap<usize, Stream>) -> Status {
    let context = device::current()? as usize;
    invalidate(
        streams,
        |s, _| s.blocking && s.context == context,
        CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
        "the legacy stream used while a blocking stream is captured",
    )
}

/// Fails, and invalidates the capture, where `stream` is capturing: a
/// synchronisation or a query of it.
fn forbid_on_capture(
    streams: &mut BTreeMap<usize, Stream>,
    stream: CUstream,
    call: &str,
) -> Status {
    if let Some(c) = &mut entry(streams, stream)?.capture {
        c.invalidated = true;
        eprintln!("multibox-emu driver: {call} on a stream being captured");
        return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    }
    Ok(())
}

/// Fails, and invalidates the captures that forbid it, where a
/// synchronising call (an allocation, a free, a synchronous copy) is not
/// allowed on this thread now: where this thread captures in a mode other
/// than relaxed, or another thread captures in global mode. CUDA's rule for
/// "potentially unsafe API calls" under stream capture.
pub(crate) fn forbid_unsafe_call() -> Status {
    let me = thread::current().id();
    invalidate(
        &mut streams(),
        |_, c| {
            let mine = c.thread == me && c.mode != Mode::CU_STREAM_CAPTURE_MODE_RELAXED as c_uint;
            mine || c.mode == Mode::CU_STREAM_CAPTURE_MODE_GLOBAL as c_uint
        },
        CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        "a synchronising call during a stream capture that forbids it",
    )
}

/// `cuCtxSynchronize`: waits for the whole context, which invalidates every
/// capture in progress in it, whatever its mode or thread.
pub(crate) fn context_synchronize(context: usize) -> Status {
    invalidate(
        &mut streams(),
        |s, _| s.context == context,
        CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        "cuCtxSynchronize during a stream capture in its context",
    )
}

/// A stream of the current context; blocking unless `flags` says `CU_STREAM_NON_BLOCKING`.
///
/// # Safety
/// `stream` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut CUstream, flags: c_uint) -> CUresult {
    call(|| {
        let context = device::current()? as usize;
        // Handles are never reused: 16-byte steps from a non-null start, so
        // that they read as aligned addresses.
        static NEXT: AtomicUsize = AtomicUsize::new(0x5000_0000);
        let handle = NEXT.fetch_add(16, Ordering::Relaxed);
        const NON_BLOCKING: c_uint = 1;
        let blocking = flags & NON_BLOCKING == 0;
        streams().insert(
            handle,
            Stream {
                context,
                blocking,
                capture: None,
            },
        );
        // SAFETY: the caller's promise.
        unsafe { put(stream, handle as CUstream) }
    })
}

/// As `cuStreamCreate`; the priority changes nothing here.
///
/// # Safety
/// `stream` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    stream: *mut CUstream,
    flags: c_uint,
    _priority: i32,
) -> CUresult {
    // SAFETY: the caller's promise.
    unsafe { cuStreamCreate(stream, flags) }
}

/// Destroys a stream.
#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(stream: CUstream) -> CUresult {
    call(|| {
        streams()
            .remove(&(stream as usize))
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        Ok(())
    })
}

/// The context of a stream (the current one for the legacy stream).
///
/// # Safety
/// `context` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCtx(stream: CUstream, context: *mut CUcontext) -> CUresult {
    call(|| {
        let c = if stream.is_null() {
            device::current()? as usize
        } else {
            entry(&mut streams(), stream)?.context
        };
        // SAFETY: the caller's promise.
        unsafe { put(context, c as CUcontext) }
    })
}

/// Work has run already; fails on a stream being captured, and invalidates the capture.
#[no_mangle]
pub extern "C" fn cuStreamSynchronize(stream: CUstream) -> CUresult {
    call(|| {
        if stream.is_null() {
            legacy_stream_use(&mut streams())?;
            return forbid_unsafe_call();
        }
        forbid_on_capture(&mut streams(), stream, "cuStreamSynchronize")
    })
}

/// Always done: work runs when it is queued. A capturing stream may not be
/// queried.
#[no_mangle]
pub extern "C" fn cuStreamQuery(stream: CUstream) -> CUresult {
    call(|| {
        if stream.is_null() {
            return legacy_stream_use(&mut streams());
        }
        forbid_on_capture(&mut streams(), stream, "cuStreamQuery")
    })
}

/// Work runs when it is queued, so every wait is over at once.
#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(stream: CUstream, event: CUevent, _flags: c_uint) -> CUresult {
    call(|| {
        if event.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
        }
        if stream.is_null() {
            return legacy_stream_use(&mut streams());
        }
        entry(&mut streams(), stream).map(|_| ())
    })
}

/// Starts recording the stream's work into a graph, in capture mode `mode`.
#[no_mangle]
pub extern "C" fn cuStreamBeginCapture_v2(stream: CUstream, mode: c_uint) -> CUresult {
    call(|| {
        if stream.is_null() {
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        }
        let mut streams = streams();
        let s = entry(&mut streams, stream)?;
        if s.capture.is_some() {
            return Err(CUresult::CUDA_ERROR_ILLEGAL_STATE);
        }
        s.capture = Some(Capture {
            mode,
            thread: thread::current().id(),
            context: s.context,
            ops: Vec::new(),
            invalidated: false,
        });
        Ok(())
    })
}

/// A captured graph, and an instantiated one: the work, in order.
struct Graph {
    ops: Vec<Op>,
    _context: usize,
}

/// Ends a capture: its graph, or `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`.
///
/// # Safety
/// `graph` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(stream: CUstream, graph: *mut CUgraph) -> CUresult {
    call(|| {
        let capture = {
            let mut streams = streams();
            let s = entry(&mut streams, stream)?;
            let c = s
                .capture
                .as_ref()
                .ok_or(CUresult::CUDA_ERROR_ILLEGAL_STATE)?;
            if c.mode != Mode::CU_STREAM_CAPTURE_MODE_RELAXED as c_uint
                && c.thread != thread::current().id()
            {
                return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD);
            }
            s.capture.take().expect("checked above")
        };
        if capture.invalidated {
            // SAFETY: the caller's promise.
            unsafe { put(graph, std::ptr::null_mut())? };
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
        }
        let g = Box::new(Graph {
            ops: capture.ops,
            _context: capture.context,
        });
        // SAFETY: the caller's promise.
        unsafe { put(graph, Box::into_raw(g).cast()) }
    })
}

/// Whether the stream is capturing, and whether its capture was invalidated.
///
/// # Safety
/// `status` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(
    stream: CUstream,
    status: *mut CUstreamCaptureStatus,
) -> CUresult {
    call(|| {
        let s = if stream.is_null() {
            CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        } else {
            match &entry(&mut streams(), stream)?.capture {
                None => CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE,
                Some(c) if c.invalidated => {
                    CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_INVALIDATED
                }
                Some(_) => CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE,
            }
        };
        // SAFETY: the caller's promise.
        unsafe { put(status, s) }
    })
}

/// An executable copy of a captured graph.
///
/// # Safety
/// `exec` is valid for a write; `graph` came from `cuStreamEndCapture`.
#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    _flags: u64,
) -> CUresult {
    call(|| {
        if graph.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: the caller's promise.
        let g = unsafe { &*graph.cast::<Graph>() };
        let e = Box::new(Graph {
            ops: g.ops.clone(),
            _context: g._context,
        });
        // SAFETY: the caller's promise.
        unsafe { put(exec, Box::into_raw(e).cast()) }
    })
}

/// Queues a graph's work on `stream`, in the order it was captured.
///
/// # Safety
/// `exec` came from `cuGraphInstantiateWithFlags` and is not destroyed.
#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: CUgraphExec, stream: CUstream) -> CUresult {
    call(|| {
        if exec.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: the caller's promise.
        let g = unsafe { &*exec.cast::<Graph>() };
        g.ops.iter().try_for_each(|op| submit(stream, op.clone()))
    })
}

/// Nothing to upload.
#[no_mangle]
pub extern "C" fn cuGraphUpload(exec: CUgraphExec, _stream: CUstream) -> CUresult {
    call(|| {
        if exec.is_null() {
            Err(CUresult::CUDA_ERROR_INVALID_VALUE)
        } else {
            Ok(())
        }
    })
}

/// Destroys a captured graph.
///
/// # Safety
/// `graph` came from `cuStreamEndCapture` and is destroyed once.
#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(graph: CUgraph) -> CUresult {
    // SAFETY: the caller's promise: made by this driver, freed once.
    call(|| unsafe { free_handle(graph.cast::<Graph>(), CUresult::CUDA_ERROR_INVALID_VALUE) })
}

/// Destroys an executable graph.
///
/// # Safety
/// `exec` came from `cuGraphInstantiateWithFlags` and is destroyed once.
#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: CUgraphExec) -> CUresult {
    // SAFETY: the caller's promise: made by this driver, freed once.
    call(|| unsafe { free_handle(exec.cast::<Graph>(), CUresult::CUDA_ERROR_INVALID_VALUE) })
}

/// Queues a kernel on `stream`: its argument bytes are copied now, and it runs on the emulator when the stream runs it.
///
/// # Safety
/// `params` holds one pointer, to the kernel's params struct; `extra` is
/// null.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared: c_uint,
    stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    call(|| {
        let function = module::function(f)?;
        let context = if stream.is_null() {
            device::current()? as usize
        } else {
            entry(&mut streams(), stream)?.context
        };
        if context != function.context {
            eprintln!(
                "multibox-emu driver: `{}` launched on a stream of another context",
                function.name
            );
            return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
        }
        if params.is_null() || !extra.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let threads = block_x as u64 * block_y as u64 * block_z as u64;
        if [grid_x, grid_y, grid_z, block_x, block_y, block_z].contains(&0)
            || threads > 1024
            || block_z > 64
            || grid_y > 65535
            || grid_z > 65535
        {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        module::check_shared(function, shared as usize)?;
        // SAFETY: the caller's promise: `params[0]` points to the kernel's
        // params struct, `params_size` bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts((*params).cast::<u8>(), function.params_size) }
                .to_vec();
        submit(
            stream,
            Op::Launch {
                function,
                grid: [grid_x, grid_y, grid_z],
                block: [block_x, block_y, block_z],
                shared,
                params: bytes,
            },
        )
    })
}

/// An event: whether it keeps time, and when it was last recorded.
struct Event {
    timing: bool,
    recorded: Mutex<Option<Instant>>,
}

/// An event, timing unless `flags` says `CU_EVENT_DISABLE_TIMING`.
///
/// # Safety
/// `event` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(event: *mut CUevent, flags: c_uint) -> CUresult {
    const DISABLE_TIMING: c_uint = 2;
    let e = Box::new(Event {
        timing: flags & DISABLE_TIMING == 0,
        recorded: Mutex::new(None),
    });
    // SAFETY: the caller's promise.
    call(|| unsafe { put(event, Box::into_raw(e).cast()) })
}

/// Destroys an event.
///
/// # Safety
/// `event` came from `cuEventCreate` and is destroyed once.
#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(event: CUevent) -> CUresult {
    // SAFETY: the caller's promise: made by this driver, freed once.
    call(|| unsafe { free_handle(event.cast::<Event>(), CUresult::CUDA_ERROR_INVALID_HANDLE) })
}

fn event(e: CUevent) -> Result<&'static Event, CUresult> {
    if e.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
    }
    // SAFETY: every non-null handle was made by cuEventCreate and is live
    // until cuEventDestroy_v2 (the caller's promise).
    Ok(unsafe { &*e.cast::<Event>() })
}

/// Records the time on the host (work before it has run); a node of no effect in a capture.
#[no_mangle]
pub extern "C" fn cuEventRecord(e: CUevent, stream: CUstream) -> CUresult {
    call(|| {
        let e = event(e)?;
        if stream.is_null() {
            legacy_stream_use(&mut streams())?;
        } else if entry(&mut streams(), stream)?.capture.is_some() {
            // A node of the graph: ordering only, which replays keep.
            return Ok(());
        }
        *e.recorded.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        Ok(())
    })
}

/// Always done: work runs when it is queued.
#[no_mangle]
pub extern "C" fn cuEventQuery(e: CUevent) -> CUresult {
    call(|| event(e).map(|_| ()))
}

/// Always done: work runs when it is queued.
#[no_mangle]
pub extern "C" fn cuEventSynchronize(e: CUevent) -> CUresult {
    call(|| event(e).map(|_| ()))
}

/// Milliseconds between two recorded timing events, on the host's clock (the emulator's time, not a GPU's).
///
/// # Safety
/// `ms` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    call(|| {
        let (start, end) = (event(start)?, event(end)?);
        if !start.timing || !end.timing {
            return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
        }
        let at = |e: &Event| *e.recorded.lock().unwrap_or_else(|p| p.into_inner());
        let (Some(a), Some(b)) = (at(start), at(end)) else {
            return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
        };
        let elapsed = if b >= a {
            (b - a).as_secs_f32()
        } else {
            -(a - b).as_secs_f32()
        };
        // SAFETY: the caller's promise.
        unsafe { put(ms, elapsed * 1e3) }
    })
}

/// As `cuEventElapsedTime`.
///
/// # Safety
/// As for `cuEventElapsedTime`.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    // SAFETY: the caller's promise.
    unsafe { cuEventElapsedTime(ms, start, end) }
}
