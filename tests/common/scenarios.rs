//! Scenarios every shared store goes through in the same way, written once:
//! each backend's test file builds its stores (and, for outages, a proxy in
//! front of its server) and hands them here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use tower_idempotency::test_util::{random_key, sample_record};
use tower_idempotency::{
    fingerprint::Fingerprint,
    store::{Begin, Store, StoreError},
};

use super::proxy::Proxy;
use super::{Counter, call_post, post_req, problem, send};

pub fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// Many concurrent `begin`s on keys whose rows expire, are taken over and
/// are committed while the others' statements run: exactly one acquires,
/// the others see the winner's lock, and nobody sees the expired record.
/// `store(round)` is the store each round runs on.
pub async fn begin_is_exclusive_under_takeover_races(store: impl Fn(usize) -> Arc<dyn Store>) {
    for round in 0..20 {
        let store = store(round);
        let key = random_key();
        if round % 2 == 1 {
            // An expired record to take over.
            let Ok(Begin::Acquired(token)) =
                store.begin(&key, &fp(200), Duration::from_secs(30)).await
            else {
                panic!("round {round}: the key was taken");
            };
            let record = sample_record(fp(200), 8);
            let ttl = Duration::from_millis(1);
            assert!(store.complete(&key, &token, &record, ttl).await.unwrap());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut tasks = Vec::new();
        for n in 0..32u8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let outcome = store.begin(&key, &fp(n), Duration::from_secs(30)).await;
                (n, outcome.unwrap())
            }));
        }
        let mut winner = None;
        let mut seen = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (n, Begin::Acquired(_)) => {
                    assert!(winner.is_none(), "two winners in round {round}");
                    winner = Some(fp(n));
                }
                (_, Begin::InFlight { fingerprint }) => seen.push(fingerprint),
                (_, other) => panic!("round {round}: {other:?}"),
            }
        }
        let winner = winner.unwrap();
        assert!(seen.iter().all(|f| *f == Some(winner)), "round {round}");
    }
}

/// Two layer instances on one store, 100 concurrent requests with one key
/// (a slow handler, so they overlap): one execution, every other answer
/// its replay or a 409 problem; afterwards either instance replays.
pub async fn hundred_duplicates_on_two_instances(apps: [Router; 2], counter: &Counter) {
    let mut tasks = Vec::new();
    for i in 0..100 {
        let app = apps[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let req = post_req(Some("shared-key"))
                .header("x-delay-ms", "200")
                .body(Body::from("{\"item\":\"book\"}"))
                .unwrap();
            send(&app, req).await
        }));
    }
    let (mut first_runs, mut replays, mut conflicts) = (0, 0, 0);
    for task in tasks {
        let (status, headers, body) = task.await.unwrap();
        match status {
            StatusCode::CREATED if headers.get("idempotent-replayed").is_some() => {
                assert_eq!(headers["idempotent-replayed"], "true");
                assert_eq!(headers["x-execution"], "1");
                assert_eq!(body, "{\"item\":\"book\"}");
                replays += 1;
            }
            StatusCode::CREATED => first_runs += 1,
            StatusCode::CONFLICT => {
                problem(status, &headers, &body);
                conflicts += 1;
            }
            other => panic!("unexpected {other}: {body:?}"),
        }
    }
    assert_eq!(counter.get(), 1, "the handler ran more than once");
    assert_eq!(first_runs, 1);
    assert_eq!(first_runs + replays + conflicts, 100);

    for app in &apps {
        let (status, headers, _) = call_post(app, Some("shared-key"), "{\"item\":\"book\"}").await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers["idempotent-replayed"], "true");
    }
    assert_eq!(counter.get(), 1);
}

/// `app` reaches its server through `proxy`. The proxy is stopped: every
/// request answers a 503 problem with `Retry-After` within 2.5 s and runs
/// no handler. It starts again on the same port: the same store recovers
/// by itself, and a request recorded before the outage replays. Returns
/// the restarted proxy.
pub async fn outage_answers_503_in_bound_and_recovers(
    app: &Router,
    counter: &Counter,
    proxy: Proxy,
) -> Proxy {
    let (status, _, _) = call_post(app, Some("before"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    let runs = counter.get();

    let (addr, upstream) = proxy.stop().await;
    for n in 0..3 {
        let start = Instant::now();
        let (status, headers, body) = call_post(app, Some(&format!("during-{n}")), "{}").await;
        let elapsed = start.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
        problem(status, &headers, &body);
        assert!(headers.contains_key("retry-after"));
        assert!(elapsed < Duration::from_millis(2500), "took {elapsed:?}");
    }
    assert_eq!(counter.get(), runs, "no handler ran during the outage");

    let proxy = Proxy::start(addr, upstream, None).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    loop {
        n += 1;
        let (status, _, _) = call_post(app, Some(&format!("after-{n}")), "{}").await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery, last answer {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, headers, _) = call_post(app, Some("before"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    proxy
}

/// `store` points at a port nobody listens on and is bounded at 500 ms: its
/// `begin` fails typed within 1.5 s, and a request through the layer is a
/// 503 problem within 2.5 s.
pub async fn unreachable_answers_503_in_bound(store: Arc<dyn Store>) {
    let start = Instant::now();
    let err = store
        .begin(&random_key(), &fp(1), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Timeout(_) | StoreError::Unavailable(_)),
        "{err:?}"
    );
    assert!(start.elapsed() < Duration::from_millis(1500));

    let app = super::router(Counter::default())
        .layer(tower_idempotency::IdempotencyLayer::from_arc(store));
    let start = Instant::now();
    let (status, headers, body) = call_post(&app, Some("k"), "{}").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    problem(status, &headers, &body);
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
}

/// A port on loopback that nobody listens on.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
