//! `weftctl identity <pod>`: the SPIFFE ID a pod's proxy presents, who issued it, how long it is
//! valid, when it is renewed, and the roots it trusts (the proxy's `/identity`).

use std::time::SystemTime;

use kube::Client;
use weft_proxy::admin::IdentityReport;

use crate::{
    cluster::{self, admin_get},
    output::{table, when},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    #[error("/identity of {pod}: {source}")]
    Decode { pod: String, source: serde_json::Error },
}

pub async fn fetch(client: &Client, namespace: &str, pod: &str) -> Result<IdentityReport, Error> {
    cluster::meshed_pod(client, namespace, pod).await?;
    // 503 (no identity yet) still carries the report; the apiserver passes its body on as the
    // error's message.
    let text = match admin_get(client, namespace, pod, "/identity").await {
        Ok(text) => text,
        Err(cluster::Error::Api { source: kube::Error::Api(status), .. }) if status.code == 503 => {
            status.message
        }
        Err(e) => return Err(e.into()),
    };
    serde_json::from_str(&text).map_err(|source| Error::Decode { pod: format!("{namespace}/{pod}"), source })
}

pub fn render_table(report: &IdentityReport, now: SystemTime) -> String {
    let mut out = String::new();
    match (&report.identity, &report.certificate) {
        (Some(id), Some(cert)) => {
            out += &format!("identity:     {id}\n");
            out += &format!("issuer:       {}\n", cert.issuer);
            out += &format!("serial:       {}\n", cert.serial);
            out += &format!("valid from:   {}\n", when(cert.not_before_unix_seconds, now));
            out += &format!("valid until:  {}\n", when(cert.not_after_unix_seconds, now));
            out += &format!("chain:        {} certificate(s)\n", report.chain_length);
        }
        _ => {
            out += "identity:     none (no certificate yet, or it expired: the proxy refuses mesh traffic)\n"
        }
    }
    let renewal =
        report.next_renewal_unix_seconds.map_or_else(|| "never (from files)".into(), |t| when(t, now));
    out += &format!("next renewal: {renewal}\n");
    let roots: Vec<[String; 2]> = report
        .trust_bundle
        .iter()
        .map(|r| [r.subject.clone(), when(r.not_after_unix_seconds, now)])
        .collect();
    out += &format!("\nTRUSTED ROOTS ({})\n", roots.len());
    out += &table(["SUBJECT", "EXPIRES"], &roots);
    out
}
