//! Typed, bounded waits for the cluster tests: every wait names what it
//! waits for and gives up after its timeout with a [`WaitError`] saying so
//! (and what it saw last). Test files wait through these (or through
//! openraft's `wait()` API); none of them polls by hand.

use std::future::Future;
use std::time::{Duration, Instant};

/// A wait that ran out of time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitError {
    /// What was awaited.
    pub what: String,
    /// How long it was awaited.
    pub timeout: Duration,
    /// What was seen last, if anything.
    pub last: Option<String>,
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: not reached within {:?}", self.what, self.timeout)?;
        if let Some(last) = &self.last {
            write!(f, " (last: {last})")?;
        }
        Ok(())
    }
}

impl std::error::Error for WaitError {}

impl WaitError {
    pub fn new(what: impl Into<String>, timeout: Duration, last: Option<String>) -> Self {
        WaitError {
            what: what.into(),
            timeout,
            last,
        }
    }
}

const POLL: Duration = Duration::from_millis(20);

/// Asks `probe` until it answers `Ok` (what was awaited) or `timeout`
/// passes; `Err` answers say what was seen instead.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(v) => return Ok(v),
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            return Err(WaitError::new(what, timeout, Some(last)));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`until`] for probes that block (child processes, command lines).
pub fn until_blocking<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, WaitError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe() {
            Ok(v) => return Ok(v),
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            return Err(WaitError::new(what, timeout, Some(last)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
