//! `weftctl inject`: the webhook's injection applied offline to the pod templates in a
//! multi-document YAML stream, for GitOps flows and clusters without the webhook.

use k8s_openapi::{api::core::v1::PodSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::Deserialize;
use serde_json::Value;
use weft_inject::{InjectConfig, InjectError, SkipReason, inject_into};

/// What happened to one object, for the report on stderr.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `kind/name`.
    pub object: String,
    /// `injected`, a skip reason, or `unchanged (not a workload)`.
    pub result: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("document {document}: not valid YAML: {source}")]
    Yaml { document: usize, source: serde_yaml::Error },
    #[error("document {document} ({object}): {source}")]
    Inject { document: usize, object: String, source: InjectError },
    #[error("document {document} ({object}): the pod template is malformed at {field}: {source}")]
    Template { document: usize, object: String, field: &'static str, source: serde_json::Error },
}

/// Injects every workload in `input` and returns the resulting YAML stream and a report.
pub fn inject_stream(input: &str, config: &InjectConfig) -> Result<(String, Vec<Outcome>), Error> {
    let mut documents = Vec::new();
    let mut outcomes = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let number = index + 1;
        let mut value =
            Value::deserialize(document).map_err(|source| Error::Yaml { document: number, source })?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, config, number, &mut outcomes)?;
        documents.push(serde_yaml::to_string(&value).expect("a JSON value always serializes to YAML"));
    }
    Ok((documents.join("---\n"), outcomes))
}

fn inject_object(
    value: &mut Value,
    config: &InjectConfig,
    document: usize,
    outcomes: &mut Vec<Outcome>,
) -> Result<(), Error> {
    let kind = value["kind"].as_str().unwrap_or_default().to_owned();
    let object = format!("{}/{}", kind, value["metadata"]["name"].as_str().unwrap_or("?"));
    let namespace = value["metadata"]["namespace"].as_str().map(str::to_owned);
    let name = value["metadata"]["name"].as_str().map(str::to_owned);
    let template_path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            &["spec", "template"]
        }
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        "List" => {
            if let Some(items) = value["items"].as_array_mut() {
                for item in items {
                    inject_object(item, config, document, outcomes)?;
                }
            }
            return Ok(());
        }
        _ => {
            outcomes.push(Outcome { object, result: "unchanged (not a workload)".to_owned() });
            return Ok(());
        }
    };
    let template = template_path.iter().fold(value, |value, key| &mut value[*key]);
    let result = inject_template(template, namespace, name, config).map_err(|error| match error {
        TemplateError::Inject(source) => Error::Inject { document, object: object.clone(), source },
        TemplateError::Field(field, source) => {
            Error::Template { document, object: object.clone(), field, source }
        }
    })?;
    let result = match result {
        None => "injected".to_owned(),
        Some(reason) => format!("skipped ({})", reason.as_str()),
    };
    outcomes.push(Outcome { object, result });
    Ok(())
}

enum TemplateError {
    Inject(InjectError),
    Field(&'static str, serde_json::Error),
}

/// Injects a `{metadata, spec}` value in place. The template's namespace and name are the
/// workload's, for the namespace exclusions and the proxy's workload name, and are not written
/// into the template.
fn inject_template(
    template: &mut Value,
    namespace: Option<String>,
    name: Option<String>,
    config: &InjectConfig,
) -> Result<Option<SkipReason>, TemplateError> {
    let field = |name: &'static str| move |source| TemplateError::Field(name, source);
    // A template may leave out its metadata; an absent object reads as empty.
    let mut take = |key: &str| match template[key].take() {
        Value::Null => Value::Object(Default::default()),
        value => value,
    };
    let mut meta: ObjectMeta = serde_json::from_value(take("metadata")).map_err(field("metadata"))?;
    let mut spec: PodSpec = serde_json::from_value(take("spec")).map_err(field("spec"))?;
    let (own_namespace, own_name) = (meta.namespace.clone(), meta.name.clone());
    if own_namespace.is_none() {
        meta.namespace = namespace;
    }
    // A template has no owner yet, so its pods' workload is the object that holds it.
    if own_name.is_none() && meta.generate_name.is_none() {
        meta.name = name;
    }
    let result = inject_into(&mut meta, &mut spec, config).map_err(TemplateError::Inject)?;
    (meta.namespace, meta.name) = (own_namespace, own_name);
    template["metadata"] = serde_json::to_value(&meta).map_err(field("metadata"))?;
    template["spec"] = serde_json::to_value(&spec).map_err(field("spec"))?;
    Ok(result)
}
