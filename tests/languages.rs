//! Memories in other languages through the front door: German and Spanish words keep their
//! accents and are matched whole, Chinese and Japanese (written without spaces) are matched by
//! character pairs. In each language the memory that answers the question ranks first among
//! others in the same language, in one vault holding them all; ranked by the model alone, the
//! Chinese one does not.

mod common;

use common::Daemon;
use serde_json::json;

/// (language, memories with the answer first, question).
const CASES: [(&str, [&str; 4], &str); 4] = [
    (
        "de",
        [
            "Meine Schwester Jana arbeitet als Tierärztin in Graz.",
            "Wir haben am Wochenende Käsespätzle gekocht.",
            "Der Zug nach München hatte zwei Stunden Verspätung.",
            "Ich lerne seit März Klavier spielen.",
        ],
        "Als was arbeitet meine Schwester?",
    ),
    (
        "es",
        [
            "Mi perro se llama Canelo y tiene tres años.",
            "Este verano fuimos de vacaciones a Asturias.",
            "Estoy aprendiendo a tocar la guitarra española.",
            "El médico me dijo que camine más cada día.",
        ],
        "¿Cómo se llama mi perro?",
    ),
    (
        "zh",
        [
            "我在上海的一家银行工作，已经五年了。",
            "周末我们去杭州看了西湖。",
            "我女儿今年开始学钢琴。",
            "昨天晚上吃了火锅，太辣了。",
        ],
        "我在哪里工作？",
    ),
    (
        "ja",
        [
            "妹は大阪の病院で看護師として働いています。",
            "先週末は京都で紅葉を見ました。",
            "毎朝六時に起きてジョギングをしています。",
            "新しい自転車を買いました。",
        ],
        "妹の仕事は何ですか？",
    ),
];

/// The questions whose answer does not rank first, with what was returned.
fn misses(args: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), args);
    let key = daemon.mint_key("user:languages");
    let mut answers = Vec::new();
    // Each memory in a session of its own: what is measured is the match of the question's
    // words, not the session window (a memory's neighbours' words count as its own).
    for (language, memories, _) in CASES {
        for (i, text) in memories.iter().enumerate() {
            let session = format!("{language}-{i}");
            let stored = daemon.ingest(
                &key,
                Some(&session),
                json!([{"role": "user", "content": text}]),
            );
            if i == 0 {
                answers.push(stored["ids"][0].as_str().unwrap().to_owned());
            }
        }
    }
    daemon.wait_indexed();
    let mut wrong = Vec::new();
    for ((language, memories, question), answer) in CASES.iter().zip(&answers) {
        let prepared = daemon.prepare(&key, None, question);
        let ids = common::memory_ids(&prepared);
        if ids.first() != Some(answer) {
            wrong.push(format!(
                "{language}: {question} -> {ids:?} ({})",
                prepared["context"]
            ));
        }
        // The context carries the text as it was written.
        if let Some(context) = prepared["context"].as_str() {
            assert!(context.contains(memories[0]), "{language}: {context}");
        }
    }
    wrong
}

#[test]
fn each_language_finds_its_own_answer_first() {
    let wrong = misses(&[]);
    assert!(wrong.is_empty(), "{wrong:#?}");
    // The model alone (trained on English) misses some of them: the words do the work.
    let dense_only = misses(common::DENSE_ONLY);
    assert!(
        dense_only.iter().any(|miss| miss.starts_with("zh:")),
        "{dense_only:#?}"
    );
}
