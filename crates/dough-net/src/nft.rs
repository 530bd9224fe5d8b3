//! nftables through `libnftables` (loaded at run time, so building Dough
//! needs no -dev package): a context is bound to the network namespace of
//! the thread that creates it, and every `run` is one atomic transaction.
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot load libnftables.so.1 (install Debian's libnftables1 / nftables): {0}")]
    Load(String),
    #[error("nftables rejected the batch: {0}")]
    Rejected(String),
}

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxStr = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type CtxRun = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

struct Api {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_error: CtxInt,
    buffer_output: CtxInt,
    get_error: CtxStr,
    get_output: CtxStr,
    run: CtxRun,
}

fn api() -> Result<&'static Api, NftError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| unsafe {
        let lib = libc::dlopen(
            c"libnftables.so.1".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL,
        );
        if lib.is_null() {
            let e = libc::dlerror();
            return Err(if e.is_null() {
                "dlopen failed".into()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            });
        }
        let sym = |name: &CStr| -> Result<*mut c_void, String> {
            let p = libc::dlsym(lib, name.as_ptr());
            if p.is_null() {
                Err(format!("symbol {name:?} missing"))
            } else {
                Ok(p)
            }
        };
        // The library stays loaded for the life of the process.
        Ok(Api {
            ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(sym(c"nft_ctx_new")?),
            ctx_free: std::mem::transmute::<*mut c_void, CtxFree>(sym(c"nft_ctx_free")?),
            buffer_error: std::mem::transmute::<*mut c_void, CtxInt>(sym(c"nft_ctx_buffer_error")?),
            buffer_output: std::mem::transmute::<*mut c_void, CtxInt>(sym(
                c"nft_ctx_buffer_output",
            )?),
            get_error: std::mem::transmute::<*mut c_void, CtxStr>(sym(
                c"nft_ctx_get_error_buffer",
            )?),
            get_output: std::mem::transmute::<*mut c_void, CtxStr>(sym(
                c"nft_ctx_get_output_buffer",
            )?),
            run: std::mem::transmute::<*mut c_void, CtxRun>(sym(c"nft_run_cmd_from_buffer")?),
        })
    })
    .as_ref()
    .map_err(|e| NftError::Load(e.clone()))
}

/// One libnftables context. Not `Sync`; may move between threads (it stays
/// bound to the namespace it was created in).
pub struct Nft {
    ctx: *mut c_void,
    api: &'static Api,
}

// The context is plain memory plus a netlink socket; libnftables keeps no
// thread-local state for it.
unsafe impl Send for Nft {}

impl Nft {
    /// A context in the calling thread's network namespace.
    pub fn new() -> Result<Nft, NftError> {
        let api = api()?;
        let ctx = unsafe { (api.ctx_new)(0) };
        if ctx.is_null() {
            return Err(NftError::Load("nft_ctx_new failed".into()));
        }
        unsafe {
            (api.buffer_error)(ctx);
            (api.buffer_output)(ctx);
        }
        Ok(Nft { ctx, api })
    }

    /// Run `cmds` (nft syntax, any number of lines) as one transaction;
    /// returns what nft printed.
    pub fn run(&mut self, cmds: &str) -> Result<String, NftError> {
        let c = CString::new(cmds).map_err(|_| NftError::Rejected("NUL in batch".into()))?;
        let rc = unsafe { (self.api.run)(self.ctx, c.as_ptr()) };
        let read = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        if rc != 0 {
            let err = read(unsafe { (self.api.get_error)(self.ctx) });
            return Err(NftError::Rejected(err.trim().to_string()));
        }
        Ok(read(unsafe { (self.api.get_output)(self.ctx) }))
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        unsafe { (self.api.ctx_free)(self.ctx) }
    }
}
