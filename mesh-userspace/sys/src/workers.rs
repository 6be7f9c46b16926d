//! The node daemon's worker threads: each runs its own single-threaded
//! tokio runtime, and a connection accepted on the daemon's main thread is
//! handed to one of them once, with everything it then opens (its tunnel
//! streams, its pooled tunnel connection, its L7 tasks). A connection's
//! bytes are read, proxied and written on one thread, with no wakeups
//! between threads, as Envoy's workers do; the work-stealing runtime moves
//! tasks between threads and wakes idle workers for each event, which
//! costs latency at a few thousand requests per second.
//!
//! The workers are installed once per process ([`install`]), as a runtime
//! is; where none are installed (one worker, unit tests) [`spawn_with`]
//! runs on the caller's runtime.

use std::{
    cell::Cell,
    future::Future,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{net::TcpStream, runtime::Handle};

static WORKERS: OnceLock<Workers> = OnceLock::new();

thread_local! {
    /// This thread's worker index, on a worker thread.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

struct Workers {
    handles: Vec<Handle>,
    /// Round robin over the workers.
    next: AtomicUsize,
}

/// Starts `count` worker threads for this process (none for 1: the
/// caller's runtime carries connections, as before there were workers).
/// Once per process; a second call changes nothing.
pub fn install(count: usize) -> std::io::Result<()> {
    if count <= 1 || WORKERS.get().is_some() {
        return Ok(());
    }
    let mut handles = Vec::with_capacity(count);
    for index in 0..count {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("lacewing-w{index}"))
            .spawn(move || {
                INDEX.set(Some(index));
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = tx.send(Err(err));
                        return;
                    }
                };
                let _ = tx.send(Ok(runtime.handle().clone()));
                // Runs its connections until the process exits.
                runtime.block_on(std::future::pending::<()>());
            })?;
        let handle = rx.recv().map_err(std::io::Error::other)??;
        handles.push(handle);
    }
    let _ = WORKERS.set(Workers {
        handles,
        next: AtomicUsize::new(0),
    });
    Ok(())
}

/// Worker threads carrying connections: what [`install`] started, else 1
/// (the caller's runtime).
pub fn count() -> usize {
    WORKERS.get().map_or(1, |w| w.handles.len())
}

/// The worker this thread is (0 off the worker threads): per-worker state,
/// such as pooled tunnel connections, is kept apart by it.
pub fn current() -> usize {
    INDEX.get().unwrap_or(0)
}

/// Spawns `make()`'s task on every worker thread (none without workers):
/// for per-thread upkeep, such as handing back a thread's cached memory,
/// which only that thread can do.
pub fn spawn_on_each<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if let Some(workers) = WORKERS.get() {
        for handle in &workers.handles {
            handle.spawn(make());
        }
    }
}

/// Runs `serve(stream)` on the next worker: the socket leaves this thread's
/// reactor and joins the worker's, so its readiness wakes only that
/// worker. Without workers it is spawned here. A socket that cannot be
/// moved (the kernel refused it) is closed and logged.
pub fn spawn_with<F, Fut>(stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(workers) = WORKERS.get() else {
        tokio::spawn(serve(stream));
        return;
    };
    let std = match stream.into_std() {
        Ok(std) => std,
        Err(err) => {
            tracing::warn!(%err, "handing a connection to a worker");
            return;
        }
    };
    let i = workers.next.fetch_add(1, Ordering::Relaxed) % workers.handles.len();
    workers.handles[i].spawn(async move {
        match TcpStream::from_std(std) {
            Ok(stream) => serve(stream).await,
            Err(err) => tracing::warn!(%err, "a worker taking a connection"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two workers: connections alternate between them, each served on its
    // worker's thread with its socket working there; upkeep runs on both.
    #[test]
    fn connections_are_served_on_the_workers_in_turn() {
        install(2).unwrap();
        assert_eq!(count(), 2);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for _ in 0..4 {
                let mut client = TcpStream::connect(addr).await.unwrap();
                let (accepted, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                spawn_with(accepted, move |mut s| async move {
                    let mut byte = [0u8; 1];
                    s.read_exact(&mut byte).await.unwrap();
                    s.write_all(&[byte[0] + 1]).await.unwrap();
                    tx.send((current(), std::thread::current().name().map(str::to_owned)))
                        .unwrap();
                });
                client.write_all(&[7]).await.unwrap();
                let mut back = [0u8; 1];
                client.read_exact(&mut back).await.unwrap();
                assert_eq!(back, [8]);
            }
            let mut served = Vec::new();
            for _ in 0..4 {
                served.push(rx.recv().await.unwrap());
            }
            assert_eq!(
                served,
                [0, 1, 0, 1]
                    .map(|i| (i, Some(format!("lacewing-w{i}"))))
                    .to_vec()
            );
            // Upkeep spawned on each worker runs once on every one.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            spawn_on_each(|| {
                let tx = tx.clone();
                async move { tx.send(current()).unwrap() }
            });
            drop(tx);
            let mut ran = Vec::new();
            while let Some(worker) = rx.recv().await {
                ran.push(worker);
            }
            ran.sort_unstable();
            assert_eq!(ran, [0, 1]);
        });
    }
}
