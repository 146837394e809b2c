//! The session chain of a vault index: each position's previous and next position in its
//! conversation, kept once for the whole index (the lexical windows and the neighbour lift
//! both read it).
//!
//! A memory's place in its session is its time, then its id: the order it was said in, not
//! the order it reached the index (the indexer embeds by length, imports may bring older turns
//! late, ingests into one session may race). So a memory inserted late is linked between the
//! two it falls between, and the chain is what a fresh load of the same memories would build.
//! Memories without a session count as one conversation, in which two neighbours in time are
//! linked only where the caller says they are close enough.

use std::collections::{BTreeMap, HashMap};

/// A memory's place in its session: its time (ms), then its id.
pub type Place = (i64, u64);

/// Where an insert put a position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inserted {
    pub position: u32,
    /// Its neighbours now.
    pub previous: Option<u32>,
    pub next: Option<u32>,
    /// Whether `previous` and `next` were each other's neighbours before (each held the
    /// other in its window, which now holds the new position instead).
    pub split: bool,
}

#[derive(Default)]
pub struct SessionLinks {
    /// Each position's previous and next position in the same session.
    links: Vec<(Option<u32>, Option<u32>)>,
    /// Each session's positions by place (no session counts as one).
    order: HashMap<Option<String>, BTreeMap<Place, u32>>,
}

impl SessionLinks {
    /// The previous and next positions of `position` in its session.
    pub fn neighbours(&self, position: usize) -> (Option<u32>, Option<u32>) {
        self.links.get(position).copied().unwrap_or((None, None))
    }

    pub fn previous(&self, position: usize) -> Option<u32> {
        self.neighbours(position).0
    }

    /// Links the next position at `place` in `session`, between the positions just before and
    /// after that place, each only where `linkable` takes the two as one conversation.
    pub fn insert(
        &mut self,
        session: Option<String>,
        place: Place,
        linkable: impl Fn(u32, u32) -> bool,
    ) -> Inserted {
        let position = self.links.len() as u32;
        let chain = self.order.entry(session).or_default();
        let before = chain.range(..place).next_back().map(|(_, p)| *p);
        let after = chain
            .range((std::ops::Bound::Excluded(place), std::ops::Bound::Unbounded))
            .next()
            .map(|(_, p)| *p);
        chain.insert(place, position);
        let split = matches!((before, after), (Some(b), Some(a))
            if self.links[b as usize].1 == Some(a));
        let previous = before.filter(|b| linkable(*b, position));
        let next = after.filter(|a| linkable(position, *a));
        if split {
            // The two were linked; now each is linked to the new position, or to nothing.
            self.links[before.unwrap_or_default() as usize].1 = None;
            self.links[after.unwrap_or_default() as usize].0 = None;
        }
        if let Some(previous) = previous {
            self.links[previous as usize].1 = Some(position);
        }
        if let Some(next) = next {
            self.links[next as usize].0 = Some(position);
        }
        self.links.push((previous, next));
        Inserted {
            position,
            previous,
            next,
            split,
        }
    }

    /// Takes `position` (at `place` in `session`) out of its session: its neighbours become
    /// each other's where `linkable` takes them as one conversation, as a fresh load of the
    /// remaining memories would link them. Whether they did.
    pub fn unlink(
        &mut self,
        position: usize,
        session: &Option<String>,
        place: Place,
        linkable: impl Fn(u32, u32) -> bool,
    ) -> bool {
        let (previous, next) = self.neighbours(position);
        if let Some(chain) = self.order.get_mut(session) {
            chain.remove(&place);
            if chain.is_empty() {
                self.order.remove(session);
            }
        }
        let joined = match (previous, next) {
            (Some(p), Some(n)) => linkable(p, n),
            _ => false,
        };
        if let Some(previous) = previous {
            self.links[previous as usize].1 = next.filter(|_| joined);
        }
        if let Some(next) = next {
            self.links[next as usize].0 = previous.filter(|_| joined);
        }
        if let Some(links) = self.links.get_mut(position) {
            *links = (None, None);
        }
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn always(_: u32, _: u32) -> bool {
        true
    }

    #[test]
    fn sessions_chain_apart_and_rejoin_around_an_unlinked_position() {
        let mut links = SessionLinks::default();
        let a = Some("a".to_owned());
        assert_eq!(links.insert(a.clone(), (0, 0), always).previous, None);
        assert_eq!(
            links.insert(Some("b".into()), (0, 1), always).previous,
            None
        );
        assert_eq!(links.insert(a.clone(), (0, 2), always).previous, Some(0));
        assert_eq!(links.insert(a.clone(), (0, 3), always).previous, Some(2));
        assert_eq!(links.neighbours(2), (Some(0), Some(3)));
        assert!(links.unlink(2, &a, (0, 2), always));
        assert_eq!(links.neighbours(0), (None, Some(3)));
        assert_eq!(links.neighbours(3), (Some(0), None));
        links.unlink(3, &a, (0, 3), always);
        assert_eq!(
            links.insert(a, (0, 4), always).previous,
            Some(0),
            "0 is the latest"
        );
    }

    #[test]
    fn a_memory_arriving_late_is_linked_between_its_neighbours_in_time() {
        let mut links = SessionLinks::default();
        let s = Some("s".to_owned());
        // Said in the order 10, 20, 30; reaching the index as 30, 10, 20.
        let thirty = links.insert(s.clone(), (30, 3), always);
        let ten = links.insert(s.clone(), (10, 1), always);
        assert_eq!(
            (ten.previous, ten.next, ten.split),
            (None, Some(thirty.position), false)
        );
        let twenty = links.insert(s.clone(), (20, 2), always);
        assert_eq!(
            (twenty.previous, twenty.next, twenty.split),
            (Some(ten.position), Some(thirty.position), true)
        );
        assert_eq!(
            links.neighbours(ten.position as usize),
            (None, Some(twenty.position))
        );
        assert_eq!(
            links.neighbours(thirty.position as usize),
            (Some(twenty.position), None)
        );
        // Same time: the id decides (a user turn and its reply, stored together).
        let reply = links.insert(s.clone(), (30, 5), always);
        let question = links.insert(s, (30, 4), always);
        assert_eq!(
            links.neighbours(question.position as usize),
            (Some(thirty.position), Some(reply.position))
        );
    }

    #[test]
    fn unlinkable_neighbours_stay_apart_on_insert_and_on_unlink() {
        let mut links = SessionLinks::default();
        let first = links.insert(None, (0, 0), always);
        let far = links.insert(None, (100, 9), |_, _| false);
        assert_eq!(links.neighbours(far.position as usize), (None, None));
        let middle = links.insert(None, (50, 5), always);
        assert_eq!(middle.previous, Some(first.position));
        assert_eq!(middle.next, Some(far.position));
        assert!(!links.unlink(middle.position as usize, &None, (50, 5), |_, _| false));
        assert_eq!(links.neighbours(first.position as usize), (None, None));
        assert_eq!(links.neighbours(far.position as usize), (None, None));
    }
}
