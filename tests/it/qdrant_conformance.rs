//! Qdrant conformance from Rust: the operations recap uses, through `qdrant-client` 1.20 against QDRANT_URL.
//! The same test must pass against the repo's test server and against a real Qdrant (set QDRANT_URL to its gRPC
//! port), so it asserts only what Qdrant itself guarantees. When QDRANT_URL is the real server (scripts/services
//! starts it from ../shared/tools/qdrant where that exists: `RECAP_QDRANT_KIND=real`), the test server is started
//! here as well and checked the same way, so it stays honest for the clones that run without the real one.

use crate::common;

use std::collections::HashSet;

use common::*;
use qdrant_client::Qdrant;
use qdrant_client::QdrantError;
use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, DeletePointsBuilder, Direction, Distance, FieldType, Filter,
    GetPointsBuilder, OrderByBuilder, PayloadSchemaType, PointId, PointsIdsList, Range,
    RetrievedPoint, ScrollPointsBuilder, VectorsSelector, order_value, point_id::PointIdOptions,
    start_from, vector_output, vectors_config, vectors_output::VectorsOptions,
};

/// 2026-11-20T12:00:00.123Z: no timestamp is a whole second, so every `timestamp_unix` is a true float.
const T0: i64 = 1_763_640_000_123;
const USERS: [&str; 3] = [
    "111111111111111111",
    "222222222222222222",
    "333333333333333333",
];

fn ts(p: &TestPoint) -> f64 {
    p.ts_ms as f64 / 1000.0
}

fn id_str(id: &Option<PointId>) -> String {
    match id.as_ref().and_then(|i| i.point_id_options.as_ref()) {
        Some(PointIdOptions::Uuid(u)) => u.clone(),
        Some(PointIdOptions::Num(n)) => n.to_string(),
        None => panic!("point without id"),
    }
}

fn ids(points: &[RetrievedPoint]) -> Vec<String> {
    points.iter().map(|p| id_str(&p.id)).collect()
}

fn named_vector(p: &RetrievedPoint, name: &str) -> Option<Vec<f32>> {
    let named = match p.vectors.as_ref()?.vectors_options.as_ref()? {
        VectorsOptions::Vectors(named) => named,
        VectorsOptions::Vector(_) => panic!("expected named vectors"),
    };
    let v = named.vectors.get(name)?;
    #[allow(deprecated)]
    Some(match &v.vector {
        Some(vector_output::Vector::Dense(d)) => d.data.clone(),
        _ => v.data.clone(),
    })
}

fn vector_names(p: &RetrievedPoint) -> HashSet<String> {
    match p.vectors.as_ref().and_then(|v| v.vectors_options.as_ref()) {
        Some(VectorsOptions::Vectors(named)) => named.vectors.keys().cloned().collect(),
        _ => HashSet::new(),
    }
}

/// The gRPC status of a failed call (code as text: tonic is not a direct dependency).
fn status_of<T: std::fmt::Debug>(r: Result<T, QdrantError>) -> (String, String) {
    match r {
        Err(QdrantError::ResponseError { status }) => {
            (format!("{:?}", status.code()), status.message().to_string())
        }
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

async fn count(q: &Qdrant, coll: &str, filter: Option<Filter>) -> u64 {
    let mut req = CountPointsBuilder::new(coll).exact(true);
    if let Some(f) = filter {
        req = req.filter(f);
    }
    q.count(req)
        .await
        .expect("count")
        .result
        .expect("count result")
        .count
}

#[tokio::test]
async fn qdrant_answers_like_qdrant() {
    let _shared = common::shared().await;
    conformance_at(env("QDRANT_URL")).await;
}

/// The repo's Qdrant-compatible test server (testsupport/qdrant_server.py), checked against the same assertions
/// the real server passes. Runs when QDRANT_URL is the real Qdrant; with the test server as QDRANT_URL the test
/// above already checks it.
#[tokio::test]
async fn the_test_server_answers_like_qdrant() {
    let _shared = common::shared().await;
    if std::env::var("RECAP_QDRANT_KIND").as_deref() != Ok("real") {
        eprintln!("QDRANT_URL is the test server: qdrant_answers_like_qdrant checks it");
        return;
    }
    let server = PyServer::start("testsupport/qdrant_server.py");
    conformance_at(server.base.clone()).await;
}

async fn conformance_at(url: String) {
    let q = Qdrant::from_url(&url).build().expect("qdrant client");
    let name = format!("conformance_rs_{}", token());
    let body = tokio::spawn(conformance(url, name.clone()));
    let outcome = body.await;
    // Clean up whatever happened, then report.
    let _ = q.delete_collection(&name).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    assert!(
        !q.collection_exists(&name).await.expect("exists"),
        "collection still there after delete"
    );
}

async fn conformance(url: String, name: String) {
    let q = Qdrant::from_url(&url).build().expect("qdrant client");

    // ---- create: 3 named 384-d cosine vectors, keyword index on user_id, float index on timestamp_unix
    assert!(!q.collection_exists(&name).await.expect("exists"));
    create_collection(&q, &name, true).await;
    assert!(q.collection_exists(&name).await.expect("exists"));
    assert!(
        !q.collection_exists(format!("{name}_missing"))
            .await
            .expect("exists")
    );

    // ---- upsert ~300 WhisperEngine-shaped points: 3 users interleaved in time, every timestamp distinct
    let mut points = Vec::new();
    for (u, user) in USERS.iter().enumerate() {
        points.extend(conversation(
            user,
            T0 + u as i64 * 37_000,
            50,
            120_000,
            false,
        ));
    }
    assert_eq!(points.len(), 300);
    let distinct: HashSet<i64> = points.iter().map(|p| p.ts_ms).collect();
    assert_eq!(distinct.len(), points.len(), "timestamps not distinct");
    upsert(&q, &name, &points).await;

    // ---- list / info
    let listed: Vec<String> = q
        .list_collections()
        .await
        .expect("list")
        .collections
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(listed.contains(&name), "{name} not listed");
    let info = q
        .collection_info(&name)
        .await
        .expect("info")
        .result
        .expect("info result");
    assert_eq!(info.points_count, Some(300));
    let schema = &info.payload_schema;
    assert_eq!(
        schema.get("user_id").map(|s| s.data_type),
        Some(PayloadSchemaType::Keyword as i32),
        "{schema:?}"
    );
    assert_eq!(
        schema.get("timestamp_unix").map(|s| s.data_type),
        Some(PayloadSchemaType::Float as i32),
        "{schema:?}"
    );
    assert_eq!(
        schema.get("timestamp_unix").and_then(|s| s.points),
        Some(300),
        "{schema:?}"
    );
    assert!(!schema.contains_key("role"), "{schema:?}");
    let vectors = info
        .config
        .as_ref()
        .and_then(|c| c.params.as_ref())
        .and_then(|p| p.vectors_config.as_ref())
        .and_then(|v| v.config.as_ref());
    match vectors {
        Some(vectors_config::Config::ParamsMap(m)) => {
            let mut names: Vec<&str> = m.map.keys().map(String::as_str).collect();
            names.sort();
            assert_eq!(names, ["content", "emotion", "semantic"]);
            for v in m.map.values() {
                assert_eq!((v.size, v.distance), (384, Distance::Cosine as i32));
            }
        }
        other => panic!("expected named vectors, got {other:?}"),
    }
    let _ = FieldType::Keyword; // the helper created the indexes with these types

    // ---- retrieve by ids, with payload and only the `content` vector; a missing id is simply absent
    let picked: Vec<&TestPoint> = [0usize, 7, 101, 202, 299]
        .iter()
        .map(|&i| &points[i])
        .collect();
    let mut want_ids: Vec<PointId> = picked.iter().map(|p| p.id.clone().into()).collect();
    want_ids.push(uuid::Uuid::new_v4().to_string().into());
    let got = q
        .get_points(
            GetPointsBuilder::new(&name, want_ids)
                .with_payload(true)
                .with_vectors(VectorsSelector {
                    names: vec!["content".into()],
                }),
        )
        .await
        .expect("retrieve")
        .result;
    let mut got_ids = ids(&got);
    got_ids.sort();
    let mut picked_ids: Vec<String> = picked.iter().map(|p| p.id.clone()).collect();
    picked_ids.sort();
    assert_eq!(got_ids, picked_ids);
    for r in &got {
        let orig = picked.iter().find(|p| p.id == id_str(&r.id)).unwrap();
        let sent = orig.to_point();
        assert_eq!(r.payload, sent.payload, "payload of {}", orig.id);
        assert_eq!(
            vector_names(r),
            HashSet::from(["content".to_string()]),
            "only `content` was asked for"
        );
        let v = named_vector(r, "content").expect("content vector");
        let want = embed(&orig.content, 1);
        assert_eq!(v.len(), 384);
        let max_diff = v
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff < 1e-5,
            "content vector of {} differs by {max_diff}",
            orig.id
        );
    }

    // ---- scroll with keyword match + float range (gte inclusive, lt exclusive): exactly the expected ids
    let user = USERS[1];
    let mut mine: Vec<&TestPoint> = points.iter().filter(|p| p.user_id == user).collect();
    mine.sort_by_key(|p| p.ts_ms);
    let (lo, hi) = (ts(mine[20]), ts(mine[70]));
    let expected: Vec<&TestPoint> = mine
        .iter()
        .copied()
        .filter(|p| lo <= ts(p) && ts(p) < hi)
        .collect();
    assert_eq!(expected.len(), 50);
    assert!(
        points
            .iter()
            .any(|p| p.user_id != user && lo <= ts(p) && ts(p) < hi),
        "other users' points lie in the range too (so the keyword filter matters)"
    );
    let window = Filter::must([
        Condition::matches("user_id", user.to_string()),
        Condition::range(
            "timestamp_unix",
            Range {
                gte: Some(lo),
                lt: Some(hi),
                ..Default::default()
            },
        ),
    ]);
    let page = q
        .scroll(
            ScrollPointsBuilder::new(&name)
                .filter(window.clone())
                .limit(1000)
                .with_payload(true),
        )
        .await
        .expect("scroll");
    assert!(page.next_page_offset.is_none());
    let got: HashSet<String> = ids(&page.result).into_iter().collect();
    let want: HashSet<String> = expected.iter().map(|p| p.id.clone()).collect();
    assert_eq!(got, want, "filtered scroll");
    assert!(
        page.result
            .iter()
            .all(|r| r.payload.get("user_id") == Some(&user.to_string().into()))
    );

    // ---- order_by timestamp_unix, both directions, with and without start_from (inclusive)
    let exp_ids: Vec<String> = expected.iter().map(|p| p.id.clone()).collect();
    let exp_ts: Vec<f64> = expected.iter().map(|p| ts(p)).collect();
    for (dir, reversed) in [(Direction::Asc, false), (Direction::Desc, true)] {
        let page = q
            .scroll(
                ScrollPointsBuilder::new(&name)
                    .filter(window.clone())
                    .limit(1000)
                    .order_by(OrderByBuilder::new("timestamp_unix").direction(dir as i32)),
            )
            .await
            .expect("ordered scroll");
        let mut want = exp_ids.clone();
        let mut want_ts = exp_ts.clone();
        if reversed {
            want.reverse();
            want_ts.reverse();
        }
        assert_eq!(ids(&page.result), want, "order_by {dir:?}");
        let order_values: Vec<Option<f64>> = page
            .result
            .iter()
            .map(|r| match r.order_value.as_ref().and_then(|o| o.variant) {
                Some(order_value::Variant::Float(f)) => Some(f),
                Some(order_value::Variant::Int(i)) => Some(i as f64),
                None => None,
            })
            .collect();
        assert_eq!(
            order_values,
            want_ts.iter().map(|t| Some(*t)).collect::<Vec<_>>(),
            "order_value {dir:?}"
        );
        assert!(
            page.next_page_offset.is_none(),
            "order_by pages by value, not offset"
        );
    }
    let from = exp_ts[11];
    let asc_from = q
        .scroll(
            ScrollPointsBuilder::new(&name)
                .filter(window.clone())
                .limit(5)
                .order_by(
                    OrderByBuilder::new("timestamp_unix")
                        .direction(Direction::Asc as i32)
                        .start_from(start_from::Value::Float(from)),
                ),
        )
        .await
        .expect("asc start_from");
    assert_eq!(ids(&asc_from.result), exp_ids[11..16], "asc from {from}");
    let desc_from = q
        .scroll(
            ScrollPointsBuilder::new(&name)
                .filter(window.clone())
                .limit(5)
                .order_by(
                    OrderByBuilder::new("timestamp_unix")
                        .direction(Direction::Desc as i32)
                        .start_from(start_from::Value::Float(from)),
                ),
        )
        .await
        .expect("desc start_from");
    let want_desc: Vec<String> = exp_ids[7..=11].iter().rev().cloned().collect();
    assert_eq!(ids(&desc_from.result), want_desc, "desc from {from}");

    // ---- order_by a field without a range index is an error (no index at all, and a keyword index)
    for key in ["role", "user_id"] {
        let r = q
            .scroll(
                ScrollPointsBuilder::new(&name)
                    .filter(window.clone())
                    .order_by(OrderByBuilder::new(key)),
            )
            .await;
        let (code, msg) = status_of(r);
        assert_eq!(code, "InvalidArgument", "order_by {key}: {msg}");
        assert!(
            msg.contains("No range index for `order_by` key"),
            "order_by {key}: {msg}"
        );
    }

    // ---- count with filters
    assert_eq!(count(&q, &name, None).await, 300);
    assert_eq!(count(&q, &name, Some(window.clone())).await, 50);
    assert_eq!(
        count(
            &q,
            &name,
            Some(Filter::must([Condition::matches(
                "user_id",
                user.to_string()
            )]))
        )
        .await,
        100
    );

    // ---- a range filter on the ISO `timestamp` string matches nothing (the old worker's bug)
    for range in [
        Range {
            gte: Some(lo),
            lt: Some(hi),
            ..Default::default()
        },
        Range {
            gte: Some(0.0),
            ..Default::default()
        },
    ] {
        let iso = Filter::must([Condition::range("timestamp", range)]);
        assert_eq!(count(&q, &name, Some(iso.clone())).await, 0);
        let page = q
            .scroll(ScrollPointsBuilder::new(&name).filter(iso).limit(1000))
            .await
            .expect("scroll on timestamp");
        assert!(page.result.is_empty());
    }

    // ---- delete by ids: counts drop, the points are gone
    let gone: Vec<&TestPoint> = expected
        .iter()
        .take(4)
        .copied()
        .chain(points.iter().take(6))
        .collect();
    let gone_ids: Vec<PointId> = gone.iter().map(|p| p.id.clone().into()).collect();
    q.delete_points(
        DeletePointsBuilder::new(&name)
            .points(PointsIdsList {
                ids: gone_ids.clone(),
            })
            .wait(true),
    )
    .await
    .expect("delete");
    assert_eq!(count(&q, &name, None).await, 290);
    assert_eq!(count(&q, &name, Some(window.clone())).await, 46);
    let left = q
        .get_points(GetPointsBuilder::new(&name, gone_ids))
        .await
        .expect("retrieve deleted")
        .result;
    assert!(left.is_empty(), "deleted points still retrievable");
    let info = q
        .collection_info(&name)
        .await
        .expect("info")
        .result
        .expect("info result");
    assert_eq!(info.points_count, Some(290));

    // ---- drop
    assert!(
        q.delete_collection(&name)
            .await
            .expect("delete collection")
            .result
    );
    assert!(!q.collection_exists(&name).await.expect("exists"));
}

/// Qdrant rejects a whole retrieve when one id is neither a UUID nor an unsigned integer (InvalidArgument), so a
/// window whose stored ids include one (stored before events were checked) would never be fetched: `fetch_window`
/// leaves such ids out, counts them, and returns the window's other messages.
#[tokio::test]
async fn an_unparseable_point_id_fails_a_retrieve_and_fetch_window_leaves_it_out() {
    let _shared = common::shared().await;
    let q = qdrant().await;
    let name = format!("badid_rs_{}", token());
    create_collection(&q, &name, true).await;
    let points = conversation(USERS[0], T0, 3, 60_000, true); // 3 user + 3 assistant + 3 pair points
    upsert(&q, &name, &points).await;
    let mut ids: Vec<String> = points.iter().map(|p| p.id.clone()).collect();
    ids.push("not-a-point-id".into());

    let direct: Vec<PointId> = ids
        .iter()
        .map(|i| recap::fetch::point_id_from_str(i))
        .collect();
    let (code, msg) = status_of(q.get_points(GetPointsBuilder::new(&name, direct)).await);
    assert_eq!(
        code, "InvalidArgument",
        "one bad id fails the request: {msg}"
    );

    let fetch = recap::fetch::Points::new(&env("QDRANT_URL"), None, Default::default()).unwrap();
    let range = (T0 - 1, T0 + 10 * 60_000);
    let (msgs, skipped) = fetch
        .fetch_window(std::slice::from_ref(&name), &ids, USERS[0], range)
        .await
        .expect("the good ids are fetched");
    let _ = q.delete_collection(&name).await;
    assert_eq!(msgs.len(), 6, "user and assistant messages, not the pairs");
    assert_eq!(skipped.get(&recap::fetch::SkipReason::BadPointId), Some(&1));
    assert_eq!(
        skipped.get(&recap::fetch::SkipReason::ConversationPair),
        Some(&3)
    );
}
