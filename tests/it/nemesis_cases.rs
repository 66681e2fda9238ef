//! What `scripts/nemesis` found, as pure reproductions (no service needed), each failing before its fix.

use recap::state::State;
use recap::tracker::{Observed, TrackerConfig};

/// Nemesis finding 1 (issue 24 case 1 under a partition move): a bot host 12 s fast (idle gap 4 s) writes 3
/// messages; they are windowed at arrival. The partition moves (a takeover, a handback to a replica over its share, a
/// failed checkpoint or a forget's epoch bump) while their window is open: the new leader restores the window from
/// its snapshot row, which keeps the points' effective times but not that they were stamped ahead of the clock
/// (`KeyBuf::clamped` lives in memory only). So the close neither remembers them (`closed_clamped`) nor stores them
/// (`recap_clamped_points`), its `Closed::clamped` is false (no key-wide check in the sink), and the sweep's read at
/// their stamps, once the clock passed them, opens a second window with the same points. Seen by the nemesis in every
/// failing schedule (seeds 1, 100, 101, 102): every doubled window's first window was open across a change of its
/// partition's epoch; without faults (seeds 11, 12) none.
#[test]
fn a_fast_hosts_window_open_across_a_restore_is_windowed_once() {
    let cfg = TrackerConfig {
        idle_gap_ms: 4_000,
        lateness_ms: 1_000,
        ..TrackerConfig::default()
    };
    const FAST: i64 = 12_000;
    // the reference: no restore, the points read again at their stamps are duplicates
    let mut s = State::new(cfg);
    for i in 0..3 {
        s.observe("b", "f", &format!("p{i}"), i * 1000 + FAST, i * 1000);
    }
    s.tick(10_000);
    assert_eq!(s.close_due(), 1);
    for i in 0..3 {
        assert_eq!(
            s.observe("b", "f", &format!("p{i}"), i * 1000 + FAST, 20_000),
            Some(Observed::Duplicate),
            "without a restore"
        );
    }

    // the same, with the partition moving while the window is open
    let mut s = State::new(cfg);
    for i in 0..3 {
        s.observe("b", "f", &format!("p{i}"), i * 1000 + FAST, i * 1000);
    }
    let c = s.take_checkpoint();
    let watermarks: Vec<(String, i64)> = c
        .watermarks
        .iter()
        .map(|(b, w)| (b.to_string(), *w))
        .collect();
    let mut r = State::restore(cfg, watermarks, c.snapshots);
    // what `restore_state` does with the rows of `recap_clamped_points` the checkpoint stored
    r.remember_clamped(c.clamped.iter().cloned());
    r.tick(10_000);
    assert_eq!(r.close_due(), 1);
    let closed = r.take_checkpoint();
    for i in 0..3 {
        assert_eq!(
            r.observe("b", "f", &format!("p{i}"), i * 1000 + FAST, 20_000),
            Some(Observed::Duplicate),
            "p{i} read at its stamp after the restore"
        );
    }
    assert!(
        closed.closed[0].clamped,
        "the restored window's points were stamped ahead of the clock (the sink's key-wide check)"
    );
}

/// Nemesis finding 2: a late message that bridges two stored windows deletes the later window's summary row in the
/// checkpoint transaction, which does not reach Qdrant, so that row's vector in `recap_summaries` stayed for good
/// (seed 1 left one). The repair pass now removes the vectors (and entries) of rows that are gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_rows_vector_is_removed_by_the_repair_pass() {
    let _g = crate::common::shared().await;
    let db = crate::common::fresh_db().await;
    db.migrate().await;
    let store = recap::sink::Store::connect_lazy(db.url.parse().unwrap(), 2);
    let q = crate::common::qdrant().await;
    let (bot, user) = ("nemesisbot", format!("n2-{}", crate::common::token()));
    let mut ids = Vec::new();
    for k in 0..2 {
        let id: i32 = sqlx::query_scalar(
            "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, start_timestamp, end_timestamp,
                 message_count)
             VALUES ($1, $2, 'a summary', now() + make_interval(mins => $3), now() + make_interval(mins => $3 + 1), 3)
             RETURNING id",
        )
        .bind(&user)
        .bind(bot)
        .bind(k * 10)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let r = recap::vectors::SummaryRef {
            id,
            bot: bot.into(),
            user_id: user.clone(),
            start: chrono::Utc::now().naive_utc(),
            end: chrono::Utc::now().naive_utc(),
            revision: 1,
            summary_type: "time_window".into(),
        };
        let dim = recap::vectors::collection_dim(&q)
            .await
            .unwrap()
            .unwrap_or(384) as usize;
        let v: Vec<f32> = (0..dim)
            .map(|i| ((i + k as usize) % 7) as f32 + 1.0)
            .collect();
        recap::vectors::upsert(
            &store,
            &q,
            &r,
            recap::vectors::normalize(&v.iter().map(|x| *x as f64).collect::<Vec<_>>()).unwrap(),
        )
        .await
        .unwrap();
        ids.push(id);
    }
    let count = |q: qdrant_client::Qdrant, user: String| async move {
        q.count(
            qdrant_client::qdrant::CountPointsBuilder::new(recap::vectors::COLLECTION)
                .filter(qdrant_client::qdrant::Filter::must([
                    qdrant_client::qdrant::Condition::matches("user_id", user),
                ]))
                .exact(true),
        )
        .await
        .unwrap()
        .result
        .unwrap()
        .count
    };
    assert_eq!(count(q.clone(), user.clone()).await, 2);
    // the merge: the later window's row is deleted in the checkpoint transaction
    sqlx::query("DELETE FROM conversation_summaries WHERE id = $1")
        .bind(ids[1])
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        count(q.clone(), user.clone()).await,
        2,
        "the deleted row's vector is still there"
    );
    let removed = recap::vectors::drop_deleted(&store, &q, 500).await.unwrap();
    assert_eq!(removed, 1);
    assert_eq!(
        count(q.clone(), user.clone()).await,
        1,
        "only the live row's vector is left"
    );
    let entries: Vec<i32> =
        sqlx::query_scalar("SELECT summary_id FROM recap_summary_vectors ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(entries, vec![ids[0]]);
    assert_eq!(
        recap::vectors::drop_deleted(&store, &q, 500).await.unwrap(),
        0,
        "nothing left to remove"
    );
}
