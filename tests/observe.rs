//! Observability: the span per request, metrics, and no raw key anywhere.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use common::*;
use metrics::{
    Counter as MetricCounter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata,
    Recorder, SharedString, Unit,
};
use tower_idempotency::message::{IdempotentConsumer, MessageKey};
use tower_idempotency::{IdempotencyLayer, MemoryStore};
use tracing_subscriber::fmt::format::FmtSpan;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const RAW_KEY: &str = "secret-key-0b5e7d11";

// One test: a global subscriber would also see a parallel test's spans.
#[test]
fn spans_and_metrics() {
    span_carries_outcome_status_and_a_key_hash_never_the_raw_key();
    metrics_count_outcomes_and_time_store_calls();
}

fn span_carries_outcome_status_and_a_key_hash_never_the_raw_key() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let counter = Counter::default();
        let app = router(counter).layer(IdempotencyLayer::new(MemoryStore::new()));
        call_post(&app, Some(RAW_KEY), "{}").await;
        call_post(&app, Some(RAW_KEY), "{}").await;
        call_post(&app, Some(RAW_KEY), "{\"other\":1}").await;
        let consumer = IdempotentConsumer::new(MemoryStore::new());
        for payload in ["{}", "{}", "{\"other\":1}"] {
            let key = MessageKey::new("billing", RAW_KEY, payload);
            let _ = consumer
                .process(key, |_| async { Ok::<_, std::io::Error>(()) })
                .await
                .unwrap();
        }
    });
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let closes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("idempotency{") && l.contains(": close"))
        .collect();
    assert_eq!(closes.len(), 3, "{text}");
    assert!(
        closes[0].contains("outcome=\"executed\"") && closes[0].contains("status=201"),
        "{}",
        closes[0]
    );
    assert!(closes[1].contains("outcome=\"replayed\""), "{}", closes[1]);
    assert!(
        closes[2].contains("outcome=\"mismatch\"") && closes[2].contains("status=422"),
        "{}",
        closes[2]
    );
    assert!(closes[0].contains("store_us="));
    assert!(closes[0].contains("key="));
    let messages: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("idempotency_message{") && l.contains(": close"))
        .collect();
    assert_eq!(messages.len(), 3, "{text}");
    for (line, outcome) in messages.iter().zip(["ran", "replayed", "mismatch"]) {
        assert!(line.contains(&format!("outcome=\"{outcome}\"")), "{line}");
        assert!(
            line.contains("key=") && line.contains("store_us="),
            "{line}"
        );
    }
    assert!(!text.contains(RAW_KEY), "the raw key was logged");
}

#[derive(Default)]
struct Registry {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

struct Count(Arc<AtomicU64>);
impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}
impl HistogramFn for Count {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn label(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorder for Registry {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> MetricCounter {
        let c = self
            .counters
            .lock()
            .unwrap()
            .entry(label(key))
            .or_default()
            .clone();
        MetricCounter::from_arc(Arc::new(Count(c)))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let c = self
            .histograms
            .lock()
            .unwrap()
            .entry(label(key))
            .or_default()
            .clone();
        Histogram::from_arc(Arc::new(Count(c)))
    }
}

fn metrics_count_outcomes_and_time_store_calls() {
    let registry = Registry::default();
    metrics::with_local_recorder(&registry, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let app = router(Counter::default()).layer(IdempotencyLayer::new(MemoryStore::new()));
            call_post(&app, Some("m"), "{}").await;
            call_post(&app, Some("m"), "{}").await;
            call_post(&app, Some("m"), "{}").await;
            let bad = post_req(Some("m"))
                .header("idempotency-key", "n")
                .body(Body::from("{}"))
                .unwrap();
            send(&app, bad).await;
            let consumer = IdempotentConsumer::new(MemoryStore::new());
            for _ in 0..2 {
                let _ = consumer
                    .process(MessageKey::new("s", "id", "p"), |_| async {
                        Ok::<_, std::io::Error>(())
                    })
                    .await
                    .unwrap();
            }
        });
    });
    let counters = registry.counters.lock().unwrap();
    let get = |k: &str| counters.get(k).map_or(0, |c| c.load(Ordering::SeqCst));
    assert_eq!(get("idempotency_requests_total{outcome=executed}"), 1);
    assert_eq!(get("idempotency_requests_total{outcome=replayed}"), 2);
    assert_eq!(get("idempotency_requests_total{outcome=rejected}"), 1);
    assert_eq!(get("idempotency_messages_total{outcome=ran}"), 1);
    assert_eq!(get("idempotency_messages_total{outcome=replayed}"), 1);
    let histograms = registry.histograms.lock().unwrap();
    let get = |k: &str| histograms.get(k).map_or(0, |c| c.load(Ordering::SeqCst));
    assert_eq!(get("idempotency_store_duration_seconds{op=begin}"), 5);
    assert_eq!(get("idempotency_store_duration_seconds{op=complete}"), 2);
}
