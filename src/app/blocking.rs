//! The one way async code runs blocking work: store and keyring calls (sled reads and writes,
//! fsyncs), index loads and searches, statvfs. It goes to tokio's blocking pool, so an async
//! worker is never held up by a disk, and it works on any runtime (unlike `block_in_place`,
//! which panics on a current-thread one).

use crate::error::ApiError;

/// Runs `work` on the blocking pool and waits for it without holding an async worker.
pub async fn blocking<T, F>(work: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work).await.map_err(|error| {
        ApiError::Internal(anyhow::anyhow!("a blocking task did not finish: {error}"))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_works_on_a_current_thread_runtime_and_passes_errors_through() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let value = runtime.block_on(blocking(|| Ok::<_, ApiError>(7))).unwrap();
        assert_eq!(value, 7);
        let error = runtime
            .block_on(blocking(|| Err::<(), _>(ApiError::NotReady)))
            .unwrap_err();
        assert_eq!(error.code(), "not_ready");
        let panicked = runtime
            .block_on(blocking(|| -> Result<(), ApiError> { panic!("boom") }))
            .unwrap_err();
        assert_eq!(panicked.code(), "internal");
    }
}
