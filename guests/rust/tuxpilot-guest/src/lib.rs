//! TuxPilot's WebAssembly guest ABI (version 1) for Rust plugins.
//!
//! ```ignore
//! use tuxpilot_guest::{json, Reply, Request};
//! fn handle(req: Request) -> Reply {
//!     match req {
//!         Request::Action { action, params, .. } if action == "hello" => Reply::ok(json!({"hi": params})),
//!         Request::Event { event, .. } => Reply::propose(vec![]),
//!         _ => Reply::error("unknown_action", "no such action"),
//!     }
//! }
//! tuxpilot_guest::plugin!(handle);
//! ```
//!
//! The host writes one JSON request into memory it asked `tuxpilot_alloc` for, calls
//! `tuxpilot_call(ptr, len)`, and reads the JSON reply at `(ret >> 32, ret & 0xffffffff)`.

pub use serde_json::{json, Map, Value};

/// One call from the host.
pub enum Request {
    /// Run `action` with `params` (already validated against the manifest's schema, defaults filled).
    Action { action: String, params: Value, config: Value, host: String, action_id: Option<String> },
    /// An event the manifest subscribes to: answer with the actions to propose (maybe none).
    Event { event: Value, config: Value, host: String },
}

/// The handler's answer.
pub enum Reply {
    Ok(Value),
    Error { code: String, message: String },
    Propose(Vec<Proposal>),
}

/// One of the plugin's own actions, proposed to the gate.
pub struct Proposal {
    pub action: String,
    pub params: Value,
    pub reason: Option<String>,
}

impl Reply {
    pub fn ok(data: Value) -> Reply {
        Reply::Ok(data)
    }
    pub fn error(code: &str, message: &str) -> Reply {
        Reply::Error { code: code.to_string(), message: message.to_string() }
    }
    pub fn propose(proposals: Vec<Proposal>) -> Reply {
        Reply::Propose(proposals)
    }
    fn to_json(&self) -> Value {
        match self {
            Reply::Ok(data) => json!({ "ok": data }),
            Reply::Error { code, message } => json!({ "error": { "code": code, "message": message } }),
            Reply::Propose(list) => json!({ "propose": list.iter().map(|p| json!({
                "action": p.action, "params": p.params, "reason": p.reason,
            })).collect::<Vec<_>>() }),
        }
    }
}

impl Proposal {
    pub fn new(action: &str, params: Value, reason: &str) -> Proposal {
        Proposal { action: action.to_string(), params, reason: Some(reason.to_string()) }
    }
}

fn text(doc: &Value, key: &str) -> String {
    doc.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

fn parse(raw: &[u8]) -> Result<Request, String> {
    let doc: Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    let config = doc.get("config").cloned().unwrap_or(Value::Null);
    match doc.get("kind").and_then(Value::as_str) {
        Some("action") => Ok(Request::Action {
            action: text(&doc, "action"),
            params: doc.get("params").cloned().unwrap_or_else(|| json!({})),
            config,
            host: text(&doc, "host"),
            action_id: doc.get("action_id").and_then(Value::as_str).map(str::to_string),
        }),
        Some("event") => Ok(Request::Event {
            event: doc.get("event").cloned().unwrap_or(Value::Null),
            config,
            host: text(&doc, "host"),
        }),
        other => Err(format!("unknown request kind {:?}", other)),
    }
}

// The last reply stays alive until the next call (the host reads it after tuxpilot_call returns).
static mut LAST_REPLY: Vec<u8> = Vec::new();

#[doc(hidden)]
pub fn alloc(len: usize) -> *mut u8 {
    let mut buf: Vec<u8> = Vec::with_capacity(len.max(1));
    let ptr = buf.as_mut_ptr();
    std::mem::forget(buf); // the host fills it; `call` takes it back
    ptr
}

#[doc(hidden)]
pub fn call(ptr: *mut u8, len: usize, handler: fn(Request) -> Reply) -> u64 {
    let raw = unsafe { Vec::from_raw_parts(ptr, len, len.max(1)) };
    let reply = match parse(&raw) {
        Ok(request) => handler(request),
        Err(message) => Reply::error("bad_request", &message),
    };
    let bytes = serde_json::to_vec(&reply.to_json()).unwrap_or_else(|_| b"{}".to_vec());
    unsafe {
        LAST_REPLY = bytes;
        ((LAST_REPLY.as_ptr() as u64) << 32) | LAST_REPLY.len() as u64
    }
}

/// Export the ABI's functions for `handler`.
#[macro_export]
macro_rules! plugin {
    ($handler:path) => {
        #[no_mangle]
        pub extern "C" fn tuxpilot_alloc(len: usize) -> *mut u8 {
            $crate::alloc(len)
        }
        #[no_mangle]
        pub extern "C" fn tuxpilot_call(ptr: *mut u8, len: usize) -> u64 {
            $crate::call(ptr, len, $handler)
        }
    };
}
