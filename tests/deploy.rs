//! The deployment files stay true to the gateway:
//!
//! - the configuration embedded in the Helm chart's `values.yaml`, in the
//!   Kubernetes ConfigMap and baked into the container image passes the real
//!   binary's `roomgate check-config`, and the `ROOMGATE_*` variables set by
//!   the Dockerfile and the Compose file all name real keys, so a renamed
//!   key breaks the build;
//! - the chart's `config` tree has exactly the keys of
//!   `config/roomgate.toml`;
//! - every metric the Grafana dashboard and the alert rules use is one the
//!   running gateway exports, and their PromQL parses (`promtool`).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use toml::{Table, Value};

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("roomgate-deploy-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `roomgate check-config` on `toml_text` with `env`; asserts exit 0
/// and no warnings, and returns the effective configuration it printed.
fn check_config(what: &str, toml_text: &str, env: &[(&str, &str)]) -> Table {
    let scratch = Scratch::new();
    let path = scratch.write("roomgate.toml", toml_text);
    let path = path.to_str().expect("utf-8 path");
    let (code, stdout, stderr) = run_binary(&["check-config", "--config", path], env);
    assert_eq!(
        code, 0,
        "roomgate check-config refused {what}:\n{stderr}\n--- the file ---\n{toml_text}"
    );
    assert!(
        !stderr.contains("warning"),
        "roomgate check-config warned about {what}:\n{stderr}"
    );
    toml::from_str(&stdout).expect("check-config prints TOML")
}

/// The value at a dotted path of a TOML table.
fn lookup<'a>(table: &'a Table, path: &str) -> &'a Value {
    let mut parts = path.split('.');
    let mut value = table
        .get(parts.next().unwrap())
        .unwrap_or_else(|| panic!("no {path}"));
    for part in parts {
        value = value.get(part).unwrap_or_else(|| panic!("no {path}"));
    }
    value
}

// ----- the Helm chart's `config` tree ------------------------------------

/// Reads the top-level `config:` mapping of the chart's values file into a
/// TOML table.
///
/// A minimal reader for the YAML subset that tree is written in: nested
/// block mappings indented by two spaces, and scalars that are
/// double-quoted strings, integers, `true`/`false` or flow lists of those.
/// Anything else fails loudly, so a values file that outgrows the subset is
/// noticed instead of misread.
fn chart_config(values_yaml: &str) -> Table {
    let mut lines = values_yaml
        .lines()
        .enumerate()
        .skip_while(|(_, l)| *l != "config:");
    assert!(
        lines.next().is_some(),
        "values.yaml has no top-level `config:`"
    );
    // (indent, table path) of the mappings being filled.
    let mut root = Table::new();
    let mut stack: Vec<(usize, Vec<String>)> = vec![(0, Vec::new())];
    for (number, raw) in lines {
        let line = strip_comment(raw);
        if line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent == 0 {
            break; // the next top-level key: the tree is over
        }
        let at = || format!("values.yaml line {}: {raw:?}", number + 1);
        assert!(indent.is_multiple_of(2), "{}: odd indentation", at());
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let (parent_indent, parent) = stack.last().cloned().expect("inside config");
        assert_eq!(
            indent,
            parent_indent + 2,
            "{}: unexpected indentation",
            at()
        );
        let (key, value) = line
            .trim()
            .split_once(':')
            .unwrap_or_else(|| panic!("{}: not `key: value`", at()));
        assert!(
            !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{}: unexpected key",
            at()
        );
        let table = table_at(&mut root, &parent);
        let value = value.trim();
        if value.is_empty() {
            table.insert(key.to_string(), Value::Table(Table::new()));
            let mut path = parent.clone();
            path.push(key.to_string());
            stack.push((indent, path));
        } else {
            let parsed = scalar(value).unwrap_or_else(|| panic!("{}: unsupported value", at()));
            table.insert(key.to_string(), parsed);
        }
    }
    root
}

fn table_at<'a>(root: &'a mut Table, path: &[String]) -> &'a mut Table {
    path.iter()
        .fold(root, |table, key| match table.get_mut(key) {
            Some(Value::Table(inner)) => inner,
            _ => unreachable!("parents are tables"),
        })
}

/// The line without a trailing `# comment` (outside double quotes).
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '#' if !quoted && (i == 0 || line[..i].ends_with(' ')) => return &line[..i],
            _ => {}
        }
    }
    line
}

/// A YAML scalar or flow list of the subset, as a TOML value.
fn scalar(text: &str) -> Option<Value> {
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        if inner.trim().is_empty() {
            return Some(Value::Array(Vec::new()));
        }
        // Items are quoted strings without commas, or plain scalars.
        return inner
            .split(',')
            .map(|item| scalar(item.trim()))
            .collect::<Option<Vec<_>>>()
            .map(Value::Array);
    }
    if text.starts_with('"') {
        // YAML double-quoted strings escape like JSON for what we use.
        return serde_json::from_str::<String>(text).ok().map(Value::String);
    }
    match text {
        "true" => return Some(Value::Boolean(true)),
        "false" => return Some(Value::Boolean(false)),
        _ => {}
    }
    text.parse::<i64>().ok().map(Value::Integer)
}

#[test]
fn the_minimal_yaml_reader_reads_its_subset() {
    let yaml = "replicaCount: 2\nconfig:\n  a:\n    s: \"x # y\"  # comment\n    n: 5\n    \
                b: false\n    l: [\"/ws\", \"/live\"]\n    e: []\n    c:\n      d: \"\"\n  \
                f:\n    g: 1\nother: 3\n";
    let table = chart_config(yaml);
    let expected: Table = toml::from_str(
        "[a]\ns = \"x # y\"\nn = 5\nb = false\nl = [\"/ws\", \"/live\"]\ne = []\n\
         [a.c]\nd = \"\"\n[f]\ng = 1\n",
    )
    .unwrap();
    assert_eq!(table, expected);
}

#[test]
fn helm_chart_default_config_passes_check_config() {
    let values = repo_file("charts/roomgate/values.yaml");
    let config = chart_config(&values);
    let text = toml::to_string(&config).expect("TOML");
    let effective = check_config("the chart's default config", &text, &[]);
    // Probes reach the admin port from outside the pod.
    assert_eq!(
        lookup(&effective, "admin.listen").as_str(),
        Some("0.0.0.0:9090")
    );
}

#[test]
fn helm_chart_config_has_every_key_of_the_config_file() {
    let chart: Table = chart_config(&repo_file("charts/roomgate/values.yaml"));
    let file: Table = toml::from_str(&repo_file("config/roomgate.toml")).expect("config file");
    let paths = |table: &Table| -> BTreeSet<String> {
        toml_leaves(table)
            .into_iter()
            .map(|(path, _)| path)
            .collect()
    };
    let (in_chart, in_file) = (paths(&chart), paths(&file));
    let missing: Vec<_> = in_file.difference(&in_chart).collect();
    let extra: Vec<_> = in_chart.difference(&in_file).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "charts/roomgate/values.yaml `config:` must mirror config/roomgate.toml \
         (update it, and the chart README's table): missing {missing:?}, unknown {extra:?}"
    );
}

/// How long the gateway may take to exit after its drain: the last NATS
/// events, and the bounds on cutting connections and on stopping (README,
/// "Shutdown").
const AFTER_THE_DRAIN_SECS: i64 = 14;

#[test]
fn helm_chart_terminating_pods_outlive_the_drain() {
    let values = repo_file("charts/roomgate/values.yaml");
    let config = chart_config(&values);
    let grace = lookup(&config, "server.shutdown_grace_secs")
        .as_integer()
        .unwrap();
    let top = |key: &str| -> i64 {
        values
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("no {key} in values.yaml"))
            .trim()
            .parse()
            .expect("integer")
    };
    assert!(
        top("terminationGracePeriodSeconds")
            >= top("preStopSleepSeconds") + grace + AFTER_THE_DRAIN_SECS
    );
}

// ----- the Kubernetes manifests -----------------------------------------

/// The text of the block scalar `key: |` in a YAML file, unindented.
fn block_scalar(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines();
    let header = format!("{key}: |");
    let start = lines
        .by_ref()
        .find(|l| l.trim() == header)
        .unwrap_or_else(|| panic!("no `{header}`"));
    let key_indent = start.len() - start.trim_start().len();
    let mut block: Vec<&str> = Vec::new();
    let mut indent = None;
    for line in lines {
        if line.trim().is_empty() {
            block.push("");
            continue;
        }
        let this = line.len() - line.trim_start().len();
        if this <= key_indent {
            break;
        }
        let indent = *indent.get_or_insert(this);
        assert!(this >= indent, "block scalar dedents: {line:?}");
        block.push(&line[indent..]);
    }
    block.join("\n") + "\n"
}

#[test]
fn kubernetes_configmap_passes_check_config() {
    let manifest = repo_file("deploy/kubernetes/configmap.yaml");
    let text = block_scalar(&manifest, "roomgate.toml");
    let effective = check_config("the Kubernetes ConfigMap", &text, &[]);
    assert_eq!(
        lookup(&effective, "admin.listen").as_str(),
        Some("0.0.0.0:9090")
    );
    // The app container, in the same pod.
    assert_eq!(
        lookup(&effective, "upstream.url").as_str(),
        Some("http://127.0.0.1:3000")
    );
    // The pod's grace period covers the preStop sleep and the drain.
    let deployment = repo_file("deploy/kubernetes/deployment.yaml");
    let number = |prefix: &str| -> i64 {
        deployment
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in deployment.yaml"))
            .trim()
            .parse()
            .expect("integer")
    };
    let grace = lookup(&effective, "server.shutdown_grace_secs")
        .as_integer()
        .unwrap();
    // The first `seconds:` is the app's preStop sleep, which must outlast
    // roomgate's preStop sleep (the second) plus the drain.
    let sleeps: Vec<i64> = deployment
        .lines()
        .filter_map(|l| l.trim().strip_prefix("seconds:"))
        .map(|s| s.trim().parse().expect("integer"))
        .collect();
    assert_eq!(sleeps.len(), 2, "preStop sleeps of app and roomgate");
    let (app_sleep, gateway_sleep) = (sleeps[0], sleeps[1]);
    assert!(app_sleep >= gateway_sleep + grace);
    assert!(number("terminationGracePeriodSeconds:") > app_sleep);
    assert!(
        number("terminationGracePeriodSeconds:") >= gateway_sleep + grace + AFTER_THE_DRAIN_SECS
    );
}

// ----- the container image and Compose ------------------------------------

/// `ROOMGATE_*` variables set by `ENV` lines of the Dockerfile.
fn dockerfile_env(dockerfile: &str) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let mut in_env = false;
    for line in dockerfile.lines() {
        let line = line.trim();
        // An ENV line, or the continuation of one (after a trailing `\`).
        let body = if let Some(rest) = line.strip_prefix("ENV ") {
            rest
        } else if in_env {
            line
        } else {
            continue;
        };
        in_env = body.ends_with('\\');
        for word in body.trim_end_matches('\\').split_whitespace() {
            if let Some((k, v)) = word.split_once('=')
                && k.starts_with("ROOMGATE_")
            {
                env.push((k.to_string(), v.trim_matches('"').to_string()));
            }
        }
    }
    env
}

#[test]
fn dockerfile_env_reads_continued_env_lines() {
    let dockerfile = "FROM x\nENV A=1 \\\n    ROOMGATE_LOG_FORMAT=json \\\n                          ROOMGATE_NATS_URL=\"nats://n:4222\"\nRUN ROOMGATE_NO=1 true\n";
    assert_eq!(
        dockerfile_env(dockerfile),
        [
            ("ROOMGATE_LOG_FORMAT".to_string(), "json".to_string()),
            ("ROOMGATE_NATS_URL".to_string(), "nats://n:4222".to_string()),
        ]
    );
}

#[test]
fn container_image_config_passes_check_config() {
    let dockerfile = repo_file("deploy/Dockerfile");
    // The Dockerfile rewrites this line of the repository's config file.
    let from = r#"listen = "127.0.0.1:9090""#;
    let to = r#"listen = "0.0.0.0:9090""#;
    assert!(
        dockerfile.contains(&format!("s|^{from}$|{to}|")),
        "the Dockerfile's sed of admin.listen changed: update this test"
    );
    let file = repo_file("config/roomgate.toml");
    assert_eq!(
        file.lines().filter(|l| *l == from).count(),
        1,
        "config/roomgate.toml must hold the line {from} once: the Dockerfile rewrites it"
    );
    let baked = file.replace(from, to);
    let env = dockerfile_env(&dockerfile);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let effective = check_config("the image's baked-in config", &baked, &env);
    assert_eq!(
        lookup(&effective, "admin.listen").as_str(),
        Some("0.0.0.0:9090")
    );
}

#[test]
fn compose_roomgate_environment_names_real_keys() {
    let compose = repo_file("deploy/compose.yaml");
    let env: Vec<(String, String)> = compose
        .lines()
        .filter_map(|l| {
            let (key, value) = l.trim().split_once(": ")?;
            key.starts_with("ROOMGATE_")
                .then(|| (key.to_string(), value.trim_matches('"').to_string()))
        })
        .collect();
    assert!(
        env.iter().any(|(k, _)| k == "ROOMGATE_UPSTREAM_URL"),
        "compose.yaml points roomgate at the chat app"
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let effective = check_config(
        "compose.yaml's ROOMGATE_* variables",
        &repo_file("config/roomgate.toml"),
        &env,
    );
    assert_eq!(
        lookup(&effective, "websocket.rooms.presence").as_bool(),
        Some(true),
        "the chat page shows presence"
    );
}

// ----- dashboards and alerts ---------------------------------------------

/// Every `roomgate_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("roomgate_") {
        let start = i + found;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if !preceded {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The PromQL expressions of the dashboard's panels.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    exprs
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    // `roomgate_proxy_requests_total{code}` appears with its first
    // request: proxy one.
    let upstream = Upstream::start(|_| async { hyper::Response::new(full("ok")) }).await;
    let gw = TestGateway::with(|c| c.upstream.url = upstream.url()).await;
    assert_eq!(http_get(gw.addr, "/").await.0, 200);
    let (status, exposition) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200);
    gw.stop().await;
    // Names from the `# TYPE` lines; a histogram also exports its series.
    let mut exported = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
        exported.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        }
    }

    let dashboard_text = repo_file("deploy/grafana/roomgate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");
    assert!(!dashboard_exprs(&dashboard).is_empty());
    for (file, text) in [
        ("deploy/grafana/roomgate.json", dashboard_text.as_str()),
        (
            "deploy/prometheus/alerts.yaml",
            &repo_file("deploy/prometheus/alerts.yaml"),
        ),
    ] {
        let used = metric_names(text);
        assert!(!used.is_empty(), "{file} uses no roomgate metric");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the gateway does not export: {unknown:?}"
        );
    }
    // The dashboard covers every family of SPEC §7.
    let used = metric_names(&dashboard_text);
    for family in exported.iter().filter(|n| n.starts_with("roomgate_")) {
        let covered = used.contains(family)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| used.contains(&format!("{family}{s}")));
        let is_series = ["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| family.ends_with(s));
        assert!(covered || is_series, "the dashboard does not show {family}");
    }
}

/// The `promtool` binary, or a panic explaining how to get it.
fn promtool() -> &'static str {
    let ok = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "promtool is missing: the alert and dashboard checks need it. Install it \
         (Debian: `apt-get install -y prometheus`) or run ./scripts/test.sh, which does."
    );
    "promtool"
}

fn run_promtool(args: &[&str]) {
    let output = Command::new(promtool())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run promtool");
    assert!(
        output.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn alert_rules_are_valid_and_behave() {
    run_promtool(&["check", "rules", "deploy/prometheus/alerts.yaml"]);
    run_promtool(&["test", "rules", "deploy/prometheus/alerts_test.yaml"]);
    run_promtool(&["check", "config", "deploy/prometheus/prometheus.yml"]);
}

#[test]
fn dashboard_queries_parse() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/roomgate.json")).expect("JSON");
    // Each query as a recording rule, with Grafana's variables filled in,
    // so that promtool parses it.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs(&dashboard).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        assert!(!expr.contains('$'), "unknown variable in {expr}");
        let quoted = serde_json::to_string(&expr).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {quoted}\n"
        ));
    }
    let scratch = Scratch::new();
    let path = scratch.write("dashboard-rules.yaml", &rules);
    run_promtool(&["check", "rules", path.to_str().unwrap()]);
}
