//! The reference tables in `docs/` are generated from the code or checked against it, so they
//! cannot drift:
//! - the flag table in `docs/operations.md`, generated from the command line's definition;
//! - the fixed bounds in `docs/api.md`, generated from `src/bounds.rs`;
//! - the error codes in `docs/api.md`: every code and status of `src/error.rs`'s table, and
//!   no other (their meanings are written by hand).
//!
//! `UPDATE_DOCS=1 cargo test --test docs` rewrites the generated tables in place.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use memory_sidecar::config::Flags;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Where the text between `<!-- name:begin -->` and `<!-- name:end -->` lies.
fn section_range(text: &str, name: &str) -> std::ops::Range<usize> {
    let begin = format!("<!-- {name}:begin -->\n");
    let end = format!("<!-- {name}:end -->");
    let start = text
        .find(&begin)
        .unwrap_or_else(|| panic!("no {begin:?} marker"))
        + begin.len();
    let stop = text[start..]
        .find(&end)
        .unwrap_or_else(|| panic!("no {end:?} marker"))
        + start;
    start..stop
}

fn section<'a>(text: &'a str, name: &str) -> &'a str {
    &text[section_range(text, name)]
}

/// Checks a generated section against what the code says, or rewrites it with UPDATE_DOCS=1.
fn check_generated(path: &str, name: &str, generated: &str) {
    let mut text = read(path);
    let range = section_range(&text, name);
    if text[range.clone()] == *generated {
        return;
    }
    if std::env::var("UPDATE_DOCS").is_ok_and(|v| v == "1") {
        text.replace_range(range, generated);
        std::fs::write(root().join(path), text).unwrap();
        return;
    }
    panic!(
        "{path}: the `{name}` table differs from the code; run `UPDATE_DOCS=1 cargo test --test \
         docs` to regenerate it. Expected:\n{generated}"
    );
}

fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// One row per flag: the flag, its variable, its default, what it does.
fn flag_table() -> String {
    let mut table =
        String::from("| flag | variable | default | what it does |\n|---|---|---|---|\n");
    let command = Flags::command();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let variable = arg
            .get_env()
            .map(|v| format!("`{}`", v.to_string_lossy()))
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            "(none)".to_owned()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        table.push_str(&format!(
            "| `--{long}` | {variable} | {default} | {} |\n",
            cell(&help)
        ));
    }
    table
}

/// The fixed bounds of `src/bounds.rs`: name, value as written, and its doc comment.
fn bounds_table() -> String {
    let source = read("src/bounds.rs");
    let mut table = String::from("| bound | value | what it bounds |\n|---|---|---|\n");
    let mut doc = Vec::new();
    for line in source.lines() {
        let line = line.trim();
        if let Some(comment) = line.strip_prefix("/// ") {
            doc.push(comment.to_owned());
        } else if let Some(rest) = line.strip_prefix("pub const ") {
            let (name, value) = rest.split_once(':').expect("pub const NAME: T = V;");
            let value = value
                .split_once('=')
                .expect("a value")
                .1
                .trim()
                .trim_end_matches(';');
            table.push_str(&format!(
                "| `{name}` | `{value}` | {} |\n",
                cell(&doc.join(" "))
            ));
            doc.clear();
        } else if !line.starts_with("//") {
            doc.clear();
        }
    }
    table
}

/// Every (code, status) of the one error table in `src/error.rs`.
fn error_codes() -> Vec<(String, u16)> {
    let source = read("src/error.rs");
    let start = source
        .find("let (code, status) = match self {")
        .expect("the error table");
    let end = source[start..].find("};").expect("its end") + start;
    let table = &source[start..end];
    let mut codes = Vec::new();
    let mut rest = table;
    while let Some(at) = rest.find('"') {
        let after = &rest[at + 1..];
        let close = after.find('"').expect("a closing quote");
        let code = &after[..close];
        let tail = &after[close + 1..];
        let status: String = tail
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect();
        codes.push((
            code.to_owned(),
            status.parse().expect("a status after each code"),
        ));
        rest = &after[close + 1..];
    }
    codes.sort();
    codes.dedup();
    codes
}

#[test]
fn the_flag_table_is_the_command_lines() {
    check_generated("docs/operations.md", "flags", &flag_table());
}

#[test]
fn the_bounds_table_is_src_bounds() {
    check_generated("docs/api.md", "bounds", &bounds_table());
}

#[test]
fn the_error_table_lists_every_code_with_its_status_and_nothing_else() {
    let expected = error_codes();
    assert!(expected.len() > 30, "{expected:?}");
    let text = read("docs/api.md");
    let mut documented: Vec<(String, u16)> = section(&text, "error-codes")
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let code = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let status = cells.get(2)?.parse().ok()?;
            Some((code.to_owned(), status))
        })
        .collect();
    documented.sort();
    assert_eq!(
        documented, expected,
        "docs/api.md's error codes differ from src/error.rs"
    );
}

#[test]
fn every_doc_link_to_a_file_in_the_repository_resolves() {
    for page in [
        "README.md",
        "docs/api.md",
        "docs/operations.md",
        "docs/retrieval.md",
        "docs/benchmarks.md",
    ] {
        let text = read(page);
        let dir = Path::new(page).parent().unwrap_or(Path::new(""));
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap_or("");
            let file = target.split('#').next().unwrap_or("");
            if file.is_empty() || file.contains("://") {
                continue;
            }
            assert!(
                root().join(dir).join(file).exists(),
                "{page} links to {target}, which does not exist"
            );
        }
    }
}
