//! husk's own gRPC service (pull progress for the CLI).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use husk_proto::husk::{self as pb, husk_server};
use tonic::{Request, Response, Status};

use super::Services;
use crate::image::progress::PullState;

pub struct Husk {
    s: Arc<Services>,
}

impl Husk {
    pub fn new(s: Arc<Services>) -> Self {
        Self { s }
    }
}

fn to_pb(image: &str, st: &PullState) -> pb::PullProgress {
    pb::PullProgress {
        image: image.to_string(),
        layers: st
            .layers
            .iter()
            .map(|l| pb::LayerProgress {
                digest: l.digest.clone(),
                total: l.total,
                done: l.done,
                phase: l.phase.as_str().into(),
            })
            .collect(),
        finished: st.finished,
        error: st.error.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl husk_server::Husk for Husk {
    type WatchPullStream = Pin<Box<dyn Stream<Item = Result<pb::PullProgress, Status>> + Send>>;

    async fn watch_pull(
        &self,
        req: Request<pb::WatchPullRequest>,
    ) -> Result<Response<Self::WatchPullStream>, Status> {
        let req = req.into_inner();
        let images = self.s.images.clone();
        let wait = Duration::from_millis(u64::from(req.wait_ms.min(30_000)));
        images.watch_pull(&req.image)?; // validate the reference up front
        let image = req.image;
        let stream = async_stream(move |tx| async move {
            let deadline = tokio::time::Instant::now() + wait;
            let mut rx = loop {
                if let Ok(Some(rx)) = images.watch_pull(&image) {
                    break rx;
                }
                if tokio::time::Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            loop {
                let st = rx.borrow_and_update().clone();
                if tx.send(Ok(to_pb(&image, &st))).await.is_err() || st.finished {
                    return;
                }
                // Throttle: at most ~10 updates a second.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if rx.changed().await.is_err() {
                    let st = rx.borrow().clone();
                    let _ = tx.send(Ok(to_pb(&image, &st))).await;
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task through a bounded channel.
fn async_stream<F, Fut>(
    f: F,
) -> Pin<Box<dyn Stream<Item = Result<pb::PullProgress, Status>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::PullProgress, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
