//! `weftctl`: Weft's command line.

mod inject;

use std::{
    fs,
    io::{self, Read, Write},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use weft_inject::InjectConfig;

#[derive(Debug, Parser)]
#[command(name = "weftctl", version, about = "Weft service mesh command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add Weft's proxy to the pods of Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets,
    /// Jobs and CronJobs in a multi-document YAML stream, exactly as the webhook would; other
    /// objects pass through. Writes the result to stdout and a report to stderr.
    Inject {
        /// The manifests: a file, or `-` for stdin.
        #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
        file: String,
        /// Injection settings (the webhook's YAML configuration); defaults when absent.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inject { file, config } => {
            let config = InjectConfig::load(config.as_deref())?;
            let input = if file == "-" {
                let mut text = String::new();
                io::stdin().read_to_string(&mut text).context("reading stdin")?;
                text
            } else {
                fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let (output, outcomes) = inject::inject_stream(&input, &config)?;
            io::stdout().write_all(output.as_bytes())?;
            for outcome in outcomes {
                eprintln!("{}: {}", outcome.object, outcome.result);
            }
            Ok(())
        }
    }
}
