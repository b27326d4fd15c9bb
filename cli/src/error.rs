//! Exit codes scripts can rely on: 0 success (a closed standard output
//! included), 1 failure (or unhealthy), 2 bad usage or invalid input, 130
//! interrupted by a signal.

/// The input was wrong (bad event, bad fixture line with `--strict`,
/// unknown service): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// The command ran but found something wrong (e.g. `status` saw dead
/// letters): exit code 1, its report already printed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unhealthy(pub String);

/// Ctrl-C or SIGTERM stopped a command before its end (after it cleaned
/// up): exit code 130, as shells report a SIGINT.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// The exit code for an error.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<InvalidInput>().is_some() {
        2
    } else if e.downcast_ref::<Interrupted>().is_some() {
        130
    } else if e.downcast_ref::<crate::output::ClosedPipe>().is_some() {
        0
    } else {
        1
    }
}
