//! `streamsnap artifact-streaming update` and `show`: repository streaming states and
//! artifact kinds.

use anyhow::{Context, bail};
use streamsnap_service::api::{
    ArtifactKind, OperationState, Repository, Streaming, UpdateRepository,
};

use crate::operation;
use crate::output::{Format, table};
use crate::service_args::ServerArgs;

#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// Repository, relative to the service's registry (e.g. team/app).
    #[arg(long)]
    repository: String,
    /// true: newly pushed images in the repository are converted; false: they are not (the
    /// artifacts already made stay) [default: unchanged].
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    enable_streaming: Option<bool>,
    /// What the repository's conversions started from now on make: chunked (a copy of the
    /// content in zstd chunks) or index (an index over the original gzip layers, no second
    /// copy; gzip layers only) [default: unchanged; chunked for a new repository].
    #[arg(long, value_name = "KIND", value_parser = ["chunked", "index"])]
    kind: Option<String>,
    /// text: a table of the repository's state, kind and operation counts; json: the API's
    /// repository object.
    #[arg(long, value_enum, default_value_t)]
    output: Format,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Only this repository, with its operations [default: every repository the service knows].
    #[arg(long)]
    repository: Option<String>,
    /// text: a table of states, kinds and operation counts (and, with --repository, its
    /// operations); json: the API's repository object(s).
    #[arg(long, value_enum, default_value_t)]
    output: Format,
}

pub async fn update(args: UpdateArgs, server: &ServerArgs) -> anyhow::Result<()> {
    if args.enable_streaming.is_none() && args.kind.is_none() {
        bail!(
            "nothing to update: pass --enable-streaming true|false, --kind chunked|index, or both"
        );
    }
    let client = server.require("update")?;
    let update = UpdateRepository {
        streaming: args.enable_streaming.map(|enable| {
            if enable {
                Streaming::Active
            } else {
                Streaming::Inactive
            }
        }),
        kind: args
            .kind
            .as_deref()
            .map(str::parse::<ArtifactKind>)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    };
    let repo = client
        .update_repository(&args.repository, &update)
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
    let mut header = vec![
        "REPOSITORY".to_owned(),
        "STREAMING".to_owned(),
        "KIND".to_owned(),
    ];
    header.extend(
        OperationState::ALL
            .iter()
            .map(|s| s.to_string().to_uppercase()),
    );
    let mut rows = vec![header];
    rows.extend(repos.iter().map(|r| {
        let mut row = vec![r.name.clone(), r.streaming.to_string(), r.kind.to_string()];
        row.extend(
            OperationState::ALL
                .iter()
                .map(|s| r.operations.get(*s).to_string()),
        );
        row
    }));
    table(&rows)
}
