//! The process's log, as Firecracker's `--level`, `--log-path`, `--show-level`,
//! `--show-log-origin` and `--module` set it at start and `PUT /logger` changes it later: the
//! filter, the decorations and the file (or named pipe) are swapped in place.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Deserialize;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use super::model::Fault;
use crate::sys::Locked;

/// Where log lines go: stderr until a path is given.
#[derive(Clone)]
pub struct Target(Arc<Mutex<Box<dyn Write + Send>>>);

/// One log line's writer: the target, held while the line is written.
pub struct TargetGuard<'a>(std::sync::MutexGuard<'a, Box<dyn Write + Send>>);

impl Write for TargetGuard<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<'a> fmt::MakeWriter<'a> for Target {
    type Writer = TargetGuard<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        TargetGuard(self.0.locked())
    }
}

/// The registry under the filter: what the formatting layer is layered on.
type Filtered = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type FmtLayer = fmt::Layer<Filtered, fmt::format::DefaultFields, fmt::format::Format, Target>;

struct Handles {
    filter: reload::Handle<EnvFilter, Registry>,
    layer: reload::Handle<FmtLayer, Filtered>,
    target: Target,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

/// `PUT /logger`'s body (and the command line's flags of the same names).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub log_path: Option<std::path::PathBuf>,
    #[serde(default)]
    pub show_level: Option<bool>,
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    #[serde(default)]
    pub module: Option<String>,
}

/// A Firecracker level (any case) as a tracing filter directive.
fn directive(level: &str, module: Option<&str>) -> Result<String, Fault> {
    let l = match level.to_ascii_lowercase().as_str() {
        "off" => "off",
        "error" => "error",
        "warning" | "warn" => "warn",
        "info" => "info",
        "debug" => "debug",
        "trace" => "trace",
        _ => return Err(Fault::new(format!("Invalid log level: {level}"))),
    };
    Ok(match module {
        // Lines of that module only (ember's module paths, e.g. `ember::vmm`).
        Some(m) => format!("off,{m}={l}"),
        None => l.to_string(),
    })
}

fn layer(show_level: bool, show_origin: bool, target: Target) -> FmtLayer {
    fmt::layer()
        .with_level(show_level)
        .with_file(show_origin)
        .with_line_number(show_origin)
        .with_target(false)
        .with_ansi(false)
        .with_writer(target)
}

fn open(path: &Path) -> Result<Box<dyn Write + Send>, Fault> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| Fault::new(format!("Failed to open the log file {}: {e}", path.display())))?;
    Ok(Box::new(f))
}

/// Sets the log up once, at start.
pub fn init(l: &Logger) -> Result<(), Fault> {
    let filter = EnvFilter::try_new(directive(l.level.as_deref().unwrap_or("Info"), l.module.as_deref())?)
        .map_err(|e| Fault::new(e.to_string()))?;
    let out: Box<dyn Write + Send> = match &l.log_path {
        Some(p) => open(p)?,
        None => Box::new(std::io::stderr()),
    };
    let target = Target(Arc::new(Mutex::new(out)));
    let (filter, filter_handle) = reload::Layer::new(filter);
    let fmt_layer = layer(l.show_level.unwrap_or(false), l.show_log_origin.unwrap_or(false), target.clone());
    let (fmt_layer, layer_handle) = reload::Layer::new(fmt_layer);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .try_init()
        .map_err(|e| Fault::new(format!("cannot set up the log: {e}")))?;
    let _ = HANDLES.set(Handles { filter: filter_handle, layer: layer_handle, target });
    Ok(())
}

/// `PUT /logger`: a new level, module filter, decorations or file, from now on.
pub fn configure(l: &Logger) -> Result<(), Fault> {
    let h = HANDLES.get().ok_or_else(|| Fault::new("the log is not set up"))?;
    if l.level.is_some() || l.module.is_some() {
        let f = EnvFilter::try_new(directive(l.level.as_deref().unwrap_or("Info"), l.module.as_deref())?)
            .map_err(|e| Fault::new(e.to_string()))?;
        h.filter.reload(f).map_err(|e| Fault::new(format!("cannot change the log level: {e}")))?;
    }
    if let Some(p) = &l.log_path {
        *h.target.0.locked() = open(p)?;
    }
    let new = layer(l.show_level.unwrap_or(false), l.show_log_origin.unwrap_or(false), h.target.clone());
    h.layer.reload(new).map_err(|e| Fault::new(format!("cannot change the log's decorations: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_firecrackers_in_any_case() {
        assert_eq!(directive("Warning", None).unwrap(), "warn");
        assert_eq!(directive("debug", Some("ember::vmm")).unwrap(), "off,ember::vmm=debug");
        assert!(directive("loud", None).unwrap_err().0.contains("Invalid log level"));
    }
}
