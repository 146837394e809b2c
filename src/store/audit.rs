//! The audit log: the backend's part for it, and sled's implementation (a bounded tree in
//! append order, the oldest entries dropped past the bound).

use std::sync::atomic::Ordering;

use anyhow::Context;

use super::records::AuditEntry;
use super::sled::SledStore;

pub trait Audit {
    /// Appends an entry, dropping the oldest beyond `max_entries`. Durable with the next
    /// commit: the operation's own.
    fn append_audit(&self, entry: &AuditEntry, max_entries: usize) -> anyhow::Result<()>;

    /// Entries after the cursor, oldest first, at most `limit`, and the cursor to continue
    /// from when there are more.
    fn audit_page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> anyhow::Result<(Vec<AuditEntry>, Option<u64>)>;
}

impl Audit for SledStore {
    fn append_audit(&self, entry: &AuditEntry, max_entries: usize) -> anyhow::Result<()> {
        let _writing = self.writing();
        let seq = self.next_id()?;
        self.audit
            .insert(seq.to_be_bytes(), serde_json::to_vec(entry)?)?;
        let mut count = self.audit_entries.fetch_add(1, Ordering::AcqRel) + 1;
        while count > max_entries && self.audit.pop_min()?.is_some() {
            count = self.audit_entries.fetch_sub(1, Ordering::AcqRel) - 1;
        }
        Ok(())
    }

    fn audit_page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> anyhow::Result<(Vec<AuditEntry>, Option<u64>)> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut page = Vec::new();
        let mut last = None;
        for entry in self.audit.range(start.to_be_bytes()..) {
            let (key, value) = entry?;
            if page.len() == limit {
                return Ok((page, last));
            }
            let seq = u64::from_be_bytes(key.as_ref().try_into().context("audit key")?);
            page.push(serde_json::from_slice(&value).context("an audit entry is corrupt")?);
            last = Some(seq);
        }
        Ok((page, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_log_pages_oldest_first_and_keeps_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::for_tests(dir.path());
        for i in 0..7 {
            store
                .append_audit(
                    &AuditEntry {
                        at_ms: i,
                        actor: "admin".into(),
                        action: "mint".into(),
                        key_id: None,
                        vault: None,
                        outcome: "ok".into(),
                        detail: Default::default(),
                    },
                    5,
                )
                .unwrap();
        }
        // Seven appended, five kept: the two oldest were dropped.
        let (first, next) = store.audit_page(None, 3).unwrap();
        assert_eq!(first.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [2, 3, 4]);
        let (rest, end) = store.audit_page(next, 3).unwrap();
        assert_eq!(rest.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [5, 6]);
        assert!(end.is_none());
    }
}
