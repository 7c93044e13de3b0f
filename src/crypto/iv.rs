//! Fresh IVs for sealing, drawn from the operating system in batches.
//!
//! CBC needs an IV that an attacker cannot predict before the value is
//! sealed. Bytes straight from the OS generator are unpredictable whether
//! they are read 16 at a time or 4 KiB at a time, so each thread reads a
//! batch with one `getrandom` call and hands out each 16-byte slice of it
//! once. No generator of our own stretches them: every IV is OS randomness.

use std::cell::RefCell;

use ring::rand::{SecureRandom, SystemRandom};

use super::{IV_LEN, SealError};

/// IVs per OS call: 256 IVs, 4 KiB, one system call per 256 seals instead
/// of one per seal.
const BATCH_IVS: usize = 256;

/// The unused part of a thread's batch. An IV is wiped from the batch as it
/// is handed out, so no byte can be handed out twice.
///
/// A process that forked would give its child a copy of the batch, and the
/// two would seal with the same IVs: the proxy never forks, and a future
/// caller that does must not seal in the child before it starts a thread.
struct Batch {
    ivs: [[u8; IV_LEN]; BATCH_IVS],
    /// The next unused IV; the batch is empty at the end.
    next: usize,
}

thread_local! {
    static BATCH: RefCell<Batch> = const {
        RefCell::new(Batch {
            ivs: [[0; IV_LEN]; BATCH_IVS],
            next: BATCH_IVS,
        })
    };
}

/// An IV no other seal in this process has received.
pub(super) fn fresh() -> Result<[u8; IV_LEN], SealError> {
    BATCH.with(|cell| {
        let mut batch = cell.borrow_mut();

        // On failure the batch stays empty, so a half-written refill is
        // never handed out and the next seal tries the OS again.
        if batch.next == BATCH_IVS {
            SystemRandom::new()
                .fill(batch.ivs.as_flattened_mut())
                .map_err(|_| SealError::Randomness)?;
            batch.next = 0;
        }

        let at = batch.next;
        batch.next = at + 1;
        // Taking leaves zeros behind: the IV is wiped as it is handed out.
        Ok(std::mem::take(&mut batch.ivs[at]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ivs_handed_out_across_several_batches_are_all_distinct() {
        let count = BATCH_IVS * 3 + 5;
        let mut seen: Vec<[u8; IV_LEN]> = (0..count).map(|_| fresh().unwrap()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), count);
    }

    #[test]
    fn an_iv_handed_out_is_wiped_from_the_batch() {
        let iv = fresh().unwrap();
        BATCH.with(|cell| {
            let batch = cell.borrow();
            let handed_out = batch.ivs[batch.next - 1];
            assert_ne!(iv, [0; IV_LEN]);
            assert_eq!(handed_out, [0; IV_LEN]);
        });
    }

    #[test]
    fn each_thread_draws_its_own_ivs() {
        let mut seen: Vec<[u8; IV_LEN]> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..100).map(|_| fresh().unwrap()).collect::<Vec<_>>()))
                .collect();
            threads
                .into_iter()
                .flat_map(|thread| thread.join().unwrap())
                .collect()
        });
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 400);
    }
}
