//! The HNSW graph a large vault's dense search uses, over the vectors present when it was
//! built (`hnsw_rs`; it has no deletion, so deleted memories are filtered out of its answers).

use hnsw_rs::prelude::{Distance, Hnsw};

use super::dot::dot;
use crate::vector::DIM;

/// HNSW parameters: 16 links a node (well under the library's limit of 256, which it enforces
/// by exiting the process), construction breadth 200, search breadth 256
/// (docs/benchmarks.md, "Vector search in one vault").
const HNSW_LINKS: usize = 16;
const HNSW_LAYERS: usize = 16;
const HNSW_EF_CONSTRUCTION: usize = 200;
pub const HNSW_EF_SEARCH: usize = 256;

/// The HNSW distance for unit vectors: 1 - cosine, with the same fast dot product as the scan.
#[derive(Clone, Copy, Default)]
pub struct UnitDistance;

impl Distance<f32> for UnitDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

pub struct Graph {
    hnsw: Hnsw<'static, f32, UnitDistance>,
    /// The graph covers positions `..covered` of its vault index.
    pub covered: usize,
}

impl Graph {
    /// An HNSW graph over flat vectors, covering all of them. Built on the calling thread
    /// only: a background build takes one core and leaves the other to queries (on two cores
    /// a parallel build starved them: prepare p50 266 ms while a 100k vault's graph was built).
    pub fn build(vectors: &[f32]) -> Graph {
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

    /// The positions of about the `wanted` nearest vectors, searched with breadth `ef`.
    pub fn nearest(&self, query: &[f32], wanted: usize, ef: usize) -> Vec<usize> {
        self.hnsw
            .search(query, wanted, ef)
            .into_iter()
            .map(|n| n.d_id)
            .collect()
    }
}
