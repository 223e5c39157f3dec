//! The `legate.dev/*` annotations a workload uses to tune its injection.
//!
//! Values are checked here, with the same parser `legate init` and
//! `legate proxy` will apply to the environment variables they become, so
//! a typo fails at `legate inject` time, naming the document and the
//! annotation, rather than in a crash-looping pod.

use legate_config::{FlagValue, LoadError, Problem, Sources};
use saphyr::Mapping;

use crate::node::{get, text};

/// The prefix of every annotation legate reads or writes.
pub const PREFIX: &str = "legate.dev/";
/// `"false"` leaves the workload out of the mesh.
pub const INJECT: &str = "legate.dev/inject";
/// Set on injected pods to the injecting legate's version.
pub const INJECTED: &str = "legate.dev/injected";

/// An annotation that sets a configuration key in one of the containers.
pub(crate) struct Setting {
    pub annotation: &'static str,
    /// The configuration key, checked by `legate_config`.
    pub key: &'static str,
    /// The environment variable the container gets.
    pub env: &'static str,
    pub container: Target,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Init,
    Proxy,
    /// Both containers. The inbound capture lists are: the proxy forwards
    /// a peer to localhost only on ports the rules capture, so it has to
    /// know which ones they are.
    Both,
}

impl Target {
    /// Whether a setting for `self` goes into `container`'s environment.
    pub(crate) fn reaches(self, container: Target) -> bool {
        self == container || self == Target::Both
    }
}

/// Every annotation that becomes configuration, in the order the
/// environment variables are written.
pub(crate) const SETTINGS: &[Setting] = &[
    Setting {
        annotation: "legate.dev/skip-inbound-ports",
        key: "init.exclude_inbound_ports",
        env: "LEGATE_INIT_EXCLUDE_INBOUND_PORTS",
        container: Target::Both,
    },
    Setting {
        annotation: "legate.dev/inbound-ports",
        key: "init.include_inbound_ports",
        env: "LEGATE_INIT_INCLUDE_INBOUND_PORTS",
        container: Target::Both,
    },
    Setting {
        annotation: "legate.dev/skip-outbound-ports",
        key: "init.exclude_outbound_ports",
        env: "LEGATE_INIT_EXCLUDE_OUTBOUND_PORTS",
        container: Target::Init,
    },
    Setting {
        annotation: "legate.dev/skip-outbound-cidrs",
        key: "init.exclude_outbound_cidrs",
        env: "LEGATE_INIT_EXCLUDE_OUTBOUND_CIDRS",
        container: Target::Init,
    },
    Setting {
        annotation: "legate.dev/mode",
        key: "proxy.mode",
        env: "LEGATE_PROXY_MODE",
        container: Target::Proxy,
    },
    Setting {
        annotation: "legate.dev/opaque-ports",
        key: "proxy.opaque_ports",
        env: "LEGATE_PROXY_OPAQUE_PORTS",
        container: Target::Proxy,
    },
];

/// Annotations that size the proxy container, with their defaults.
pub(crate) const CPU_REQUEST: (&str, &str) = ("legate.dev/proxy-cpu-request", "50m");
pub(crate) const MEMORY_REQUEST: (&str, &str) = ("legate.dev/proxy-memory-request", "32Mi");
pub(crate) const MEMORY_LIMIT: (&str, &str) = ("legate.dev/proxy-memory-limit", "128Mi");

/// Every annotation name legate knows, for spotting typos.
pub(crate) fn known() -> impl Iterator<Item = &'static str> {
    [
        INJECT,
        INJECTED,
        CPU_REQUEST.0,
        MEMORY_REQUEST.0,
        MEMORY_LIMIT.0,
    ]
    .into_iter()
    .chain(SETTINGS.iter().map(|s| s.annotation))
}

/// A bad annotation: its name and what is wrong.
pub(crate) type Bad = (String, String);

/// The workload's annotations: the pod template's, falling back to the
/// workload's own for any the template does not set.
pub(crate) struct Annotations<'a, 'i> {
    pub pod: Option<&'a Mapping<'i>>,
    pub workload: Option<&'a Mapping<'i>>,
}

impl Annotations<'_, '_> {
    /// The value of an annotation. A value that is not a scalar is an error.
    pub fn get(&self, name: &str) -> Result<Option<&str>, Bad> {
        for m in [self.pod, self.workload].into_iter().flatten() {
            if let Some(v) = get(m, name) {
                return match text(v) {
                    Some(s) => Ok(Some(s)),
                    None => Err((name.to_owned(), "the value must be a string".into())),
                };
            }
        }
        Ok(None)
    }

    /// Whether the workload opted out with `legate.dev/inject: "false"`.
    pub fn opted_out(&self) -> Result<bool, Bad> {
        match self.get(INJECT)? {
            None => Ok(false),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(false),
            Some(v) => Err((
                INJECT.into(),
                format!("{v:?} is neither \"true\" nor \"false\"; write \"false\" to leave the workload out of the mesh"),
            )),
        }
    }

    /// `legate.dev/` annotations that legate does not know, with the
    /// closest known name.
    pub fn unknown(&self) -> Option<Bad> {
        for m in [self.pod, self.workload].into_iter().flatten() {
            for k in m.keys().filter_map(text) {
                if k.starts_with(PREFIX) && !known().any(|n| n == k) {
                    let best = known()
                        .min_by_key(|n| edit_distance(n, k))
                        .unwrap_or(INJECT);
                    return Some((
                        k.to_owned(),
                        format!("legate has no such annotation; did you mean {best}?"),
                    ));
                }
            }
        }
        None
    }

    /// The configuration the annotations set, as `(setting, value)` pairs,
    /// each value checked by the configuration parser.
    pub fn settings(&self) -> Result<Vec<(&'static Setting, String)>, Bad> {
        let mut out = Vec::new();
        for s in SETTINGS {
            let Some(value) = self.get(s.annotation)? else {
                continue;
            };
            check(s, value).map_err(|m| (s.annotation.to_owned(), m))?;
            out.push((s, value.to_owned()));
        }
        check_together(&out)?;
        Ok(out)
    }

    /// The proxy's resources: `(cpu request, memory request, memory limit)`.
    pub fn resources(&self) -> Result<[String; 3], Bad> {
        let one = |(name, default): (&str, &str)| -> Result<String, Bad> {
            match self.get(name)? {
                None => Ok(default.to_owned()),
                Some(v) if is_quantity(v) => Ok(v.to_owned()),
                Some(v) => Err((
                    name.to_owned(),
                    format!("{v:?} is not a Kubernetes quantity such as 100m, 0.5, 64Mi or 1Gi"),
                )),
            }
        };
        let out = [one(CPU_REQUEST)?, one(MEMORY_REQUEST)?, one(MEMORY_LIMIT)?];
        // Kubernetes refuses a negative quantity and a request above its
        // limit when the pod is created; say so here, naming the
        // annotation, rather than leave the operator a rejected apply.
        let mut values = [0; 3];
        for (i, (name, _)) in [CPU_REQUEST, MEMORY_REQUEST, MEMORY_LIMIT]
            .into_iter()
            .enumerate()
        {
            let why = match quantity(&out[i]) {
                Ok(v) => {
                    values[i] = v;
                    continue;
                }
                Err(QuantityError::Negative) => {
                    "is negative, and Kubernetes refuses negative resources; write a positive quantity"
                }
                Err(QuantityError::TooLarge) => "is larger than any machine; write a quantity",
            };
            return Err((
                name.to_owned(),
                format!("{:?} {why} such as 100m or 64Mi", out[i]),
            ));
        }
        if values[1] > values[2] {
            let (request, limit) = (MEMORY_REQUEST.0, MEMORY_LIMIT.0);
            let set = |name: &str| self.get(name).ok().flatten().is_some();
            let whence = if set(limit) {
                format!("{:?}, from {limit}", out[2])
            } else {
                format!("{:?} (the default; {limit} sets it)", out[2])
            };
            let (named, fix) = if set(request) {
                (request, format!("lower {request} or raise {limit}"))
            } else {
                (limit, format!("raise {limit} or lower {request}"))
            };
            return Err((
                named.to_owned(),
                format!(
                    "the memory request {:?} is larger than the memory limit {whence}, and Kubernetes refuses a request above its limit; {fix}",
                    out[1]
                ),
            ));
        }
        Ok(out)
    }
}

/// Why a quantity that [`is_quantity`] accepts cannot be used.
#[derive(Debug, PartialEq, Eq)]
enum QuantityError {
    Negative,
    /// More than `u128` nano-units: far beyond any machine.
    TooLarge,
}

/// The value of a quantity that [`is_quantity`] accepts, in nano-units
/// (`1` is `1_000_000_000`, `1Mi` is `1_048_576_000_000_000`), so that
/// quantities in different suffixes compare exactly. A fraction of a
/// nano-unit is rounded up, as Kubernetes rounds it. Negative zero is zero.
fn quantity(s: &str) -> Result<u128, QuantityError> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let digits_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(digits_end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    // The value is `mantissa * 10^ten * 2^two` nano-units.
    let mut mantissa: u128 = 0;
    for c in int.chars().chain(frac.chars()) {
        let d = u128::from(c.to_digit(10).unwrap_or(0));
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(d))
            .ok_or(QuantityError::TooLarge)?;
    }
    let frac_len = i64::try_from(frac.len()).map_err(|_| QuantityError::TooLarge)?;
    let (mut ten, two): (i64, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        e => (
            e[1..].parse::<i64>().map_err(|_| QuantityError::TooLarge)?,
            0,
        ),
    };
    ten = ten.saturating_add(9).saturating_sub(frac_len);
    let mut value = mantissa
        .checked_mul(1u128 << two)
        .ok_or(QuantityError::TooLarge)?;
    if value != 0 {
        if ten >= 0 {
            let scale = u32::try_from(ten)
                .ok()
                .and_then(|t| 10u128.checked_pow(t))
                .ok_or(QuantityError::TooLarge)?;
            value = value.checked_mul(scale).ok_or(QuantityError::TooLarge)?;
        } else {
            // Below a nano-unit: round up, as Kubernetes does.
            let scale = u32::try_from(-ten).ok().and_then(|t| 10u128.checked_pow(t));
            value = scale.map_or(1, |scale| value.div_ceil(scale));
        }
    }
    if negative && value != 0 {
        return Err(QuantityError::Negative);
    }
    Ok(value)
}

/// Checks one value with `legate_config`, as the container will read it.
fn check(s: &Setting, value: &str) -> Result<(), String> {
    let sources = Sources {
        flags: vec![FlagValue {
            path: s.key.into(),
            value: value.into(),
            flag: s.annotation.into(),
        }],
        ..Default::default()
    };
    match legate_config::load(&sources) {
        Ok(_) => Ok(()),
        Err(LoadError::Invalid(errs)) => Err(errs
            .0
            .iter()
            .map(|e| match &e.problem {
                Problem::Invalid {
                    value,
                    expected,
                    detail,
                } => match detail {
                    Some(d) => format!("invalid value {value}: {d}; expected {expected}"),
                    None => format!("invalid value {value}; expected {expected}"),
                },
                Problem::Rule(r) => in_annotations(r, &[s]),
                Problem::Unknown { .. } => format!("{} is not a configuration key", e.path),
            })
            .collect::<Vec<_>>()
            .join("; ")),
        Err(e) => Err(e.to_string()),
    }
}

/// Checks the values together, as the containers will read them. Each
/// passed on its own, but two can still clash (an inbound port both listed
/// and skipped), which the pod would otherwise only say as it crash-loops.
fn check_together(settings: &[(&'static Setting, String)]) -> Result<(), Bad> {
    // One origin for all, so that messages do not tell them apart by it:
    // they name the annotations instead.
    let origin = "the workload's annotations";
    let sources = Sources {
        flags: settings
            .iter()
            .map(|(s, value)| FlagValue {
                path: s.key.into(),
                value: value.clone(),
                flag: origin.into(),
            })
            .collect(),
        ..Default::default()
    };
    let Err(e) = legate_config::load(&sources) else {
        return Ok(());
    };
    let set: Vec<&Setting> = settings.iter().map(|(s, _)| *s).collect();
    // The defaults load, so something here failed, and each value passed
    // alone: what is left is a rule across keys, blamed on one of them.
    let first = e.errors().first();
    let annotation = set
        .iter()
        .find(|s| first.is_some_and(|f| f.path == s.key))
        .or(set.first())
        .map_or(PREFIX, |s| s.annotation);
    let message = match first.map(|f| &f.problem) {
        Some(Problem::Rule(r)) => in_annotations(r, &set),
        _ => e.to_string(),
    };
    Err((annotation.to_owned(), message))
}

/// A configuration message with the keys these settings set called by
/// their annotations, which are what the workload's author wrote.
fn in_annotations(message: &str, settings: &[&Setting]) -> String {
    settings
        .iter()
        .fold(message.to_owned(), |m, s| m.replace(s.key, s.annotation))
}

/// A Kubernetes resource quantity: a decimal number with an optional
/// exponent or binary/decimal suffix (`100m`, `0.5`, `64Mi`, `1e3`).
pub(crate) fn is_quantity(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(digits_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
            | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    number_ok && suffix_ok
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for q in ["50m", "1", "0.5", "128Mi", "1Gi", "1e3", "+2"] {
            assert!(is_quantity(q), "{q}");
        }
        for q in ["", "Mi", "50 m", "1.2.3", "64MB", "e3", "1e"] {
            assert!(!is_quantity(q), "{q}");
        }
    }

    #[test]
    fn quantities_compare_across_suffixes() {
        assert_eq!(quantity("128Mi"), quantity("134217728"));
        assert_eq!(quantity("0.5"), quantity("500m"));
        assert_eq!(quantity("1e3"), quantity("1k"));
        assert_eq!(quantity("1.5Gi"), quantity("1536Mi"));
        assert_eq!(quantity("1"), Ok(1_000_000_000));
        assert_eq!(quantity("0.0000000001"), Ok(1));
        assert_eq!(quantity("1e-12"), Ok(1));
        assert_eq!(quantity("-0"), Ok(0));
        assert_eq!(quantity("+2"), quantity("2"));
        assert!(quantity("1M").unwrap() < quantity("1Mi").unwrap());
        assert_eq!(quantity("-5"), Err(QuantityError::Negative));
        assert_eq!(quantity("-1m"), Err(QuantityError::Negative));
        assert_eq!(quantity("1e99"), Err(QuantityError::TooLarge));
        assert_eq!(
            quantity("1e99999999999999999999"),
            Err(QuantityError::TooLarge)
        );
    }

    /// `f` of the pod annotations in `yaml`, loaded as `inject` loads
    /// documents: every scalar as written.
    fn with_annotations<T>(yaml: &str, f: impl FnOnce(Annotations<'_, '_>) -> T) -> T {
        let mut loader: saphyr::YamlLoader<'_, saphyr::Yaml<'_>> = Default::default();
        loader.early_parse(false);
        saphyr_parser::Parser::new_from_str(yaml)
            .load(&mut loader, true)
            .unwrap();
        let docs = loader.into_documents();
        let m = crate::node::as_map(&docs[0]).unwrap();
        f(Annotations {
            pod: Some(m),
            workload: None,
        })
    }

    fn resources(yaml: &str) -> Result<[String; 3], Bad> {
        with_annotations(yaml, |a| a.resources())
    }

    #[test]
    fn kubernetes_would_refuse_these_resources() {
        let (name, e) = resources("legate.dev/proxy-cpu-request: \"-5\"").unwrap_err();
        assert_eq!(name, CPU_REQUEST.0);
        assert!(e.contains("negative"), "{e}");
        let (name, e) = resources("legate.dev/proxy-memory-limit: \"-1Mi\"").unwrap_err();
        assert_eq!(name, MEMORY_LIMIT.0);
        assert!(e.contains("negative"), "{e}");
        // Above the default limit: the request is named, with the default.
        for request in ["256Mi", "1Ei", "129Mi", "0.2Gi"] {
            let (name, e) =
                resources(&format!("legate.dev/proxy-memory-request: {request}")).unwrap_err();
            assert_eq!(name, MEMORY_REQUEST.0, "{request}");
            assert!(e.contains("memory limit \"128Mi\" (the default"), "{e}");
            assert!(e.contains("lower legate.dev/proxy-memory-request"), "{e}");
        }
        // A limit set below the default request: the limit is named.
        let (name, e) = resources("legate.dev/proxy-memory-limit: 16Mi").unwrap_err();
        assert_eq!(name, MEMORY_LIMIT.0);
        assert!(e.contains("raise legate.dev/proxy-memory-limit"), "{e}");
        // Equal, and different suffixes for the same amount, are fine.
        let ok = resources(
            "legate.dev/proxy-memory-request: 134217728\nlegate.dev/proxy-memory-limit: 128Mi\nlegate.dev/proxy-cpu-request: \"0\"",
        )
        .unwrap();
        assert_eq!(ok, ["0", "134217728", "128Mi"]);
        assert_eq!(resources("{}").unwrap(), ["50m", "32Mi", "128Mi"]);
    }

    #[test]
    fn values_are_checked_like_the_environment() {
        let mode = &SETTINGS[4];
        assert!(check(mode, "strict").is_ok());
        let e = check(mode, "strikt").unwrap_err();
        assert!(e.contains("strict"), "{e}");
        let cidrs = &SETTINGS[3];
        assert!(check(cidrs, "10.0.0.0/8,fd00::/8").is_ok());
        assert!(check(cidrs, "10.0.0.0/33").is_err());
        assert!(check(&SETTINGS[0], "80,8000-8100").is_ok());
        assert!(check(&SETTINGS[0], "eighty").is_err());
    }

    /// The settings as `(annotation, value)`.
    fn settings(yaml: &str) -> Result<Vec<(&'static str, String)>, Bad> {
        with_annotations(yaml, |a| a.settings())
            .map(|v| v.into_iter().map(|(s, v)| (s.annotation, v)).collect())
    }

    #[test]
    fn settings_that_clash_are_refused_by_annotation() {
        // Each value is fine; together the inbound port captures nothing.
        let (name, e) = settings(
            "legate.dev/skip-inbound-ports: \"8000-8999\"\nlegate.dev/inbound-ports: \"8080\"",
        )
        .unwrap_err();
        assert_eq!(name, "legate.dev/inbound-ports");
        for needle in [
            "8080 would never be captured",
            "legate.dev/skip-inbound-ports leaves 8000-8999 alone",
            "remove 8080 from legate.dev/inbound-ports",
            "set legate.dev/skip-inbound-ports to 8000-8079,8081-8999",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in {e}");
        }
        assert!(!e.contains("init.") && !e.contains("(from"), "{e}");
        // A value alone that can capture nothing, by its annotation too.
        let (name, e) = settings("legate.dev/inbound-ports: \"15000\"").unwrap_err();
        assert_eq!(name, "legate.dev/inbound-ports");
        assert!(
            e.contains("15000 is the port of proxy.admin_listen")
                && e.contains("remove 15000 from legate.dev/inbound-ports"),
            "{e}"
        );
        // Skipping part of the listed ports is what the two are for.
        let ok = settings(
            "legate.dev/skip-inbound-ports: \"8500\"\nlegate.dev/inbound-ports: \"8000-8999\"",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
    }

    #[test]
    fn typos_get_a_suggestion() {
        assert_eq!(edit_distance("legate.dev/mode", "legate.dev/mod"), 1);
    }
}
