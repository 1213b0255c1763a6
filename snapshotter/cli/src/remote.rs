//! `streamsnap artifact-streaming create --server URL`: start an operation on the service, and
//! wait for it unless `--no-wait`.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};
use streamsnap_service::ServiceClient;
use streamsnap_service::api::{CreateOperation, Operation, OperationState};

use crate::operation;
use crate::output::Format;
use crate::service_args::split_image;

/// How often a waiting `create` asks for the operation's state.
const POLL: Duration = Duration::from_millis(500);

pub struct Request<'a> {
    pub image: &'a str,
    pub force: bool,
    pub chunk_size: Option<u32>,
    pub compression_level: Option<i32>,
    pub no_wait: bool,
    pub output: Format,
}

pub async fn create(client: &ServiceClient, request: Request<'_>) -> anyhow::Result<()> {
    let (repository, reference) = split_image(request.image)?;
    let body = CreateOperation {
        reference,
        force: request.force,
        chunk_size: request.chunk_size,
        compression_level: request.compression_level,
    };
    let (op, new) = client
        .create_operation(&repository, &body)
        .await
        .with_context(|| format!("starting the conversion of {}", request.image))?;
    if request.output == Format::Text {
        if new {
            println!(
                "operation {} started for {} ({})",
                op.id,
                op.image(),
                op.manifest_digest
            );
        } else {
            println!(
                "operation {} for {} exists already ({}): not starting another{}",
                op.id,
                op.image(),
                op.state,
                if op.state == OperationState::Succeeded {
                    " (use --force to convert again)"
                } else {
                    ""
                }
            );
        }
    }
    if request.no_wait {
        if request.output == Format::Json {
            println!("{}", serde_json::to_string_pretty(&op)?);
        }
        return Ok(());
    }
    let op = wait(client, &repository, op).await?;
    match request.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&op)?),
        Format::Text => operation::print(&op, Format::Text)?,
    }
    match op.state {
        OperationState::Succeeded => Ok(()),
        state => bail!(
            "operation {} {state}: {}",
            op.id,
            op.error.as_deref().unwrap_or("no reason given")
        ),
    }
}

/// Polls until the operation is in a terminal state, drawing a progress bar on a terminal.
async fn wait(
    client: &ServiceClient,
    repository: &str,
    mut op: Operation,
) -> anyhow::Result<Operation> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} eta {eta}",
            )
            .expect("progress template is valid")
            .progress_chars("=> "),
        );
        bar
    });
    while !op.state.is_terminal() {
        if let Some(bar) = &bar {
            bar.set_message(op.state.to_string());
            bar.set_length(op.progress.total);
            bar.set_position(op.progress.done);
        }
        tokio::time::sleep(POLL).await;
        op = client
            .operation(repository, &op.id)
            .await
            .with_context(|| format!("reading operation {}", op.id))?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(op)
}
