//! The log's writer: lines are appended to a shared buffer, and a background thread writes
//! what has gathered in one go, at most [`LINGER`] after the first line of a batch.
//!
//! A request therefore never waits on the log's write, and never wakes a thread either: the
//! writer thread is woken only by the first line after a write (and by a buffer grown past
//! [`HIGH_WATER`]), so at any request rate it wakes at most about `1 / LINGER` times a second,
//! and never while sluice is idle. (A channel with a wake-up per line, as
//! `tracing-appender` has, cost each request a futex wake-up and the writer thread's spinning
//! on two cores.)
//!
//! Lossless: when the output cannot keep up and the buffer reaches [`MAX_BUFFER`], the line's
//! writer writes the buffer itself, so the request waits rather than a line vanishes. Dropping
//! the [`LogGuard`] writes whatever is left.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the first line of a batch may wait for others before the batch is written.
pub const LINGER: Duration = Duration::from_millis(25);

/// A buffer this large is written at once, without waiting out the linger.
pub const HIGH_WATER: usize = 64 * 1024;

/// A buffer this large is written by the line's own writer (backpressure).
pub const MAX_BUFFER: usize = 4 * 1024 * 1024;

type Output = Box<dyn Write + Send>;

struct Shared {
    /// Lines not yet written.
    pending: Mutex<Pending>,
    /// Signals the writer thread: the first line of a batch, a full buffer, or closing.
    wake: Condvar,
    /// Held across taking the pending lines and writing them, so batches go out in order.
    output: Mutex<Output>,
    max_buffer: usize,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    closed: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves the buffer intact; keep logging.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Writes every pending line. Errors writing the log are dropped: there is nowhere left
    /// to report them.
    fn write_pending(&self) {
        let mut output = lock(&self.output);
        let lines = std::mem::take(&mut lock(&self.pending).lines);
        if !lines.is_empty() {
            let _ = output.write_all(&lines);
            let _ = output.flush();
        }
    }

    fn append(&self, line: &[u8]) {
        let mut pending = lock(&self.pending);
        let was_empty = pending.lines.is_empty();
        pending.lines.extend_from_slice(line);
        let len = pending.lines.len();
        drop(pending);
        if len >= self.max_buffer {
            self.write_pending();
        } else if was_empty || (len >= HIGH_WATER && len - line.len() < HIGH_WATER) {
            self.wake.notify_one();
        }
    }

    /// The writer thread: sleeps until a batch starts, lets it gather, writes it.
    fn run(&self) {
        loop {
            let mut pending = lock(&self.pending);
            while pending.lines.is_empty() && !pending.closed {
                pending = self
                    .wake
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if !pending.closed && pending.lines.len() < HIGH_WATER {
                pending = self
                    .wake
                    .wait_timeout_while(pending, LINGER, |p| {
                        !p.closed && p.lines.len() < HIGH_WATER
                    })
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            let closed = pending.closed;
            drop(pending);
            self.write_pending();
            if closed {
                return;
            }
        }
    }
}

/// Where the log's lines go: a cheap handle, cloned for each line (`tracing_subscriber`'s
/// `MakeWriter`).
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Keeps the writer thread running; dropping it writes the remaining lines and stops it.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchedWriter {
    /// Starts the writer thread for `output` (stderr, in sluice).
    pub fn new(output: impl Write + Send + 'static) -> io::Result<(Self, LogGuard)> {
        Self::with_max_buffer(output, MAX_BUFFER)
    }

    fn with_max_buffer(
        output: impl Write + Send + 'static,
        max_buffer: usize,
    ) -> io::Result<(Self, LogGuard)> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            output: Mutex::new(Box::new(output)),
            max_buffer,
        });
        let thread = std::thread::Builder::new()
            .name("sluice-log".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || shared.run()
            })?;
        Ok((
            Self {
                shared: Arc::clone(&shared),
            },
            LogGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Lines are written by the writer thread within `LINGER`; a caller that needs them
        // out now drops the guard.
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedWriter {
    type Writer = BatchedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Lines appended after the thread's last write (by other threads, while it stopped).
        self.shared.write_pending();
    }
}

#[cfg(test)]
// The writer is a plain thread, outside any runtime: its tests wait on the wall clock.
#[allow(clippy::disallowed_types)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An output that records what was written, and in how many writes.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut inner = self.0.lock().expect("test lock");
            inner.0.extend_from_slice(buf);
            inner.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("test lock").0.clone()).expect("test setup")
        }

        fn writes(&self) -> usize {
            self.0.lock().expect("test lock").1
        }
    }

    #[test]
    fn lines_from_many_threads_all_arrive_whole_and_in_each_threads_order() {
        let recorder = Recorder::default();
        let (writer, guard) = BatchedWriter::new(recorder.clone()).expect("test setup");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        writer
                            .write_all(format!("thread {t} line {i}\n").as_bytes())
                            .expect("test setup");
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("test setup");
        }
        drop(guard);
        let text = recorder.text();
        for t in 0..4 {
            let seen: Vec<usize> = text
                .lines()
                .filter_map(|line| line.strip_prefix(&format!("thread {t} line ")))
                .map(|i| i.parse().expect("test setup"))
                .collect();
            assert_eq!(seen, (0..2_000).collect::<Vec<_>>(), "thread {t}");
        }
        assert_eq!(text.lines().count(), 8_000);
        // 8,000 lines went out in batches, not a write each.
        assert!(recorder.writes() < 800, "{} writes", recorder.writes());
    }

    #[test]
    fn a_lone_line_is_written_after_the_linger_without_a_flush() {
        let recorder = Recorder::default();
        let (mut writer, _guard) = BatchedWriter::new(recorder.clone()).expect("test setup");
        writer.write_all(b"listening\n").expect("test setup");
        let start = Instant::now();
        while recorder.text().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5), "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(recorder.text(), "listening\n");
    }

    #[test]
    fn a_full_buffer_is_written_by_the_caller_and_nothing_is_lost() {
        /// An output that blocks until released, as a stalled stderr pipe does.
        struct Stalled(Arc<(Mutex<bool>, Condvar)>, Recorder);
        impl Write for Stalled {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let (released, cond) = &*self.0;
                let mut released = released.lock().expect("test lock");
                while !*released {
                    released = cond.wait(released).expect("test setup");
                }
                self.1.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let recorder = Recorder::default();
        let (writer, guard) =
            BatchedWriter::with_max_buffer(Stalled(Arc::clone(&gate), recorder.clone()), 100)
                .expect("test setup");
        let producer = std::thread::spawn({
            let mut writer = writer.clone();
            move || {
                for i in 0..50 {
                    writer
                        .write_all(format!("line {i:02}\n").as_bytes())
                        .expect("test setup");
                }
            }
        });
        // The writer thread and then the producer (past 100 bytes) block on the stalled output.
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !producer.is_finished(),
            "a full buffer must hold its writer back"
        );
        *gate.0.lock().expect("test lock") = true;
        gate.1.notify_all();
        producer.join().expect("test setup");
        drop(guard);
        let expected: String = (0..50).map(|i| format!("line {i:02}\n")).collect();
        assert_eq!(recorder.text(), expected);
    }
}
