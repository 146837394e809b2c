//! The session chain of a vault index: each position's previous and next position in its
//! conversation, kept once for the whole index (the lexical windows and the neighbour lift
//! both read it).
//!
//! Positions are linked in the order they reach the index. Memories without a session count as
//! one conversation, chained only where the caller says two of them are close enough in time.

use std::collections::HashMap;

#[derive(Default)]
pub struct SessionLinks {
    /// Each position's previous and next position in the same session.
    links: Vec<(Option<u32>, Option<u32>)>,
    /// The latest position of each session (no session counts as one).
    last: HashMap<Option<String>, u32>,
}

impl SessionLinks {
    /// The previous and next positions of `position` in its session.
    pub fn neighbours(&self, position: usize) -> (Option<u32>, Option<u32>) {
        self.links.get(position).copied().unwrap_or((None, None))
    }

    pub fn previous(&self, position: usize) -> Option<u32> {
        self.neighbours(position).0
    }

    /// Links the next position as the latest of `session`: after the session's latest so far
    /// when `linkable` accepts that one. Returns the new position and its previous.
    pub fn push(
        &mut self,
        session: Option<String>,
        linkable: impl FnOnce(u32) -> bool,
    ) -> (u32, Option<u32>) {
        let position = self.links.len() as u32;
        let previous = self.last.insert(session, position).filter(|p| linkable(*p));
        if let Some(previous) = previous {
            self.links[previous as usize].1 = Some(position);
        }
        self.links.push((previous, None));
        (position, previous)
    }

    /// Takes `position` out of its session: its neighbours become each other's, as a fresh
    /// load of the remaining memories would link them.
    pub fn unlink(&mut self, position: usize, session: &Option<String>) {
        let (previous, next) = self.neighbours(position);
        if let Some(previous) = previous {
            self.links[previous as usize].1 = next;
        }
        if let Some(next) = next {
            self.links[next as usize].0 = previous;
        }
        if let Some(links) = self.links.get_mut(position) {
            *links = (None, None);
        }
        if self.last.get(session) == Some(&(position as u32)) {
            match previous {
                Some(previous) => self.last.insert(session.clone(), previous),
                None => self.last.remove(session),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_chain_apart_and_rejoin_around_an_unlinked_position() {
        let mut links = SessionLinks::default();
        let a = Some("a".to_owned());
        assert_eq!(links.push(a.clone(), |_| true), (0, None));
        assert_eq!(links.push(Some("b".into()), |_| true), (1, None));
        assert_eq!(links.push(a.clone(), |_| true), (2, Some(0)));
        assert_eq!(links.push(a.clone(), |_| true), (3, Some(2)));
        assert_eq!(links.neighbours(2), (Some(0), Some(3)));
        links.unlink(2, &a);
        assert_eq!(links.neighbours(0), (None, Some(3)));
        assert_eq!(links.neighbours(3), (Some(0), None));
        links.unlink(3, &a);
        assert_eq!(
            links.push(a, |_| true),
            (4, Some(0)),
            "0 is the latest again"
        );
        // Not linkable: the chain restarts, though the new position is the latest.
        assert_eq!(links.push(None, |_| true), (5, None));
        assert_eq!(links.push(None, |_| false), (6, None));
        assert_eq!(links.push(None, |_| true), (7, Some(6)));
    }
}
