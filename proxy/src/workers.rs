//! The proxy's worker threads: one scheduler per thread, each accepting on its own handle to the
//! outbound and inbound listeners and keeping its own connections to peers and to the agent, as
//! nginx's worker processes do. A call stays on the thread that accepted its connection, from
//! its first byte to its response.
//!
//! A multi-thread scheduler moved halves of calls between CPUs instead: when a peer connection's
//! task woke the task waiting for its response while the worker's next-task slot was taken,
//! tokio woke the idle worker to steal it, at two `futex` wake-ups and one more context switch
//! per call, and about a third more CPU (benches/RESULTS.md, "A thread per worker").
//!
//! With one worker, the main thread (number 0) is that worker and runs everything else too.
//! With more, workers 1..=n are threads of their own and the main thread keeps to the
//! control-plane stream, the admin listener and the other background work, off the request
//! path. Per-worker state is an array of n + 1 indexed by [`index`] (entry 0 for the main
//! thread).

use std::cell::Cell;
use std::future::Future;

use tokio::sync::oneshot;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// This thread's worker number: 0 on the main thread, and on any thread that is not a worker.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// The item of `per_worker` (made by [`per_worker`]) that belongs to this thread: entry
/// [`index`], else (a thread that is not a worker of that array) entry 0.
///
/// # Panics
/// When `per_worker` is empty.
pub fn mine<T>(per_worker: &[T]) -> &T {
    per_worker.get(index()).unwrap_or(&per_worker[0])
}

/// One `T` for each of `workers` workers and for the main thread: what [`mine`] picks from.
pub fn per_worker<T>(workers: usize, make: impl FnMut(usize) -> T) -> Box<[T]> {
    (0..=workers.max(1)).map(make).collect()
}

/// How many workers the proxy runs: `TOKIO_WORKER_THREADS` when set, else one per CPU this
/// process may use (a bad value is reported, naming the variable, and the default applies).
pub fn count() -> usize {
    capmesh_client::process::worker_threads_from_env()
}

/// Starts worker `index` (1 or more) on a thread of its own named `worker-<index>` (as `top -H`
/// shows it), with a single-thread scheduler,
/// running the future `work` makes there (made on that thread, so the sockets it opens register
/// with that thread's scheduler). The receiver resolves when the work has ended, and fails if
/// it panicked.
pub fn spawn<F, Fut>(index: usize, work: F) -> std::io::Result<oneshot::Receiver<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("worker-{index}"))
        .spawn(move || {
            INDEX.with(|i| i.set(index));
            runtime.block_on(work());
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_worker_runs_on_its_own_thread_and_knows_its_number() {
        assert_eq!(index(), 0);
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let done = spawn(3, move || async move {
            // The scheduler is the worker's own: a task spawned here runs on this thread.
            let here = std::thread::current().id();
            let spawned = tokio::spawn(async move { (index(), std::thread::current().id()) });
            let (n, there) = spawned.await.unwrap();
            let items = per_worker(3, |i| i * 10);
            let outside = *mine(&items[..2]);
            seen_tx
                .send((n, here == there, *mine(&items), outside))
                .unwrap();
        })
        .unwrap();
        done.await.unwrap();
        let (n, same_thread, item, outside) = seen_rx.recv().unwrap();
        assert_eq!(n, 3);
        assert!(same_thread);
        assert_eq!(item, 30);
        assert_eq!(outside, 0);
        assert_eq!(index(), 0);
        assert_eq!(*mine(&per_worker(3, |i| i * 10)), 0);
    }
}
