//! A launch backend for calls that must never reach a kernel's memory: it
//! records the buffers a call asks it to check (`Backend::check_buffer`),
//! refuses the one it is told to, and counts launches.

use std::cell::{Cell, RefCell};

use multibox::{Backend, Error, Result};

/// Records `(name, address, bytes)` of every check; refuses `refuse`.
#[derive(Default)]
pub struct Extents {
    pub checked: RefCell<Vec<(&'static str, u64, usize)>>,
    pub refuse: Option<&'static str>,
    pub launched: Cell<usize>,
}

impl Extents {
    /// A backend that refuses the buffer named `refuse`, if any.
    pub fn refusing(refuse: Option<&'static str>) -> Self {
        Self {
            refuse,
            ..Self::default()
        }
    }
}

impl Backend for Extents {
    unsafe fn launch(&self, _: &'static str, _: u32, _: u32, _: u32, _: &[u8]) -> Result<()> {
        self.launched.set(self.launched.get() + 1);
        Ok(())
    }

    fn check_buffer(&self, name: &'static str, addr: u64, bytes: usize) -> Result<()> {
        self.checked.borrow_mut().push((name, addr, bytes));
        if self.refuse == Some(name) {
            return Err(Error::NotDeviceMemory {
                name,
                addr,
                reason: "refused by the test".into(),
            });
        }
        Ok(())
    }
}
