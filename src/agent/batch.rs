//! Group commit of the agent's audit events.
//!
//! Connection threads hand their events to one writer thread. It takes everything
//! waiting, appends it in one durable transaction, and wakes the threads whose events
//! were in it; events that arrive meanwhile go into the next commit. A `durable` read
//! answers only once its batch committed (and fails if the commit failed), so the
//! cost of a commit is shared by every read waiting for it rather than paid per read.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rustix::thread::futex;

use crate::audit::AuditRecord;
use crate::error::{Error, Result};

/// Where the writer commits: the agent's guard of the moment (`None` in lockdown).
pub(crate) type Sink = Arc<dyn Fn(&[AuditRecord]) -> Option<Result<()>> + Send + Sync>;

/// Work the writer thread does on a timer between commits (the agent folds its read
/// journal into the store), with its period.
pub(crate) type Tick = (Duration, Box<dyn Fn() + Send + Sync>);

/// One batch: its outcome once committed, behind a futex word its waiters sleep on.
///
/// A waiter learns its outcome here without the queue's lock, and one `FUTEX_WAKE`
/// makes every waiter of a commit runnable at once. With a condition variable they
/// took the queue lock one after the other, each woken by the one before, and on two
/// cores under load every hop of that chain waited for the scheduler: a 32-client
/// read load gathered 8.7 events per commit, where now it gathers 16 to 18
/// (docs/DESIGN-NOTES.md, "The agent").
#[derive(Default)]
pub(crate) struct Batch {
    outcome: OnceLock<std::result::Result<(), String>>,
    /// 0 until `outcome` is set, then 1.
    done: AtomicU32,
}

impl Batch {
    fn finish(&self, outcome: std::result::Result<(), String>) {
        let _ = self.outcome.set(outcome);
        self.done.store(1, Ordering::Release);
        // Nothing to do if it fails: a waiter also wakes at its deadline.
        // The count is an int to the kernel: i32::MAX is "all".
        let _ = futex::wake(&self.done, futex::Flags::PRIVATE, i32::MAX as u32);
    }

    fn outcome(&self) -> Option<&std::result::Result<(), String>> {
        (self.done.load(Ordering::Acquire) == 1).then(|| self.outcome.get()).flatten()
    }
}

struct Queue {
    pending: Vec<AuditRecord>,
    /// The batch `pending` will be committed as.
    batch: Arc<Batch>,
    /// A commit is running (outside the lock).
    committing: bool,
    stop: bool,
    stats: Stats,
}

/// What the writer has done so far (the agent's `stats` reports it).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Stats {
    /// Commits run (failed ones included).
    pub commits: u64,
    /// Commits that failed (or found the agent in lockdown).
    pub failed: u64,
    /// Events they carried.
    pub events: u64,
    /// Events of the largest commit.
    pub largest: u64,
    /// Time spent committing, microseconds.
    pub commit_us: u64,
}

/// The queue and its writer thread.
pub(crate) struct Batcher {
    queue: Mutex<Queue>,
    /// Wakes the writer (an event queued, or stop).
    work: Condvar,
    /// Wakes `stop` when a commit ends.
    idle: Condvar,
    linger: Duration,
    /// Longest wait for a commit: a stalled writer fails reads, never hangs them.
    patience: Duration,
}

impl Batcher {
    /// A batcher whose writer thread commits through `sink`, waiting up to `linger`
    /// after the first event of a batch for more; a waiter gives up after `patience`.
    /// `tick`: run every so often between commits, busy or idle.
    pub(crate) fn start(sink: Sink, linger: Duration, patience: Duration, tick: Option<Tick>) -> Result<Arc<Batcher>> {
        let b = Arc::new(Batcher {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                batch: Arc::default(),
                committing: false,
                stop: false,
                stats: Stats::default(),
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
            linger,
            patience,
        });
        let w = b.clone();
        std::thread::Builder::new()
            .name("agent-audit".into())
            .spawn(move || w.run(&*sink, tick.as_ref()))
            .map_err(|e| Error::Io { operation: "starting the audit writer", path: "-".into(), source: e })?;
        Ok(b)
    }

    /// Queues `e`; the batch it will be committed in (after a stop, one that has
    /// already failed: nothing queued then is committed).
    pub(crate) fn push(&self, e: AuditRecord) -> Arc<Batch> {
        let mut q = self.queue.lock();
        if q.stop {
            // The writer may have gone: nothing queued now is committed.
            let b = Batch::default();
            b.finish(Err("the agent is stopping".into()));
            return Arc::new(b);
        }
        q.pending.push(e);
        self.work.notify_one();
        q.batch.clone()
    }

    /// Waits until `batch` is committed; its error if it failed, or if the writer
    /// stopped before it.
    pub(crate) fn wait(&self, batch: &Batch) -> Result<()> {
        let not_committed = |why: &str| Error::Io {
            operation: "committing the audit event of this request",
            path: "the audit trail".into(),
            source: std::io::Error::other(why.to_string()),
        };
        let until = Instant::now() + self.patience;
        loop {
            match batch.outcome() {
                Some(Ok(())) => return Ok(()),
                Some(Err(why)) => return Err(not_committed(why)),
                None => {}
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(not_committed("the audit writer did not finish in time"));
            }
            // Sleeps only while `done` is still 0; a wake, a timeout, a signal or a
            // changed word all come back here to look again.
            let slice = futex::Timespec::try_from(left.min(Duration::from_secs(1)))
                .unwrap_or(futex::Timespec { tv_sec: 1, tv_nsec: 0 });
            let _ = futex::wait(&batch.done, futex::Flags::PRIVATE, 0, Some(&slice));
        }
    }

    /// The writer's figures so far.
    pub(crate) fn stats(&self) -> Stats {
        self.queue.lock().stats
    }

    /// Queues `e` and waits for its commit.
    pub(crate) fn record(&self, e: AuditRecord) -> Result<()> {
        let b = self.push(e);
        self.wait(&b)
    }

    /// Stops taking events: a push from now on gets a failed batch at once, while what
    /// was queued before is still committed and its waiters hear how it went. Returns
    /// when nothing is queued or being committed (or after ten seconds); the writer
    /// thread ends on its own.
    pub(crate) fn stop(&self) {
        let mut q = self.queue.lock();
        q.stop = true;
        self.work.notify_all();
        let until = Instant::now() + Duration::from_secs(10);
        while (!q.pending.is_empty() || q.committing) && Instant::now() < until {
            self.idle.wait_for(&mut q, Duration::from_millis(100));
        }
    }

    fn run(&self, sink: &(dyn Fn(&[AuditRecord]) -> Option<Result<()>> + Send + Sync), tick: Option<&Tick>) {
        let mut ticked = Instant::now();
        loop {
            if let Some((every, work)) = tick
                && ticked.elapsed() >= *every
            {
                // A panic in the fold is caught: the writer must outlive it, or every
                // durable read would wait out its patience from then on.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
                    tracing::error!("the audit writer's periodic work panicked");
                }
                ticked = Instant::now();
            }
            let mut q = self.queue.lock();
            while q.pending.is_empty() && !q.stop {
                match tick {
                    None => self.work.wait(&mut q),
                    Some((every, _)) => {
                        let due = ticked + *every;
                        if Instant::now() >= due {
                            break;
                        }
                        self.work.wait_until(&mut q, due);
                    }
                }
            }
            if q.pending.is_empty() && q.stop {
                self.idle.notify_all();
                return;
            }
            if q.pending.is_empty() {
                // The tick is due, and nothing waits.
                continue;
            }
            if !q.stop && !self.linger.is_zero() {
                // Let the events of a burst gather for `linger`; a commit costs the
                // same for one. Pushes wake this wait, so it loops to the deadline.
                let until = Instant::now() + self.linger;
                while !q.stop && !self.work.wait_until(&mut q, until).timed_out() {}
            }
            let batch = std::mem::take(&mut q.batch);
            let events = std::mem::take(&mut q.pending);
            q.committing = true;
            drop(q);
            let started = Instant::now();
            // A panic in the sink fails this batch's reads instead of ending the writer.
            let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(&events)));
            let outcome = match committed {
                Ok(Some(r)) => r,
                Ok(None) => Err(Error::Locked),
                Err(_) => Err(Error::Io {
                    operation: "committing audit events",
                    path: "the audit trail".into(),
                    source: std::io::Error::other("the audit writer panicked"),
                }),
            };
            let took = started.elapsed();
            if let Err(e) = &outcome {
                tracing::error!(error = %e, events = events.len(), "audit events were not committed");
            }
            let failed = outcome.is_err();
            batch.finish(outcome.map_err(|e| e.to_string()));
            let mut q = self.queue.lock();
            q.committing = false;
            let n = events.len() as u64;
            let st = &mut q.stats;
            st.commits += 1;
            st.failed += u64::from(failed);
            st.events += n;
            st.largest = st.largest.max(n);
            st.commit_us = st.commit_us.saturating_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
            self.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn one_commit_serves_every_waiting_event_and_failures_reach_their_waiters() {
        let commits = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, f) = (commits.clone(), fail.clone());
        let sink: Sink = Arc::new(move |events: &[AuditRecord]| {
            assert!(!events.is_empty());
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            Some(if f.load(Ordering::SeqCst) { Err(Error::Config("disk on fire".into())) } else { Ok(()) })
        });
        let b = Batcher::start(sink, Duration::from_millis(5), Duration::from_secs(10), None).unwrap();
        std::thread::scope(|s| {
            for _ in 0..32 {
                s.spawn(|| b.record(AuditRecord { op: "get".into(), ..Default::default() }).unwrap());
            }
        });
        let n = commits.load(Ordering::SeqCst);
        assert!((1..=8).contains(&n), "32 events took {n} commits");
        fail.store(true, Ordering::SeqCst);
        let e = b.record(AuditRecord::default()).unwrap_err().to_string();
        assert!(e.contains("disk on fire"), "{e}");
        // A writer that stalls fails its waiters after their patience, never hangs them.
        let stall: Sink = Arc::new(|_: &[AuditRecord]| {
            std::thread::sleep(Duration::from_millis(500));
            Some(Ok(()))
        });
        let slow = Batcher::start(stall, Duration::ZERO, Duration::from_millis(100), None).unwrap();
        let t = std::time::Instant::now();
        assert!(slow.record(AuditRecord::default()).is_err());
        assert!(t.elapsed() < Duration::from_millis(400));
        fail.store(false, Ordering::SeqCst);
        b.record(AuditRecord::default()).unwrap();
        // A stop commits what is queued before it, and its waiters hear so; what
        // comes after is refused at once.
        let queued: Vec<_> = (0..4).map(|_| b.push(AuditRecord::default())).collect();
        b.stop();
        for q in &queued {
            b.wait(q).unwrap();
        }
        let t = std::time::Instant::now();
        let e = b.record(AuditRecord::default()).unwrap_err().to_string();
        assert!(e.contains("stopping") && t.elapsed() < Duration::from_millis(100), "{e}");
    }

    #[test]
    fn a_panicking_commit_fails_its_reads_and_the_writer_goes_on() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let sink: Sink = Arc::new(move |_: &[AuditRecord]| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a bug in the sink");
            }
            Some(Ok(()))
        });
        let b = Batcher::start(sink, Duration::ZERO, Duration::from_secs(10), None).unwrap();
        let e = b.record(AuditRecord::default()).unwrap_err().to_string();
        assert!(e.contains("panicked"), "{e}");
        b.record(AuditRecord::default()).unwrap();
        b.stop();
    }

    #[test]
    fn a_linger_gathers_a_burst_into_one_commit() {
        let commits = Arc::new(AtomicUsize::new(0));
        let c = commits.clone();
        let sink: Sink = Arc::new(move |_: &[AuditRecord]| {
            c.fetch_add(1, Ordering::SeqCst);
            Some(Ok(()))
        });
        let b = Batcher::start(sink, Duration::from_millis(300), Duration::from_secs(10), None).unwrap();
        // Four events 20 ms apart: inside one linger, though each push wakes the writer.
        let batches: Vec<_> = (0..4)
            .map(|_| {
                let p = b.push(AuditRecord::default());
                std::thread::sleep(Duration::from_millis(20));
                p
            })
            .collect();
        for p in &batches {
            b.wait(p).unwrap();
        }
        assert_eq!(commits.load(Ordering::SeqCst), 1);
        b.stop();
    }

    #[test]
    fn the_tick_runs_when_idle_and_when_busy() {
        let ticks = Arc::new(AtomicUsize::new(0));
        let t = ticks.clone();
        let tick: Tick = (
            Duration::from_millis(20),
            Box::new(move || {
                t.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let sink: Sink = Arc::new(|_: &[AuditRecord]| {
            std::thread::sleep(Duration::from_millis(2));
            Some(Ok(()))
        });
        let b = Batcher::start(sink, Duration::ZERO, Duration::from_secs(10), Some(tick)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let idle = ticks.load(Ordering::SeqCst);
        assert!(idle >= 3, "idle for 200 ms with a 20 ms tick: {idle} ticks");
        // Busy: an event always waiting, the tick still comes.
        let until = std::time::Instant::now() + Duration::from_millis(200);
        while std::time::Instant::now() < until {
            b.record(AuditRecord::default()).unwrap();
        }
        assert!(ticks.load(Ordering::SeqCst) >= idle + 3, "the tick starved under load");
        b.stop();
    }
}
