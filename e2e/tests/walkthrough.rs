//! The demo walkthrough (`cargo xtask demo`) as a test on the real node: every step applies
//! its Istio YAML to the meshed demo apps, measures real requests and must get the numbers its
//! YAML asked for (`weft_e2e::walkthrough`; the tolerances are in `walkthrough/expect.rs`).
//!
//! One test, because the steps share one installation of the chart and run in order; each
//! step's outcome is reported on its own. Needs the test cluster with its node and the images:
//! `cargo xtask test` does both; by hand, `cargo xtask cluster up && cargo xtask images`.

use anyhow::{Result, ensure};
use weft_e2e::{
    TestCluster, mesh,
    walkthrough::{self, Walkthrough},
    webhook::enable_injection,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_of_the_demo_measures_what_its_yaml_asked_for() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let images = mesh::built_images()?;
    mesh::install(&client, &images, walkthrough::HELM_SETS).await?;
    let meshed = cluster.namespace("demo").await?;
    let outside = cluster.namespace("demo-outside").await?;
    enable_injection(&client, meshed.name()).await?;

    let walk = Walkthrough::new(client, meshed.name(), outside.name(), say, false);
    let walked = walk.run(&images).await;
    // The chart is cluster-wide: later test binaries must not find its webhook.
    mesh::uninstall()?;
    let outcomes = walked?;
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.problems.is_empty())
        .map(|o| format!("{}: {}", o.title, o.problems.join("; ")))
        .collect();
    ensure!(outcomes.len() == 12, "the walkthrough ran {} steps, expected 12", outcomes.len());
    ensure!(failed.is_empty(), "steps measured something else than asked:\n{}", failed.join("\n"));
    Ok(())
}

fn say(line: &str) {
    eprintln!("[walkthrough] {line}");
}
