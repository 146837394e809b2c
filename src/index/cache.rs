//! Every loaded vault's index, loaded from the store on a vault's first query and kept within
//! a budget of memories (the least recently queried dropped first); HNSW graphs built for large
//! vaults in the background.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use super::graph::Graph;
use super::lexical::{terms, TERMS_VERSION};
use super::vault::VaultIndex;
use crate::crypto::VaultCipher;
use crate::ids::{MemoryId, VaultId};
use crate::store::{Backend, EntryMeta, VectorItem};

type Slot = Arc<OnceLock<Result<RwLock<VaultIndex>, String>>>;

/// Every loaded vault's index. A vault not yet loaded is loaded from the store on first use.
///
/// Loaded indexes are kept within a budget of memories: past it, the indexes of the vaults
/// queried least recently are dropped (the store holds everything they held) and loaded again
/// on their vault's next query. A dropped index still in use lives until its user is done.
pub struct Indexes {
    slots: Mutex<HashMap<VaultId, Slot>>,
    hnsw_threshold: usize,
    max_loaded_memories: usize,
    /// Per loaded vault: when it was last queried (a tick) and how many memories it held then.
    usage: Mutex<Usage>,
    /// HNSW graphs finished since start.
    graphs_built: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Default)]
struct Usage {
    tick: u64,
    vaults: HashMap<VaultId, (u64, usize)>,
    memories: usize,
}

impl Indexes {
    pub fn new(hnsw_threshold: usize, max_loaded_memories: usize) -> Indexes {
        Indexes {
            slots: Mutex::new(HashMap::new()),
            hnsw_threshold,
            max_loaded_memories,
            usage: Mutex::new(Usage::default()),
            graphs_built: Arc::default(),
        }
    }

    /// HNSW graphs finished since start.
    pub fn graphs_built(&self) -> u64 {
        self.graphs_built.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Memories in the loaded indexes, as last counted.
    pub fn loaded_memories(&self) -> usize {
        self.usage.lock().expect("index usage lock").memories
    }

    /// Notes a query of `vault` (holding `len` memories) through `slot`, and drops the least
    /// recently queried other indexes while the loaded total is over the budget. Indexes being
    /// built or in use are passed over; the dropped ones are freed after the locks are released.
    fn note_use(&self, vault: VaultId, slot: &Slot, len: usize) {
        let mut dropped = Vec::new();
        {
            let mut usage = self.usage.lock().expect("index usage lock");
            let mut slots = self.slots.lock().expect("index map lock");
            // A query that ran on an index evicted meanwhile does not count it back in.
            if !slots.get(&vault).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                return;
            }
            usage.tick += 1;
            let tick = usage.tick;
            let previous = usage
                .vaults
                .insert(vault, (tick, len))
                .map_or(0, |(_, n)| n);
            usage.memories = usage.memories + len - previous;
            if usage.memories <= self.max_loaded_memories {
                return;
            }
            let mut by_age: Vec<(u64, VaultId, usize)> = usage
                .vaults
                .iter()
                .filter(|(v, _)| **v != vault)
                .map(|(v, (t, n))| (*t, *v, *n))
                .collect();
            by_age.sort_unstable_by_key(|(t, _, _)| *t);
            for (_, old, n) in by_age {
                if usage.memories <= self.max_loaded_memories {
                    break;
                }
                let busy = slots.get(&old).is_some_and(|s| match s.get() {
                    Some(Ok(lock)) => lock.try_read().map_or(true, |index| index.building),
                    Some(Err(_)) => false,
                    None => true,
                });
                if busy {
                    continue;
                }
                dropped.extend(slots.remove(&old));
                usage.vaults.remove(&old);
                usage.memories -= n;
            }
        }
        drop(dropped);
    }

    /// Updates the recorded size of a loaded vault after its index grew or shrank, keeping
    /// its place in the recency order.
    fn note_size(&self, vault: VaultId, slot: &Slot, len: usize) {
        let mut usage = self.usage.lock().expect("index usage lock");
        let slots = self.slots.lock().expect("index map lock");
        if !slots.get(&vault).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            return;
        }
        if let Some((_, recorded)) = usage.vaults.get_mut(&vault) {
            let previous = std::mem::replace(recorded, len);
            usage.memories = usage.memories + len - previous;
        }
    }

    /// Forgets the usage of a vault whose index was dropped.
    fn forget_use(&self, vault: VaultId) {
        let mut usage = self.usage.lock().expect("index usage lock");
        if let Some((_, n)) = usage.vaults.remove(&vault) {
            usage.memories -= n;
        }
    }

    fn slot(&self, vault: VaultId) -> Slot {
        self.slots
            .lock()
            .expect("index map lock")
            .entry(vault)
            .or_default()
            .clone()
    }

    /// Runs `f` on the vault's index, loading it from the store first if needed. Blocking: call
    /// from a thread that may block.
    pub fn with_index<T>(
        self: &Arc<Self>,
        store: &dyn Backend,
        vault: VaultId,
        cipher: &VaultCipher,
        f: impl FnOnce(&VaultIndex) -> T,
    ) -> anyhow::Result<T> {
        let mut slot = self.slot(vault);
        let mut reloaded = false;
        let index = loop {
            let loaded = slot.get_or_init(|| {
                load(store, vault, cipher)
                    .map(RwLock::new)
                    .map_err(|e| format!("{e:#}"))
            });
            let index = match loaded {
                Ok(index) => index,
                Err(error) => {
                    // Not cached: the next query tries again (a passing I/O error must not stick).
                    self.drop_slot(vault, &slot);
                    anyhow::bail!("loading the index of {vault}: {error}");
                }
            };
            match self.catch_up(store, vault, cipher, index)? {
                Freshness::Current => break index,
                Freshness::Removed if !reloaded => {
                    // Memories left the vault elsewhere: load it again from the store.
                    self.drop_slot(vault, &slot);
                    self.forget_use(vault);
                    slot = self.slot(vault);
                    reloaded = true;
                }
                Freshness::Removed => break index,
            }
        };
        let (result, len) = {
            let index = index.read().expect("vault index lock");
            (f(&index), index.len())
        };
        self.note_use(vault, &slot, len);
        // A vault loaded past the threshold gets its graph too, not only one that grows past it.
        self.maybe_build_graph(&slot);
        Ok(result)
    }

    /// Drops `slot` from the map if it is still the vault's.
    fn drop_slot(&self, vault: VaultId, slot: &Slot) {
        let mut slots = self.slots.lock().expect("index map lock");
        if slots
            .get(&vault)
            .is_some_and(|current| Arc::ptr_eq(current, slot))
        {
            slots.remove(&vault);
        }
    }

    /// Brings a loaded index up to the vault's version in a store that other processes write
    /// too: the vectors written since are added; if memories were removed since, it says so
    /// (the index is then loaded again). Nothing to do when this process is the only writer.
    fn catch_up(
        self: &Arc<Self>,
        store: &dyn Backend,
        vault: VaultId,
        cipher: &VaultCipher,
        index: &RwLock<VaultIndex>,
    ) -> anyhow::Result<Freshness> {
        let Some(wanted) = store.vault_version(vault) else {
            return Ok(Freshness::Current);
        };
        let have = index
            .read()
            .expect("vault index lock")
            .store_version
            .unwrap_or_default();
        if wanted.removals > have.removals {
            return Ok(Freshness::Removed);
        }
        if wanted.seq <= have.seq {
            return Ok(Freshness::Current);
        }
        let (items, highest) = store.vectors_after(vault, cipher, have.seq)?;
        let mut completed = Vec::with_capacity(items.len());
        for (id, vector, mut meta) in items {
            complete_terms(store, vault, cipher, id, &mut meta)?;
            completed.push((id, vector, meta));
        }
        let mut index = index.write().expect("vault index lock");
        for (id, vector, meta) in completed {
            index.insert_with_meta(id, &vector, meta);
        }
        // Everything committed up to `wanted` was committed before the read above began.
        let seq = highest.max(wanted.seq);
        let known = index.store_version.get_or_insert(have);
        known.seq = known.seq.max(seq);
        Ok(Freshness::Current)
    }

    /// Takes deleted memories out of the vault's index, if it is loaded (a later load reads
    /// the store, where they are already gone).
    pub fn remove(&self, vault: VaultId, ids: &[MemoryId]) {
        let Some(slot) = self.loaded(vault) else {
            return;
        };
        let Ok(lock) = slot.wait() else { return };
        let len = {
            let mut index = lock.write().expect("vault index lock");
            index.remove(ids);
            index.len()
        };
        self.note_size(vault, &slot, len);
    }

    /// The vault's slot if its index was asked for (loaded, or loading).
    fn loaded(&self, vault: VaultId) -> Option<Slot> {
        self.slots
            .lock()
            .expect("index map lock")
            .get(&vault)
            .cloned()
    }

    /// Forgets a vault's index entirely (the vault was erased). The next use loads it afresh.
    pub fn forget(&self, vault: VaultId) {
        self.slots.lock().expect("index map lock").remove(&vault);
        self.forget_use(vault);
    }

    /// Adds freshly embedded vectors to the vault's index if it is loaded (otherwise the store
    /// already holds them and the first load will read them), and starts a graph build if due.
    pub fn insert(self: &Arc<Self>, vault: VaultId, items: &[VectorItem]) {
        let Some(slot) = self.loaded(vault) else {
            return;
        };
        // A load may be under way: wait for it. Whether or not its scan saw these vectors,
        // inserting them now leaves the index complete (a memory present twice is kept once).
        let Ok(lock) = slot.wait() else { return };
        let mut index = lock.write().expect("vault index lock");
        for (id, vector, meta) in items {
            index.insert_with_meta(*id, vector, meta.clone());
        }
        let len = index.len();
        drop(index);
        self.note_size(vault, &slot, len);
        self.maybe_build_graph(&slot);
    }

    /// Starts building the vault's HNSW graph in the background if it is due (large enough,
    /// none yet, none building). Queries use the exact scan until it is ready.
    fn maybe_build_graph(&self, slot: &Slot) {
        let Some(Ok(lock)) = slot.get() else { return };
        // Every query passes here: a read lock answers the usual "no" without waiting for the
        // vault's other readers.
        if !lock
            .read()
            .expect("vault index lock")
            .wants_graph(self.hnsw_threshold)
        {
            return;
        }
        let mut index = lock.write().expect("vault index lock");
        if !index.wants_graph(self.hnsw_threshold) {
            return;
        }
        index.building = true;
        let vectors = index.vectors.clone();
        drop(index);
        let build_slot = slot.clone();
        let built_count = self.graphs_built.clone();
        let spawned = std::thread::Builder::new()
            .name("hnsw-build".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Graph::build(&vectors)
                }));
                let Some(Ok(lock)) = build_slot.get() else {
                    return;
                };
                let mut index = lock.write().expect("vault index lock");
                index.building = false;
                match built {
                    Ok(graph) => {
                        tracing::info!(
                            memories = graph.covered,
                            seconds = started.elapsed().as_secs_f64(),
                            "built a vault's HNSW graph"
                        );
                        index.graph = Some(graph);
                        built_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => {
                        index.graph_failed_at = Some(index.ids.len());
                        tracing::error!(
                            memories = index.ids.len(),
                            "an HNSW build panicked; the exact scan keeps serving, and no build \
                             is tried again until the vault doubles"
                        )
                    }
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "could not start an HNSW build; the exact scan keeps serving");
            if let Ok(mut index) = lock.write() {
                index.building = false;
            }
        }
    }
}

/// Whether a loaded index holds the vault as the store has it.
enum Freshness {
    Current,
    /// Memories were removed from the store since it was loaded.
    Removed,
}

/// Derives a memory's terms again from its text when they were stored without them, or by
/// another version of `index::terms`.
fn complete_terms(
    store: &dyn Backend,
    vault: VaultId,
    cipher: &VaultCipher,
    id: MemoryId,
    meta: &mut EntryMeta,
) -> anyhow::Result<()> {
    if meta.terms.is_empty() || meta.terms_version != TERMS_VERSION {
        if let Some(record) = store.memory(vault, cipher, id)? {
            meta.terms = terms(&record.content);
            meta.terms_version = TERMS_VERSION;
        }
    }
    Ok(())
}

fn load(store: &dyn Backend, vault: VaultId, cipher: &VaultCipher) -> anyhow::Result<VaultIndex> {
    let mut index = VaultIndex::new();
    // Read before the vectors: what the load then reads is at least this version.
    index.store_version = store.vault_version(vault);
    for (id, vector, mut meta) in store.vault_vectors(vault, cipher)? {
        complete_terms(store, vault, cipher, id, &mut meta)?;
        index.insert_with_meta(id, &vector, meta);
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::hybrid::tests::{nearest, unit};
    use crate::store::{SledStore, Vectors};

    #[test]
    fn past_the_budget_the_least_recently_queried_indexes_are_dropped_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        // Room for two vaults of 100.
        let indexes = Arc::new(Indexes::new(1000, 250));
        let cipher = VaultCipher::new(&[1; 32]);
        let vaults: Vec<VaultId> = (0..3).map(|_| VaultId::generate()).collect();
        for (n, vault) in vaults.iter().enumerate() {
            let items: Vec<VectorItem> = (0..100)
                .map(|i| {
                    let id = (n * 1000 + i) as u64;
                    (MemoryId(id), unit(id), EntryMeta::default())
                })
                .collect();
            store.insert_vectors(*vault, &cipher, &items).unwrap();
        }
        let query = |vault: VaultId| {
            indexes
                .with_index(&store, vault, &cipher, |i| i.len())
                .unwrap()
        };
        assert_eq!(query(vaults[0]), 100);
        assert_eq!(query(vaults[1]), 100);
        assert_eq!(indexes.loaded_memories(), 200);
        // Vault 0 is queried again, so vault 1 is the least recent when vault 2 loads.
        query(vaults[0]);
        assert_eq!(query(vaults[2]), 100);
        assert_eq!(indexes.loaded_memories(), 200);
        assert!(indexes.loaded(vaults[1]).is_none(), "vault 1 was dropped");
        assert!(indexes.loaded(vaults[0]).is_some());
        // A dropped vault answers in full from a fresh load.
        assert_eq!(query(vaults[1]), 100);
        indexes
            .with_index(&store, vaults[1], &cipher, |index| {
                assert_eq!(nearest(index, &unit(1007), 1)[0].id, MemoryId(1007));
            })
            .unwrap();
        // An erased vault's index leaves the count.
        indexes.forget(vaults[1]);
        assert_eq!(indexes.loaded_memories(), 100);
    }

    /// Queries the vault until its background graph build has finished.
    fn wait_for_graph(
        indexes: &Arc<Indexes>,
        store: &SledStore,
        vault: VaultId,
        cipher: &VaultCipher,
    ) {
        let started = std::time::Instant::now();
        while indexes
            .with_index(store, vault, cipher, |i| i.graph_covers())
            .unwrap()
            == 0
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(120),
                "no graph was built"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_vault_loaded_past_the_threshold_gets_a_graph_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        let indexes = Arc::new(Indexes::new(1000, usize::MAX));
        let vault = VaultId::generate();
        let cipher = VaultCipher::new(&[1; 32]);
        let items: Vec<VectorItem> = (0..1000)
            .map(|i| (MemoryId(i), unit(i), EntryMeta::default()))
            .collect();
        store.insert_vectors(vault, &cipher, &items).unwrap();
        wait_for_graph(&indexes, &store, vault, &cipher);
    }

    #[test]
    fn a_vault_crossing_the_threshold_gets_a_graph_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        let indexes = Arc::new(Indexes::new(1000, usize::MAX));
        let vault = VaultId::generate();
        let cipher = VaultCipher::new(&[1; 32]);
        // Loaded (empty) first, so later inserts go to the live index.
        assert_eq!(
            indexes
                .with_index(&store, vault, &cipher, |i| i.len())
                .unwrap(),
            0
        );
        let items: Vec<VectorItem> = (0..1200)
            .map(|i| (MemoryId(i), unit(i), EntryMeta::default()))
            .collect();
        indexes.insert(vault, &items[..1000]);
        wait_for_graph(&indexes, &store, vault, &cipher);
        indexes.insert(vault, &items[1000..]);
        indexes
            .with_index(&store, vault, &cipher, |index| {
                assert_eq!(index.graph_covers(), 1000);
                assert_eq!(index.len(), 1200);
                assert_eq!(
                    nearest(index, &unit(3), 1)[0].id,
                    MemoryId(3),
                    "found through the graph"
                );
                assert_eq!(
                    nearest(index, &unit(1100), 1)[0].id,
                    MemoryId(1100),
                    "found in the scanned tail"
                );
            })
            .unwrap();
        // Another vault's index is untouched by all of this.
        assert_eq!(
            indexes
                .with_index(&store, VaultId::generate(), &cipher, |i| i.len())
                .unwrap(),
            0
        );
    }
}
