//! Limits checked before any YAML reaches the parser, so parse cost stays linear in the input.
//!
//! libyaml (behind serde_yaml) does work proportional to the nesting depth for every token, so a small
//! file of nested flow collections (`[[[[...`) costs time quadratic in its size: 200 kB took about
//! 27 s. winmesh's files never nest more than a dozen levels, so inputs deeper than [`MAX_DEPTH`] or
//! larger than the caller's size limit are refused with an error naming the line, before parsing.

use thiserror::Error;

/// Deepest nesting accepted (flow collections and block indentation levels together).
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("the file is {size} bytes; the limit is {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("nesting deeper than {limit} levels at line {line}")]
    TooDeep { line: usize, limit: usize },
}

/// Checks `text` against `max_bytes` and [`MAX_DEPTH`] in one linear pass.
pub fn check(text: &str, max_bytes: usize) -> Result<(), Error> {
    if text.len() > max_bytes {
        return Err(Error::TooLarge {
            size: text.len(),
            limit: max_bytes,
        });
    }
    check_depth(text, MAX_DEPTH)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    None,
    Single,
    Double,
}

/// The nesting depth scan. It is deliberately conservative: it counts block levels by indentation
/// (plus `- ` entries that open a sequence on the same line) and flow levels by brackets outside
/// quotes and comments, skipping block scalars (`|`, `>`), whose content is text.
pub fn check_depth(text: &str, limit: usize) -> Result<(), Error> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut quote = Quote::None;
    // Indentation of the line that opened a block scalar: deeper lines are its text.
    let mut scalar_parent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let indent = line.len() - line.trim_start_matches(' ').len();
        let body = &line[indent..];
        if let Some(parent) = scalar_parent {
            if body.trim().is_empty() || indent > parent {
                continue;
            }
            scalar_parent = None;
        }
        let mut depth_here = 0usize;
        if quote == Quote::None && flow == 0 {
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            // `- - - x` opens one sequence per dash on a single line.
            let mut rest = body;
            while let Some(r) = rest.strip_prefix("- ") {
                depth_here += 1;
                rest = r.trim_start_matches(' ');
            }
        }
        let mut prev = ' ';
        let mut chars = body.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Quote::Single => {
                    if c == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            quote = Quote::None;
                        }
                    }
                }
                Quote::Double => {
                    if c == '\\' {
                        chars.next();
                    } else if c == '"' {
                        quote = Quote::None;
                    }
                }
                Quote::None => match c {
                    '#' if prev == ' ' || prev == '\t' => break,
                    '\'' => quote = Quote::Single,
                    '"' => quote = Quote::Double,
                    '[' | '{' => flow += 1,
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = c;
            if indents.len() + depth_here + flow > limit {
                return Err(Error::TooDeep {
                    line: lineno,
                    limit,
                });
            }
        }
        if indents.len() + depth_here + flow > limit {
            return Err(Error::TooDeep {
                line: lineno,
                limit,
            });
        }
        if quote == Quote::None && flow == 0 {
            let code = body.split(" #").next().unwrap_or("").trim_end();
            let last = code.rsplit(' ').next().unwrap_or("");
            if !last.is_empty()
                && (last.starts_with('|') || last.starts_with('>'))
                && last[1..]
                    .chars()
                    .all(|c| c == '-' || c == '+' || c.is_ascii_digit())
            {
                scalar_parent = Some(indent);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_files_pass() {
        let text = "a:\n  b:\n    - {x: [1, 2, {y: z}]}\n    - 'quoted [[[[ not nesting'\n    - \"also ]] {{ \\\" \"\n  c: |\n    [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n  d: 1 # [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n";
        assert_eq!(check(text, 1 << 20), Ok(()));
    }

    #[test]
    fn deep_flow_nesting_is_refused_with_its_line() {
        let text = format!("ok: 1\nbad: {}1{}\n", "[".repeat(100), "]".repeat(100));
        assert_eq!(
            check(&text, 1 << 20),
            Err(Error::TooDeep {
                line: 2,
                limit: MAX_DEPTH
            })
        );
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let mut text = String::new();
        for i in 0..80 {
            text.push_str(&" ".repeat(i));
            text.push_str("k:\n");
        }
        assert!(matches!(check(&text, 1 << 20), Err(Error::TooDeep { .. })));
        let dashes = format!("{}x\n", "- ".repeat(80));
        assert!(matches!(
            check(&dashes, 1 << 20),
            Err(Error::TooDeep { line: 1, .. })
        ));
    }

    #[test]
    fn size_limit() {
        assert_eq!(
            check("abcdef", 3),
            Err(Error::TooLarge { size: 6, limit: 3 })
        );
    }

    #[test]
    fn the_pathological_input_is_refused_fast() {
        // 200 kB of nested brackets (it used to take ~27 s to parse) never reaches the parser.
        let text = "[".repeat(200_000);
        assert_eq!(
            check(&text, 1 << 20),
            Err(Error::TooDeep {
                line: 1,
                limit: MAX_DEPTH
            })
        );
    }
}
