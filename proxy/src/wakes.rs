//! How a task that drives a connection is woken: what the connection itself waits for wakes
//! one waker, and the connection's rarer events (keep-alive PINGs, the peer's trust, drain,
//! timers) wake another that marks them, so that each poll looks at those only when one fired.
//! A `select!` over the same futures polls every branch on every wake: on a connection that
//! carries a call every few hundred microseconds, that is most of its polls (benches/RESULTS.md,
//! "The provider's HTTP/2 server on h2" and "Connections polled for what woke them").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// A connection task polling, not polling, or polling and woken meanwhile ([`Wakes`]).
const IDLE: u8 = 0;
const POLLING: u8 = 1;
const AGAIN: u8 = 2;

/// The two wakers of a task that drives a connection (see the module docs). A wake while the
/// task is polling does not schedule the task again: the poll goes round once more instead. On
/// the HTTP/2 server ([`crate::serve::connection_h2`]), each call's answer queues frames, which
/// wakes the connection, and the same poll then writes them; without this, every call would
/// cost the task a second, empty poll.
pub(crate) struct Wakes {
    state: Arc<AtomicU8>,
    rare_fired: Arc<AtomicBool>,
    task: Arc<AtomicWaker>,
    main: Waker,
    rare: Waker,
}

struct MainWake {
    state: Arc<AtomicU8>,
    task: Arc<AtomicWaker>,
}

impl MainWake {
    fn wake_task(&self) {
        let mut now = self.state.load(Ordering::Acquire);
        loop {
            match now {
                IDLE => return self.task.wake(),
                AGAIN => return,
                _ => match self.state.compare_exchange_weak(
                    POLLING,
                    AGAIN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return,
                    Err(actual) => now = actual,
                },
            }
        }
    }
}

impl Wake for MainWake {
    fn wake(self: Arc<Self>) {
        self.wake_task();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_task();
    }
}

struct RareWake {
    fired: Arc<AtomicBool>,
    main: MainWake,
}

impl Wake for RareWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.main.wake_task();
    }
}

impl Wakes {
    pub(crate) fn new() -> Self {
        let state = Arc::new(AtomicU8::new(IDLE));
        let task = Arc::new(AtomicWaker::new());
        // Fired at first, so that every event is polled once and registers.
        let rare_fired = Arc::new(AtomicBool::new(true));
        let main = || MainWake {
            state: state.clone(),
            task: task.clone(),
        };
        Self {
            main: Waker::from(Arc::new(main())),
            rare: Waker::from(Arc::new(RareWake {
                fired: rare_fired.clone(),
                main: main(),
            })),
            state,
            rare_fired,
            task,
        }
    }

    /// Polls `work` with the connection's waker (and, when an event fired, the events'
    /// context) until it is ready or nothing woke it meanwhile; a bounded number of rounds, so
    /// that a busy connection still yields to the other tasks. The events' context is given on
    /// the first round, so that each event is polled once and registers.
    pub(crate) fn poll(
        &self,
        cx: &mut Context<'_>,
        mut work: impl FnMut(&mut Context<'_>, Option<&mut Context<'_>>) -> Poll<()>,
    ) -> Poll<()> {
        self.task.register(cx.waker());
        self.state.store(POLLING, Ordering::Release);
        let mut main = Context::from_waker(&self.main);
        let mut rare = Context::from_waker(&self.rare);
        for _ in 0..8 {
            let fired = self.rare_fired.swap(false, Ordering::AcqRel);
            if work(&mut main, fired.then_some(&mut rare)).is_ready() {
                return Poll::Ready(());
            }
            if !self.rare_fired.load(Ordering::Acquire)
                && self
                    .state
                    .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Poll::Pending;
            }
            self.state.store(POLLING, Ordering::Release);
        }
        self.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Marks the task as polling again: a wake from here on makes [`Wakes::poll`] go round once
    /// more. For `work` that first polls what others queued (their wakes so far are then
    /// already served).
    pub(crate) fn rearm(&self) {
        self.state.store(POLLING, Ordering::Release);
    }
}
