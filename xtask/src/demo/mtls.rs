//! The demo's mTLS step: two proxies in this process, like the sidecars of `productpage` and
//! `reviews`, with certificates from a fresh root. A request crosses the pair; the server's
//! proxy names the client's SPIFFE ID in its metrics; a client that expects another identity
//! gets no byte through.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, ensure};
use weft_identity::{SpiffeId, ca::Issuer};
use weft_proxy::{
    Settings,
    settings::ExplicitListener,
    settings::{IdentityFiles, IdentitySource},
};

const TRUST_DOMAIN: &str = "cluster.local";
const DAY: Duration = Duration::from_secs(86_400);

pub(crate) async fn show(scratch: &Path) -> Result<()> {
    std::fs::create_dir_all(scratch)?;
    let issuer = Issuer::new_root(TRUST_DOMAIN, SystemTime::now(), DAY)?;
    let app = weft_e2e::http::serve_ok("reviews v1\n").await?;
    let reviews = id("reviews")?;

    let server_config = format!(
        "services:\n  - name: reviews\n    ports: [{{number: 9080, endpoints: [{{address: \"{app}\"}}]}}]\n"
    );
    let server = proxy(scratch, "reviews", &issuer, &server_config).await?;
    let endpoint = |expect: &SpiffeId| {
        format!(
            "services:\n  - name: reviews\n    ports: [{{number: 9080, endpoints: [{{address: \"{}\", identity: \"{expect}\", workload: reviews}}]}}]\n",
            server.explicit_addrs[0]
        )
    };
    let client = proxy(scratch, "productpage", &issuer, &endpoint(&reviews)).await?;

    let (status, body) = get(client.explicit_addrs[0]).await?;
    ensure!(status == 200, "the request through the pair got {status}: {body}");
    println!("   productpage -> its proxy -> mTLS -> reviews' proxy -> reviews: {status} {}", body.trim());
    let (_, metrics) = weft_e2e::http::get(server.admin_addr, "admin", "/metrics").await?;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("weft_requests_total{") && l.contains("tls=\"true\""))
        .context("the server proxy counted no mTLS request")?;
    println!("   reviews' proxy counted it: {line}");

    let wrong = proxy(scratch, "productpage-expects-ratings", &issuer, &endpoint(&id("ratings")?)).await?;
    let (status, body) = get(wrong.explicit_addrs[0]).await?;
    ensure!(status == 503, "a proxy expecting `ratings` reached `reviews`: {status} {body}");
    println!(
        "   a proxy whose config expects `ratings` instead: {status} {} (the handshake refused reviews' certificate)",
        body.trim()
    );
    for handle in [&client, &wrong, &server] {
        handle.shutdown();
        handle.wait().await;
    }
    Ok(())
}

fn id(service_account: &str) -> Result<SpiffeId> {
    Ok(SpiffeId::new(TRUST_DOMAIN, "weft-demo", service_account)?)
}

/// A proxy on loopback with an identity for `service_account` from `issuer`.
async fn proxy(scratch: &Path, name: &str, issuer: &Issuer, config: &str) -> Result<weft_proxy::Handle> {
    let dir = scratch.join(name);
    std::fs::create_dir_all(&dir)?;
    let service_account = name.split('-').next().unwrap_or(name);
    let issued = issuer.issue(&id(service_account)?, SystemTime::now(), DAY)?;
    let files = IdentityFiles::write(&dir, &issued.cert_pem, &issued.key_pem, issuer.root_pem())?;
    std::fs::write(dir.join("config.yaml"), config)?;
    let mut settings = Settings::loopback(dir.join("config.yaml"));
    settings.explicit = vec![ExplicitListener { addr: SocketAddr::from(([127, 0, 0, 1], 0)), target: None }];
    settings.identity = Some(IdentitySource::Files(files));
    settings.workload = service_account.into();
    settings.namespace = "weft-demo".into();
    Ok(weft_proxy::start(settings).await?)
}

/// `GET /reviews/1` for `reviews` through a proxy: the status and body.
async fn get(proxy: SocketAddr) -> Result<(u16, String)> {
    Ok(weft_e2e::http::get(proxy, "reviews", "/reviews/1").await?)
}
