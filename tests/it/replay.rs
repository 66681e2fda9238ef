//! `recap replay`: re-reading the whole stream through the same path changes no row.

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn replaying_the_whole_stream_changes_no_row() {
    let _shared = common::shared().await;
    let s = scenario(5).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let (rows_before, _) = run_until(&s, expected.len(), &[]).await;
    assert_eq!(rows_before, expected);
    let snapshot = |pool: sqlx::PgPool| async move {
        let v: Vec<(i32, String, chrono::NaiveDateTime, i32)> = sqlx::query_as(
            "SELECT id, summary_text, updated_at, revision FROM conversation_summaries ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let windows: Vec<(i64, String, i32)> =
            sqlx::query_as("SELECT id, state, version FROM recap_windows ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        (v, windows)
    };
    let before = snapshot(s.db.pool.clone()).await;
    let envs = recap_env(&s.db, Some(&s.nats));
    let (code, out, err) = run_recap(&["replay", "--from-seq", "1"], &envs);
    assert_eq!(code, 0, "replay failed: {out}{err}");
    let total = s.points.len();
    assert!(
        out.contains(&format!("replayed {total} event(s); 0 new message(s)")),
        "{out}"
    );
    let after = snapshot(s.db.pool.clone()).await;
    assert_eq!(before, after, "replay changed the table or the windows");
    // by time, too
    let (code, out, _) = run_recap(&["replay", "--since", "2020-01-01T00:00:00Z"], &envs);
    assert_eq!(code, 0);
    assert!(out.contains("0 new message(s)"), "{out}");
    assert_eq!(snapshot(s.db.pool.clone()).await, before);
}
