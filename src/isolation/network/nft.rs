//! nftables through libnftables (Debian's `nftables` package), loaded at run time: its JSON
//! interface, in the process, in the calling thread's network namespace. No `nft` process is
//! started; a host without the library gets a daemon that refuses networked functions with the
//! reason.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use serde_json::{json, Value};

const LIBRARY: &CStr = c"libnftables.so.1";
/// NFT_CTX_OUTPUT_JSON: the library then parses commands as JSON first.
const OUTPUT_JSON: u32 = 1 << 4;

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;
type SetFlags = unsafe extern "C" fn(*mut c_void, u32);
type Buffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;

/// The library's entry points.
pub struct Nft {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    run_cmd: RunCmd,
    output_set_flags: SetFlags,
    buffer_output: Buffer,
    buffer_error: Buffer,
    get_error_buffer: GetBuffer,
}

// SAFETY: plain function pointers into a library that stays loaded; each call creates its own
// context, used by one thread.
unsafe impl Send for Nft {}
// SAFETY: as above.
unsafe impl Sync for Nft {}

impl Nft {
    /// Loads libnftables (before the calling process is confined: loading maps files).
    pub fn load() -> Result<Self, String> {
        // SAFETY: dlopen with a constant, NUL-terminated name; the handle is never closed.
        let lib = unsafe { libc::dlopen(LIBRARY.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            return Err(format!("cannot load {} (install Debian's nftables package)", LIBRARY.to_string_lossy()));
        }
        let sym = |name: &CStr| -> Result<*mut c_void, String> {
            // SAFETY: dlsym on a live handle with a NUL-terminated name.
            let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
            if p.is_null() {
                return Err(format!("libnftables has no {}", name.to_string_lossy()));
            }
            Ok(p)
        };
        // SAFETY: each symbol is libnftables' function of that name, with the C signature its
        // header (nftables/libnftables.h) gives, which the types above repeat.
        unsafe {
            Ok(Self {
                ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(sym(c"nft_ctx_new")?),
                ctx_free: std::mem::transmute::<*mut c_void, CtxFree>(sym(c"nft_ctx_free")?),
                run_cmd: std::mem::transmute::<*mut c_void, RunCmd>(sym(c"nft_run_cmd_from_buffer")?),
                output_set_flags: std::mem::transmute::<*mut c_void, SetFlags>(sym(c"nft_ctx_output_set_flags")?),
                buffer_output: std::mem::transmute::<*mut c_void, Buffer>(sym(c"nft_ctx_buffer_output")?),
                buffer_error: std::mem::transmute::<*mut c_void, Buffer>(sym(c"nft_ctx_buffer_error")?),
                get_error_buffer: std::mem::transmute::<*mut c_void, GetBuffer>(sym(c"nft_ctx_get_error_buffer")?),
            })
        }
    }

    /// Runs `commands` (a list of JSON commands: `{"add": {...}}`, ...) as one transaction in the
    /// calling thread's network namespace.
    pub fn run(&self, commands: Vec<Value>) -> Result<(), String> {
        let text = json!({ "nftables": commands }).to_string();
        let text = CString::new(text).map_err(|_| "a NUL byte in an nftables command".to_string())?;
        // SAFETY: a new context (0: no flags), used and freed here; the error buffer is read
        // before the context is freed.
        unsafe {
            let ctx = (self.ctx_new)(0);
            if ctx.is_null() {
                return Err("nft_ctx_new failed".into());
            }
            (self.output_set_flags)(ctx, OUTPUT_JSON);
            (self.buffer_output)(ctx);
            (self.buffer_error)(ctx);
            let rc = (self.run_cmd)(ctx, text.as_ptr());
            let result = if rc == 0 {
                Ok(())
            } else {
                let e = (self.get_error_buffer)(ctx);
                let msg = if e.is_null() { String::new() } else { CStr::from_ptr(e).to_string_lossy().into_owned() };
                Err(format!("nftables: {}", msg.trim()))
            };
            (self.ctx_free)(ctx);
            result
        }
    }
}

/// JSON command builders (libnftables-json(5)), family `ip`.
pub mod cmd {
    use super::*;

    pub fn table(name: &str) -> Value {
        json!({"table": {"family": "ip", "name": name}})
    }

    pub fn chain(table: &str, name: &str, kind: &str, hook: &str, prio: i32, policy: &str) -> Value {
        json!({"chain": {"family": "ip", "table": table, "name": name, "type": kind, "hook": hook,
                         "prio": prio, "policy": policy}})
    }

    pub fn chain_ref(table: &str, name: &str) -> Value {
        json!({"chain": {"family": "ip", "table": table, "name": name}})
    }

    pub fn set(table: &str, name: &str) -> Value {
        json!({"set": {"family": "ip", "table": table, "name": name, "type": "ipv4_addr"}})
    }

    pub fn element(table: &str, set: &str, addr: std::net::Ipv4Addr) -> Value {
        json!({"element": {"family": "ip", "table": table, "name": set, "elem": [addr.to_string()]}})
    }

    pub fn rule(table: &str, chain: &str, expr: Vec<Value>) -> Value {
        json!({"rule": {"family": "ip", "table": table, "chain": chain, "expr": expr}})
    }

    pub fn add(what: Value) -> Value {
        json!({ "add": what })
    }

    pub fn delete(what: Value) -> Value {
        json!({ "delete": what })
    }

    pub fn flush(what: Value) -> Value {
        json!({ "flush": what })
    }

    /// `meta KEY == "VALUE"` (an interface name ending in `*` matches a prefix).
    pub fn meta(key: &str, value: &str) -> Value {
        json!({"match": {"op": "==", "left": {"meta": {"key": key}}, "right": value}})
    }

    /// `ip FIELD == RIGHT`: an address, `@set`, or a prefix from [`prefix`].
    pub fn ip(field: &str, right: Value) -> Value {
        json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": field}}, "right": right}})
    }

    /// `ip FIELD != RIGHT`.
    pub fn ip_not(field: &str, right: Value) -> Value {
        json!({"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": field}}, "right": right}})
    }

    pub fn prefix(addr: std::net::Ipv4Addr, len: u8) -> Value {
        json!({"prefix": {"addr": addr.to_string(), "len": len}})
    }

    pub fn established() -> Value {
        json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}})
    }

    pub fn verdict(v: &str) -> Value {
        json!({ v: null })
    }

    pub fn snat(addr: std::net::Ipv4Addr) -> Value {
        json!({"snat": {"addr": addr.to_string()}})
    }
}
