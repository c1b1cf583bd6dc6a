//! One memory budget for every Rancher answer being read in the process.
//!
//! Each answer has its own cap ([`super::client::MAX_BODY_BYTES`]), but 32 requests in flight
//! times 64 MiB is 2 GiB: a hostile or broken Rancher serving huge answers to many jobs at once
//! would take the agent past its container's limit (the chart's 256 Mi). So the bytes of answers
//! being read are also taken from one shared budget, as they arrive (the buffer's capacity, which
//! is what is allocated), and given back when the answer has been decoded. A read that cannot get
//! its bytes within [`BUDGET_WAIT`] fails with an error naming the budget; the job is retried
//! later, when other answers have been read.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of Rancher answers held at once by the whole process. With the agent's own ~70 MB and
/// what decoding one answer adds, this keeps the process under the chart's 256 Mi limit.
pub const BODY_BUDGET_BYTES: usize = 96 << 20;
/// How long a read waits for bytes of the budget before it gives up: longer than reading and
/// decoding a legitimate page takes, so a burst of big listings queues instead of failing.
pub const BUDGET_WAIT: Duration = Duration::from_secs(10);

/// A budget of bytes (the process has one, [`BodyBudget::shared`]; tests make their own).
#[derive(Debug)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    wait: Duration,
}

static SHARED: LazyLock<Arc<BodyBudget>> = LazyLock::new(|| BodyBudget::new(BODY_BUDGET_BYTES, BUDGET_WAIT));

/// The budget could not give the bytes asked for in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    /// The budget's size, in bytes.
    pub budget: usize,
}

impl BodyBudget {
    /// The process's budget, shared by every Rancher client.
    pub fn shared() -> Arc<BodyBudget> {
        SHARED.clone()
    }

    /// A budget of `total` bytes whose reads wait at most `wait` for their share.
    pub fn new(total: usize, wait: Duration) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            bytes: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            total,
            wait,
        })
    }

    /// The budget's size, in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held by answers being read now.
    pub fn in_use(&self) -> usize {
        self.total.saturating_sub(self.bytes.available_permits())
    }

    /// An empty reservation on this budget, to grow as an answer arrives.
    pub fn reserve(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            held: None,
            bytes: 0,
        }
    }
}

/// Bytes held out of a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    held: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds at least `bytes` in all, waiting (at most the budget's wait) for what is missing.
    ///
    /// # Errors
    /// [`OverBudget`] when the bytes did not come in time, or never could (more than the budget).
    pub async fn grow_to(&mut self, bytes: usize) -> Result<(), OverBudget> {
        let Some(more) = bytes.checked_sub(self.bytes).filter(|m| *m > 0) else {
            return Ok(());
        };
        let over = OverBudget {
            budget: self.budget.total,
        };
        let more_u32 = u32::try_from(more).map_err(|_| over)?;
        if bytes > self.budget.total {
            return Err(over);
        }
        let acquire = self.budget.bytes.clone().acquire_many_owned(more_u32);
        let permit = match tokio::time::timeout(self.budget.wait, acquire).await {
            Ok(Ok(permit)) => permit,
            // A closed semaphore (never closed) or the wait ran out.
            Ok(Err(_)) | Err(_) => return Err(over),
        };
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        self.bytes = bytes;
        Ok(())
    }
}

/// An answer's bytes with the budget they hold: the budget is given back when this is dropped,
/// after the answer has been decoded.
#[derive(Debug)]
pub struct Body {
    bytes: Vec<u8>,
    _held: Reservation,
}

impl Body {
    pub fn new(bytes: Vec<u8>, held: Reservation) -> Body {
        Body { bytes, _held: held }
    }
}

impl std::ops::Deref for Body {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_held_are_given_back_on_drop_and_a_read_past_the_budget_waits_then_fails() {
        let budget = BodyBudget::new(1000, Duration::from_millis(50));
        let mut a = budget.reserve();
        a.grow_to(600).await.unwrap();
        a.grow_to(700).await.unwrap();
        a.grow_to(100).await.unwrap(); // never shrinks while held
        assert_eq!((a.bytes(), budget.in_use()), (700, 700));

        let mut b = budget.reserve();
        assert_eq!(b.grow_to(400).await, Err(OverBudget { budget: 1000 }));
        assert_eq!(
            b.grow_to(5000).await,
            Err(OverBudget { budget: 1000 }),
            "more than the budget"
        );
        assert_eq!(budget.in_use(), 700, "a failed wait holds nothing");

        // A waiting read gets its bytes as soon as another answer is done with them.
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut c = budget.reserve();
                let outcome = c.grow_to(900).await;
                (outcome, c.bytes())
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(Body::new(vec![0; 700], a));
        assert_eq!(waiting.await.unwrap(), (Ok(()), 900));
        assert_eq!(
            budget.in_use(),
            0,
            "the waiting read's reservation was dropped with its task"
        );
    }
}
