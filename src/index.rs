//! Per-vault vector indexes, derived from the store and rebuildable from it at any time.
//!
//! A vault's index is loaded from its own key range of the store on first use, so start-up does
//! not wait on it and no query ever reads another vault's vectors. Small vaults are searched by an
//! exact scan (a dot product per memory: the vectors are unit length). From `hnsw_threshold`
//! memories on, an HNSW graph is built in the background over the vectors present then; until it
//! is ready, and for memories added after it was built, the exact scan serves.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use hnsw_rs::prelude::{Distance, Hnsw};

use crate::crypto::VaultCipher;
use crate::lexical::LexicalIndex;
use crate::store::{EntryMeta, MemoryId, Store, VaultId, DIM};

/// HNSW parameters: 16 links a node (well under the library's limit of 256, which it enforces
/// by exiting the process), construction breadth 200, search breadth 256 (README.md, "Measured").
const HNSW_LINKS: usize = 16;
const HNSW_LAYERS: usize = 16;
const HNSW_EF_CONSTRUCTION: usize = 200;
const HNSW_EF_SEARCH: usize = 256;

/// One scored candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub id: MemoryId,
    pub score: f32,
}

/// Memories without a session are chained only when this close in time (30 minutes).
const SESSIONLESS_GAP_MS: i64 = 30 * 60 * 1000;

/// Dense candidates the hybrid ranking takes from an HNSW graph, at least.
const HNSW_CANDIDATES: usize = 256;

/// How the hybrid ranking mixes its signals (README.md, "Retrieval", for how each was chosen).
#[derive(Clone, Copy, Debug)]
pub struct HybridParams {
    /// Weight of the dense z-score; the lexical one gets the rest.
    pub dense_weight: f32,
    /// Share of the best session neighbour's score added to a memory's own.
    pub neighbour_weight: f32,
    /// A memory is relevant if its cosine similarity reaches this...
    pub min_similarity: f32,
    /// ...or its BM25 score reaches this.
    pub min_lexical: f32,
}

/// A memory as the hybrid ranking scored it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ranked {
    pub id: MemoryId,
    /// The fused, neighbour-lifted score the ranking sorts by (unbounded; higher is better).
    pub score: f32,
    /// Cosine similarity to the query.
    pub similarity: f32,
    /// BM25 score of its window.
    pub lexical: f32,
    /// The memory before it in its session, if any.
    pub previous: Option<MemoryId>,
}

/// Mixes two score lists, each standardised to mean 0 and deviation 1 first (so their scales
/// do not matter): `dense_weight * z(dense) + (1 - dense_weight) * z(lexical)`.
pub fn fuse(dense: &[f32], lexical: &[f32], dense_weight: f32) -> Vec<f32> {
    let (dense_mean, dense_scale) = standardiser(dense, MIN_DENSE_DEVIATION);
    let (lexical_mean, lexical_scale) = standardiser(lexical, MIN_LEXICAL_DEVIATION);
    dense
        .iter()
        .zip(lexical)
        .map(|(d, l)| {
            dense_weight * (d - dense_mean) * dense_scale
                + (1.0 - dense_weight) * (l - lexical_mean) * lexical_scale
        })
        .collect()
}

/// Least deviations the standardisation divides by. In a vault of a handful of memories a
/// difference of noise (two near-identical sentences) would otherwise become a whole standard
/// deviation. On LoCoMo the real deviations are 0.08-0.15 (cosine) and 0.3-1.9 (BM25) per query,
/// so these floors rarely bind there.
const MIN_DENSE_DEVIATION: f32 = 0.05;
const MIN_LEXICAL_DEVIATION: f32 = 0.25;

/// Mean and inverse standard deviation, the deviation taken as at least `least`.
fn standardiser(values: &[f32], least: f32) -> (f32, f32) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let n = values.len() as f32;
    let mean = values.iter().sum::<f32>() / n;
    let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / variance.sqrt().max(least))
}

/// The vectors of one vault, flat, plus an optional HNSW graph over a prefix of them.
pub struct VaultIndex {
    ids: Vec<MemoryId>,
    vectors: Vec<f32>,
    /// Beside each vector: what filters look at (date, session, tags).
    meta: Vec<EntryMeta>,
    /// Every id ever inserted, so a late insert of a deleted memory is not taken back in.
    present: HashSet<MemoryId>,
    /// Deleted memories still in the arrays (and the graph); skipped by every search.
    removed: HashSet<MemoryId>,
    /// BM25 over each memory's window (itself and its session neighbours).
    lexical: LexicalIndex,
    /// Each position's previous and next position in the same session.
    neighbours: Vec<(Option<u32>, Option<u32>)>,
    /// The latest position of each session (no session counts as one).
    last_in_session: HashMap<Option<String>, u32>,
    /// Memory id -> position.
    positions: HashMap<MemoryId, u32>,
    graph: Option<Graph>,
    building: bool,
    /// The size at which a graph build failed: none is tried again until the vault doubles,
    /// so a build that panics is not retried on every query.
    graph_failed_at: Option<usize>,
}

struct Graph {
    hnsw: Hnsw<'static, f32, UnitDistance>,
    /// The graph covers `ids[..covered]`.
    covered: usize,
}

impl VaultIndex {
    pub fn new() -> VaultIndex {
        VaultIndex {
            ids: Vec::new(),
            vectors: Vec::new(),
            meta: Vec::new(),
            present: HashSet::new(),
            removed: HashSet::new(),
            lexical: LexicalIndex::default(),
            neighbours: Vec::new(),
            last_in_session: HashMap::new(),
            positions: HashMap::new(),
            graph: None,
            building: false,
            graph_failed_at: None,
        }
    }

    /// Memories searchable now (deleted ones excluded).
    pub fn len(&self) -> usize {
        self.ids.len() - self.removed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many memories the HNSW graph covers (0 while there is none).
    pub fn graph_covers(&self) -> usize {
        self.graph.as_ref().map_or(0, |g| g.covered)
    }

    /// Adds a unit vector with no metadata (benchmarks and tests).
    pub fn insert(&mut self, id: MemoryId, vector: &[f32]) {
        self.insert_with_meta(id, vector, EntryMeta::default());
    }

    /// Adds a unit vector; a memory already present (or deleted) is left as it is.
    pub fn insert_with_meta(&mut self, id: MemoryId, vector: &[f32], mut meta: EntryMeta) {
        debug_assert_eq!(vector.len(), DIM);
        if !self.present.insert(id) {
            return;
        }
        let position = self.ids.len() as u32;
        let previous = self
            .last_in_session
            .insert(meta.session_id.clone(), position)
            // Without a session, only memories close in time are taken to be one conversation.
            .filter(|p| {
                meta.session_id.is_some()
                    || (meta.created_at_ms - self.meta[*p as usize].created_at_ms).abs()
                        <= SESSIONLESS_GAP_MS
            });
        self.lexical.push(&meta.terms, previous.map(|p| p as usize));
        self.positions.insert(id, position);
        if let Some(previous) = previous {
            self.neighbours[previous as usize].1 = Some(position);
        }
        self.neighbours.push((previous, None));
        meta.terms = Vec::new();
        self.ids.push(id);
        self.vectors.extend_from_slice(vector);
        self.meta.push(meta);
    }

    /// Takes memories out of every later search. Their slots are reclaimed when the vault is
    /// next loaded from the store.
    pub fn remove(&mut self, ids: &[MemoryId]) {
        for id in ids {
            // Marked even if not present yet: an embedding under way must not bring it back.
            if self.present.insert(*id) || !self.removed.insert(*id) {
                continue;
            }
            let Some(&position) = self.positions.get(id) else {
                continue;
            };
            // Its session neighbours become each other's, as a fresh load would link them.
            let (previous, next) = self.neighbours[position as usize];
            if let Some(previous) = previous {
                self.neighbours[previous as usize].1 = next;
            }
            if let Some(next) = next {
                self.neighbours[next as usize].0 = previous;
            }
            self.neighbours[position as usize] = (None, None);
            let session = self.meta[position as usize].session_id.clone();
            if self.last_in_session.get(&session) == Some(&position) {
                match previous {
                    Some(previous) => self.last_in_session.insert(session, previous),
                    None => self.last_in_session.remove(&session),
                };
            }
            self.lexical.remove(position as usize);
        }
    }

    /// The `k` most similar memories by cosine similarity, best first.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<Hit> {
        if k == 0 || self.is_empty() {
            return Vec::new();
        }
        let (mut hits, scan_from) = match &self.graph {
            Some(graph) => {
                // Deleted memories may take places in the graph's answer: ask for more.
                let wanted = k + self.removed.len().min(k);
                let ef = HNSW_EF_SEARCH.max(2 * wanted);
                let hits = graph
                    .hnsw
                    .search(query, wanted, ef)
                    .into_iter()
                    .map(|n| Hit {
                        id: self.ids[n.d_id],
                        score: 1.0 - n.distance,
                    })
                    .filter(|hit| !self.removed.contains(&hit.id))
                    .collect();
                (hits, graph.covered)
            }
            None => (Vec::new(), 0),
        };
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(k);
        if self.graph.is_some() && hits.len() < k.min(self.len()) {
            // Deleted memories crowded the graph's answer: scan everything instead.
            hits.clear();
            self.scan(query, 0, k, &mut hits);
            return hits;
        }
        if self.removed.is_empty() {
            exact_top_k(
                query,
                &self.ids[scan_from..],
                &self.vectors[scan_from * DIM..],
                k,
                &mut hits,
            );
        } else {
            self.scan(query, scan_from, k, &mut hits);
        }
        hits
    }

    /// Hybrid ranking: dense similarity and BM25 over each memory's session window, each
    /// standardised (z-scores) over the candidates, mixed by `dense_weight`, then each memory
    /// lifted by `neighbour_weight` times its best session neighbour's score (a question's answer
    /// is often the turn after it). A memory must pass `min_similarity` or `min_lexical` to be
    /// returned at all. Candidates: every memory (that `keep` accepts) below the graph size, else
    /// the graph's and the lexical index's best, the unindexed tail, and their neighbours.
    pub fn search_hybrid(
        &self,
        query: &[f32],
        terms: &[(String, u32)],
        k: usize,
        params: &HybridParams,
        keep: Option<&dyn Fn(&EntryMeta) -> bool>,
    ) -> Vec<Ranked> {
        if k == 0 || self.is_empty() {
            return Vec::new();
        }
        let live = |position: usize| {
            !self.removed.contains(&self.ids[position])
                && keep.is_none_or(|keep| keep(&self.meta[position]))
        };
        let lexical = self.lexical.scores(terms);
        let candidates: Vec<usize> = match (&self.graph, keep) {
            (Some(graph), None) => {
                let wanted = (4 * k).max(HNSW_CANDIDATES);
                let mut picked: HashSet<usize> = graph
                    .hnsw
                    .search(query, wanted, HNSW_EF_SEARCH.max(wanted))
                    .into_iter()
                    .map(|n| n.d_id)
                    .collect();
                picked.extend(graph.covered..self.ids.len());
                let mut by_lexical: Vec<usize> =
                    (0..lexical.len()).filter(|p| lexical[*p] > 0.0).collect();
                if by_lexical.len() > wanted {
                    by_lexical.select_nth_unstable_by(wanted - 1, |a, b| {
                        lexical[*b].total_cmp(&lexical[*a])
                    });
                    by_lexical.truncate(wanted);
                }
                picked.extend(by_lexical);
                let with_neighbours: Vec<usize> = picked
                    .iter()
                    .flat_map(|p| {
                        let (previous, next) = self.neighbours[*p];
                        [Some(*p as u32), previous, next]
                    })
                    .flatten()
                    .map(|p| p as usize)
                    .collect();
                let mut all: Vec<usize> = with_neighbours;
                all.sort_unstable();
                all.dedup();
                let live_candidates: Vec<usize> = all.into_iter().filter(|p| live(*p)).collect();
                if live_candidates.len() < k.min(self.len()) {
                    // Deleted memories crowded the graph's answer: rank the whole vault.
                    (0..self.ids.len()).filter(|p| live(*p)).collect()
                } else {
                    live_candidates
                }
            }
            _ => (0..self.ids.len()).filter(|p| live(*p)).collect(),
        };
        if candidates.is_empty() {
            return Vec::new();
        }
        let similarity: Vec<f32> = candidates
            .iter()
            .map(|p| dot(query, &self.vectors[p * DIM..(p + 1) * DIM]))
            .collect();
        let lexical_of: Vec<f32> = candidates.iter().map(|p| lexical[*p]).collect();
        let fused = fuse(&similarity, &lexical_of, params.dense_weight);
        // Position -> index in `candidates` (u32::MAX: not a candidate), for the neighbour lift.
        let mut slot = vec![u32::MAX; self.ids.len()];
        for (i, p) in candidates.iter().enumerate() {
            slot[*p] = i as u32;
        }
        let fused_at = |position: u32| match slot[position as usize] {
            u32::MAX => None,
            i => Some(fused[i as usize]),
        };
        let mut ranked: Vec<Ranked> = Vec::with_capacity(candidates.len());
        for (i, &position) in candidates.iter().enumerate() {
            if similarity[i] < params.min_similarity && lexical_of[i] < params.min_lexical {
                continue;
            }
            let (previous, next) = self.neighbours[position];
            let lift = [previous, next]
                .into_iter()
                .flatten()
                .filter_map(fused_at)
                .fold(None, |best: Option<f32>, s| {
                    Some(best.map_or(s, |b| b.max(s)))
                });
            ranked.push(Ranked {
                id: self.ids[position],
                // Only ever a lift: a weak neighbour must not sink a memory below one without.
                score: fused[i] + lift.map_or(0.0, |l| params.neighbour_weight * l.max(0.0)),
                similarity: similarity[i],
                lexical: lexical_of[i],
                previous: previous
                    .filter(|p| live(*p as usize))
                    .map(|p| self.ids[p as usize]),
            });
        }
        // The best k first, without sorting the whole vault.
        if ranked.len() > k {
            ranked.select_nth_unstable_by(k - 1, |a, b| b.score.total_cmp(&a.score));
            ranked.truncate(k);
        }
        ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
        ranked.truncate(k);
        ranked
    }

    /// Exact scan of positions `from..`, skipping deleted memories, merged into `hits`.
    fn scan(&self, query: &[f32], from: usize, k: usize, hits: &mut Vec<Hit>) {
        for position in from..self.ids.len() {
            let id = self.ids[position];
            if self.removed.contains(&id) {
                continue;
            }
            let vector = &self.vectors[position * DIM..(position + 1) * DIM];
            push_hit(
                hits,
                k,
                Hit {
                    id,
                    score: dot(query, vector),
                },
            );
        }
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(k);
    }

    /// Builds the HNSW graph over every vector present, on this thread (benchmarks and tests;
    /// the daemon builds graphs in the background).
    pub fn build_graph_now(&mut self) {
        self.graph = Some(Graph::build(&self.vectors));
    }

    /// Whether this vault should get a graph now (large, none yet, none building).
    fn wants_graph(&self, threshold: usize) -> bool {
        !self.building
            && self.ids.len() >= threshold
            && self
                .graph_failed_at
                .is_none_or(|failed| self.ids.len() >= 2 * failed)
            && self
                .graph
                .as_ref()
                .is_none_or(|g| self.ids.len() >= 2 * g.covered)
    }
}

impl Default for VaultIndex {
    fn default() -> Self {
        VaultIndex::new()
    }
}

/// Exact scan: merges the best `k` of `vectors` into `hits`, sorted best first.
pub fn exact_top_k(
    query: &[f32],
    ids: &[MemoryId],
    vectors: &[f32],
    k: usize,
    hits: &mut Vec<Hit>,
) {
    for (id, vector) in ids.iter().zip(vectors.chunks_exact(DIM)) {
        push_hit(
            hits,
            k,
            Hit {
                id: *id,
                score: dot(query, vector),
            },
        );
    }
    hits.sort_by(|a, b| b.score.total_cmp(&a.score));
    hits.truncate(k);
}

/// Keeps `hits` the best `k` seen so far: unsorted until full, then sorted best first.
#[inline]
fn push_hit(hits: &mut Vec<Hit>, k: usize, hit: Hit) {
    if hits.len() < k {
        hits.push(hit);
        if hits.len() == k {
            hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        }
    } else if hit.score > hits[k - 1].score {
        // Insert in place; k is small, so a shift beats a heap.
        let at = hits.partition_point(|h| h.score >= hit.score);
        hits.insert(at, hit);
        hits.pop();
    }
}

/// Dot product of two equal-length vectors: the cosine similarity of unit vectors. Uses AVX2
/// and FMA when the CPU has them (checked once), else portable code the compiler vectorises.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        if *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
        {
            // SAFETY: the CPU supports the features this function is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// The loop both paths share. `FUSED` selects fused multiply-add, which is one instruction
/// where FMA is compiled in and a slow library call where it is not.
#[inline(always)]
fn dot_with<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    // Sixteen independent accumulators let the compiler vectorise and pipeline the loop.
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for (ca, cb) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for i in 0..16 {
            acc[i] = if FUSED {
                ca[i].mul_add(cb[i], acc[i])
            } else {
                acc[i] + ca[i] * cb[i]
            };
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 16..a.len().min(b.len()) {
        sum += a[i] * b[i];
    }
    sum
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    dot_with::<false>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_with::<true>(a, b)
}

/// The HNSW distance for unit vectors: 1 - cosine, with the same fast dot product as the scan.
#[derive(Clone, Copy, Default)]
pub struct UnitDistance;

impl Distance<f32> for UnitDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

impl Graph {
    /// An HNSW graph over flat vectors, covering all of them. Built on the calling thread
    /// only: a background build takes one core and leaves the other to queries (on two cores
    /// a parallel build starved them: prepare p50 266 ms while a 100k vault's graph was built).
    fn build(vectors: &[f32]) -> Graph {
        let covered = vectors.len() / DIM;
        let hnsw = Hnsw::new(
            HNSW_LINKS,
            covered,
            HNSW_LAYERS,
            HNSW_EF_CONSTRUCTION,
            UnitDistance,
        );
        for (i, vector) in vectors.chunks_exact(DIM).enumerate() {
            hnsw.insert_slice((vector, i));
        }
        Graph { hnsw, covered }
    }
}

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
        store: &Arc<Store>,
        vault: VaultId,
        cipher: &VaultCipher,
        f: impl FnOnce(&VaultIndex) -> T,
    ) -> anyhow::Result<T> {
        let slot = self.slot(vault);
        let loaded = slot.get_or_init(|| {
            load(store, vault, cipher)
                .map(RwLock::new)
                .map_err(|e| format!("{e:#}"))
        });
        let index = match loaded {
            Ok(index) => index,
            Err(error) => {
                // Not cached: the next query tries again (a passing I/O error must not stick).
                let mut slots = self.slots.lock().expect("index map lock");
                if slots
                    .get(&vault)
                    .is_some_and(|current| Arc::ptr_eq(current, &slot))
                {
                    slots.remove(&vault);
                }
                anyhow::bail!("loading the index of {vault}: {error}");
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
    pub fn insert(self: &Arc<Self>, vault: VaultId, items: &[(MemoryId, Vec<f32>, EntryMeta)]) {
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

fn load(store: &Store, vault: VaultId, cipher: &VaultCipher) -> anyhow::Result<VaultIndex> {
    let mut index = VaultIndex::new();
    for (id, vector, mut meta) in store.vault_vectors(vault, cipher)? {
        if meta.terms.is_empty() {
            // Stored without its terms (or it has none): derived again from the text.
            if let Some(record) = store.memory(vault, cipher, id)? {
                meta.terms = crate::lexical::terms(&record.content);
            }
        }
        index.insert_with_meta(id, &vector, meta);
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut v: Vec<f32> = (0..DIM)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    #[test]
    fn both_dot_products_agree() {
        let (a, b) = (unit(1), unit(2));
        let expected: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot_portable(&a, &b) - expected).abs() < 1e-5);
        assert!((dot(&a, &b) - expected).abs() < 1e-5);
    }

    #[test]
    fn exact_scan_ranks_the_query_itself_first() {
        let mut index = VaultIndex::new();
        for i in 0..100 {
            index.insert(MemoryId(i), &unit(i));
        }
        let hits = index.search(&unit(42), 5);
        assert_eq!(hits.len(), 5);
        assert_eq!(hits[0].id, MemoryId(42));
        assert!((hits[0].score - 1.0).abs() < 1e-4);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn inserting_twice_keeps_one_copy() {
        let mut index = VaultIndex::new();
        index.insert(MemoryId(1), &unit(1));
        index.insert(MemoryId(1), &unit(1));
        assert_eq!(index.len(), 1);
        assert_eq!(index.search(&unit(1), 10).len(), 1);
    }

    #[test]
    fn removed_memories_are_never_found_nor_taken_back() {
        let mut index = VaultIndex::new();
        for i in 0..50 {
            index.insert(MemoryId(i), &unit(i));
        }
        index.remove(&[MemoryId(7), MemoryId(99)]);
        assert_eq!(index.len(), 50 - 1);
        assert!(index
            .search(&unit(7), 50)
            .iter()
            .all(|h| h.id != MemoryId(7)));
        index.insert(MemoryId(7), &unit(7));
        index.insert(MemoryId(99), &unit(99));
        assert!(index
            .search(&unit(7), 50)
            .iter()
            .all(|h| h.id != MemoryId(7)));
        assert!(index
            .search(&unit(99), 50)
            .iter()
            .all(|h| h.id != MemoryId(99)));

        let mut graphed = VaultIndex::new();
        for i in 0..600 {
            graphed.insert(MemoryId(i), &unit(i));
        }
        graphed.build_graph_now();
        graphed.remove(&[MemoryId(3)]);
        let hits = graphed.search(&unit(3), 5);
        assert_eq!(hits.len(), 5);
        assert!(hits.iter().all(|h| h.id != MemoryId(3)));
    }

    #[test]
    fn filtered_search_sees_only_matching_memories() {
        let mut index = VaultIndex::new();
        for i in 0..100 {
            let meta = EntryMeta {
                created_at_ms: i as i64,
                session_id: None,
                tags: if i % 10 == 0 {
                    vec!["rare".into()]
                } else {
                    Vec::new()
                },
                terms: Vec::new(),
            };
            index.insert_with_meta(MemoryId(i), &unit(i), meta);
        }
        let rare = |m: &EntryMeta| m.tags.iter().any(|t| t == "rare");
        let hits = index.search_hybrid(&unit(5), &[], 20, &PARAMS, Some(&rare));
        let mut ids: Vec<u64> = hits.iter().map(|h| h.id.0).collect();
        ids.sort();
        assert_eq!(ids, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]);
        assert!(index
            .search_hybrid(&unit(5), &[], 0, &PARAMS, Some(&|_: &EntryMeta| true))
            .is_empty());
    }

    #[test]
    fn fusion_standardises_each_signal_before_mixing() {
        // Scales do not matter: a tenfold lexical score changes nothing.
        let dense = [0.9, 0.5, 0.1];
        let lexical = [0.0, 2.0, 4.0];
        let tenfold: Vec<f32> = lexical.iter().map(|x| x * 10.0).collect();
        let (once, ten) = (fuse(&dense, &lexical, 0.5), fuse(&dense, &tenfold, 0.5));
        assert!(once.iter().zip(&ten).all(|(a, b)| (a - b).abs() < 1e-5));
        let dense_only = fuse(&dense, &lexical, 1.0);
        assert!(dense_only[0] > dense_only[1] && dense_only[1] > dense_only[2]);
        let lexical_only = fuse(&dense, &lexical, 0.0);
        assert!(lexical_only[2] > lexical_only[1] && lexical_only[1] > lexical_only[0]);
        // A constant signal adds nothing, and noise is not blown up to a whole deviation.
        assert_eq!(fuse(&[0.3, 0.3], &[1.0, 2.0], 0.5)[0], -0.5);
        let near = fuse(&[0.801, 0.800], &[0.0, 0.0], 1.0);
        assert!((near[0] - near[1]).abs() < 0.05, "{near:?}");
    }

    fn meta(session: &str, text: &str) -> EntryMeta {
        EntryMeta {
            created_at_ms: 0,
            session_id: Some(session.into()),
            tags: Vec::new(),
            terms: crate::lexical::terms(text),
        }
    }

    const PARAMS: HybridParams = HybridParams {
        dense_weight: 0.6,
        neighbour_weight: 0.35,
        min_similarity: f32::NEG_INFINITY,
        min_lexical: f32::NEG_INFINITY,
    };

    #[test]
    fn hybrid_ranking_uses_words_vectors_and_neighbours() {
        let mut index = VaultIndex::new();
        // Only the museum question and its answer share a session.
        let texts = [
            ("a", "we talked about the weather"),
            ("b", "my locker code is zx81"),
            ("c", "did you visit the museum"),
            ("c", "yes on sunday"),
            ("d", "the bakery sells bread"),
        ];
        for (i, (session, text)) in texts.iter().enumerate() {
            index.insert_with_meta(MemoryId(i as u64), &unit(i as u64), meta(session, text));
        }
        // A query vector close to memory 4, with the words of memory 1.
        let ranked =
            index.search_hybrid(&unit(4), &crate::lexical::terms("zx81"), 5, &PARAMS, None);
        let mut top: Vec<u64> = ranked[..2].iter().map(|r| r.id.0).collect();
        top.sort();
        assert_eq!(
            top,
            [1, 4],
            "the vector's match and the word's match: {ranked:?}"
        );
        assert_eq!(ranked[0].previous, None);
        // The short answer is lifted by the question before it.
        let ranked =
            index.search_hybrid(&unit(2), &crate::lexical::terms("museum"), 5, &PARAMS, None);
        assert_eq!(ranked[0].id, MemoryId(2));
        assert_eq!(ranked[1].id, MemoryId(3), "{ranked:?}");
        assert_eq!(ranked[1].previous, Some(MemoryId(2)));
        // Floors: nothing similar and no word in common is nothing at all.
        let strict = HybridParams {
            min_similarity: 0.99,
            min_lexical: 0.5,
            ..PARAMS
        };
        let ranked =
            index.search_hybrid(&unit(99), &crate::lexical::terms("zx81"), 5, &strict, None);
        let ids: Vec<u64> = ranked.iter().map(|r| r.id.0).collect();
        assert_eq!(ids, [1]);
        // Deleted memories are never returned.
        index.remove(&[MemoryId(1)]);
        let ranked =
            index.search_hybrid(&unit(4), &crate::lexical::terms("zx81"), 5, &PARAMS, None);
        assert!(ranked.iter().all(|r| r.id != MemoryId(1)));
    }

    #[test]
    fn session_chains_skip_deleted_memories_and_long_silences() {
        let at = |minutes: i64, text: &str| EntryMeta {
            created_at_ms: minutes * 60_000,
            session_id: None,
            tags: Vec::new(),
            terms: crate::lexical::terms(text),
        };
        let mut index = VaultIndex::new();
        index.insert_with_meta(MemoryId(0), &unit(0), at(0, "pottery workshop"));
        index.insert_with_meta(MemoryId(1), &unit(1), at(1, "zx81"));
        index.insert_with_meta(MemoryId(2), &unit(2), at(2, "last tuesday"));
        index.insert_with_meta(MemoryId(3), &unit(3), at(300, "much later"));
        let previous_of = |index: &VaultIndex, id: u64| {
            index
                .search_hybrid(&unit(id), &[], 10, &PARAMS, None)
                .into_iter()
                .find(|r| r.id == MemoryId(id))
                .and_then(|r| r.previous)
        };
        assert_eq!(previous_of(&index, 1), Some(MemoryId(0)));
        assert_eq!(
            previous_of(&index, 3),
            None,
            "five hours later is another conversation"
        );
        index.remove(&[MemoryId(1)]);
        assert_eq!(
            previous_of(&index, 2),
            Some(MemoryId(0)),
            "relinked past the deleted one"
        );
        let terms = crate::lexical::terms("zx81");
        let ranked = index.search_hybrid(&unit(9), &terms, 10, &PARAMS, None);
        assert!(ranked.iter().all(|r| r.lexical == 0.0), "{ranked:?}");
    }

    #[test]
    fn graph_and_tail_together_find_old_and_new_memories() {
        let mut index = VaultIndex::new();
        for i in 0..2000 {
            index.insert(MemoryId(i), &unit(i));
        }
        index.build_graph_now();
        for i in 2000..2100 {
            index.insert(MemoryId(i), &unit(i));
        }
        assert_eq!(index.search(&unit(7), 3)[0].id, MemoryId(7));
        assert_eq!(index.search(&unit(2050), 3)[0].id, MemoryId(2050));
    }

    #[test]
    fn past_the_budget_the_least_recently_queried_indexes_are_dropped_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        // Room for two vaults of 100.
        let indexes = Arc::new(Indexes::new(1000, 250));
        let cipher = VaultCipher::new(&[1; 32]);
        let vaults: Vec<VaultId> = (0..3).map(|_| VaultId::generate()).collect();
        for (n, vault) in vaults.iter().enumerate() {
            let items: Vec<(MemoryId, Vec<f32>, EntryMeta)> = (0..100)
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
                assert_eq!(index.search(&unit(1007), 1)[0].id, MemoryId(1007));
            })
            .unwrap();
        // An erased vault's index leaves the count.
        indexes.forget(vaults[1]);
        assert_eq!(indexes.loaded_memories(), 100);
    }

    /// Queries the vault until its background graph build has finished.
    fn wait_for_graph(
        indexes: &Arc<Indexes>,
        store: &Arc<Store>,
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
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        let indexes = Arc::new(Indexes::new(1000, usize::MAX));
        let vault = VaultId::generate();
        let cipher = VaultCipher::new(&[1; 32]);
        let items: Vec<(MemoryId, Vec<f32>, EntryMeta)> = (0..1000)
            .map(|i| (MemoryId(i), unit(i), EntryMeta::default()))
            .collect();
        store.insert_vectors(vault, &cipher, &items).unwrap();
        wait_for_graph(&indexes, &store, vault, &cipher);
    }

    #[test]
    fn a_vault_crossing_the_threshold_gets_a_graph_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
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
        let items: Vec<(MemoryId, Vec<f32>, EntryMeta)> = (0..1200)
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
                    index.search(&unit(3), 1)[0].id,
                    MemoryId(3),
                    "found through the graph"
                );
                assert_eq!(
                    index.search(&unit(1100), 1)[0].id,
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
