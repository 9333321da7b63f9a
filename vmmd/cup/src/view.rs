//! How cup shows lists for people and for scripts, as Docker does:
//! `--filter KEY=VALUE`, and `--format` as `table`, `json` (one object per
//! line) or a template of `{{.Field}}` placeholders.
//!
//! Templates take the part of Go's text/template that `docker --format`
//! scripts use: `{{.Field}}`, nested `{{.State.ExitCode}}`, `{{.}}`,
//! `{{json .Field}}`, `{{upper .F}}`/`{{lower .F}}`, `{{join .List ","}}`,
//! and `\t`/`\n`. Anything else is refused with the placeholder's text,
//! never printed as something else; a field that does not exist is an
//! error that names the fields there are.

use crate::error::{usage, CupError};
use serde_json::{Map, Value};
use steelcup_api::vmm1::{ImageInfo, VmInfo, WorkloadState};

/// One `--filter KEY=VALUE` of `cup ps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// The name contains this.
    Name(String),
    /// A label with this name (and this value, if given).
    Label(String, Option<String>),
    /// Docker's status names (`running`, `exited`, `paused`, `restarting`,
    /// `created`, `removing`) or steelcup's own (`ended`, `waiting`...).
    Status(WorkloadState),
    /// Runs this image (`REPO`, `REPO:TAG` or the whole source).
    Ancestor(String),
}

impl Filter {
    pub fn parse(s: &str) -> Result<Filter, String> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected KEY=VALUE (name, label, status, ancestor)"))?;
        Ok(match k {
            "name" => Filter::Name(v.to_string()),
            "label" => match v.split_once('=') {
                Some((k, v)) => Filter::Label(k.to_string(), Some(v.to_string())),
                None => Filter::Label(v.to_string(), None),
            },
            "status" => Filter::Status(docker_status(v).ok_or_else(|| {
                format!("status {v:?}: running, paused, exited, restarting, created or removing")
            })?),
            "ancestor" => Filter::Ancestor(v.to_string()),
            _ => {
                return Err(format!(
                    "{k:?}: the filters are name, label, status and ancestor"
                ))
            }
        })
    }

    fn matches(&self, v: &VmInfo) -> bool {
        match self {
            Filter::Name(n) => v.name.contains(n.as_str()),
            Filter::Label(k, want) => v
                .labels
                .get(k)
                .is_some_and(|have| want.as_ref().is_none_or(|w| w == have)),
            Filter::Status(s) => v.state() == Some(*s),
            Filter::Ancestor(image) => {
                let img = v.image.as_str();
                img == image
                    || img
                        .strip_prefix(image.as_str())
                        .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'))
                    || (!image.contains(':') && repository(img).0 == image.as_str())
            }
        }
    }

    fn key(&self) -> u8 {
        match self {
            Filter::Name(_) => 0,
            Filter::Label(..) => 1,
            Filter::Status(_) => 2,
            Filter::Ancestor(_) => 3,
        }
    }
}

/// A status as Docker names it, or as steelcup does.
fn docker_status(s: &str) -> Option<WorkloadState> {
    Some(match s {
        "exited" | "dead" => WorkloadState::Ended,
        "restarting" => WorkloadState::Waiting,
        "created" => WorkloadState::Preparing,
        "removing" => WorkloadState::Stopping,
        other => return WorkloadState::parse(other),
    })
}

/// Whether `v` passes the filters: as Docker, filters of one key match if
/// any does, and every key must match.
pub fn passes(filters: &[Filter], v: &VmInfo) -> bool {
    (0..4).all(|k| {
        let mut of_key = filters.iter().filter(|f| f.key() == k).peekable();
        of_key.peek().is_none() || of_key.any(|f| f.matches(v))
    })
}

/// Whether the filters ask for a state `cup ps` without `-a` hides.
pub fn wants_ended(filters: &[Filter]) -> bool {
    filters.iter().any(|f| matches!(f, Filter::Status(_)))
}

/// `(repository, tag)` of an image name; the tag is `<none>` for a digest
/// or a source without one.
pub fn repository(name: &str) -> (&str, &str) {
    let name = name.split('@').next().unwrap_or(name);
    // A ':' after the last '/' is the tag's; before it, a registry's port.
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], &name[i + 1..]),
        _ => (name, "<none>"),
    }
}

/// Docker's `Status` text: `Up`, `Up (healthy)`, `Paused`, `Exited (3)`.
fn status_text(v: &VmInfo) -> String {
    let health = match v.health.as_str() {
        "" => String::new(),
        h => format!(" ({h})"),
    };
    match v.state() {
        Some(WorkloadState::Running) => format!("Up{health}"),
        Some(WorkloadState::Paused) => "Up (Paused)".into(),
        Some(WorkloadState::Ended) if v.exit_code >= 0 => format!("Exited ({})", v.exit_code),
        Some(WorkloadState::Ended) => "Exited".into(),
        Some(WorkloadState::Waiting) => "Restarting".into(),
        Some(WorkloadState::Preparing) => "Created".into(),
        Some(WorkloadState::Stopping) => "Stopping".into(),
        _ => v.state.clone(),
    }
}

/// A workload as `cup ps --format` sees it: Docker's field names where
/// Docker has the field, steelcup's beside them.
pub fn ps_row(v: &VmInfo) -> Value {
    let labels: Vec<String> = v
        .labels
        .iter()
        .map(|(k, val)| format!("{k}={val}"))
        .collect();
    serde_json::json!({
        "ID": v.name,
        "Names": v.name,
        "Image": v.image,
        "State": v.state,
        "Status": status_text(v),
        "Health": v.health,
        "ExitCode": v.exit_code,
        "Outcome": v.last_outcome,
        "Labels": labels.join(","),
        "Pid": v.pid,
        "Runs": v.runs,
        "CPUs": v.vcpus,
        "Memory": format!("{}MiB", v.memory_mib),
        "Address": v.address,
        "Unit": v.unit,
    })
}

/// An image as `cup images --format` sees it.
pub fn image_row(i: &ImageInfo, no_trunc: bool) -> Value {
    let (repo, tag) = repository(&i.name);
    let short = i.digest.strip_prefix("sha256:").unwrap_or(&i.digest);
    serde_json::json!({
        "Repository": repo,
        "Tag": tag,
        "ID": if no_trunc { i.digest.clone() } else { short[..12.min(short.len())].to_string() },
        "Digest": i.digest,
        "Size": steelcup_api::human(i.size),
        "Name": i.name,
        "RootImage": if i.rootfs { "built" } else { "-" },
    })
}

/// What `--format` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// cup's own table (`table` or no `--format`).
    Table,
    /// One JSON object per line.
    Json,
    /// A template per row; `table TEMPLATE` adds a header of field names.
    Template { text: String, header: bool },
}

impl Format {
    pub fn parse(f: Option<&str>) -> Format {
        match f.map(str::trim) {
            None | Some("" | "table") => Format::Table,
            Some("json") => Format::Json,
            Some(t) => match t.strip_prefix("table ") {
                Some(rest) => Format::Template {
                    text: rest.to_string(),
                    header: true,
                },
                None => Format::Template {
                    text: t.to_string(),
                    header: false,
                },
            },
        }
    }
}

/// Prints rows in `format`; `table` prints through `table`.
pub fn print_rows(
    rows: &[Value],
    format: &Format,
    table: impl FnOnce(&[Value]),
) -> Result<(), CupError> {
    match format {
        Format::Table => table(rows),
        Format::Json => {
            for r in rows {
                println!("{}", serde_json::to_string(r)?);
            }
        }
        Format::Template { text, header } => {
            let t = Template::parse(text)?;
            if *header {
                println!("{}", t.header());
            }
            for r in rows {
                println!("{}", t.render(r)?);
            }
        }
    }
    Ok(())
}

/// `inspect`'s shape, for workloads, images and volumes alike: each name
/// looked up by `find`; the found ones as one JSON array, or `template`
/// once each; each one not found said on stderr, and exit code 1.
pub fn inspect_each(
    names: &[String],
    template: Option<&str>,
    mut find: impl FnMut(&str) -> Result<Value, CupError>,
) -> Result<u8, CupError> {
    // A bad template is refused before anything is looked up.
    let template = template.map(Template::parse).transpose()?;
    let mut found = Vec::new();
    let mut failed = false;
    for n in names {
        match find(n) {
            Ok(v) => found.push(v),
            Err(e) => {
                eprintln!("cup: {e}");
                failed = true;
            }
        }
    }
    match template {
        Some(t) => {
            for v in &found {
                println!("{}", t.render(v)?);
            }
        }
        None => println!("{}", serde_json::to_string_pretty(&found)?),
    }
    Ok(u8::from(failed))
}

/// A parsed `--format` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field {
        func: Func,
        path: Vec<String>,
        arg: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    Plain,
    Json,
    Upper,
    Lower,
    Join,
}

/// The longest template cup reads.
const MAX_TEMPLATE: usize = 4096;

impl Template {
    pub fn parse(text: &str) -> Result<Template, CupError> {
        if text.len() > MAX_TEMPLATE {
            return Err(usage!(
                "--format: a template of at most {MAX_TEMPLATE} bytes"
            ));
        }
        let text = text.replace("\\t", "\t").replace("\\n", "\n");
        let mut pieces = Vec::new();
        let mut rest = text.as_str();
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| usage!("--format: {{{{ without }}}} in {text:?}"))?;
            pieces.push(Self::action(after[..close].trim())?);
            rest = &after[close + 2..];
        }
        if rest.contains("}}") {
            return Err(usage!("--format: }}}} without {{{{ in {text:?}"));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Template(pieces))
    }

    fn action(a: &str) -> Result<Piece, CupError> {
        let words: Vec<&str> = a.split_whitespace().collect();
        let (func, field, arg) = match words.as_slice() {
            [f] => (Func::Plain, *f, None),
            ["json", f] => (Func::Json, *f, None),
            ["upper", f] => (Func::Upper, *f, None),
            ["lower", f] => (Func::Lower, *f, None),
            ["join", f, sep] => {
                let sep = sep
                    .strip_prefix('"')
                    .and_then(|s| s.strip_suffix('"'))
                    .ok_or_else(|| usage!("--format: join's separator is a quoted string, in {{{{{a}}}}}"))?;
                (Func::Join, *f, Some(sep.to_string()))
            }
            _ => {
                return Err(usage!(
                    "--format: {{{{{a}}}}} is not understood; cup reads {{{{.Field}}}}, {{{{json .Field}}}}, {{{{upper .F}}}}, {{{{lower .F}}}}, {{{{join .F \",\"}}}}"
                ))
            }
        };
        let path = field.strip_prefix('.').ok_or_else(|| {
            usage!("--format: {{{{{a}}}}}: a field starts with '.', like {{{{.Names}}}}")
        })?;
        let path = if path.is_empty() {
            Vec::new()
        } else {
            path.split('.').map(String::from).collect()
        };
        if path.iter().any(String::is_empty) {
            return Err(usage!("--format: {{{{{a}}}}}: an empty field name"));
        }
        Ok(Piece::Field { func, path, arg })
    }

    /// The header of `table TEMPLATE`: each field's last name, upper case.
    pub fn header(&self) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.clone(),
                Piece::Field { path, .. } => {
                    path.last().map_or("VALUE".into(), |n| n.to_uppercase())
                }
            })
            .collect()
    }

    pub fn render(&self, v: &Value) -> Result<String, CupError> {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field { func, path, arg } => {
                    let mut at = v;
                    for (i, name) in path.iter().enumerate() {
                        at = match at {
                            Value::Object(m) => m.get(name).ok_or_else(|| no_field(path, i, m))?,
                            _ => {
                                return Err(usage!(
                                    "--format: .{} is not a record, so it has no field {name:?}",
                                    path[..i].join(".")
                                ))
                            }
                        };
                    }
                    match func {
                        Func::Json => out.push_str(&serde_json::to_string(at)?),
                        Func::Plain => out.push_str(&plain(at)),
                        Func::Upper => out.push_str(&plain(at).to_uppercase()),
                        Func::Lower => out.push_str(&plain(at).to_lowercase()),
                        Func::Join => {
                            let Value::Array(items) = at else {
                                return Err(usage!(
                                    "--format: join needs a list, and .{} is not one",
                                    path.join(".")
                                ));
                            };
                            let parts: Vec<String> = items.iter().map(plain).collect();
                            out.push_str(&parts.join(arg.as_deref().unwrap_or("")));
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

fn no_field(path: &[String], i: usize, m: &Map<String, Value>) -> CupError {
    let names: Vec<&str> = m.keys().map(String::as_str).collect();
    usage!(
        "--format: no field .{} (there: {})",
        path[..=i].join("."),
        names.join(", ")
    )
}

/// A value as a template prints it: strings bare, `null` as Go's
/// `<no value>`, lists and records as JSON.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<no value>".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// `s` cut to `max` characters with `…`, unless `no_trunc`.
pub fn trunc(s: &str, max: usize, no_trunc: bool) -> String {
    if no_trunc || s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, state: &str, image: &str, labels: &[(&str, &str)]) -> VmInfo {
        VmInfo {
            name: name.into(),
            state: state.into(),
            last_outcome: String::new(),
            exit_code: if state == "ended" { 3 } else { -1 },
            health: String::new(),
            unit: String::new(),
            pid: 0,
            runs: 1,
            vcpus: 1,
            memory_mib: 128,
            address: String::new(),
            image: image.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn f(s: &str) -> Filter {
        Filter::parse(s).unwrap()
    }

    #[test]
    fn filters_as_docker_combines_them() {
        let web = vm(
            "web",
            "running",
            "localhost:5000/nginx:1.27",
            &[("tier", "front")],
        );
        let job = vm("job", "ended", "busybox:latest", &[("tier", "batch")]);
        let pick = |fs: &[Filter]| -> Vec<&str> {
            [&web, &job]
                .into_iter()
                .filter(|v| passes(fs, v))
                .map(|v| v.name.as_str())
                .collect()
        };
        assert_eq!(pick(&[f("status=exited")]), ["job"]);
        assert_eq!(
            pick(&[f("status=running"), f("status=exited")]),
            ["web", "job"]
        );
        assert_eq!(pick(&[f("label=tier")]), ["web", "job"]);
        assert_eq!(pick(&[f("label=tier=front")]), ["web"]);
        assert_eq!(pick(&[f("label=tier"), f("name=jo")]), ["job"]);
        assert_eq!(pick(&[f("ancestor=localhost:5000/nginx")]), ["web"]);
        assert_eq!(pick(&[f("ancestor=localhost:5000/nginx:1.27")]), ["web"]);
        assert_eq!(pick(&[f("ancestor=busybox")]), ["job"]);
        assert_eq!(pick(&[f("ancestor=busy")]), Vec::<&str>::new());
        assert!(Filter::parse("status=sleeping").is_err());
        assert!(Filter::parse("name").is_err());
    }

    #[test]
    fn templates_read_fields_and_refuse_the_rest() {
        let row = ps_row(&vm("job", "ended", "busybox", &[]));
        let t = Template::parse("{{.Names}}\\t{{.Status}} {{json .ExitCode}}").unwrap();
        assert_eq!(t.render(&row).unwrap(), "job\tExited (3) 3");
        assert_eq!(t.header(), "NAMES\tSTATUS 3".replace(" 3", " EXITCODE"));
        let nested = serde_json::json!({"State": {"ExitCode": 0, "Running": false}, "Args": ["a", "b"], "Gone": null});
        let r = |s: &str| {
            Template::parse(s)
                .and_then(|t| t.render(&nested))
                .map_err(|e| e.to_string())
        };
        assert_eq!(r("{{.State.ExitCode}}").unwrap(), "0");
        assert_eq!(r("{{ .State.Running }}").unwrap(), "false");
        assert_eq!(r("{{join .Args \",\"}}").unwrap(), "a,b");
        assert_eq!(r("{{.Gone}}").unwrap(), "<no value>");
        assert_eq!(
            r("{{json .State}}").unwrap(),
            r#"{"ExitCode":0,"Running":false}"#
        );
        assert!(r("{{.State.Nope}}")
            .unwrap_err()
            .contains("no field .State.Nope (there: ExitCode, Running)"));
        assert!(r("{{.State.ExitCode.X}}")
            .unwrap_err()
            .contains("not a record"));
        assert!(r("{{if .State}}x{{end}}")
            .unwrap_err()
            .contains("not understood"));
        assert!(r("{{.Names").unwrap_err().contains("without"));
        assert!(r("Names}}").unwrap_err().contains("without"));
        assert!(r("{{Names}}").unwrap_err().contains("starts with '.'"));
    }

    #[test]
    fn formats_and_repositories() {
        assert_eq!(Format::parse(None), Format::Table);
        assert_eq!(Format::parse(Some("json")), Format::Json);
        assert_eq!(
            Format::parse(Some("table {{.Names}}")),
            Format::Template {
                text: "{{.Names}}".into(),
                header: true
            }
        );
        assert_eq!(
            repository("localhost:5000/app:1"),
            ("localhost:5000/app", "1")
        );
        assert_eq!(
            repository("localhost:5000/app"),
            ("localhost:5000/app", "<none>")
        );
        assert_eq!(
            repository("busybox:latest@sha256:ab"),
            ("busybox", "latest")
        );
        assert_eq!(trunc("abcdef", 4, false), "abc…");
        assert_eq!(trunc("abcdef", 4, true), "abcdef");
    }
}
