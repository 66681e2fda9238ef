//! Operations: the deployment files (Dockerfile, docker-compose.yml) checked against recap's own configuration, and
//! on real services: `/readyz` flips when Postgres stops and comes back, `/metrics` counts match the events sent,
//! SIGTERM mid-run then restart gives the uninterrupted table, no secret reaches a log line or a command's output,
//! `recap status --json` reports windows by state.
//!
//! One test here stops Postgres: a cluster of its own (`common::OwnServices`), so no other test sees that outage.

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

const T0: i64 = 1_763_640_000_000; // 2025-11-20T12:00:00Z
const MIN: i64 = 60_000;
const REPO: &str = env!("CARGO_MANIFEST_DIR");

// ================================================================================================ a tiny YAML reader
//
// No YAML crate in the dependencies: this reads the block-style subset compose files are written in (mappings,
// sequences, plain / single- / double-quoted scalars, flow sequences, comments) and panics on anything else, so an
// unsupported construct fails loudly instead of being misread. When PyYAML is importable the result is also compared
// with PyYAML's reading of the same file.

#[derive(Debug, Clone, PartialEq)]
enum Yaml {
    Map(Vec<(String, Yaml)>),
    List(Vec<Yaml>),
    Str(String),
    Null,
}

impl Yaml {
    fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            Yaml::Str(s) => Some(s),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        match self {
            Yaml::Map(m) => m.iter().map(|(k, _)| k.as_str()).collect(),
            _ => Vec::new(),
        }
    }

    /// The items of a sequence of scalars (empty when absent or not a sequence).
    fn strs(&self) -> Vec<&str> {
        match self {
            Yaml::List(l) => l.iter().filter_map(Yaml::str).collect(),
            _ => Vec::new(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            Yaml::Map(m) => {
                serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
            Yaml::List(l) => serde_json::Value::Array(l.iter().map(Yaml::to_json).collect()),
            Yaml::Str(s) => serde_json::Value::String(s.clone()),
            Yaml::Null => serde_json::Value::Null,
        }
    }
}

/// The line without its comment (`#` at the start or after a space, outside quotes).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double, mut escaped) = (false, false, false);
    let mut prev: Option<char> = None;
    for (i, c) in line.char_indices() {
        let token_start = prev.is_none_or(|p| p.is_whitespace() || "[{,:".contains(p));
        if double {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                double = false;
            }
        } else if single {
            if c == '\'' {
                single = false;
            }
        } else if c == '"' && token_start {
            double = true;
        } else if c == '\'' && token_start {
            single = true;
        } else if c == '#' && prev.is_none_or(char::is_whitespace) {
            return &line[..i];
        }
        prev = Some(c);
    }
    line
}

/// A quoted scalar at the start of `s`: (its value, the rest after the closing quote).
fn quoted(s: &str) -> (String, &str) {
    let mut out = String::new();
    let q = s.chars().next().expect("a quote");
    let mut it = s.char_indices().skip(1);
    while let Some((i, c)) = it.next() {
        if q == '\'' && c == '\'' {
            if s[i + 1..].starts_with('\'') {
                out.push('\'');
                it.next();
                continue;
            }
            return (out, &s[i + 1..]);
        }
        if q == '"' && c == '"' {
            return (out, &s[i + 1..]);
        }
        if q == '"' && c == '\\' {
            let (_, e) = it.next().expect("escape");
            out.push(match e {
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                '0' => '\0',
                other => other, // \\ \" \/
            });
            continue;
        }
        out.push(c);
    }
    panic!("unterminated quoted scalar: {s}");
}

fn scalar(s: &str) -> Yaml {
    let s = s.trim();
    assert!(
        !s.starts_with(['&', '*', '!', '|', '>', '{', '%', '@', '`']) || s == "{}",
        "unsupported YAML in the compose file (anchor, tag, block scalar or flow mapping): {s}"
    );
    if s == "{}" {
        return Yaml::Map(Vec::new());
    }
    if s.starts_with(['"', '\'']) {
        let (v, rest) = quoted(s);
        assert!(rest.trim().is_empty(), "text after a quoted scalar: {s}");
        return Yaml::Str(v);
    }
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .unwrap_or_else(|| panic!("flow sequence on one line only: {s}"));
        let mut items = Vec::new();
        let mut rest = inner.trim();
        while !rest.is_empty() {
            let (item, after) = if rest.starts_with(['"', '\'']) {
                let (v, after) = quoted(rest);
                (Yaml::Str(v), after.trim_start())
            } else {
                let end = rest.find(',').unwrap_or(rest.len());
                (scalar(&rest[..end]), &rest[end..])
            };
            items.push(item);
            rest = after.strip_prefix(',').unwrap_or(after).trim_start();
        }
        return Yaml::List(items);
    }
    if s == "~" || s == "null" {
        return Yaml::Null;
    }
    Yaml::Str(s.to_string())
}

/// `key: value` / `key:` → (key, value text); None for anything else.
fn split_key(t: &str) -> Option<(String, &str)> {
    if t.starts_with(['"', '\'']) {
        let (k, rest) = quoted(t);
        let rest = rest.trim_start().strip_prefix(':')?;
        return (rest.is_empty() || rest.starts_with(' ')).then(|| (k, rest.trim()));
    }
    if t.starts_with(['[', '{', '-']) {
        return None;
    }
    if let Some(k) = t.strip_suffix(':')
        && !k.contains(": ")
    {
        return Some((k.trim().to_string(), ""));
    }
    let i = t.find(": ")?;
    Some((t[..i].trim().to_string(), t[i + 2..].trim()))
}

fn is_item(t: &str) -> bool {
    t == "-" || t.starts_with("- ")
}

struct YamlReader {
    lines: Vec<(usize, String)>,
    i: usize,
}

impl YamlReader {
    fn parse(text: &str) -> Yaml {
        let lines = text
            .lines()
            .map(|l| strip_comment(l).trim_end())
            .filter(|l| !l.trim().is_empty() && l.trim() != "---")
            .map(|l| {
                assert!(!l.starts_with('\t'), "tab indentation: {l:?}");
                let t = l.trim_start();
                (l.len() - t.len(), t.to_string())
            })
            .collect::<Vec<_>>();
        let mut r = YamlReader { lines, i: 0 };
        if r.lines.is_empty() {
            return Yaml::Null;
        }
        let top = r.block(r.lines[0].0);
        if let Some((_, l)) = r.lines.get(r.i) {
            panic!("cannot read this compose line: {l:?}");
        }
        top
    }

    fn block(&mut self, indent: usize) -> Yaml {
        if is_item(&self.lines[self.i].1) {
            self.list(indent)
        } else {
            self.map(indent)
        }
    }

    fn list(&mut self, indent: usize) -> Yaml {
        let mut items = Vec::new();
        while let Some((ind, t)) = self.lines.get(self.i).cloned() {
            if ind != indent || !is_item(&t) {
                break;
            }
            let rest = t[1..].trim_start().to_string();
            if rest.is_empty() {
                self.i += 1;
                items.push(self.nested(indent, false));
            } else if split_key(&rest).is_some() {
                // `- key: value`: a mapping whose first key sits where `key` starts
                let at = indent + t.len() - rest.len();
                self.lines[self.i] = (at, rest);
                items.push(self.map(at));
            } else {
                self.i += 1;
                items.push(scalar(&rest));
            }
        }
        Yaml::List(items)
    }

    fn map(&mut self, indent: usize) -> Yaml {
        let mut entries: Vec<(String, Yaml)> = Vec::new();
        while let Some((ind, t)) = self.lines.get(self.i).cloned() {
            if ind != indent || is_item(&t) {
                break;
            }
            let (k, v) =
                split_key(&t).unwrap_or_else(|| panic!("expected `key: value`, got {t:?}"));
            assert!(
                entries.iter().all(|(e, _)| *e != k),
                "duplicate key {k:?} in the compose file"
            );
            self.i += 1;
            let value = if v.is_empty() {
                self.nested(indent, true)
            } else {
                scalar(v)
            };
            entries.push((k, value));
        }
        Yaml::Map(entries)
    }

    /// The value on the lines after `key:` (deeper, or a sequence at the same indent) or after a bare `-`.
    fn nested(&mut self, indent: usize, same_indent_list: bool) -> Yaml {
        match self.lines.get(self.i) {
            Some((ind, _)) if *ind > indent => {
                let ind = *ind;
                self.block(ind)
            }
            Some((ind, t)) if *ind == indent && same_indent_list && is_item(t) => self.list(indent),
            _ => Yaml::Null,
        }
    }
}

#[test]
fn the_yaml_reader_reads_the_subset_it_claims() {
    let y = YamlReader::parse(
        "# top\na:\n  b: 1 # trailing\n  c: \"x: #y\"\n  d:\n  - one\n  - 'it''s'\n  e: [\"p\", q, 'r s']\n  f:\n    - k: v\n      l: w\n    - z\nn:\n",
    );
    let want = serde_json::json!({
        "a": {"b": "1", "c": "x: #y", "d": ["one", "it's"], "e": ["p", "q", "r s"], "f": [{"k": "v", "l": "w"}, "z"]},
        "n": null
    });
    assert_eq!(y.to_json(), want);
}

/// PyYAML's reading of `path`, scalars as strings (so it compares with `Yaml`), when PyYAML is importable.
fn pyyaml(path: &Path) -> Option<serde_json::Value> {
    let script = r#"
import json, sys, yaml
def n(x):
    if isinstance(x, dict): return {str(k): n(v) for k, v in x.items()}
    if isinstance(x, list): return [n(v) for v in x]
    if x is None: return None
    if isinstance(x, bool): return "true" if x else "false"
    return str(x)
print(json.dumps(n(yaml.safe_load(open(sys.argv[1])))))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None; // no python3 or no PyYAML: the line reader alone decides
    }
    Some(serde_json::from_slice(&out.stdout).expect("PyYAML output is JSON"))
}

// ================================================================================================ compose and Docker

/// Compose's variable interpolation with nothing set by the operator: `${X:-d}` / `${X-d}` give `d`, `${X}` gives
/// "", `${X:?msg}` / `${X?msg}` (must be set) give `<X set by the operator>`, `$$` gives `$`.
fn interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(a) = after.strip_prefix('{') {
            let end = a.find('}').expect("closing } in a compose variable");
            let expr = &a[..end];
            let name_end = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_end);
            let op = op.strip_prefix(':').unwrap_or(op);
            let value = if let Some(default) = op.strip_prefix('-') {
                default.to_string()
            } else if op.starts_with('?') {
                // what an operator must set: a stand-in long enough for recap's checks (tokens: 16 characters)
                format!("<{name} set by the operator>")
            } else {
                assert!(
                    op.is_empty(),
                    "unsupported compose interpolation ${{{expr}}}"
                );
                String::new()
            };
            out.push_str(&value);
            rest = &a[end + 1..];
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            rest = &after[end..];
        }
    }
    out.push_str(rest);
    out
}

/// A service's `environment`, as a map or as a list of `KEY=value`, raw (not interpolated).
fn environment(service: &Yaml) -> BTreeMap<String, String> {
    match service.get("environment") {
        Some(Yaml::Map(m)) => m
            .iter()
            .map(|(k, v)| (k.clone(), v.str().unwrap_or("").to_string()))
            .collect(),
        Some(Yaml::List(l)) => l
            .iter()
            .filter_map(Yaml::str)
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.to_string(), String::new()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// `depends_on` as names (list form or map form).
fn depends_on(service: &Yaml) -> Vec<String> {
    match service.get("depends_on") {
        Some(Yaml::List(l)) => l.iter().filter_map(Yaml::str).map(str::to_string).collect(),
        Some(m @ Yaml::Map(_)) => m.keys().into_iter().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// Short-syntax volumes: (source, target).
fn volumes(service: &Yaml) -> Vec<(String, String)> {
    service
        .get("volumes")
        .map(Yaml::strs)
        .unwrap_or_default()
        .into_iter()
        .map(|v| {
            let mut parts = v.split(':');
            let src = parts.next().unwrap_or_default().to_string();
            let dst = parts.next().unwrap_or_default().to_string();
            (src, dst)
        })
        .collect()
}

/// `command` as words (exec form, or a string split on whitespace).
fn command(service: &Yaml) -> Vec<String> {
    match service.get("command") {
        Some(Yaml::List(l)) => l.iter().filter_map(Yaml::str).map(str::to_string).collect(),
        Some(Yaml::Str(s)) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

#[derive(clap::Parser)]
struct ConfigOnly {
    #[command(flatten)]
    cfg: recap::config::Config,
}

/// recap's own configuration, built from exactly `vars` (the test process's environment is not read), normalized
/// and validated as `recap run` does. An unknown variable is an error: recap would ignore it silently.
fn recap_config(vars: &BTreeMap<String, String>) -> Result<recap::config::Config, String> {
    use clap::{CommandFactory, FromArgMatches};
    let mut cmd = ConfigOnly::command();
    let args: Vec<(String, String, String)> = cmd
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_id().to_string(),
                a.get_env()?.to_string_lossy().into_owned(),
                a.get_long()?.to_string(),
            ))
        })
        .collect();
    let mut flag_for = HashMap::new();
    for (id, env, long) in args {
        cmd = cmd.mut_arg(id, |a| a.env(None::<&'static str>));
        flag_for.insert(env, long);
    }
    let mut argv = vec!["recap".to_string()];
    for (k, v) in vars {
        let long = flag_for
            .get(k)
            .ok_or_else(|| format!("recap has no setting {k}"))?;
        argv.push(format!("--{long}={v}"));
    }
    let matches = cmd.try_get_matches_from(argv).map_err(|e| e.to_string())?;
    let mut cfg = ConfigOnly::from_arg_matches(&matches)
        .map_err(|e| e.to_string())?
        .cfg;
    cfg.normalize();
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// `scheme://[userinfo@]host:port[/...]` → (host, port).
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    let (h, p) = hostport.rsplit_once(':').expect("a port in the URL");
    (h.to_string(), p.parse().expect("numeric port"))
}

/// The value of `key` (`key: value` or `key = value`) in nats-server.conf, unquoted.
fn conf_value(conf: &str, key: &str) -> Option<String> {
    conf.lines().map(|l| strip_comment(l).trim()).find_map(|l| {
        let rest = l.strip_prefix(key)?.trim_start();
        let v = rest.strip_prefix(':').or_else(|| rest.strip_prefix('='))?;
        Some(v.trim().trim_matches('"').to_string())
    })
}

#[test]
fn compose_wires_every_setting_recap_requires_to_a_service_in_the_file() {
    let path = Path::new(REPO).join("docker-compose.yml");
    let text = std::fs::read_to_string(&path).expect("docker-compose.yml");
    let doc = YamlReader::parse(&text);
    if let Some(py) = pyyaml(&path) {
        assert_eq!(
            doc.to_json(),
            py,
            "the line reader and PyYAML read docker-compose.yml differently"
        );
    }
    let services = doc.get("services").expect("services:");
    let names: HashSet<&str> = services.keys().into_iter().collect();
    for s in ["nats", "qdrant", "postgres", "recap"] {
        assert!(names.contains(s), "no `{s}` service; have {names:?}");
    }
    let declared_volumes: HashSet<&str> = doc
        .get("volumes")
        .map(Yaml::keys)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let recap = services.get("recap").unwrap();

    // recap is built from this repository's Dockerfile
    let build = recap.get("build").expect("recap has `build`");
    let context = build
        .str()
        .or_else(|| build.get("context").and_then(Yaml::str))
        .expect("build context");
    assert!(
        Path::new(REPO).join(context).join("Dockerfile").is_file(),
        "recap's build context {context:?} has no Dockerfile"
    );

    // secrets come from the operator's environment, never written into the file
    let raw_env = environment(recap);
    for (k, v) in &raw_env {
        if ["PASSWORD", "TOKEN", "API_KEY", "SEED", "DATABASE_URL"]
            .iter()
            .any(|w| k.contains(w))
        {
            assert!(
                v.starts_with("${"),
                "{k} is written into docker-compose.yml; take it from the environment (${{{k}:-...}})"
            );
        }
    }

    // no default recall token: compose refuses to start without one (a default would be a public secret)
    let recall_token = raw_env.get("RECALL_TOKEN").map(String::as_str);
    assert!(
        recall_token.is_some_and(|v| v.starts_with("${RECALL_TOKEN:?")),
        "RECALL_TOKEN must be required (${{RECALL_TOKEN:?...}}), not defaulted: {recall_token:?}"
    );

    // recap's own configuration code accepts exactly this environment
    let env: BTreeMap<String, String> = raw_env
        .iter()
        .map(|(k, v)| (k.clone(), interpolate(v)))
        .collect();
    let cfg = recap_config(&env).unwrap_or_else(|e| {
        panic!("recap rejects the compose environment: {e}\nenvironment: {env:?}")
    });
    let deps = depends_on(recap);

    // NATS: configured, a service of this file, on the port the broker's config listens on
    let nats_url = cfg
        .nats
        .nats_url
        .clone()
        .expect("NATS_URL is set (without it recap has no event stream)");
    let (nats_host, nats_port) = host_port(&nats_url);
    assert!(
        names.contains(nats_host.as_str()),
        "NATS_URL host {nats_host} is no service"
    );
    let nats = services.get(&nats_host).unwrap();
    let conf_path = Path::new(REPO).join("nats/nats-server.conf");
    let conf = std::fs::read_to_string(&conf_path).expect("nats/nats-server.conf");
    let listen = conf_value(&conf, "listen").expect("listen in nats-server.conf");
    let (listen_host, listen_port) = listen.rsplit_once(':').expect("listen host:port");
    let cmdline = command(nats);
    let flag = |names: &[&str]| {
        cmdline
            .iter()
            .position(|w| names.contains(&w.as_str()))
            .and_then(|i| cmdline.get(i + 1))
            .cloned()
    };
    let port = flag(&["-p", "--port"]).unwrap_or_else(|| listen_port.to_string());
    assert_eq!(
        port.parse::<u16>().unwrap(),
        nats_port,
        "NATS_URL port differs from the broker's"
    );
    let host = flag(&["-a", "--addr", "--net"]).unwrap_or_else(|| listen_host.to_string());
    assert!(
        host == "0.0.0.0" || host == "::",
        "nats listens on {host} inside its container: other containers cannot reach it (pass -a 0.0.0.0)"
    );
    // ... with the repository's config, mounted read-only
    let conf_in = flag(&["-c", "--config"]).expect("nats runs with -c <config>");
    let mounted = volumes(nats);
    let conf_mount = nats
        .get("volumes")
        .map(Yaml::strs)
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.split(':').nth(1) == Some(conf_in.as_str()))
        .unwrap_or_else(|| panic!("nothing is mounted at {conf_in}"));
    let conf_src = conf_mount.split(':').next().unwrap();
    assert_eq!(
        Path::new(REPO).join(conf_src).canonicalize().ok(),
        conf_path.canonicalize().ok(),
        "nats mounts {conf_src}, not the repository's nats/nats-server.conf"
    );
    assert!(
        conf_mount.ends_with(":ro"),
        "mount the broker config read-only"
    );
    // ... and its JetStream store on a named volume
    let store_dir = conf_value(&conf, "store_dir").expect("store_dir");
    let store = if store_dir.starts_with('/') {
        PathBuf::from(&store_dir)
    } else {
        let wd = nats.get("working_dir").and_then(Yaml::str).unwrap_or("/");
        Path::new(wd).join(&store_dir)
    };
    let store = PathBuf::from(store.to_string_lossy().replace("/./", "/"));
    assert!(
        mounted
            .iter()
            .any(|(src, dst)| declared_volumes.contains(src.as_str()) && store.starts_with(dst)),
        "the JetStream store {} is not on a named volume: {mounted:?}",
        store.display()
    );

    // Qdrant: recap's gRPC endpoint is the qdrant service on Qdrant's gRPC port
    let (q_host, q_port) = host_port(&cfg.qdrant_grpc_url());
    assert!(
        names.contains(q_host.as_str()),
        "Qdrant host {q_host} is no service"
    );
    assert_eq!(q_port, 6334, "recap speaks gRPC: Qdrant serves it on 6334");
    let qdrant = services.get(&q_host).unwrap();
    assert!(
        volumes(qdrant)
            .iter()
            .any(|(s, d)| declared_volumes.contains(s.as_str()) && d == "/qdrant/storage"),
        "Qdrant's storage is not on a named volume"
    );

    // Postgres: the postgres service, with the database, user and password it is created with
    let pg_display = cfg.postgres_display();
    let (pg_hostport, pg_db) = pg_display.split_once('/').expect("host:port/db");
    let (pg_host, pg_port) = pg_hostport.rsplit_once(':').unwrap();
    assert!(
        names.contains(pg_host),
        "Postgres host {pg_host} is no service"
    );
    assert_eq!(pg_port, "5432");
    let postgres = services.get(pg_host).unwrap();
    let pg_env = environment(postgres);
    assert_eq!(Some(pg_db), pg_env.get("POSTGRES_DB").map(String::as_str));
    if cfg.postgres.database_url.is_none() {
        for k in ["POSTGRES_USER", "POSTGRES_PASSWORD"] {
            assert_eq!(
                raw_env.get(k),
                pg_env.get(k),
                "recap's {k} differs from the postgres service's"
            );
        }
    }
    assert!(
        volumes(postgres)
            .iter()
            .any(|(s, d)| declared_volumes.contains(s.as_str()) && d == "/var/lib/postgresql/data"),
        "Postgres data is not on a named volume"
    );

    // every service recap talks to starts first; every named volume is declared
    for s in [&nats_host, &q_host, &pg_host.to_string()] {
        assert!(deps.contains(s), "recap does not depend_on {s}");
    }
    for svc in services.keys() {
        for (src, _) in volumes(services.get(svc).unwrap()) {
            if !src.starts_with(['.', '/', '~']) {
                assert!(
                    declared_volumes.contains(src.as_str()),
                    "{svc} uses undeclared volume {src}"
                );
            }
        }
    }

    // the operations endpoint listens beyond the container's loopback, on the published port
    assert!(
        cfg.service.http_addr.ip().is_unspecified(),
        "HTTP_ADDR {} is not reachable from outside the container",
        cfg.service.http_addr
    );
    assert_ne!(
        cfg.service.http_addr.port(),
        9090,
        "HTTP_ADDR collides with Prometheus' own port 9090"
    );
    let default_port = recap_config(&BTreeMap::new())
        .unwrap()
        .service
        .http_addr
        .port();
    assert_ne!(
        default_port, 9090,
        "the default HTTP_ADDR is Prometheus' port"
    );
    let published = recap
        .get("ports")
        .map(Yaml::strs)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.rsplit(':').next()?.split('/').next()?.parse::<u16>().ok())
        .collect::<Vec<_>>();
    assert!(
        published.contains(&cfg.service.http_addr.port()),
        "recap's port {} is not published",
        cfg.service.http_addr.port()
    );
    assert!(recap.get("healthcheck").is_some() || dockerfile().contains("HEALTHCHECK"));
}

/// recap's settings as clap declares them: (variable, default values joined by ",", or None without a default).
fn recap_settings() -> Vec<(String, Option<String>)> {
    use clap::CommandFactory;
    ConfigOnly::command()
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_string_lossy().into_owned();
            let defaults = a.get_default_values();
            let default = (!defaults.is_empty()).then(|| {
                defaults
                    .iter()
                    .map(|d| d.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            });
            Some((env, default))
        })
        .collect()
}

/// .env.example: (variables set, with their values; variables listed as `# NAME=`, unset by default).
fn env_example() -> (BTreeMap<String, String>, Vec<String>) {
    let text = std::fs::read_to_string(Path::new(REPO).join(".env.example")).expect(".env.example");
    let (mut set, mut unset) = (BTreeMap::new(), Vec::new());
    let is_name = |k: &str| {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some((k, "")) = rest.split_once('=')
                && is_name(k)
            {
                unset.push(k.to_string());
            }
        } else if let Some((k, v)) = line.split_once('=') {
            assert!(is_name(k), ".env.example: not `NAME=value`: {line:?}");
            assert!(
                set.insert(k.to_string(), v.to_string()).is_none(),
                ".env.example sets {k} twice"
            );
        } else {
            assert!(
                line.trim().is_empty() || line.starts_with('#'),
                ".env.example: {line:?}"
            );
        }
    }
    (set, unset)
}

/// The fit of the compose file for the people who run it: every recap setting can be passed (`env_file: .env` and an
/// `.env.example` that lists each with its default), images are pinned, the port is not Prometheus' 9090, and the
/// `demo` profile seeds the sample conversations with the repo's loader once recap is up and prints the summaries.
#[test]
fn compose_passes_every_setting_pins_its_images_and_has_a_demo_profile() {
    let text = std::fs::read_to_string(Path::new(REPO).join("docker-compose.yml")).unwrap();
    let doc = YamlReader::parse(&text);
    let services = doc.get("services").expect("services:");
    let names: Vec<&str> = services.keys();

    // images pinned to a version: no `latest`, no bare name
    for name in &names {
        let svc = services.get(name).unwrap();
        if let Some(image) = svc.get("image").and_then(Yaml::str) {
            if svc.get("build").is_some() {
                continue; // built here
            }
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                tag != "latest" && tag.chars().any(|c| c.is_ascii_digit()),
                "{name}: image {image} is not pinned to a version"
            );
        }
    }
    let qdrant = services
        .get("qdrant")
        .unwrap()
        .get("image")
        .and_then(Yaml::str)
        .unwrap();
    let qdrant_tag = qdrant.rsplit_once(':').unwrap().1;
    assert!(
        qdrant_tag.trim_start_matches('v').split('.').count() == 3,
        "pin Qdrant to a release (vX.Y.Z), not {qdrant}"
    );

    // every recap setting is listed in .env.example, once, with clap's default (or `# NAME=` without one)
    let (set, unset) = env_example();
    let settings = recap_settings();
    let mut problems = Vec::new();
    for (var, default) in &settings {
        match (set.get(var), unset.contains(var), default) {
            (Some(v), false, Some(d)) if v == d => {}
            (Some(v), false, Some(d)) => {
                problems.push(format!("{var}={v}, but the default is {d}"))
            }
            (None, true, None) => {}
            (None, true, Some(d)) => {
                problems.push(format!("{var} is listed unset; its default is {d}"))
            }
            (Some(v), _, None) => {
                problems.push(format!("{var}={v} is set, but recap has no default for it"))
            }
            (None, false, _) => problems.push(format!("{var} is missing")),
            (Some(_), true, _) => problems.push(format!("{var} is listed twice")),
        }
    }
    for var in set.keys().chain(unset.iter()) {
        let compose_only = ["RUST_LOG", "RECAP_GIT_COMMIT"].contains(&var.as_str());
        if !compose_only && !settings.iter().any(|(v, _)| v == var) {
            problems.push(format!("{var} is no recap setting"));
        }
    }
    assert!(
        problems.is_empty(),
        ".env.example:\n{}",
        problems.join("\n")
    );
    eprintln!(
        "FIGURE .env.example: {} settings ({} with a default, {} unset by default)",
        settings.len(),
        set.len(),
        unset.len()
    );

    // both recap services read .env; with .env.example copied to .env, recap accepts what it gets (the compose
    // `environment:` wins over env_file)
    for svc in ["recap", "recap-migrate"] {
        let env_file = services
            .get(svc)
            .unwrap()
            .get("env_file")
            .expect("env_file");
        let paths: Vec<&str> = match env_file {
            Yaml::Str(p) => vec![p.as_str()],
            Yaml::List(l) => l
                .iter()
                .filter_map(|e| e.str().or_else(|| e.get("path").and_then(Yaml::str)))
                .collect(),
            other => panic!("{svc}: env_file {other:?}"),
        };
        assert!(
            paths.contains(&".env"),
            "{svc} does not read .env: {paths:?}"
        );
        let mut env = set.clone();
        for (k, v) in environment(services.get(svc).unwrap()) {
            env.insert(k, interpolate(&v));
        }
        let cfg = recap_config(&env)
            .unwrap_or_else(|e| panic!("{svc} with .env.example as .env: recap rejects it: {e}"));
        if svc == "recap" {
            assert!(
                cfg.service.http_addr.ip().is_unspecified() && cfg.service.http_addr.port() != 9090
            );
        }
    }

    // the demo profile: a seeding service runs the repo's loader against this file's Qdrant (gRPC) and NATS once
    // recap is healthy; another prints the summaries; nothing outside the profile depends on them
    let in_demo = |name: &str| {
        services
            .get(name)
            .and_then(|s| s.get("profiles"))
            .map(Yaml::strs)
            .unwrap_or_default()
            .contains(&"demo")
    };
    let demo: Vec<&str> = names.iter().copied().filter(|n| in_demo(n)).collect();
    assert!(!demo.is_empty(), "no service in the `demo` profile");
    let seed = demo
        .iter()
        .copied()
        .find(|n| {
            command(services.get(n).unwrap())
                .join(" ")
                .contains("scripts/demo_load.py")
        })
        .expect("a demo service runs scripts/demo_load.py");
    let seed_svc = services.get(seed).unwrap();
    let cmdline = interpolate(&command(seed_svc).join(" "));
    let arg = |flag: &str| {
        let at = cmdline
            .find(flag)
            .unwrap_or_else(|| panic!("the loader gets no {flag}"))
            + flag.len();
        cmdline[at..].split_whitespace().next().unwrap().to_string()
    };
    let (qh, qp) = host_port(&arg("--qdrant"));
    assert!(
        names.contains(&qh.as_str()) && qp == 6334,
        "the loader's Qdrant {qh}:{qp}"
    );
    let (nh, np) = host_port(&arg("--nats"));
    assert!(
        names.contains(&nh.as_str()) && np == 4222,
        "the loader's NATS {nh}:{np}"
    );
    let wd = seed_svc
        .get("working_dir")
        .and_then(Yaml::str)
        .unwrap_or("/");
    for needed in ["scripts/demo_load.py", "demo/conversations.json"] {
        let inside = Path::new(wd).join(needed);
        let mounted = volumes(seed_svc).into_iter().any(|(src, dst)| {
            inside.starts_with(&dst) && {
                let rel = inside.strip_prefix(&dst).unwrap();
                let mut host = Path::new(REPO).join(&src);
                if !rel.as_os_str().is_empty() {
                    host = host.join(rel);
                }
                host.canonicalize().ok() == Path::new(REPO).join(needed).canonicalize().ok()
            }
        });
        assert!(
            mounted,
            "{seed} does not see the repo's {needed} at {}",
            inside.display()
        );
    }
    for (p, _) in [("qdrant-client", ()), ("nats-py", ())] {
        assert!(cmdline.contains(&format!("{p}==")), "{seed}: pin {p}");
    }
    match seed_svc.get("depends_on").and_then(|d| d.get("recap")) {
        Some(dep) => assert_eq!(
            dep.get("condition").and_then(Yaml::str),
            Some("service_healthy"),
            "{seed} must wait until recap is up (its stream exists)"
        ),
        None => panic!("{seed} does not depend on recap"),
    }
    assert!(
        demo.iter().any(|n| command(services.get(n).unwrap())
            .join(" ")
            .contains("FROM conversation_summaries")),
        "no demo service shows the summaries"
    );
    for name in &names {
        for dep in depends_on(services.get(name).unwrap()) {
            assert!(
                names.contains(&dep.as_str()),
                "{name} depends on unknown {dep}"
            );
            if !in_demo(name) {
                assert!(
                    !in_demo(&dep),
                    "{name} (no profile) depends on the demo's {dep}"
                );
            }
        }
    }

    // docs: nats/README.md names the nats-server version compose runs; README lists every subcommand
    let nats_image = services
        .get("nats")
        .unwrap()
        .get("image")
        .and_then(Yaml::str)
        .unwrap();
    let nats_version = nats_image
        .rsplit_once(':')
        .unwrap()
        .1
        .split('-')
        .next()
        .unwrap();
    let nats_readme = std::fs::read_to_string(Path::new(REPO).join("nats/README.md")).unwrap();
    assert!(
        nats_readme.contains(&format!("nats-server {nats_version}")),
        "nats/README.md does not name nats-server {nats_version} (the compose file's {nats_image})"
    );
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    use clap::CommandFactory;
    for sub in recap::cmd::Cli::command().get_subcommands() {
        let name = sub.get_name();
        if name != "help" {
            assert!(
                readme.contains(&format!("`recap {name}")),
                "README.md does not list `recap {name}`"
            );
        }
    }
}

fn dockerfile() -> String {
    std::fs::read_to_string(Path::new(REPO).join("Dockerfile")).expect("Dockerfile")
}

/// The Dockerfile's instructions: (INSTRUCTION, arguments), continuation lines joined, heredoc bodies skipped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let mut full = t.to_string();
        while full.ends_with('\\') {
            full.pop();
            match lines.next() {
                Some(n) if n.trim().starts_with('#') => {}
                Some(n) => {
                    full.push(' ');
                    full.push_str(n.trim());
                }
                None => break,
            }
        }
        if let Some(pos) = full.find("<<") {
            let tag = full[pos + 2..]
                .trim_start_matches('-')
                .trim_matches(|c| c == '\'' || c == '"')
                .split(['\'', '"', ' '])
                .next()
                .unwrap_or("")
                .to_string();
            for l in lines.by_ref() {
                if l.trim() == tag {
                    break;
                }
            }
        }
        let (ins, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        out.push((ins.to_ascii_uppercase(), args.trim().to_string()));
    }
    out
}

/// The body of the heredoc written to `target` in the Dockerfile.
fn heredoc(text: &str, target: &str) -> String {
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.contains("<<") && l.trim_end().ends_with(target) {
            let tag = l[l.find("<<").unwrap() + 2..]
                .trim_start_matches('-')
                .split_whitespace()
                .next()
                .unwrap()
                .trim_matches(|c| c == '\'' || c == '"')
                .to_string();
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != tag).collect();
            return body.join("\n") + "\n";
        }
    }
    panic!("no heredoc for {target} in the Dockerfile");
}

const HEALTHCHECK_SCRIPT: &str = "/usr/local/bin/recap-healthcheck";

#[test]
fn dockerfile_builds_release_and_runs_unprivileged_with_a_healthcheck() {
    let text = dockerfile();
    let ins = instructions(&text);
    let stages: Vec<usize> = ins
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| i == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert!(stages.len() >= 2, "multi-stage: a builder and a runtime");
    let (first, last) = (&ins[stages[0]].1, &ins[*stages.last().unwrap()].1);
    assert!(
        first.starts_with("rust:") && first.contains("slim-bookworm"),
        "builder: {first}"
    );
    assert!(last.starts_with("debian:bookworm-slim"), "runtime: {last}");
    let build = &ins[stages[0]..*stages.last().unwrap()];
    let runtime = &ins[*stages.last().unwrap()..];
    assert!(
        build
            .iter()
            .any(|(i, a)| i == "RUN" && a.contains("cargo build --release --locked")),
        "the builder runs `cargo build --release --locked`"
    );
    // what the crate reads at compile time is copied into the builder
    let copied: Vec<&str> = build
        .iter()
        .filter(|(i, _)| i == "COPY")
        .flat_map(|(_, a)| {
            let words: Vec<&str> = a
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            words[..words.len().saturating_sub(1)].to_vec()
        })
        .collect();
    // ... and the directories of the targets Cargo.toml declares: cargo refuses a manifest whose targets are missing
    let manifest = std::fs::read_to_string(Path::new(REPO).join("Cargo.toml")).unwrap();
    let mut needed = vec!["Cargo.toml", "Cargo.lock", "src", "migrations", "nats"];
    for (section, dir) in [
        ("[[bench]]", "benches"),
        ("[[example]]", "examples"),
        ("[[test]]", "tests"),
    ] {
        if manifest.lines().any(|l| l.trim() == section) {
            needed.push(dir);
        }
    }
    assert!(
        !manifest
            .lines()
            .any(|l| l.trim_start().starts_with("build =")),
        "Cargo.toml has a build script: COPY it in the Dockerfile and extend this test"
    );
    for needed in &needed {
        assert!(
            copied
                .iter()
                .any(|c| c.trim_end_matches('/') == *needed || *c == "."),
            "the builder does not COPY {needed}"
        );
    }
    let dockerignore =
        std::fs::read_to_string(Path::new(REPO).join(".dockerignore")).expect(".dockerignore");
    let ignored: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        ignored.iter().any(|l| l.trim_matches('/') == "target"),
        ".dockerignore keeps target/ out of the build context"
    );
    for needed in &needed {
        assert!(
            !ignored.iter().any(|l| l.trim_matches('/') == *needed),
            ".dockerignore excludes {needed}, which the build needs"
        );
    }
    // runtime: CA certificates, unprivileged, healthcheck on /healthz, `recap run` on 0.0.0.0:9464
    let runs: String = runtime
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(runs.contains("ca-certificates"));
    assert!(runs.contains("useradd") && runs.contains("recap"));
    let user = runtime
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.clone())
        .expect("USER");
    let name = user.split(':').next().unwrap();
    assert!(
        name != "root" && name != "0",
        "the runtime runs as root ({user})"
    );
    if name.bytes().all(|b| b.is_ascii_digit()) {
        assert!(
            runs.contains(&format!("--uid {name}")),
            "USER {name} is not the uid of the user created"
        );
    }
    let hc = runtime
        .iter()
        .find(|(i, _)| i == "HEALTHCHECK")
        .map(|(_, a)| a.clone())
        .expect("HEALTHCHECK");
    let probe = if hc.contains(HEALTHCHECK_SCRIPT) {
        heredoc(&text, HEALTHCHECK_SCRIPT)
    } else {
        hc.clone()
    };
    assert!(probe.contains("/healthz"), "the healthcheck asks /healthz");
    assert!(
        !runs.contains("curl") || probe.contains("curl"),
        "curl installed but not used"
    );
    let get = |k: &str| {
        runtime
            .iter()
            .find(|(i, _)| i == k)
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    };
    assert_eq!(get("ENTRYPOINT"), r#"["recap"]"#);
    assert_eq!(get("CMD"), r#"["run"]"#);
    // 9464, not 9090: Prometheus itself listens on 9090, often on the same host
    assert!(get("ENV").contains("HTTP_ADDR=0.0.0.0:9464"));
    assert!(get("EXPOSE").split_whitespace().any(|p| p == "9464"));
    let script = heredoc(&text, HEALTHCHECK_SCRIPT);
    assert!(
        script.contains("127.0.0.1:9464") && !script.contains("9090"),
        "the healthcheck's default port is not recap's"
    );
}

// ================================================================================================ helpers (services)

fn log_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ops-{name}-{}.log", token()))
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET over a plain TCP stream (HTTP/1.0): (status, body).
async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of headers")?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no status code")?;
        Ok((code, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), get)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

/// Polls `path` until `want(status, body)`; returns the time it took and the last body.
async fn wait_http(
    port: u16,
    path: &str,
    timeout: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> (Duration, String) {
    let t0 = Instant::now();
    loop {
        let last = match http_get(port, path).await {
            Ok((code, body)) if want(code, &body) => return (t0.elapsed(), body),
            Ok((code, body)) => format!("{code} {body}"),
            Err(e) => e,
        };
        assert!(
            t0.elapsed() < timeout,
            "{path} did not reach the wanted state within {timeout:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `scripts/services <cmd> postgres` for the test's own services (stopped for good when they are dropped).
fn own_services(own: &common::OwnServices, cmd: &str) {
    let out = own.services(cmd, "postgres");
    assert!(
        out.status.success(),
        "scripts/services {cmd} postgres: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// Waits for the child to exit: its exit code and how long it took.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<(i32, Duration)> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Ok(Some(st)) = child.try_wait() {
            return Some((st.code().unwrap_or(-1), t0.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A recap child process that is stopped (SIGTERM, then SIGKILL) however the test ends, so that a failed test does
/// not leave a recap running into the next one.
struct Recap(Child);

impl Drop for Recap {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            stop(&mut self.0);
        }
    }
}

fn spawn(args: &[&str], envs: &[(String, String)], log: &Path) -> Recap {
    Recap(spawn_recap(args, envs, log))
}

fn stop(child: &mut Child) {
    sigterm(child);
    if wait_exit(child, Duration::from_secs(30)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// recap's environment for a test, with the operations endpoint on a port of its own.
fn ops_env(db: &TestDb, nats: &NatsNs, port: u16) -> Vec<(String, String)> {
    let mut envs = recap_env(db, Some(nats));
    set(&mut envs, "HTTP_ADDR", &format!("127.0.0.1:{port}"));
    envs
}

fn set(envs: &mut Vec<(String, String)>, k: &str, v: &str) {
    envs.retain(|(key, _)| key != k);
    envs.push((k.to_string(), v.to_string()));
}

struct Scenario {
    db: TestDb,
    nats: NatsNs,
    bot: String,
    collection: String,
    points: Vec<TestPoint>,
}

/// `users` users of one bot: per user a 12-message session, an 8-message one 3 h later and a 4-message one (too
/// short), with conversation_pair points, in event-time order.
///
/// The order matters: a bot's watermark is the newest event time it has seen, and a window closes once the watermark
/// passes it (the tracker's guarantee holds for arrivals within ALLOWED_LATENESS_SECONDS). Published user by user,
/// the events of later users would arrive hours behind the watermark, a session split by an ingest batch boundary
/// would close with part of its messages, and an interruption between the two batches would turn that into a
/// revision 2 row. Live bots publish as they write, i.e. in time order.
async fn scenario(users: usize) -> Scenario {
    let db = fresh_db().await;
    db.migrate().await;
    let nats = nats_ns();
    let bot = format!("bot{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let mut points = Vec::new();
    for u in 0..users {
        let user = format!("{}{u}", 200_000_000_000_000_000u64 + u as u64);
        let base = T0 + u as i64 * 7 * MIN;
        points.extend(conversation(&user, base, 6, 2 * MIN, true));
        points.extend(conversation(&user, base + 3 * 60 * MIN, 4, 5 * MIN, true));
        points.extend(conversation(&user, base + 8 * 60 * MIN, 2, MIN, false));
    }
    points.sort_by_key(|p| p.ts_ms);
    upsert(&q, &collection, &points).await;
    Scenario {
        db,
        nats,
        bot,
        collection,
        points,
    }
}

/// The sum of every series of `name` in Prometheus text (None when there is none).
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        // a bare name sums its series; a name with labels (`x{a="b"}`) is that one series
        if series == name || series.split('{').next() == Some(name) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    sum
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap()
}

// ================================================================================================ readiness

#[tokio::test(flavor = "multi_thread")]
async fn readyz_flips_when_postgres_stops_and_comes_back() {
    let _shared = common::shared().await;
    let own = common::OwnServices::up("readyz").await; // its Postgres is stopped below: no other test's
    let db = own.fresh_db().await;
    let nats = own.nats_ns();
    let port = free_port();
    let envs = ops_env(&db, &nats, port);
    let log = log_path("readyz");
    let mut child = spawn(&["run"], &envs, &log);

    let (t_up, body) = wait_http(port, "/readyz", Duration::from_secs(60), |c, _| c == 200).await;
    let ready: serde_json::Value = serde_json::from_str(&body).expect("readyz answers JSON");
    assert_eq!(ready["postgres"], "ok", "{ready}");
    assert_eq!(ready["qdrant"], "ok", "{ready}");
    assert_eq!(ready["nats"], "ok", "{ready}");
    eprintln!("ready {t_up:?} after start");

    // the image's healthcheck script, run against this recap
    let script = log_path("healthcheck").with_extension("sh");
    std::fs::write(&script, heredoc(&dockerfile(), HEALTHCHECK_SCRIPT)).unwrap();
    let probe = |addr: &str| {
        Command::new("bash")
            .arg(&script)
            .env("HTTP_ADDR", addr)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        probe(&format!("127.0.0.1:{port}")),
        "healthcheck fails on a live recap"
    );
    assert!(
        probe(&format!("0.0.0.0:{port}")),
        "healthcheck fails with HTTP_ADDR=0.0.0.0:port"
    );
    assert!(
        !probe(&format!("127.0.0.1:{}", free_port())),
        "healthcheck passes with nothing listening"
    );

    let t_stop = Instant::now();
    own_services(&own, "stop");
    let stop_took = t_stop.elapsed();
    let (t_down, body) = wait_http(port, "/readyz", Duration::from_secs(10), |c, _| c == 503).await;
    let down: serde_json::Value = serde_json::from_str(&body).expect("JSON when not ready");
    assert_eq!(down["ready"], false, "{down}");
    assert_ne!(down["postgres"], "ok", "{down}");
    assert_eq!(down["qdrant"], "ok", "only Postgres is down: {down}");
    eprintln!(
        "not ready {t_down:?} after `services stop postgres` returned (the stop took {stop_took:?}): {down}"
    );
    // alive all the same, and `recap check` names the broken service
    assert_eq!(http_get(port, "/healthz").await.unwrap().0, 200);
    let (code, out, err) = run_recap(&["check"], &envs);
    assert_ne!(code, 0, "check passes with Postgres down:\n{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("Postgres")),
        "check does not name Postgres:\n{out}{err}"
    );

    own_services(&own, "start");
    let (t_back, body) = wait_http(port, "/readyz", Duration::from_secs(30), |c, _| c == 200).await;
    eprintln!("ready again {t_back:?} after `services start postgres` returned: {body}");
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "recap exited while Postgres was away; log {}",
        log.display()
    );
    sigterm(&child.0);
    let (code, _) =
        wait_exit(&mut child.0, Duration::from_secs(30)).expect("recap exits on SIGTERM");
    assert_eq!(code, 0, "exit code after SIGTERM; log {}", log.display());
}

// ================================================================================================ metrics and status

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_status_match_the_events_sent() {
    let _shared = common::shared().await;
    let users = 5;
    let s = scenario(users).await;
    let js = s.nats.ensure().await;
    let stored = s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    assert_eq!(stored, s.points.len());
    let subject = format!("{}.{}", s.nats.prefix, s.bot);
    let malformed: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        vec![0xff, 0xfe],
        br#"{"v":2,"bot":"x","point_id":"p","user_id":"u","ts":"2025-11-20T12:00:00Z"}"#.to_vec(),
        format!(
            r#"{{"v":1,"bot":"{}","point_id":"p","user_id":"u","ts":"2025-11-20 12:00:00"}}"#,
            s.bot
        )
        .into_bytes(),
        r#"{"v":1,"bot":"another_bot","point_id":"p","user_id":"u","ts":"2025-11-20T12:00:00Z"}"#
            .as_bytes()
            .to_vec(),
        vec![b'x'; 5000],
        br#"{"v":1"#.to_vec(),
    ];
    let m = malformed.len();
    let items = malformed
        .into_iter()
        .enumerate()
        .map(|(i, body)| (subject.clone(), Some(format!("bad-{i}")), body))
        .collect();
    assert_eq!(s.nats.publish_raw(&js, items).await, m);
    let pairs = s
        .points
        .iter()
        .filter(|p| p.role == "conversation_pair")
        .count();
    let expected = expected_rows(&s.bot, &s.points, 5);
    assert_eq!(expected.len(), 2 * users);

    let port = free_port();
    let envs = ops_env(&s.db, &s.nats, port);
    let log = log_path("metrics");
    let _recap = spawn(&["run"], &envs, &log);
    let rows = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(90)).await;
    assert_eq!(rows, expected);

    // counters are bumped right after the commits the rows come from: allow them a moment
    let want_consumed = (s.points.len() + m) as f64;
    let t0 = Instant::now();
    let text = loop {
        let (code, text) = http_get(port, "/metrics").await.expect("/metrics");
        assert_eq!(code, 200);
        let done = metric(&text, "recap_windows_summarized_total") == Some(rows.len() as f64)
            && metric(&text, "recap_events_consumed_total") == Some(want_consumed)
            && metric(&text, "recap_consumer_lag") == Some(0.0);
        if done || t0.elapsed() > Duration::from_secs(10) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // (name, wanted sum over its series; None: only that the series exists)
    let wanted: Vec<(&str, Option<f64>)> = vec![
        // every message taken from the consumer, conversation_pair and malformed ones included
        ("recap_events_consumed_total", Some(want_consumed)),
        ("recap_events_malformed_total", Some(m as f64)),
        ("recap_windows_summarized_total", Some(rows.len() as f64)),
        ("recap_windows_too_short_total", Some(users as f64)),
        (
            "recap_windows_closed_total",
            Some((rows.len() + users) as f64),
        ),
        ("recap_windows_by_state{state=\"open\"}", Some(0.0)),
        // caught up: the lag gauge comes down to 0 (it is sampled every few seconds)
        ("recap_consumer_lag", Some(0.0)),
        // close-to-row latency: one observation per summary written
        (
            "recap_window_close_to_row_seconds_count",
            Some(rows.len() as f64),
        ),
    ];
    let mut wrong = Vec::new();
    // `_total` is a counter in Prometheus; the build is labelled
    for want in [
        "# TYPE recap_llm_cost_usd_total counter\nrecap_llm_cost_usd_total 0\n",
        &format!(
            "recap_build_info{{version=\"{}\",git=\"",
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        if !text.contains(want) {
            wrong.push(format!("no {want:?} in /metrics"));
        }
    }
    for (name, want) in wanted {
        let got = metric(&text, name);
        if got.is_none() || (want.is_some() && got != want) {
            wrong.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    for name in ["recap_events_duplicate_total", "recap_windows_dead_total"] {
        if metric(&text, name).unwrap_or(0.0) != 0.0 {
            wrong.push(format!("{name}: got {:?}, want 0", metric(&text, name)));
        }
    }
    eprintln!(
        "sent {} message events ({pairs} conversation_pair) + {m} malformed; {} rows",
        s.points.len(),
        rows.len()
    );

    // `recap status --json` on this database
    let (code, out, err) = run_recap(&["status", "--json"], &envs);
    assert_eq!(code, 0, "status --json failed: {err}");
    let st: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"));
    let by_state: HashMap<String, i64> = match &st["windows"] {
        serde_json::Value::Object(o) => o
            .iter()
            .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
            .collect(),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_i64().unwrap()))
            .collect(),
        other => panic!("status --json has no windows by state: {other}"),
    };
    assert_eq!(by_state.get("done"), Some(&(rows.len() as i64)), "{st}");
    assert_eq!(by_state.get("too_short"), Some(&(users as i64)), "{st}");
    assert_eq!(by_state.get("due").copied().unwrap_or(0), 0, "{st}");
    assert_eq!(st["dead_letters"], m as i64, "{st}");
    assert_eq!(st["open_messages"], 0, "{st}");
    assert!(st["oldest_due"].is_null(), "{st}");
    assert!(st.get("consumer_lag").is_some(), "{st}");
    assert!(st.get("llm_spend_today_usd").is_some(), "{st}");
    // the human table says the same
    let (code, out, _) = run_recap(&["status"], &envs);
    assert_eq!(code, 0);
    assert!(out.contains("done") && out.contains("too_short"), "{out}");
    assert!(
        wrong.is_empty(),
        "metrics do not match the events sent (log {}):\n{}\n--- /metrics:\n{text}",
        log.display(),
        wrong.join("\n")
    );
}

// ================================================================================================ graceful shutdown

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_run_exits_0_within_the_grace_and_a_restart_loses_nothing() {
    let _shared = common::shared().await;
    let s = scenario(40).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    assert_eq!(expected.len(), 80);
    // Workers claim only what they can start (LLM_CONCURRENCY = 8 windows in flight) and the LLM is held to 2 calls
    // a second, so when SIGTERM comes (at 10 rows) some of the windows in flight wait longer for their call than a
    // 2 s grace allows. Those in flight get the grace, the leases of the rest are released, and the restart does
    // them (at 10 calls a second).
    let grace = Duration::from_secs(2);
    let mut envs = ops_env(&s.db, &s.nats, free_port());
    set(&mut envs, "SUMMARIZER", "llm");
    set(&mut envs, "LLM_API_KEY", "sk-test-graceful");
    set(&mut envs, "LLM_BASE_URL", &env("LLM_BASE_URL"));
    set(&mut envs, "LLM_REQUESTS_PER_SECOND", "2");
    set(&mut envs, "LLM_CONCURRENCY", "8");
    set(&mut envs, "SHUTDOWN_GRACE", "2s");
    set(&mut envs, "NATS_ACK_WAIT", "2s");
    set(&mut envs, "INGEST_BATCH_SIZE", "100");
    set(&mut envs, "ENRICHMENT_BATCH_SIZE", "50");
    let log = log_path("sigterm");
    let mut child = spawn(&["run"], &envs, &log);
    let t0 = Instant::now();
    loop {
        let n = count(&s.db.pool, "SELECT count(*) FROM conversation_summaries").await;
        if n >= 10 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no summaries after 90 s; log {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigterm(&child.0);
    let (code, took) =
        wait_exit(&mut child.0, grace + Duration::from_secs(10)).unwrap_or_else(|| {
            panic!(
                "recap still runs {:?} after SIGTERM; log {}",
                grace + Duration::from_secs(10),
                log.display()
            )
        });
    let done_at_stop = rows(&s.db.pool).await.len();
    eprintln!(
        "SIGTERM: exit {code} after {took:?}; {done_at_stop} of {} rows written",
        expected.len()
    );
    assert_eq!(code, 0, "exit code after SIGTERM; log {}", log.display());
    assert!(
        took <= grace + Duration::from_secs(3),
        "exit took {took:?} (SHUTDOWN_GRACE {grace:?})"
    );
    assert!(
        done_at_stop < expected.len(),
        "the run finished before SIGTERM: the test did not interrupt anything"
    );
    // what was not finished was handed back: no window lease and no ingest lease survives the exit
    assert_eq!(
        count(
            &s.db.pool,
            "SELECT count(*) FROM recap_windows WHERE state = 'due' AND lease_until > now()"
        )
        .await,
        0,
        "window leases still held after a graceful exit"
    );
    assert_eq!(
        count(
            &s.db.pool,
            "SELECT count(*) FROM recap_leader WHERE lease_until > now()"
        )
        .await,
        0,
        "the ingest lease is still held after a graceful exit"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("SIGTERM"),
        "the log does not say why recap stopped"
    );
    assert!(
        text.contains("released window leases"),
        "no claimed window was left at the end of the grace: the test did not exercise the hard stop; log {}",
        log.display()
    );

    set(&mut envs, "LLM_REQUESTS_PER_SECOND", "10");
    let mut child = spawn(&["run"], &envs, &log);
    let after = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(120)).await;
    stop(&mut child.0);
    let extra: Vec<&Row> = after.iter().filter(|r| !expected.contains(r)).collect();
    let missing: Vec<&Row> = expected.iter().filter(|r| !after.contains(r)).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "the table after SIGTERM + restart differs from the uninterrupted definition; log {}\nrows not expected: {extra:#?}\nexpected rows missing: {missing:#?}",
        log.display()
    );
    let dups = count(
        &s.db.pool,
        "SELECT count(*) FROM (SELECT 1 FROM conversation_summaries GROUP BY bot_name, user_id, start_timestamp HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(dups, 0);
}

// ================================================================================================ secrets

/// Every occurrence of any secret in `text`, with the line it is on.
fn leaks(text: &str, secrets: &[&str]) -> Vec<String> {
    text.lines()
        .filter(|l| secrets.iter().any(|s| l.contains(s)))
        .map(|l| l.chars().take(300).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_a_log_line_or_a_command_output() {
    let _shared = common::shared().await;
    let s = scenario(3).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let db_password =
        s.db.url
            .split_once("://")
            .and_then(|(_, r)| r.split_once('@'))
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, pw)| pw.to_string())
            .expect("DATABASE_URL has a password");
    const LLM_KEY: &str = "sk-test-SECRET123";
    const NATS_TOKEN: &str = "nats-token-SECRET456";
    const NATS_PASSWORD: &str = "nats-pw-SECRET789";
    const QDRANT_KEY: &str = "qdrant-key-SECRET000";
    let secrets = [
        LLM_KEY,
        NATS_TOKEN,
        NATS_PASSWORD,
        QDRANT_KEY,
        db_password.as_str(),
    ];
    let (_, nats_hostport) = s.nats.url.split_once("://").unwrap();

    // a full run: LLM summaries, a token for NATS (the test broker has no auth and ignores it), a Qdrant key,
    // the database password in DATABASE_URL, JSON logs at debug level for recap itself
    let mut envs = ops_env(&s.db, &s.nats, free_port());
    set(&mut envs, "SUMMARIZER", "llm");
    set(&mut envs, "LLM_API_KEY", LLM_KEY);
    set(&mut envs, "LLM_BASE_URL", &env("LLM_BASE_URL"));
    set(&mut envs, "NATS_TOKEN", NATS_TOKEN);
    set(&mut envs, "QDRANT_API_KEY", QDRANT_KEY);
    set(&mut envs, "LOG_FORMAT", "json");
    set(&mut envs, "RUST_LOG", "info,recap=debug");
    let log = log_path("secrets");
    let mut child = spawn(&["run"], &envs, &log);
    let got = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(90)).await;
    stop(&mut child.0);
    assert_eq!(got, expected);
    let text = std::fs::read_to_string(&log).unwrap();
    let summarizers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT summarizer FROM conversation_summaries")
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(
        summarizers,
        ["llm"],
        "the run did not use the LLM (the key was not exercised)"
    );
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "LOG_FORMAT=json wrote a line that is not JSON: {line}"
        );
    }
    assert_eq!(
        leaks(&text, &secrets),
        Vec::<String>::new(),
        "secrets in the log of a full run"
    );

    // user and password inside NATS_URL, for `run` (connection events), `check --llm` and `status`
    let mut url_envs = envs.clone();
    set(
        &mut url_envs,
        "NATS_URL",
        &format!("nats://recap:{NATS_PASSWORD}@{nats_hostport}"),
    );
    let (code, out, err) = run_recap(&["check", "--llm"], &url_envs);
    assert_eq!(
        code, 0,
        "check --llm fails on healthy services:\n{out}{err}"
    );
    assert_eq!(
        leaks(&format!("{out}{err}"), &secrets),
        Vec::<String>::new(),
        "secrets in `recap check --llm`"
    );
    for args in [&["status"][..], &["status", "--json"][..]] {
        let (code, out, err) = run_recap(args, &url_envs);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert_eq!(
            leaks(&format!("{out}{err}"), &secrets),
            Vec::<String>::new(),
            "secrets in `recap {args:?}`"
        );
    }

    // failures: the error paths carry library messages, which must not carry credentials either
    let dead = free_port();
    let mut broken = url_envs.clone();
    set(
        &mut broken,
        "NATS_URL",
        &format!("nats://recap:{NATS_PASSWORD}@127.0.0.1:{dead}"),
    );
    set(
        &mut broken,
        "QDRANT_URL",
        &format!("http://127.0.0.1:{}", free_port()),
    );
    let wrong_pw_url = s.db.url.replacen(&db_password, "wrong-SECRET-pw", 1);
    set(&mut broken, "DATABASE_URL", &wrong_pw_url);
    let secrets_broken = [
        LLM_KEY,
        NATS_TOKEN,
        NATS_PASSWORD,
        QDRANT_KEY,
        "wrong-SECRET-pw",
    ];
    let (code, out, err) = run_recap(&["check", "--llm"], &broken);
    assert_ne!(code, 0);
    for service in ["Postgres", "Qdrant", "NATS"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("FAIL") && l.contains(service)),
            "check does not name {service} as broken:\n{out}{err}"
        );
    }
    assert_eq!(
        leaks(&format!("{out}{err}"), &secrets_broken),
        Vec::<String>::new(),
        "secrets in `recap check` with every service failing"
    );
    let (_, out, err) = run_recap(&["status"], &broken);
    assert_eq!(
        leaks(&format!("{out}{err}"), &secrets_broken),
        Vec::<String>::new(),
        "secrets in a failing `recap status`"
    );
    // a service that cannot reach its dependencies logs why, for a few seconds
    let log = log_path("secrets-broken");
    let mut child = spawn(&["run"], &broken, &log);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop(&mut child.0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.trim().is_empty(), "a failing recap logs nothing");
    assert_eq!(
        leaks(&text, &secrets_broken),
        Vec::<String>::new(),
        "secrets in the log of a failing run"
    );
}

// ================================================================================================ least privilege

/// The SQL block docs/operate.md says tests/it/ops.rs runs.
fn documented_grants() -> String {
    let doc =
        std::fs::read_to_string(Path::new(REPO).join("docs/operate.md")).expect("docs/operate.md");
    let at = doc
        .find("tests/it/ops.rs runs the block below")
        .expect("the grants block is marked in docs/operate.md");
    let rest = &doc[at..];
    let start = rest.find("```sql\n").expect("```sql block") + "```sql\n".len();
    let len = rest[start..].find("```").expect("end of the sql block");
    rest[start..start + len].to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn recap_runs_with_only_the_documented_postgres_grants() {
    let _shared = common::shared().await;
    // the schema is migrated by the owner (the test's superuser), as `recap migrate` would be
    let s = scenario(2).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);

    let role = format!("recap_app_{}", token());
    let password = token();
    let (base, dbname) = s.db.url.rsplit_once('/').unwrap();
    let sql = documented_grants()
        .replace("recap_app", &role)
        .replace("whisperengine_db", dbname)
        .replace("CHANGE-ME", &password);
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&s.db.pool)
        .await
        .expect("the documented grants run");
    let (scheme_user, hostport) = base.rsplit_once('@').unwrap();
    let scheme = scheme_user.split_once("://").unwrap().0;
    let url = format!("{scheme}://{role}:{password}@{hostport}/{dbname}");
    let can_create: bool = sqlx::query_scalar(
        "SELECT has_schema_privilege($1, 'public', 'CREATE') OR has_database_privilege($1, current_database(), 'CREATE')",
    )
    .bind(&role)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert!(!can_create, "the documented role can create objects");

    let mut envs = ops_env(&s.db, &s.nats, free_port());
    set(&mut envs, "DATABASE_URL", &url);
    let log = log_path("least-privilege");
    let mut child = spawn(&["run"], &envs, &log);
    let t0 = Instant::now();
    let got = loop {
        let r = rows(&s.db.pool).await;
        if r.len() >= expected.len() {
            break r;
        }
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!(
                "recap run exited ({st}) with only the documented grants:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no summaries with only the documented grants; log {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop(&mut child.0);
    assert_eq!(got, expected);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("permission denied"),
        "recap hit a missing grant:\n{}",
        leaks(&text, &["permission denied"]).join("\n")
    );
    // every other subcommand, as that role: none may need CREATE once the schema is up to date
    let mut envs_no_nats = envs.clone();
    envs_no_nats.retain(|(k, _)| !k.starts_with("NATS_"));
    for (args, envs) in [
        (&["check"][..], &envs),
        (&["status", "--json"][..], &envs),
        (&["retry", "--all"][..], &envs),
        (&["resummarize", "--since", "1d"][..], &envs),
        (&["migrate"][..], &envs),
        (&["replay", "--from-seq", "1"][..], &envs),
        (&["sweep", "--once"][..], &envs_no_nats),
        (&["backfill", "--since", "3650d"][..], &envs_no_nats),
    ] {
        let (code, out, err) = run_recap(args, envs);
        assert_eq!(
            code, 0,
            "recap {args:?} with the documented grants:\n{out}{err}"
        );
        assert!(
            !format!("{out}{err}").contains("permission denied"),
            "recap {args:?} hit a missing grant:\n{out}{err}"
        );
    }
    // `sweep` without --once is the service on the sweep alone: it serves /healthz and stops cleanly
    let port = free_port();
    set(&mut envs_no_nats, "HTTP_ADDR", &format!("127.0.0.1:{port}"));
    let log = log_path("least-privilege-sweep");
    let mut child = spawn(&["sweep"], &envs_no_nats, &log);
    wait_http(port, "/readyz", Duration::from_secs(30), |c, _| c == 200).await;
    stop(&mut child.0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("permission denied"),
        "recap sweep with the documented grants:\n{text}"
    );
    // the sweeps read the other tests' collections too (shared Qdrant); this bot's summaries are unchanged
    let mine: Vec<_> = rows(&s.db.pool)
        .await
        .into_iter()
        .filter(|r| r.bot == s.bot)
        .collect();
    assert_eq!(mine, expected, "a subcommand changed this bot's summaries");
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {role}; DROP ROLE {role}"
    )))
    .execute(&s.db.pool)
    .await;
}

// ================================================================================================ logging

/// `check`, `status`, `retry` and `resummarize` set up logging like `run`: a configuration warning (here: no NATS_URL)
/// reaches the user on stderr.
#[tokio::test(flavor = "multi_thread")]
async fn every_command_logs_the_configuration_warnings() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    let envs = recap_env(&db, None);
    for args in [
        &["check"][..],
        &["status"][..],
        &["retry", "--all"][..],
        &["resummarize"][..],
        &["migrate"][..],
    ] {
        let (code, out, err) = run_recap(args, &envs);
        assert!(
            err.contains("WARN") && err.contains("NATS_URL is not set"),
            "recap {args:?} (exit {code}) did not log the configuration warning on stderr:\n{out}{err}"
        );
    }
}

// ================================================================================================ check --llm

/// A model the endpoint does not have (the test server answers 404 `model_not_found` for `missing/...`): `check --llm`
/// fails and says so in plain words, naming LLM_MODEL; the configured model answers.
#[tokio::test(flavor = "multi_thread")]
async fn check_llm_says_when_the_model_does_not_exist_at_the_endpoint() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    let mut envs = recap_env(&db, None);
    set(&mut envs, "LLM_BASE_URL", &env("LLM_BASE_URL"));
    set(&mut envs, "LLM_API_KEY", "test-key");
    set(&mut envs, "LLM_MAX_RETRIES", "3");
    set(&mut envs, "LLM_MODEL", "test/model");
    let (code, out, err) = run_recap(&["check", "--llm"], &envs);
    assert_eq!(
        code, 0,
        "check --llm with a model the endpoint has:\n{out}{err}"
    );

    set(&mut envs, "LLM_MODEL", "missing/no-such-model");
    let t0 = Instant::now();
    let (code, out, err) = run_recap(&["check", "--llm"], &envs);
    let secs = t0.elapsed().as_secs_f64();
    assert_ne!(code, 0, "check --llm passes with a missing model:\n{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("LLM"))
        .unwrap_or_else(|| panic!("no failing LLM line:\n{out}{err}"));
    assert!(
        line.contains("\"missing/no-such-model\" (LLM_MODEL) does not exist at this endpoint"),
        "not said in plain words: {line}"
    );
    // not retried: a missing model is no passing fault
    assert!(secs < 5.0, "check --llm took {secs:.1}s");
    eprintln!("FIGURE check --llm, missing model: answered in {secs:.2}s: {line}");
}
