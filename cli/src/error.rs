//! Exit codes scripts can rely on: 0 success, 1 failure (or unhealthy),
//! 2 bad usage or invalid input.

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

/// The exit code for an error.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<InvalidInput>().is_some() {
        2
    } else {
        1
    }
}
