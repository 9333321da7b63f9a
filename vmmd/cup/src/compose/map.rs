//! A Compose model turned into `[microvm]` units, one per service
//! (`PROJECT-SERVICE`), field by field as docs/compose.md lists. A field
//! steelcup does not carry out is refused with its file and line, never
//! dropped.

use super::load::{key_name, read_env_file, Loaded};
use docker_compose_types as dc;
use serde_yaml::Value;
use std::collections::BTreeMap;
use steelcup_units::ports::PortSpec;
use steelcup_units::{
    Cpus, HealthCheck, MemSize, MicrovmSection, Network, Restart, UnitFile, UnitSection, VolumeSpec,
};

/// The label naming a unit's project, as Docker Compose sets it.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
/// The label naming a unit's service.
pub const SERVICE_LABEL: &str = "com.docker.compose.service";
/// A named volume's size when its `x-steelcup-size` does not say.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

/// Top-level keys steelcup reads (and `x-*` extensions, which it skips).
const TOP_KEYS: [&str; 5] = ["version", "name", "services", "volumes", "networks"];

/// Service keys steelcup carries out.
const SERVICE_KEYS: [&str; 26] = [
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "expose",
    "volumes",
    "networks",
    "network_mode",
    "depends_on",
    "healthcheck",
    "restart",
    "deploy",
    "scale",
    "working_dir",
    "user",
    "hostname",
    "labels",
    "extra_hosts",
    "read_only",
    "ulimits",
    "profiles",
    "mem_limit",
    "cpus",
    "platform",
];

/// Why some common fields cannot be carried out, said with the refusal.
fn why_not(key: &str) -> &'static str {
    match key {
        "build" => "steelcup runs images; build and push it (docker build, docker push) to a registry the machine reaches, and give image:",
        "privileged" | "cap_add" | "cap_drop" | "devices" | "security_opt" | "userns_mode" => {
            "every service is its own microVM with its own kernel; host privileges and devices do not reach into it"
        }
        "pid" | "ipc" => "a microVM shares no namespaces with the host or other services",
        "container_name" => "the service's unit is PROJECT-SERVICE; find it by its service name",
        "logging" => "a service's output goes to vmmd's log (cup compose logs)",
        "secrets" | "configs" => "not supported yet: give the values through environment or env_file",
        "tmpfs" => "/tmp and /run are tmpfs in every microVM already",
        _ => "not supported",
    }
}

/// One service's unit: its name and the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceUnit {
    pub service: String,
    pub unit: String,
    pub file: UnitFile,
}

impl ServiceUnit {
    /// The unit file's text, as `cup apply` sends it.
    pub fn text(&self) -> String {
        format!(
            "# From the compose project's service {:?}; `cup compose up` writes it.\n{}",
            self.service,
            toml::to_string(&self.file).unwrap_or_default()
        )
    }
}

/// The project's units, in service order.
pub fn units(
    project: &str,
    loaded: &Loaded,
    profiles: &[String],
) -> Result<Vec<ServiceUnit>, String> {
    check_keys(loaded)?;
    let model = typed(loaded)?;
    let services = model
        .services
        .0
        .iter()
        .filter_map(|(name, s)| Some((name, s.as_ref()?)));
    let mut out = Vec::new();
    let mut volume_users: BTreeMap<String, String> = BTreeMap::new();
    for (name, s) in services {
        let wanted = s.profiles.is_empty() || s.profiles.iter().any(|p| profiles.contains(p));
        if !wanted {
            continue;
        }
        let su = service(project, name, s, &model, loaded)?;
        for v in &su
            .file
            .microvm
            .as_ref()
            .map(|m| m.volumes.clone())
            .unwrap_or_default()
        {
            if let Some(other) = volume_users.insert(v.name.clone(), name.clone()) {
                return Err(format!(
                    "{}: volume {:?} is used by services {other} and {name}; a volume is one disk of one microVM",
                    loaded.at(&format!("services.{name}.volumes")),
                    v.name
                ));
            }
        }
        out.push(su);
    }
    // Dependencies on services not in the project (or not in the
    // profiles asked for).
    for su in &out {
        for dep in &su.file.unit.after {
            if !out.iter().any(|o| &o.unit == dep) {
                return Err(format!(
                    "{}: service {} depends on a service that is not started ({})",
                    loaded.at(&format!("services.{}.depends_on", su.service)),
                    su.service,
                    dep.strip_prefix(&format!("{project}-")).unwrap_or(dep)
                ));
            }
        }
    }
    Ok(out)
}

/// The merged value as the Compose Specification's model, after the
/// spellings the model's types do not take are made into theirs.
fn typed(loaded: &Loaded) -> Result<dc::Compose, String> {
    let mut v = loaded.value.clone();
    if let Some(services) = v.get_mut("services").and_then(Value::as_mapping_mut) {
        for (_, s) in services.iter_mut() {
            // `cpus: 0.5` and `memory: 512` as numbers: the model wants text.
            if let Some(l) = s
                .get_mut("deploy")
                .and_then(|d| d.get_mut("resources"))
                .and_then(|r| r.get_mut("limits"))
                .and_then(Value::as_mapping_mut)
            {
                for k in ["cpus", "memory"] {
                    if let Some(x) = l.get_mut(k) {
                        if let Value::Number(n) = x {
                            *x = Value::String(n.to_string());
                        }
                    }
                }
            }
            // Numbers and booleans in environment and labels as text.
            for k in ["environment", "labels"] {
                if let Some(Value::Mapping(m)) = s.get_mut(k) {
                    for (_, x) in m.iter_mut() {
                        if let Value::Number(_) | Value::Bool(_) = x {
                            *x = Value::String(key_name(x));
                        }
                    }
                }
            }
            // Read from the value itself: `ports` (short and long forms
            // mixed in one list, which the model's types cannot hold), and
            // the fields the model does not have.
            if let Some(m) = s.as_mapping_mut() {
                for k in ["ports", "cpus", "platform"] {
                    m.remove(k);
                }
            }
        }
    }
    serde_yaml::from_value(v).map_err(|e| {
        let files: Vec<String> = loaded
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        format!("{}: {e}", files.join(", "))
    })
}

/// Refuses every key steelcup would not carry out, with its line.
fn check_keys(loaded: &Loaded) -> Result<(), String> {
    let Some(top) = loaded.value.as_mapping() else {
        return Err("a compose file is a mapping".into());
    };
    let refuse = |path: &str, key: &str| {
        Err(format!(
            "{}: not supported by steelcup: {}",
            loaded.at(path),
            why_not(key)
        ))
    };
    for (k, _) in top {
        let k = key_name(k);
        if !k.starts_with("x-") && !TOP_KEYS.contains(&k.as_str()) {
            return refuse(&k, &k);
        }
    }
    let services = top.get("services").and_then(Value::as_mapping);
    for (name, s) in services.into_iter().flatten() {
        let name = key_name(name);
        let base = format!("services.{name}");
        let Some(s) = s.as_mapping() else {
            continue;
        };
        for (k, v) in s {
            let k = key_name(k);
            let path = format!("{base}.{k}");
            if k.starts_with("x-") {
                continue;
            }
            if !SERVICE_KEYS.contains(&k.as_str()) {
                return refuse(&path, &k);
            }
            let allowed: &[&str] = match k.as_str() {
                "healthcheck" => &[
                    "test",
                    "interval",
                    "timeout",
                    "retries",
                    "start_period",
                    "disable",
                ],
                "deploy" => &["replicas", "resources", "mode"],
                _ => &[],
            };
            if let (false, Some(m)) = (allowed.is_empty(), v.as_mapping()) {
                for (sub, subv) in m {
                    let sub = key_name(sub);
                    if !allowed.contains(&sub.as_str()) {
                        return refuse(&format!("{path}.{sub}"), &sub);
                    }
                    if sub == "resources" {
                        for (r, rv) in subv.as_mapping().into_iter().flatten() {
                            let r = key_name(r);
                            if r != "limits" {
                                return Err(format!(
                                    "{}: not supported by steelcup: a microVM's size is its limit; give limits",
                                    loaded.at(&format!("{path}.resources.{r}"))
                                ));
                            }
                            for (l, _) in rv.as_mapping().into_iter().flatten() {
                                let l = key_name(l);
                                if l != "cpus" && l != "memory" {
                                    return refuse(&format!("{path}.resources.limits.{l}"), &l);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    for (section, ok) in [
        ("volumes", &["name", "driver", "x-steelcup-size"][..]),
        ("networks", &["name", "driver"][..]),
    ] {
        for (n, v) in top
            .get(section)
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
        {
            let n = key_name(n);
            for (k, kv) in v.as_mapping().into_iter().flatten() {
                let k = key_name(k);
                let path = format!("{section}.{n}.{k}");
                if !ok.contains(&k.as_str()) {
                    return Err(format!(
                        "{}: not supported by steelcup ({} are steelcup's own: {})",
                        loaded.at(&path),
                        section,
                        ok.join(", ")
                    ));
                }
                let driver_ok = ["local", "bridge"].contains(&kv.as_str().unwrap_or(""));
                if k == "driver" && !driver_ok {
                    return Err(format!(
                        "{}: driver {:?}: steelcup has its own ({})",
                        loaded.at(&path),
                        kv.as_str().unwrap_or(""),
                        if section == "volumes" {
                            "local"
                        } else {
                            "bridge"
                        }
                    ));
                }
            }
        }
    }
    Ok(())
}

fn service(
    project: &str,
    name: &str,
    s: &dc::Service,
    model: &dc::Compose,
    loaded: &Loaded,
) -> Result<ServiceUnit, String> {
    let at = |field: &str| loaded.at(&format!("services.{name}.{field}"));
    let unit = format!("{project}-{name}");
    if !steelcup_units::valid_name(&unit) {
        return Err(format!(
            "{}: service name {name:?} gives unit {unit:?}, not a valid unit name (lowercase letters, digits, '.', '_', '-'; at most 64 bytes)",
            loaded.at(&format!("services.{name}"))
        ));
    }
    let raw = &loaded.value["services"][name];
    let mut m = MicrovmSection {
        image: Some(s.image.clone().ok_or_else(|| {
            format!(
                "{}: service {name} has no image (steelcup runs images; build: is not supported)",
                loaded.at(&format!("services.{name}"))
            )
        })?),
        ..Default::default()
    };
    if let Some(p) = raw.get("platform").and_then(Value::as_str) {
        if p != "linux/amd64" && p != "linux/x86_64" {
            return Err(format!(
                "{}: {p:?}: steelcup runs linux/amd64 images",
                at("platform")
            ));
        }
    }
    m.cmd = match &s.command {
        None => Vec::new(),
        Some(dc::Command::Args(a)) => a.clone(),
        Some(dc::Command::Simple(c)) => {
            split(c).ok_or_else(|| format!("{}: unbalanced quotes", at("command")))?
        }
    };
    m.entrypoint = match &s.entrypoint {
        None => None,
        Some(dc::Entrypoint::List(a)) => Some(a.clone()),
        Some(dc::Entrypoint::Simple(c)) => {
            Some(split(c).ok_or_else(|| format!("{}: unbalanced quotes", at("entrypoint")))?)
        }
    };
    // env_file first, environment over it; a bare NAME takes the value
    // interpolation sees.
    if let Some(files) = &s.env_file {
        let files = match files {
            dc::StringOrList::Simple(f) => vec![f.clone()],
            dc::StringOrList::List(l) => l.clone(),
        };
        for f in files {
            let vars = read_env_file(&loaded.dir.join(&f), false)
                .map_err(|e| format!("{}: {e}", at("env_file")))?;
            m.env.extend(vars);
        }
    }
    match &s.environment {
        dc::Environment::List(l) => {
            for item in l {
                match item.split_once('=') {
                    Some((k, v)) => m.env.insert(k.into(), v.into()),
                    None => match loaded.vars.get(item) {
                        Some(v) => m.env.insert(item.clone(), v.clone()),
                        None => None,
                    },
                };
            }
        }
        dc::Environment::KvPair(kv) => {
            for (k, v) in kv {
                match v {
                    Some(v) => {
                        m.env.insert(k.clone(), v.to_string());
                    }
                    None => {
                        if let Some(v) = loaded.vars.get(k) {
                            m.env.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
        }
    }
    m.ports = ports(raw.get("ports")).map_err(|e| format!("{}: {e}", at("ports")))?;
    // Networks: one scope per compose network, the service's name an
    // alias in each.
    let nets: Vec<(String, Vec<String>)> = match &s.networks {
        dc::Networks::Simple(n) => n.iter().map(|n| (n.clone(), Vec::new())).collect(),
        dc::Networks::Advanced(a) => a
            .0
            .iter()
            .map(|(n, set)| match set {
                dc::MapOrEmpty::Map(s) => {
                    if s.ipv4_address.is_some() || s.ipv6_address.is_some() {
                        Err(format!("{}: fixed addresses are not supported (names are: use the service name)", at(&format!("networks.{n}"))))
                    } else {
                        Ok((n.clone(), s.aliases.clone()))
                    }
                }
                dc::MapOrEmpty::Empty => Ok((n.clone(), Vec::new())),
            })
            .collect::<Result<_, _>>()?,
    };
    let nets = if nets.is_empty() {
        vec![("default".to_string(), Vec::new())]
    } else {
        nets
    };
    for (n, aliases) in &nets {
        if n != "default" && !model.networks.0.contains_key(n) {
            return Err(format!(
                "{}: network {n:?} is not declared under the top-level networks:",
                at("networks")
            ));
        }
        m.network_scope.push(format!("{project}_{n}"));
        for a in aliases {
            if !m.aliases.contains(a) {
                m.aliases.push(a.clone());
            }
        }
    }
    m.aliases.insert(0, name.to_string());
    match raw.get("network_mode").and_then(Value::as_str) {
        None | Some("bridge") => {}
        Some("none") => {
            m.network = Network::None;
            m.network_scope.clear();
            m.aliases.clear();
        }
        Some(other) => {
            return Err(format!(
                "{}: {other:?}: every service is a microVM with its own network (\"bridge\" or \"none\")",
                at("network_mode")
            ))
        }
    }
    // Volumes: named ones only.
    for (i, v) in s.volumes.iter().enumerate() {
        let here = at(&format!("volumes.[{i}]"));
        let (source, target, read_only) = match v {
            dc::Volumes::Simple(text) => {
                let parts: Vec<&str> = text.split(':').collect();
                match parts.as_slice() {
                    [_] => return Err(format!("{here}: {text:?} is an anonymous volume; name it (NAME:{text}) and declare NAME under volumes:")),
                    [src, dst] => (src.to_string(), dst.to_string(), false),
                    [src, dst, mode] => {
                        let ro = mode.split(',').any(|o| o == "ro");
                        if let Some(bad) = mode.split(',').find(|o| !["ro", "rw"].contains(o)) {
                            return Err(format!("{here}: mode {bad:?}: only ro and rw"));
                        }
                        (src.to_string(), dst.to_string(), ro)
                    }
                    _ => return Err(format!("{here}: {text:?}: SOURCE:TARGET[:ro]")),
                }
            }
            dc::Volumes::Advanced(a) => {
                if a._type != "volume" {
                    return Err(format!(
                        "{here}: type {:?}: only named volumes (type: volume); a microVM cannot see the host's files",
                        a._type
                    ));
                }
                let src = a
                    .source
                    .clone()
                    .ok_or_else(|| format!("{here}: a volume needs its source (a name)"))?;
                (src, a.target.clone(), a.read_only)
            }
        };
        let host_path =
            source.starts_with('/') || source.starts_with('.') || source.starts_with('~');
        if host_path {
            return Err(format!(
                "{here}: {source:?} is a bind mount of a host path; a microVM cannot see the host's files: use a named volume (and cup cp to fill it)"
            ));
        }
        if !model.volumes.0.contains_key(&source) {
            return Err(format!(
                "{here}: volume {source:?} is not declared under the top-level volumes:"
            ));
        }
        let size = volume_size(&source, loaded)?;
        m.volumes.push(VolumeSpec {
            name: source.clone(),
            size,
            mount: target.into(),
            read_only,
        });
    }
    // depends_on: started or healthy.
    let mut after = Vec::new();
    match &s.depends_on {
        dc::DependsOnOptions::Simple(list) => after.extend(list.iter().cloned()),
        dc::DependsOnOptions::Conditional(map) => {
            for (dep, c) in map {
                match c.condition.as_str() {
                    "service_started" => {}
                    "service_healthy" => {
                        let has = model
                            .services
                            .0
                            .get(dep)
                            .and_then(|d| d.as_ref())
                            .and_then(|d| d.healthcheck.as_ref())
                            .is_some_and(|h| !h.disable);
                        if !has {
                            return Err(format!(
                                "{}: condition service_healthy, but {dep} has no healthcheck",
                                at(&format!("depends_on.{dep}"))
                            ));
                        }
                    }
                    other => {
                        return Err(format!(
                            "{}: condition {other:?}: steelcup waits for service_started or service_healthy",
                            at(&format!("depends_on.{dep}.condition"))
                        ))
                    }
                }
                if c.restart.is_some() {
                    return Err(format!(
                        "{}: not supported",
                        at(&format!("depends_on.{dep}.restart"))
                    ));
                }
                after.push(dep.clone());
            }
        }
    }
    let after: Vec<String> = after
        .into_iter()
        .map(|d| format!("{project}-{d}"))
        .collect();
    // healthcheck.
    if let Some(h) = &s.healthcheck {
        m.health = health(h).map_err(|e| format!("{}: {e}", at("healthcheck")))?;
    }
    // restart.
    if let Some(r) = &s.restart {
        (m.restart, m.max_restarts) = match r.as_str() {
            "no" => (Restart::No, None),
            "always" | "unless-stopped" => (Restart::Always, None),
            "on-failure" => (Restart::OnFailure, None),
            other => match other.strip_prefix("on-failure:").map(str::parse::<u32>) {
                Some(Ok(n)) => (Restart::OnFailure, Some(n)),
                _ => {
                    return Err(format!(
                        "{}: {other:?}: no, always, unless-stopped, on-failure[:N]",
                        at("restart")
                    ))
                }
            },
        };
    }
    // Size: deploy, or the older mem_limit/cpus.
    if s.scale > 0 {
        m.replicas = s.scale as u32;
    }
    if let Some(d) = &s.deploy {
        if let Some(mode) = d.mode.as_deref().filter(|m| *m != "replicated") {
            return Err(format!("{}: {mode:?}: only replicated", at("deploy.mode")));
        }
        if let Some(r) = d.replicas {
            m.replicas = u32::try_from(r).map_err(|_| format!("{}: {r}", at("deploy.replicas")))?;
        }
        if let Some(l) = d.resources.as_ref().and_then(|r| r.limits.as_ref()) {
            if let Some(c) = &l.cpus {
                m.cpu_max = Some(
                    c.parse::<Cpus>()
                        .map_err(|e| format!("{}: {e}", at("deploy.resources.limits.cpus")))?,
                );
            }
            if let Some(mem) = &l.memory {
                m.memory = memory(mem)
                    .map_err(|e| format!("{}: {e}", at("deploy.resources.limits.memory")))?;
            }
        }
    }
    if let Some(mem) = raw.get("mem_limit") {
        m.memory = memory(&key_name(mem)).map_err(|e| format!("{}: {e}", at("mem_limit")))?;
    }
    if let Some(c) = raw.get("cpus") {
        m.cpu_max = Some(
            key_name(c)
                .parse::<Cpus>()
                .map_err(|e| format!("{}: {e}", at("cpus")))?,
        );
    }
    m.workdir = s.working_dir.clone();
    m.user = s.user.clone();
    m.hostname = s.hostname.clone();
    m.read_only = s.read_only;
    m.labels = match &s.labels {
        dc::Labels::List(l) => crate::workloads::labels(l),
        dc::Labels::Map(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    m.labels.insert(PROJECT_LABEL.into(), project.into());
    m.labels.insert(SERVICE_LABEL.into(), name.into());
    for (i, h) in s.extra_hosts.iter().enumerate() {
        let (host, ip) = h
            .split_once('=')
            .or_else(|| h.split_once(':'))
            .ok_or_else(|| {
                format!(
                    "{}: {h:?}: HOST=IP or HOST:IP",
                    at(&format!("extra_hosts.[{i}]"))
                )
            })?;
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        let ip = ip.parse().map_err(|_| {
            format!(
                "{}: {ip:?} is not an address",
                at(&format!("extra_hosts.[{i}]"))
            )
        })?;
        m.extra_hosts.insert(host.to_string(), ip);
    }
    for (k, u) in &s.ulimits.0 {
        let n = match u {
            dc::Ulimit::Single(n) => ulimit(n),
            dc::Ulimit::SoftHard { soft, hard } if ulimit(soft) == ulimit(hard) => ulimit(soft),
            dc::Ulimit::SoftHard { .. } => None,
        };
        let n = n.ok_or_else(|| {
            format!(
                "{}: a number (soft and hard the same)",
                at(&format!("ulimits.{k}"))
            )
        })?;
        m.rlimits.insert(k.clone(), n);
    }
    let file = UnitFile {
        unit: UnitSection {
            description: Some(description(project, name)),
            after,
            ..Default::default()
        },
        service: None,
        microvm: Some(m),
    };
    let su = ServiceUnit {
        service: name.to_string(),
        unit,
        file,
    };
    // Read back as init will read it: every check of a unit file.
    let path = std::path::PathBuf::from(format!("{}.toml", su.unit));
    steelcup_units::parse(&path, &su.text()).map_err(|e| {
        let e = steelcup_sys::error_chain(&e);
        let e = e
            .split_once(": ")
            .map_or(e.as_str(), |(_, rest)| rest)
            .to_string();
        format!("{}: {e}", loaded.at(&format!("services.{name}")))
    })?;
    Ok(su)
}

/// The description that marks a project's units (`cup compose ps|down`
/// find them by it).
pub fn description(project: &str, service: &str) -> String {
    format!("compose {project}: {service}")
}

/// The project and service of a unit's description, if it is one.
pub fn owner(description: &str) -> Option<(&str, &str)> {
    description.strip_prefix("compose ")?.split_once(": ")
}

fn split(s: &str) -> Option<Vec<String>> {
    shlex::split(s)
}

fn ulimit(v: &dc::StringOrUnsigned) -> Option<u64> {
    match v {
        dc::StringOrUnsigned::Unsigned(n) => u64::try_from(*n).ok(),
        dc::StringOrUnsigned::String(s) => s.parse().ok(),
    }
}

/// A memory size as Compose writes it: bytes, or `512m`, `1g`, `1.5g`,
/// `64MB`, `2GiB`; whole MiB.
fn memory(s: &str) -> Result<MemSize, String> {
    let m = MemSize::from_docker(s)?;
    if m.0 % (1 << 20) != 0 {
        return Err(format!("{s:?}: guest memory is whole MiB"));
    }
    Ok(m)
}

/// A top-level volume's size: `x-steelcup-size`, else 1 GiB.
fn volume_size(name: &str, loaded: &Loaded) -> Result<MemSize, String> {
    match loaded.value["volumes"][name].get("x-steelcup-size") {
        None => Ok(MemSize(DEFAULT_VOLUME_SIZE)),
        Some(v) => memory(&key_name(v)).map_err(|e| {
            format!(
                "{}: {e}",
                loaded.at(&format!("volumes.{name}.x-steelcup-size"))
            )
        }),
    }
}

/// Published ports, short or long syntax, ranges spread out.
fn ports(p: Option<&Value>) -> Result<Vec<PortSpec>, String> {
    let mut out = Vec::new();
    let mut add =
        |host_ip: Option<&str>, published: &str, target: &str, proto: &str| -> Result<(), String> {
            let range = |s: &str| -> Result<(u16, u16), String> {
                let (a, b) = s.split_once('-').unwrap_or((s, s));
                let n = |x: &str| {
                    x.parse::<u16>()
                        .map_err(|_| format!("{s:?} is not a port or range"))
                };
                Ok((n(a)?, n(b)?))
            };
            if published.is_empty() {
                return Err(format!(
                    "{target}: no host port; steelcup publishes a port you name (HOST:{target})"
                ));
            }
            let (h0, h1) = range(published)?;
            let (t0, t1) = range(target)?;
            if h1 < h0 || t1 < t0 || h1 - h0 != t1 - t0 {
                return Err(format!("{published}:{target}: the ranges differ in length"));
            }
            for k in 0..=(h1 - h0) {
                let ip = host_ip.map(|i| format!("{i}:")).unwrap_or_default();
                out.push(PortSpec::parse(&format!(
                    "{ip}{}:{}/{proto}",
                    h0 + k,
                    t0 + k
                ))?);
            }
            Ok(())
        };
    for item in p.and_then(Value::as_sequence).into_iter().flatten() {
        let text = match item {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        if let Some(s) = &text {
            let (spec, proto) = s.rsplit_once('/').unwrap_or((s, "tcp"));
            if spec.contains('[') {
                return Err(format!("{s:?}: IPv6 host addresses are not supported"));
            }
            let parts: Vec<&str> = spec.split(':').collect();
            match parts.as_slice() {
                [t] => add(None, "", t, proto)?,
                [h, t] => add(None, h, t, proto)?,
                [ip, h, t] => add(Some(ip), h, t, proto)?,
                _ => return Err(format!("{s:?}: [HOST_IP:]HOST:TARGET[/PROTOCOL]")),
            }
        } else {
            let l: dc::Port = serde_yaml::from_value(item.clone()).map_err(|e| e.to_string())?;
            let published = match &l.published {
                None => String::new(),
                Some(dc::PublishedPort::Single(n)) => n.to_string(),
                Some(dc::PublishedPort::Range(r)) => r.clone(),
            };
            let proto = l.protocol.as_deref().unwrap_or("tcp");
            add(
                l.host_ip.as_deref(),
                &published,
                &l.target.to_string(),
                proto,
            )?;
        }
    }
    Ok(out)
}

/// A Compose healthcheck as a probe run inside the VM: `CMD` runs its
/// argv, `CMD-SHELL` (and a plain string) runs through `/bin/sh -c`.
fn health(h: &dc::Healthcheck) -> Result<Option<HealthCheck>, String> {
    if h.disable {
        return Ok(None);
    }
    let command = match &h.test {
        None => {
            return Err("test: required (steelcup does not read the image's HEALTHCHECK)".into())
        }
        Some(dc::HealthcheckTest::Single(s)) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
        Some(dc::HealthcheckTest::Multiple(v)) => match v.split_first() {
            Some((first, rest)) if first == "CMD" && !rest.is_empty() => rest.to_vec(),
            Some((first, [cmd])) if first == "CMD-SHELL" => {
                vec!["/bin/sh".into(), "-c".into(), cmd.clone()]
            }
            Some((first, [])) if first == "NONE" => return Ok(None),
            _ => {
                return Err(format!(
                    "test: {v:?}: [\"CMD\", ...], [\"CMD-SHELL\", \"...\"] or [\"NONE\"]"
                ))
            }
        },
    };
    let secs = |field: &str, v: &Option<String>, dflt: u32| -> Result<u32, String> {
        match v {
            None => Ok(dflt),
            Some(s) => {
                let d = go_duration(s)
                    .ok_or_else(|| format!("{field}: {s:?} is not a duration (like 10s, 1m30s)"))?;
                // Whole seconds, rounded up; at least one.
                Ok((d.as_millis().div_ceil(1000) as u32)
                    .max(u32::from(field == "interval" || field == "timeout")))
            }
        }
    };
    Ok(Some(HealthCheck {
        command,
        tcp: None,
        http: None,
        path: "/".into(),
        interval: secs("interval", &h.interval, 30)?,
        timeout: secs("timeout", &h.timeout, 30)?,
        retries: if h.retries > 0 { h.retries as u32 } else { 3 },
        start_period: secs("start_period", &h.start_period, 0)?,
    }))
}

/// A Go duration (`1m30s`, `500ms`, `1h`, `10s`), as Compose writes them.
fn go_duration(s: &str) -> Option<std::time::Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest == "0" {
        return Some(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += value * unit;
        rest = &rest[u..];
    }
    (total <= 86_400.0 * 365.0).then(|| std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::load;
    use std::path::{Path, PathBuf};

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/compose/testdata")
            .join(name)
    }

    /// The units of test project `name` (a file, or a directory with its
    /// default files), with `env` as the environment.
    fn project_with(
        name: &str,
        env: &[(&str, &str)],
        profiles: &[&str],
    ) -> Result<Vec<ServiceUnit>, String> {
        let p = data(name);
        let files = if p.is_dir() {
            load::find_files(&p, &[]).map_err(|e| e.to_string())?
        } else {
            vec![p]
        };
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let loaded = load::load(&files, &env).map_err(|e| e.to_string())?;
        let profiles: Vec<String> = profiles.iter().map(|p| p.to_string()).collect();
        units("p", &loaded, &profiles)
    }

    fn project(name: &str) -> Result<Vec<ServiceUnit>, String> {
        project_with(name, &[], &[])
    }

    fn vm<'a>(units: &'a [ServiceUnit], service: &str) -> &'a MicrovmSection {
        units
            .iter()
            .find(|u| u.service == service)
            .and_then(|u| u.file.microvm.as_ref())
            .unwrap_or_else(|| panic!("no service {service}"))
    }

    fn unit<'a>(units: &'a [ServiceUnit], service: &str) -> &'a ServiceUnit {
        units
            .iter()
            .find(|u| u.service == service)
            .expect("the service")
    }

    /// A refusal names the file, the line and the field.
    fn refused(name: &str, line: usize, field: &str) -> String {
        let e = project(name).expect_err("refused");
        let at = format!("{}:{line}: {field}", data(name).display());
        assert!(e.contains(&at), "expected {at:?} in: {e}");
        e
    }

    #[test]
    fn a_real_world_project_maps_service_by_service() {
        let u = project("01-shop.yaml").unwrap();
        let names: Vec<&str> = u.iter().map(|u| u.unit.as_str()).collect();
        assert_eq!(names, ["p-web", "p-db", "p-worker"]);
        let web = vm(&u, "web");
        assert_eq!(web.image.as_deref(), Some("nginx:1.25"));
        assert_eq!(web.ports, [PortSpec::parse("8080:80").unwrap()]);
        assert_eq!(web.restart, Restart::Always);
        assert_eq!(web.network_scope, ["p_default"]);
        assert_eq!(web.aliases, ["web"]);
        assert_eq!(web.labels[PROJECT_LABEL], "p");
        assert_eq!(web.labels[SERVICE_LABEL], "web");
        assert_eq!(unit(&u, "web").file.unit.after, ["p-db"]);
        assert_eq!(
            unit(&u, "web").file.unit.description.as_deref(),
            Some("compose p: web")
        );
        assert_eq!(owner("compose p: web"), Some(("p", "web")));

        let db = vm(&u, "db");
        assert_eq!(db.env["POSTGRES_DB"], "shop");
        assert_eq!(db.volumes.len(), 1);
        assert_eq!(db.volumes[0].name, "pgdata");
        assert_eq!(db.volumes[0].mount, Path::new("/var/lib/postgresql/data"));
        assert_eq!(db.volumes[0].size, MemSize(DEFAULT_VOLUME_SIZE));
        let h = db.health.as_ref().expect("a check");
        assert_eq!(h.command, ["/bin/sh", "-c", "pg_isready -U postgres"]);
        assert_eq!(
            (h.interval, h.timeout, h.retries, h.start_period),
            (10, 5, 5, 30)
        );
        assert_eq!(db.restart, Restart::No, "compose's default");

        let w = vm(&u, "worker");
        assert_eq!(
            w.cmd,
            [
                "sh",
                "-c",
                "while true; do nc -z db 5432 && echo ok; sleep 5; done"
            ]
        );
        assert_eq!(w.env["QUEUE"], "orders");
        assert!(
            !w.env.contains_key("DEBUG"),
            "a bare name unset in the environment is left out"
        );
        assert_eq!(w.replicas, 2);
        assert_eq!(w.cpu_max.map(Cpus::millis), Some(500));
        assert_eq!(w.memory, MemSize(256 << 20));
        assert_eq!((w.restart, w.max_restarts), (Restart::OnFailure, Some(3)));
        // Every file reads back as init reads it.
        for s in &u {
            let back = steelcup_units::parse(Path::new("x.toml"), &s.text()).unwrap();
            assert_eq!(back.unit, s.file.unit);
        }
    }

    #[test]
    fn dot_env_and_the_environment_fill_variables_and_env_files_go_under_environment() {
        let u = project_with("02-env", &[("MODE", "staging")], &[]).unwrap();
        let app = vm(&u, "app");
        assert_eq!(app.image.as_deref(), Some("registry.example:5000/app:2.1"));
        assert_eq!(app.ports, [PortSpec::parse("9090:8080").unwrap()]);
        assert_eq!(app.env["MODE"], "staging", "the environment over .env");
        assert_eq!(app.env["FROM_FILE"], "yes");
        assert_eq!(app.env["FROM_FILE_TOO"], "overridden");
        assert_eq!(app.env["PRICE"], "$5");
        assert!(
            !app.env.contains_key("TAG"),
            ".env is for interpolation only"
        );
        // The environment wins over .env.
        let u = project_with("02-env", &[("TAG", "3")], &[]).unwrap();
        assert_eq!(
            vm(&u, "app").image.as_deref(),
            Some("registry.example:5000/app:3")
        );
    }

    #[test]
    fn the_override_file_merges_over_the_main_one() {
        let u = project("03-override").unwrap();
        let api = vm(&u, "api");
        assert_eq!(api.image.as_deref(), Some("example/api:dev"));
        assert_eq!(api.cmd, ["serve", "--debug"], "command is replaced");
        assert_eq!(
            api.ports,
            [
                PortSpec::parse("8000:80").unwrap(),
                PortSpec::parse("9229:9229").unwrap()
            ],
            "ports add up"
        );
        assert_eq!(api.env["LOG"], "debug");
        assert_eq!(api.env["REGION"], "eu");
    }

    #[test]
    fn build_is_refused_with_its_line() {
        let e = refused("04-build.yaml", 4, "services.app.build");
        assert!(e.contains("docker push"), "{e}");
    }

    #[test]
    fn a_bind_mount_is_refused_with_its_line() {
        let e = refused("05-bind.yaml", 8, "services.app.volumes.[1]");
        assert!(e.contains("bind mount"), "{e}");
    }

    #[test]
    fn privileged_and_host_networking_are_refused() {
        refused("06-privileged.yaml", 5, "services.app.privileged");
        let e = refused("07-network-host.yaml", 4, "services.app.network_mode");
        assert!(e.contains("\"host\""), "{e}");
    }

    #[test]
    fn ports_short_long_ranges_and_addresses() {
        let u = project("08-ports.yaml").unwrap();
        let p: Vec<String> = vm(&u, "dns").ports.iter().map(|p| p.to_string()).collect();
        let want: Vec<String> = [
            "127.0.0.1:5353:53/udp",
            "8000:9000",
            "8001:9001",
            "8002:9002",
            "0.0.0.0:8443:443",
            "7000:7000",
        ]
        .iter()
        .map(|s| PortSpec::parse(s).unwrap().to_string())
        .collect();
        assert_eq!(p, want);
        let e = refused("16-anonymous-port.yaml", 4, "services.app.ports");
        assert!(e.contains("no host port"), "{e}");
    }

    #[test]
    fn healthchecks_in_each_form() {
        let u = project("09-healthcheck.yaml").unwrap();
        let h = vm(&u, "exec").health.clone().unwrap();
        assert_eq!(h.command, ["/bin/check", "--quick"]);
        assert_eq!(
            (h.interval, h.timeout, h.retries),
            (90, 1, 3),
            "500ms rounds up to 1 s"
        );
        let h = vm(&u, "shell").health.clone().unwrap();
        assert_eq!(h.command[..2], ["/bin/sh", "-c"]);
        assert_eq!((h.interval, h.timeout), (30, 30), "compose's defaults");
        assert!(vm(&u, "off").health.is_none());
        assert!(vm(&u, "none").health.is_none());
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(go_duration("10"), None);
        assert_eq!(go_duration("5d"), None);
    }

    use std::time::Duration;

    #[test]
    fn anchors_and_process_options() {
        let u = project("10-anchors.yaml").unwrap();
        let app = vm(&u, "app");
        assert_eq!(app.restart, Restart::Always, "from the << merge");
        assert_eq!(app.labels["team"], "shop");
        assert_eq!(app.extra_hosts["legacy.internal"].to_string(), "10.1.2.3");
        assert_eq!(
            app.entrypoint.as_deref(),
            Some(&["/docker-entrypoint.sh".to_string(), "--verbose".to_string()][..])
        );
        assert_eq!(app.workdir.as_deref(), Some("/srv"));
        assert_eq!(app.user.as_deref(), Some("1000:1000"));
        assert_eq!(app.hostname.as_deref(), Some("app.example"));
        assert!(app.read_only);
        assert_eq!(app.rlimits["nofile"], 4096);
        assert_eq!(app.rlimits["nproc"], 256);
        assert_eq!(app.memory, MemSize(1 << 30));
        assert_eq!(app.cpu_max.map(Cpus::millis), Some(1500));
    }

    #[test]
    fn service_healthy_needs_a_healthcheck_and_a_volume_one_service() {
        let e = refused(
            "11-healthy-without-check.yaml",
            5,
            "services.web.depends_on.cache",
        );
        assert!(e.contains("no healthcheck"), "{e}");
        let e = refused("12-shared-volume.yaml", 8, "services.reader.volumes");
        assert!(e.contains("one disk of one microVM"), "{e}");
    }

    #[test]
    fn each_network_is_a_scope_and_names_answer_in_it() {
        let u = project("13-networks.yaml").unwrap();
        assert_eq!(vm(&u, "front").network_scope, ["p_frontend"]);
        assert_eq!(vm(&u, "api").network_scope, ["p_frontend", "p_backend"]);
        assert_eq!(vm(&u, "api").aliases, ["api", "api.internal"]);
        assert_eq!(vm(&u, "db").network_scope, ["p_backend"]);
    }

    #[test]
    fn top_level_secrets_are_refused() {
        let e = refused("14-secrets.yaml", 4, "secrets");
        assert!(e.contains("environment"), "{e}");
    }

    #[test]
    fn profiles_leave_services_out_unless_asked() {
        let u = project("15-profiles.yaml").unwrap();
        assert_eq!(u.len(), 1);
        let u = project_with("15-profiles.yaml", &[], &["debug"]).unwrap();
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn every_shipped_file_maps_or_is_refused_with_a_place() {
        let dir = data("");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            n += 1;
            if let Err(e) = project(&name) {
                let file = data(&name);
                let at = format!("{}:", file.display());
                assert!(e.contains(&at), "{name}: the error names no place: {e}");
            }
        }
        assert!(
            n >= 10,
            "the mapping is tested over at least 10 compose files ({n})"
        );
    }
}
