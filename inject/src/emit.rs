//! Writing a changed document back as block-style YAML.
//!
//! What is kept: the order of every mapping's keys, and every scalar's text
//! and kind of quoting. A plain scalar is written exactly as it was read,
//! so `0644`, `yes` or `1e3` mean to Kubernetes what they meant before. A
//! single-quoted scalar stays single-quoted, a double-quoted one is
//! re-escaped, and block scalars (`|` and `>`) come out as literal blocks
//! with the same content and chomping. Tags are kept.
//!
//! What is not: comments inside the document (those above it are kept by
//! the caller), flow style (`{a: 1}` becomes a block mapping), indentation
//! (two spaces, sequences indented under their key), and anchors (the
//! loader expands each alias into a copy of its anchor, which means the
//! same to Kubernetes).
//!
//! The emitter of the `saphyr` crate is not used: it writes quoted scalars
//! without escaping them and panics on block scalars kept as written.

use saphyr::{ScalarStyle, Tag, Yaml};

/// A node the emitter cannot write back faithfully.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EmitError {
    #[error("a mapping key that is itself a mapping or a list is not supported")]
    ComplexKey,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// At the start of the document.
    Root,
    /// Right after `key:`.
    Key,
    /// Right after `-`.
    Dash,
}

/// Writes `doc` as the body of a document (without a `---` marker).
pub(crate) fn document(doc: &Yaml<'_>, out: &mut String) -> Result<(), EmitError> {
    node(out, doc, 0, Ctx::Root)
}

fn indent(out: &mut String, col: usize) {
    out.extend(std::iter::repeat_n(' ', col));
}

/// Writes `n`, whose prefix (`key:`, `-` or nothing) is already written;
/// `col` is the column its block children start at.
fn node(out: &mut String, n: &Yaml<'_>, col: usize, ctx: Ctx) -> Result<(), EmitError> {
    let sep = if ctx == Ctx::Root { "" } else { " " };
    match n {
        Yaml::Mapping(m) if m.is_empty() => {
            out.push_str(sep);
            out.push_str("{}\n");
        }
        Yaml::Sequence(s) if s.is_empty() => {
            out.push_str(sep);
            out.push_str("[]\n");
        }
        Yaml::Mapping(m) => {
            open(out, ctx);
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 || ctx != Ctx::Dash {
                    indent(out, col);
                }
                key(out, k)?;
                out.push(':');
                node(out, v, col + 2, Ctx::Key)?;
            }
        }
        Yaml::Sequence(s) => {
            open(out, ctx);
            for (i, item) in s.iter().enumerate() {
                if i > 0 || ctx != Ctx::Dash {
                    indent(out, col);
                }
                out.push('-');
                node(out, item, col + 2, Ctx::Dash)?;
            }
        }
        Yaml::Tagged(tag, inner) => {
            out.push_str(sep);
            out.push_str(&tag_text(tag));
            let collection = matches!(&**inner, Yaml::Mapping(m) if !m.is_empty())
                || matches!(&**inner, Yaml::Sequence(s) if !s.is_empty());
            // After a tag, a block collection starts on the next line.
            let ctx = if collection || ctx != Ctx::Root {
                Ctx::Key
            } else {
                Ctx::Root
            };
            if ctx == Ctx::Root {
                out.push(' ');
            }
            node(out, inner, col, ctx)?;
        }
        Yaml::Representation(v, style, tag) => {
            let mut sep = sep;
            if let Some(tag) = tag {
                out.push_str(sep);
                out.push_str(&tag_text(tag));
                sep = " ";
            }
            if v.is_empty() && *style == ScalarStyle::Plain {
                // A null written as nothing stays nothing (`key:`).
                out.push('\n');
                return Ok(());
            }
            out.push_str(sep);
            scalar(out, v, *style, col);
        }
        Yaml::Value(v) => {
            out.push_str(sep);
            match v {
                saphyr::Scalar::String(s) => double_quoted(out, s),
                other => out.push_str(&resolved_text(other)),
            }
            out.push('\n');
        }
        // The loader resolves aliases and only makes BadValue for empty
        // documents; both are written as null to be safe.
        Yaml::Alias(_) | Yaml::BadValue => {
            out.push_str(sep);
            out.push_str("null\n");
        }
    }
    Ok(())
}

/// A resolved scalar as YAML text. Only nodes built in memory are
/// resolved; loaded ones keep their representation.
fn resolved_text(v: &saphyr::Scalar<'_>) -> String {
    match v {
        saphyr::Scalar::Null => "null".into(),
        saphyr::Scalar::Boolean(b) => b.to_string(),
        saphyr::Scalar::Integer(i) => i.to_string(),
        saphyr::Scalar::FloatingPoint(f) if f.is_nan() => ".nan".into(),
        saphyr::Scalar::FloatingPoint(f) if f.is_infinite() => {
            if f.is_sign_negative() {
                "-.inf".into()
            } else {
                ".inf".into()
            }
        }
        saphyr::Scalar::FloatingPoint(f) => format!("{:?}", f.into_inner()),
        saphyr::Scalar::String(s) => s.to_string(),
    }
}

/// Starts a non-empty block collection after its prefix.
fn open(out: &mut String, ctx: Ctx) {
    match ctx {
        Ctx::Root => {}
        Ctx::Key => out.push('\n'),
        Ctx::Dash => out.push(' '),
    }
}

fn key(out: &mut String, k: &Yaml<'_>) -> Result<(), EmitError> {
    match k {
        Yaml::Representation(v, style, tag) => {
            if let Some(tag) = tag {
                out.push_str(&tag_text(tag));
                out.push(' ');
            }
            match style {
                ScalarStyle::Plain if v.is_empty() => out.push('~'),
                ScalarStyle::Plain if !v.contains('\n') => out.push_str(v),
                ScalarStyle::SingleQuoted if !v.contains('\n') => single_quoted(out, v),
                _ => double_quoted(out, v),
            }
            Ok(())
        }
        Yaml::Value(v) => {
            match v {
                saphyr::Scalar::String(s) => double_quoted(out, s),
                other => out.push_str(&resolved_text(other)),
            }
            Ok(())
        }
        Yaml::Tagged(tag, inner) if !matches!(&**inner, Yaml::Mapping(_) | Yaml::Sequence(_)) => {
            out.push_str(&tag_text(tag));
            out.push(' ');
            key(out, inner)
        }
        _ => Err(EmitError::ComplexKey),
    }
}

/// Writes a non-empty scalar value and its line break.
fn scalar(out: &mut String, v: &str, style: ScalarStyle, col: usize) {
    match style {
        // A plain scalar's text is its value, except that a multi-line
        // plain scalar with a blank line folds to a line break, which plain
        // style cannot hold on one line.
        ScalarStyle::Plain if !v.contains('\n') => out.push_str(v),
        ScalarStyle::SingleQuoted if !v.contains('\n') => single_quoted(out, v),
        ScalarStyle::Literal | ScalarStyle::Folded if literal_ok(v) => {
            literal(out, v, col);
            return;
        }
        _ => double_quoted(out, v),
    }
    out.push('\n');
}

fn single_quoted(out: &mut String, v: &str) {
    out.push('\'');
    out.push_str(&v.replace('\'', "''"));
    out.push('\'');
}

fn double_quoted(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if ('\u{80}'..='\u{9f}').contains(&c)
                || matches!(c, '\u{feff}' | '\u{2028}' | '\u{2029}') =>
            {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Whether a literal block holds `v` exactly, with no indentation
/// indicator needed: some visible content, no leading spaces or tabs on
/// the first line with content (nor whitespace-only lines before it), and
/// nothing but printable characters, tabs and line breaks.
fn literal_ok(v: &str) -> bool {
    let content = v.trim_end_matches('\n');
    if content.trim().is_empty() {
        return false;
    }
    let first = content.trim_start_matches('\n');
    if first.starts_with([' ', '\t']) {
        return false;
    }
    v.chars().all(|c| {
        c == '\n'
            || c == '\t'
            || !(c.is_control() || matches!(c, '\u{feff}' | '\u{2028}' | '\u{2029}'))
    })
}

fn literal(out: &mut String, v: &str, col: usize) {
    let content = v.trim_end_matches('\n');
    let trailing = v.len() - content.len();
    out.push_str(match trailing {
        0 => "|-\n",
        1 => "|\n",
        _ => "|+\n",
    });
    for line in content.split('\n') {
        if !line.is_empty() {
            indent(out, col);
            out.push_str(line);
        }
        out.push('\n');
    }
    for _ in 1..trailing {
        out.push('\n');
    }
}

/// A tag as it is written in YAML: `!!str`, `!local` or `!<uri>`.
fn tag_text(tag: &Tag) -> String {
    match tag.handle.as_str() {
        "tag:yaml.org,2002:" => format!("!!{}", tag.suffix),
        "!" => format!("!{}", tag.suffix),
        "!!" => format!("!!{}", tag.suffix),
        "" => format!("!<{}>", tag.suffix),
        h => format!("!<{h}{}>", tag.suffix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saphyr::{LoadableYamlNode, YamlLoader};
    use saphyr_parser::Parser;

    fn load(s: &str) -> Yaml<'_> {
        let mut loader: YamlLoader<'_, Yaml<'_>> = YamlLoader::default();
        loader.early_parse(false);
        Parser::new_from_str(s).load(&mut loader, true).unwrap();
        assert!(loader.error().is_none());
        loader.into_documents().remove(0)
    }

    fn resolved(s: &str) -> Vec<Yaml<'_>> {
        Yaml::load_from_str(s).unwrap()
    }

    fn roundtrip(src: &str) -> String {
        let mut out = String::new();
        document(&load(src), &mut out).unwrap();
        // The rewritten text must mean exactly what the source meant.
        assert_eq!(resolved(&out), resolved(src), "rewritten as:\n{out}");
        out
    }

    #[test]
    fn block_documents_come_back_unchanged() {
        let src =
            "a: 1\nb:\n  c: [x]\nd:\n  - e: 0644\n    f: yes\n  - - g\n    - h\n  -\nk: ~\nl:\n";
        let out = roundtrip(src);
        assert_eq!(
            out,
            "a: 1\nb:\n  c:\n    - x\nd:\n  - e: 0644\n    f: yes\n  - - g\n    - h\n  -\nk: ~\nl:\n"
        );
    }

    #[test]
    fn scalars_keep_text_and_quoting() {
        let src = r#"
plain: 010
single: 'it''s'
double: "tab\there \"q\" \u00e9 \x01"
tagged: !!str 123
custom: !thing {a: 1}
empty_s: ''
empty_d: ""
multi: a
  b

  c
"#;
        let out = roundtrip(src);
        assert!(out.contains("plain: 010\n"), "{out}");
        assert!(out.contains("single: 'it''s'\n"), "{out}");
        assert!(out.contains("tagged: !!str 123\n"), "{out}");
        assert!(out.contains("custom: !thing\n  a: 1\n"), "{out}");
        assert!(out.contains("empty_s: ''\n"), "{out}");
        assert!(out.contains("multi: \"a b\\nc\"\n"), "{out}");
    }

    #[test]
    fn block_scalars_become_literal_with_the_same_content() {
        let src = "a: |\n  one\n    two\n\n  three\nb: >-\n  folded\n  text\nc: |+\n  keep\n\nd: |2\n    lead\ne:\n  - |-\n    in a list\n";
        let out = roundtrip(src);
        assert!(out.contains("a: |\n  one\n    two\n\n  three\n"), "{out}");
        assert!(out.contains("b: |-\n  folded text\n"), "{out}");
        assert!(out.contains("c: |+\n  keep\n\n"), "{out}");
        assert!(out.contains("d: \"  lead\\n\"\n"), "{out}");
        assert!(out.contains("  - |-\n    in a list\n"), "{out}");
    }

    #[test]
    fn aliases_are_expanded() {
        let out = roundtrip("a: &x {k: v}\nb: *x\n");
        assert_eq!(out, "a:\n  k: v\nb:\n  k: v\n");
    }

    #[test]
    fn complex_keys_are_refused() {
        let mut out = String::new();
        assert_eq!(
            document(&load("? [a]\n: b\n"), &mut out),
            Err(EmitError::ComplexKey)
        );
    }

    /// A small deterministic generator (splitmix64), so that a failing
    /// seed can be run again.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.below(of.len())]
        }
        /// Characters that quoting and escaping must carry: quotes,
        /// backslashes, YAML indicators, accents, an emoji.
        fn text(&mut self, newlines: bool) -> String {
            const PIECES: &[&str] = &[
                "a", "Z", "7", " ", "'", "\"", "\\", "#", ": ", "-", "{", "}", "[", "]", ",", "&",
                "*", "!", "|", ">", "%", "@", "`", "é", "日", "🦀", "\t", "~", "?",
            ];
            let mut t = String::new();
            for _ in 0..self.below(12) {
                if newlines && self.below(8) == 0 {
                    t.push('\n');
                } else {
                    t.push_str(self.pick(PIECES));
                }
            }
            t
        }
    }

    /// The source text of a scalar that fits on one line after `key: `.
    fn inline_scalar(g: &mut Gen) -> String {
        match g.below(3) {
            0 => g
                .pick(&[
                    "0644",
                    "yes",
                    "no",
                    "~",
                    "null",
                    "1e3",
                    "-1",
                    "0x1F",
                    "true",
                    "a b",
                    "a:b",
                    "http://x:80/y?q=1",
                    "foo#bar",
                    "x-y_z",
                    "é",
                    "1.0",
                    ".inf",
                    "2001-12-14",
                    "a 'b' c",
                ])
                .to_owned(),
            1 => format!("'{}'", g.text(false).replace('\'', "''")),
            _ => {
                let mut out = String::from("\"");
                for c in g.text(true).chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        '\t' => out.push_str("\\t"),
                        c => out.push(c),
                    }
                }
                if g.below(4) == 0 {
                    out.push_str("\\x01\\u00e9");
                }
                out.push('"');
                out
            }
        }
    }

    /// A mapping at `indent` spaces with random keys and values: scalars,
    /// literal blocks, nested mappings and sequences.
    fn mapping(g: &mut Gen, indent: usize, depth: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        for k in 0..1 + g.below(4) {
            let key = match g.below(3) {
                0 => format!("'key {k}: x'"),
                _ => format!("k{k}"),
            };
            match (g.below(5), depth < 3) {
                (0, true) => {
                    out.push_str(&format!("{pad}{key}:\n"));
                    mapping(g, indent + 2, depth + 1, out);
                }
                (1, true) => {
                    out.push_str(&format!("{pad}{key}:\n"));
                    for _ in 0..1 + g.below(3) {
                        if g.below(2) == 0 {
                            out.push_str(&format!("{pad}- {}\n", inline_scalar(g)));
                        } else {
                            out.push_str(&format!("{pad}-\n"));
                            mapping(g, indent + 2, depth + 1, out);
                        }
                    }
                }
                (2, _) => {
                    let chomp = g.pick(&["", "-", "+"]);
                    out.push_str(&format!("{pad}{key}: |{chomp}\n"));
                    for _ in 0..1 + g.below(3) {
                        let words = g.text(false).replace(['\t', '\n'], " ");
                        out.push_str(&format!("{pad}  line{}\n", words.trim_end()));
                    }
                    if chomp == "+" {
                        out.push('\n');
                    }
                }
                _ => out.push_str(&format!("{pad}{key}: {}\n", inline_scalar(g))),
            }
        }
    }

    #[test]
    fn random_documents_mean_the_same_once_rewritten() {
        for seed in 0..400u64 {
            let mut g = Gen(seed);
            let mut src = String::new();
            mapping(&mut g, 0, 0, &mut src);
            // The source must itself be valid YAML, or the generator is wrong.
            assert!(Yaml::load_from_str(&src).is_ok(), "seed {seed}:\n{src}");
            let outcome = std::panic::catch_unwind(|| roundtrip(&src));
            assert!(outcome.is_ok(), "seed {seed}, source:\n{src}");
        }
    }
}
