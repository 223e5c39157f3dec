//! Reading and building YAML nodes that keep their source representation.
//!
//! Documents are loaded with scalar resolution turned off, so every scalar
//! stays as the text and quoting style it was written with. Nothing here
//! decides whether `0644` is an octal number or `yes` a boolean: those
//! questions have different answers in YAML 1.1 (what Kubernetes reads)
//! and YAML 1.2, and a rewrite that answered them would change meaning.
//! Keys are matched by their text, whatever their quoting.

use std::borrow::Cow;

use saphyr::{Mapping, ScalarStyle, Tag, Yaml};

/// The text of a scalar node, whatever its style; `None` for collections.
pub(crate) fn text<'a>(node: &'a Yaml<'_>) -> Option<&'a str> {
    match node {
        Yaml::Representation(s, _, _) => Some(s),
        Yaml::Tagged(_, inner) => text(inner),
        _ => None,
    }
}

/// Whether `tag` is the core-schema tag `tag:yaml.org,2002:<name>`, however
/// it was written (`!!bool`, or verbatim as `!<tag:yaml.org,2002:bool>`).
/// A `%TAG !! ...` directive that points `!!` elsewhere makes it another tag.
fn is_core_tag(tag: &Tag, name: &str) -> bool {
    const CORE: &str = "tag:yaml.org,2002:";
    let full = format!("{}{}", tag.handle, tag.suffix);
    full.strip_prefix(CORE) == Some(name)
}

/// Whether a scalar is a boolean `true` as Kubernetes' YAML 1.1 reader sees
/// it: a plain `true`, `yes`, `on` (any of their spellings), or any of
/// those with an explicit `!!bool` tag, which makes even a quoted scalar a
/// boolean. Any other tag (`!!str`, a local `!tag`) makes it something
/// Kubernetes does not read as `true`.
pub(crate) fn is_true(node: &Yaml<'_>) -> bool {
    let truthy = |s: &str| {
        matches!(
            s,
            "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "y" | "Y"
        )
    };
    match node {
        Yaml::Representation(s, ScalarStyle::Plain, None) => truthy(s),
        Yaml::Representation(s, _, Some(tag)) => is_core_tag(tag, "bool") && truthy(s),
        Yaml::Tagged(tag, inner) => is_core_tag(tag, "bool") && text(inner).is_some_and(truthy),
        _ => false,
    }
}

/// Whether a node is null: an empty plain scalar, `~` or `null`, also when
/// tagged `!!null` (then in any style, as for `!!bool`).
pub(crate) fn is_null(node: &Yaml<'_>) -> bool {
    let null = |s: &str| matches!(s, "" | "~" | "null" | "Null" | "NULL");
    match node {
        Yaml::Representation(s, ScalarStyle::Plain, None) => null(s),
        Yaml::Representation(s, _, Some(tag)) => is_core_tag(tag, "null") && null(s),
        Yaml::BadValue => true,
        _ => false,
    }
}

/// Whether a mapping key is a YAML merge key: `<<`, or one tagged
/// `!!merge`. Kubernetes' YAML reader applies merge keys; this crate
/// does not, so a document holding one must not be judged by its tree.
pub(crate) fn is_merge_key(key: &Yaml<'_>) -> bool {
    text(key) == Some("<<")
        || matches!(key, Yaml::Representation(_, _, Some(tag)) | Yaml::Tagged(tag, _)
            if is_core_tag(tag, "merge"))
}

pub(crate) fn as_map<'a, 'i>(node: &'a Yaml<'i>) -> Option<&'a Mapping<'i>> {
    match node {
        Yaml::Mapping(m) => Some(m),
        Yaml::Tagged(_, inner) => as_map(inner),
        _ => None,
    }
}

pub(crate) fn as_map_mut<'a, 'i>(node: &'a mut Yaml<'i>) -> Option<&'a mut Mapping<'i>> {
    match node {
        Yaml::Mapping(m) => Some(m),
        Yaml::Tagged(_, inner) => as_map_mut(inner),
        _ => None,
    }
}

pub(crate) fn as_seq<'a, 'i>(node: &'a Yaml<'i>) -> Option<&'a Vec<Yaml<'i>>> {
    match node {
        Yaml::Sequence(s) => Some(s),
        Yaml::Tagged(_, inner) => as_seq(inner),
        _ => None,
    }
}

pub(crate) fn as_seq_mut<'a, 'i>(node: &'a mut Yaml<'i>) -> Option<&'a mut Vec<Yaml<'i>>> {
    match node {
        Yaml::Sequence(s) => Some(s),
        Yaml::Tagged(_, inner) => as_seq_mut(inner),
        _ => None,
    }
}

/// The key node whose text is `key`.
fn find_key<'i>(map: &Mapping<'i>, key: &str) -> Option<Yaml<'i>> {
    map.keys().find(|k| text(k) == Some(key)).cloned()
}

/// The value under `key`, matched by text.
pub(crate) fn get<'a, 'i>(map: &'a Mapping<'i>, key: &str) -> Option<&'a Yaml<'i>> {
    map.iter()
        .find(|(k, _)| text(k) == Some(key))
        .map(|(_, v)| v)
}

pub(crate) fn get_mut<'a, 'i>(map: &'a mut Mapping<'i>, key: &str) -> Option<&'a mut Yaml<'i>> {
    let k = find_key(map, key)?;
    map.get_mut(&k)
}

/// The value under `key`; when it is missing or null, `empty` (an empty
/// mapping or sequence) is put there first: appended, or placed before the
/// key named `before` so that the result reads in the usual order.
pub(crate) fn entry<'a, 'i>(
    map: &'a mut Mapping<'i>,
    key: &str,
    empty: Yaml<'i>,
    before: Option<&str>,
) -> Option<&'a mut Yaml<'i>> {
    // Careful: `LinkedHashMap::insert` and `Entry::or_insert` move an
    // existing key to the back; `get_mut` and `replace` keep its place.
    let k = match find_key(map, key) {
        Some(k) => {
            if map.get(&k).is_some_and(is_null) {
                map.replace(k.clone(), empty);
            }
            k
        }
        None => {
            let k = plain(key);
            match before.and_then(|b| find_key(map, b)) {
                Some(anchor) => {
                    for (old_k, v) in std::mem::take(map) {
                        if old_k == anchor {
                            map.insert(k.clone(), empty.clone());
                        }
                        map.insert(old_k, v);
                    }
                }
                None => {
                    map.insert(k.clone(), empty);
                }
            }
            k
        }
    };
    map.get_mut(&k)
}

/// A plain scalar: for keys, numbers, booleans and words that read the
/// same in every YAML version.
pub(crate) fn plain<'i>(s: impl Into<String>) -> Yaml<'i> {
    Yaml::Representation(Cow::Owned(s.into()), ScalarStyle::Plain, None)
}

/// A string scalar: plain when it cannot be read as anything but a string,
/// double-quoted otherwise (`"1337"`, `"false"`, `"10.0.0.0/8"`).
pub(crate) fn string<'i>(s: impl Into<String>) -> Yaml<'i> {
    let s = s.into();
    let style = if plain_is_string(&s) {
        ScalarStyle::Plain
    } else {
        ScalarStyle::DoubleQuoted
    };
    Yaml::Representation(Cow::Owned(s), style, None)
}

/// Whether `s`, written plain, is a string in YAML 1.1 and 1.2 alike.
/// Deliberately narrow: anything doubtful is quoted.
fn plain_is_string(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let lower = s.to_ascii_lowercase();
    let word = matches!(
        lower.as_str(),
        "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null" | "~"
    );
    // Kubernetes quantities such as 50m or 128Mi are strings however written.
    let quantity = first.is_ascii_digit()
        && s.trim_start_matches(|c: char| c.is_ascii_digit())
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
        && !lower.contains('e')
        && !lower.starts_with("0x")
        && !lower.starts_with("0o")
        && !lower.starts_with("0b");
    (first.is_ascii_alphabetic() || first == '/' || quantity)
        && !word
        && !s.ends_with(':')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':'))
        && !s.contains("://")
}

/// A mapping from `(key, value)` pairs, in order.
pub(crate) fn map<'i>(entries: impl IntoIterator<Item = (&'static str, Yaml<'i>)>) -> Yaml<'i> {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(plain(k), v);
    }
    Yaml::Mapping(m)
}

/// A sequence.
pub(crate) fn seq<'i>(items: impl IntoIterator<Item = Yaml<'i>>) -> Yaml<'i> {
    Yaml::Sequence(items.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unambiguous_strings_stay_plain() {
        for s in [
            "legate-proxy",
            "/ready",
            "50m",
            "128Mi",
            "metadata.namespace",
            "ghcr.io/x/y:0.1.0",
        ] {
            assert!(plain_is_string(s), "{s}");
        }
        for s in [
            "1337",
            "false",
            "on",
            "",
            "1e3",
            "0x10",
            "10.0.0.0/8",
            "a b",
            "80,443",
            "x:",
            "-1",
        ] {
            assert!(!plain_is_string(s), "{s}");
        }
    }
}
