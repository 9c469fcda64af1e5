//! Text in: a model pushed with its HuggingFace tokenizer.json answers text through the OIP
//! API on a device (the tokenizer travels as signed chunks beside the model), token ids keep
//! working, bad text is a 400 that names it, and a push that asks to truncate cuts and says so.

use cloud_coordinator::admin::PushQuery;
use cloud_coordinator::registry::TextOptions;
use cloud_coordinator::{AdminClient, PushOptions};
use edge_agent::Agent;
use model_zoo::encoder::CATALOG_TITLES;
use model_zoo::{DEFAULT_SEED, INTENTS, TextModel, vocab};
use outpost_test_support::agent::{agent_config, infer};
use outpost_test_support::coordinator::{placed, push, start_coordinator};
use outpost_test_support::eventually::eventually;
use outpost_test_support::http::{get_json, send};
use serde_json::{Value, json};

fn text_request(texts: &[&str]) -> Value {
    json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [texts.len()], "data": texts}]})
}

fn rows(reply: &Value, width: usize) -> Vec<Vec<f64>> {
    let values: Vec<f64> = serde_json::from_value(reply["outputs"][0]["data"].clone()).unwrap();
    values.chunks(width).map(<[f64]>::to_vec).collect()
}

fn argmax(row: &[f64]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_goes_in_and_answers_come_out_through_the_oip_api() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let tokenizer = vocab::tokenizer_json().into_bytes();

    let intents = TextModel::IntentClassifierText.bytes(DEFAULT_SEED).unwrap();
    let cascade = placed("cascade:intent_probs:0.5").tokenizer(tokenizer.clone());
    let published = push(&coordinator, "intent-classifier-text", &cascade, &intents).await;
    let edge = published.edge.as_ref().expect("an int8 edge variant");
    assert!(
        edge.accuracy
            .samples
            .contains("texts from the tokenizer's vocabulary"),
        "{}",
        edge.accuracy
    );

    let search = TextModel::VideoSearch.bytes(DEFAULT_SEED).unwrap();
    let truncating = PushOptions {
        query: PushQuery {
            text: TextOptions {
                name: Some("query".into()),
                max_tokens: Some(16),
                truncate: true,
            },
            ..PushQuery::default()
        },
        ..PushOptions::default()
    }
    .tokenizer(tokenizer.clone());
    push(&coordinator, "video-search", &truncating, &search).await;

    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    eventually("both text models serve", || {
        agent.active_version("intent-classifier-text") == Some(1)
            && agent.active_version("video-search") == Some(1)
    })
    .await;

    // Metadata shows the text input first, and what tokenizes it.
    let (status, meta) = get_json(agent.api_addr, "/v2/models/intent-classifier-text").await;
    assert_eq!(status, 200, "{meta}");
    assert_eq!(
        meta["inputs"][0],
        json!({"name": "text", "datatype": "BYTES", "shape": [-1]})
    );
    assert_eq!(meta["inputs"][1]["name"], "input_ids");
    let text = &meta["parameters"]["text_input"];
    assert_eq!(text["tokenizer"], "WordPiece");
    assert_eq!(text["max_tokens"], 512);
    assert_eq!(
        text["token_inputs"],
        json!(["input_ids", "attention_mask", "token_type_ids"])
    );

    // Text in, answers out: the messages land on their intents.
    let messages = ["refund my order", "i cannot log in", "talk to a human"];
    let (status, reply) = infer(&agent, "intent-classifier-text", &text_request(&messages)).await;
    assert_eq!(status, 200, "{reply}");
    let by_text = rows(&reply, INTENTS.len());
    let top: Vec<&str> = by_text.iter().map(|r| INTENTS[argmax(r)]).collect();
    assert_eq!(top, ["refund_request", "login_problem", "talk_to_human"]);
    assert!(reply["parameters"].get("truncated").is_none(), "{reply}");

    // Token ids still work, and give the same answer as the text.
    let t = tokenizers::Tokenizer::from_bytes(&tokenizer).unwrap();
    let e = t.encode("refund my order", true).unwrap();
    let ids: Vec<i64> = e.get_ids().iter().map(|&v| i64::from(v)).collect();
    let n = ids.len();
    let ids_request = json!({"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, n], "data": ids},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, n], "data": vec![1; n]},
        {"name": "token_type_ids", "datatype": "INT64", "shape": [1, n], "data": vec![0; n]},
    ]});
    let (status, reply) = infer(&agent, "intent-classifier-text", &ids_request).await;
    assert_eq!(status, 200, "{reply}");
    let by_ids = &rows(&reply, INTENTS.len())[0];
    for (a, b) in by_ids.iter().zip(&by_text[0]) {
        assert!((a - b).abs() < 1e-4, "ids {a} against text {b}");
    }

    // Bad text is the caller's: a 400 that names it.
    let long = "piano ".repeat(600);
    let cases = [
        (text_request(&["fine", ""]), "element 1 is empty"),
        (text_request(&[&long]), "more than this model's 512"),
        (
            json!({"inputs": [{"name": "text", "datatype": "INT64", "shape": [1], "data": [3]}]}),
            "must be BYTES",
        ),
    ];
    for (body, needle) in cases {
        let (status, reply) = infer(&agent, "intent-classifier-text", &body).await;
        assert_eq!(status, 400, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains(needle), "{reply}");
    }
    let mut both = ids_request.clone();
    both["inputs"]
        .as_array_mut()
        .unwrap()
        .push(text_request(&["x"])["inputs"][0].clone());
    let (status, reply) = infer(&agent, "intent-classifier-text", &both).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("not both"),
        "{reply}"
    );
    // Bytes that are not UTF-8 can only come as binary data.
    let bad = [0xffu8, 0xfe];
    let mut element = (bad.len() as u32).to_le_bytes().to_vec();
    element.extend_from_slice(&bad);
    let header = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
        "parameters": {"binary_data_size": element.len()}}]})
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&element);
    let answer = send(
        agent.api_addr,
        outpost_runtime::http::Request::post("/v2/models/intent-classifier-text/infer", body)
            .header("Inference-Header-Content-Length", header.len().to_string()),
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert!(answer.text().contains("not UTF-8"), "{}", answer.text());

    // The search model takes its text as "query", cuts long queries to 16 tokens and says so.
    let query = |texts: &[&str]| json!({"inputs": [{"name": "query", "datatype": "BYTES", "shape": [texts.len()], "data": texts}]});
    let rambling = "calm piano for study ".repeat(10);
    let (status, reply) = infer(
        &agent,
        "video-search",
        &query(&["rock concert live", &rambling]),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["parameters"]["truncated"], json!([1]), "{reply}");
    let scores = rows(&reply, CATALOG_TITLES.len());
    assert_eq!(CATALOG_TITLES[argmax(&scores[0])], "live rock concert");
    assert_eq!(CATALOG_TITLES[argmax(&scores[1])], "calm piano for study");

    // The coordinator refuses a tokenizer that is not the model's, or not a tokenizer.
    let admin = AdminClient::of(&coordinator);
    let big_vocab = {
        let mut doc: Value = serde_json::from_slice(&tokenizer).unwrap();
        let vocab = doc["model"]["vocab"].as_object_mut().unwrap();
        for i in 0..5000 {
            vocab.insert(format!("extra{i}"), json!(1000 + i));
        }
        doc.to_string().into_bytes()
    };
    let too_long = PushQuery {
        text: TextOptions {
            max_tokens: Some(600),
            ..TextOptions::default()
        },
        ..PushQuery::default()
    };
    for (json, query, needle) in [
        (
            big_vocab,
            PushQuery::default(),
            "it is not this model's tokenizer",
        ),
        (b"{\"nope\": 1}".to_vec(), PushQuery::default(), "tokenizer"),
        // The position table holds 512.
        (
            tokenizer.clone(),
            too_long,
            "the model does not run on 600 tokens",
        ),
    ] {
        let options = PushOptions {
            query,
            ..PushOptions::default()
        };
        let err = admin
            .push(
                "intent-classifier-text",
                intents.clone(),
                &options.tokenizer(json),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// The classification extension: an output asked for with `parameters.classification: N`
/// answers the top N intents per text by the labels the model carries (`outpost.labels`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_answer_their_top_classes_by_label() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let model = TextModel::IntentClassifierText.bytes(DEFAULT_SEED).unwrap();
    let options = placed("local").tokenizer(vocab::tokenizer_json().into_bytes());
    push(&coordinator, "intents", &options, &model).await;
    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    eventually("intents served", || {
        agent.active_version("intents") == Some(1)
    })
    .await;
    let (status, server) = get_json(agent.api_addr, "/v2").await;
    assert_eq!(status, 200);
    assert!(
        server["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("classification")),
        "{server}"
    );
    let texts = ["refund my order", "the video keeps buffering"];
    let (status, plain) = infer(&agent, "intents", &text_request(&texts)).await;
    assert_eq!(status, 200, "{plain}");
    let probs = rows(&plain, INTENTS.len());
    let mut body = text_request(&texts);
    body["outputs"] = json!([{"name": "intent_probs", "parameters": {"classification": 3}}]);
    let (status, reply) = infer(&agent, "intents", &body).await;
    assert_eq!(status, 200, "{reply}");
    let out = &reply["outputs"][0];
    assert_eq!(out["datatype"], "BYTES", "{reply}");
    assert_eq!(out["shape"], json!([2, 3]), "{reply}");
    let classes: Vec<String> = serde_json::from_value(out["data"].clone()).unwrap();
    for (row, top) in probs.iter().zip(classes.chunks(3)) {
        let best = argmax(row);
        let parts: Vec<&str> = top[0].split(':').collect();
        assert_eq!(parts.len(), 3, "{top:?}");
        assert_eq!(parts[1], best.to_string(), "{top:?} vs {row:?}");
        assert_eq!(parts[2], INTENTS[best], "{top:?}");
        let score: f64 = parts[0].parse().unwrap();
        assert!((score - row[best]).abs() < 1e-5, "{score} vs {}", row[best]);
    }
    body["outputs"] = json!([{"name": "intent_probs", "parameters": {"classification": 0}}]);
    let (status, reply) = infer(&agent, "intents", &body).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("classification"),
        "{reply}"
    );
    agent.shutdown().await;
    coordinator.shutdown().await;
}
