//! Prepare: the conversation in, this user's relevant memories out as a context block.
//!
//! The query is the latest user turn (with the turns before it when it is short); it is
//! embedded, the vault ranked ([`App::recall`]), memories of the request's own session lifted,
//! repeats collapsed, and the best rendered within the token budget ([`super::render`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ingest::{check_tags, Message};
use super::render::{collapse_duplicates, render_context};
use super::search::{MetaFilter, Recalled};
use super::App;
use crate::auth::MemoryAccess;
use crate::embed::EmbedTiming;
use crate::error::ApiError;
use crate::ids::{Role, Scope};
use crate::store::EntryMeta;

pub struct PrepareRequest {
    pub messages: Vec<Message>,
    pub limit: Option<usize>,
    pub max_tokens: Option<usize>,
    /// Only memories carrying every one of these tags.
    pub tags: Vec<String>,
}

pub struct PrepareResult {
    pub context: Option<String>,
    pub memories: Vec<Recalled>,
    pub tokens: usize,
    pub timing: PrepareTiming,
}

impl PrepareResult {
    /// No context: nothing relevant, or nothing to look for.
    pub fn nothing() -> PrepareResult {
        PrepareResult {
            context: None,
            memories: Vec::new(),
            tokens: 0,
            timing: PrepareTiming::default(),
        }
    }
}

/// Where a prepare's time went inside the daemon (shown in its `Server-Timing` header).
#[derive(Clone, Copy, Debug, Default)]
pub struct PrepareTiming {
    /// The query's wait for the model, and the model run it was part of.
    pub embed: EmbedTiming,
    /// Ranking the vault's memories and reading the hits.
    pub search: Duration,
}

impl App {
    /// Finds the memories relevant to the conversation's latest user message and renders them
    /// as a context block within the token budget.
    pub async fn prepare(
        self: &Arc<Self>,
        access: &MemoryAccess,
        session: Option<&str>,
        request: PrepareRequest,
    ) -> Result<PrepareResult, ApiError> {
        access.require_held(Scope::Read)?;
        self.check_messages(&request.messages)?;
        check_tags(&request.tags, "tags")?;
        let limits = &self.config.limits;
        let limit = request.limit.unwrap_or(limits.default_limit);
        if limit == 0 || limit > limits.max_limit {
            return Err(ApiError::invalid(format!(
                "`limit` must be between 1 and {}, got {limit}",
                limits.max_limit
            )));
        }
        let max_tokens = request.max_tokens.unwrap_or(limits.default_max_tokens);
        if max_tokens == 0 || max_tokens > limits.max_max_tokens {
            return Err(ApiError::invalid(format!(
                "`max_tokens` must be between 1 and {}, got {max_tokens}",
                limits.max_max_tokens
            )));
        }
        if !access.mode.retrieve {
            return Ok(PrepareResult::nothing());
        }
        let Some(query) = build_query(&request.messages, self.config.retrieval.short_query_words)
        else {
            return Ok(PrepareResult::nothing());
        };
        let (vector, embed_timing) = self.embed_query(&query).await?;
        let searching = Instant::now();
        // Over-fetch so that the session boost and duplicate collapse can reorder and drop.
        let candidates = limit.saturating_mul(2).max(limit + 10);
        let keep = tag_filter(request.tags);
        let mut recalled = self
            .recall(access.vault, &query, vector, candidates, keep, true)
            .await?;
        let boost = self.config.retrieval.session_boost;
        for memory in &mut recalled {
            if session.is_some() && memory.record.session_id.as_deref() == session {
                memory.score += boost;
            }
        }
        recalled.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut recalled = collapse_duplicates(recalled);
        recalled.truncate(limit);
        let mut result = render_context(recalled, max_tokens, self.now_ms());
        result.timing = PrepareTiming {
            embed: embed_timing,
            search: searching.elapsed(),
        };
        Ok(result)
    }
}

/// A filter keeping memories that carry every tag in `tags`; `None` when there are none.
fn tag_filter(tags: Vec<String>) -> Option<MetaFilter> {
    if tags.is_empty() {
        return None;
    }
    Some(Box::new(move |meta: &EntryMeta| {
        tags.iter().all(|t| meta.tags.contains(t))
    }))
}

/// The text prepare embeds: the latest user message first, then, when that message is short
/// ("tell me more", "yes, last Tuesday"), the messages just before it, newest first, so that
/// truncation at the model's limit drops the oldest context, never the question.
pub fn build_query(messages: &[Message], short_query_words: usize) -> Option<String> {
    let latest = messages
        .iter()
        .rposition(|m| m.role == Role::User && !m.content.trim().is_empty())?;
    let mut parts = vec![messages[latest].content.trim()];
    let mut words = parts[0].split_whitespace().count();
    for earlier in messages[..latest].iter().rev() {
        if words >= short_query_words || parts.len() >= 3 {
            break;
        }
        if !earlier.role.is_remembered() || earlier.content.trim().is_empty() {
            continue;
        }
        let text = earlier.content.trim();
        words += text.split_whitespace().count();
        parts.push(text);
    }
    Some(parts.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: Role, content: &str) -> Message {
        Message {
            role,
            content: content.into(),
            timestamp_ms: None,
            remember: true,
            tags: Vec::new(),
        }
    }

    #[test]
    fn a_long_question_is_its_own_query() {
        let messages = [
            message(Role::User, "I live in Lisbon"),
            message(
                Role::User,
                "What is a good restaurant near my home for a birthday dinner?",
            ),
        ];
        assert_eq!(
            build_query(&messages, 8).unwrap(),
            "What is a good restaurant near my home for a birthday dinner?"
        );
    }

    #[test]
    fn a_short_follow_up_takes_the_turns_before_it_newest_first() {
        let messages = [
            message(Role::System, "You are helpful"),
            message(Role::User, "Which hiking trails did I like"),
            message(Role::Assistant, "You liked the Sintra loop"),
            message(Role::User, "tell me more"),
        ];
        assert_eq!(
            build_query(&messages, 12).unwrap(),
            "tell me more\nYou liked the Sintra loop\nWhich hiking trails did I like"
        );
    }

    #[test]
    fn no_user_message_means_no_query() {
        assert!(build_query(&[message(Role::System, "rules")], 8).is_none());
        assert!(build_query(&[message(Role::User, "   ")], 8).is_none());
    }
}
