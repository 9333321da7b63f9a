//! What goes wrong in a cup command, by kind: the command line, reaching
//! the machine, what the API answered, a file, a download, a workload's
//! run. main prints it once, as `cup: ...`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CupError {
    /// The command line is wrong: what, and how it should read.
    #[error("{0}")]
    Usage(String),
    /// init or vmmd could not be reached.
    #[error("{}", steelcup_sys::error_chain(.0))]
    Client(#[from] steelcup_api::ClientError),
    /// A call failed: the API's own description when it refused it.
    #[error("{}", api_text(.0))]
    Api(#[from] zbus::Error),
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{url}: {why}")]
    Download { url: String, why: String },
    /// A workload's run could not be followed to its end (and how it
    /// ended, when vmmd knows).
    #[error("{name}: {why}")]
    Workload { name: String, why: String },
    /// An image archive's transfer to or from the machine failed.
    #[error("{what}: {why}")]
    Transfer { what: &'static str, why: String },
    #[error("no workload named {0:?} (see `cup ps`)")]
    NoWorkload(String),
    #[error("workload {name:?} is {state}, not running; `cup logs {name}` shows its output, `cup start {name}` runs it again")]
    NotRunning { name: String, state: String },
    #[error("no workload named {0:?} (see `cup ps`; a unit's log is `cup logs --unit {0}`)")]
    NoWorkloadLog(String),
    /// A thread of cup's own died (a bug).
    #[error("{0} thread failed")]
    Thread(&'static str),
}

/// A refused call's own description (vmmd's and init's errors carry the
/// reason there), else zbus's text.
fn api_text(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(_, Some(desc), _) => desc.clone(),
        other => other.to_string(),
    }
}

impl CupError {
    /// An I/O error on `path` while doing `what`.
    pub fn file(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> CupError {
        let path = path.to_path_buf();
        move |source| CupError::File { what, path, source }
    }
}

/// A usage error, written like `format!`.
macro_rules! usage {
    ($($t:tt)*) => {
        $crate::error::CupError::Usage(format!($($t)*))
    };
}
pub(crate) use usage;
