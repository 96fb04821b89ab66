//! Weft's API against the real kube-apiserver of the test cluster: the CRDs are accepted and
//! established, valid objects survive a round trip unchanged, invalid ones are rejected with
//! the field named, and ServiceAccount tokens for the CA's audience work as the CA needs.
//!
//! Needs the test cluster: `cargo xtask test`, or `cargo xtask cluster up` then `cargo test`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec},
        core::v1::ServiceAccount,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{DynamicObject, ObjectMeta, PostParams},
    core::{GroupVersion, GroupVersionKind},
    discovery::{self, Scope},
};
use serde_json::Value;
use weft_e2e::{TestCluster, cluster};

/// The audience of the tokens that proxies present to Weft's CA.
const CA_AUDIENCE: &str = "weft-ca";

fn fixture_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lib/api/tests/fixtures").join(kind)
}

/// Every `*.yaml` in `lib/api/tests/fixtures/<kind>/`, sorted; an empty set is an error so
/// the tests below never pass by checking nothing.
fn fixtures(kind: &str) -> Result<Vec<(String, String)>> {
    let dir = fixture_dir(kind);
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            files.push((name, text));
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "no fixtures in {}", dir.display());
    Ok(files)
}

/// Sends a fixture's object with a plain create (as `kubectl create` does) into `namespace`.
async fn create_fixture(
    client: &Client,
    namespace: &str,
    text: &str,
) -> Result<(Value, kube::Result<DynamicObject>, Api<DynamicObject>)> {
    let mut object: Value = serde_yaml::from_str(text).context("parsing the fixture")?;
    let api_version = object["apiVersion"].as_str().context("no apiVersion")?;
    let kind = object["kind"].as_str().context("no kind")?;
    let gvk: GroupVersionKind = api_version.parse::<GroupVersion>()?.with_kind(kind);
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discovering {api_version} {kind}"))?;
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Namespaced => {
            // Fixtures may name a namespace; each test uses its own temporary one instead.
            object["metadata"]["namespace"] = Value::from(namespace);
            Api::namespaced_with(client.clone(), namespace, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let dynamic: DynamicObject = serde_json::from_value(object.clone()).context("not a Kubernetes object")?;
    let created = api.create(&PostParams::default(), &dynamic).await;
    Ok((object, created, api))
}

/// `value` with every number as an f64, so `50` and `50.0` compare equal.
fn normalise_numbers(value: &Value) -> Value {
    match value {
        Value::Number(n) => n.as_f64().map_or_else(|| value.clone(), Value::from),
        Value::Array(items) => Value::Array(items.iter().map(normalise_numbers).collect()),
        Value::Object(fields) => {
            Value::Object(fields.iter().map(|(k, v)| (k.clone(), normalise_numbers(v))).collect())
        }
        other => other.clone(),
    }
}

/// Whether every field of `part` is in `whole` with the same value (objects recursively).
fn contains(whole: &Value, part: &Value) -> bool {
    match (whole, part) {
        (Value::Object(whole), Value::Object(part)) => {
            part.iter().all(|(k, v)| whole.get(k).is_some_and(|w| contains(w, v)))
        }
        _ => whole == part,
    }
}

#[test]
fn number_normalisation_equates_integers_and_floats() {
    let a = serde_json::json!({"weight": 50, "p": [0.5, 1], "s": "50"});
    let b = serde_json::json!({"weight": 50.0, "p": [0.5, 1.0], "s": "50"});
    assert_eq!(normalise_numbers(&a), normalise_numbers(&b));
    assert_ne!(normalise_numbers(&a), normalise_numbers(&serde_json::json!({"weight": 51})));
}

#[tokio::test]
async fn every_crd_is_established_as_defined() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let api: Api<CustomResourceDefinition> = Api::all(cluster.client());
    let crds = weft_api::crds();
    ensure!(!crds.is_empty(), "weft_api::crds() is empty");
    for crd in &crds {
        let name = crd.metadata.name.as_deref().context("a CRD without a name")?;
        let live = api.get(name).await.with_context(|| format!("CRD {name} is not installed"))?;
        ensure!(cluster::is_established(&live), "CRD {name} is not Established: {:?}", live.status);
        ensure!(live.spec.group == crd.spec.group, "CRD {name}: group differs");
        // The apiserver fills in `singular` and `listKind` when they are unset.
        let (sent, held) = (serde_json::to_value(&crd.spec.names)?, serde_json::to_value(&live.spec.names)?);
        ensure!(contains(&held, &sent), "CRD {name}: names differ: sent {sent}, held {held}");
        let versions = |c: &CustomResourceDefinition| {
            c.spec.versions.iter().map(|v| (v.name.clone(), v.served, v.storage)).collect::<Vec<_>>()
        };
        ensure!(versions(&live) == versions(crd), "CRD {name}: versions differ");
        let accepted = live.status.as_ref().and_then(|s| s.accepted_names.as_ref()).map(|n| n.kind.as_str());
        ensure!(accepted == Some(crd.spec.names.kind.as_str()), "CRD {name}: names not accepted");
    }
    Ok(())
}

#[tokio::test]
async fn valid_fixtures_are_created_and_read_back_unchanged() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let namespace = cluster.namespace("valid-fixtures").await?;
    let fixtures = fixtures("valid")?;
    let mut failures = Vec::new();
    for (file, text) in &fixtures {
        let outcome = async {
            let (sent, created, api) = create_fixture(&client, namespace.name(), text).await?;
            let created = created.context("the apiserver rejected it")?;
            let name = created.metadata.name.as_deref().context("created without a name")?;
            let read = api.get(name).await.context("reading it back")?;
            let want = normalise_numbers(&sent["spec"]);
            let got = normalise_numbers(&read.data["spec"]);
            if want != got {
                bail!(
                    "the spec read back differs from the one sent\n  sent: {}\n  read: {}",
                    serde_json::to_string(&sent["spec"])?,
                    serde_json::to_string(&read.data["spec"])?
                );
            }
            Ok(())
        }
        .await;
        if let Err(error) = outcome {
            failures.push(format!("{file}: {error:#}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} valid fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn invalid_fixtures_are_rejected_naming_the_field() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let namespace = cluster.namespace("invalid-fixtures").await?;
    let fixtures = fixtures("invalid")?;
    let mut failures = Vec::new();
    for (file, text) in &fixtures {
        let outcome = async {
            let expect = text
                .lines()
                .next()
                .and_then(|line| line.strip_prefix("# expect:"))
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .context("the first line must be `# expect: <text in the error>`")?;
            let (_, created, _) = create_fixture(&client, namespace.name(), text).await?;
            match created {
                Ok(_) => bail!("the apiserver accepted it"),
                Err(kube::Error::Api(status)) => {
                    ensure!(
                        status.code == 422,
                        "rejected with HTTP {} ({}), not 422: {}",
                        status.code,
                        status.reason,
                        status.message
                    );
                    ensure!(
                        status.message.contains(expect),
                        "the error does not mention {expect:?}: {}",
                        status.message
                    );
                    Ok(())
                }
                Err(other) => Err(other).context("the request failed"),
            }
        }
        .await;
        if let Err(error) = outcome {
            failures.push(format!("{file}: {error:#}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} invalid fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn service_account_tokens_for_the_ca_audience_pass_token_review() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let namespace = cluster.namespace("tokens").await?;
    let ns = namespace.name();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let account = ServiceAccount {
        metadata: ObjectMeta { name: Some("workload".into()), ..ObjectMeta::default() },
        ..ServiceAccount::default()
    };
    accounts.create(&PostParams::default(), &account).await?;

    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![CA_AUDIENCE.into()],
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let issued = accounts
        .create_token_request("workload", &PostParams::default(), &request)
        .await
        .context("TokenRequest for audience weft-ca")?;
    let token = issued.status.context("TokenRequest without status")?.token;
    ensure!(!token.is_empty(), "empty token");

    // What the CA does: a TokenReview that names its own audience.
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |audiences: Option<Vec<String>>| TokenReview {
        spec: TokenReviewSpec { token: Some(token.clone()), audiences },
        ..TokenReview::default()
    };
    let status = reviews
        .create(&PostParams::default(), &review(Some(vec![CA_AUDIENCE.into()])))
        .await?
        .status
        .context("TokenReview without status")?;
    ensure!(status.authenticated == Some(true), "not authenticated: {:?}", status.error);
    let user = status.user.context("no user")?;
    let want = format!("system:serviceaccount:{ns}:workload");
    ensure!(user.username.as_deref() == Some(want.as_str()), "username {:?}, want {want}", user.username);
    ensure!(
        status.audiences.unwrap_or_default().iter().any(|a| a == CA_AUDIENCE),
        "the review did not confirm the weft-ca audience"
    );

    // A token for the CA is not a credential for the Kubernetes API itself.
    let status = reviews
        .create(&PostParams::default(), &review(None))
        .await?
        .status
        .context("TokenReview without status")?;
    ensure!(
        status.authenticated != Some(true),
        "a weft-ca token authenticated against the apiserver's own audiences"
    );
    Ok(())
}
