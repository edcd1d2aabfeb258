//! The event store: expected versions, typed conflicts, stream reads, and the global log
//! in commit order without skipping a late-committing transaction.

use futures::TryStreamExt;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use assetd::eventstore::{self, EventStore, EventStoreError, ExpectedVersion, GlobalPosition, NewEvent};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::TestApp;

fn event(n: u64) -> NewEvent {
    NewEvent { id: Uuid::new_v4(), event_type: "TestHappened".into(), data: json!({"n": n}), metadata: json!({}) }
}

#[tokio::test]
async fn expected_versions_are_enforced_with_a_typed_conflict() {
    let app = TestApp::spawn().await;
    let store = EventStore::new(app.ctx.app.pool.clone());
    let stream = format!("test-{}", Uuid::new_v4());

    let first = store.append(&stream, ExpectedVersion::NoStream, &[event(1), event(2)]).await.unwrap();
    assert_eq!(first.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2]);

    let again = store.append(&stream, ExpectedVersion::NoStream, &[event(3)]).await;
    assert!(matches!(again, Err(EventStoreError::Conflict { actual: 2, .. })), "{again:?}");
    let stale = store.append(&stream, ExpectedVersion::Exact(1), &[event(3)]).await;
    assert!(matches!(stale, Err(EventStoreError::Conflict { actual: 2, .. })), "{stale:?}");

    store.append(&stream, ExpectedVersion::Exact(2), &[event(3)]).await.unwrap();
    store.append(&stream, ExpectedVersion::Any, &[event(4)]).await.unwrap();

    let read = store.read_stream(&stream, 0).await.unwrap();
    assert_eq!(read.iter().map(|e| e.data["n"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(read.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(store.read_stream(&stream, 2).await.unwrap().len(), 2);

    let duplicate = read[0].id;
    let dup = store.append(&stream, ExpectedVersion::Any, &[NewEvent { id: duplicate, ..event(9) }]).await;
    assert!(matches!(dup, Err(EventStoreError::DuplicateEventId)), "{dup:?}");
}

#[tokio::test]
async fn concurrent_writers_to_one_stream_conflict_instead_of_interleaving() {
    let app = TestApp::spawn().await;
    let store = EventStore::new(app.ctx.app.pool.clone());
    let stream = format!("test-{}", Uuid::new_v4());
    store.append(&stream, ExpectedVersion::NoStream, &[event(0)]).await.unwrap();
    let attempts = (0..8).map(|n| {
        let store = store.clone();
        let stream = stream.clone();
        tokio::spawn(async move { store.append(&stream, ExpectedVersion::Exact(1), &[event(n)]).await })
    });
    let results = futures::future::join_all(attempts).await;
    let won = results.iter().filter(|r| r.as_ref().unwrap().is_ok()).count();
    assert_eq!(won, 1, "exactly one writer may append at version 2");
    assert!(results.iter().filter_map(|r| r.as_ref().unwrap().as_ref().err()).all(EventStoreError::is_conflict));
}

/// The trap of DESIGN.md: a transaction that took its position first but commits last
/// must not be skipped by a reader that has already moved past later positions.
#[tokio::test]
async fn a_transaction_that_commits_late_is_not_skipped() {
    let app = TestApp::spawn().await;
    let pool = app.ctx.app.pool.clone();
    let store = EventStore::new(pool.clone());

    // A appends first (smaller position) and holds its transaction open.
    let mut held = pool.get().await.unwrap();
    let held_tx = held.transaction().await.unwrap();
    let late = eventstore::append(&held_tx, "test-late", ExpectedVersion::Any, &[event(1)]).await.unwrap();

    // B appends after it and commits at once.
    let early = store.append("test-early", ExpectedVersion::Any, &[event(2)]).await.unwrap();
    assert!(late[0].position < early[0].position);

    // A naive "position > checkpoint" reader would see B now and move past A's position.
    let first_pass = store.read_all(GlobalPosition::START, 100).await.unwrap();
    assert!(first_pass.iter().all(|e| e.id != late[0].id), "A is not committed yet");
    let checkpoint = first_pass.last().map_or(GlobalPosition::START, |e| e.global_position());

    held_tx.commit().await.unwrap();
    // Other tests' transactions on the same server may hold the horizon back a moment:
    // poll from the checkpoint as the relay does until both events are in.
    let mut seen: Vec<Uuid> = first_pass.iter().map(|e| e.id).collect();
    let mut checkpoint = checkpoint;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(seen.contains(&late[0].id) && seen.contains(&early[0].id)) {
        assert!(tokio::time::Instant::now() < deadline, "the late commit was skipped: saw {seen:?}");
        let batch = store.read_all(checkpoint, 100).await.unwrap();
        if let Some(last) = batch.last() {
            checkpoint = last.global_position();
        }
        seen.extend(batch.iter().map(|e| e.id));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let late_index = seen.iter().position(|id| *id == late[0].id).unwrap();
    let early_index = seen.iter().position(|id| *id == early[0].id).unwrap();
    assert!(late_index < early_index, "read in commit order of transactions, the earlier transaction first");
    assert_eq!(seen.len(), seen.iter().collect::<HashSet<_>>().len(), "no event is read twice");
}

/// Many writers with randomly delayed commits, one reader polling from its checkpoint
/// the whole time: every event is read exactly once, each stream in version order.
#[tokio::test]
async fn a_polling_reader_sees_every_event_once_under_concurrent_delayed_commits() {
    let app = TestApp::spawn().await;
    let pool = app.ctx.app.pool.clone();
    let store = EventStore::new(pool.clone());
    const WRITERS: u64 = 8;
    const PER_WRITER: u64 = 25;

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..PER_WRITER {
                    let stream = format!("test-w{}", (w + i) % 5);
                    loop {
                        let mut client = pool.get().await.unwrap();
                        let tx = client.transaction().await.unwrap();
                        let e = event(w * 1000 + i);
                        match eventstore::append(&tx, &stream, ExpectedVersion::Any, std::slice::from_ref(&e)).await {
                            Ok(_) => {
                                // Hold the transaction a little: commits land out of position order.
                                tokio::time::sleep(Duration::from_millis((w * 7 + i * 13) % 23)).await;
                                tx.commit().await.unwrap();
                                ids.push(e.id);
                                break;
                            }
                            Err(error) if error.is_conflict() => continue,
                            Err(error) => panic!("{error}"),
                        }
                    }
                }
                ids
            })
        })
        .collect();

    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut checkpoint = GlobalPosition::START;
            let mut seen = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while (seen.len() as u64) < WRITERS * PER_WRITER && tokio::time::Instant::now() < deadline {
                let batch = store.read_all(checkpoint, 17).await.unwrap();
                if let Some(last) = batch.last() {
                    checkpoint = last.global_position();
                }
                seen.extend(batch);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            seen
        })
    };

    let mut written = HashSet::new();
    for writer in writers {
        written.extend(writer.await.unwrap());
    }
    let seen = reader.await.unwrap();
    let seen_ids: Vec<Uuid> = seen.iter().map(|e| e.id).collect();
    {
        let mut counts: HashMap<Uuid, usize> = HashMap::new();
        seen_ids.iter().for_each(|id| *counts.entry(*id).or_default() += 1);
        let dups: Vec<_> = seen
            .iter()
            .filter(|e| counts[&e.id] > 1)
            .map(|e| (e.id, e.stream.clone(), e.version, e.tx, e.position))
            .collect();
        let missing: Vec<_> = written.iter().filter(|id| !counts.contains_key(id)).collect();
        let extra: Vec<_> = seen
            .iter()
            .filter(|e| !written.contains(&e.id))
            .map(|e| (e.id, e.stream.clone(), e.version, e.tx, e.position))
            .collect();
        if !dups.is_empty() || !missing.is_empty() || !extra.is_empty() {
            let all = store.read_all(GlobalPosition::START, 1000).await.unwrap();
            let all: Vec<_> = all.iter().map(|e| (e.id, e.stream.clone(), e.version, e.tx, e.position)).collect();
            panic!(
                "dups {dups:?}\nmissing {missing:?}\nextra {extra:?}\nseen order {:?}\nall {all:?}",
                seen.iter().map(|e| (e.tx, e.position)).collect::<Vec<_>>()
            );
        }
    }
    assert_eq!(seen_ids.len(), written.len(), "every event read exactly once");
    assert_eq!(seen_ids.iter().copied().collect::<HashSet<_>>(), written);
    let mut last_version: HashMap<&str, i64> = HashMap::new();
    for e in &seen {
        let previous = last_version.insert(&e.stream, e.version).unwrap_or(0);
        assert_eq!(e.version, previous + 1, "stream {} read in version order", e.stream);
    }
}

/// The global order is numeric in the transaction id, also across a change in its
/// number of digits (9 < 10 < 100): sorting it as text once returned events out of
/// order and made a polling reader read one twice and stop short.
#[tokio::test]
async fn the_global_log_is_ordered_by_transaction_id_as_a_number() {
    let app = TestApp::spawn().await;
    let client = app.ctx.app.pool.get().await.unwrap();
    // Transactions this old have long finished on any cluster, so the horizon passes them.
    client
        .batch_execute(
            "INSERT INTO events (stream, version, id, type, data, metadata, tx) VALUES
             ('test-a', 1, gen_random_uuid(), 'T', '{}', '{}', '100'),
             ('test-b', 1, gen_random_uuid(), 'T', '{}', '{}', '9'),
             ('test-c', 1, gen_random_uuid(), 'T', '{}', '{}', '10')",
        )
        .await
        .unwrap();
    let store = EventStore::new(app.ctx.app.pool.clone());
    let all = store.read_all(GlobalPosition::START, 10).await.unwrap();
    assert_eq!(all.iter().map(|e| e.tx).collect::<Vec<_>>(), vec![9, 10, 100]);
    let after_nine = store.read_all(all[0].global_position(), 10).await.unwrap();
    assert_eq!(after_nine.iter().map(|e| e.tx).collect::<Vec<_>>(), vec![10, 100]);
    let mut tx_client = app.ctx.app.pool.get().await.unwrap();
    let snapshot = tx_client.transaction().await.unwrap();
    let replayed: Vec<_> =
        assetd::eventstore::stream_all_in_snapshot(&snapshot).await.unwrap().try_collect().await.unwrap();
    assert_eq!(replayed.iter().map(|e| e.tx).collect::<Vec<_>>(), vec![9, 10, 100]);
}
