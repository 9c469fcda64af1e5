//! A coordinator in-process on loopback, with its embedded broker, real QUIC and sled: push,
//! announce, chunks, inference, refusals.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use cloud_coordinator::admin::Stage;
use cloud_coordinator::registry::Quantize;
use cloud_coordinator::{AdminClient, AdminError, PushOptions};
use common::*;
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_runtime::http::{Method, StatusCode};
use outpost_runtime::quantize::quantize_int8;
use outpost_shared::status::Health;
use outpost_shared::{
    DeviceStatus, ErrorKind, ManifestVerifier, Placement, Request, Response, Target, Tensor, Topic,
};
use tract_onnx::prelude::{
    self as tp, Framework as _, InferenceModelExt as _, IntoRunnable as _, IntoTValue as _,
};

fn verifier(c: &TestCoordinator) -> ManifestVerifier {
    ManifestVerifier::new(c.agent().fleet.manifest_keys)
}

fn local() -> PushOptions {
    PushOptions::default().placement(Placement::Local)
}

fn cascade(output: &str, threshold: f32) -> PushOptions {
    PushOptions::default().placement(Placement::Cascade {
        output: output.into(),
        threshold,
    })
}

/// A refused admin call's status and the server's message.
fn refusal<T: std::fmt::Debug>(result: Result<T, AdminError>) -> (StatusCode, String) {
    match result {
        Err(AdminError::Status { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_announces_a_signed_manifest_and_serves_every_chunk() {
    let c = start().await;
    let bytes = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    let reply = c.push("video-ranker", &local(), &bytes).await;
    assert_eq!(reply.version, 1);
    assert_eq!(reply.stage, Stage::Stable);
    // Devices run it, so the edge variant is int8 by default, and it is deterministic.
    let int8 = quantize_int8(&bytes).unwrap().bytes;
    assert_eq!(
        reply.edge.as_ref().unwrap().quantize.int8_bytes,
        int8.len() as u64
    );
    assert_eq!(reply.delta[0].target, Target::EdgeInt8);
    assert_eq!(reply.delta[0].against_version, None);
    assert_eq!(reply.delta[0].new_bytes, int8.len() as u64);

    // A plain MQTT subscriber gets the retained manifest, and it verifies with the fleet key.
    let topic = Topic::manifest("video-ranker").unwrap().name();
    let payload = first_message(&c.handle, &topic).await;
    let manifest = verifier(&c).verify_cbor(&payload, now()).unwrap();
    assert_eq!(
        (
            manifest.model.as_str(),
            manifest.release,
            manifest.stable.version
        ),
        ("video-ranker", 1, 1)
    );
    assert!(manifest.stable.variant(Target::EdgeFp32).is_none());
    let variant = manifest.stable.variant(Target::EdgeInt8).unwrap().clone();
    assert_eq!(variant.size, int8.len() as u64);
    assert_eq!(
        manifest
            .stable
            .inputs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["user_features", "item_ids"]
    );

    // A device fetches every chunk over QUIC; the reassembled bytes match the digest.
    let connection = c.quic().await;
    let hello = request(&connection, &hello()).await.unwrap();
    assert!(
        matches!(hello[..], [Response::Hello { protocol: 1, .. }]),
        "{hello:?}"
    );
    let ids: Vec<_> = variant.chunks.iter().map(|c| c.id).collect();
    let responses = request(&connection, &Request::GetChunks { ids: ids.clone() })
        .await
        .unwrap();
    let mut assembled = Vec::new();
    for (response, id) in responses.iter().zip(&ids) {
        let Response::Chunk { id: got, data } = response else {
            panic!("{response:?}")
        };
        assert_eq!(got, id);
        got.verify(data).unwrap();
        assembled.extend_from_slice(data);
    }
    assert_eq!(responses.len(), ids.len());
    variant.digest.verify(&assembled).unwrap();

    // Unknown ids get an answer, not a dropped stream.
    let unknown = outpost_shared::Digest::of(b"no such chunk");
    let responses = request(
        &connection,
        &Request::GetChunks {
            ids: vec![unknown, ids[0]],
        },
    )
    .await
    .unwrap();
    assert!(
        matches!(&responses[..], [Response::ChunkMissing { id }, Response::Chunk { .. }] if *id == unknown),
        "{responses:?}"
    );

    // More ids than one request may name: refused with the limit, before any chunk is read.
    let too_many = vec![ids[0]; outpost_shared::frame::MAX_CHUNKS_PER_REQUEST + 1];
    let responses = request(&connection, &Request::GetChunks { ids: too_many })
        .await
        .unwrap();
    assert!(
        matches!(&responses[..], [Response::Error { kind: ErrorKind::BadRequest, message }] if message.contains("at most 256")),
        "{responses:?}"
    );
    // Exactly the limit is served.
    let at_limit = vec![ids[0]; outpost_shared::frame::MAX_CHUNKS_PER_REQUEST];
    let responses = request(&connection, &Request::GetChunks { ids: at_limit })
        .await
        .unwrap();
    assert_eq!(
        responses.len(),
        outpost_shared::frame::MAX_CHUNKS_PER_REQUEST
    );

    // A wrong protocol version and a malformed frame are answered with errors.
    let responses = request(
        &connection,
        &Request::Hello {
            protocol: 99,
            agent_version: "x".into(),
        },
    )
    .await
    .unwrap();
    assert!(
        matches!(
            &responses[..],
            [Response::Error {
                kind: ErrorKind::UnsupportedProtocol,
                ..
            }]
        ),
        "{responses:?}"
    );
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    send.finish().unwrap();
    let bytes = recv.read_to_end(1 << 20).await.unwrap();
    let (response, _) = outpost_shared::frame::decode::<Response>(&bytes, 1 << 20)
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            response,
            Response::Error {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{response:?}"
    );

    let metrics = c.client().metrics().await.unwrap();
    assert!(
        metrics.contains(&format!(
            "outpost_chunks_served_total {}",
            ids.len() + 1 + outpost_shared::frame::MAX_CHUNKS_PER_REQUEST
        )),
        "{metrics}"
    );
    assert!(metrics.contains("outpost_pushes_total 1"));
    c.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_devices_of_the_fleet_get_in() {
    let c = start().await;
    let agent = c.agent();
    // No client certificate: the handshake is refused, or the first request fails.
    let refused = match connect_with(c.handle.quic_addr, client_config(&agent, false)).await {
        Err(_) => true,
        Ok(conn) => request(&conn, &hello()).await.is_err(),
    };
    assert!(refused, "a client without a device certificate was served");

    // A device of another fleet is refused too.
    let other = start().await;
    let foreign = match connect(c.handle.quic_addr, &other.agent()).await {
        Err(_) => true,
        Ok(conn) => request(&conn, &hello()).await.is_err(),
    };
    assert!(foreign, "a device of another fleet was served");

    // The fleet's own device is served.
    let conn = connect(c.handle.quic_addr, &agent).await.unwrap();
    assert!(request(&conn, &hello()).await.is_ok());
    c.handle.shutdown().await;
    other.handle.shutdown().await;
}

/// The coordinator's engine and the plan built here are two tract plans of one model: they may
/// pick other kernels (AVX-512 or not) and sum in another order, so agree within rounding.
const PLAN_RELATIVE_TOLERANCE: f32 = 1e-5;
/// The same, near zero (where a relative bound means nothing).
const PLAN_ABSOLUTE_TOLERANCE: f32 = 1e-6;

fn assert_close(got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{got:?} vs {expected:?}");
    for (g, e) in got.iter().zip(expected) {
        let bound = PLAN_ABSOLUTE_TOLERANCE + PLAN_RELATIVE_TOLERANCE * g.abs().max(e.abs());
        assert!((g - e).abs() <= bound, "{got:?} vs {expected:?}");
    }
}

fn tract_run(bytes: &[u8], inputs: &[Tensor]) -> Vec<f32> {
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let values: tp::TVec<tp::TValue> = inputs
        .iter()
        .map(|t| {
            let shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
            match t.datatype() {
                outpost_shared::DataType::Fp32 => {
                    tp::Tensor::from_shape(&shape, &t.to_values::<f32>().unwrap())
                        .unwrap()
                        .into_tvalue()
                }
                _ => tp::Tensor::from_shape(&shape, &t.to_values::<i64>().unwrap())
                    .unwrap()
                    .into_tvalue(),
            }
        })
        .collect();
    plan.run(values).unwrap()[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_over_quic_matches_tract_and_refuses_bad_inputs() {
    let c = start().await;
    let bytes = DemoModel::IntentClassifier.bytes(DEFAULT_SEED);
    c.push("intent-classifier", &cascade("intent_probs", 0.6), &bytes)
        .await;
    let tokens: Vec<i64> = (0..24).map(|i| (i * 311) % 8000).collect();
    let inputs = vec![Tensor::from_values("token_ids", vec![2, 12], &tokens).unwrap()];
    let connection = c.quic().await;
    let infer = |inputs: Vec<Tensor>, model: &str| Request::Infer {
        model: model.into(),
        version: None,
        inputs,
        outputs: vec![],
    };
    let responses = request(&connection, &infer(inputs.clone(), "intent-classifier"))
        .await
        .unwrap();
    let [
        Response::Inferred {
            version, outputs, ..
        },
    ] = &responses[..]
    else {
        panic!("{responses:?}")
    };
    assert_eq!(*version, 1);
    assert_eq!(outputs[0].name(), "intent_probs");
    assert_eq!(outputs[0].shape(), &[2, 16]);
    assert_close(
        &outputs[0].to_values::<f32>().unwrap(),
        &tract_run(&bytes, &inputs),
    );

    let cases = [
        (
            infer(
                vec![Tensor::from_values("token_ids", vec![2, 12], &[1.0f32; 24]).unwrap()],
                "intent-classifier",
            ),
            ErrorKind::InvalidInput,
            "must be INT64",
        ),
        (
            infer(
                vec![Tensor::from_values("token_ids", vec![24], &tokens).unwrap()],
                "intent-classifier",
            ),
            ErrorKind::InvalidInput,
            "shape",
        ),
        (
            infer(
                vec![Tensor::from_values("tokens", vec![2, 12], &tokens).unwrap()],
                "intent-classifier",
            ),
            ErrorKind::InvalidInput,
            "unknown input",
        ),
        (
            infer(
                vec![Tensor::from_values("token_ids", vec![1, 1], &[8000i64]).unwrap()],
                "intent-classifier",
            ),
            ErrorKind::InvalidInput,
            // Checked against the table before the engine runs, and named.
            "outside the model's table of 8000 rows",
        ),
        (
            infer(inputs.clone(), "no-such-model"),
            ErrorKind::UnknownModel,
            "no model",
        ),
    ];
    for (request_, kind, needle) in cases {
        let responses = request(&connection, &request_).await.unwrap();
        let [Response::Error { kind: got, message }] = &responses[..] else {
            panic!("{responses:?}")
        };
        assert_eq!(*got, kind, "{message}");
        assert!(
            message.contains(needle),
            "expected {needle:?} in {message:?}"
        );
    }
    // The worker that saw the out-of-range id still serves.
    let responses = request(&connection, &infer(inputs, "intent-classifier"))
        .await
        .unwrap();
    assert!(
        matches!(responses[..], [Response::Inferred { .. }]),
        "{responses:?}"
    );
    c.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pushes_and_tokens_are_refused_with_reasons() {
    let c = start().await;
    let (status, body) = refusal(
        AdminClient::new(c.handle.admin_addr, "wrong-token")
            .models()
            .await,
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("admin token"));

    let (status, body) = refusal(
        c.client()
            .push("m", b"this is not an ONNX file".to_vec(), &local())
            .await,
    );
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("not an ONNX model tract can read"), "{body}");

    // A valid protobuf that tract cannot run: a graph whose node is an unknown operator.
    let mut proto = DemoModel::VideoRanker.build(DEFAULT_SEED);
    proto.graph.as_mut().unwrap().node[0].op_type = "NoSuchOp".into();
    let (status, body) = refusal(
        c.client()
            .push(
                "m",
                prost::Message::encode_to_vec(&proto),
                &PushOptions::default(),
            )
            .await,
    );
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("NoSuchOp"), "{body}");

    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    for (query, status_, needle) in [
        ("placement=edge", 400, "placement"),
        ("rollout=101", 400, "percentage"),
        ("quantize=int4", 400, "quantize must be none or int8"),
        (
            "placement=cloud&quantize=int8",
            400,
            "runs nothing on devices",
        ),
        ("dry_run=maybe", 400, "dry_run must be"),
        ("samples_size=0", 400, "samples_size 0 does not fit"),
        ("placement=cascade:nope:0.5", 400, "not an output"),
    ] {
        // Queries as written (the typed client cannot write most of them).
        let (status, body) = c
            .admin(
                Method::POST,
                &format!("/v1/models/video-ranker?{query}"),
                &ranker,
            )
            .await;
        assert_eq!(status, status_, "{query}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(needle),
            "{query}: {body}"
        );
    }
    let (status, body) = c
        .admin(Method::POST, "/v1/models/bad%2Fname", &ranker)
        .await;
    assert_eq!(status, 400, "{body}");

    // A cloud model whose signature differs.
    let music = DemoModel::MusicTwoTower.bytes(DEFAULT_SEED);
    let (status, body) = refusal(
        c.client()
            .push(
                "video-ranker",
                ranker.clone(),
                &PushOptions::default()
                    .placement(Placement::Cloud)
                    .cloud_model(music),
            )
            .await,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("signature differs"), "{body}");

    let models = c.client().models().await.unwrap();
    assert!(models.is_empty(), "nothing should have been stored");
    c.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_publishes_a_newer_version_with_old_content() {
    let c = start().await;
    let v1 = DemoModel::VideoRanker.bytes(1);
    let v2 = DemoModel::VideoRanker.bytes(2);
    c.push("video-ranker", &PushOptions::default(), &v1).await;
    c.push("video-ranker", &PushOptions::default(), &v2).await;
    let reply = c
        .push(
            "video-ranker",
            &PushOptions::default().rollout(10),
            &DemoModel::VideoRanker.bytes(3),
        )
        .await;
    assert_eq!(reply.stage, Stage::Candidate);
    // Published, not a dry run: the server's 201.
    let reply = c.client().rollback("video-ranker", 1).await.unwrap();
    assert!(!reply.dry_run, "{reply:?}");
    assert_eq!(reply.version, 4);
    let (status, reply) = refusal(c.client().rollback("video-ranker", 99).await);
    assert_eq!(status, 404, "{reply}");

    // The announcement follows the answer; wait for release 4 to reach the broker.
    let verifier = verifier(&c);
    let topic = Topic::manifest("video-ranker").unwrap().name();
    let payload = message_where(&c.handle, &topic, |p| {
        verifier.verify_cbor(p, now()).is_ok_and(|m| m.release == 4)
    })
    .await;
    let manifest = verifier.verify_cbor(&payload, now()).unwrap();
    assert_eq!(manifest.release, 4);
    assert_eq!(manifest.stable.version, 4);
    assert!(manifest.candidate.is_none());
    let digest = manifest.stable.variant(Target::EdgeInt8).unwrap().digest;
    assert_eq!(
        digest,
        outpost_shared::Digest::of(&quantize_int8(&v1).unwrap().bytes)
    );

    let models = c.client().models().await.unwrap();
    assert_eq!(models[0].versions, [1, 2, 3, 4]);
    assert_eq!(models[0].stable, 4);
    c.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_versions_and_their_chunks_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.registry.keep_versions = 2;
    let c = start_with(config, dir).await;
    for seed in 1..=3 {
        c.push(
            "music",
            &PushOptions::default(),
            &DemoModel::MusicTwoTower.bytes(seed),
        )
        .await;
    }
    let models = c.client().models().await.unwrap();
    assert_eq!(models[0].versions, [2, 3]);
    // Only the kept versions' chunks remain on disk.
    let kept: usize = [2u64, 3]
        .iter()
        .map(|&s| {
            let int8 = quantize_int8(&DemoModel::MusicTwoTower.bytes(s)).unwrap();
            outpost_shared::chunk::split_model(&int8.bytes).len()
        })
        .sum();
    let on_disk = walk(&c.handle.data_dir.join("chunks"));
    assert_eq!(on_disk, kept);
    c.handle.shutdown().await;
}

/// int8 by default, the figures kept and listed, the operator's samples, a dry run that stores
/// nothing, and a gate that refuses with the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_variants_pass_a_gate_and_dry_runs_publish_nothing() {
    let c = start().await;
    let v1 = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    let reply = c.push("video-ranker", &PushOptions::default(), &v1).await;
    let quantized = &reply.edge.as_ref().unwrap().quantize;
    let ratio = quantized.int8_bytes as f64 / quantized.fp32_bytes as f64;
    assert!(ratio <= 0.30, "{reply:?}");
    let models = c.client().models().await.unwrap();
    let listed = &models[0];
    assert_eq!(listed.variants[0].target, Target::EdgeInt8);
    let gate = &listed.edge.as_ref().unwrap().accuracy;
    assert_eq!(gate.samples, "generated from the signature");
    assert_eq!(gate.outputs[0].name, "score");
    assert!(gate.outputs[0].max_abs_error < 0.05, "{gate}");
    assert!(gate.outputs[0].cosine > 0.999, "{gate}");

    // A dry run of a model whose head was retrained: the figures and the delta, nothing stored.
    let chunks_before = walk(&c.handle.data_dir.join("chunks"));
    let mut proto = DemoModel::VideoRanker.build(DEFAULT_SEED);
    model_zoo::retrain_head(&mut proto, 7);
    let v2 = prost::Message::encode_to_vec(&proto);
    // A dry run is answered 200 with `dry_run` set.
    let dry = c
        .client()
        .push(
            "video-ranker",
            v2.clone(),
            &PushOptions::default().dry_run(),
        )
        .await
        .unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.version, 2);
    let delta = &dry.delta[0];
    assert_eq!(delta.against_version, Some(1));
    assert!(delta.new_chunks >= 1, "{dry:?}");
    assert!(
        delta.new_chunks < delta.chunks,
        "a retrained head shares the other chunks: {dry:?}"
    );
    assert!(
        dry.edge.as_ref().unwrap().accuracy.outputs[0]
            .cosine
            .is_finite()
    );
    let after = c.client().models().await.unwrap();
    assert_eq!(after[0].versions, [1]);
    assert_eq!(after[0].release, 1);
    assert_eq!(walk(&c.handle.data_dir.join("chunks")), chunks_before);

    // The operator's sample file (an inference request body) replaces generated inputs.
    let samples = serde_json::json!({"inputs": [
        {"name": "user_features", "shape": [3, 32], "datatype": "FP32", "data": vec![0.25f32; 96]},
        {"name": "item_ids", "shape": [3], "datatype": "INT64", "data": [0, 17, 9999]}
    ]})
    .to_string();
    let reply = c
        .push(
            "video-ranker",
            &PushOptions::default().samples(samples.into_bytes()),
            &v2,
        )
        .await;
    let accuracy = &reply.edge.as_ref().unwrap().accuracy;
    assert_eq!(accuracy.samples, "the operator's samples");
    assert_eq!(accuracy.rows, 3);
    assert_eq!(reply.delta[0].against_version, Some(1));
    // Samples that do not fit the signature are refused, naming the input.
    let bad = r#"{"inputs": [{"name": "user_features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}"#;
    let (status, message) = refusal(
        c.client()
            .push(
                "video-ranker",
                v2.clone(),
                &PushOptions::default().samples(bad.as_bytes().to_vec()),
            )
            .await,
    );
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("sample file") && message.contains("user_features"),
        "{message}"
    );
    c.handle.shutdown().await;

    // A gate with no tolerance refuses the int8 variant with the figures, and stores nothing;
    // quantize=none still publishes fp32.
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.registry.int8_max_abs_error = 0.0;
    let strict = start_with(config, dir).await;
    let (status, message) = refusal(
        strict
            .client()
            .push("video-ranker", v1.clone(), &PushOptions::default())
            .await,
    );
    assert_eq!(status, 422, "{message}");
    assert!(
        message.contains("fails the accuracy gate")
            && message.contains("score (score): max abs error")
            && message.contains("int8_max_kept_share")
            && message.contains("is over 0"),
        "{message}"
    );
    let models = strict.client().models().await.unwrap();
    assert!(models.is_empty(), "{models:?}");
    let reply = strict
        .push(
            "video-ranker",
            &PushOptions::default().quantize(Quantize::None),
            &v1,
        )
        .await;
    assert_eq!(reply.variants[0].target, Target::EdgeFp32);
    assert!(reply.edge.is_none(), "{reply:?}");
    strict.handle.shutdown().await;
}

/// The gate judges each output by its kind (a push may say it), and when all-int8 misses it
/// keeps the most sensitive weight in fp32 rather than refuse, within `int8_max_kept_share`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_int8_gate_judges_by_output_kind_and_keeps_sensitive_weights_in_fp32() {
    use cloud_coordinator::admin::PushQuery;
    use cloud_coordinator::registry::Int8Overrides;
    use model_zoo::gate::{OUTLIER_WEIGHT, encoder_outputs, outlier_ranker};
    use outpost_runtime::accuracy::OutputKind;

    let c = start().await;
    let with = |query: PushQuery| PushOptions {
        query,
        ..PushOptions::default()
    };

    // An encoder's outputs: the embedding is judged by cosine, the hidden state only shown —
    // their elements move by more than a score's tolerance, which alone would refuse the push.
    let encoder = encoder_outputs(DEFAULT_SEED);
    let reply = c.push("encoder", &PushOptions::default(), &encoder).await;
    let edge = reply.edge.as_ref().unwrap();
    assert!(edge.fallback.is_none(), "{edge:?}");
    let out = |name: &str| {
        edge.accuracy
            .outputs
            .iter()
            .find(|o| o.name == name)
            .unwrap()
            .clone()
    };
    let (hidden, embedding) = (out("hidden"), out("embedding"));
    assert_eq!((hidden.kind, hidden.judged), (OutputKind::Hidden, false));
    assert_eq!(
        (embedding.kind, embedding.judged),
        (OutputKind::Embedding, true)
    );
    assert!(embedding.min_vector_cosine > 0.999, "{}", edge.accuracy);
    assert!(embedding.max_abs_error > 0.05, "{}", edge.accuracy);
    // Said to be a score, the embedding fails; its only weight is all of the model's, past
    // int8_max_kept_share, so the push is refused with the figures.
    let as_score = PushQuery {
        output_kinds: vec![("embedding".into(), OutputKind::Score)],
        dry_run: true,
        ..PushQuery::default()
    };
    let (status, message) = refusal(
        c.client()
            .push("encoder", encoder.clone(), &with(as_score))
            .await,
    );
    assert_eq!(status, 422, "{message}");
    assert!(
        message.contains("embedding (score): max abs error")
            && message.contains("int8_max_kept_share 0.5; kept none"),
        "{message}"
    );
    // A kind for an output the model lacks is named.
    let unknown = PushQuery {
        output_kinds: vec![("logits".into(), OutputKind::Classifier)],
        dry_run: true,
        ..PushQuery::default()
    };
    let (status, message) = refusal(c.client().push("encoder", encoder, &with(unknown)).await);
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("\"logits\"") && message.contains("its outputs: hidden, embedding"),
        "{message}"
    );

    // A weight int8 cannot hold: all-int8 misses, keeping that one weight in fp32 passes.
    let outlier = outlier_ranker(DEFAULT_SEED);
    let reply = c.push("outlier", &PushOptions::default(), &outlier).await;
    let edge = reply.edge.as_ref().unwrap();
    let fallback = edge.fallback.as_ref().unwrap();
    assert!(
        fallback
            .missed
            .iter()
            .any(|m| m.starts_with("score (score): max abs error")),
        "{fallback:?}"
    );
    let kept: Vec<&str> = fallback.kept.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(kept, [OUTLIER_WEIGHT]);
    assert!(
        fallback.kept[0].distance_alone.unwrap() > 1.0,
        "{fallback:?}"
    );
    assert_eq!(edge.quantize.kept_fp32, [OUTLIER_WEIGHT]);
    assert_eq!(edge.quantize.tensors, 1);
    assert!((fallback.kept_share - 0.2).abs() < 1e-9, "{fallback:?}");
    // 1024 weights of 4 bytes instead of 1, less their 16 scales and the DequantizeLinear.
    assert!(
        (2800..=1024 * 3 - 16 * 4).contains(&fallback.extra_bytes),
        "{fallback:?}"
    );
    assert_eq!(fallback.gate_runs, 3);
    assert_eq!(
        edge.quantize.int8_bytes,
        fallback.all_int8_bytes + fallback.extra_bytes
    );
    assert!(
        edge.accuracy.outputs[0].max_abs_error < 0.05,
        "{}",
        edge.accuracy
    );
    assert_eq!(reply.variants[0].target, Target::EdgeInt8);
    // The listing keeps the report.
    let models = c.client().models().await.unwrap();
    let listed = models.iter().find(|m| m.name == "outlier").unwrap();
    assert_eq!(
        listed.edge.as_ref().unwrap().fallback.as_ref(),
        Some(fallback)
    );
    // A push that allows less keeps nothing and is refused, naming the limit.
    let strict = PushQuery {
        int8: Int8Overrides {
            max_kept_share: Some(0.1),
            ..Int8Overrides::default()
        },
        dry_run: true,
        ..PushQuery::default()
    };
    let (status, message) = refusal(
        c.client()
            .push("outlier", outlier.clone(), &with(strict))
            .await,
    );
    assert_eq!(status, 422, "{message}");
    assert!(
        message.contains("int8_max_kept_share 0.1; kept none"),
        "{message}"
    );
    // A push that tolerates the error passes all-int8.
    let loose = PushQuery {
        int8: Int8Overrides {
            max_abs_error: Some(1e3),
            ..Int8Overrides::default()
        },
        dry_run: true,
        ..PushQuery::default()
    };
    let reply = c
        .client()
        .push("outlier", outlier, &with(loose))
        .await
        .unwrap();
    let edge = reply.edge.unwrap();
    assert!(
        edge.fallback.is_none() && edge.quantize.tensors == 2,
        "{edge:?}"
    );
    c.handle.shutdown().await;
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() { walk(&p) } else { 1 }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_busy() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.inference.workers = 1;
    config.inference.queue_depth = 1;
    let c = start_with(config, dir).await;
    c.push(
        "video-ranker-xl",
        &PushOptions::default().placement(Placement::Cloud),
        &DemoModel::VideoRankerXl.bytes(DEFAULT_SEED),
    )
    .await;
    let connection = c.quic().await;
    let batch = 256u64;
    let inputs = vec![
        Tensor::from_values(
            "user_features",
            vec![batch, 32],
            &vec![0.1f32; batch as usize * 32],
        )
        .unwrap(),
        Tensor::from_values(
            "item_ids",
            vec![batch],
            &(0..batch as i64).collect::<Vec<_>>(),
        )
        .unwrap(),
    ];
    let infer = Request::Infer {
        model: "video-ranker-xl".into(),
        version: None,
        inputs,
        outputs: vec![],
    };
    let calls = (0..8).map(|_| {
        let (connection, infer) = (connection.clone(), infer.clone());
        async move { request(&connection, &infer).await }
    });
    let answers = futures_join(calls).await;
    let busy = answers
        .iter()
        .filter(|a| matches!(a[..], [Response::Busy { .. }]))
        .count();
    let done = answers
        .iter()
        .filter(|a| matches!(a[..], [Response::Inferred { .. }]))
        .count();
    assert!(busy >= 1, "no request was refused with Busy");
    assert!(done >= 1, "no request was served");
    assert_eq!(busy + done, 8);
    let metrics = c.client().metrics().await.unwrap();
    assert!(metrics.contains(&format!("outpost_inference_busy_total {busy}")));
    c.handle.shutdown().await;
}

async fn futures_join<
    F: std::future::Future<Output = Result<Vec<Response>, String>> + Send + 'static,
>(
    calls: impl Iterator<Item = F>,
) -> Vec<Vec<Response>> {
    let tasks: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().unwrap());
    }
    out
}

/// A device of the coordinator's dev fleet: its config (enrolled into the dev fleet when it is
/// not `dev-0001`), its MQTT options and its status-signing key.
struct SimDevice {
    options: rumqttc::MqttOptions,
    certificate: Vec<u8>,
    key: ring::signature::EcdsaKeyPair,
}

fn sim_device(handle: &cloud_coordinator::CoordinatorHandle, id: &str) -> SimDevice {
    let fleet_config = handle.fleet_config.as_ref().unwrap();
    let fleet = fleet_config.parent().unwrap();
    let dir = fleet.join("devices").join(id);
    if !dir.exists() {
        let authority = firmware_config::provision::FleetAuthority::load(
            &firmware_config::CoordinatorConfig::load(fleet_config).unwrap(),
        )
        .unwrap();
        authority
            .enroll(
                &id.parse().unwrap(),
                &[format!("127.0.0.1:{}", handle.quic_addr.port())
                    .parse()
                    .unwrap()],
                &handle.mqtt,
                fleet,
            )
            .unwrap();
    }
    sim_device_from(&dir, id, &fleet.join("ca.crt"), &handle.mqtt)
}

/// A device from the files in `dir` (`device.crt`, `device.key`), trusting `ca` for the broker.
fn sim_device_from(
    dir: &std::path::Path,
    id: &str,
    ca: &std::path::Path,
    broker: &firmware_config::HostPort,
) -> SimDevice {
    let identity =
        outpost_runtime::tls::Identity::load(&dir.join("device.crt"), &dir.join("device.key"))
            .unwrap();
    let certificate = identity.leaf().unwrap().as_ref().to_vec();
    let rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8) = &identity.key else {
        panic!("not PKCS#8")
    };
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.secret_pkcs8_der(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let roots = outpost_runtime::tls::roots(ca).unwrap();
    let tls = outpost_runtime::tls::client_config(roots, identity, None).unwrap();
    let mut options =
        rumqttc::MqttOptions::new(format!("sim-{id}"), broker.host.clone(), broker.port);
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
    ));
    SimDevice {
        options,
        certificate,
        key,
    }
}

impl SimDevice {
    /// `status` signed by this device as number `seq` of `session`.
    fn sign(&self, status: &DeviceStatus, session: u64, seq: u64) -> Vec<u8> {
        outpost_shared::SignedStatus::sign(status, session, seq, &self.certificate, &self.key)
            .unwrap()
            .to_cbor()
            .unwrap()
    }
}

/// Publishes `payload` retained on device `device`'s status topic from a client of `options`.
async fn publish_status_as(options: rumqttc::MqttOptions, device: &str, payload: Vec<u8>) {
    let (client, mut events) = mqtt_connect(options).await.unwrap();
    client
        .publish(
            Topic::device_status(device).unwrap().name(),
            rumqttc::QoS::AtLeastOnce,
            true,
            payload,
        )
        .await
        .unwrap();
    // Until the broker has it (its PUBACK).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("no PUBACK for the status of {device}: {other:?}"),
        }
    }
}

/// The fleet view: what each device signed, newest first wins, at most `[mqtt] max_devices`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_view_shows_device_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    // Room for two devices: a third is not kept.
    config.mqtt.max_devices = Some(2);
    let c = start_with(config, dir).await;
    for (n, id) in ["dev-0001", "dev-0002", "dev-0003"].into_iter().enumerate() {
        let device = sim_device(&c.handle, id);
        let status = DeviceStatus::offline(id, "0.1.0", now());
        publish_status_as(device.options.clone(), id, device.sign(&status, 7, 0)).await;
        if n < 2 {
            // Kept in this order, so the third is the one past the bound.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while c.client().fleet().await.unwrap().len() <= n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{id} never showed up"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // A kept device's status is still updated once the view is full.
    let first = sim_device(&c.handle, "dev-0001");
    let mut newer = DeviceStatus::offline("dev-0001", "0.2.0", now());
    newer.health = Health::Ready;
    publish_status_as(first.options.clone(), "dev-0001", first.sign(&newer, 7, 1)).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let fleet = c.client().fleet().await.unwrap();
        if fleet.len() == 2 && fleet[0].health == Health::Ready {
            assert_eq!(fleet[0].device_id, "dev-0001");
            assert_eq!(fleet[1].device_id, "dev-0002");
            assert_eq!(fleet[1].health, Health::Offline);
            break;
        }
        assert!(fleet.len() <= 2, "the view grew past its bound: {fleet:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the devices never showed up: {fleet:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    c.handle.shutdown().await;
}

/// Statuses the coordinator must not believe, each published where the broker lets it through
/// (as the coordinator's own identity, which may write any topic: a broker without topic rules
/// would let anyone): unsigned, signed by another device, by another fleet's device, replayed
/// (an older one of the same run, a run that ended with its last will, an older run). None
/// changes the view, each is counted; the device's own newer status still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_status_counts_only_when_the_device_signed_it_and_it_is_newer() {
    let c = start().await;
    let one = sim_device(&c.handle, "dev-0001");
    let two = sim_device(&c.handle, "dev-0002");
    let anyone = || mqtt_options(&c.handle, &format!("forger-{}", rand_id()), true);
    let rejected = || async {
        let (_, metrics) = c.admin(Method::GET, "/metrics", b"").await;
        metrics
            .as_str()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("outpost_status_rejected_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let wait_rejected = |count: u64| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while rejected().await < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{count} rejections never counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let health = |fleet: &[DeviceStatus]| {
        fleet
            .iter()
            .find(|d| d.device_id == "dev-0001")
            .map(|d| (d.health, d.agent_version.clone()))
    };

    // The device's own status: believed.
    let t = now();
    let mut ready = DeviceStatus::offline("dev-0001", "1.0.0", t);
    ready.health = Health::Ready;
    publish_status_as(one.options.clone(), "dev-0001", one.sign(&ready, 1, 5)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health(&c.client().fleet().await.unwrap()).is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device's status never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = rejected().await;

    let mut fake = DeviceStatus::offline("dev-0001", "6.6.6", t + 10);
    fake.health = Health::Degraded;
    // Unsigned.
    publish_status_as(anyone(), "dev-0001", fake.to_cbor().unwrap()).await;
    // Signed by device 2, about device 1.
    publish_status_as(anyone(), "dev-0001", two.sign(&fake, 2, 0)).await;
    // Signed by another fleet's dev-0001.
    let other = tempfile::tempdir().unwrap();
    let plan = firmware_config::FleetPlan::numbered(
        "dev",
        1,
        vec!["localhost:1".parse().unwrap()],
        "localhost:1".parse().unwrap(),
    )
    .unwrap();
    firmware_config::provision(&plan, other.path()).unwrap();
    let impostor = sim_device_from(
        &other.path().join("devices/dev-0001"),
        "dev-0001",
        &other.path().join("ca.crt"),
        &c.handle.mqtt,
    );
    publish_status_as(anyone(), "dev-0001", impostor.sign(&fake, 3, 0)).await;
    // The device's own, but older in its run (a replay).
    publish_status_as(anyone(), "dev-0001", one.sign(&fake, 1, 4)).await;
    // Cleared.
    publish_status_as(anyone(), "dev-0001", Vec::new()).await;
    wait_rejected(before + 5).await;
    assert_eq!(
        health(&c.client().fleet().await.unwrap()),
        Some((Health::Ready, "1.0.0".into())),
        "a status the device did not make changed the view"
    );

    // The run's last will: believed once; after it, nothing older of that run is.
    let offline = DeviceStatus::offline("dev-0001", "1.0.0", t);
    publish_status_as(
        one.options.clone(),
        "dev-0001",
        one.sign(&offline, 1, u64::MAX),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health(&c.client().fleet().await.unwrap()).map(|h| h.0) != Some(Health::Offline) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last will never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = rejected().await;
    publish_status_as(anyone(), "dev-0001", one.sign(&ready, 1, 6)).await;
    // An older run, made before the status held.
    let mut old_run = ready.clone();
    old_run.updated_at = t - 100;
    publish_status_as(anyone(), "dev-0001", one.sign(&old_run, 0, 9)).await;
    wait_rejected(before + 2).await;
    assert_eq!(
        health(&c.client().fleet().await.unwrap()).map(|h| h.0),
        Some(Health::Offline)
    );
    // The device restarted: a new run, made later, counts.
    let mut back = DeviceStatus::offline("dev-0001", "1.1.0", t + 1);
    back.health = Health::Ready;
    publish_status_as(one.options.clone(), "dev-0001", one.sign(&back, 2, 0)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health(&c.client().fleet().await.unwrap()) != Some((Health::Ready, "1.1.0".into())) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new run never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_keeps_its_fleet_and_announces_again() {
    let dir = tempfile::tempdir().unwrap();
    let c = start_with(config(dir.path()), dir).await;
    let bytes = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    c.push("video-ranker", &PushOptions::default(), &bytes)
        .await;
    let agent = c.agent();
    let token = c.handle.admin_token.clone();
    assert!(c.client().revoke("dev-0099").await.unwrap().new);
    let TestCoordinator { handle, dir } = c;
    handle.shutdown().await;

    // Same data folder, a fresh embedded broker (no retained messages): the release is announced
    // again, the dev fleet and admin token are the same, the chunks are still served.
    let again = start_with(config(dir.path()), dir).await;
    assert_eq!(again.handle.admin_token, token);
    assert!(!again.handle.new_admin_token);
    // The revocation list is kept.
    let revoked = again.client().revoked().await.unwrap();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0].device, "dev-0099");
    let payload = first_message(
        &again.handle,
        &Topic::manifest("video-ranker").unwrap().name(),
    )
    .await;
    let manifest = ManifestVerifier::new(agent.fleet.manifest_keys.clone())
        .verify_cbor(&payload, now())
        .unwrap();
    assert_eq!(manifest.stable.version, 1);
    let connection = connect(again.handle.quic_addr, &agent).await.unwrap();
    let ids: Vec<_> = manifest.stable.variants[0]
        .chunks
        .iter()
        .map(|c| c.id)
        .collect();
    let responses = request(&connection, &Request::GetChunks { ids })
        .await
        .unwrap();
    assert!(
        responses
            .iter()
            .all(|r| matches!(r, Response::Chunk { .. }))
    );
    again.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batch_and_connections_per_device_are_held() {
    let c = start().await;
    let bytes = DemoModel::IntentClassifier.bytes(DEFAULT_SEED);
    c.push(
        "intent-classifier",
        &PushOptions::default()
            .placement(Placement::Cloud)
            .max_batch(2),
        &bytes,
    )
    .await;
    let connection = c.quic().await;
    let infer = |rows: u64| Request::Infer {
        model: "intent-classifier".into(),
        version: None,
        inputs: vec![
            Tensor::from_values("token_ids", vec![rows, 12], &vec![7i64; rows as usize * 12])
                .unwrap(),
        ],
        outputs: vec![],
    };
    let responses = request(&connection, &infer(3)).await.unwrap();
    let [Response::Error { kind, message }] = &responses[..] else {
        panic!("{responses:?}")
    };
    assert_eq!(*kind, ErrorKind::InvalidInput);
    assert!(
        message.contains("3 rows") && message.contains("max_batch of 2"),
        "{message}"
    );
    let responses = request(&connection, &infer(2)).await.unwrap();
    assert!(
        matches!(responses[..], [Response::Inferred { .. }]),
        "{responses:?}"
    );

    // The same device: one connection open already, three more get in, and a fifth closes
    // the oldest (the first) with the reason: a device that restarts is never locked out by
    // its own dead connections.
    let mut more = Vec::new();
    for _ in 1..cloud_coordinator::MAX_CONNECTIONS_PER_DEVICE {
        let extra = c.quic().await;
        assert!(matches!(
            request(&extra, &infer(1)).await.unwrap()[..],
            [Response::Inferred { .. }]
        ));
        more.push(extra);
    }
    let newest = c.quic().await;
    assert!(matches!(
        request(&newest, &infer(1)).await.unwrap()[..],
        [Response::Inferred { .. }]
    ));
    let reason = tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .expect("the oldest connection stayed open past the per-device cap");
    assert!(reason.to_string().contains("replaced"), "{reason}");
    for c in &more {
        assert!(c.close_reason().is_none(), "a newer connection was closed");
    }
    c.handle.shutdown().await;
}

/// Reads one stream's answer frames until it ends, within 10 s.
async fn answers(mut recv: quinn::RecvStream) -> Vec<Response> {
    let bytes = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    let mut rest = &bytes[..];
    let mut out = Vec::new();
    while let Some((response, used)) =
        outpost_shared::frame::decode::<Response>(rest, outpost_shared::frame::MAX_FRAME_BYTES)
            .unwrap()
    {
        out.push(response);
        rest = &rest[used..];
    }
    out
}

/// A device that opens every stream it may and sends half a frame header on each, then a
/// frame that claims more than the frame limit: it cannot open more than
/// `MAX_STREAMS_PER_CONNECTION` at once, another connection of the same device is served
/// meanwhile, each stalled stream is answered with the reason after `quic.request_timeout_s`
/// and its slot comes back, and the oversized frame is refused from its header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_peer_holds_no_more_than_its_streams_and_not_forever() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.quic.request_timeout_s = 1;
    let c = start_with(config, dir).await;
    let greedy = c.quic().await;
    let mut stalled = Vec::new();
    for _ in 0..cloud_coordinator::MAX_STREAMS_PER_CONNECTION {
        let (mut send, recv) = tokio::time::timeout(Duration::from_secs(5), greedy.open_bi())
            .await
            .expect("a stream within the cap was not granted")
            .unwrap();
        send.write_all(&[0, 0]).await.unwrap();
        stalled.push((send, recv));
    }
    let opened = std::time::Instant::now();
    // One more waits for a slot; the device's other connection is served meanwhile.
    let more = tokio::time::timeout(Duration::from_millis(300), greedy.open_bi()).await;
    assert!(more.is_err(), "a stream past the cap was granted");
    let other = c.quic().await;
    assert!(matches!(
        request(&other, &hello()).await.unwrap()[..],
        [Response::Hello { .. }]
    ));

    for (_send, recv) in stalled.drain(..) {
        let got = answers(recv).await;
        let [Response::Error { kind, message }] = &got[..] else {
            panic!("{got:?}")
        };
        assert_eq!(*kind, ErrorKind::BadRequest);
        assert!(
            message.contains("within 1 s") && message.contains("request_timeout_s"),
            "{message}"
        );
    }
    assert!(opened.elapsed() >= Duration::from_millis(900));
    // The slots are back.
    assert!(matches!(
        request(&greedy, &hello()).await.unwrap()[..],
        [Response::Hello { .. }]
    ));

    // A header announcing one byte more than a frame may hold: refused without reading on.
    let (mut send, recv) = greedy.open_bi().await.unwrap();
    let claimed = u32::try_from(outpost_shared::frame::MAX_FRAME_BYTES + 1).unwrap();
    send.write_all(&claimed.to_be_bytes()).await.unwrap();
    let got = answers(recv).await;
    let [Response::Error { kind, message }] = &got[..] else {
        panic!("{got:?}")
    };
    assert_eq!(*kind, ErrorKind::BadRequest);
    assert!(message.contains(&claimed.to_string()), "{message}");
    c.handle.shutdown().await;
}

/// Connects with `options` and waits (up to 5 s) for the CONNACK; the client and its event
/// loop, or why there was none.
async fn mqtt_connect(
    options: rumqttc::MqttOptions,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), String> {
    let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => {
                return Ok((client, events));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no CONNACK within 5 s".into()),
        }
    }
}

/// Polls `events` until the broker closes the connection (within 5 s): whether it did.
async fn closed_by_broker(events: &mut rumqttc::EventLoop) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return true,
            Err(_) => return false,
        }
    }
}

fn refused_mqtt(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("outpost_mqtt_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The embedded broker tried as an outsider on the loopback network and as a device of the
/// fleet: plain MQTT, TLS without a certificate and with another fleet's certificate get no
/// CONNACK; a device that subscribes to everything, writes another device's status or clears a
/// release is cut off and changes nothing; the router's own port takes no login but the front's
/// and survives the client-id trick that used to stop rumqttd; real clients are served
/// throughout, and every refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_admits_only_the_fleet_and_holds_devices_to_their_topics() {
    let c = start().await;
    let bytes = DemoModel::IntentClassifier.bytes(DEFAULT_SEED);
    c.push("intent-classifier", &local(), &bytes).await;
    let manifest_topic = Topic::manifest("intent-classifier").unwrap().name();
    let release = first_message(&c.handle, &manifest_topic).await;
    let broker = &c.handle.mqtt;

    // Outsiders: plain TCP, TLS with no certificate, TLS with another fleet's device.
    let plain = rumqttc::MqttOptions::new("outsider", broker.host.clone(), broker.port);
    assert!(mqtt_connect(plain).await.is_err(), "plain MQTT got in");
    let fleet = c.handle.fleet_config.as_ref().unwrap().parent().unwrap();
    let roots = outpost_runtime::tls::roots(&fleet.join("ca.crt")).unwrap();
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots.clone())
    .with_no_client_auth();
    let mut no_cert = rumqttc::MqttOptions::new("anonymous", broker.host.clone(), broker.port);
    no_cert.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(anonymous)),
    ));
    assert!(
        mqtt_connect(no_cert).await.is_err(),
        "TLS without a certificate got in"
    );
    let other = tempfile::tempdir().unwrap();
    let plan = firmware_config::FleetPlan::numbered(
        "other",
        1,
        vec!["localhost:1".parse().unwrap()],
        "localhost:1".parse().unwrap(),
    )
    .unwrap();
    firmware_config::provision(&plan, other.path()).unwrap();
    let stranger = other.path().join("devices/other-0001");
    let identity = outpost_runtime::tls::Identity::load(
        &stranger.join("device.crt"),
        &stranger.join("device.key"),
    )
    .unwrap();
    let tls = outpost_runtime::tls::client_config(roots, identity, None).unwrap();
    let mut foreign = rumqttc::MqttOptions::new("stranger", broker.host.clone(), broker.port);
    foreign.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
    ));
    assert!(
        mqtt_connect(foreign).await.is_err(),
        "another fleet's device got in"
    );

    // A device of the fleet, reaching past its topics: cut off each time.
    let (client, mut events) = mqtt_connect(mqtt_options(&c.handle, "greedy", false))
        .await
        .unwrap();
    client
        .subscribe("outpost/v1/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(
        closed_by_broker(&mut events).await,
        "a wildcard subscription passed"
    );
    let (client, mut events) = mqtt_connect(mqtt_options(&c.handle, "forger", false))
        .await
        .unwrap();
    let forged = DeviceStatus::offline("dev-0002", "9.9.9", now());
    client
        .publish(
            Topic::device_status("dev-0002").unwrap().name(),
            rumqttc::QoS::AtLeastOnce,
            true,
            forged.to_cbor().unwrap(),
        )
        .await
        .unwrap();
    assert!(
        closed_by_broker(&mut events).await,
        "another device's status passed"
    );
    let (client, mut events) = mqtt_connect(mqtt_options(&c.handle, "hider", false))
        .await
        .unwrap();
    client
        .publish(&manifest_topic, rumqttc::QoS::AtLeastOnce, true, Vec::new())
        .await
        .unwrap();
    assert!(
        closed_by_broker(&mut events).await,
        "clearing a release passed"
    );
    // The release is still retained, and nobody was invented.
    assert_eq!(first_message(&c.handle, &manifest_topic).await, release);
    let fleet_view = c.client().fleet().await.unwrap();
    assert!(
        fleet_view.iter().all(|d| d.device_id != "dev-0002"),
        "{fleet_view:?}"
    );

    // The router's own port: a wrong login, twice with one client id (this stopped rumqttd
    // for every later client: rumqtt issue #1062), gets nothing, and the broker still serves.
    let router = c.handle.mqtt_router.unwrap();
    for _ in 0..2 {
        let mut direct = rumqttc::MqttOptions::new("x", router.ip().to_string(), router.port());
        direct.set_credentials("outpost-front", "guess");
        assert!(
            mqtt_connect(direct).await.is_err(),
            "a guessed login got in"
        );
    }
    for _ in 0..2 {
        let direct = rumqttc::MqttOptions::new("x", router.ip().to_string(), router.port());
        assert!(mqtt_connect(direct).await.is_err(), "no login got in");
    }
    assert_eq!(first_message(&c.handle, &manifest_topic).await, release);

    let (code, metrics) = c.admin(Method::GET, "/metrics", b"").await;
    assert_eq!(code, 200);
    let refused = refused_mqtt(metrics.as_str().unwrap_or_default());
    assert!(refused >= 6, "{refused} refusals counted");
    c.handle.shutdown().await;
}

/// The embedded broker's bounds: `[mqtt] max_connections` clients at once (one more is closed
/// at once, and gets in once a slot is free), and sockets that never start their TLS handshake
/// hold a slot each but keep no one else waiting (rumqttd's own TLS ran every handshake in its
/// accept loop: one silent socket stopped every new client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_holds_its_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.mqtt.max_connections = Some(8);
    let c = start_with(config, dir).await;
    let broker = c.handle.mqtt.clone();
    // The coordinator's own client holds one slot; five silent sockets hold five more.
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(
            tokio::net::TcpStream::connect((broker.host.as_str(), broker.port))
                .await
                .unwrap(),
        );
    }
    let first = mqtt_connect(mqtt_options(&c.handle, "first", false)).await;
    let (first, first_events) = first.expect("a client was kept waiting by silent sockets");
    let second = mqtt_connect(mqtt_options(&c.handle, "second", false))
        .await
        .expect("the eighth slot");
    // Past the limit: closed at once.
    assert!(
        mqtt_connect(mqtt_options(&c.handle, "ninth", false))
            .await
            .is_err(),
        "a ninth connection got in"
    );
    // A slot comes free: the next client gets in.
    drop((first, first_events));
    drop(silent);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if mqtt_connect(mqtt_options(&c.handle, "later", false))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no slot came free after six connections closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(second);
    c.handle.shutdown().await;
}

/// A retained release cleared on the broker (here by a client allowed to: the coordinator's
/// identity; a broker without topic rules would let anyone) is announced again at once, so a
/// device that subscribes afterwards still learns of it; the coordinator counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_release_is_announced_again() {
    let c = start().await;
    let bytes = DemoModel::IntentClassifier.bytes(DEFAULT_SEED);
    c.push("intent-classifier", &local(), &bytes).await;
    let topic = Topic::manifest("intent-classifier").unwrap().name();
    let release = first_message(&c.handle, &topic).await;
    let (client, mut events) = mqtt_connect(mqtt_options(&c.handle, "eraser", true))
        .await
        .unwrap();
    client
        .publish(&topic, rumqttc::QoS::AtLeastOnce, true, Vec::new())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !matches!(
        tokio::time::timeout_at(deadline, events.poll()).await,
        Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))))
    ) {
        assert!(tokio::time::Instant::now() < deadline, "no PUBACK");
    }
    // A newcomer gets the release (retained again), not an empty topic.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = message_where(&c.handle, &topic, |_| true).await;
        if got == release {
            break;
        }
        assert!(got.is_empty(), "a different release: {} bytes", got.len());
        assert!(
            tokio::time::Instant::now() < deadline,
            "the release was not announced again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = c.admin(Method::GET, "/metrics", b"").await;
    let reasserted = metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("outpost_releases_reasserted_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(reasserted >= 1, "{metrics}");
    c.handle.shutdown().await;
}

/// Revoking a device closes its open QUIC connection with the reason, refuses it from then on
/// (it still holds a certificate the fleet CA signed), and is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_loses_quic_at_once() {
    let c = start().await;
    let connection = c.quic().await;
    assert!(matches!(
        request(&connection, &hello()).await.unwrap()[..],
        [Response::Hello { .. }]
    ));
    let revoked = c.client().revoke("dev-0001").await.unwrap();
    assert!(revoked.new);
    let reason = tokio::time::timeout(Duration::from_secs(5), connection.closed())
        .await
        .expect("the revoked device's connection stayed open");
    assert!(reason.to_string().contains("revoked"), "{reason}");
    // A new connection gets through the handshake (the certificate is valid) and is closed.
    let again = c.quic().await;
    let reason = tokio::time::timeout(Duration::from_secs(5), again.closed())
        .await
        .expect("a revoked device's new connection stayed open");
    assert!(reason.to_string().contains("revoked"), "{reason}");
    assert!(!c.client().revoke("dev-0001").await.unwrap().new);
    let list = c.client().revoked().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].device, "dev-0001");
    // A name that is no device id is refused by name.
    let (code, body) = c
        .admin(Method::POST, "/v1/devices/not%20a%20device/revoke", b"")
        .await;
    assert_eq!(code, 400, "{body}");
    c.handle.shutdown().await;
}

/// A candidate moved by hand: widening keeps its salt (the same devices first) in a new
/// release, aborting publishes stable alone, promoting makes it stable; each step is in the
/// history. Without a candidate, or at a share that is not 1 to 99, the call is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_is_widened_aborted_and_promoted_by_hand() {
    use cloud_coordinator::registry::RolloutAction;
    let c = start().await;
    let bytes = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    let admin = c.client();
    let (status, message) = refusal(admin.rollout("nothing", RolloutAction::Abort).await);
    assert_eq!(status, StatusCode::NOT_FOUND, "{message}");
    c.push("video-ranker", &local(), &bytes).await;
    let (status, message) = refusal(admin.rollout("video-ranker", RolloutAction::Promote).await);
    assert!(
        status == StatusCode::BAD_REQUEST && message.contains("no candidate"),
        "{message}"
    );
    c.push("video-ranker", &local().rollout(10), &bytes).await;
    let topic = Topic::manifest("video-ranker").unwrap().name();
    let manifest = |payload: Vec<u8>| verifier(&c).verify_cbor(&payload, now()).unwrap();
    // The retained release may still be release 1 for a moment: wait for the candidate's.
    let v = verifier(&c);
    let before = manifest(
        message_where(&c.handle, &topic, |p| {
            v.verify_cbor(p, now()).is_ok_and(|m| m.candidate.is_some())
        })
        .await,
    );
    let salt = before.candidate.as_ref().unwrap().salt.clone();

    let widened = admin
        .rollout("video-ranker", RolloutAction::Percent(50))
        .await
        .unwrap();
    assert_eq!((widened.version, widened.release), (2, before.release + 1));
    let after = manifest(
        message_where(&c.handle, &topic, |p| {
            verifier(&c)
                .verify_cbor(p, now())
                .is_ok_and(|m| m.release == widened.release)
        })
        .await,
    );
    let candidate = after.candidate.unwrap();
    assert_eq!(
        (candidate.version.version, candidate.rollout_percent),
        (2, 50)
    );
    assert_eq!(candidate.salt, salt, "widening changed the cohort's salt");
    let (status, message) = refusal(
        admin
            .rollout("video-ranker", RolloutAction::Percent(100))
            .await,
    );
    assert!(
        status == StatusCode::BAD_REQUEST && message.contains("1 to 99"),
        "{message}"
    );

    admin
        .rollout("video-ranker", RolloutAction::Abort)
        .await
        .unwrap();
    let models = admin.models().await.unwrap();
    assert_eq!((models[0].stable, models[0].candidate), (1, None));
    c.push("video-ranker", &local().rollout(10), &bytes).await;
    let promoted = admin
        .rollout("video-ranker", RolloutAction::Promote)
        .await
        .unwrap();
    assert_eq!(promoted.version, 3);
    let models = admin.models().await.unwrap();
    assert_eq!((models[0].stable, models[0].candidate), (3, None));
    let steps: Vec<(&str, u64, u8)> = models[0]
        .rollout_history
        .iter()
        .map(|e| (e.step.as_str(), e.version, e.percent))
        .collect();
    assert_eq!(
        steps,
        [
            ("candidate", 2, 10),
            ("widen", 2, 50),
            ("abort", 2, 0),
            ("candidate", 3, 10),
            ("promote", 3, 100)
        ]
    );
    assert!(models[0].rollout_history[1].reason.contains("operator"));
    c.handle.shutdown().await;
}
