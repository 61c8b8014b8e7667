//! Purges over a Redis Pub/Sub channel, for clusters that prefer a bus to peer lists: every
//! client purge is published; every replica subscribed applies what others published.
//! Pub/Sub is fire-and-forget: a replica disconnected at the time misses the purge, which is
//! why the subscriber reconnects at once and the publish result is reported to the caller.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use parking_lot::Mutex;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::{PeerReport, PeerStatus, PurgeBody, PurgeOrder, Purger, Source};

pub(crate) struct Bus {
    client: redis::Client,
    channel: String,
    url: String,
    publisher: Mutex<Option<redis::aio::MultiplexedConnection>>,
}

#[derive(Serialize, Deserialize)]
struct Message {
    id: String,
    /// Instance id of the publishing replica, which skips its own messages.
    origin: String,
    purge: PurgeBody,
}

impl Bus {
    pub(crate) fn new(config: &larder_config::Redis) -> Result<Bus, String> {
        Ok(Bus {
            client: redis::Client::open(config.url.as_str()).map_err(|e| e.to_string())?,
            channel: config.channel.clone(),
            url: larder_config::redact_url(&config.url),
            publisher: Mutex::new(None),
        })
    }

    /// Publishes a client's purge; the report says how many subscribers received it.
    pub(crate) async fn publish(
        &self,
        id: &str,
        origin: &str,
        order: &PurgeOrder,
        metrics: &larder_telemetry::Metrics,
        deadline: Instant,
    ) -> PeerReport {
        let started = Instant::now();
        let message = serde_json::to_string(&Message {
            id: id.to_owned(),
            origin: origin.to_owned(),
            purge: PurgeBody::from_order(order),
        })
        .expect("a purge message always serializes");
        let mut attempts = 0;
        let publish = async {
            loop {
                attempts += 1;
                match self.try_publish(&message).await {
                    Ok(receivers) => break Ok(receivers),
                    // A broken connection is replaced once; a second failure is reported.
                    Err(e) if attempts < 2 => {
                        tracing::debug!(error = %e, "redis publish failed; reconnecting")
                    }
                    Err(e) => break Err(e.to_string()),
                }
            }
        };
        let result = tokio::time::timeout_at(deadline.into(), publish).await;
        let (status, error) = match result {
            Ok(Ok(_)) => (PeerStatus::Ok, None),
            Ok(Err(e)) => (PeerStatus::Failed, Some(e)),
            Err(_) => (PeerStatus::Timeout, Some("no answer in time".to_owned())),
        };
        larder_telemetry::FanoutEvent {
            purge_id: id,
            peer: &self.url,
            attempts,
            duration: started.elapsed(),
            error: error.as_deref(),
        }
        .emit(metrics);
        PeerReport {
            peer: self.url.clone(),
            status,
            // Subscribers do not answer: the count is how many received it, not what they purged.
            purged: None,
            attempts,
            duration_ms: started.elapsed().as_millis() as u64,
            error,
        }
    }

    async fn try_publish(&self, message: &str) -> redis::RedisResult<usize> {
        // The lock is never held across a network wait: concurrent purges share one
        // multiplexed connection, and a slow connect delays only the purge that makes it.
        let current = self.publisher.lock().clone();
        let mut connection = match current {
            Some(connection) => connection,
            None => {
                let connection = tokio::time::timeout(
                    Duration::from_secs(2),
                    self.client.get_multiplexed_async_connection(),
                )
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                *self.publisher.lock() = Some(connection.clone());
                connection
            }
        };
        let result = connection.publish(&self.channel, message).await;
        if result.is_err() {
            *self.publisher.lock() = None;
        }
        result
    }

    /// Applies what other replicas publish, reconnecting (with capped backoff) whenever the
    /// subscription drops. Never returns.
    pub(crate) async fn subscribe(&self, purger: &Arc<Purger>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.subscribe_once(purger).await {
                Ok(()) => {
                    tracing::warn!(redis = %self.url, "redis subscription closed; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(redis = %self.url, error = %e, "redis subscription failed; reconnecting")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn subscribe_once(&self, purger: &Arc<Purger>) -> redis::RedisResult<()> {
        let pubsub = self.client.get_async_pubsub().await?;
        let (mut sink, mut stream) = pubsub.split();
        sink.subscribe(&self.channel).await?;
        tracing::info!(redis = %self.url, channel = %self.channel, "subscribed to purges");
        // A half-open connection never ends the stream: ping to find out.
        let mut ping = tokio::time::interval(Duration::from_secs(15));
        ping.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { return Ok(()) };
                    let Ok(payload) = message.get_payload::<String>() else { continue };
                    self.apply(purger, &payload).await;
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(Duration::from_secs(5), sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
                    }
                }
            }
        }
    }

    async fn apply(&self, purger: &Arc<Purger>, payload: &str) {
        let message: Message = match serde_json::from_str(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable purge message from redis");
                return;
            }
        };
        if message.origin == purger.instance() {
            return;
        }
        let order = match message.purge.into_order() {
            Ok(order) => order,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an invalid purge message from redis");
                return;
            }
        };
        let source = Source::Redis {
            instance: message.origin,
        };
        purger.purge(&order, source, Some(message.id)).await;
    }
}
