//! The conversation a request belongs to, and whether it sees only that conversation.
//!
//! By default a user's memories are recalled across all their conversations, with the
//! request's own session lifted in the ranking: the better product. Some clients use sessions
//! as a boundary instead (hermes-memoryrouter's `vault: session`), so isolation can be asked
//! for per request (`X-Session-Isolation`, `session_isolation`) or set as a key's default; a
//! confined request sees only its session's memories, and those stored without a session (the
//! user's "core" memory, as MemoryRouter calls it), on prepare and search alike, and writes an
//! upload only into its session.

use crate::auth::MemoryAccess;

#[derive(Clone, Debug, Default)]
pub struct SessionScope {
    /// The request's session: `session_id` in the body, else `X-Session-ID`.
    pub id: Option<String>,
    /// Isolation as the request asks for it; `None` leaves the key's default.
    pub isolation: Option<bool>,
}

impl SessionScope {
    /// A session without a say on isolation.
    pub fn of(id: Option<&str>) -> SessionScope {
        SessionScope {
            id: id.map(str::to_owned),
            isolation: None,
        }
    }

    /// The session the request is confined to: isolation asked for (or the key's default),
    /// and a session to be confined to.
    pub fn confined_to<'a>(&'a self, access: &MemoryAccess) -> Option<&'a str> {
        let isolated = self.isolation.unwrap_or(access.session_isolation);
        self.id.as_deref().filter(|_| isolated)
    }
}
