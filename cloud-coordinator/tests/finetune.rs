//! Fine-tuning a head at an in-process coordinator, on the model-zoo's labelled data sets: the
//! gate, the delta devices fetch, refusals with their figures and line numbers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};

use cloud_coordinator::admin::{FinetuneEvent, Stage};
use cloud_coordinator::finetune::FinetuneQuery;
use cloud_coordinator::registry::Quantize;
use cloud_coordinator::{AdminError, PushOptions};
use common::*;
use model_zoo::labelled::labelled_examples;
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_runtime::http::Method;
use outpost_shared::{Placement, Target};

fn refusal<T: std::fmt::Debug>(result: Result<T, AdminError>) -> (u16, String) {
    match result {
        Err(AdminError::Status { status, message }) => (status.as_u16(), message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_intent_rule_is_learnt_published_as_a_small_delta_and_not_learnt_twice() {
    let c = start().await;
    let cascade = PushOptions::default().placement(Placement::Cascade {
        output: "intent_probs".into(),
        threshold: 0.6,
    });
    let bytes = DemoModel::IntentClassifier.bytes(DEFAULT_SEED);
    c.push("intent-classifier", &cascade, &bytes).await;
    let data = labelled_examples(DemoModel::IntentClassifier, DEFAULT_SEED, 7, 10_000).unwrap();

    // A dry run: judged, a canary by default, nothing published. Its progress streams; a
    // second fine-tune while it runs is refused (`[registry] max_finetunes` is 1).
    let events = Arc::new(Mutex::new(Vec::new()));
    let (first_features, features_seen) = tokio::sync::oneshot::channel();
    let first_features = Mutex::new(Some(first_features));
    let seen = Arc::clone(&events);
    let client = c
        .client()
        .on_finetune(Arc::new(move |event: &FinetuneEvent| {
            if matches!(event, FinetuneEvent::Features { .. })
                && let Some(tx) = first_features.lock().unwrap().take()
            {
                let _ = tx.send(());
            }
            seen.lock().unwrap().push(event.clone());
        }));
    let query = FinetuneQuery {
        dry_run: true,
        ..FinetuneQuery::default()
    };
    let dry = client.finetune("intent-classifier", data.clone().into_bytes(), &query);
    let second = async {
        features_seen.await.unwrap();
        let path = format!("/v1/models/intent-classifier/finetune?{}", query.to_query());
        c.admin(Method::POST, &path, data.as_bytes()).await
    };
    let (dry, (status, refused)) = tokio::join!(dry, second);
    assert_eq!(status, 429, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("registry.max_finetunes"),
        "{refused}"
    );
    let dry = dry.unwrap();
    let published = dry.published.as_ref().unwrap();
    assert!(published.dry_run);
    assert_eq!(published.stage, Stage::Candidate);
    assert_eq!(c.client().models().await.unwrap()[0].versions, [1]);
    // The stream told every stage in order, the features as they went, and ended with the
    // answer (200: a dry run).
    let events = events.lock().unwrap().clone();
    assert!(
        matches!(events[0], FinetuneEvent::Read { examples: 10_000 }),
        "{events:?}"
    );
    let features: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            FinetuneEvent::Features { done, total, .. } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    assert!(features.len() >= 10, "{features:?}");
    assert!(features.windows(2).all(|w| w[0].0 < w[1].0), "{features:?}");
    assert_eq!(features.last(), Some(&(10_000, 10_000)));
    let n = events.len();
    assert!(
        matches!(
            &events[n - 3..],
            [
                FinetuneEvent::Training { examples },
                FinetuneEvent::Publishing,
                FinetuneEvent::Done { status: 200, report: Some(_), error: None },
            ] if *examples == dry.train
        ),
        "{events:?}"
    );

    let report = c
        .client()
        .finetune(
            "intent-classifier",
            data.clone().into_bytes(),
            &FinetuneQuery {
                rollout: Some(100),
                ..FinetuneQuery::default()
            },
        )
        .await
        .unwrap();
    eprintln!(
        "{}; features {:.2} s ({:.0}/s), training {:.2} s, {} iterations",
        cloud_coordinator::finetune::describe(&report),
        report.features_s,
        report.examples_per_s,
        report.train_s,
        report.iterations
    );
    assert_eq!((report.head.inputs, report.head.outputs), (128, 16));
    assert_eq!((report.examples, report.holdout), (10_000, 2000));
    // The old head knows nothing of the rule; the new one learnt it.
    assert!(report.old.accuracy.unwrap() < 0.2, "{report:?}");
    assert!(report.new.accuracy.unwrap() >= 0.9, "{report:?}");
    assert!(report.new.log_loss < report.old.log_loss);
    let published = report.published.as_ref().unwrap();
    assert_eq!((published.version, published.stage), (2, Stage::Stable));
    // The int8 variant passed its gate again, and devices fetch only the head's chunks.
    assert!(published.edge.is_some());
    let edge = published
        .delta
        .iter()
        .find(|d| d.target == Target::EdgeInt8)
        .unwrap();
    eprintln!("edge delta: {} of {} bytes", edge.new_bytes, edge.bytes);
    assert!(
        edge.new_bytes > 0 && edge.new_bytes * 50 <= edge.bytes,
        "{edge:?}"
    );
    assert_eq!(edge.against_version, Some(1));

    // The same data again: the head already knows the rule, so nothing is better by 1 point.
    let (status, message) = refusal(
        c.client()
            .finetune(
                "intent-classifier",
                data.into_bytes(),
                &FinetuneQuery::default(),
            )
            .await,
    );
    assert_eq!(status, 422, "{message}");
    assert!(
        message.contains("not better") && message.contains("accuracy") && message.contains('→'),
        "{message}"
    );
    assert_eq!(c.client().models().await.unwrap()[0].versions, [1, 2]);

    // Bad data is refused with the line numbers.
    let good = r#"{"inputs":[{"name":"token_ids","shape":[1,2],"datatype":"INT64","data":[4,5]}],"label":1}"#;
    let mut lines = vec![good; 30];
    lines[4] = r#"{"inputs":[{"name":"token_ids","shape":[1,2],"datatype":"INT64","data":[4,5]}],"label":"dance"}"#;
    lines[9] = "{";
    let (status, message) = refusal(
        c.client()
            .finetune(
                "intent-classifier",
                lines.join("\n").into_bytes(),
                &FinetuneQuery::default(),
            )
            .await,
    );
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("2 bad line(s)")
            && message.contains("line 5: label \"dance\"")
            && message.contains("line 10: not JSON"),
        "{message}"
    );
    // Without `Accept: application/x-ndjson` the answer is plain JSON.
    let (status, message) = c
        .admin(Method::POST, "/v1/models/nope/finetune", good.as_bytes())
        .await;
    assert_eq!(status, 404, "{message}");
    assert!(
        message["error"].as_str().unwrap().contains("nope"),
        "{message}"
    );
    c.handle.shutdown().await;
}

/// A text model learns from the text itself: its tokenizer, pushed with it, tokenizes the
/// examples, and the fine-tuned version keeps the tokenizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_model_is_fine_tuned_on_text_and_keeps_its_tokenizer() {
    let c = start().await;
    let cascade = PushOptions::default()
        .placement(Placement::Cascade {
            output: "intent_probs".into(),
            threshold: 0.6,
        })
        .tokenizer(model_zoo::vocab::tokenizer_json().into_bytes());
    let bytes = model_zoo::TextModel::IntentClassifierText
        .bytes(DEFAULT_SEED)
        .unwrap();
    c.push("intent-classifier-text", &cascade, &bytes).await;
    let data = model_zoo::labelled::text_examples(7, 2000);
    assert!(
        data.lines().next().unwrap().starts_with("{\"label\":"),
        "{data:.200}"
    );
    let report = c
        .client()
        .finetune(
            "intent-classifier-text",
            data.into_bytes(),
            &FinetuneQuery {
                rollout: Some(100),
                ..FinetuneQuery::default()
            },
        )
        .await
        .unwrap();
    eprintln!("{}", cloud_coordinator::finetune::describe(&report));
    assert_eq!((report.head.inputs, report.head.outputs), (128, 16));
    assert!(report.old.accuracy.unwrap() < 0.1, "{report:?}");
    assert!(report.new.accuracy.unwrap() >= 0.9, "{report:?}");
    let published = report.published.as_ref().unwrap();
    assert_eq!(published.version, 2);
    let models = c.client().models().await.unwrap();
    let text = models[0]
        .text
        .as_ref()
        .expect("version 2 keeps its text input");
    assert_eq!(text.name, "text");
    assert_eq!(text.max_tokens, 512);

    // Text where the model has no tokenizer is a bad line that says so.
    let plain = DemoModel::IntentClassifier.bytes(DEFAULT_SEED);
    let fp32 = PushOptions::default().quantize(Quantize::None);
    c.push("intent-classifier", &fp32, &plain).await;
    let (status, message) = refusal(
        c.client()
            .finetune(
                "intent-classifier",
                model_zoo::labelled::text_examples(7, 200).into_bytes(),
                &FinetuneQuery::default(),
            )
            .await,
    );
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("the model has no tokenizer"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_score_head_is_retrained_and_a_model_without_its_fp32_file_is_refused() {
    let c = start().await;
    let fp32 = PushOptions {
        query: cloud_coordinator::admin::PushQuery {
            quantize: Some(Quantize::None),
            ..PushOptions::default().placement(Placement::Local).query
        },
        ..PushOptions::default()
    };
    let bytes = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    c.push("video-ranker", &fp32, &bytes).await;
    let data = labelled_examples(DemoModel::VideoRanker, DEFAULT_SEED, 3, 2000).unwrap();
    let report = c
        .client()
        .finetune(
            "video-ranker",
            data.clone().into_bytes(),
            &FinetuneQuery::default(),
        )
        .await
        .unwrap();
    eprintln!("{}", cloud_coordinator::finetune::describe(&report));
    assert!(report.new.auc.unwrap() >= 0.9, "{report:?}");
    assert!(
        report.new.auc.unwrap() > report.old.auc.unwrap() + 0.2,
        "{report:?}"
    );
    let published = report.published.unwrap();
    assert_eq!(published.stage, Stage::Candidate);
    let models = c.client().models().await.unwrap();
    assert!(models[0].gate.is_some(), "a canary under the health gate");

    // Local and int8: the fp32 file is not kept, so there is nothing to retrain.
    c.push(
        "ranker-int8",
        &PushOptions::default().placement(Placement::Local),
        &bytes,
    )
    .await;
    let (status, message) = refusal(
        c.client()
            .finetune("ranker-int8", data.into_bytes(), &FinetuneQuery::default())
            .await,
    );
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("keeps only its int8 edge variant"),
        "{message}"
    );
    c.handle.shutdown().await;
}
