//! `streamsnap artifact-streaming operation show|cancel`, and how operations are printed.

use anyhow::{Context, bail};
use streamsnap_service::api::{Operation, OperationState};

use crate::output::{Format, human_bytes, plural, table};
use crate::service_args::{ServerArgs, split_image};

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The image whose newest operation to show: REPOSITORY:TAG or REPOSITORY@DIGEST (a tag is
    /// resolved to the manifest it names now).
    #[arg(long, conflicts_with_all = ["repository", "id"], required_unless_present = "id")]
    image: Option<String>,
    /// Repository of the operation (with --id).
    #[arg(long, requires = "id")]
    repository: Option<String>,
    /// Operation ID (with --repository), as `create` or `operation show` printed it.
    #[arg(long, requires = "repository")]
    id: Option<String>,
    /// text: the operation as a two-column table; json: the API's operation object.
    #[arg(long, value_enum, default_value_t)]
    output: Format,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// Repository of the operation, relative to the service's registry (e.g. team/app).
    #[arg(long)]
    repository: String,
    /// Operation ID, as `create` or `operation show` printed it.
    #[arg(long)]
    id: String,
    /// text: one line saying whether it is canceled or still stopping; json: the API's
    /// operation object.
    #[arg(long, value_enum, default_value_t)]
    output: Format,
}

pub async fn show(args: ShowArgs, server: &ServerArgs) -> anyhow::Result<()> {
    let client = server.require("operation show")?;
    let op = match (&args.image, &args.repository, &args.id) {
        (Some(image), _, _) => {
            let (repository, reference) = split_image(image)?;
            let ops = client
                .operations(&repository, Some(&reference))
                .await
                .with_context(|| format!("listing the operations of {image}"))?;
            match ops.into_iter().next() {
                Some(op) => op,
                None => bail!(
                    "{image} has no operation: start one with `streamsnap artifact-streaming \
                     create --image {image}`"
                ),
            }
        }
        (None, Some(repository), Some(id)) => client
            .operation(repository, id)
            .await
            .with_context(|| format!("reading operation {id}"))?,
        _ => bail!("pass --image, or --repository and --id"),
    };
    print(&op, args.output)
}

pub async fn cancel(args: CancelArgs, server: &ServerArgs) -> anyhow::Result<()> {
    let client = server.require("operation cancel")?;
    let op = client
        .cancel_operation(&args.repository, &args.id)
        .await
        .with_context(|| format!("canceling operation {}", args.id))?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&op)?),
        Format::Text if op.state.is_terminal() => println!("operation {} {}", op.id, op.state),
        Format::Text => println!(
            "operation {}: cancel requested, it is stopping (see `operation show`)",
            op.id
        ),
    }
    Ok(())
}

/// One operation: JSON, or a two-column table.
pub fn print(op: &Operation, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(op)?),
        Format::Text => print!("{}", details(op)),
    }
    Ok(())
}

fn details(op: &Operation) -> String {
    let mut rows = vec![
        vec!["ID".to_owned(), op.id.clone()],
        vec!["IMAGE".to_owned(), op.image()],
        vec!["MANIFEST".to_owned(), op.manifest_digest.to_string()],
        vec!["STATE".to_owned(), op.state.to_string()],
        vec!["PROGRESS".to_owned(), progress(op)],
    ];
    if let Some(error) = &op.error {
        rows.push(vec!["ERROR".to_owned(), error.clone()]);
    }
    if let Some(artifact) = &op.artifact_digest {
        rows.push(vec!["ARTIFACT".to_owned(), artifact.to_string()]);
    }
    if let Some(kind) = op.kind {
        rows.push(vec!["KIND".to_owned(), kind.to_string()]);
    }
    if let Some(subject) = op.subject_digest.filter(|s| *s != op.manifest_digest) {
        rows.push(vec!["SUBJECT".to_owned(), subject.to_string()]);
    }
    if op.interruptions > 0 {
        rows.push(vec![
            "INTERRUPTED".to_owned(),
            format!(
                "{} by a service stop, resumed",
                plural(u64::from(op.interruptions), "time")
            ),
        ]);
    }
    rows.push(vec![
        "TRIGGER".to_owned(),
        format!("{:?}", op.trigger).to_lowercase(),
    ]);
    rows.push(vec!["CREATED".to_owned(), op.created.to_string()]);
    rows.push(vec!["UPDATED".to_owned(), op.updated.to_string()]);
    table(&rows)
}

/// `12.0 MB / 40.0 MB (30%)`, or `-` before the size is known.
pub fn progress(op: &Operation) -> String {
    let p = op.progress;
    if p.total == 0 {
        return if op.state == OperationState::Succeeded {
            "100%".to_owned()
        } else {
            "-".to_owned()
        };
    }
    format!(
        "{} / {} ({}%)",
        human_bytes(p.done),
        human_bytes(p.total),
        p.done.min(p.total) * 100 / p.total
    )
}

/// Operations as a table, newest first.
pub fn list(ops: &[Operation]) -> String {
    let mut rows = vec![vec![
        "ID".to_owned(),
        "IMAGE".to_owned(),
        "STATE".to_owned(),
        "PROGRESS".to_owned(),
        "UPDATED".to_owned(),
    ]];
    rows.extend(ops.iter().map(|op| {
        vec![
            op.id.clone(),
            op.image(),
            op.state.to_string(),
            progress(op),
            op.updated.to_string(),
        ]
    }));
    table(&rows)
}
