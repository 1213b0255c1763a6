//! `streamsnap artifact-streaming update` and `show`: repository streaming states.

use anyhow::Context;
use streamsnap_service::api::{OperationState, Repository, Streaming};

use crate::operation;
use crate::output::{Format, table};
use crate::service_args::ServerArgs;

#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// Repository, relative to the service's registry (e.g. team/app).
    #[arg(long)]
    repository: String,
    /// true: newly pushed images in the repository are converted; false: they are not (the
    /// artifacts already made stay).
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    enable_streaming: bool,
    /// text: a table of the repository's state and operation counts; json: the API's
    /// repository object.
    #[arg(long, value_enum, default_value_t)]
    output: Format,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Only this repository, with its operations [default: every repository the service knows].
    #[arg(long)]
    repository: Option<String>,
    /// text: a table of states and operation counts (and, with --repository, its
    /// operations); json: the API's repository object(s).
    #[arg(long, value_enum, default_value_t)]
    output: Format,
}

pub async fn update(args: UpdateArgs, server: &ServerArgs) -> anyhow::Result<()> {
    let client = server.require("update")?;
    let streaming = if args.enable_streaming {
        Streaming::Active
    } else {
        Streaming::Inactive
    };
    let repo = client
        .set_streaming(&args.repository, streaming)
        .await
        .with_context(|| format!("updating {}", args.repository))?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&repo)?),
        Format::Text => print!("{}", repositories(&[repo])),
    }
    Ok(())
}

pub async fn show(args: ShowArgs, server: &ServerArgs) -> anyhow::Result<()> {
    let client = server.require("show")?;
    match &args.repository {
        None => {
            let repos = client
                .repositories()
                .await
                .context("listing repositories")?;
            match args.output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&repos)?),
                Format::Text => print!("{}", repositories(&repos)),
            }
        }
        Some(name) => {
            let repo = client
                .repository(name)
                .await
                .with_context(|| format!("reading {name}"))?;
            match args.output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&repo)?),
                Format::Text => {
                    print!("{}", repositories(std::slice::from_ref(&repo)));
                    let ops = client
                        .operations(name, None)
                        .await
                        .with_context(|| format!("listing the operations of {name}"))?;
                    if !ops.is_empty() {
                        println!();
                        print!("{}", operation::list(&ops));
                    }
                }
            }
        }
    }
    Ok(())
}

fn repositories(repos: &[Repository]) -> String {
    let mut header = vec!["REPOSITORY".to_owned(), "STREAMING".to_owned()];
    header.extend(
        OperationState::ALL
            .iter()
            .map(|s| s.to_string().to_uppercase()),
    );
    let mut rows = vec![header];
    rows.extend(repos.iter().map(|r| {
        let mut row = vec![r.name.clone(), r.streaming.to_string()];
        row.extend(
            OperationState::ALL
                .iter()
                .map(|s| r.operations.get(*s).to_string()),
        );
        row
    }));
    table(&rows)
}
