//! The same calls on a real GPU, through the public typed API, when there is
//! one. Without a GPU the tests say why and pass, unless
//! MULTIBOX_REQUIRE_GPU=1, where they fail.

use std::cell::Cell;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use multibox::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use multibox::{
    CallOptions, DeviceStatus, Float, Gradients, Inputs, Label, MultiboxConfig, MultiboxLoss,
    Normalizer, Outputs, Shape,
};

use super::emulated::{self, Call, Forward, HostInputs, KernelOutput, Upstream};

/// The first GPU, or `None` with the reason printed. The test shares the
/// device with the executable's other tests for as long as it keeps the
/// [`Gpu`].
pub fn device(test: &str) -> Option<Gpu> {
    open(test, false)
}

/// The first GPU, as [`device`], held by this test alone: for a test that
/// captures a CUDA graph. The tests of one executable run in parallel
/// threads on this device, and a context-wide synchronisation in one of
/// them (dropping a `MultiboxLoss` waits for the device; so may freeing
/// memory) invalidates a capture in progress in another, whatever its
/// capture mode: CUDA scopes that to the device, not the thread.
pub fn device_alone(test: &str) -> Option<Gpu> {
    open(test, true)
}

/// The GPU's context, and this test's turn on it.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    _turn: Option<Turn>,
}

impl std::ops::Deref for Gpu {
    type Target = Arc<CudaContext>;
    fn deref(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

/// A test's turn on the device: shared with other tests, or alone.
pub struct Turn {
    _guard: Guard,
}

enum Guard {
    Shared(RwLockReadGuard<'static, ()>),
    Alone(RwLockWriteGuard<'static, ()>),
}

static TURNS: RwLock<()> = RwLock::new(());

thread_local! {
    /// Whether this thread holds a turn.
    static HOLDS_TURN: Cell<bool> = const { Cell::new(false) };
}

impl Drop for Turn {
    fn drop(&mut self) {
        HOLDS_TURN.with(|held| held.set(false));
    }
}

/// A turn on the device, waiting for one that excludes it to end; `None`
/// where this thread holds one already (a nested [`device`] call: a second
/// read lock could wait behind a waiting writer for ever).
pub fn take_turn(test: &str, alone: bool) -> Option<Turn> {
    if HOLDS_TURN.with(Cell::get) {
        assert!(
            !alone,
            "{test}: device_alone() inside a test that holds the device"
        );
        return None;
    }
    // A test that panicked with its turn poisons the lock; the turns still work.
    let guard = if alone {
        Guard::Alone(TURNS.write().unwrap_or_else(PoisonError::into_inner))
    } else {
        Guard::Shared(TURNS.read().unwrap_or_else(PoisonError::into_inner))
    };
    HOLDS_TURN.with(|held| held.set(true));
    Some(Turn { _guard: guard })
}

fn open(test: &str, alone: bool) -> Option<Gpu> {
    let ctx = match multibox::cuda_context(0) {
        Ok(ctx) => ctx,
        Err(why) => {
            if std::env::var("MULTIBOX_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: MULTIBOX_REQUIRE_GPU=1, but {why}");
            }
            // Straight to stderr, past the test harness's capture, so the
            // reason shows in every run.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{test}: skipped, {why}");
            return None;
        }
    };
    Some(Gpu {
        ctx,
        _turn: take_turn(test, alone),
    })
}

/// Device buffers of one call.
pub struct DeviceCall<T, L> {
    pub shape: Shape,
    pub confidence: CudaSlice<T>,
    pub predicted_locations: CudaSlice<T>,
    pub labels: CudaSlice<L>,
    pub gt_locations: CudaSlice<T>,
    pub grad_confidence: CudaSlice<T>,
    pub grad_locations: CudaSlice<T>,
    pub regression_loss: CudaSlice<f32>,
    pub classification_loss: CudaSlice<f32>,
    pub num_pos: CudaSlice<i32>,
    pub mask: CudaSlice<u8>,
    pub upstream: CudaSlice<f32>,
    /// The divisor of `Normalizer::GivenOnDevice` calls.
    pub normalizer: CudaSlice<f32>,
    pub workspace: CudaSlice<u8>,
}

impl<T: Float, L: Label> DeviceCall<T, L> {
    /// Copies the inputs; outputs and workspace start as 0xab garbage.
    pub fn new(
        stream: &Arc<CudaStream>,
        shape: Shape,
        inputs: &HostInputs<'_, T, L>,
    ) -> multibox::Result<Self> {
        Self::filled(stream, shape, inputs, 0xab)
    }

    /// As [`DeviceCall::new`], with the mask and the workspace starting as
    /// `fill` bytes.
    pub fn filled(
        stream: &Arc<CudaStream>,
        shape: Shape,
        inputs: &HostInputs<'_, T, L>,
        fill: u8,
    ) -> multibox::Result<Self> {
        let garbage = |n: usize| stream.clone_htod(&vec![fill; n]);
        let fill_t = |n: usize| stream.clone_htod(&vec![T::from_f32(f32::NAN); n]);
        Ok(Self {
            shape,
            confidence: stream.clone_htod(inputs.confidence)?,
            predicted_locations: stream.clone_htod(inputs.predicted_locations)?,
            labels: stream.clone_htod(inputs.labels)?,
            gt_locations: stream.clone_htod(inputs.gt_locations)?,
            grad_confidence: fill_t(shape.confidence_len())?,
            grad_locations: fill_t(shape.locations_len())?,
            regression_loss: stream.clone_htod(&[f32::NAN])?,
            classification_loss: stream.clone_htod(&[f32::NAN])?,
            num_pos: stream.clone_htod(&[-7i32])?,
            mask: garbage(shape.rows())?,
            upstream: stream.clone_htod(&[1.0f32, 1.0])?,
            normalizer: stream.clone_htod(&[f32::NAN])?,
            workspace: garbage(multibox::workspace_bytes(shape)?)?,
        })
    }

    /// The raw entry point's description of a forward_backward on these
    /// buffers. The addresses stay valid while `self` lives.
    pub fn raw_call(&self, stream: &Arc<CudaStream>) -> multibox::RawCall {
        use cudarc::driver::DevicePtr;
        let addr = |b: &dyn DevicePtr<u8>| b.device_ptr(stream).0;
        let t = |b: &CudaSlice<T>| b.device_ptr(stream).0;
        multibox::RawCall {
            shape: self.shape,
            dtype: T::DTYPE,
            label_type: L::LABEL_TYPE,
            buffers: multibox::RawBuffers {
                confidence: t(&self.confidence),
                predicted_locations: t(&self.predicted_locations),
                labels: self.labels.device_ptr(stream).0,
                gt_locations: t(&self.gt_locations),
                grad_confidence: t(&self.grad_confidence),
                grad_locations: t(&self.grad_locations),
                regression_loss: self.regression_loss.device_ptr(stream).0,
                classification_loss: self.classification_loss.device_ptr(stream).0,
                num_pos: self.num_pos.device_ptr(stream).0,
                mask: addr(&self.mask),
                workspace: addr(&self.workspace),
                workspace_bytes: self.workspace.len(),
            },
            upstream: multibox::RawUpstream::default(),
            pass: multibox::Pass::ForwardBackward,
            layout: multibox::Layout::RowMajor,
            normalizer: multibox::RawNormalizer::Positives,
        }
    }

    /// Queues one call on `stream` (nothing is read back).
    pub fn launch(
        &mut self,
        loss: &MultiboxLoss,
        stream: &Arc<CudaStream>,
        call: Call,
    ) -> multibox::Result<()> {
        if let emulated::Normalizer::GivenOnDevice(n) = call.normalizer {
            stream.memcpy_htod(&[n], &mut self.normalizer)?;
        }
        // Another call's forward after the call's own (Forward::Other),
        // through the raw entry point on these buffers: described here,
        // before the typed calls borrow them.
        let other_forward = match call.forward {
            Forward::Other(edit) if call.split => {
                let mut raw = multibox::RawCall {
                    pass: multibox::Pass::Forward,
                    layout: call.layout,
                    ..self.raw_call(stream)
                };
                let mut config = *loss.config();
                edit(&mut raw, &mut config);
                Some((raw, config))
            }
            _ => None,
        };
        let options = || CallOptions {
            layout: call.layout,
            normalizer: match call.normalizer {
                emulated::Normalizer::Positives => Normalizer::Positives,
                emulated::Normalizer::Given(n) => Normalizer::Given(n),
                emulated::Normalizer::GivenOnDevice(_) => {
                    Normalizer::GivenOnDevice(&self.normalizer)
                }
                emulated::Normalizer::PerImage => Normalizer::PerImage,
            },
        };
        let inputs = Inputs {
            confidence: &self.confidence,
            predicted_locations: &self.predicted_locations,
            labels: &self.labels,
            gt_locations: &self.gt_locations,
        };
        let mut outputs = Outputs {
            regression_loss: &mut self.regression_loss,
            classification_loss: &mut self.classification_loss,
            num_pos: &mut self.num_pos,
            mask: if call.with_mask {
                Some(&mut self.mask)
            } else {
                None
            },
        };
        // The call's own forward: all of a forward-only call, the first
        // half of a split one (unless the case has none).
        if !call.backward || (call.split && !matches!(call.forward, Forward::Nothing)) {
            loss.forward_with(
                stream,
                self.shape,
                &inputs,
                &mut outputs,
                &mut self.workspace,
                options(),
            )?;
        }
        if !call.backward {
            return Ok(());
        }
        let upstream = match call.upstream {
            Upstream::Host(g_reg, g_cls) => multibox::Upstream::Host { g_reg, g_cls },
            Upstream::Device(g_reg, g_cls) => {
                stream.memcpy_htod(&[g_reg, g_cls], &mut self.upstream)?;
                multibox::Upstream::Device(&self.upstream)
            }
        };
        let mut gradients = Gradients {
            confidence: &mut self.grad_confidence,
            predicted_locations: &mut self.grad_locations,
        };
        if call.split {
            if let Some((raw, config)) = other_forward {
                let other = loss_for(stream.context(), &config)?;
                // SAFETY: `raw` names this call's live buffers; the edits
                // keep its reads within them (Forward::Other).
                unsafe { other.launch_raw(&raw, stream.cu_stream()) }?;
            }
            return loss.backward_with(
                stream,
                self.shape,
                &inputs,
                upstream,
                &mut gradients,
                &mut self.workspace,
                call.layout,
            );
        }
        loss.forward_backward_with(
            stream,
            self.shape,
            &inputs,
            upstream,
            &mut gradients,
            &mut outputs,
            &mut self.workspace,
            options(),
        )
    }

    /// Copies everything back (synchronises).
    pub fn read(
        &self,
        loss: &MultiboxLoss,
        stream: &Arc<CudaStream>,
        call: Call,
    ) -> multibox::Result<KernelOutput<T>> {
        let status: DeviceStatus = loss.status(stream, self.shape, &self.workspace)?;
        Ok(KernelOutput {
            regression_loss: stream.clone_dtoh(&self.regression_loss)?[0],
            classification_loss: stream.clone_dtoh(&self.classification_loss)?[0],
            num_pos: stream.clone_dtoh(&self.num_pos)?[0],
            mask: if call.with_mask {
                stream.clone_dtoh(&self.mask)?
            } else {
                Vec::new()
            },
            grad_confidence: if call.backward {
                stream.clone_dtoh(&self.grad_confidence)?
            } else {
                Vec::new()
            },
            grad_locations: if call.backward {
                stream.clone_dtoh(&self.grad_locations)?
            } else {
                Vec::new()
            },
            status,
            traffic: Vec::new(),
        })
    }
}

/// The loss of `config` in `ctx`'s CUDA context, loaded once per
/// executable (each test's `device` is a new handle on the same primary
/// context): a goldens run makes hundreds of calls, and compute-sanitizer
/// instruments each module load again.
fn loss_for(
    ctx: &Arc<CudaContext>,
    config: &MultiboxConfig,
) -> multibox::Result<Arc<MultiboxLoss>> {
    type Loaded = Vec<(Arc<CudaContext>, MultiboxConfig, Arc<MultiboxLoss>)>;
    static LOADED: Mutex<Loaded> = Mutex::new(Vec::new());
    let mut loaded = LOADED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, _, loss)) = loaded
        .iter()
        .find(|(c, k, _)| c.cu_ctx() == ctx.cu_ctx() && k == config)
    {
        return Ok(loss.clone());
    }
    // A handle of the cache's own on the same context: cudarc keeps a
    // deferred error (a failed free, say) in the handle that made the
    // buffer, and the first test's handle would pass its errors on to
    // every later test that uses the cached loss.
    let own = multibox::cuda_context(ctx.ordinal())?;
    let loss = Arc::new(MultiboxLoss::new(&own, *config)?);
    loaded.push((own, *config, loss.clone()));
    Ok(loss)
}

/// One call on the GPU, like `emulated::run`.
pub fn run<T: Float, L: Label>(
    ctx: &Arc<CudaContext>,
    config: &MultiboxConfig,
    shape: Shape,
    inputs: &HostInputs<'_, T, L>,
    call: Call,
) -> multibox::Result<KernelOutput<T>> {
    let stream = ctx.default_stream();
    let loss = loss_for(ctx, config)?;
    let mut buffers = DeviceCall::filled(&stream, shape, inputs, call.fill)?;
    buffers.launch(&loss, &stream, call)?;
    buffers.read(&loss, &stream, call)
}
