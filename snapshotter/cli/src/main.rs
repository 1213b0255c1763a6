//! `streamsnap`: the command line. Converts images into streaming artifacts (locally, or as
//! operations of the conversion service, which `serve` runs), inspects what a registry holds,
//! and pulls images through containerd's CRI image service on a node.

mod create;
mod list_referrers;
mod node;
mod operation;
mod output;
mod profile;
mod pull;
mod registry_args;
mod remote;
mod serve;
mod service_args;
mod signing;
mod streaming;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "streamsnap",
    version,
    about = "Artifact streaming for container images"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug; `serve` logs at info without it).
    /// STREAMSNAP_LOG=<filter> (e.g. debug or streamsnap_registry=trace) overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Streaming artifacts: create them from images, locally or through the conversion
    /// service; repository streaming states and operations (service only).
    ArtifactStreaming(ArtifactStreamingArgs),
    /// Manifests in a registry.
    #[command(subcommand)]
    Manifest(Manifest),
    /// Pull an image through containerd's CRI image service, as the kubelet does, so a remote
    /// snapshotter gets the labels it needs to mount the layers lazily.
    Pull(pull::Args),
    /// Run the conversion service for one registry: HTTP API, registry webhook, operations.
    Serve(serve::Args),
    /// Set up a node for the snapshotter: patch or restore containerd's config, or run the
    /// daemon the way the Kubernetes DaemonSet does.
    #[command(subcommand)]
    Node(node::Verb),
}

#[derive(Debug, clap::Args)]
struct ArtifactStreamingArgs {
    #[command(flatten)]
    server: service_args::ServerArgs,
    #[command(subcommand)]
    verb: ArtifactStreaming,
}

#[derive(Debug, Subcommand)]
enum ArtifactStreaming {
    /// Convert a linux/amd64 image into a streaming artifact and push it as an OCI referrer
    /// (with --server: start a conversion operation on the service and wait for it).
    Create(create::Args),
    /// Attach a start-up profile (recorded by a node, see /debug/profile) to an image with a
    /// streaming artifact: nodes then fetch the chunks its start-up reads as soon as they mount
    /// it, in a few large requests.
    Profile(profile::Args),
    /// Set a repository's streaming state (Active repositories convert newly pushed images)
    /// and the artifact kind its conversions make.
    Update(streaming::UpdateArgs),
    /// Show repository streaming states, artifact kinds and operation counts.
    Show(streaming::ShowArgs),
    /// Conversion operations: show or cancel one.
    #[command(subcommand)]
    Operation(Operation),
}

#[derive(Debug, Subcommand)]
enum Operation {
    /// Show an operation's state, progress and error.
    Show(operation::ShowArgs),
    /// Stop an operation; a canceled operation leaves no streaming artifact.
    Cancel(operation::CancelArgs),
}

#[derive(Debug, Subcommand)]
enum Manifest {
    /// List the referrers of an image manifest (OCI referrers API, or the fallback tag).
    ListReferrers(list_referrers::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs what it does by default; the other commands only warnings.
    let verbose = match cli.command {
        Command::Serve(_) => cli.verbose.max(1),
        _ => cli.verbose,
    };
    init_logging(verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::ArtifactStreaming(ArtifactStreamingArgs { server, verb }) => match verb {
                ArtifactStreaming::Create(args) => create::run(args, &server).await,
                ArtifactStreaming::Profile(args) => profile::run(args, &server).await,
                ArtifactStreaming::Update(args) => streaming::update(args, &server).await,
                ArtifactStreaming::Show(args) => streaming::show(args, &server).await,
                ArtifactStreaming::Operation(Operation::Show(args)) => {
                    operation::show(args, &server).await
                }
                ArtifactStreaming::Operation(Operation::Cancel(args)) => {
                    operation::cancel(args, &server).await
                }
            },
            Command::Manifest(Manifest::ListReferrers(args)) => list_referrers::run(args).await,
            Command::Pull(args) => pull::run(args).await,
            Command::Serve(args) => serve::run(args).await,
            Command::Node(verb) => node::run(verb).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", output::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let default = match verbose {
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        2 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    let spec = std::env::var("STREAMSNAP_LOG")
        .ok()
        .filter(|s| !s.is_empty());
    let parsed = spec.as_deref().map(streamsnap_log::parse_filter);
    let filter = match &parsed {
        Some(Some(targets)) => targets.clone(),
        _ => Targets::new().with_default(default),
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(streamsnap_log::colour_on_stderr())
                .with_target(false),
        )
        .with(filter)
        .init();
    if let (Some(spec), Some(None)) = (spec, parsed) {
        tracing::warn!(
            "STREAMSNAP_LOG={spec:?} is not a log filter (write a level such as info or debug, \
             or target=level pairs separated by commas): ignored"
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every command and every flag of every subcommand, however deep, says what it is.
    #[test]
    fn every_command_and_flag_has_a_help_text() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", command.get_name()).trim().to_owned();
            if command
                .get_about()
                .is_none_or(|a| a.to_string().trim().is_empty())
            {
                missing.push(format!("`{path}` has no about text"));
            }
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg
                    .get_help()
                    .is_none_or(|h| h.to_string().trim().is_empty())
                {
                    missing.push(format!("`{path}` --{id} has no help text"));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &path, missing);
                }
            }
        }
        let command = Cli::command();
        command.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&command, "", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
