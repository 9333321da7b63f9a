//! Reading a Compose project: its files (found by the Compose
//! Specification's names, or `-f`), `.env`, `${VAR}` interpolation, the
//! merge of several files, and each key's file and line for errors.
//!
//! YAML is read by serde_yaml (libyaml's rules: anchors, aliases and `<<`
//! merge keys as Docker Compose reads them); the lines come from a second
//! pass with yaml-rust2's marked events, used for nothing but lines.

use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The most bytes one compose file or `.env` file may have.
pub const MAX_FILE: u64 = 1 << 20;

/// The default file names, in the order Compose looks for them.
pub const FILE_NAMES: [&str; 4] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yaml",
    "docker-compose.yml",
];

/// An error in a project's files, with where it is.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

fn err(s: impl Into<String>) -> LoadError {
    LoadError(s.into())
}

/// One key's place: the file and the 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// The project's files read, interpolated and merged.
#[derive(Debug)]
pub struct Loaded {
    /// The directory relative paths (`env_file`) are read from.
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    /// The merged model, interpolated.
    pub value: Value,
    /// The variables interpolation saw (`.env` under the environment).
    pub vars: BTreeMap<String, String>,
    /// Each mapping key's path (`services.web.build`) and where it is
    /// last written.
    places: BTreeMap<String, Place>,
}

impl Loaded {
    /// Where `path` (dotted keys) is written, or the nearest key above it.
    pub fn place(&self, path: &str) -> Option<&Place> {
        let mut p = path;
        loop {
            if let Some(place) = self.places.get(p) {
                return Some(place);
            }
            p = &p[..p.rfind('.')?];
        }
    }

    /// `path` with where it is written: `FILE:LINE: path`.
    pub fn at(&self, path: &str) -> String {
        match self.place(path) {
            Some(p) => format!("{p}: {path}"),
            None => path.to_string(),
        }
    }
}

/// The files to read: `given` (`-f`, in order), else the first default
/// name found in `dir` and its override file.
pub fn find_files(dir: &Path, given: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let Some(main) = FILE_NAMES.iter().map(|n| dir.join(n)).find(|p| p.is_file()) else {
        return Err(err(format!(
            "no compose file in {}: looked for {} (or give one with -f FILE)",
            dir.display(),
            FILE_NAMES.join(", ")
        )));
    };
    let mut files = vec![main.clone()];
    let stem = main
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = main
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let over = dir.join(format!("{stem}.override.{ext}"));
    if over.is_file() {
        files.push(over);
    }
    Ok(files)
}

/// Reads `files`, interpolates each with `.env` (from the first file's
/// directory) under `env`, and merges them in order.
pub fn load(files: &[PathBuf], env: &BTreeMap<String, String>) -> Result<Loaded, LoadError> {
    let first = files.first().ok_or_else(|| err("no compose files"))?;
    let dir = first
        .parent()
        .map(Path::to_path_buf)
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let mut vars = read_env_file(&dir.join(".env"), true)?;
    vars.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut merged = Value::Mapping(Mapping::new());
    let mut places = BTreeMap::new();
    for f in files {
        let text = read_bounded(f)?;
        let mut value: Value =
            serde_yaml::from_str(&text).map_err(|e| err(format!("{}: {e}", f.display())))?;
        value
            .apply_merge()
            .map_err(|e| err(format!("{}: {e}", f.display())))?;
        if !value.is_mapping() {
            return Err(err(format!(
                "{}: a compose file is a mapping (services: ...)",
                f.display()
            )));
        }
        interpolate_value(&mut value, &vars, &mut Vec::new())
            .map_err(|(path, e)| err(format!("{}: {path}: {e}", f.display())))?;
        for (path, line) in key_lines(&text) {
            places.insert(
                path,
                Place {
                    file: f.clone(),
                    line,
                },
            );
        }
        merge(&mut merged, value, "");
    }
    Ok(Loaded {
        dir,
        files: files.to_vec(),
        value: merged,
        vars,
        places,
    })
}

fn read_bounded(f: &Path) -> Result<String, LoadError> {
    let meta = std::fs::metadata(f).map_err(|e| err(format!("{}: {e}", f.display())))?;
    if !meta.is_file() {
        return Err(err(format!("{}: not a regular file", f.display())));
    }
    if meta.len() > MAX_FILE {
        return Err(err(format!(
            "{}: {} bytes; a compose file may have at most {MAX_FILE}",
            f.display(),
            meta.len()
        )));
    }
    std::fs::read_to_string(f).map_err(|e| err(format!("{}: {e}", f.display())))
}

/// A `.env`-style file's variables (`optional`: a missing file is empty).
pub fn read_env_file(f: &Path, optional: bool) -> Result<BTreeMap<String, String>, LoadError> {
    if optional && !f.exists() {
        return Ok(BTreeMap::new());
    }
    let text = read_bounded(f)?;
    let mut vars = BTreeMap::new();
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        let (k, v) = item.map_err(|e| err(format!("{}: {e}", f.display())))?;
        vars.insert(k, v);
    }
    Ok(vars)
}

/// Interpolates every string in `v` (not the keys); the error names the
/// dotted path of the value.
fn interpolate_value(
    v: &mut Value,
    vars: &BTreeMap<String, String>,
    path: &mut Vec<String>,
) -> Result<(), (String, String)> {
    match v {
        Value::String(s) => {
            *s = interpolate(s, vars).map_err(|e| (path.join("."), e))?;
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(format!("[{i}]"));
                let r = interpolate_value(item, vars, path);
                path.pop();
                r?;
            }
        }
        Value::Mapping(m) => {
            for (k, item) in m.iter_mut() {
                path.push(key_name(k));
                let r = interpolate_value(item, vars, path);
                path.pop();
                r?;
            }
        }
        Value::Tagged(t) => interpolate_value(&mut t.value, vars, path)?,
        _ => {}
    }
    Ok(())
}

/// A mapping key as a path element.
pub fn key_name(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// The Compose Specification's interpolation: `$VAR`, `${VAR}`,
/// `${VAR:-default}` (unset or empty), `${VAR-default}` (unset),
/// `${VAR:?error}`, `${VAR?error}`, `${VAR:+replacement}`,
/// `${VAR+replacement}`, and `$$` for a literal `$`. Defaults may hold
/// further `${...}`.
pub fn interpolate(s: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    interpolate_depth(s, vars, 0)
}

fn interpolate_depth(
    s: &str,
    vars: &BTreeMap<String, String>,
    depth: u8,
) -> Result<String, String> {
    if depth > 8 {
        return Err("${...} nested more than 8 deep".into());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            // The matching brace, counting nested ones.
            let mut level = 1;
            let end = r
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '{' => level += 1,
                        '}' => level -= 1,
                        _ => {}
                    }
                    level == 0
                })
                .map(|(j, _)| j)
                .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
            out.push_str(&expand(&r[..end], vars, depth)?);
            rest = &r[end + 1..];
        } else {
            let len = rest
                .char_indices()
                .find(|(j, c)| {
                    !(c.is_ascii_alphanumeric() || *c == '_') || (*j == 0 && c.is_ascii_digit())
                })
                .map_or(rest.len(), |(j, _)| j);
            if len == 0 {
                return Err(format!("a lone $ in {s:?}: write $$ for a literal one"));
            }
            out.push_str(vars.get(&rest[..len]).map_or("", String::as_str));
            rest = &rest[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// One `${...}`'s inside.
fn expand(inner: &str, vars: &BTreeMap<String, String>, depth: u8) -> Result<String, String> {
    let name_len = inner
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
        .map_or(inner.len(), |(j, _)| j);
    let (name, op) = inner.split_at(name_len);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("${{{inner}}}: not a variable name"));
    }
    let value = vars.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let word = |w: &str| interpolate_depth(w, vars, depth + 1);
    let got = |v: Option<&String>| v.cloned().unwrap_or_default();
    Ok(match op {
        "" => got(value),
        _ if op.starts_with(":-") => match set_nonempty {
            true => got(value),
            false => word(&op[2..])?,
        },
        _ if op.starts_with('-') => match value {
            Some(v) => v.clone(),
            None => word(&op[1..])?,
        },
        _ if op.starts_with(":?") => match set_nonempty {
            true => got(value),
            false => {
                return Err(format!(
                    "required variable {name} is missing or empty: {}",
                    word(&op[2..])?
                ))
            }
        },
        _ if op.starts_with('?') => match value {
            Some(v) => v.clone(),
            None => {
                return Err(format!(
                    "required variable {name} is missing: {}",
                    word(&op[1..])?
                ))
            }
        },
        _ if op.starts_with(":+") => match set_nonempty {
            true => word(&op[2..])?,
            false => String::new(),
        },
        _ if op.starts_with('+') => match value {
            Some(_) => word(&op[1..])?,
            None => String::new(),
        },
        _ => {
            return Err(format!(
                "${{{inner}}}: unknown operator {op:?} (:- - :? ? :+ +)"
            ))
        }
    })
}

/// Merges `over` into `base` as Compose merges a later file into an
/// earlier one: mappings key by key; `ports`, `expose`, `dns`,
/// `extra_hosts`, `env_file`, `cap_add`, `cap_drop` and `profiles`
/// appended; `volumes` of a service by mount target; `environment` and
/// `labels` as mappings whichever way each is written; everything else
/// (`command`, `entrypoint`, `healthcheck.test`, scalars) replaced.
pub fn merge(base: &mut Value, over: Value, path: &str) {
    let field = path.rsplit('.').next().unwrap_or(path);
    let in_service = path.starts_with("services.") && path.matches('.').count() == 2;
    match (base, over) {
        (b @ Value::Mapping(_), Value::Mapping(o)) => {
            let Value::Mapping(bm) = b else { return };
            for (k, v) in o {
                let sub = format!(
                    "{path}{}{}",
                    if path.is_empty() { "" } else { "." },
                    key_name(&k)
                );
                match bm.get_mut(&k) {
                    Some(existing) => merge(existing, v, &sub),
                    None => {
                        bm.insert(k, v);
                    }
                }
            }
        }
        (b, o) if in_service && matches!(field, "environment" | "labels") => {
            let mut m = as_mapping(b);
            for (k, v) in as_mapping(&o) {
                m.insert(k, v);
            }
            *b = Value::Mapping(m);
        }
        (Value::Sequence(b), Value::Sequence(o)) if in_service && field == "volumes" => {
            for v in o {
                let t = volume_target(&v);
                match b.iter_mut().find(|x| t.is_some() && volume_target(x) == t) {
                    Some(x) => *x = v,
                    None => b.push(v),
                }
            }
        }
        (Value::Sequence(b), Value::Sequence(o))
            if in_service
                && matches!(
                    field,
                    "ports"
                        | "expose"
                        | "dns"
                        | "extra_hosts"
                        | "env_file"
                        | "cap_add"
                        | "cap_drop"
                        | "profiles"
                ) =>
        {
            for v in o {
                if !b.contains(&v) {
                    b.push(v);
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// `environment` or `labels` as a mapping: a list's `K=V` split, a bare
/// `K` kept as K with no value.
fn as_mapping(v: &Value) -> Mapping {
    match v {
        Value::Mapping(m) => m.clone(),
        Value::Sequence(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|s| match s.split_once('=') {
                Some((k, v)) => (Value::from(k), Value::from(v)),
                None => (Value::from(s), Value::Null),
            })
            .collect(),
        _ => Mapping::new(),
    }
}

/// A service volume's mount target, short or long syntax.
fn volume_target(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => {
            let parts: Vec<&str> = s.split(':').collect();
            Some(if parts.len() >= 2 { parts[1] } else { parts[0] }.to_string())
        }
        Value::Mapping(m) => m.get("target")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Each mapping key of `text` by its dotted path (sequence items as
/// `[i]`), with its 1-based line. Text that does not parse gives none:
/// serde_yaml has already said what is wrong with it.
pub fn key_lines(text: &str) -> Vec<(String, usize)> {
    use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
    use yaml_rust2::scanner::Marker;

    enum Frame {
        Map { key: Option<String> },
        Seq { index: usize },
    }
    #[derive(Default)]
    struct Recv {
        stack: Vec<(Frame, String)>,
        out: Vec<(String, usize)>,
        /// Sequence items begun by the node now read, to be placed.
        items: Vec<String>,
        docs: usize,
    }
    impl Recv {
        /// The path of the node starting now, and steps its parent on.
        fn next_path(&mut self) -> Option<(String, bool)> {
            let (frame, path) = self.stack.last_mut()?;
            let join = |p: &str, k: &str| {
                if p.is_empty() {
                    k.to_string()
                } else {
                    format!("{p}.{k}")
                }
            };
            Some(match frame {
                Frame::Map { key } => match key.take() {
                    // A value: its path is the key's.
                    Some(k) => (join(path, &k), false),
                    // A key.
                    None => (path.clone(), true),
                },
                Frame::Seq { index } => {
                    *index += 1;
                    let item = join(path, &format!("[{}]", *index - 1));
                    self.items.push(item.clone());
                    (item, false)
                }
            })
        }
    }
    impl MarkedEventReceiver for Recv {
        fn on_event(&mut self, ev: Event, mark: Marker) {
            if self.docs > 1 {
                return;
            }
            let line = mark.line();
            let placed = |r: &mut Recv| {
                for item in r.items.drain(..) {
                    r.out.push((item, line));
                }
            };
            match ev {
                Event::DocumentStart => self.docs += 1,
                Event::Scalar(s, ..) => {
                    let next = self.next_path();
                    placed(self);
                    if let Some((path, is_key)) = next {
                        if is_key {
                            let full = if path.is_empty() {
                                s.clone()
                            } else {
                                format!("{path}.{s}")
                            };
                            self.out.push((full, mark.line()));
                            if let Some((Frame::Map { key }, _)) = self.stack.last_mut() {
                                *key = Some(s);
                            }
                        }
                    }
                }
                Event::Alias(_) => {
                    let _ = self.next_path();
                    placed(self);
                }
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    let next = self.next_path();
                    placed(self);
                    let path = match next {
                        Some((p, false)) => p,
                        // A complex key: not a Compose thing; no lines under it.
                        Some((p, true)) => format!("{p}.?"),
                        None => String::new(),
                    };
                    let frame = match ev {
                        Event::MappingStart(..) => Frame::Map { key: None },
                        _ => Frame::Seq { index: 0 },
                    };
                    self.stack.push((frame, path));
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    self.stack.pop();
                }
                _ => {}
            }
        }
    }
    let mut r = Recv::default();
    let _ = Parser::new_from_str(text).load(&mut r, false);
    r.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        [("TAG", "1.25"), ("EMPTY", ""), ("PORT", "8080")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn interpolation_follows_the_compose_specification() {
        let v = vars();
        let i = |s: &str| interpolate(s, &v);
        assert_eq!(i("nginx:${TAG}").unwrap(), "nginx:1.25");
        assert_eq!(i("nginx:$TAG-x").unwrap(), "nginx:1.25-x");
        assert_eq!(i("${NOPE:-dflt}").unwrap(), "dflt");
        assert_eq!(i("${EMPTY:-dflt}").unwrap(), "dflt");
        assert_eq!(i("${EMPTY-dflt}").unwrap(), "");
        assert_eq!(i("${NOPE-dflt}").unwrap(), "dflt");
        assert_eq!(i("${NOPE:-${PORT}}").unwrap(), "8080");
        assert_eq!(i("${TAG:+set}").unwrap(), "set");
        assert_eq!(i("${EMPTY:+set}").unwrap(), "");
        assert_eq!(i("${EMPTY+set}").unwrap(), "set");
        assert_eq!(i("$$HOME and $${TAG}").unwrap(), "$HOME and ${TAG}");
        assert_eq!(i("${NOPE}").unwrap(), "");
        let e = i("${DB_PASSWORD:?set it in .env}").unwrap_err();
        assert!(
            e.contains("required variable DB_PASSWORD") && e.contains("set it in .env"),
            "{e}"
        );
        assert!(i("${EMPTY?x}").is_ok());
        assert!(i("${unclosed").unwrap_err().contains("unclosed"));
        assert!(i("cost: 5$").unwrap_err().contains("$$"));
        assert!(i("${TAG/x/y}").unwrap_err().contains("unknown operator"));
        assert!(i("${1X}").unwrap_err().contains("not a variable name"));
    }

    #[test]
    fn keys_have_their_lines_through_lists_and_anchors() {
        let text = "x-base: &base\n  restart: always\nservices:\n  web:\n    <<: *base\n    image: nginx\n    ports:\n      - \"80:80\"\n      - target: 81\n        published: 8081\n  db:\n    build: .\n";
        let lines: BTreeMap<String, usize> = key_lines(text).into_iter().collect();
        assert_eq!(lines["services.web.image"], 6);
        assert_eq!(lines["services.web.ports.[1].published"], 10);
        assert_eq!(lines["services.db.build"], 12);
        assert_eq!(lines["x-base.restart"], 2);
    }

    #[test]
    fn a_later_file_merges_as_compose_merges() {
        let base: Value = serde_yaml::from_str(
            "services:\n  web:\n    image: a\n    command: [x]\n    ports: ['80:80']\n    environment: [A=1, B=2]\n    volumes: ['data:/d', 'logs:/l']\n",
        )
        .unwrap();
        let over: Value = serde_yaml::from_str(
            "services:\n  web:\n    image: b\n    command: [y]\n    ports: ['81:81']\n    environment: {B: '3', C: '4'}\n    volumes: ['other:/d']\n  db:\n    image: pg\n",
        )
        .unwrap();
        let mut m = base;
        merge(&mut m, over, "");
        let web = &m["services"]["web"];
        assert_eq!(web["image"], "b");
        assert_eq!(web["command"], Value::Sequence(vec!["y".into()]));
        assert_eq!(
            web["ports"],
            Value::Sequence(vec!["80:80".into(), "81:81".into()])
        );
        assert_eq!(web["environment"]["A"], "1");
        assert_eq!(web["environment"]["B"], "3");
        assert_eq!(web["environment"]["C"], "4");
        assert_eq!(
            web["volumes"],
            Value::Sequence(vec!["other:/d".into(), "logs:/l".into()])
        );
        assert_eq!(m["services"]["db"]["image"], "pg");
    }
}
