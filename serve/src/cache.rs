//! The decoded chunks shared by every disk and connection of a served restore point, keyed by
//! digest (a chunk that occurs on two disks, or twice on one, is held once), least recently used
//! first out once the byte bound is reached.
//!
//! A chunk being loaded has a slot of its own: whoever asks for it meanwhile waits for that load
//! instead of reading it again, so a chunk requested by several connections at once (multi-conn
//! readers, read-ahead racing a read) is read from the repository once. A load that fails leaves
//! no slot: each waiter then tries for itself (and gets the same error for a damaged chunk).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use backflow_repository::Digest;
use bytes::Bytes;

enum Slot {
    Loading,
    Ready { data: Bytes, tick: u64 },
}

#[derive(Default)]
struct State {
    slots: HashMap<Digest, Slot>,
    /// Ready chunks by their last use.
    by_use: BTreeMap<u64, Digest>,
    tick: u64,
    bytes: u64,
}

/// Counters, for logs, tests and the benchmark.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Chunks found ready.
    pub hits: AtomicU64,
    /// Chunks a read loaded itself.
    pub loads: AtomicU64,
    /// Chunks a read waited for (another read's or the read-ahead's load).
    pub waits: AtomicU64,
    /// Chunks the read-ahead put in.
    pub prefetched: AtomicU64,
}

pub struct ChunkCache {
    state: Mutex<State>,
    changed: Condvar,
    capacity: u64,
    stats: CacheStats,
}

impl ChunkCache {
    /// A cache of at most `capacity` bytes of ready chunks. Chunks being loaded are not counted:
    /// their number is bounded by the requests in flight and the read-ahead window.
    pub fn new(capacity: u64) -> Arc<ChunkCache> {
        Arc::new(ChunkCache {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            capacity,
            stats: CacheStats::default(),
        })
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes of ready chunks held now.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the chunk is ready or being loaded.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().slots.contains_key(digest)
    }

    /// The chunk, from the cache, from a load in progress, or loaded by `load` now.
    pub fn get_or_load<E>(
        self: &Arc<Self>,
        digest: &Digest,
        load: impl FnOnce() -> Result<Bytes, E>,
    ) -> Result<Bytes, E> {
        let mut waited = false;
        let claim = {
            let mut state = self.lock();
            loop {
                match state.slots.get(digest) {
                    Some(Slot::Ready { data, tick }) => {
                        let (data, old) = (data.clone(), *tick);
                        touch(&mut state, digest, old);
                        let counter = if waited {
                            &self.stats.waits
                        } else {
                            &self.stats.hits
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        return Ok(data);
                    }
                    Some(Slot::Loading) => {
                        waited = true;
                        state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                    }
                    None => {
                        state.slots.insert(*digest, Slot::Loading);
                        break Claim {
                            cache: self.clone(),
                            digest: *digest,
                            done: false,
                        };
                    }
                }
            }
        };
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        let data = load()?;
        claim.fulfill(data.clone());
        Ok(data)
    }

    /// Claims a chunk that is neither ready nor being loaded, for the read-ahead: readers asking
    /// for it wait until the claim is fulfilled or dropped.
    pub fn try_claim(self: &Arc<Self>, digest: &Digest) -> Option<Claim> {
        let mut state = self.lock();
        if state.slots.contains_key(digest) {
            return None;
        }
        state.slots.insert(*digest, Slot::Loading);
        Some(Claim {
            cache: self.clone(),
            digest: *digest,
            done: false,
        })
    }
}

fn touch(state: &mut State, digest: &Digest, old: u64) {
    state.by_use.remove(&old);
    state.tick += 1;
    let tick = state.tick;
    state.by_use.insert(tick, *digest);
    if let Some(Slot::Ready { tick: t, .. }) = state.slots.get_mut(digest) {
        *t = tick;
    }
}

/// A chunk being loaded. Fulfil it with the verified bytes; dropped unfulfilled (an error, a
/// panic), it frees the slot and wakes the waiters, who then load it themselves.
pub struct Claim {
    cache: Arc<ChunkCache>,
    digest: Digest,
    done: bool,
}

impl Claim {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Makes the chunk ready, evicting the least recently used chunks beyond the bound.
    pub fn fulfill(mut self, data: Bytes) {
        self.done = true;
        let cache = &*self.cache;
        let mut state = cache.lock();
        state.tick += 1;
        let tick = state.tick;
        let len = data.len() as u64;
        state.slots.insert(self.digest, Slot::Ready { data, tick });
        state.by_use.insert(tick, self.digest);
        state.bytes += len;
        while state.bytes > cache.capacity {
            let Some((_, oldest)) = state.by_use.pop_first() else {
                break;
            };
            if let Some(Slot::Ready { data, .. }) = state.slots.remove(&oldest) {
                state.bytes -= data.len() as u64;
            }
        }
        drop(state);
        cache.changed.notify_all();
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.cache.lock();
        if matches!(state.slots.get(&self.digest), Some(Slot::Loading)) {
            state.slots.remove(&self.digest);
        }
        drop(state);
        self.cache.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest([n; 32])
    }

    #[test]
    fn holds_at_most_the_bound_and_evicts_the_least_recently_used() {
        let cache = ChunkCache::new(300);
        for n in 0..3 {
            cache
                .get_or_load(&d(n), || Ok::<_, ()>(Bytes::from(vec![n; 100])))
                .unwrap();
        }
        // Use 0, so 1 is the oldest; a fourth evicts 1.
        cache.get_or_load(&d(0), || Err(())).unwrap();
        cache
            .get_or_load(&d(3), || Ok::<_, ()>(Bytes::from(vec![3; 100])))
            .unwrap();
        assert_eq!(cache.bytes(), 300);
        assert!(cache.contains(&d(0)) && !cache.contains(&d(1)) && cache.contains(&d(3)));
    }

    #[test]
    fn a_chunk_loading_is_waited_for_not_loaded_again() {
        let cache = ChunkCache::new(1 << 20);
        let claim = cache.try_claim(&d(1)).unwrap();
        assert!(cache.try_claim(&d(1)).is_none());
        let reader = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                cache.get_or_load(&d(1), || -> Result<Bytes, ()> { panic!("loaded twice") })
            })
        };
        // The reader waits whatever the timing; fulfilling wakes it.
        claim.fulfill(Bytes::from_static(b"chunk"));
        assert_eq!(
            reader.join().unwrap().unwrap(),
            Bytes::from_static(b"chunk")
        );
    }

    #[test]
    fn a_dropped_claim_lets_the_reader_load_and_errors_are_not_kept() {
        let cache = ChunkCache::new(1 << 20);
        drop(cache.try_claim(&d(2)).unwrap());
        assert!(!cache.contains(&d(2)));
        assert_eq!(
            cache.get_or_load(&d(2), || Err::<Bytes, _>("bad")),
            Err("bad")
        );
        assert!(!cache.contains(&d(2)));
        let ok = cache.get_or_load(&d(2), || Ok::<_, ()>(Bytes::from_static(b"x")));
        assert_eq!(ok.unwrap(), Bytes::from_static(b"x"));
    }
}
