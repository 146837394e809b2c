//! Cutting a long message into passages: each is embedded and ranked on its own, so a fact in
//! the middle of a pasted document or a long reply is found by a question about it, and the
//! context shows the passage that matched instead of the whole message.
//!
//! A passage ends at a sentence or paragraph boundary when one falls in its second half, else
//! at a space, else (unspaced text, such as Chinese or Japanese) at the length itself. Each
//! passage after the first begins with the last `overlap` characters of the one before it
//! (from a word boundary), so a sentence cut by a boundary is whole in one of them.

/// The passages of `text`: the text itself when it is at most `target` characters, else cuts of
/// at most `target` characters (the overlap included). Never empty for a non-empty text; the
/// passages cover the whole text, in order.
pub fn split(text: &str, target: usize, overlap: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= target {
        return vec![text.to_owned()];
    }
    let overlap = overlap.min(target / 2);
    let mut passages = Vec::new();
    let mut start = 0;
    loop {
        let limit = (start + target).min(chars.len());
        if limit == chars.len() {
            passages.push(chars[start..].iter().collect());
            break;
        }
        let end = cut_point(&chars, start, limit);
        passages.push(
            chars[start..end]
                .iter()
                .collect::<String>()
                .trim_end()
                .to_owned(),
        );
        // The next passage starts `overlap` characters back, at the start of a word.
        let mut next = end.saturating_sub(overlap).max(start + 1);
        if overlap > 0 {
            while next < end && !chars[next - 1].is_whitespace() {
                next += 1;
            }
        } else {
            next = end;
        }
        while next < chars.len() && chars[next].is_whitespace() {
            next += 1;
        }
        if next >= chars.len() {
            break;
        }
        start = next;
    }
    passages
}

/// Where a passage from `start` ends, at most at `limit`: after the last sentence or paragraph
/// end in its second half, else after the last space there, else at `limit`.
fn cut_point(chars: &[char], start: usize, limit: usize) -> usize {
    let half = start + (limit - start) / 2;
    let sentence_end = (half..limit).rev().find(|&i| {
        let c = chars[i];
        c == '\n'
            || matches!(c, '。' | '！' | '？')
            || (matches!(c, '.' | '!' | '?') && chars.get(i + 1).is_some_and(|n| n.is_whitespace()))
    });
    if let Some(at) = sentence_end {
        return at + 1;
    }
    if let Some(at) = (half..limit).rev().find(|&i| chars[i].is_whitespace()) {
        return at + 1;
    }
    limit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_text_is_one_passage() {
        assert_eq!(split("Hello there.", 100, 10), ["Hello there."]);
    }

    #[test]
    fn passages_end_at_sentences_stay_in_bounds_and_cover_the_text() {
        let sentence = "The quick brown fox jumps over the lazy dog. ";
        let text = sentence.repeat(60);
        let passages = split(&text, 300, 40);
        assert!(passages.len() > 8, "{}", passages.len());
        for passage in &passages {
            assert!(passage.chars().count() <= 300, "{passage:?}");
            assert!(passage.trim_end().ends_with('.'), "{passage:?}");
        }
        // Every word of the text is in some passage, in order.
        let joined = passages.join(" ");
        assert!(joined.contains("fox jumps"));
        assert!(text
            .trim_end()
            .ends_with(passages.last().unwrap().trim_end()));
    }

    #[test]
    fn consecutive_passages_overlap_so_a_cut_sentence_is_whole_once() {
        let words: Vec<String> = (0..400).map(|n| format!("w{n}")).collect();
        let text = words.join(" ");
        let passages = split(&text, 200, 50);
        for pair in passages.windows(2) {
            let tail: String = pair[0].split_whitespace().last().unwrap().to_owned();
            assert!(
                pair[1].split_whitespace().any(|w| w == tail),
                "no overlap between {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
        for word in &words {
            assert!(
                passages
                    .iter()
                    .any(|p| p.split_whitespace().any(|w| w == word)),
                "{word} lost"
            );
        }
    }

    #[test]
    fn unspaced_text_is_cut_at_its_sentences_or_its_length() {
        let text = "今日はとても良い天気です。".repeat(40);
        let passages = split(&text, 100, 0);
        assert!(passages.len() > 4);
        assert!(passages.iter().all(|p| p.chars().count() <= 100));
        assert!(passages.iter().all(|p| p.ends_with('。')));
        let run = "x".repeat(250);
        let cut = split(&run, 100, 0);
        assert_eq!(
            cut.iter().map(|p| p.chars().count()).collect::<Vec<_>>(),
            [100, 100, 50]
        );
    }
}
