//! The access log's Elasticsearch sink: documents are queued (bounded, never waited for), sent
//! in `_bulk` batches by count or time, gzipped, authenticated, retried with backoff when
//! Elasticsearch pushes back (429, 5xx, connection errors), per document when a batch partly
//! fails, and flushed on shutdown. Every document's fate is counted in
//! `larder_access_log_es_documents_total{result}`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot, watch};

/// How the sink reaches Elasticsearch and batches documents.
#[derive(Debug, Clone)]
pub struct EsSinkConfig {
    /// Base URL, `http://host:9200`.
    pub url: String,
    /// Index (or data stream) name; `%Y`, `%m`, `%d` become the batch's UTC date.
    pub index: String,
    /// `create` actions (data streams) rather than `index`.
    pub data_stream: bool,
    /// The `Authorization` header value (`ApiKey …` or `Basic …`), if any.
    pub authorization: Option<String>,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub max_queue: usize,
    pub gzip: bool,
    pub timeout: Duration,
    pub max_retries: u32,
}

/// Document outcomes, counted.
#[derive(Debug, Clone)]
pub(crate) struct EsCounters {
    pub indexed: Counter,
    /// Refused for good by Elasticsearch (mapping errors and other 4xx per document).
    pub rejected: Counter,
    /// Given up after the last retry, or lost to a full queue.
    pub dropped: Counter,
    /// Sent again after a 429/5xx or a connection error.
    pub retried: Counter,
}

/// The queue side, held by the access log.
#[derive(Debug)]
pub struct EsSink {
    queue: mpsc::Sender<String>,
    counters: EsCounters,
    /// Set to the shutdown deadline when the sink must finish.
    stop: watch::Sender<Option<Instant>>,
    finished: parking_lot::Mutex<Option<oneshot::Receiver<()>>>,
}

impl EsSink {
    /// Starts the sender task on the current tokio runtime.
    pub(crate) fn start(config: EsSinkConfig, counters: EsCounters) -> EsSink {
        let (queue, documents) = mpsc::channel(config.max_queue.max(1));
        let (stop, stopped) = watch::channel(None);
        let (done, finished) = oneshot::channel();
        let sender = Sender {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(HttpConnector::new()),
            counters: counters.clone(),
            config,
            stop: stopped,
        };
        tokio::spawn(async move {
            sender.run(documents).await;
            let _ = done.send(());
        });
        EsSink {
            queue,
            counters,
            stop,
            finished: parking_lot::Mutex::new(Some(finished)),
        }
    }

    /// Queues one document (a JSON object on one line); never waits.
    pub fn send(&self, document: String) {
        if self.queue.try_send(document).is_err() {
            self.counters.dropped.inc();
        }
    }

    /// Sends what is queued, for at most `deadline`; what cannot be sent by then is counted
    /// as dropped.
    pub async fn flush_and_stop(&self, deadline: Duration) {
        let Some(finished) = self.finished.lock().take() else {
            return;
        };
        let _ = self.stop.send(Some(Instant::now() + deadline));
        // The sender honours the deadline itself; the margin covers its last bookkeeping.
        if tokio::time::timeout(deadline + Duration::from_secs(1), finished)
            .await
            .is_err()
        {
            tracing::warn!("elasticsearch sink did not finish in time");
        }
    }
}

struct Sender {
    client: Client<HttpConnector, Full<Bytes>>,
    counters: EsCounters,
    config: EsSinkConfig,
    stop: watch::Receiver<Option<Instant>>,
}

impl Sender {
    async fn run(self, mut documents: mpsc::Receiver<String>) {
        let mut batch: Vec<String> = Vec::with_capacity(self.config.batch_size);
        let mut oldest: Option<Instant> = None;
        let mut stop = self.stop.clone();
        loop {
            let wait = oldest.map_or(Duration::from_secs(3600), |t| {
                self.config.flush_interval.saturating_sub(t.elapsed())
            });
            tokio::select! {
                document = documents.recv() => match document {
                    Some(document) => {
                        oldest.get_or_insert_with(Instant::now);
                        batch.push(document);
                        if batch.len() >= self.config.batch_size {
                            self.deliver(std::mem::take(&mut batch)).await;
                            oldest = None;
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep(wait), if oldest.is_some() => {
                    self.deliver(std::mem::take(&mut batch)).await;
                    oldest = None;
                }
                () = stopping(&mut stop) => break,
            }
        }
        // Shutdown: what is queued goes out too, in full batches, until the deadline.
        documents.close();
        while let Ok(document) = documents.try_recv() {
            batch.push(document);
            if batch.len() >= self.config.batch_size {
                self.deliver(std::mem::take(&mut batch)).await;
            }
        }
        if !batch.is_empty() {
            self.deliver(batch).await;
        }
    }

    /// Time left before the shutdown deadline, when shutting down.
    fn remaining(&self) -> Option<Duration> {
        (*self.stop.borrow()).map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// Sends a batch until every document is indexed, rejected for good, or out of retries
    /// (or, at shutdown, out of time).
    async fn deliver(&self, mut documents: Vec<String>) {
        let mut backoff = Duration::from_millis(100);
        for attempt in 0..=self.config.max_retries {
            if self.remaining().is_some_and(|left| left.is_zero()) {
                break;
            }
            if attempt > 0 {
                self.counters.retried.inc_by(documents.len() as u64);
                // A shutdown cuts the pause short; then no retry waits past the deadline.
                let pause = self.remaining().map_or(backoff, |left| backoff.min(left));
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    () = stopping(&mut stop), if self.remaining().is_none() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            match self.post(&documents).await {
                Outcome::AllIndexed => {
                    self.counters.indexed.inc_by(documents.len() as u64);
                    return;
                }
                Outcome::Retry(why) => {
                    tracing::debug!(documents = documents.len(), error = %why, "elasticsearch bulk request failed; retrying");
                }
                Outcome::Items(statuses) => {
                    let mut again = Vec::new();
                    for (document, status) in documents.into_iter().zip(statuses) {
                        match status {
                            200..=299 => {
                                self.counters.indexed.inc();
                            }
                            429 | 500..=599 => again.push(document),
                            _ => {
                                self.counters.rejected.inc();
                            }
                        }
                    }
                    if again.is_empty() {
                        return;
                    }
                    documents = again;
                }
                Outcome::Refused(why) => {
                    tracing::warn!(documents = documents.len(), error = %why, "elasticsearch refused a bulk request; its documents are dropped");
                    self.counters.rejected.inc_by(documents.len() as u64);
                    return;
                }
            }
        }
        tracing::warn!(
            documents = documents.len(),
            "elasticsearch did not take these access log documents (retries or the shutdown deadline ran out); dropped"
        );
        self.counters.dropped.inc_by(documents.len() as u64);
    }

    async fn post(&self, documents: &[String]) -> Outcome {
        let body = bulk_body(&self.index_name(), self.config.data_stream, documents);
        let body = if self.config.gzip {
            use std::io::Write;
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::fast(),
            );
            encoder
                .write_all(&body)
                .expect("writing to memory cannot fail");
            encoder.finish().expect("writing to memory cannot fail")
        } else {
            body
        };
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/_bulk", self.config.url))
            .header(header::CONTENT_TYPE, "application/x-ndjson");
        if self.config.gzip {
            request = request
                .header(header::CONTENT_ENCODING, "gzip")
                .header(header::ACCEPT_ENCODING, "identity");
        }
        if let Some(authorization) = &self.config.authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        let Ok(request) = request.body(Full::new(Bytes::from(body))) else {
            return Outcome::Refused("invalid request (check url and credentials)".into());
        };
        // One deadline for the whole exchange, answer body included (a stalled body must not
        // hang the only sender), and never past the shutdown deadline.
        let limit = self
            .remaining()
            .map_or(self.config.timeout, |left| left.min(self.config.timeout));
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e}"))?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), 64 << 20)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            Ok::<_, String>((status, body.to_bytes()))
        };
        let (status, bytes) = match tokio::time::timeout(limit, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Outcome::Retry(e),
            Err(_) => return Outcome::Retry("timed out".into()),
        };
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Outcome::Retry(format!("HTTP {}", status.as_u16()));
        }
        if !status.is_success() {
            let text: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
            return Outcome::Refused(format!("HTTP {}: {text}", status.as_u16()));
        }
        parse_bulk_response(&bytes, documents.len())
    }

    fn index_name(&self) -> String {
        let today = time::OffsetDateTime::now_utc().date();
        self.config
            .index
            .replace("%Y", &format!("{:04}", today.year()))
            .replace("%m", &format!("{:02}", u8::from(today.month())))
            .replace("%d", &format!("{:02}", today.day()))
    }
}

/// Resolves when shutdown begins (or the sink is gone).
async fn stopping(stop: &mut watch::Receiver<Option<Instant>>) {
    loop {
        if stop.borrow_and_update().is_some() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    AllIndexed,
    /// Per document status, in request order (the batch partly failed).
    Items(Vec<u16>),
    /// The whole batch may succeed later.
    Retry(String),
    /// The whole batch never will.
    Refused(String),
}

/// NDJSON: an action line then the document, for each document; a final newline.
fn bulk_body(index: &str, data_stream: bool, documents: &[String]) -> Vec<u8> {
    let action = if data_stream { "create" } else { "index" };
    let action_line = format!("{{\"{action}\":{{\"_index\":{}}}}}\n", json_string(index));
    let mut body = Vec::with_capacity(
        documents
            .iter()
            .map(|d| d.len() + action_line.len() + 1)
            .sum(),
    );
    for document in documents {
        body.extend_from_slice(action_line.as_bytes());
        body.extend_from_slice(document.trim_end().as_bytes());
        body.push(b'\n');
    }
    body
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn parse_bulk_response(bytes: &[u8], sent: usize) -> Outcome {
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Outcome::Retry("unreadable bulk response".into());
    };
    if answer["errors"] != serde_json::Value::Bool(true) {
        return Outcome::AllIndexed;
    }
    let Some(items) = answer["items"]
        .as_array()
        .filter(|items| items.len() == sent)
    else {
        return Outcome::Retry("bulk response items do not match the request".into());
    };
    let statuses = items
        .iter()
        .map(|item| {
            item.as_object()
                .and_then(|o| o.values().next())
                .and_then(|result| result["status"].as_u64())
                .map_or(500, |s| s as u16)
        })
        .collect();
    Outcome::Items(statuses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_bodies_alternate_actions_and_documents() {
        let body = bulk_body("logs-x", true, &["{\"a\":1}".into(), "{\"b\":2}\n".into()]);
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            text,
            "{\"create\":{\"_index\":\"logs-x\"}}\n{\"a\":1}\n{\"create\":{\"_index\":\"logs-x\"}}\n{\"b\":2}\n"
        );
        let body = bulk_body("idx", false, &["{}".into()]);
        assert!(String::from_utf8(body).unwrap().starts_with("{\"index\":"));
    }

    #[test]
    fn bulk_responses_classify_documents() {
        assert_eq!(
            parse_bulk_response(br#"{"took":1,"errors":false,"items":[]}"#, 2),
            Outcome::AllIndexed
        );
        let partial = br#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":429}},{"create":{"status":400,"error":{"type":"mapper_parsing_exception"}}}]}"#;
        assert_eq!(
            parse_bulk_response(partial, 3),
            Outcome::Items(vec![201, 429, 400])
        );
        assert!(matches!(parse_bulk_response(partial, 2), Outcome::Retry(_)));
        assert!(matches!(
            parse_bulk_response(b"<html>", 1),
            Outcome::Retry(_)
        ));
    }
}
