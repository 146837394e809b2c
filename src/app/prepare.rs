//! Prepare: the conversation in, this user's relevant memories out as a context block.
//!
//! The query is the latest user turn (with the turns before it when it is short); it is
//! embedded, the vault ranked ([`App::recall`]), memories of the request's own session lifted,
//! repeats collapsed, and the best rendered within the token budget ([`super::render`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ingest::{check_tags, Message};
use super::render::{collapse_duplicates, render_context};
use super::search::{Filter, Recalled};
use super::session::SessionScope;
use super::{temporal, App};
use crate::auth::MemoryAccess;
use crate::embed::EmbedTiming;
use crate::error::ApiError;
use crate::ids::{Role, Scope};

pub struct PrepareRequest {
    pub messages: Vec<Message>,
    /// Most memories in the context; `None`: the density's, else `--default-limit`.
    pub limit: Option<usize>,
    /// The context's budget in tokens; `None`: the density's, else `--default-context-tokens`.
    pub context_tokens: Option<usize>,
    pub density: Option<Density>,
    /// Only memories carrying every one of these tags.
    pub tags: Vec<String>,
    /// The request's reference time (ms): what "yesterday" and ages are relative to; `None`,
    /// the clock.
    pub now_ms: Option<i64>,
    /// Only memories from `since_ms` on, and before `until_ms`.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

/// MemoryRouter's context sizes: each scales the configured default `limit` and token budget
/// (low halves them, high doubles them, xhigh quadruples them), within their maximums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Density {
    Low,
    Default,
    High,
    Xhigh,
}

impl Density {
    pub fn parse(text: &str) -> Option<Density> {
        Some(match text {
            "low" => Density::Low,
            "default" => Density::Default,
            "high" => Density::High,
            "xhigh" => Density::Xhigh,
            _ => return None,
        })
    }

    /// `default` scaled, at least 1 and at most `max`.
    fn scale(self, default: usize, max: usize) -> usize {
        let scaled = match self {
            Density::Low => default / 2,
            Density::Default => default,
            Density::High => default * 2,
            Density::Xhigh => default * 4,
        };
        scaled.clamp(1, max)
    }
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
        session: &SessionScope,
        request: PrepareRequest,
    ) -> Result<PrepareResult, ApiError> {
        access.require_held(Scope::Read)?;
        self.check_messages(&request.messages)?;
        check_tags(&request.tags, "tags")?;
        let limits = &self.config.limits;
        let density = request.density.unwrap_or(Density::Default);
        let limit = request
            .limit
            .unwrap_or_else(|| density.scale(limits.default_limit, limits.max_limit));
        if limit == 0 || limit > limits.max_limit {
            return Err(ApiError::invalid(format!(
                "`limit` must be between 1 and {}, got {limit}",
                limits.max_limit
            )));
        }
        let context_tokens = request.context_tokens.unwrap_or_else(|| {
            density.scale(limits.default_context_tokens, limits.max_context_tokens)
        });
        if context_tokens == 0 || context_tokens > limits.max_context_tokens {
            return Err(ApiError::invalid(format!(
                "`context_tokens` must be between 1 and {}, got {context_tokens}",
                limits.max_context_tokens
            )));
        }
        if let (Some(since), Some(until)) = (request.since_ms, request.until_ms) {
            if since >= until {
                return Err(ApiError::invalid(format!(
                    "`since` must be before `until`, got {since} and {until} (ms)"
                )));
            }
        }
        if !access.mode.retrieve {
            return Ok(PrepareResult::nothing());
        }
        let retrieval = &self.config.retrieval;
        let Some(query) = build_query(
            &request.messages,
            retrieval.short_query_words,
            limits.max_query_chars,
        ) else {
            return Ok(PrepareResult::nothing());
        };
        let (vector, embed_timing) = self.embed_query(&query).await?;
        let searching = Instant::now();
        let now_ms = request.now_ms.unwrap_or_else(|| self.now_ms());
        // The time the question itself names, from its own words only: an earlier turn's
        // "yesterday" is not this question's.
        let window = latest_user_turn(&request.messages)
            .and_then(|question| temporal::window_of(question, now_ms));
        // Over-fetch so that the lifts and duplicate collapse can reorder and drop; more when
        // a time is named, since the memories from then may rank below the first page.
        let mut candidates = limit.saturating_mul(2).max(limit + 10);
        if window.is_some() {
            candidates = candidates.saturating_mul(3);
        }
        // A confined request sees its session's memories and those stored without one.
        let keep = Filter {
            session_id: session.confined_to(access).map(str::to_owned),
            with_sessionless: true,
            tags: request.tags,
            since_ms: request.since_ms,
            until_ms: request.until_ms,
        };
        let mut recalled = self
            .recall(
                access.vault,
                &query,
                vector,
                candidates,
                keep.into_meta_filter(),
                true,
            )
            .await?;
        let lifts = Lifts {
            session: session.id.as_deref(),
            session_boost: retrieval.session_boost,
            window,
            window_boost: retrieval.time_window_boost,
            now_ms,
            recency_half_life_days: retrieval.recency_half_life_days,
            recency_weight: retrieval.recency_weight,
        };
        lifts.apply(&mut recalled);
        let mut recalled = collapse_duplicates(recalled);
        recalled.truncate(limit);
        let mut result = render_context(recalled, context_tokens, now_ms);
        result.timing = PrepareTiming {
            embed: embed_timing,
            search: searching.elapsed(),
        };
        Ok(result)
    }
}

/// Adds `boost` to the score of each memory of `session`, and sorts best first.
pub(super) fn lift_session(recalled: &mut [Recalled], session: Option<&str>, boost: f32) {
    Lifts {
        session,
        session_boost: boost,
        ..Lifts::NONE
    }
    .apply(recalled);
}

/// What prepare adds to a recalled memory's ranking score (in the hybrid score's standard
/// deviations) beyond its relevance: its being of the request's session, of the time the
/// question names, and its age.
struct Lifts<'a> {
    session: Option<&'a str>,
    session_boost: f32,
    window: Option<temporal::Window>,
    window_boost: f32,
    now_ms: i64,
    /// 0: no recency lift.
    recency_half_life_days: f32,
    recency_weight: f32,
}

impl Lifts<'_> {
    const NONE: Lifts<'static> = Lifts {
        session: None,
        session_boost: 0.0,
        window: None,
        window_boost: 0.0,
        now_ms: 0,
        recency_half_life_days: 0.0,
        recency_weight: 0.0,
    };

    fn lift(&self, record: &crate::store::MemoryRecord) -> f32 {
        let mut lift = 0.0;
        if self.session.is_some() && record.session_id.as_deref() == self.session {
            lift += self.session_boost;
        }
        if self
            .window
            .is_some_and(|w| w.contains(record.created_at_ms))
        {
            lift += self.window_boost;
        }
        if self.recency_half_life_days > 0.0 {
            // A memory from the future (a caller's clock ahead) counts as new, not newer.
            let age_days = (self.now_ms - record.created_at_ms).max(0) as f32 / 86_400_000.0;
            lift += self.recency_weight * 0.5f32.powf(age_days / self.recency_half_life_days);
        }
        lift
    }

    /// Lifts each memory's score, and sorts best first.
    fn apply(&self, recalled: &mut [Recalled]) {
        for memory in recalled.iter_mut() {
            memory.score += self.lift(&memory.record);
        }
        recalled.sort_by(|a, b| b.score.total_cmp(&a.score));
    }
}

/// Where the conversation's latest user turn with something in it is.
fn latest_user(messages: &[Message]) -> Option<usize> {
    messages
        .iter()
        .rposition(|m| m.role == Role::User && !m.content.trim().is_empty())
}

/// The text of the conversation's latest user turn.
fn latest_user_turn(messages: &[Message]) -> Option<&str> {
    latest_user(messages).map(|at| messages[at].content.as_str())
}

/// Characters of each earlier turn a short question takes into its query: its end, the part
/// nearest the question. A long reply (a page of code) would otherwise drown the question.
const EARLIER_TURN_CHARS: usize = 300;

/// The text prepare embeds: the latest user message first, then, when that message is short
/// ("tell me more", "yes, last Tuesday"), the end of each message just before it, newest first,
/// so that truncation at the model's limit drops the oldest context, never the question. At
/// most `max_chars` characters: the rest of a long turn (a pasted document) is left out.
pub fn build_query(
    messages: &[Message],
    short_query_words: usize,
    max_chars: usize,
) -> Option<String> {
    let latest = latest_user(messages)?;
    let question = messages[latest].content.trim();
    let mut parts = vec![question.to_owned()];
    let mut words = crate::index::word_count(question);
    for earlier in messages[..latest].iter().rev() {
        if words >= short_query_words || parts.len() >= 3 {
            break;
        }
        if !earlier.role.is_remembered() || earlier.content.trim().is_empty() {
            continue;
        }
        let text = tail(earlier.content.trim(), EARLIER_TURN_CHARS);
        words += crate::index::word_count(&text);
        parts.push(text);
    }
    Some(parts.join("\n").chars().take(max_chars).collect())
}

/// The last `chars` characters of `text`, from a word boundary when it is cut.
fn tail(text: &str, chars: usize) -> String {
    let count = text.chars().count();
    if count <= chars {
        return text.to_owned();
    }
    let cut: String = text.chars().skip(count - chars).collect();
    match cut.split_once(char::is_whitespace) {
        Some((_, rest)) if !rest.trim().is_empty() => rest.trim_start().to_owned(),
        _ => cut,
    }
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
            build_query(&messages, 8, 4000).unwrap(),
            "What is a good restaurant near my home for a birthday dinner?"
        );
        assert_eq!(build_query(&messages, 8, 7).unwrap(), "What is");
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
            build_query(&messages, 12, 4000).unwrap(),
            "tell me more\nYou liked the Sintra loop\nWhich hiking trails did I like"
        );
    }

    #[test]
    fn a_long_turn_before_a_short_question_gives_only_its_end() {
        let code = format!(
            "{}the end of the reply",
            "let x = compute(y);\n".repeat(500)
        );
        let messages = [
            message(Role::Assistant, &code),
            message(Role::User, "What is my teacher called?"),
        ];
        let query = build_query(&messages, 8, 4000).unwrap();
        assert!(query.starts_with("What is my teacher called?\n"), "{query}");
        assert!(query.ends_with("the end of the reply"));
        assert!(
            query.chars().count() <= 27 + EARLIER_TURN_CHARS,
            "{}",
            query.len()
        );
    }

    #[test]
    fn no_user_message_means_no_query() {
        assert!(build_query(&[message(Role::System, "rules")], 8, 4000).is_none());
        assert!(build_query(&[message(Role::User, "   ")], 8, 4000).is_none());
    }
}

#[cfg(test)]
mod density_tests {
    use super::*;

    #[test]
    fn densities_scale_the_defaults_within_the_maximums() {
        assert_eq!(Density::parse("xhigh"), Some(Density::Xhigh));
        assert_eq!(Density::parse("max"), None);
        assert_eq!(Density::Low.scale(10, 100), 5);
        assert_eq!(Density::Default.scale(10, 100), 10);
        assert_eq!(Density::High.scale(1500, 16_000), 3000);
        assert_eq!(Density::Xhigh.scale(40, 100), 100);
        assert_eq!(Density::Low.scale(1, 100), 1);
    }
}
