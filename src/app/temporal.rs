//! Time in a question: "yesterday", "last week", "in May", "two months ago" turned into a
//! window of time relative to the request's reference time (its `now`, else the clock), which
//! prepare then lifts in its ranking.
//!
//! English only, and deliberately small: the expressions people use when they ask their
//! assistant about their own past. Calendar days, weeks (Monday first), months and years are
//! UTC's. What is not understood is no window, never an error.

use time::{Date, Duration, Month, OffsetDateTime, Weekday};

/// A span of time, `start_ms` included, `end_ms` not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Window {
    pub fn contains(&self, at_ms: i64) -> bool {
        (self.start_ms..self.end_ms).contains(&at_ms)
    }

    fn days(first: Date, days: i64) -> Window {
        let start = midnight_ms(first);
        Window {
            start_ms: start,
            end_ms: start + days * DAY_MS,
        }
    }
}

const DAY_MS: i64 = 86_400_000;

fn midnight_ms(date: Date) -> i64 {
    date.midnight().assume_utc().unix_timestamp() * 1000
}

const MONTHS: [(&str, Month); 12] = [
    ("january", Month::January),
    ("february", Month::February),
    ("march", Month::March),
    ("april", Month::April),
    ("may", Month::May),
    ("june", Month::June),
    ("july", Month::July),
    ("august", Month::August),
    ("september", Month::September),
    ("october", Month::October),
    ("november", Month::November),
    ("december", Month::December),
];

const WEEKDAYS: [(&str, Weekday); 7] = [
    ("monday", Weekday::Monday),
    ("tuesday", Weekday::Tuesday),
    ("wednesday", Weekday::Wednesday),
    ("thursday", Weekday::Thursday),
    ("friday", Weekday::Friday),
    ("saturday", Weekday::Saturday),
    ("sunday", Weekday::Sunday),
];

fn month_named(word: &str) -> Option<Month> {
    MONTHS
        .iter()
        .find(|(name, _)| *name == word || (word.len() == 3 && name.starts_with(word)))
        .map(|(_, month)| *month)
}

fn count_named(word: &str) -> Option<i64> {
    Some(match word {
        "a" | "an" | "one" => 1,
        "two" | "couple" => 2,
        "three" | "few" => 3,
        "four" => 4,
        "five" => 5,
        "six" => 6,
        "seven" => 7,
        "eight" => 8,
        "nine" => 9,
        "ten" => 10,
        "eleven" => 11,
        "twelve" => 12,
        other => other.parse().ok().filter(|n| (1..=120).contains(n))?,
    })
}

/// "2023" as a year (1970 to 9999).
fn year_named(word: &str) -> Option<i32> {
    word.parse().ok().filter(|y| (1970..=9999).contains(y))
}

/// "5", "5th", "23rd" as a day of the month.
fn day_named(word: &str) -> Option<u8> {
    let digits = word.trim_end_matches(|c: char| c.is_alphabetic());
    if digits.len() != word.len() && !matches!(&word[digits.len()..], "st" | "nd" | "rd" | "th") {
        return None;
    }
    digits.parse().ok().filter(|d| (1..=31).contains(d))
}

/// The first of `date`'s month.
fn month_start(date: Date) -> Date {
    date.replace_day(1).expect("day 1 exists")
}

/// The first day of the month `back` months before `date`'s.
fn months_back(date: Date, back: i64) -> Date {
    let index = date.year() as i64 * 12 + (date.month() as i64 - 1) - back;
    let month = Month::try_from((index.rem_euclid(12) + 1) as u8).expect("1..=12");
    Date::from_calendar_date(index.div_euclid(12) as i32, month, 1).expect("a first of the month")
}

fn month_window(first: Date) -> Window {
    let next = months_back(first, -1);
    Window {
        start_ms: midnight_ms(first),
        end_ms: midnight_ms(next),
    }
}

fn year_window(year: i32) -> Option<Window> {
    let first = Date::from_calendar_date(year, Month::January, 1).ok()?;
    let next = Date::from_calendar_date(year + 1, Month::January, 1).ok()?;
    Some(Window {
        start_ms: midnight_ms(first),
        end_ms: midnight_ms(next),
    })
}

/// The window the question's words name, relative to `now_ms`, if they name one.
pub fn window_of(question: &str, now_ms: i64) -> Option<Window> {
    let now = OffsetDateTime::from_unix_timestamp(now_ms.div_euclid(1000)).ok()?;
    let today = now.date();
    let lower = question.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let at = |i: usize| words.get(i).copied().unwrap_or("");
    let mut vague = None;
    for i in 0..words.len() {
        let (word, next) = (at(i), at(i + 1));
        match word {
            "today" | "tonight" => return Some(Window::days(today, 1)),
            "yesterday" => {
                if i >= 2 && at(i - 1) == "before" && at(i - 2) == "day" {
                    return Some(Window::days(today - Duration::days(2), 1));
                }
                return Some(Window::days(today - Duration::days(1), 1));
            }
            // Vague: any more definite time in the question wins.
            "recently" | "lately" => {
                vague = vague.or(Some(Window::days(today - Duration::days(13), 14)));
            }
            "this" | "last" | "past" | "previous" => {
                let back = i64::from(word != "this");
                let monday =
                    today - Duration::days(i64::from(today.weekday().number_days_from_monday()));
                match next {
                    "week" => return Some(Window::days(monday - Duration::weeks(back), 7)),
                    "weekend" => {
                        let saturday = monday - Duration::weeks(back) + Duration::days(5);
                        return Some(Window::days(saturday, 2));
                    }
                    "month" => return Some(month_window(months_back(month_start(today), back))),
                    "year" => return year_window(today.year() - back as i32),
                    day => {
                        if let Some((_, weekday)) = WEEKDAYS.iter().find(|(n, _)| *n == day) {
                            // The latest such day before today ("last Tuesday").
                            let mut date = today - Duration::days(1);
                            while date.weekday() != *weekday {
                                date -= Duration::days(1);
                            }
                            return Some(Window::days(date, 1));
                        }
                    }
                }
            }
            _ => {}
        }
        // "two months ago", "a few weeks ago", "3 days ago".
        if let Some(count) = count_named(word) {
            let unit_at = if next == "of" || next == "few" {
                i + 2
            } else {
                i + 1
            };
            let unit = at(unit_at).trim_end_matches('s');
            if at(unit_at + 1) == "ago" {
                match unit {
                    "day" => return Some(Window::days(today - Duration::days(count + 1), 3)),
                    "week" => {
                        let centre = today - Duration::weeks(count);
                        return Some(Window::days(centre - Duration::days(3), 7));
                    }
                    "month" => return Some(month_window(months_back(month_start(today), count))),
                    "year" => return year_window(today.year() - count as i32),
                    _ => {}
                }
            }
        }
        // "in 2023".
        if matches!(word, "in" | "during" | "since") {
            if let Some(year) = year_named(next) {
                if month_named(at(i + 2)).is_none() {
                    return year_window(year);
                }
            }
        }
        // "in May", "in May 2023", "on May 5", "May 5th, 2023", "3 June 2023", "the 3rd of June".
        if let Some(month) = month_named(word) {
            let before = if i > 0 { at(i - 1) } else { "" };
            let day_before = if before == "of" && i > 1 {
                at(i - 2)
            } else {
                before
            };
            let (day, year) = match day_named(next) {
                Some(day) => (Some(day), year_named(at(i + 2))),
                None => (
                    if i > 0 { day_named(day_before) } else { None },
                    year_named(next),
                ),
            };
            // "may" alone is usually the verb: only as a month after in/on/since/during/of, or
            // beside a day or a year.
            let introduced = matches!(before, "in" | "on" | "since" | "during" | "of");
            if month == Month::May && !introduced && year.is_none() && day.is_none() {
                continue;
            }
            let year = year.unwrap_or_else(|| {
                // The latest such month not after today.
                if (month as u8) <= (today.month() as u8) {
                    today.year()
                } else {
                    today.year() - 1
                }
            });
            let first = Date::from_calendar_date(year, month, 1).ok()?;
            if let Some(day) = day {
                if let Ok(date) = Date::from_calendar_date(year, month, day) {
                    return Some(Window::days(date, 1));
                }
            }
            return Some(month_window(first));
        }
    }
    vague
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wednesday 2024-07-17, 15:00 UTC.
    const NOW: i64 = 1_721_228_400_000;

    fn day(text: &str) -> i64 {
        let date = Date::parse(
            text,
            &time::format_description::well_known::Iso8601::DEFAULT,
        )
        .unwrap();
        midnight_ms(date)
    }

    fn window(question: &str) -> Option<(i64, i64)> {
        window_of(question, NOW).map(|w| (w.start_ms, w.end_ms))
    }

    #[test]
    fn days_weeks_and_months_relative_to_now() {
        assert_eq!(
            window("what did I eat today?"),
            Some((day("2024-07-17"), day("2024-07-18")))
        );
        assert_eq!(
            window("Where was I yesterday"),
            Some((day("2024-07-16"), day("2024-07-17")))
        );
        assert_eq!(
            window("the day before yesterday"),
            Some((day("2024-07-15"), day("2024-07-16")))
        );
        assert_eq!(
            window("what did we talk about last week?"),
            Some((day("2024-07-08"), day("2024-07-15")))
        );
        assert_eq!(
            window("this week"),
            Some((day("2024-07-15"), day("2024-07-22")))
        );
        assert_eq!(
            window("my plans last month"),
            Some((day("2024-06-01"), day("2024-07-01")))
        );
        assert_eq!(
            window("two months ago"),
            Some((day("2024-05-01"), day("2024-06-01")))
        );
        assert_eq!(
            window("3 days ago"),
            Some((day("2024-07-13"), day("2024-07-16")))
        );
        assert_eq!(
            window("a couple of weeks ago"),
            Some((day("2024-06-30"), day("2024-07-07")))
        );
        assert_eq!(
            window("last year"),
            Some((day("2023-01-01"), day("2024-01-01")))
        );
        assert_eq!(
            window("last Tuesday"),
            Some((day("2024-07-16"), day("2024-07-17")))
        );
        assert_eq!(
            window("last weekend"),
            Some((day("2024-07-13"), day("2024-07-15")))
        );
    }

    #[test]
    fn months_by_name_are_the_latest_such_month_unless_a_year_is_given() {
        assert_eq!(
            window("what did I do in May?"),
            Some((day("2024-05-01"), day("2024-06-01")))
        );
        assert_eq!(
            window("in December"),
            Some((day("2023-12-01"), day("2024-01-01")))
        );
        assert_eq!(
            window("in March 2022"),
            Some((day("2022-03-01"), day("2022-04-01")))
        );
        assert_eq!(
            window("on June 5th"),
            Some((day("2024-06-05"), day("2024-06-06")))
        );
        assert_eq!(
            window("What painting did she show on October 13, 2023?"),
            Some((day("2023-10-13"), day("2023-10-14")))
        );
        assert_eq!(
            window("as mentioned on 3 June, 2023"),
            Some((day("2023-06-03"), day("2023-06-04")))
        );
        assert_eq!(
            window("the 3rd of June"),
            Some((day("2024-06-03"), day("2024-06-04")))
        );
        assert_eq!(
            window("in July 2022"),
            Some((day("2022-07-01"), day("2022-08-01")))
        );
        assert_eq!(
            window("an event recently in 2021"),
            Some((day("2021-01-01"), day("2022-01-01")))
        );
        assert_eq!(
            window("May 5 was"),
            Some((day("2024-05-05"), day("2024-05-06")))
        );
        assert_eq!(window("it may 5x"), None, "5x is no day");
        assert_eq!(window("Sept trip"), None, "four letters is no month name");
        assert_eq!(
            window("what may I have said about tea?"),
            None,
            "may, the verb"
        );
    }

    #[test]
    fn no_time_named_is_no_window() {
        assert_eq!(window("what is my dog's name?"), None);
        assert_eq!(window("on my birthday"), None);
        assert_eq!(
            window_of("last week", i64::MAX),
            None,
            "a reference time out of range"
        );
    }
}
