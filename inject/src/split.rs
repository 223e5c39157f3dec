//! Cutting a YAML stream into its documents as text.
//!
//! Documents that `legate inject` does not change are written back as the
//! exact bytes they were read as, comments and all; that needs each
//! document's text, not just its parsed tree. The YAML specification makes
//! this a line-level job: a line that begins with `---` or `...` followed by
//! a space, a tab or the end of the line is a document marker wherever it
//! appears, even where a block scalar or a quoted string would otherwise
//! continue (YAML 1.2, "c-forbidden"). So a cut at those lines never splits
//! a document in two. Each piece is then parsed on its own, and a piece
//! that still parses to more than one document is reported rather than
//! guessed at.

/// One piece of the stream: a document with its own markers and comments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunk<'a> {
    /// The exact text, line breaks included.
    pub text: &'a str,
    /// 1-based line of the input where the piece starts.
    pub first_line: usize,
}

fn is_marker(line: &str, marker: &str) -> bool {
    match line.strip_prefix(marker) {
        Some(rest) => rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']),
        None => false,
    }
}

/// Whether the line opens a document (`---`).
pub(crate) fn is_start(line: &str) -> bool {
    is_marker(line.trim_start_matches('\u{feff}'), "---")
}

/// Whether the line closes a document (`...`).
pub(crate) fn is_end(line: &str) -> bool {
    is_marker(line, "...")
}

/// Cuts `input` at document markers. Concatenating the pieces gives back
/// `input` exactly.
pub(crate) fn split(input: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    let mut line_no = 1;
    for line in input.split_inclusive('\n') {
        if is_start(line) && offset > start {
            chunks.push(Chunk {
                text: &input[start..offset],
                first_line: start_line,
            });
            start = offset;
            start_line = line_no;
        }
        offset += line.len();
        line_no += 1;
        if is_end(line) {
            chunks.push(Chunk {
                text: &input[start..offset],
                first_line: start_line,
            });
            start = offset;
            start_line = line_no;
        }
    }
    if offset > start {
        chunks.push(Chunk {
            text: &input[start..offset],
            first_line: start_line,
        });
    }
    chunks
}

/// The lines a rewritten document keeps from its original text: the `---`
/// marker, and directives, blank lines and comments above the content.
/// A marker line that also carries content (`--- !tag` or `--- {a: 1}`) is
/// reduced to a bare `---`, since the content is written out again.
pub(crate) fn header(text: &str) -> String {
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if is_start(line) {
            let rest = line.trim_start_matches('\u{feff}')[3..].trim();
            if rest.is_empty() || rest.starts_with('#') {
                out.push_str(line);
                continue;
            }
            out.push_str("---\n");
            break;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') || line.starts_with('%') {
            out.push_str(line);
            continue;
        }
        break;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// The line (1-based, within `text`) of the first line that is not part of
/// [`header`], for pointing at a document.
pub(crate) fn content_line(text: &str) -> usize {
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if is_start(line) {
            let rest = line.trim_start_matches('\u{feff}')[3..].trim();
            if rest.is_empty() || rest.starts_with('#') {
                continue;
            }
            return i + 1;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') || line.starts_with('%') {
            continue;
        }
        return i + 1;
    }
    1
}

/// Whether the piece ends with an explicit `...` marker.
pub(crate) fn has_end_marker(text: &str) -> bool {
    text.lines().any(is_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(input: &str) -> Vec<&str> {
        split(input).into_iter().map(|c| c.text).collect()
    }

    #[test]
    fn pieces_join_back_to_the_input() {
        for input in [
            "",
            "a: 1\n",
            "a: 1\n---\nb: 2\n",
            "# top\n---\na: 1\n--- # c\nb: 2",
            "a: 1\n...\n%YAML 1.2\n---\nb: 2\n",
            "---\n---\n",
            "a: |\n  ---x\n  text\n",
        ] {
            assert_eq!(texts(input).concat(), input);
        }
    }

    #[test]
    fn cuts_only_at_markers() {
        assert_eq!(texts("a: 1\n---\nb: 2\n"), ["a: 1\n", "---\nb: 2\n"]);
        assert_eq!(texts("a: 1\n----\nb: 2\n"), ["a: 1\n----\nb: 2\n"]);
        assert_eq!(texts("a: 1\n...\nb: 2\n"), ["a: 1\n...\n", "b: 2\n"]);
        assert_eq!(
            texts("a: 1\r\n---\r\nb: 2\r\n"),
            ["a: 1\r\n", "---\r\nb: 2\r\n"]
        );
        let chunks = split("# c\n---\na: 1\n---\nb: 2\n");
        assert_eq!(
            chunks.iter().map(|c| c.first_line).collect::<Vec<_>>(),
            [1, 2, 4]
        );
    }

    #[test]
    fn header_keeps_marker_and_leading_comments() {
        assert_eq!(header("---\n# web\n\nkind: Pod\n# x\n"), "---\n# web\n\n");
        assert_eq!(header("--- {kind: Pod}\n"), "---\n");
        assert_eq!(header("kind: Pod\n"), "");
        assert_eq!(content_line("---\n# web\nkind: Pod\n"), 3);
    }
}
