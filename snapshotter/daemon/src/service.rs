//! The gRPC boundary: containerd's Snapshots API onto [`Snapshotter`], and domain errors onto
//! the status codes containerd acts on.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use containerd_client::services::v1::snapshots::{
    self as pb, CleanupRequest, CommitSnapshotRequest, ListSnapshotsRequest, ListSnapshotsResponse,
    MountsRequest, MountsResponse, PrepareSnapshotRequest, PrepareSnapshotResponse,
    RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse, UpdateSnapshotRequest,
    UpdateSnapshotResponse, UsageRequest, UsageResponse, ViewSnapshotRequest, ViewSnapshotResponse,
};
use containerd_client::types::Mount as PbMount;
use futures_util::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::snapshotter::{Info, Mount, Snapshotter};
use crate::store::{Kind, Timestamp};

/// Items of a List reply are sent in batches of this many.
const LIST_BATCH: usize = 100;

#[derive(Debug, Clone)]
pub struct Service {
    snapshotter: Arc<Snapshotter>,
    metrics: Metrics,
}

impl Service {
    pub fn new(snapshotter: Arc<Snapshotter>, metrics: Metrics) -> Self {
        Self {
            snapshotter,
            metrics,
        }
    }

    /// Runs one call, recording its duration and, if it fails, its gRPC code.
    async fn observed<T>(
        &self,
        method: &'static str,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = std::time::Instant::now();
        // One span per call: everything the call logs (registry requests, mounts) nests in it.
        let result = call.instrument(tracing::debug_span!("rpc", method)).await;
        self.metrics
            .rpc_duration
            .with_label_values(&[method])
            .observe(started.elapsed().as_secs_f64());
        if let Err(status) = &result {
            let code = format!("{:?}", status.code());
            self.metrics
                .rpc_errors
                .with_label_values(&[method, &code])
                .inc();
        }
        result
    }

    pub fn into_server(self) -> crate::api::snapshots_server::SnapshotsServer<Self> {
        crate::api::snapshots_server::SnapshotsServer::new(self)
    }
}

/// The status containerd expects for each error kind.
pub fn status(error: &Error) -> Status {
    let message = crate::error::chain(error);
    match error {
        Error::NotFound { .. } => Status::not_found(message),
        Error::AlreadyExists { .. } => Status::already_exists(message),
        Error::FailedPrecondition(_) => Status::failed_precondition(message),
        Error::InvalidArgument(_) => Status::invalid_argument(message),
        Error::Store { .. } | Error::Record { .. } | Error::Io { .. } | Error::Remote(_) => {
            Status::internal(message)
        }
    }
}

fn parent(parent: &str) -> Option<&str> {
    (!parent.is_empty()).then_some(parent)
}

fn labels(labels: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

fn mounts(mounts: Vec<Mount>) -> Vec<PbMount> {
    mounts
        .into_iter()
        .map(|m| PbMount {
            r#type: m.kind,
            source: m.source,
            options: m.options,
            ..Default::default()
        })
        .collect()
}

fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.seconds,
        nanos: t.nanos,
    }
}

fn info(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        kind: match info.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(info.created)),
        updated_at: Some(timestamp(info.updated)),
        labels: info.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

impl Service {
    async fn prepare_call(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let span = tracing::debug_span!("prepare", key = r.key, parent = r.parent);
        let result = self
            .snapshotter
            .prepare(&r.key, parent(&r.parent), labels(r.labels))
            .instrument(span)
            .await;
        match result {
            Ok(m) => Ok(Response::new(PrepareSnapshotResponse { mounts: mounts(m) })),
            Err(error) => {
                if !matches!(error, Error::AlreadyExists { .. }) {
                    tracing::warn!(key = r.key, error = %crate::error::chain(&error), "prepare failed");
                }
                Err(status(&error))
            }
        }
    }

    async fn view_call(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        tracing::debug!(request = ?request.get_ref(), "view");
        let r = request.into_inner();
        let m = self
            .snapshotter
            .view(&r.key, parent(&r.parent), labels(r.labels))
            .map_err(|e| status(&e))?;
        Ok(Response::new(ViewSnapshotResponse { mounts: mounts(m) }))
    }

    async fn mounts_call(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        tracing::debug!(request = ?request.get_ref(), "mounts");
        let m = self
            .snapshotter
            .mounts(&request.into_inner().key)
            .map_err(|e| status(&e))?;
        Ok(Response::new(MountsResponse { mounts: mounts(m) }))
    }

    async fn commit_call(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        tracing::debug!(request = ?request.get_ref(), "commit");
        let r = request.into_inner();
        self.snapshotter
            .commit(&r.name, &r.key, labels(r.labels))
            .map_err(|e| status(&e))?;
        Ok(Response::new(()))
    }

    async fn remove_call(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        tracing::debug!(request = ?request.get_ref(), "remove");
        self.snapshotter
            .remove(&request.into_inner().key)
            .map_err(|e| status(&e))?;
        Ok(Response::new(()))
    }

    async fn stat_call(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        tracing::debug!(request = ?request.get_ref(), "stat");
        let i = self
            .snapshotter
            .stat(&request.into_inner().key)
            .map_err(|e| status(&e))?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update_call(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        tracing::debug!(request = ?request.get_ref(), "update");
        let r = request.into_inner();
        let given = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let i = self
            .snapshotter
            .update(&given.name, labels(given.labels), &paths)
            .map_err(|e| status(&e))?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn list_call(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        tracing::debug!(request = ?request.get_ref(), "list");
        let infos = self
            .snapshotter
            .list(&request.into_inner().filters)
            .map_err(|e| status(&e))?;
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|batch| {
                Ok(ListSnapshotsResponse {
                    info: batch.iter().cloned().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(batches))))
    }

    async fn usage_call(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        tracing::debug!(request = ?request.get_ref(), "usage");
        let u = self
            .snapshotter
            .usage(&request.into_inner().key)
            .map_err(|e| status(&e))?;
        Ok(Response::new(UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup_call(&self, request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        tracing::debug!(request = ?request.get_ref(), "cleanup");
        self.snapshotter.cleanup().map_err(|e| status(&e))?;
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl crate::api::snapshots_server::Snapshots for Service {
    type ListStream = ListStream;

    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        self.observed("prepare", self.prepare_call(request)).await
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        self.observed("view", self.view_call(request)).await
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        self.observed("mounts", self.mounts_call(request)).await
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        self.observed("commit", self.commit_call(request)).await
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        self.observed("remove", self.remove_call(request)).await
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        self.observed("stat", self.stat_call(request)).await
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        self.observed("update", self.update_call(request)).await
    }

    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        self.observed("list", self.list_call(request)).await
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        self.observed("usage", self.usage_call(request)).await
    }

    async fn cleanup(&self, request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.observed("cleanup", self.cleanup_call(request)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_codes_containerd_acts_on() {
        let code = |e: Error| status(&e).code();
        assert_eq!(
            code(Error::NotFound { key: "k".into() }),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(Error::AlreadyExists { key: "k".into() }),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            code(Error::FailedPrecondition("x".into())),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(Error::InvalidArgument("x".into())),
            tonic::Code::InvalidArgument
        );
        let io = Error::Io {
            action: "reading",
            path: "/x".into(),
            source: std::io::Error::other("boom"),
        };
        assert_eq!(code(io), tonic::Code::Internal);
    }
}
