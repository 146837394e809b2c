//! A generated corpus for the load and soak benchmarks: varied sentences of 8 to 40 words
//! from a fixed seed, and the small statistics helpers both print with.

use std::time::Duration;

/// A small deterministic generator (xorshift), so runs are comparable.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub const PEOPLE: &[&str] = &[
    "my sister",
    "my manager",
    "Ana",
    "our neighbour",
    "my dad",
    "a friend from school",
    "the dentist",
    "my partner",
];
pub const VERBS: &[&str] = &[
    "recommended",
    "booked",
    "cancelled",
    "talked about",
    "finally finished",
    "complained about",
    "bought",
    "forgot",
];
pub const THINGS: &[&str] = &[
    "a weekend trip to Porto",
    "the quarterly budget report",
    "a new road bike",
    "the pottery class on Thursdays",
    "tickets for the jazz festival",
    "a vegetarian lasagne recipe",
    "the broken dishwasher",
    "a book about Roman history",
    "the kids' swimming lessons",
    "a second-hand piano",
    "the flat viewing on Elm Street",
    "a cheaper phone plan",
];
pub const WHEN: &[&str] = &[
    "yesterday",
    "last Tuesday",
    "this morning",
    "two weeks ago",
    "over the holidays",
    "after work",
    "on Sunday",
];
pub const FEELINGS: &[&str] = &[
    "and I was relieved",
    "which annoyed me a bit",
    "and I'm excited about it",
    "so I need to follow up",
    "but nobody else cared",
];

/// One sentence of 8 to 40 words.
pub fn sentence(rng: &mut Rng) -> String {
    let mut text = format!(
        "{} {} {} {}",
        rng.pick(PEOPLE),
        rng.pick(VERBS),
        rng.pick(THINGS),
        rng.pick(WHEN)
    );
    if rng.unit() < 0.5 {
        text.push_str(&format!(", {}", rng.pick(FEELINGS)));
    }
    if rng.unit() < 0.3 {
        text.push_str(&format!(
            ", and {} {} {}",
            rng.pick(PEOPLE),
            rng.pick(VERBS),
            rng.pick(THINGS)
        ));
    }
    let mut chars = text.chars();
    let first = chars
        .next()
        .map(|c| c.to_uppercase().to_string())
        .unwrap_or_default();
    format!("{first}{}.", chars.as_str())
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

pub fn peak_rss_mb(pid: u32) -> f64 {
    proc_status_mb(pid, "VmHWM:")
}

/// CPU seconds (user and system) the process has used so far, 0 when unreadable.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let Some((_, after)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let ticks: f64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<f64>().ok())
        .sum();
    // The kernel's USER_HZ, 100 on Linux.
    ticks / 100.0
}

/// A `/proc/<pid>/status` field in MiB (`VmRSS`, `VmHWM`), 0 when unreadable.
pub fn proc_status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A question of the kind a user asks about their past conversations.
pub fn question(rng: &mut Rng) -> String {
    format!(
        "What did {} say about {}?",
        rng.pick(PEOPLE),
        rng.pick(THINGS)
    )
}

/// Bytes of every file under `path`, 0 for what cannot be read.
pub fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| {
                    let path = entry.path();
                    if path.is_dir() {
                        dir_bytes(&path)
                    } else {
                        entry.metadata().map_or(0, |m| m.len())
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
