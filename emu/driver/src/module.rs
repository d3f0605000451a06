//! Modules and functions: an image (CUBIN or PTX) loaded into a context
//! names the kernels it holds and the architecture they were built for;
//! its functions are the emulator's builds of those kernels.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cudarc::driver::sys::{CUfunction, CUfunction_attribute as F, CUmodule, CUresult};
use multibox_emu::Arch;

use crate::device::{
    BLOCKS_PER_SM, CC_MAJOR, CC_MINOR, REGISTERS_PER_SM, RESERVED_SHARED, SHARED_PER_BLOCK,
    SHARED_PER_BLOCK_OPTIN, SHARED_PER_SM, THREADS_PER_SM,
};
use crate::{call, device, free_handle, put, Status};

/// A loaded image.
struct Module {
    /// The context it was loaded in.
    context: usize,
    /// The architecture its code was built for.
    arch: Arch,
    /// The image's bytes, searched for the names of its kernels.
    image: Vec<u8>,
    /// Registers a thread and shared memory a block of each kernel, where
    /// the image says (a CUBIN; PTX leaves them to the driver's compiler).
    resources: HashMap<String, (usize, usize)>,
    /// Functions handed out, by name, so that a name gives one handle.
    functions: Mutex<HashMap<String, usize>>,
}

/// A kernel of a module.
pub(crate) struct Function {
    /// The kernel's name, as the emulator registers it.
    pub name: String,
    /// The build it runs: its module's architecture.
    pub arch: Arch,
    /// Its module's context, which its launches' streams must belong to.
    pub context: usize,
    /// The size of the kernel's one argument, its params struct.
    pub params_size: usize,
    /// Registers a thread.
    registers: usize,
    /// Static shared memory a block, with what the driver reserves a block.
    static_shared: usize,
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
    pub max_dynamic_shared: AtomicUsize,
}

/// Little-endian reads from an ELF image.
struct Elf<'a>(&'a [u8]);

impl Elf<'_> {
    /// The `n`-byte (at most 8) little-endian number at byte `at`.
    fn read(&self, at: usize, n: usize) -> usize {
        let mut bytes = [0u8; 8];
        bytes[..n].copy_from_slice(&self.0[at..at + n]);
        u64::from_le_bytes(bytes) as usize
    }

    /// Every section: name, type, offset, size and link.
    fn sections(&self) -> Vec<(String, usize, usize, usize, usize)> {
        let (shoff, shentsize, shnum) =
            (self.read(0x28, 8), self.read(0x3a, 2), self.read(0x3c, 2));
        let header = |i: usize| shoff + i * shentsize;
        let names = self.read(header(self.read(0x3e, 2)) + 0x18, 8);
        (0..shnum)
            .map(|i| {
                let h = header(i);
                (
                    self.string(names + self.read(h, 4)),
                    self.read(h + 4, 4),
                    self.read(h + 0x18, 8),
                    self.read(h + 0x20, 8),
                    self.read(h + 0x28, 4),
                )
            })
            .collect()
    }

    fn string(&self, at: usize) -> String {
        let end = self.0[at..]
            .iter()
            .position(|&b| b == 0)
            .map_or(self.0.len(), |n| at + n);
        String::from_utf8_lossy(&self.0[at..end]).into_owned()
    }

    /// What each kernel needs of a multiprocessor, by name: registers a
    /// thread (`EIATTR_REGCOUNT` records of `.nv.info`, which name the
    /// kernel's symbol) and shared memory a block (the size of its
    /// `.nv.shared.<kernel>` section, which on sm_80 and later includes the
    /// 1 KiB the driver reserves a block).
    fn resources(&self) -> HashMap<String, (usize, usize)> {
        const EIFMT_SVAL: u8 = 4;
        const EIATTR_REGCOUNT: u8 = 0x2f;
        let sections = self.sections();
        let mut found: HashMap<String, (usize, usize)> = HashMap::new();
        let symtab = sections.iter().find(|s| s.0 == ".symtab");
        for (name, _, offset, size, _) in &sections {
            if let Some(kernel) = name.strip_prefix(".nv.shared.") {
                found.entry(kernel.to_owned()).or_default().1 = *size;
            }
            let (".nv.info", Some(symtab)) = (name.as_str(), symtab) else {
                continue;
            };
            let strings = sections[symtab.4].2;
            let mut at = *offset;
            while at + 4 <= offset + size {
                let (format, attribute) = (self.0[at], self.0[at + 1]);
                let len = self.read(at + 2, 2);
                at += 4;
                if format != EIFMT_SVAL {
                    continue; // the 2 bytes read as a length were its value
                }
                if attribute == EIATTR_REGCOUNT && len == 8 {
                    let symbol = symtab.2 + 24 * self.read(at, 4);
                    let kernel = self.string(strings + self.read(symbol, 4));
                    found.entry(kernel).or_default().0 = self.read(at + 4, 4);
                }
                at += len;
            }
        }
        found
    }
}

/// The length of an ELF image (the furthest of its section contents,
/// section headers and program headers), from its headers.
///
/// # Safety
/// `image` points to a whole ELF image.
unsafe fn elf_len(image: *const u8) -> usize {
    // SAFETY: an ELF64 header is 64 bytes.
    let header = Elf(unsafe { std::slice::from_raw_parts(image, 64) });
    let (phoff, phentsize, phnum) = (
        header.read(0x20, 8),
        header.read(0x36, 2),
        header.read(0x38, 2),
    );
    let (shoff, shentsize, shnum) = (
        header.read(0x28, 8),
        header.read(0x3a, 2),
        header.read(0x3c, 2),
    );
    let tables = (shoff + shentsize * shnum)
        .max(phoff + phentsize * phnum)
        .max(64);
    // SAFETY: the image holds its section header table.
    let elf = Elf(unsafe { std::slice::from_raw_parts(image, tables) });
    const SHT_NOBITS: usize = 8;
    (0..shnum)
        .map(|i| shoff + i * shentsize)
        .filter(|&h| elf.read(h + 4, 4) != SHT_NOBITS)
        .map(|h| elf.read(h + 0x18, 8) + elf.read(h + 0x20, 8))
        .fold(tables, usize::max)
}

/// The image's bytes and the architecture its code was built for: a CUBIN's
/// from its ELF flags (the SM in bits 0..8 up to ELF ABI version 7, in bits
/// 8..16 from version 8, which sm_100 and later use), a PTX module's from
/// its `.target`. The device loads a CUBIN of its own major version and a
/// minor not above its own, and PTX of any target not above it (compiled
/// for it), as CUDA's compatibility rules say; else the image has no
/// binary for it. Images for sm_80 and later run the emulator's sm_90
/// build (the `MB_SM80` paths).
///
/// # Safety
/// `image` points to a whole CUBIN, or to NUL-terminated PTX.
unsafe fn read_image(image: *const u8) -> Result<(Vec<u8>, Arch), CUresult> {
    let device = CC_MAJOR * 10 + CC_MINOR;
    // SAFETY: every image has at least 4 bytes (PTX text is far longer).
    let magic = unsafe { std::slice::from_raw_parts(image, 4) };
    let (bytes, sm) = if magic == b"\x7fELF" {
        // SAFETY: the caller's promise: the image is a whole ELF image.
        let len = unsafe { elf_len(image) };
        // SAFETY: as above: it holds `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(image, len) }.to_vec();
        let elf = Elf(&bytes);
        const EI_ABIVERSION: usize = 8;
        let flags = elf.read(0x30, 4) as u32;
        let sm = if bytes[EI_ABIVERSION] >= 8 {
            (flags >> 8) & 0xff
        } else {
            flags & 0xff
        };
        if sm / 10 != device / 10 || sm % 10 > device % 10 {
            eprintln!(
                "multibox-emu driver: a CUBIN for sm_{sm} cannot load on this sm_{device} device"
            );
            return Err(CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU);
        }
        (bytes, sm)
    } else {
        // SAFETY: the caller's promise: NUL-terminated.
        let text = unsafe { CStr::from_ptr(image.cast::<c_char>()) }
            .to_bytes()
            .to_vec();
        let target: u32 = String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| {
                l.trim().strip_prefix(".target sm_").map(|t| {
                    t.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
            })
            .and_then(|sm| sm.parse().ok())
            .ok_or(CUresult::CUDA_ERROR_INVALID_PTX)?;
        if target > device {
            return Err(CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU);
        }
        (text, target)
    };
    Ok((bytes, if sm >= 80 { Arch::Sm90 } else { Arch::Sm75 }))
}

/// Whether `image` holds a kernel named `name`: a PTX `.entry`, or a CUBIN
/// string table entry.
fn holds(image: &[u8], name: &str) -> bool {
    let patterns = [format!(".entry {name}("), format!("\0{name}\0")];
    patterns
        .iter()
        .any(|p| image.windows(p.len()).any(|w| w == p.as_bytes()))
}

/// Loads a CUBIN or PTX image into the current context.
///
/// # Safety
/// `module` is valid for a write; `image` points to a whole CUBIN or to
/// NUL-terminated PTX.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    call(|| {
        let context = device::current()? as usize;
        if image.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: the caller's promise.
        let (image, arch) = unsafe { read_image(image.cast())? };
        let resources = if image.starts_with(b"\x7fELF") {
            Elf(&image).resources()
        } else {
            HashMap::new()
        };
        let m = Box::new(Module {
            context,
            arch,
            image,
            resources,
            functions: Mutex::new(HashMap::new()),
        });
        // SAFETY: the caller's promise.
        unsafe { put(module, Box::into_raw(m).cast()) }
    })
}

/// Unloads a module.
#[no_mangle]
pub extern "C" fn cuModuleUnload(module: CUmodule) -> CUresult {
    // SAFETY: made by cuModuleLoadData and unloaded once; its functions
    // are leaked, so a handle kept past the unload stays readable.
    call(|| unsafe { free_handle(module.cast::<Module>(), CUresult::CUDA_ERROR_INVALID_HANDLE) })
}

/// The function `name` of a module: a kernel its image holds and the emulator builds.
///
/// # Safety
/// `function` is valid for a write, `module` is a loaded module, `name` is
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut CUfunction,
    module: CUmodule,
    name: *const c_char,
) -> CUresult {
    call(|| {
        if module.is_null() || name.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: the caller's promise.
        let (m, name) = unsafe {
            (
                &*module.cast::<Module>(),
                CStr::from_ptr(name).to_string_lossy().into_owned(),
            )
        };
        if !holds(&m.image, &name) {
            return Err(CUresult::CUDA_ERROR_NOT_FOUND);
        }
        let params_size =
            multibox_emu::params_size(&name, m.arch).ok_or(CUresult::CUDA_ERROR_NOT_FOUND)?;
        let mut functions = m.functions.lock().unwrap_or_else(|e| e.into_inner());
        // PTX: the registers of a middling kernel, no static shared memory.
        // A kernel without static shared memory has no `.nv.shared` section.
        let (registers, static_shared) = m.resources.get(&name).copied().unwrap_or((32, 0));
        let static_shared = static_shared.max(RESERVED_SHARED);
        let handle = *functions.entry(name.clone()).or_insert_with(|| {
            Box::into_raw(Box::new(Function {
                name,
                arch: m.arch,
                context: m.context,
                params_size,
                registers,
                static_shared,
                max_dynamic_shared: AtomicUsize::new(
                    SHARED_PER_BLOCK.saturating_sub(static_shared - RESERVED_SHARED),
                ),
            })) as usize
        });
        // SAFETY: the caller's promise.
        unsafe { put(function, handle as CUfunction) }
    })
}

/// The function behind a handle.
pub(crate) fn function(f: CUfunction) -> Result<&'static Function, CUresult> {
    if f.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
    }
    // SAFETY: every non-null handle the caller passes was made by
    // cuModuleGetFunction, which leaks it.
    Ok(unsafe { &*f.cast::<Function>() })
}

/// An attribute of a function: registers and static shared memory from its CUBIN, the dynamic shared memory it may take.
///
/// # Safety
/// `value` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(
    value: *mut c_int,
    attribute: c_uint,
    f: CUfunction,
) -> CUresult {
    call(|| {
        let f = function(f)?;
        let is = |a: F| attribute == a as c_uint;
        let v = if is(F::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK) {
            1024
        } else if is(F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
            f.max_dynamic_shared.load(Ordering::Relaxed) as c_int
        } else if is(F::CU_FUNC_ATTRIBUTE_NUM_REGS) {
            f.registers as c_int
        } else if is(F::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES) {
            (f.static_shared - RESERVED_SHARED) as c_int
        } else if is(F::CU_FUNC_ATTRIBUTE_PTX_VERSION) || is(F::CU_FUNC_ATTRIBUTE_BINARY_VERSION) {
            f.arch.sm() as c_int
        } else {
            0
        };
        // SAFETY: the caller's promise.
        unsafe { put(value, v) }
    })
}

/// Sets the dynamic shared memory a function may take (other attributes are accepted and ignored).
#[no_mangle]
pub extern "C" fn cuFuncSetAttribute(f: CUfunction, attribute: c_uint, value: c_int) -> CUresult {
    call(|| {
        let f = function(f)?;
        if attribute == F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as c_uint {
            if value < 0
                || value as usize + f.static_shared - RESERVED_SHARED > SHARED_PER_BLOCK_OPTIN
            {
                return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
            }
            f.max_dynamic_shared
                .store(value as usize, Ordering::Relaxed);
        }
        Ok(())
    })
}

/// Accepted and ignored: the model has no L1 split.
#[no_mangle]
pub extern "C" fn cuFuncSetCacheConfig(f: CUfunction, _config: c_uint) -> CUresult {
    call(|| function(f).map(|_| ()))
}

/// Blocks of `f` of `block` threads with `shared` bytes of dynamic shared
/// memory one multiprocessor holds, by the rules of CUDA's occupancy
/// calculator for sm_90: threads, registers (allocated 256 a warp, each of
/// the 4 sub-partitions holding a quarter of the file), shared memory
/// (allocated in 128-byte steps) and blocks.
fn resident(f: &Function, block: usize, shared: usize) -> usize {
    const GRANULE: usize = 128;
    const SUB_PARTITIONS: usize = 4;
    let warps = block.clamp(1, 1024).div_ceil(32);
    let by_threads = THREADS_PER_SM / (warps * 32);
    let registers_a_warp = (f.registers.max(1) * 32).div_ceil(256) * 256;
    let warps_by_registers = REGISTERS_PER_SM / SUB_PARTITIONS / registers_a_warp * SUB_PARTITIONS;
    let by_registers = warps_by_registers / warps;
    let per_block = (shared + f.static_shared).div_ceil(GRANULE) * GRANULE;
    let by_shared = if shared + f.static_shared - RESERVED_SHARED > SHARED_PER_BLOCK_OPTIN {
        0
    } else {
        SHARED_PER_SM / per_block
    };
    by_threads
        .min(by_registers)
        .min(by_shared)
        .min(BLOCKS_PER_SM)
}

/// Blocks of a function one multiprocessor holds (see `resident`).
///
/// # Safety
/// `blocks` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    blocks: *mut c_int,
    f: CUfunction,
    block: c_int,
    shared: usize,
) -> CUresult {
    call(|| {
        let f = function(f)?;
        if block <= 0 || block > 1024 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: the caller's promise.
        unsafe { put(blocks, resident(f, block as usize, shared) as c_int) }
    })
}

/// As `cuOccupancyMaxActiveBlocksPerMultiprocessor`; the flags change nothing here.
///
/// # Safety
/// As for `cuOccupancyMaxActiveBlocksPerMultiprocessor`.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    blocks: *mut c_int,
    f: CUfunction,
    block: c_int,
    shared: usize,
    _flags: c_uint,
) -> CUresult {
    // SAFETY: the caller's promise.
    unsafe { cuOccupancyMaxActiveBlocksPerMultiprocessor(blocks, f, block, shared) }
}

/// The most dynamic shared memory each of `blocks` blocks of a function may take on one multiprocessor.
///
/// # Safety
/// `shared` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyAvailableDynamicSMemPerBlock(
    shared: *mut usize,
    f: CUfunction,
    blocks: c_int,
    block: c_int,
) -> CUresult {
    call(|| {
        let f = function(f)?;
        if blocks <= 0 || block <= 0 || block > 1024 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let most = if resident(f, block as usize, 0) < blocks as usize {
            0
        } else {
            (SHARED_PER_SM / blocks as usize / 128 * 128)
                .saturating_sub(f.static_shared)
                .min(SHARED_PER_BLOCK_OPTIN + RESERVED_SHARED - f.static_shared)
        };
        // SAFETY: the caller's promise.
        unsafe { put(shared, most) }
    })
}

/// Fails unless a launch of `f` with `shared` bytes of dynamic shared
/// memory is one the device takes.
pub(crate) fn check_shared(f: &Function, shared: usize) -> Status {
    if shared > f.max_dynamic_shared.load(Ordering::Relaxed) {
        eprintln!(
            "multibox-emu driver: `{}` launched with {shared} bytes of dynamic shared memory, above the {} its \
             CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES allows",
            f.name,
            f.max_dynamic_shared.load(Ordering::Relaxed)
        );
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(registers: usize, static_shared: usize) -> Function {
        Function {
            name: "k".into(),
            arch: Arch::Sm90,
            context: 0,
            params_size: 8,
            registers,
            static_shared: static_shared + RESERVED_SHARED,
            max_dynamic_shared: AtomicUsize::new(SHARED_PER_BLOCK - static_shared),
        }
    }

    /// The calculator's answers for blocks of 256 threads: 64 registers
    /// hold 4 blocks, 48 hold 5; shared memory then decides.
    #[test]
    fn occupancy_follows_registers_then_shared_memory() {
        assert_eq!(resident(&kernel(64, 2080), 256, 0), 4);
        let k3 = kernel(48, 3888);
        assert_eq!(resident(&k3, 256, 0), 5);
        assert_eq!(resident(&k3, 256, 41_504), 5);
        assert_eq!(resident(&k3, 256, 42_528), 4);
        assert_eq!(resident(&k3, 256, SHARED_PER_BLOCK_OPTIN), 0);
        // Small blocks of few registers: the block limit.
        assert_eq!(resident(&kernel(16, 0), 32, 0), BLOCKS_PER_SM);
    }
}
