//! One vault's index: its vectors flat in memory, each with the metadata filters read, the
//! session chain, the lexical index over session windows, and an HNSW graph over a prefix of
//! the vectors once the vault is large. Ranked by [`super::hybrid`].

use std::collections::{HashMap, HashSet};

use super::graph::Graph;
use super::lexical::LexicalIndex;
use super::session::SessionLinks;
use crate::ids::MemoryId;
use crate::store::{EntryMeta, VaultVersion};
use crate::vector::{UnitVector, DIM};

/// Memories without a session are chained only when this close in time (30 minutes).
const SESSIONLESS_GAP_MS: i64 = 30 * 60 * 1000;

/// The vectors of one vault, flat, plus an optional HNSW graph over a prefix of them.
#[derive(Default)]
pub struct VaultIndex {
    pub(super) ids: Vec<MemoryId>,
    pub(super) vectors: Vec<f32>,
    /// Beside each vector: what filters look at (date, session, tags); its terms are moved into
    /// the lexical index.
    pub(super) meta: Vec<EntryMeta>,
    /// Every id ever inserted, so a late insert of a deleted memory is not taken back in.
    present: HashSet<MemoryId>,
    /// Deleted memories still in the arrays (and the graph); skipped by every search.
    pub(super) removed: HashSet<MemoryId>,
    /// BM25 over each memory's window (itself and its session neighbours).
    pub(super) lexical: LexicalIndex,
    pub(super) links: SessionLinks,
    /// Memory id -> position.
    positions: HashMap<MemoryId, u32>,
    pub(super) graph: Option<Graph>,
    pub(super) building: bool,
    /// The size at which a graph build failed: none is tried again until the vault doubles,
    /// so a build that panics is not retried on every query.
    pub(super) graph_failed_at: Option<usize>,
    /// The store's version of the vault this index holds everything up to, when other
    /// processes write the store too (`Vectors::vault_version`).
    pub(super) store_version: Option<VaultVersion>,
}

impl VaultIndex {
    pub fn new() -> VaultIndex {
        VaultIndex::default()
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

    /// Adds a vector with no metadata (benchmarks and tests).
    pub fn insert(&mut self, id: MemoryId, vector: &UnitVector) {
        self.insert_with_meta(id, vector, EntryMeta::default());
    }

    /// Adds a vector. A memory already present takes the new vector in place (embedded again
    /// with another model: `--reembed`); its metadata and links stay. A deleted one is left out.
    pub fn insert_with_meta(&mut self, id: MemoryId, vector: &UnitVector, mut meta: EntryMeta) {
        if !self.present.insert(id) {
            if let (Some(&position), false) = (self.positions.get(&id), self.removed.contains(&id))
            {
                let position = position as usize;
                self.vectors[position * DIM..(position + 1) * DIM].copy_from_slice(vector);
            }
            return;
        }
        let stored = &self.meta;
        let at_ms = meta.created_at_ms;
        let sessionless = meta.session_id.is_none();
        // Without a session, only memories close in time are taken to be one conversation.
        let time_of = |p: u32| stored.get(p as usize).map_or(at_ms, |m| m.created_at_ms);
        let place = (at_ms, id.0);
        let inserted = self.links.insert(meta.session_id.clone(), place, |a, b| {
            !sessionless || (time_of(a) - time_of(b)).abs() <= SESSIONLESS_GAP_MS
        });
        self.lexical.insert(&meta.terms, &self.links, inserted);
        let position = inserted.position;
        self.positions.insert(id, position);
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
            let position = position as usize;
            let (previous, next) = self.links.neighbours(position);
            let meta = &self.meta[position];
            let place = (meta.created_at_ms, id.0);
            let sessionless = meta.session_id.is_none();
            let stored = &self.meta;
            let joined = self
                .links
                .unlink(position, &meta.session_id, place, |a, b| {
                    !sessionless
                        || (stored[a as usize].created_at_ms - stored[b as usize].created_at_ms)
                            .abs()
                            <= SESSIONLESS_GAP_MS
                });
            self.lexical.remove(position, previous, next, joined);
        }
    }

    /// The vector at a position.
    pub(super) fn vector(&self, position: usize) -> &[f32] {
        &self.vectors[position * DIM..(position + 1) * DIM]
    }

    /// Builds the HNSW graph over every vector present, on this thread (benchmarks and tests;
    /// the daemon builds graphs in the background).
    pub fn build_graph_now(&mut self) {
        self.graph = Some(Graph::build(&self.vectors));
    }

    /// Whether this vault should get a graph now (large, none yet, none building).
    pub(super) fn wants_graph(&self, threshold: usize) -> bool {
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
