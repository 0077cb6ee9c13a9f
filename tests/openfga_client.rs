//! The OpenFGA client, decision cache and changelog watcher against a real OpenFGA
//! (`target/tools/bin/openfga`, `scripts/install-tools.sh openfga`; `AUTHZ_TOOLS_DIR`
//! overrides `target/tools`): startup resolution and its errors, model validation, check and
//! batch-check answers, contextual tuples, changelog invalidation, and an outage with the
//! circuit breaker and recovery.
//!
//! Each test starts its own OpenFGA on free loopback ports (it is ready in ~50 ms) and
//! kills it by process id when done, so tests run in parallel without sharing stores.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use authz_sidecar::authz::breaker::BreakerState;
use authz_sidecar::authz::cache::DecisionCache;
use authz_sidecar::authz::openfga::{ChangeWatcher, OpenFgaClient, OpenFgaError};
use authz_sidecar::authz::{BackendError, CheckQuery, RelationRef, RelationshipChecker, TupleKey};
use authz_sidecar::config::{CacheConfig, Consistency, OpenFgaConfig, StoreRef};
use common::openfga::{OpenFga, app_model};
use common::process::free_port;
use tokio_util::sync::CancellationToken;

fn config(url: &str, store: StoreRef) -> OpenFgaConfig {
    OpenFgaConfig {
        api_url: url.to_string(),
        store,
        model_id: None,
        api_token: None,
        timeout: Duration::from_millis(500),
        consistency: Consistency::MinimizeLatency,
        max_batch_size: 50,
        max_in_flight: 2,
        changelog_interval: Duration::from_millis(100),
        changelog_lookback: Duration::from_secs(300),
        contextual_tuples: Vec::new(),
        breaker_failures: 5,
        breaker_open_for: Duration::from_secs(5),
    }
}

/// Long TTLs: an answer that goes away was invalidated, not expired.
fn cache_config() -> CacheConfig {
    CacheConfig {
        enabled: true,
        allowed_ttl: Duration::from_secs(300),
        denied_ttl: Duration::from_secs(300),
        max_entries: 1000,
    }
}

fn t(user: &str, relation: &str, object: &str) -> TupleKey {
    TupleKey {
        user: user.into(),
        relation: relation.into(),
        object: object.into(),
    }
}

fn q(tuple: &TupleKey) -> CheckQuery {
    CheckQuery {
        tuple: tuple.clone(),
        contextual: Arc::new(Vec::new()),
        consistency: Consistency::MinimizeLatency,
    }
}

async fn connect_err(cfg: &OpenFgaConfig) -> String {
    match OpenFgaClient::connect(cfg).await {
        Ok(c) => panic!("connected: {}", c.describe()),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Startup
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn connects_by_store_id_and_by_name() {
    let fga = OpenFga::shared().await;
    let url = fga.http_url();
    let (store, model) = fga.app_store("connect-by-name").await;

    let by_id = OpenFgaClient::connect(&config(&url, StoreRef::Id(store.clone())))
        .await
        .unwrap();
    assert_eq!(by_id.store_id(), store);
    assert_eq!(by_id.model_id(), model);
    assert!(by_id.ready());
    let d = by_id.describe();
    assert!(
        d.contains(&store) && d.contains("connect-by-name") && d.contains(&model),
        "{d}"
    );

    let by_name = OpenFgaClient::connect(&config(&url, StoreRef::Name("connect-by-name".into())))
        .await
        .unwrap();
    assert_eq!(by_name.store_id(), store);

    // A pinned model stays pinned when a newer one is written; a followed one moves.
    let mut pinned_cfg = config(&url, StoreRef::Id(store.clone()));
    pinned_cfg.model_id = Some(model.clone());
    let pinned = OpenFgaClient::connect(&pinned_cfg).await.unwrap();
    let newer = fga.write_model(&store, &app_model()).await;
    assert_eq!(pinned.refresh_model().await, Ok(false));
    assert_eq!(pinned.model_id(), model);
    assert_eq!(by_id.refresh_model().await, Ok(true));
    assert_eq!(by_id.model_id(), newer);
    assert_eq!(by_id.refresh_model().await, Ok(false));
}

#[tokio::test]
async fn startup_errors_say_what_to_fix() {
    // Its own server: the errors list every store it has.
    let fga = OpenFga::start().await;
    let url = fga.http_url();
    let (mcp, model) = fga.app_store("mcp").await;
    let other = fga.create_store("other").await;
    let twin_a = fga.create_store("twin").await;
    let twin_b = fga.create_store("twin").await;

    // A well-formed id the server does not have: the stores it does have, names and ids.
    let missing = "01HVMMBCMGZNT3SED4Z17ECXCA";
    let e = connect_err(&config(&url, StoreRef::Id(missing.into()))).await;
    assert!(
        e.starts_with(&format!(
            "OPENFGA_STORE_ID {missing}: store not found; the server has: "
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!("mcp ({mcp})")) && e.contains(&format!("other ({other})")),
        "{e}"
    );

    let e = connect_err(&config(&url, StoreRef::Id("nope".into()))).await;
    assert!(
        e.starts_with("OPENFGA_STORE_ID nope: not a store id"),
        "{e}"
    );
    assert!(e.contains(&format!("mcp ({mcp})")), "{e}");

    let e = connect_err(&config(&url, StoreRef::Name("absent".into()))).await;
    assert!(
        e.starts_with("OPENFGA_STORE_NAME absent: no store has this name; the server has: "),
        "{e}"
    );
    let e = connect_err(&config(&url, StoreRef::Name("twin".into()))).await;
    assert!(
        e.starts_with("OPENFGA_STORE_NAME twin: 2 stores have this name"),
        "{e}"
    );
    assert!(
        e.contains(&twin_a) && e.contains(&twin_b) && e.contains("set OPENFGA_STORE_ID"),
        "{e}"
    );

    // A model id the store does not have: the ones it has.
    let mut cfg = config(&url, StoreRef::Id(mcp.clone()));
    cfg.model_id = Some(missing.into());
    let e = connect_err(&cfg).await;
    assert!(
        e.starts_with(&format!(
            "OPENFGA_MODEL_ID {missing}: authorization model not found in store mcp ({mcp})"
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!("available (newest first): {model}")),
        "{e}"
    );

    cfg.model_id = Some("nope".into());
    let e = connect_err(&cfg).await;
    assert!(
        e.starts_with("OPENFGA_MODEL_ID nope: not a model id"),
        "{e}"
    );

    // A store without a model.
    let e = connect_err(&config(&url, StoreRef::Id(other.clone()))).await;
    assert_eq!(
        e,
        format!(
            "authorization model not set: the store other ({other}) has no model: write one (deploy/openfga/model.json)"
        )
    );

    // Nothing listening.
    let dead = format!("http://127.0.0.1:{}", free_port());
    match OpenFgaClient::connect(&config(&dead, StoreRef::Id(mcp))).await {
        Err(e @ OpenFgaError::Unreachable { .. }) => {
            assert!(e.is_transient());
            assert_eq!(
                e.to_string(),
                format!("OpenFGA unreachable at {dead} (OPENFGA_API_URL): connection refused")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_api_token_is_sent_as_a_bearer() {
    let fga = OpenFga::start_with_key("s3cret-key").await;
    let url = fga.http_url();
    let grant = t("user:alice", "owner", "tool:search");
    let (store, _) = fga
        .store("keyed")
        .tuples(std::slice::from_ref(&grant))
        .create()
        .await;

    let mut cfg = config(&url, StoreRef::Id(store));
    let e = connect_err(&cfg).await;
    assert_eq!(
        e,
        format!(
            "OpenFGA at {} refused the credentials (401 Unauthorized): set OPENFGA_API_TOKEN to a token it accepts",
            url
        )
    );
    cfg.api_token = Some("wrong".into());
    assert!(connect_err(&cfg).await.contains("refused the credentials"));
    cfg.api_token = Some("s3cret-key".into());
    let client = OpenFgaClient::connect(&cfg).await.unwrap();
    assert_eq!(client.check(&[q(&grant)]).await, Ok(vec![true]));
}

#[tokio::test]
async fn validate_flags_relations_the_model_lacks() {
    let fga = OpenFga::shared().await;
    let url = fga.http_url();
    let (store, _) = fga.app_store("validate").await;
    let client = OpenFgaClient::connect(&config(&url, StoreRef::Id(store)))
        .await
        .unwrap();
    let good = RelationRef {
        rule: "tools".into(),
        key: "routes.rules[0].check.all[0]".into(),
        relation: "executor".into(),
        object_type: Some("tool".into()),
        user_type: Some("service_principal".into()),
    };
    assert_eq!(client.validate(std::slice::from_ref(&good)), Ok(()));
    let bad = RelationRef {
        key: "routes.rules[2].check.any[1]".into(),
        relation: "runner".into(),
        ..good.clone()
    };
    let e = client.validate(&[good, bad]).unwrap_err().to_string();
    assert_eq!(
        e,
        "routes.rules[2].check.any[1] (rule tools): type tool has no relation runner; it has: executor, organization, owner"
    );
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn checks_and_batches_answer_from_written_tuples() {
    let fga = OpenFga::shared().await;
    let url = fga.http_url();
    let (store, _) = fga
        .store("checks")
        .tuples(&[
            t("user:alice", "owner", "tool:search"),
            t("user:bob", "executor", "tool:search"),
            t("service_principal:bot", "executor", "tool:deploy"),
            t("organization:acme", "organization", "tool:billing"),
            t("user:carol", "member", "organization:acme"),
            t("user:alice", "viewer", "conversation:1"),
        ])
        .create()
        .await;
    let mut cfg = config(&url, StoreRef::Id(store));
    cfg.max_batch_size = 2;
    let client = OpenFgaClient::connect(&cfg).await.unwrap();

    // One question: /check.
    assert_eq!(
        client
            .check(&[q(&t("user:alice", "executor", "tool:search"))])
            .await,
        Ok(vec![true])
    );
    assert_eq!(
        client
            .check(&[q(&t("user:bob", "owner", "tool:search"))])
            .await,
        Ok(vec![false])
    );
    assert_eq!(client.stats().requests, 2);

    // Seven questions with batches of two: four concurrent requests, answers in order.
    let questions = [
        (t("user:alice", "executor", "tool:search"), true), // owner implies executor
        (t("user:bob", "executor", "tool:search"), true),
        (t("user:bob", "executor", "tool:deploy"), false),
        (t("service_principal:bot", "executor", "tool:deploy"), true),
        (t("user:carol", "executor", "tool:billing"), true), // member from organization
        (t("user:dave", "executor", "tool:billing"), false),
        (t("user:alice", "viewer", "conversation:1"), true),
    ];
    let asked: Vec<CheckQuery> = questions.iter().map(|(tk, _)| q(tk)).collect();
    let want: Vec<bool> = questions.iter().map(|(_, a)| *a).collect();
    assert_eq!(client.check(&asked).await, Ok(want.clone()));
    assert_eq!(client.stats().requests, 2 + 4);

    // Mixed consistency still answers in the caller's order.
    let mut mixed = asked.clone();
    for m in mixed.iter_mut().step_by(2) {
        m.consistency = Consistency::HigherConsistency;
    }
    assert_eq!(client.check(&mixed).await, Ok(want));

    // Contextual tuples: alice is a member of acme for this request only.
    let mut ctx = q(&t("user:alice", "executor", "tool:billing"));
    assert_eq!(
        client.check(std::slice::from_ref(&ctx)).await,
        Ok(vec![false])
    );
    ctx.contextual = Arc::new(vec![t("user:alice", "member", "organization:acme")]);
    assert_eq!(
        client.check(std::slice::from_ref(&ctx)).await,
        Ok(vec![true])
    );
    assert_eq!(
        client
            .check(&[ctx.clone(), q(&t("user:bob", "executor", "tool:search"))])
            .await,
        Ok(vec![true, true]),
        "contextual tuples in a batch-check"
    );

    // Questions the model cannot answer are refused with OpenFGA's reason and do not trip
    // the breaker, alone or inside a batch.
    let before = client.stats().errors;
    for _ in 0..(cfg.breaker_failures + 1) {
        match client
            .check(&[q(&t("user:alice", "runner", "tool:search"))])
            .await
        {
            Err(BackendError::Rejected(m)) => assert!(m.contains("tool#runner"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    match client
        .check(&[
            q(&t("user:alice", "executor", "tool:search")),
            q(&t("user:alice", "viewer", "gadget:1")),
        ])
        .await
    {
        Err(BackendError::Rejected(m)) => assert!(m.contains("gadget"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.stats().breaker, BreakerState::Closed);
    assert!(client.stats().errors > before);
    assert!(client.ready());
}

/// Single checks asked while `max_in_flight` requests are out wait and go out together as
/// one /batch-check; each gets its own answer (answers differ, and one question is refused
/// alone). With `max_in_flight: 0` every check is its own request.
#[tokio::test]
async fn concurrent_single_checks_coalesce_and_each_gets_its_own_answer() {
    let fga = OpenFga::shared().await;
    let url = fga.http_url();
    let n = 40;
    let tuples: Vec<TupleKey> = (0..n)
        .step_by(2)
        .map(|i| t(&format!("user:u{i}"), "executor", &format!("tool:t{i}")))
        .collect();
    let (store, _) = fga.store("coalesce").tuples(&tuples).create().await;
    for (limit, requests) in [(1, 1..=3), (0, n + 1..=n + 1)] {
        let mut cfg = config(&url, StoreRef::Id(store.clone()));
        cfg.max_in_flight = limit;
        let client = Arc::new(OpenFgaClient::connect(&cfg).await.unwrap());
        let before = client.stats().requests;
        let mut asked = Vec::new();
        for i in 0..n {
            let (client, query) = (
                client.clone(),
                q(&t(&format!("user:u{i}"), "executor", &format!("tool:t{i}"))),
            );
            asked.push(tokio::spawn(async move { client.check(&[query]).await }));
        }
        // A question the model refuses, among the others: only it fails.
        let refused = {
            let client = client.clone();
            tokio::spawn(
                async move { client.check(&[q(&t("user:u1", "runner", "tool:t1"))]).await },
            )
        };
        for (i, answer) in asked.into_iter().enumerate() {
            assert_eq!(
                answer.await.unwrap(),
                Ok(vec![i % 2 == 0]),
                "check {i}, max_in_flight {limit}"
            );
        }
        match refused.await.unwrap() {
            Err(BackendError::Rejected(m)) => assert!(m.contains("tool#runner"), "{m}"),
            other => panic!("{other:?}"),
        }
        let sent = client.stats().requests - before;
        assert!(
            requests.contains(&(sent as usize)),
            "max_in_flight {limit}: {sent} requests for {} checks",
            n + 1
        );
        assert_eq!(client.stats().breaker, BreakerState::Closed);
    }
}

#[tokio::test]
async fn the_cache_saves_requests_and_the_changelog_evicts_a_revoked_allow() {
    let fga = OpenFga::shared().await;
    let url = fga.http_url();
    let (store, _) = fga.app_store("changelog").await;
    let grant = t("user:alice", "executor", "tool:search");
    // Older history (more than one page) inside the watcher's lookback: read and applied
    // (evictions of nothing), then followed.
    for i in 0..150 {
        let object = format!("tool:t{i}");
        fga.write_tuples(&store, &[("user:old", "owner", object.as_str())])
            .await;
    }
    fga.write_tuples(&store, std::slice::from_ref(&grant)).await;

    let client = Arc::new(
        OpenFgaClient::connect(&config(&url, StoreRef::Id(store.clone())))
            .await
            .unwrap(),
    );
    let cache = Arc::new(DecisionCache::new(client.clone(), &cache_config()));
    let shutdown = CancellationToken::new();
    let watcher = ChangeWatcher::new(
        client.clone(),
        Some(cache.clone()),
        Duration::from_millis(100),
        Duration::from_secs(300),
    );
    let watching = watcher.spawn(shutdown.clone());
    // The watcher has read to the end of the changelog once it has polled.
    let deadline = Instant::now() + Duration::from_secs(5);
    while watcher.last_poll().is_none() {
        assert!(
            Instant::now() < deadline,
            "the changelog watcher never polled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let other = t("user:bob", "executor", "tool:search");
    assert_eq!(
        cache.check(&[q(&grant), q(&other)]).await,
        Ok(vec![true, false])
    );
    let sent = client.stats().requests;
    for _ in 0..20 {
        assert_eq!(
            cache.check(&[q(&grant), q(&other)]).await,
            Ok(vec![true, false])
        );
    }
    assert_eq!(client.stats().requests, sent, "answered from the cache");
    assert_eq!(cache.stats().hits, 40);

    // Unrelated changes leave the entries alone.
    fga.write_tuples(&store, &[("user:zed", "owner", "tool:other")])
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(cache.stats().size, 2);

    fga.delete_tuples(&store, std::slice::from_ref(&grant))
        .await;
    let revoked = Instant::now();
    loop {
        if cache.check(&[q(&grant)]).await == Ok(vec![false]) {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "the revoked allow was still cached after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("revocation seen after {:?}", revoked.elapsed());
    // Every answer about tool:search went (bob's denial too); alice's is cached again.
    assert!(cache.stats().invalidations >= 2);
    assert_eq!(cache.stats().size, 1);

    // A new model (none pinned): the watcher follows it and clears the cache.
    let newer = fga.write_model(&store, &app_model()).await;
    let written = Instant::now();
    while client.model_id() != newer {
        assert!(
            written.elapsed() < Duration::from_secs(3),
            "the new model was not followed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while cache.stats().size > 0 {
        assert!(
            written.elapsed() < Duration::from_secs(3),
            "the cache was not cleared"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), watching)
        .await
        .expect("the watcher stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn the_watcher_starts_at_its_lookback_not_at_the_stores_first_change() {
    use authz_sidecar::authz::openfga::{Endpoint, Outcome, RequestMetrics};
    let fga = OpenFga::shared().await;
    let url = fga.http_url();
    let (store, _) = fga.app_store("lookback").await;
    // Three pages of history, all older than the lookback below.
    for i in 0..250 {
        let object = format!("tool:h{i}");
        fga.write_tuples(&store, &[("user:old", "owner", object.as_str())])
            .await;
    }
    let grant = t("user:alice", "executor", "tool:search");
    fga.write_tuples(&store, std::slice::from_ref(&grant)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let metrics = RequestMetrics::default();
    let client = Arc::new(
        OpenFgaClient::connect_observed(
            &config(&url, StoreRef::Id(store.clone())),
            metrics.clone(),
        )
        .await
        .unwrap(),
    );
    let cache = Arc::new(DecisionCache::new(client.clone(), &cache_config()));
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let watcher = ChangeWatcher::new(
        client.clone(),
        Some(cache.clone()),
        Duration::from_millis(50),
        Duration::from_secs(1),
    );
    watcher.spawn(shutdown.clone());
    let deadline = Instant::now() + Duration::from_secs(5);
    while watcher.last_poll().is_none() {
        assert!(Instant::now() < deadline, "the watcher never polled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One request found nothing after the lookback: the 251 older changes were not read
    // (from the beginning, that is three pages).
    let reads = || metrics.count(Endpoint::ReadChanges, Outcome::Ok);
    assert_eq!(reads(), 1, "the first poll read past the lookback");

    // Nothing has changed since: the watcher stays at its start, and keeps reading from it
    // (OpenFGA gives no token for an empty `start_time` read) without missing what follows.
    assert_eq!(cache.check(&[q(&grant)]).await, Ok(vec![true]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(reads() >= 3, "the watcher kept polling: {}", reads());
    fga.delete_tuples(&store, std::slice::from_ref(&grant))
        .await;
    let revoked = Instant::now();
    while cache.check(&[q(&grant)]).await != Ok(vec![false]) {
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "a revocation after a start with no token was missed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the token that change gave is followed from then on.
    let other = t("user:bob", "executor", "tool:search");
    assert_eq!(cache.check(&[q(&other)]).await, Ok(vec![false]));
    fga.write_tuples(&store, std::slice::from_ref(&other)).await;
    let granted = Instant::now();
    while cache.check(&[q(&other)]).await != Ok(vec![true]) {
        assert!(
            granted.elapsed() < Duration::from_secs(2),
            "a grant after the first token was missed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn without_a_cache_the_watcher_still_follows_the_latest_model() {
    let fga = OpenFga::shared().await;
    let url = fga.http_url();
    let (store, model) = fga.app_store("follow-no-cache").await;
    let followed = Arc::new(
        OpenFgaClient::connect(&config(&url, StoreRef::Id(store.clone())))
            .await
            .unwrap(),
    );
    let mut pinned_cfg = config(&url, StoreRef::Id(store.clone()));
    pinned_cfg.model_id = Some(model.clone());
    let pinned = Arc::new(OpenFgaClient::connect(&pinned_cfg).await.unwrap());
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();

    let following = ChangeWatcher::new(
        followed.clone(),
        None,
        Duration::from_millis(20),
        Duration::from_secs(300),
    );
    let watching = following.spawn(shutdown.clone());
    // A pinned model and no cache to tell: nothing to follow, so the task ends at once.
    let idle = ChangeWatcher::new(
        pinned.clone(),
        None,
        Duration::from_millis(20),
        Duration::from_secs(300),
    );
    tokio::time::timeout(Duration::from_secs(1), idle.spawn(shutdown.clone()))
        .await
        .expect("a watcher with nothing to follow ends")
        .unwrap();

    let newer = fga.write_model(&store, &app_model()).await;
    let written = Instant::now();
    while followed.model_id() != newer {
        assert!(
            written.elapsed() < Duration::from_secs(3),
            "the new model was not followed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pinned.model_id(), model);
    // Without a cache nobody needs the changelog: it is not read.
    assert_eq!(following.last_poll(), None);
    assert!(!watching.is_finished());
}

#[tokio::test]
async fn an_outage_opens_the_breaker_and_a_restart_closes_it() {
    // SQLite, so the restarted server still has the store.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut fga = OpenFga::start_sqlite(dir.path()).await;
    let url = fga.http_url();
    let grant = t("user:alice", "owner", "tool:search");
    let (store, _) = fga
        .store("outage")
        .tuples(std::slice::from_ref(&grant))
        .create()
        .await;
    let mut cfg = config(&url, StoreRef::Id(store));
    cfg.breaker_failures = 3;
    cfg.breaker_open_for = Duration::from_millis(500);
    let client = Arc::new(OpenFgaClient::connect(&cfg).await.unwrap());
    assert_eq!(client.check(&[q(&grant)]).await, Ok(vec![true]));

    // A watcher whose changelog polls fail clears the cache: revocations may go unseen.
    let cache = Arc::new(DecisionCache::new(client.clone(), &cache_config()));
    let shutdown = CancellationToken::new();
    let watcher = ChangeWatcher::new(
        client.clone(),
        Some(cache.clone()),
        Duration::from_millis(50),
        Duration::from_secs(300),
    );
    watcher.spawn(shutdown.clone());
    let _stop = shutdown.drop_guard();
    while watcher.last_poll().is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cache.check(&[q(&grant)]).await, Ok(vec![true]));
    assert_eq!(cache.stats().size, 1);

    fga.stop();
    let down = Instant::now();
    while cache.stats().size > 0 {
        assert!(
            down.elapsed() < Duration::from_secs(2),
            "the cache was not cleared"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last_poll = watcher.last_poll();
    for _ in 0..3 {
        match client.check(&[q(&grant)]).await {
            Err(BackendError::Unavailable(m)) => {
                assert_eq!(m, format!("OpenFGA at {}: connection refused", url));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(client.stats().breaker, BreakerState::Open);
    assert!(
        client.ready(),
        "readiness is resolution once, not the breaker: an outage is a 503, not NotReady"
    );
    let sent = client.stats().requests;
    let fast = Instant::now();
    match client.check(&[q(&grant)]).await {
        Err(BackendError::CircuitOpen { last, retry_in_ms }) => {
            assert!(last.ends_with("connection refused"), "{last}");
            assert!(retry_in_ms <= 500, "{retry_in_ms}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        fast.elapsed() < Duration::from_millis(20),
        "{:?}",
        fast.elapsed()
    );
    assert_eq!(client.stats().requests, sent, "no request while open");
    assert_eq!(client.stats().short_circuited, 1);

    // Still down when the open period ends: the probe fails and the breaker re-opens.
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(client.stats().breaker, BreakerState::HalfOpen);
    assert!(
        client.ready(),
        "half-open is ready: the next request probes"
    );
    assert!(matches!(
        client.check(&[q(&grant)]).await,
        Err(BackendError::Unavailable(_))
    ));
    assert_eq!(client.stats().breaker, BreakerState::Open);

    fga.start_again().await;
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(client.check(&[q(&grant)]).await, Ok(vec![true]));
    assert_eq!(client.stats().breaker, BreakerState::Closed);
    assert!(client.ready());
    // The watcher reads the changelog again.
    let up = Instant::now();
    while watcher.last_poll() == last_poll {
        assert!(
            up.elapsed() < Duration::from_secs(2),
            "the watcher did not recover"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
