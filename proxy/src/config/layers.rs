//! Layering: the embedded defaults, then the operator's file, then `PULLPROXY_<SECTION>__<KEY>`
//! variables, merged key by key (maps merge, lists and scalars replace), the way Helm values
//! layer. Every key remembers which layer set it, so an error names the file's line and column or
//! the variable, and a secret's value is never part of a message.

use std::collections::HashMap;

use serde::{Deserialize, de};
use serde_json::{Map, Value};
use serde_saphyr::{Location, Spanned};

use super::{ConfigError, ENV_PREFIX};

/// Where a key's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    File { line: u64, column: u64 },
    Env(String),
}

/// The merged tree and where each key in it came from.
pub(super) struct Layers {
    pub tree: Value,
    /// The file's name in messages (a path, or "embedded default config").
    origin: String,
    /// Dotted key path (`cache.max_size`) -> the layer that set it last.
    sources: HashMap<String, Source>,
    /// `PULLPROXY_*` variables that are not overrides (no `__`, or no such section): ignored.
    pub ignored_env: Vec<String>,
}

impl Layers {
    /// The defaults with `file` (if any) merged over them. `defaults` must parse: it is embedded.
    pub fn new(defaults: &str, file: Option<(&str, &str)>) -> Result<Self, ConfigError> {
        let mut layers = Self {
            tree: serde_saphyr::from_str(defaults).expect("the embedded default config is YAML"),
            origin: "embedded default config".to_owned(),
            sources: HashMap::new(),
            ignored_env: Vec::new(),
        };
        if let Some((text, origin)) = file {
            origin.clone_into(&mut layers.origin);
            let doc: Spanned<Tree> =
                serde_saphyr::from_str(text).map_err(|e| ConfigError::Yaml {
                    origin: origin.to_owned(),
                    message: e.without_snippet().to_string(),
                })?;
            match doc.value {
                // An empty file (or one holding only comments) changes nothing.
                Tree::Leaf(Value::Null) => {}
                Tree::Map(entries) => {
                    let mut path = Vec::new();
                    merge_map(&mut layers.tree, entries, &mut path, &mut layers.sources);
                }
                _ => {
                    return Err(ConfigError::Located {
                        at: at_location(origin, doc.referenced),
                        key: String::new(),
                        message: "the configuration must be a mapping of sections".into(),
                    });
                }
            }
        }
        Ok(layers)
    }

    /// Applies `PULLPROXY_<SECTION>__<KEY>` overrides from `env`, in name order. `typed` tells
    /// whether a tree deserializes, and if not at which key: it decides whether a key takes text.
    pub fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
        typed: impl Fn(&Value) -> Result<(), (String, String)>,
    ) -> Result<(), ConfigError> {
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();
        for (var, raw) in vars {
            let Some(path) = override_path(&self.tree, &var) else {
                self.ignored_env.push(var);
                continue;
            };
            let env_err = |message: String| ConfigError::Env {
                var: var.clone(),
                message,
            };
            if lookup(&self.tree, &path).is_none() {
                return Err(env_err(format!("unknown key {}", path.join("."))));
            }
            let value = env_value(&self.tree, &path, &raw, &typed).map_err(env_err)?;
            *lookup_mut(&mut self.tree, &path).expect("looked up above") = value;
            let key = path.join(".");
            self.sources.retain(|k, _| !is_within(k, &key));
            self.sources.insert(key, Source::Env(var));
        }
        Ok(())
    }

    /// An error at `key` (a serde path such as `listen.addresses[1]`), told with the layer that
    /// set the key or its nearest enclosing section.
    pub fn error_at(&self, key: &str, message: String) -> ConfigError {
        let mut probe = key;
        let source = loop {
            if let Some(s) = self.sources.get(probe) {
                break Some(s);
            }
            match probe.rfind(['.', '[']) {
                Some(i) => probe = &probe[..i],
                None => break None,
            }
        };
        match source {
            Some(Source::Env(var)) => ConfigError::Env {
                var: var.clone(),
                message: format!("{key}: {message}"),
            },
            Some(Source::File { line, column }) => ConfigError::Located {
                at: format!("{} line {line} column {column}", self.origin),
                key: key.to_owned(),
                message,
            },
            None => ConfigError::Located {
                at: "embedded default config".into(),
                key: key.to_owned(),
                message,
            },
        }
    }
}

fn at_location(origin: &str, loc: Location) -> String {
    format!("{origin} line {} column {}", loc.line(), loc.column())
}

/// Whether dotted path `k` is `key` or lies below it.
fn is_within(k: &str, key: &str) -> bool {
    k.strip_prefix(key)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// The key path of an override variable, or None when `var` is not one: only
/// `PULLPROXY_<SECTION>__<KEY>` naming an existing section is (Kubernetes service links such as
/// `PULLPROXY_METRICS_SERVICE_HOST`, and `PULLPROXY_CONFIG`, are not).
fn override_path(tree: &Value, var: &str) -> Option<Vec<String>> {
    let rest = var.strip_prefix(ENV_PREFIX)?;
    let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    if path.len() < 2 || path.iter().any(String::is_empty) {
        return None;
    }
    tree.get(&path[0])?.is_object().then_some(path)
}

/// The value an override sets. Keys that take text (names, paths, URLs, passwords, durations,
/// sizes) take the variable verbatim: nothing is parsed, nothing cut at `#`, `123456` stays text.
/// Other keys (numbers, booleans, lists, maps) parse it as YAML. An empty variable unsets an
/// optional key. Whether a key takes text is asked of the typed configuration itself.
fn env_value(
    tree: &Value,
    path: &[String],
    raw: &str,
    typed: &impl Fn(&Value) -> Result<(), (String, String)>,
) -> Result<Value, String> {
    if raw.is_empty() {
        return Ok(Value::Null);
    }
    let text = Value::String(raw.to_owned());
    let mut probe = tree.clone();
    *lookup_mut(&mut probe, path).expect("an existing key") = text.clone();
    let takes_text = match typed(&probe) {
        Ok(()) => true,
        Err((at, _)) => at != path.join("."),
    };
    if takes_text {
        return Ok(text);
    }
    serde_saphyr::from_str::<Value>(raw).map_err(|e| format!("not valid YAML: {e}"))
}

fn lookup<'a>(tree: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(tree, |node, seg| node.get(seg))
}

fn lookup_mut<'a>(tree: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(tree, |node, seg| node.get_mut(seg))
}

/// Merges a file's mapping into `node`: keys merge into an existing mapping, anything else
/// replaces what was there. Records where each key was written.
fn merge_map(
    node: &mut Value,
    entries: Vec<(Spanned<String>, Spanned<Tree>)>,
    path: &mut Vec<String>,
    sources: &mut HashMap<String, Source>,
) {
    if !node.is_object() {
        *node = Value::Object(Map::new());
    }
    let obj = node.as_object_mut().expect("made an object above");
    for (key, value) in entries {
        path.push(key.value.clone());
        let at = key.referenced;
        sources.insert(
            path.join("."),
            Source::File {
                line: at.line(),
                column: at.column(),
            },
        );
        let slot = obj.entry(key.value).or_insert(Value::Null);
        match value.value {
            Tree::Map(inner) => merge_map(slot, inner, path, sources),
            other => *slot = other.into_value(),
        }
        path.pop();
    }
}

/// A YAML document as written, with the position of every mapping key.
enum Tree {
    Map(Vec<(Spanned<String>, Spanned<Tree>)>),
    Seq(Vec<Tree>),
    Leaf(Value),
}

impl Tree {
    fn into_value(self) -> Value {
        match self {
            Tree::Map(entries) => Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.value, v.value.into_value()))
                    .collect(),
            ),
            Tree::Seq(items) => Value::Array(items.into_iter().map(Tree::into_value).collect()),
            Tree::Leaf(v) => v,
        }
    }
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TreeVisitor)
    }
}

struct TreeVisitor;

impl<'de> de::Visitor<'de> for TreeVisitor {
    type Value = Tree;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Tree, E> {
        Ok(Tree::Leaf(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Tree, E> {
        Ok(Tree::Leaf(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Tree, E> {
        Ok(Tree::Leaf(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Tree, E> {
        Ok(Tree::Leaf(
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_str<E>(self, v: &str) -> Result<Tree, E> {
        Ok(Tree::Leaf(Value::String(v.to_owned())))
    }

    fn visit_unit<E>(self) -> Result<Tree, E> {
        Ok(Tree::Leaf(Value::Null))
    }

    fn visit_none<E>(self) -> Result<Tree, E> {
        Ok(Tree::Leaf(Value::Null))
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Tree, D::Error> {
        Tree::deserialize(d)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Tree::Seq(items))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Tree::Map(entries))
    }
}
