//! Adaptive coalescing of single checks into one `/batch-check`, with no timer window.
//!
//! Owns: [`Coalescer`]. While fewer than `limit` requests are in flight a check is sent at
//! once (at low load nothing waits); once `limit` are in flight, new checks queue, and when a
//! request returns, the queued checks (up to `max_batch`, one consistency) go out together as
//! one request. A `/batch-check` of N costs OpenFGA much less CPU than N `/check` calls
//! (BENCHMARKS.md, "OpenFGA miss path (session 4)"), so under load OpenFGA answers more
//! checks per second, and the wait is never longer than one request already in flight.
//!
//! Invariants: every queued check gets exactly its own answer (answers are matched by
//! position, never by question, so two equal questions cannot swap); an error of one check
//! in a batch fails only that check, a failed request fails every check in it with the same
//! error; a waiter that gives up (its future dropped) is skipped or its answer discarded,
//! and costs the others nothing; the in-flight count is held by a [`Slot`] guard, so a
//! cancelled sender still frees its slot and the queue moves on.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use tracing::Instrument as _;

use crate::authz::{BackendError, CheckQuery};

/// Sends one request for some checks of one consistency (`/check` for one, `/batch-check`
/// for several) and returns one answer per check, in order. A failed request is that
/// error for every check.
pub(super) trait SendChecks: Send + Sync + 'static {
    fn send<'a>(
        &'a self,
        queries: &'a [CheckQuery],
    ) -> impl Future<Output = Vec<Result<bool, BackendError>>> + Send + 'a;
}

pub(super) struct Coalescer<S> {
    shared: Arc<Shared<S>>,
}

struct Shared<S> {
    sender: S,
    /// Requests in flight before checks queue; 0: never queue.
    limit: usize,
    max_batch: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    queue: VecDeque<Waiter>,
}

struct Waiter {
    query: CheckQuery,
    /// The check's span, so the batch request that carries it is traced under a check.
    span: tracing::Span,
    answer: oneshot::Sender<Result<bool, BackendError>>,
}

/// One request in flight. Dropping it (the request returned, or its sender was cancelled)
/// hands the slot to the next queued checks, or frees it when none wait.
struct Slot<S: SendChecks>(Arc<Shared<S>>);

// === impl Coalescer ===

impl<S: SendChecks> Coalescer<S> {
    pub(super) fn new(sender: S, limit: usize, max_batch: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                sender,
                limit,
                max_batch: max_batch.max(1),
                state: Mutex::new(State::default()),
            }),
        }
    }

    pub(super) fn sender(&self) -> &S {
        &self.shared.sender
    }

    /// One check: sent now if a slot is free, else queued for the next batch.
    pub(super) async fn check(&self, query: &CheckQuery) -> Result<bool, BackendError> {
        let queued = {
            let mut state = self.shared.lock();
            if self.shared.limit == 0 || state.in_flight < self.shared.limit {
                state.in_flight += 1;
                None
            } else {
                let (answer, receiver) = oneshot::channel();
                state.queue.push_back(Waiter {
                    query: query.clone(),
                    span: tracing::Span::current(),
                    answer,
                });
                Some(receiver)
            }
        };
        match queued {
            None => {
                let _slot = Slot(Arc::clone(&self.shared));
                let answers = self.shared.sender.send(std::slice::from_ref(query)).await;
                answers.into_iter().next().unwrap_or_else(|| {
                    Err(BackendError::Unavailable(
                        "OpenFGA answered no check".into(),
                    ))
                })
            }
            // The sender is dropped only if its batch task is (the runtime is stopping).
            Some(receiver) => receiver.await.unwrap_or_else(|_| {
                Err(BackendError::Unavailable(
                    "OpenFGA check abandoned: the runtime is stopping".into(),
                ))
            }),
        }
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }
}

// === impl Shared ===

impl<S: SendChecks> Shared<S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent between statements (no user code runs under the lock).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next batch: the oldest waiting check's consistency, up to `max_batch` checks of
    /// it in arrival order; waiters that gave up are dropped on the way.
    fn take_batch(&self, state: &mut State) -> Vec<Waiter> {
        state.queue.retain(|w| !w.answer.is_closed());
        let Some(consistency) = state.queue.front().map(|w| w.query.consistency) else {
            return Vec::new();
        };
        let mut batch = Vec::new();
        let mut rest = VecDeque::with_capacity(state.queue.len());
        for waiter in state.queue.drain(..) {
            if batch.len() < self.max_batch && waiter.query.consistency == consistency {
                batch.push(waiter);
            } else {
                rest.push_back(waiter);
            }
        }
        state.queue = rest;
        batch
    }
}

/// Sends one batch of queued checks and gives each waiter its own answer.
async fn send_batch<S: SendChecks>(slot: Slot<S>, batch: Vec<Waiter>) {
    let (queries, answers): (Vec<CheckQuery>, Vec<_>) =
        batch.into_iter().map(|w| (w.query, w.answer)).unzip();
    let mut results = slot.0.sender.send(&queries).await.into_iter();
    for answer in answers {
        let result = results.next().unwrap_or_else(|| {
            Err(BackendError::Unavailable(
                "OpenFGA answered fewer checks than asked".into(),
            ))
        });
        // Err: that waiter gave up; nobody else's answer depends on it.
        let _ = answer.send(result);
    }
    drop(slot);
}

// === impl Slot ===

impl<S: SendChecks> Drop for Slot<S> {
    fn drop(&mut self) {
        let shared = &self.0;
        let batch = {
            let mut state = shared.lock();
            let batch = shared.take_batch(&mut state);
            if batch.is_empty() {
                state.in_flight -= 1;
            }
            batch
        };
        let Some(first) = batch.first() else { return };
        let span = first.span.clone();
        match tokio::runtime::Handle::try_current() {
            // The slot moves on to the batch's task.
            Ok(runtime) => {
                let slot = Slot(Arc::clone(shared));
                runtime.spawn(send_batch(slot, batch).instrument(span));
            }
            // No runtime to send from (a process shutting down): the waiters hear so, and
            // their dropped senders wake them.
            Err(_) => {
                shared.lock().in_flight -= 1;
                for waiter in batch {
                    let _ = waiter.answer.send(Err(BackendError::Unavailable(
                        "OpenFGA check abandoned: no runtime".into(),
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::authz::{Consistency, TupleKey};

    fn q(object: &str) -> CheckQuery {
        CheckQuery {
            tuple: TupleKey {
                user: "user:alice".into(),
                relation: "executor".into(),
                object: object.into(),
            },
            contextual: Arc::new(Vec::new()),
            consistency: Consistency::default(),
        }
    }

    /// A fake OpenFGA: each request waits for `release` permits (so tests decide when it
    /// returns), records the objects it carried, and answers `allowed` for objects ending
    /// in `-yes`, an error for objects ending in `-bad`, and fails whole requests carrying
    /// `down`.
    struct Fake {
        requests: Mutex<Vec<Vec<String>>>,
        release: tokio::sync::Semaphore,
        sent: AtomicUsize,
    }

    impl Default for Fake {
        fn default() -> Self {
            Self {
                requests: Mutex::default(),
                release: tokio::sync::Semaphore::new(0),
                sent: AtomicUsize::new(0),
            }
        }
    }

    impl SendChecks for Arc<Fake> {
        async fn send(&self, queries: &[CheckQuery]) -> Vec<Result<bool, BackendError>> {
            let objects: Vec<String> = queries.iter().map(|q| q.tuple.object.clone()).collect();
            self.requests.lock().unwrap().push(objects.clone());
            self.sent.fetch_add(1, Ordering::SeqCst);
            self.release.acquire().await.unwrap().forget();
            if objects.iter().any(|o| o == "down") {
                let e = BackendError::Unavailable("OpenFGA at u: connection reset".into());
                return vec![Err(e); queries.len()];
            }
            objects
                .iter()
                .map(|o| {
                    if o.ends_with("-bad") {
                        Err(BackendError::Rejected(format!("invalid object {o}")))
                    } else {
                        Ok(o.ends_with("-yes"))
                    }
                })
                .collect()
        }
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn setup(limit: usize) -> (Arc<Coalescer<Arc<Fake>>>, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        (Arc::new(Coalescer::new(fake.clone(), limit, 50)), fake)
    }

    fn ask(
        c: &Arc<Coalescer<Arc<Fake>>>,
        object: &str,
    ) -> tokio::task::JoinHandle<Result<bool, BackendError>> {
        let (c, query) = (c.clone(), q(object));
        tokio::spawn(async move { c.check(&query).await })
    }

    type Asked = tokio::task::JoinHandle<Result<bool, BackendError>>;

    /// One check in flight (the limit reached), then `objects` asked and seen queued behind it.
    async fn queued_behind_one(
        c: &Arc<Coalescer<Arc<Fake>>>,
        fake: &Fake,
        objects: &[&str],
    ) -> (Asked, Vec<Asked>) {
        let first = ask(c, "first-yes");
        until("the first request", || {
            fake.sent.load(Ordering::SeqCst) == 1
        })
        .await;
        let queued: Vec<_> = objects.iter().map(|o| ask(c, o)).collect();
        until("the checks queued", || {
            c.shared.lock().queue.len() == objects.len()
        })
        .await;
        (first, queued)
    }

    #[tokio::test]
    async fn a_check_with_a_free_slot_goes_out_alone_at_once() {
        let (c, fake) = setup(1);
        fake.release.add_permits(1);
        assert_eq!(c.check(&q("a-yes")).await, Ok(true));
        assert_eq!(
            *fake.requests.lock().unwrap(),
            vec![vec!["a-yes".to_string()]]
        );
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn checks_asked_while_the_limit_is_in_flight_go_out_together_each_with_its_own_answer() {
        let (c, fake) = setup(1);
        let (first, queued) =
            queued_behind_one(&c, &fake, &["b-yes", "c-no", "d-yes", "e-no"]).await;
        fake.release.add_permits(2);
        assert_eq!(first.await.unwrap(), Ok(true));
        let answers: Vec<_> = futures_answers(queued).await;
        assert_eq!(answers, vec![Ok(true), Ok(false), Ok(true), Ok(false)]);
        assert_eq!(
            *fake.requests.lock().unwrap(),
            vec![
                vec!["first-yes".to_string()],
                vec!["b-yes".into(), "c-no".into(), "d-yes".into(), "e-no".into()]
            ]
        );
        until("the slot freed", || c.in_flight() == 0).await;
    }

    async fn futures_answers(
        handles: Vec<tokio::task::JoinHandle<Result<bool, BackendError>>>,
    ) -> Vec<Result<bool, BackendError>> {
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn one_bad_check_fails_only_itself() {
        let (c, fake) = setup(1);
        let (first, queued) = queued_behind_one(&c, &fake, &["b-yes", "c-bad", "d-no"]).await;
        fake.release.add_permits(2);
        first.await.unwrap().unwrap();
        assert_eq!(
            futures_answers(queued).await,
            vec![
                Ok(true),
                Err(BackendError::Rejected("invalid object c-bad".into())),
                Ok(false)
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_request_fails_every_check_in_it_with_the_same_error() {
        let (c, fake) = setup(1);
        let (first, queued) = queued_behind_one(&c, &fake, &["b-yes", "down", "d-no"]).await;
        fake.release.add_permits(2);
        assert_eq!(first.await.unwrap(), Ok(true));
        let outage = BackendError::Unavailable("OpenFGA at u: connection reset".into());
        assert_eq!(
            futures_answers(queued).await,
            vec![Err(outage.clone()), Err(outage.clone()), Err(outage)]
        );
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_is_left_out_and_the_others_keep_their_answers() {
        let (c, fake) = setup(1);
        let (first, queued) = queued_behind_one(&c, &fake, &["b-yes", "gone-yes", "d-no"]).await;
        let [b, gone, d]: [Asked; 3] = queued.try_into().unwrap();
        gone.abort();
        let _ = gone.await;
        fake.release.add_permits(2);
        first.await.unwrap().unwrap();
        assert_eq!(b.await.unwrap(), Ok(true));
        assert_eq!(d.await.unwrap(), Ok(false));
        assert_eq!(
            fake.requests.lock().unwrap()[1],
            vec!["b-yes".to_string(), "d-no".into()]
        );
    }

    #[tokio::test]
    async fn a_cancelled_sender_frees_its_slot_and_the_queue_moves_on() {
        let (c, fake) = setup(1);
        let first = ask(&c, "first-yes");
        until("the first request", || {
            fake.sent.load(Ordering::SeqCst) == 1
        })
        .await;
        let b = ask(&c, "b-yes");
        until("one queued", || c.shared.lock().queue.len() == 1).await;
        // The sender of the first request gives up (Envoy's deadline): its slot goes to b.
        first.abort();
        let _ = first.await;
        until("b sent", || fake.sent.load(Ordering::SeqCst) == 2).await;
        fake.release.add_permits(1);
        assert_eq!(b.await.unwrap(), Ok(true));
        until("the slot freed", || c.in_flight() == 0).await;
    }

    #[tokio::test]
    async fn a_batch_is_one_consistency_and_at_most_max_batch() {
        let fake = Arc::new(Fake::default());
        let c = Arc::new(Coalescer::new(fake.clone(), 1, 2));
        let first = ask(&c, "first-yes");
        until("the first request", || {
            fake.sent.load(Ordering::SeqCst) == 1
        })
        .await;
        let mut strong = q("s-yes");
        strong.consistency = Consistency::HigherConsistency;
        let s = {
            let c = c.clone();
            tokio::spawn(async move { c.check(&strong).await })
        };
        until("s queued", || c.shared.lock().queue.len() == 1).await;
        let rest: Vec<_> = ["b-yes", "c-no", "d-yes"]
            .iter()
            .map(|o| ask(&c, o))
            .collect();
        until("four queued", || c.shared.lock().queue.len() == 4).await;
        fake.release.add_permits(4);
        first.await.unwrap().unwrap();
        assert_eq!(s.await.unwrap(), Ok(true));
        assert_eq!(
            futures_answers(rest).await,
            vec![Ok(true), Ok(false), Ok(true)]
        );
        let requests = fake.requests.lock().unwrap().clone();
        assert_eq!(
            requests,
            vec![
                vec!["first-yes".to_string()],
                vec!["s-yes".into()],
                vec!["b-yes".into(), "c-no".into()],
                vec!["d-yes".into()],
            ]
        );
    }

    #[tokio::test]
    async fn a_limit_of_zero_never_queues() {
        let (c, fake) = setup(0);
        let asked: Vec<_> = ["a-yes", "b-no", "c-yes"]
            .iter()
            .map(|o| ask(&c, o))
            .collect();
        until("three requests", || fake.sent.load(Ordering::SeqCst) == 3).await;
        fake.release.add_permits(3);
        assert_eq!(
            futures_answers(asked).await,
            vec![Ok(true), Ok(false), Ok(true)]
        );
    }
}
