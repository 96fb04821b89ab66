//! The cluster edge of weftctl: a client from the kubeconfig kubectl would use, pods named on
//! the command line, and a proxy's admin port reached through the apiserver's pod proxy (so
//! nothing but apiserver access is needed, as with `kubectl`).

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use serde::de::DeserializeOwned;

/// The proxy's admin port (`/config`, `/identity`, `/metrics`).
pub const ADMIN_PORT: u16 = 15000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cluster to talk to (kubeconfig or in-cluster config): {0}")]
    Connect(#[source] kube::Error),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("{what}: the answer is not what weftctl expects: {source}")]
    Decode { what: String, source: serde_json::Error },
    #[error("pod {namespace}/{name} has no Weft proxy (it is not injected)")]
    NotMeshed { namespace: String, name: String },
}

/// A client for the cluster kubectl would talk to (`KUBECONFIG`, `~/.kube/config`, or in-cluster),
/// and that config's default namespace.
pub async fn connect() -> Result<(Client, String), Error> {
    let config = kube::Config::infer().await.map_err(|e| Error::Connect(kube::Error::InferConfig(e)))?;
    let namespace = config.default_namespace.clone();
    Ok((Client::try_from(config).map_err(Error::Connect)?, namespace))
}

/// `ns/name` or `name` (in `namespace`).
pub fn split_name<'a>(arg: &'a str, namespace: &'a str) -> (&'a str, &'a str) {
    arg.split_once('/').unwrap_or((namespace, arg))
}

/// The pod, which must run Weft's proxy.
pub async fn meshed_pod(client: &Client, namespace: &str, name: &str) -> Result<Pod, Error> {
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|source| Error::Api { what: format!("getting pod {namespace}/{name}"), source })?;
    let spec = pod.spec.as_ref();
    let containers =
        spec.into_iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
    if !containers.into_iter().any(|c| c.name == weft_inject::PROXY_CONTAINER) {
        return Err(Error::NotMeshed { namespace: namespace.into(), name: name.into() });
    }
    Ok(pod)
}

/// GET `path` on a pod's proxy admin port, through the apiserver.
pub async fn admin_get(client: &Client, namespace: &str, pod: &str, path: &str) -> Result<String, Error> {
    let uri = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{ADMIN_PORT}/proxy{path}");
    let request = http::Request::get(&uri).body(Vec::new()).expect("a valid request");
    client.request_text(request).await.map_err(|source| Error::Api {
        what: format!("GET {path} from the proxy of {namespace}/{pod}"),
        source,
    })
}

/// [`admin_get`], decoded from JSON.
pub async fn admin_json<T: DeserializeOwned>(
    client: &Client,
    namespace: &str,
    pod: &str,
    path: &str,
) -> Result<T, Error> {
    let text = admin_get(client, namespace, pod, path).await?;
    serde_json::from_str(&text)
        .map_err(|source| Error::Decode { what: format!("{path} of {namespace}/{pod}"), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_take_their_namespace_when_they_carry_one() {
        assert_eq!(split_name("shop/web", "default"), ("shop", "web"));
        assert_eq!(split_name("web", "default"), ("default", "web"));
    }
}
