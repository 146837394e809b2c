//! The lexical half of hybrid retrieval: terms of a text, and a BM25 index over one vault.
//!
//! A memory's terms are its words by Unicode's word boundaries (UAX #29), lower-cased, with
//! English stop words dropped and English words (ASCII ones) Snowball-stemmed; other languages'
//! words are kept as they are. Scripts written without spaces (Chinese, Japanese, Korean, Thai
//! and their neighbours) are cut into overlapping character pairs, the usual way to index them
//! without a dictionary. Terms are computed once, when the memory is embedded, and kept sealed
//! beside its vector (with [`TERMS_VERSION`]: older ones are derived again at load), so a
//! vault's lexical index is rebuilt from the store with the vector index and erased with it.
//!
//! Each memory is scored as a small window: its own terms plus those of the memories just before
//! and after it in the same session ([`SessionLinks`]). A turn like "Yes, last Tuesday!" then
//! matches the question it answers (docs/retrieval.md, "the session window").

use std::collections::HashMap;
use std::sync::OnceLock;

use rust_stemmers::{Algorithm, Stemmer};
use unicode_segmentation::UnicodeSegmentation;

use super::session::{Inserted, SessionLinks};
use crate::bounds::MAX_TERM_CHARS;

/// BM25's term-frequency saturation and length normalisation (the usual defaults; other values
/// measured no better, docs/retrieval.md).
const K1: f32 = 1.2;
const B: f32 = 0.75;

const STOP_WORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "but", "if", "of", "to", "in", "on", "at", "by", "for", "with",
    "about", "as", "is", "are", "was", "were", "be", "been", "being", "am", "i", "you", "he",
    "she", "it", "we", "they", "me", "him", "her", "us", "them", "my", "your", "his", "its", "our",
    "their", "this", "that", "these", "those", "do", "does", "did", "have", "has", "had", "not",
    "no", "so", "than", "too", "very", "can", "could", "will", "would", "should", "shall", "may",
    "might", "must", "just", "what", "when", "where", "who", "whom", "which", "why", "how",
    "there", "here", "from", "up", "down", "out", "over", "under", "again", "further", "then",
    "once", "all", "any", "both", "each", "few", "more", "most", "other", "some", "such", "only",
    "own", "same", "s", "t", "don", "now", "ll", "re", "ve", "d", "m", "o", "y", "also", "into",
    "through", "during", "before", "after", "above", "below", "between", "yeah", "oh", "hey", "hi",
];

fn stemmer() -> &'static Stemmer {
    static STEMMER: OnceLock<Stemmer> = OnceLock::new();
    STEMMER.get_or_init(|| Stemmer::create(Algorithm::English))
}

fn is_stop_word(word: &str) -> bool {
    STOP_WORDS.contains(&word)
}

/// The version of [`terms`] that stored terms were made by; index metadata of another version is
/// derived again from the memory's text when a vault is loaded.
pub const TERMS_VERSION: u8 = 2;

/// Whether a character belongs to a script written without spaces between words, indexed by
/// character pairs.
fn is_unspaced(c: char) -> bool {
    matches!(c as u32,
        0x0E00..=0x0EFF      // Thai, Lao
        | 0x1000..=0x109F    // Myanmar
        | 0x1780..=0x17FF    // Khmer
        | 0x3040..=0x30FF    // Hiragana, Katakana
        | 0x3400..=0x4DBF    // CJK extension A
        | 0x4E00..=0x9FFF    // CJK unified ideographs
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xF900..=0xFAFF    // CJK compatibility ideographs
        | 0xFF66..=0xFF9F    // half-width Katakana
        | 0x20000..=0x2FA1F  // CJK extensions B and beyond
    )
}

/// A text's terms with their counts, in first-seen order.
pub fn terms(text: &str) -> Vec<(String, u32)> {
    let mut counts: Vec<(String, u32)> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut add = |term: String| match seen.get(&term) {
        Some(&at) => counts[at].1 += 1,
        None => {
            seen.insert(term.clone(), counts.len());
            counts.push((term, 1));
        }
    };
    let lower = text.to_lowercase();
    let mut rest = lower.as_str();
    while !rest.is_empty() {
        // The text alternates between runs of unspaced scripts and the rest.
        let unspaced = rest.chars().next().is_some_and(is_unspaced);
        let end = rest
            .char_indices()
            .find(|(_, c)| is_unspaced(*c) != unspaced)
            .map_or(rest.len(), |(at, _)| at);
        let (run, after) = rest.split_at(end);
        rest = after;
        if unspaced {
            let chars: Vec<char> = run.chars().collect();
            if chars.len() == 1 {
                add(run.to_owned());
            }
            for pair in chars.windows(2) {
                add(pair.iter().collect());
            }
            continue;
        }
        for word in run.unicode_words() {
            // "don't", "Caroline's": the parts, as English stemming and stop words expect.
            for piece in word.split(['\'', '\u{2019}']) {
                if piece.is_empty() || piece.chars().count() > MAX_TERM_CHARS || is_stop_word(piece)
                {
                    continue;
                }
                if piece.is_ascii() {
                    add(stemmer().stem(piece).into_owned());
                } else {
                    add(piece.to_owned());
                }
            }
        }
    }
    counts
}

/// About how many words `text` holds: its words by Unicode's boundaries, and a word for every
/// two characters of a script written without spaces (a Chinese or Japanese word is one to
/// three characters), so that a sentence in those scripts is not taken for a one-word reply.
pub fn word_count(text: &str) -> usize {
    let unspaced = text.chars().filter(|c| is_unspaced(*c)).count();
    let spaced = text
        .unicode_words()
        .filter(|word| !word.chars().any(is_unspaced))
        .count();
    spaced + unspaced.div_ceil(2)
}

/// A BM25 index over the windows of one vault's memories, addressed by position.
///
/// A position's window is its own terms plus those of its previous and next position in the
/// session chain its caller keeps. Removing a position takes its terms out of its neighbours'
/// windows and joins the neighbours' windows, so the index stays what a fresh load of the
/// remaining memories would build.
#[derive(Default)]
pub struct LexicalIndex {
    /// Term -> dense term id.
    ids: HashMap<String, u32>,
    /// Term id -> (position, count in that position's window).
    postings: Vec<Vec<(u32, u32)>>,
    /// Each position's own terms (ids and counts), to extend its neighbours' windows.
    own: Vec<Vec<(u32, u32)>>,
    /// Each position's window length in terms.
    window_len: Vec<u32>,
    total_len: u64,
    removed: usize,
}

impl LexicalIndex {
    /// Positions held, removed ones included.
    pub fn len(&self) -> usize {
        self.own.len()
    }

    pub fn is_empty(&self) -> bool {
        self.own.is_empty()
    }

    /// Adds the next position with its own terms, where `links` has just linked it (`at`):
    /// its neighbours join its window and it joins theirs; neighbours it came between leave
    /// each other's windows.
    pub fn insert(&mut self, terms: &[(String, u32)], links: &SessionLinks, at: Inserted) {
        let position = at.position;
        debug_assert_eq!(position as usize, self.own.len());
        let own: Vec<(u32, u32)> = terms
            .iter()
            .map(|(term, count)| (self.term_id(term), *count))
            .collect();
        // The new window: its own terms and its neighbours'. Built here, then appended to the
        // postings without searching them (a common term's list is long).
        let mut window = own.clone();
        for neighbour in [at.previous, at.next].into_iter().flatten() {
            for &(term, count) in &self.own[neighbour as usize] {
                match window.iter_mut().find(|(t, _)| *t == term) {
                    Some((_, c)) => *c += count,
                    None => window.push((term, count)),
                }
            }
        }
        let mut length = 0;
        for &(term, count) in &window {
            self.postings[term as usize].push((position, count));
            length += count;
        }
        self.own.push(own.clone());
        self.window_len.push(length);
        self.total_len += u64::from(length);
        if at.split {
            if let (Some(previous), Some(next)) = (at.previous, at.next) {
                self.add_window(previous, next, -1);
                self.add_window(next, previous, -1);
            }
        }
        for neighbour in [at.previous, at.next].into_iter().flatten() {
            // Terms new to the neighbour's window are appended without searching their
            // postings: its window is its own terms and its neighbours' (the new one aside).
            let (before, after) = links.neighbours(neighbour as usize);
            let others: Vec<u32> = [before, after]
                .into_iter()
                .flatten()
                .filter(|p| *p != position)
                .collect();
            for &(term, count) in &own {
                let known = self.own[neighbour as usize]
                    .iter()
                    .chain(others.iter().flat_map(|o| self.own[*o as usize].iter()))
                    .any(|(t, _)| *t == term);
                if known {
                    self.adjust(neighbour, term, count as i64);
                } else {
                    self.postings[term as usize].push((neighbour, count));
                    self.window_len[neighbour as usize] += count;
                    self.total_len += u64::from(count);
                }
            }
        }
    }

    /// Adds (`sign` 1) or takes (`sign` -1) `from`'s own terms to or from `to`'s window.
    fn add_window(&mut self, to: u32, from: u32, sign: i64) {
        for (term, count) in self.own[from as usize].clone() {
            self.adjust(to, term, sign * count as i64);
        }
    }

    /// Takes a position out: its window is emptied and its terms leave the windows of the
    /// neighbours it had; when those are linked to each other now (`joined`), each joins the
    /// other's window.
    pub fn remove(
        &mut self,
        position: usize,
        previous: Option<u32>,
        next: Option<u32>,
        joined: bool,
    ) {
        if position >= self.own.len() {
            return;
        }
        let position = position as u32;
        // Its own window: its terms and its neighbours'.
        let mut window = self.own[position as usize].clone();
        for neighbour in [previous, next].into_iter().flatten() {
            window.extend(self.own[neighbour as usize].iter().copied());
        }
        for (term, count) in window {
            self.adjust(position, term, -(count as i64));
        }
        for neighbour in [previous, next].into_iter().flatten() {
            self.add_window(neighbour, position, -1);
        }
        self.own[position as usize].clear();
        if let (Some(previous), Some(next), true) = (previous, next, joined) {
            self.add_window(previous, next, 1);
            self.add_window(next, previous, 1);
        }
        self.removed += 1;
    }

    /// Adds `delta` to `term`'s count in `position`'s window, creating or dropping its posting.
    fn adjust(&mut self, position: u32, term: u32, delta: i64) {
        let list = &mut self.postings[term as usize];
        // Recent positions sit at the end of each list: search from there.
        match list.iter().rposition(|(p, _)| *p == position) {
            Some(at) => {
                let count = (i64::from(list[at].1) + delta).max(0) as u32;
                if count == 0 {
                    list.swap_remove(at);
                } else {
                    list[at].1 = count;
                }
            }
            None if delta > 0 => list.push((position, delta as u32)),
            None => return,
        }
        let length = &mut self.window_len[position as usize];
        *length = (i64::from(*length) + delta).max(0) as u32;
        self.total_len = (self.total_len as i64 + delta).max(0) as u64;
    }

    fn term_id(&mut self, term: &str) -> u32 {
        if let Some(id) = self.ids.get(term) {
            return *id;
        }
        let id = self.postings.len() as u32;
        self.ids.insert(term.to_owned(), id);
        self.postings.push(Vec::new());
        id
    }

    /// BM25 scores of every position for the query terms (0 where none matches).
    pub fn scores(&self, query: &[(String, u32)]) -> Vec<f32> {
        let mut scores = vec![0f32; self.own.len()];
        let documents = (self.own.len() - self.removed) as f32;
        if documents == 0.0 {
            return scores;
        }
        let average = (self.total_len as f32 / documents).max(1.0);
        for (term, _) in query {
            let Some(&id) = self.ids.get(term) else {
                continue;
            };
            let list = &self.postings[id as usize];
            let frequency = list.len() as f32;
            let idf = (1.0 + (documents - frequency + 0.5) / (frequency + 0.5)).ln();
            for &(position, count) in list {
                let count = count as f32;
                let length = self.window_len[position as usize] as f32;
                scores[position as usize] +=
                    idf * count * (K1 + 1.0) / (count + K1 * (1.0 - B + B * length / average));
            }
        }
        scores
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lexical index with the session chain its vault index would keep beside it.
    #[derive(Default)]
    struct Chained {
        links: SessionLinks,
        index: LexicalIndex,
    }

    impl Chained {
        /// Adds a turn said at `at` (ms) in `session`.
        fn said(&mut self, session: &str, at: i64, text: &str) {
            let id = self.index.len() as u64;
            let inserted = self
                .links
                .insert(Some(session.into()), (at, id), |_, _| true);
            self.index.insert(&terms(text), &self.links, inserted);
        }

        /// Adds the next turn of `session`.
        fn push(&mut self, session: &str, text: &str) {
            let at = self.index.len() as i64;
            self.said(session, at, text);
        }

        fn remove(&mut self, session: &str, position: usize) {
            let (previous, next) = self.links.neighbours(position);
            let place = (position as i64, position as u64);
            let joined = self
                .links
                .unlink(position, &Some(session.into()), place, |_, _| true);
            self.index.remove(position, previous, next, joined);
        }

        fn scores(&self, query: &str) -> Vec<f32> {
            self.index.scores(&terms(query))
        }
    }

    #[test]
    fn terms_are_lowercased_stemmed_and_without_stop_words() {
        let got = terms("The hikers were HIKING; I hiked! Café-2023 and the café.");
        let words: Vec<(&str, u32)> = got.iter().map(|(t, c)| (t.as_str(), *c)).collect();
        assert_eq!(
            words,
            [("hiker", 1), ("hike", 2), ("café", 2), ("2023", 1)],
            "{got:?}"
        );
        assert!(terms("the and of to").is_empty());
        assert!(terms(&"x".repeat(41)).is_empty());
    }

    #[test]
    fn words_are_counted_in_every_script() {
        assert_eq!(word_count("Yes, last Tuesday!"), 3);
        assert_eq!(word_count("Ich wohne in München."), 4);
        assert_eq!(word_count("我在上海的一家银行工作，已经五年了。"), 8);
        assert_eq!(word_count("はい"), 1);
        assert_eq!(word_count("I live in 東京 now"), 5);
        assert_eq!(word_count(""), 0);
    }

    fn words(text: &str) -> Vec<String> {
        terms(text).into_iter().map(|(t, _)| t).collect()
    }

    #[test]
    fn other_languages_keep_their_words_and_unspaced_scripts_are_cut_in_pairs() {
        // An ASCII word takes the English stemmer whatever its language ("wohne"); the same on
        // both sides of the match, so it costs a German word nothing but its ending.
        assert_eq!(
            words("Ich wohne in München, die Häuser sind alt."),
            ["ich", "wohn", "münchen", "die", "häuser", "sind", "alt"]
        );
        assert_eq!(
            words("Mis años en Sevilla"),
            ["mis", "años", "en", "sevilla"]
        );
        assert_eq!(words("我住在北京"), ["我住", "住在", "在北", "北京"]);
        assert_eq!(
            words("東京に住んでいます"),
            ["東京", "京に", "に住", "住ん", "んで", "でい", "いま", "ます"]
        );
        assert_eq!(words("서울에 살아요"), ["서울", "울에", "살아", "아요"]);
        // Mixed: each part as its own script wants; a lone ideograph is itself.
        assert_eq!(words("My code 是 zx81"), ["code", "是", "zx81"]);
        // A Devanagari word keeps its vowel signs (a split on non-alphanumerics lost them).
        assert_eq!(words("नमस्ते दुनिया"), ["नमस्ते", "दुनिया"]);
        assert_eq!(words("I don't like Caroline's"), ["like", "carolin"]);
    }

    #[test]
    fn a_chinese_sentence_is_found_by_a_question_sharing_its_words() {
        let mut index = Chained::default();
        index.push("a", "我的猫叫小白，它很喜欢睡觉。");
        index.push("b", "明天我要去上海出差。");
        let scores = index.scores("我的猫叫什么名字？");
        assert!(scores[0] > scores[1], "{scores:?}");
    }

    #[test]
    fn rarer_and_more_frequent_terms_score_higher() {
        let mut index = Chained::default();
        for (session, text) in [
            ("a", "I adopted a greyhound"),
            ("b", "The weather was nice"),
            ("c", "We went to the beach, nice weather"),
            ("d", "greyhound greyhound races"),
        ] {
            index.push(session, text);
        }
        let scores = index.scores("greyhound");
        assert!(scores[3] > scores[0] && scores[0] > 0.0, "{scores:?}");
        assert_eq!((scores[1], scores[2]), (0.0, 0.0));
        let weather = index.scores("nice weather");
        assert!(weather[1] > 0.0 && weather[2] > 0.0 && weather[0] == 0.0);
    }

    #[test]
    fn a_short_turn_matches_through_its_neighbours() {
        let mut index = Chained::default();
        index.push("s", "Did you go to the pottery workshop?");
        index.push("s", "Yes, last Tuesday!");
        index.push("t", "Unrelated remark about trains");
        let scores = index.scores("When was the pottery workshop?");
        assert!(scores[1] > 0.0, "the answer carries its question's words");
        assert_eq!(scores[2], 0.0);
        // And the question gains the answer's words.
        assert!(index.scores("tuesday")[0] > 0.0);
    }

    #[test]
    fn removing_a_turn_leaves_what_a_fresh_index_would_hold() {
        let texts = [
            "Did you go to the pottery workshop?",
            "zx81 is my code",
            "Yes, last Tuesday!",
        ];
        let mut index = Chained::default();
        for text in texts {
            index.push("s", text);
        }
        index.remove("s", 1);
        let mut fresh = Chained::default();
        fresh.push("s", texts[0]);
        fresh.push("s", ""); // a placeholder at the removed position...
        fresh.remove("s", 1); // ...removed the same way, so positions line up
        fresh.push("s", texts[2]);
        for query in ["zx81", "pottery workshop", "tuesday"] {
            let (got, want) = (index.scores(query), fresh.scores(query));
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{query}: {got:?} vs {want:?}");
            }
        }
        assert!(index.scores("zx81").iter().all(|s| *s == 0.0));
        assert!(
            index.scores("tuesday")[0] > 0.0,
            "the neighbours now join up"
        );
    }

    #[test]
    fn a_turn_arriving_late_gives_the_windows_a_fresh_index_in_order_would() {
        let texts = [
            (10, "Did you go to the pottery workshop?"),
            (20, "zx81 is my code"),
            (30, "Yes, last Tuesday!"),
        ];
        let mut in_order = Chained::default();
        for (at, text) in texts {
            in_order.said("s", at, text);
        }
        // The same turns reaching the index as 30, 10, 20.
        let mut late = Chained::default();
        for index in [2, 0, 1] {
            let (at, text) = texts[index];
            late.said("s", at, text);
        }
        for query in ["zx81", "pottery workshop", "tuesday", "code"] {
            let mut got = late.scores(query);
            // Positions differ (2, 0, 1 against 0, 1, 2): put them back in order.
            got = vec![got[1], got[2], got[0]];
            let want = in_order.scores(query);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{query}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn an_empty_index_scores_nothing() {
        let index = LexicalIndex::default();
        assert!(index.scores(&terms("anything")).is_empty());
    }
}
