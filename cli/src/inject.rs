//! `capmesh inject`: adds the capmesh sidecar to the workloads in Kubernetes YAML and prints the
//! result, for `kubectl apply -f -` or a GitOps repository.
//!
//! The pod changes come from the control plane's [`inject_object`], the function the admission
//! webhook uses too, so a file injected here and a pod injected by the webhook get the same
//! spec. This module owns the YAML around it: multi-document streams, `kind: List`, errors that
//! name the document, and leaving every document it does not change exactly as it was written
//! (comments included). A changed document keeps its keys in their original order, with what
//! injection added at the end of each mapping.

use std::io::{Read, Write};
use std::path::PathBuf;

use capmesh_control_plane::inject::{
    InjectConfig, InjectError, InjectFlags, Outcome, inject_object,
};
use serde_json::Value as Json;
use serde_yaml_ng::{Mapping, Value as Yaml};

/// Flags of `capmesh inject`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:\n  \
    capmesh inject -f deployment.yaml | kubectl apply -f -\n  \
    kubectl get deploy weather -o yaml | capmesh inject | kubectl apply -f -\n  \
    capmesh inject -f app.yaml --proxy-image registry.example/capmesh/capmesh-proxy:0.1.0 \\\n    \
        --proxy-control-plane https://capmesh-control-plane.capmesh.svc:8000 > app-meshed.yaml\n\n\
    Deployments, StatefulSets, DaemonSets and Pods (also inside a kind: List) get the\n\
    capmesh-proxy sidecar, the transparent-mode init container and the two Secret volumes;\n\
    every other document is printed exactly as it was. Injecting twice changes nothing.\n\
    Per pod, on the pod template: annotation capmesh.io/agent-name (default: label\n\
    app.kubernetes.io/name, then app, then the workload's name), capmesh.io/agent-port\n\
    (default: the first container's first port, then 8080), capmesh.io/agent-path (/mcp),\n\
    capmesh.io/consumer-only, capmesh.io/tags, capmesh.io/version, capmesh.io/capabilities,\n\
    capmesh.io/dependencies, capmesh.io/transparent, capmesh.io/skip-outbound-ports,\n\
    capmesh.io/skip-outbound-cidrs; capmesh.io/inject: disabled (label or annotation) skips it.\n\
    The admission webhook takes the same settings as control-plane flags named --inject-<flag>.")]
pub struct InjectArgs {
    /// The YAML to read; `-` (the default) reads standard input.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        default_value = "-"
    )]
    pub file: PathBuf,

    #[command(flatten)]
    pub settings: InjectFlags,
}

/// Why a stream could not be injected. Nothing is printed then: a partial stream piped into
/// `kubectl apply` would be worse than none.
#[derive(Debug, thiserror::Error)]
pub enum InjectYamlError {
    /// A document is not YAML.
    #[error("document {number} (from line {first_line}) is not valid YAML: {detail}")]
    Yaml {
        /// 1-based, counting the non-empty documents.
        number: usize,
        /// Where the document starts in the input.
        first_line: usize,
        /// The parser's message, with the line counted in the whole input.
        detail: String,
    },
    /// A workload cannot be injected.
    // `problem` is part of this message and deliberately not an error `source`: an error chain
    // printed in full would say it twice.
    #[error("document {number} (from line {first_line}), {object}: {problem}")]
    Inject {
        /// 1-based, counting the non-empty documents.
        number: usize,
        /// Where the document starts in the input.
        first_line: usize,
        /// `Deployment/weather`.
        object: String,
        /// Why.
        problem: InjectError,
    },
    /// A changed document could not be written back as YAML.
    #[error("document {number}: cannot write it back as YAML: {detail}")]
    Write {
        /// 1-based.
        number: usize,
        /// The serializer's message.
        detail: String,
    },
}

/// The injected stream and one line per workload saying what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// The YAML to print.
    pub yaml: String,
    /// `Deployment/weather: injected`, ...
    pub report: Vec<String>,
}

/// Reads the input: a file, or standard input for `-`. Errors say which and why.
fn read_input(file: &std::path::Path) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        return match std::io::stdin().read_to_string(&mut text) {
            Ok(_) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => anyhow::bail!(
                "standard input is not UTF-8 text: pass Kubernetes YAML, or a file with -f FILE"
            ),
            Err(e) => anyhow::bail!("cannot read standard input: {e}; pass YAML or -f FILE"),
        };
    }
    let shown = file.display();
    std::fs::read_to_string(file).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            anyhow::anyhow!(
                "-f {shown}: no such file: check the path (or use -f - for standard input)"
            )
        }
        std::io::ErrorKind::InvalidData => {
            anyhow::anyhow!("-f {shown}: not UTF-8 text: pass a Kubernetes YAML file")
        }
        std::io::ErrorKind::IsADirectory => {
            anyhow::anyhow!("-f {shown}: is a directory: pass one YAML file")
        }
        _ => anyhow::anyhow!("-f {shown}: cannot read it: {e}"),
    })
}

/// The injected stream as one JSON document: the object itself when there is one, else a
/// `kind: List` of them (what `kubectl apply -f -` takes either way).
pub fn to_json(yaml: &str) -> anyhow::Result<String> {
    let mut objects = Vec::new();
    for chunk in split(yaml) {
        let value: Yaml = serde_yaml_ng::from_str(chunk.text)
            .map_err(|e| anyhow::anyhow!("cannot convert the result to JSON: {e}"))?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value).map_err(|e| {
            anyhow::anyhow!("cannot convert document {} to JSON: {e}", objects.len() + 1)
        })?;
        objects.push(json);
    }
    let doc = if objects.len() == 1 {
        objects.remove(0)
    } else {
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects})
    };
    let mut text = serde_json::to_string_pretty(&doc)?;
    text.push('\n');
    Ok(text)
}

/// Runs `capmesh inject`: the result goes to stdout as YAML (documents not changed are printed
/// as written), or as JSON with `--output json`; what happened to each workload goes to stderr.
pub fn run(args: InjectArgs, output: crate::Output) -> anyhow::Result<()> {
    let text = read_input(&args.file)?;
    let config = InjectConfig::from(args.settings);
    let injected = inject_stream(&text, &config)?;
    let printed = match output {
        crate::Output::Json => to_json(&injected.yaml)?,
        crate::Output::Table => injected.yaml,
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(printed.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => {}
        // `capmesh inject ... | head`: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        Err(e) => anyhow::bail!("cannot write the result to standard output: {e}"),
    }
    if injected.report.is_empty() {
        eprintln!(
            "capmesh inject: no Deployment, StatefulSet, DaemonSet or Pod in the input; printed it unchanged"
        );
    }
    for line in &injected.report {
        eprintln!("capmesh inject: {line}");
    }
    Ok(())
}

/// One document of a stream: its text as written and where it starts.
#[derive(Debug)]
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
    /// Its first line is a `---` marker (possibly with a comment).
    marker: Option<&'a str>,
}

/// A line that starts a document: `---` alone or followed by whitespace (YAML markers at
/// column 0 end the previous document even inside a block scalar).
fn is_marker(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

fn is_end_marker(line: &str) -> bool {
    line.strip_prefix("...")
        .is_some_and(|rest| rest.trim().is_empty())
}

fn split(input: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let (mut start, mut offset, mut first_line) = (0, 0, 1);
    let mut marker = None;
    for (i, line) in input.split_inclusive('\n').enumerate() {
        if is_marker(line) && offset > start {
            chunks.push(Chunk {
                text: &input[start..offset],
                first_line,
                marker,
            });
            (start, first_line) = (offset, i + 1);
        }
        if offset == start {
            marker = is_marker(line).then_some(line);
        }
        offset += line.len();
        if is_end_marker(line) {
            chunks.push(Chunk {
                text: &input[start..offset],
                first_line,
                marker,
            });
            (start, first_line) = (offset, i + 2);
        }
    }
    if offset > start {
        chunks.push(Chunk {
            text: &input[start..offset],
            first_line,
            marker,
        });
    }
    chunks
}

/// The parser's message with its line counted from the start of the whole input.
fn yaml_error(e: &serde_yaml_ng::Error, first_line: usize) -> String {
    let message = e.to_string();
    match e.location() {
        Some(loc) => {
            let text = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(m, _)| m);
            format!(
                "{text} at line {}, column {}",
                first_line + loc.line().saturating_sub(1),
                loc.column()
            )
        }
        None => message,
    }
}

fn describe(object: &Json) -> String {
    let kind = object["kind"].as_str().unwrap_or("(no kind)");
    match object.pointer("/metadata/name").and_then(Json::as_str) {
        Some(name) => format!("{kind}/{name}"),
        None => kind.to_owned(),
    }
}

/// Injects every workload in a multi-document YAML stream.
pub fn inject_stream(input: &str, config: &InjectConfig) -> Result<Injected, InjectYamlError> {
    let mut out = String::with_capacity(input.len() * 2);
    let mut report = Vec::new();
    let mut number = 0;
    for chunk in split(input) {
        let original: Yaml = match serde_yaml_ng::from_str(chunk.text) {
            Ok(Yaml::Null) => {
                // Only comments or blank lines: nothing to count or change.
                out.push_str(chunk.text);
                continue;
            }
            Ok(v) => {
                number += 1;
                v
            }
            Err(e) => {
                return Err(InjectYamlError::Yaml {
                    number: number + 1,
                    first_line: chunk.first_line,
                    detail: yaml_error(&e, chunk.first_line),
                });
            }
        };
        let Ok(mut object) = serde_json::to_value(&original) else {
            // Not representable as JSON (a non-scalar mapping key): not a Kubernetes object.
            out.push_str(chunk.text);
            continue;
        };
        let fail = |object: &Json, problem| InjectYamlError::Inject {
            number,
            first_line: chunk.first_line,
            object: describe(object),
            problem,
        };
        let mut changed = false;
        let items: Vec<&mut Json> = if object["kind"] == "List" {
            object["items"]
                .as_array_mut()
                .map(|items| items.iter_mut().collect())
                .unwrap_or_default()
        } else {
            vec![&mut object]
        };
        for item in items {
            let outcome = inject_object(item, config).map_err(|e| fail(item, e))?;
            let what = match outcome {
                Outcome::Injected => {
                    changed = true;
                    "injected"
                }
                Outcome::AlreadyInjected => "already has the capmesh-proxy sidecar; unchanged",
                Outcome::Disabled => "capmesh.io/inject: disabled; unchanged",
                Outcome::NotAWorkload => continue,
            };
            report.push(format!("{}: {what}", describe(item)));
        }
        if !changed {
            out.push_str(chunk.text);
            continue;
        }
        let yaml = serde_yaml_ng::to_string(&order_like(&original, &object)).map_err(|e| {
            InjectYamlError::Write {
                number,
                detail: e.to_string(),
            }
        })?;
        // Keep the document's `---` line (and its comment); content after the marker moved
        // into the document.
        if let Some(marker) = chunk.marker {
            let rest = marker.get(3..).unwrap_or("").trim();
            if rest.is_empty() || rest.starts_with('#') {
                out.push_str(marker.trim_end());
                out.push('\n');
            } else {
                out.push_str("---\n");
            }
        }
        out.push_str(&yaml);
    }
    Ok(Injected { yaml: out, report })
}

/// A mapping key as serde_json writes it.
fn key_string(key: &Yaml) -> Option<String> {
    match key {
        Yaml::String(s) => Some(s.clone()),
        other => serde_json::to_value(other)
            .ok()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)),
    }
}

/// `new` as YAML, laid out like `original`: its keys first in their original order (values
/// that did not change are the original's own nodes), then the new keys — `name` first, the
/// way Kubernetes objects are usually written.
fn order_like(original: &Yaml, new: &Json) -> Yaml {
    if serde_json::to_value(original).is_ok_and(|o| &o == new) {
        return original.clone();
    }
    match (original, new) {
        (Yaml::Mapping(old), Json::Object(new_map)) => {
            let mut out = Mapping::new();
            let mut seen = std::collections::BTreeSet::new();
            for (k, v) in old {
                let Some(key) = key_string(k) else { continue };
                if let Some(nv) = new_map.get(&key) {
                    out.insert(k.clone(), order_like(v, nv));
                    seen.insert(key);
                }
            }
            out.extend(name_first(
                new_map.iter().filter(|(k, _)| !seen.contains(*k)),
            ));
            Yaml::Mapping(out)
        }
        (Yaml::Sequence(old), Json::Array(new_items)) => Yaml::Sequence(
            new_items
                .iter()
                .enumerate()
                .map(|(i, nv)| match old.get(i) {
                    Some(ov) => order_like(ov, nv),
                    None => to_yaml(nv),
                })
                .collect(),
        ),
        _ => to_yaml(new),
    }
}

/// A new JSON value as YAML, `name` first in every mapping.
fn to_yaml(value: &Json) -> Yaml {
    match value {
        Json::Null => Yaml::Null,
        Json::Bool(b) => Yaml::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Yaml::Number(i.into()),
            (_, Some(u), _) => Yaml::Number(u.into()),
            (_, _, Some(f)) => Yaml::Number(f.into()),
            _ => Yaml::Null,
        },
        Json::String(s) => Yaml::String(s.clone()),
        Json::Array(items) => Yaml::Sequence(items.iter().map(to_yaml).collect()),
        Json::Object(map) => Yaml::Mapping(name_first(map.iter())),
    }
}

/// Mapping entries as YAML with `name` first.
fn name_first<'a>(entries: impl Iterator<Item = (&'a String, &'a Json)>) -> Mapping {
    let (names, rest): (Vec<_>, Vec<_>) = entries.partition(|(k, _)| *k == "name");
    names
        .into_iter()
        .chain(rest)
        .map(|(k, v)| (Yaml::String(k.clone()), to_yaml(v)))
        .collect()
}
