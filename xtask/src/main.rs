//! Developer tasks for Weft: `cargo xtask <task>`.

mod bench;
mod cluster;
mod codegen;
mod demo;
mod h2spec;
mod images;
mod packages;
mod test;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Weft developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Write crds/*.yaml and the chart's CRD templates from the weft-api types.
    Codegen {
        /// Fail instead of writing when a generated file is stale.
        #[arg(long)]
        check: bool,
    },
    /// Run the local Kubernetes control plane used by the tests and the demo.
    Cluster {
        #[command(subcommand)]
        command: cluster::Command,
    },
    /// The main job, as far as it runs today: start the local cluster and show Weft's API at work.
    Demo,
    /// Build the test node's container images (operator, webhook, proxy, demo, pause, coredns)
    /// from this host's files, write their Helm values, and import them into the node's
    /// containerd when it runs.
    Images {
        /// Only build; do not import into the node's containerd.
        #[arg(long)]
        no_import: bool,
    },
    /// Run a benchmark (release build); see BENCHMARKS.md.
    Bench {
        #[command(subcommand)]
        which: bench::Bench,
    },
    /// Install h2spec (pinned in xtask/tools/h2spec/go.mod) for the proxy's HTTP/2 conformance
    /// test, once, and print its path. `cargo xtask test` does this first.
    H2spec,
    /// Run every test: build the cluster binaries if missing, start the cluster,
    /// run `cargo test --workspace` against it, and stop it again.
    Test {
        /// Extra arguments passed to `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Errors are printed plainly: these are expected outcomes (a stale file, a failed test),
    // not crashes, so no backtrace even when RUST_BACKTRACE is set.
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Codegen { check } => codegen::run(check),
        Task::Demo => demo::run(),
        Task::Bench { which } => bench::run(which),
        Task::Images { no_import } => images::run(no_import),
        Task::Cluster { command } => cluster::run(command),
        Task::H2spec => h2spec::install().map(|bin| println!("{}", bin.display())),
        Task::Test { cargo_args } => test::run(&cargo_args),
    }
}
