//! The hybrid ranking prepare and search use: dense similarity and BM25 over session windows,
//! each standardised over the candidates, fused, then lifted by session neighbours
//! (docs/retrieval.md says how each step was chosen and what it gained).

use std::collections::HashSet;

use super::dot::dot;
use super::graph::HNSW_EF_SEARCH;
use super::vault::VaultIndex;
use crate::ids::MemoryId;
use crate::store::EntryMeta;

/// Dense candidates the hybrid ranking takes from an HNSW graph, at least.
const HNSW_CANDIDATES: usize = 256;

/// Least deviations the standardisation divides by. In a vault of a handful of memories a
/// difference of noise (two near-identical sentences) would otherwise become a whole standard
/// deviation. On LoCoMo the real deviations are 0.08-0.15 (cosine) and 0.3-1.9 (BM25) per query,
/// so these floors rarely bind there.
const MIN_DENSE_DEVIATION: f32 = 0.05;
const MIN_LEXICAL_DEVIATION: f32 = 0.25;

/// How the hybrid ranking mixes its signals.
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
    /// The memories before and after it in its session, if any.
    pub previous: Option<MemoryId>,
    pub next: Option<MemoryId>,
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

impl VaultIndex {
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
                    .nearest(query, wanted, HNSW_EF_SEARCH.max(wanted))
                    .into_iter()
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
                let mut all: Vec<usize> = picked
                    .iter()
                    .flat_map(|p| {
                        let (previous, next) = self.links.neighbours(*p);
                        [Some(*p as u32), previous, next]
                    })
                    .flatten()
                    .map(|p| p as usize)
                    .collect();
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
            .map(|p| dot(query, self.vector(*p)))
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
            let (previous, next) = self.links.neighbours(position);
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
                next: next
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
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::index::{terms, TERMS_VERSION};
    use crate::vector::{UnitVector, DIM};

    /// A pseudo-random unit vector; different seeds are nearly orthogonal.
    pub fn unit(seed: u64) -> UnitVector {
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
        UnitVector::new(v).unwrap()
    }

    pub const PARAMS: HybridParams = HybridParams {
        dense_weight: 0.6,
        neighbour_weight: 0.35,
        min_similarity: f32::NEG_INFINITY,
        min_lexical: f32::NEG_INFINITY,
    };

    /// Dense similarity alone, through the public ranking.
    pub const DENSE: HybridParams = HybridParams {
        dense_weight: 1.0,
        neighbour_weight: 0.0,
        min_similarity: f32::NEG_INFINITY,
        min_lexical: f32::NEG_INFINITY,
    };

    /// The `k` most similar memories by cosine similarity, best first.
    pub fn nearest(index: &VaultIndex, query: &UnitVector, k: usize) -> Vec<Ranked> {
        index.search_hybrid(query, &[], k, &DENSE, None)
    }

    fn meta(session: &str, text: &str) -> EntryMeta {
        EntryMeta {
            created_at_ms: 0,
            session_id: Some(session.into()),
            tags: Vec::new(),
            terms: terms(text),
            terms_version: TERMS_VERSION,
        }
    }

    #[test]
    fn the_query_itself_ranks_first() {
        let mut index = VaultIndex::new();
        for i in 0..100 {
            index.insert(MemoryId(i), &unit(i));
        }
        let hits = nearest(&index, &unit(42), 5);
        assert_eq!(hits.len(), 5);
        assert_eq!(hits[0].id, MemoryId(42));
        assert!((hits[0].similarity - 1.0).abs() < 1e-4);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn inserting_twice_keeps_one_copy() {
        let mut index = VaultIndex::new();
        index.insert(MemoryId(1), &unit(1));
        index.insert(MemoryId(1), &unit(1));
        assert_eq!(index.len(), 1);
        assert_eq!(nearest(&index, &unit(1), 10).len(), 1);
    }

    #[test]
    fn removed_memories_are_never_found_nor_taken_back() {
        let mut index = VaultIndex::new();
        for i in 0..50 {
            index.insert(MemoryId(i), &unit(i));
        }
        index.remove(&[MemoryId(7), MemoryId(99)]);
        assert_eq!(index.len(), 50 - 1);
        assert!(nearest(&index, &unit(7), 50)
            .iter()
            .all(|h| h.id != MemoryId(7)));
        index.insert(MemoryId(7), &unit(7));
        index.insert(MemoryId(99), &unit(99));
        assert!(nearest(&index, &unit(7), 50)
            .iter()
            .all(|h| h.id != MemoryId(7)));
        assert!(nearest(&index, &unit(99), 50)
            .iter()
            .all(|h| h.id != MemoryId(99)));

        let mut graphed = VaultIndex::new();
        for i in 0..600 {
            graphed.insert(MemoryId(i), &unit(i));
        }
        graphed.build_graph_now();
        graphed.remove(&[MemoryId(3)]);
        let hits = nearest(&graphed, &unit(3), 5);
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
                terms_version: TERMS_VERSION,
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
        let ranked = index.search_hybrid(&unit(4), &terms("zx81"), 5, &PARAMS, None);
        let mut top: Vec<u64> = ranked[..2].iter().map(|r| r.id.0).collect();
        top.sort();
        assert_eq!(
            top,
            [1, 4],
            "the vector's match and the word's match: {ranked:?}"
        );
        assert_eq!(ranked[0].previous, None);
        // The short answer is lifted by the question before it.
        let ranked = index.search_hybrid(&unit(2), &terms("museum"), 5, &PARAMS, None);
        assert_eq!(ranked[0].id, MemoryId(2));
        assert_eq!(ranked[1].id, MemoryId(3), "{ranked:?}");
        assert_eq!(ranked[1].previous, Some(MemoryId(2)));
        // Floors: nothing similar and no word in common is nothing at all.
        let strict = HybridParams {
            min_similarity: 0.99,
            min_lexical: 0.5,
            ..PARAMS
        };
        let ranked = index.search_hybrid(&unit(99), &terms("zx81"), 5, &strict, None);
        let ids: Vec<u64> = ranked.iter().map(|r| r.id.0).collect();
        assert_eq!(ids, [1]);
        // Deleted memories are never returned.
        index.remove(&[MemoryId(1)]);
        let ranked = index.search_hybrid(&unit(4), &terms("zx81"), 5, &PARAMS, None);
        assert!(ranked.iter().all(|r| r.id != MemoryId(1)));
    }

    #[test]
    fn session_chains_skip_deleted_memories_and_long_silences() {
        let at = |minutes: i64, text: &str| EntryMeta {
            created_at_ms: minutes * 60_000,
            session_id: None,
            tags: Vec::new(),
            terms: terms(text),
            terms_version: TERMS_VERSION,
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
        let ranked = index.search_hybrid(&unit(9), &terms("zx81"), 10, &PARAMS, None);
        assert!(ranked.iter().all(|r| r.lexical == 0.0), "{ranked:?}");
    }

    #[test]
    fn the_order_memories_reach_the_index_changes_nothing() {
        let words = [
            "museum", "sunday", "pottery", "tuesday", "zx81", "bakery", "bread",
        ];
        let memory = |i: u64| {
            let meta = EntryMeta {
                created_at_ms: 1000 * (i as i64 / 2),
                session_id: Some(format!("s{}", i / 6)),
                tags: Vec::new(),
                terms: terms(&format!(
                    "{} {}",
                    words[i as usize % 7],
                    words[(i as usize * 3) % 7]
                )),
                terms_version: TERMS_VERSION,
            };
            (MemoryId(i), unit(i), meta)
        };
        let mut in_order = VaultIndex::new();
        for i in 0..30 {
            let (id, vector, meta) = memory(i);
            in_order.insert_with_meta(id, &vector, meta);
        }
        // As the indexer might bring them: a scrambled order.
        let mut scrambled = VaultIndex::new();
        for i in (0..30).map(|i| (i * 7 + 3) % 30) {
            let (id, vector, meta) = memory(i);
            scrambled.insert_with_meta(id, &vector, meta);
        }
        for (query, text) in [(3, "museum sunday"), (11, "zx81"), (20, "bread pottery")] {
            let a = in_order.search_hybrid(&unit(query), &terms(text), 10, &PARAMS, None);
            let b = scrambled.search_hybrid(&unit(query), &terms(text), 10, &PARAMS, None);
            let ids = |r: &[Ranked]| {
                r.iter()
                    .map(|r| (r.id, r.previous, r.next))
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids(&a), ids(&b), "{text}");
            for (x, y) in a.iter().zip(&b) {
                assert!((x.score - y.score).abs() < 1e-4, "{text}: {a:?} vs {b:?}");
            }
        }
        // And removing one relinks both alike.
        in_order.remove(&[MemoryId(13)]);
        scrambled.remove(&[MemoryId(13)]);
        let a = in_order.search_hybrid(&unit(12), &terms("zx81 bakery"), 10, &PARAMS, None);
        let b = scrambled.search_hybrid(&unit(12), &terms("zx81 bakery"), 10, &PARAMS, None);
        assert_eq!(
            a.iter().map(|r| (r.id, r.previous)).collect::<Vec<_>>(),
            b.iter().map(|r| (r.id, r.previous)).collect::<Vec<_>>()
        );
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
        assert_eq!(nearest(&index, &unit(7), 3)[0].id, MemoryId(7));
        assert_eq!(nearest(&index, &unit(2050), 3)[0].id, MemoryId(2050));
    }
}
