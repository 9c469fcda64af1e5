//! The foundation end to end, across crates: a provisioned fleet's signing key signs a release
//! of a demo model; an agent's config (as provisioning wrote it) verifies it; the model's chunks,
//! moved as QUIC frames would move them, reassemble into bytes that match the manifest's digest
//! and that tract runs; a tampered chunk is caught.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use firmware_config::{AgentConfig, CoordinatorConfig, FleetPlan};
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_shared::frame::{self, MAX_FRAME_BYTES};
use outpost_shared::rollout::check_forward;
use outpost_shared::{
    DataType, Dim, Manifest, ManifestSigner, ManifestVerifier, ModelFormat, ModelVersion,
    Placement, Request, Response, Target, TensorSpec, Topic, Variant,
};
use tract_onnx::prelude::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn ranker_version(version: u64, bytes: &[u8]) -> ModelVersion {
    let spec = |name: &str, datatype, shape: Vec<Dim>| TensorSpec {
        name: name.into(),
        datatype,
        shape,
    };
    ModelVersion {
        version,
        inputs: vec![
            spec(
                "user_features",
                DataType::Fp32,
                vec![Dim::Dynamic, Dim::Fixed(32)],
            ),
            spec("item_ids", DataType::Int64, vec![Dim::Dynamic]),
        ],
        outputs: vec![spec(
            "score",
            DataType::Fp32,
            vec![Dim::Dynamic, Dim::Fixed(1)],
        )],
        placement: Placement::Local,
        max_batch: None,
        text: None,
        variants: vec![Variant::describe(
            Target::EdgeFp32,
            ModelFormat::Onnx,
            bytes,
        )],
    }
}

#[test]
fn provisioned_fleet_signs_chunks_and_runs_a_demo_model() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FleetPlan::numbered(
        "e2e",
        1,
        vec!["localhost:4433".parse().unwrap()],
        "localhost:1883".parse().unwrap(),
    )
    .unwrap();
    let fleet = firmware_config::provision(&plan, dir.path()).unwrap();

    // Coordinator side: sign a release of video-ranker with the fleet key from its config.
    let coordinator = CoordinatorConfig::load(&fleet.coordinator_config).unwrap();
    let key_pem =
        std::fs::read_to_string(&coordinator.fleet.as_ref().unwrap().signing_key).unwrap();
    let signer = ManifestSigner::from_pkcs8(pem::parse(key_pem).unwrap().contents()).unwrap();
    let model_bytes = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    let manifest = Manifest {
        model: DemoModel::VideoRanker.name().into(),
        release: 1,
        created_at: now(),
        expires_at: Some(now() + 3600),
        stable: ranker_version(1, &model_bytes),
        candidate: None,
    };
    let published = signer.sign(&manifest).unwrap().to_cbor().unwrap();
    let topic = Topic::manifest(&manifest.model).unwrap().name();
    assert_eq!(
        Topic::parse(&topic).unwrap(),
        Topic::Manifest {
            model: "video-ranker".into()
        }
    );
    let store: HashMap<_, _> = outpost_shared::chunk::split_model(&model_bytes)
        .iter()
        .map(|s| (s.id, s.bytes(&model_bytes).to_vec()))
        .collect();

    // Agent side: verify with the keys from its provisioned config.
    let agent = AgentConfig::load(&fleet.devices[0].1).unwrap();
    let verifier = ManifestVerifier::new(agent.fleet.manifest_keys.clone());
    let accepted = verifier.verify_cbor(&published, now()).unwrap();
    check_forward(None, &accepted).unwrap();
    let variant = accepted
        .version_for(agent.device.id.as_str())
        .variant(Target::EdgeFp32)
        .unwrap()
        .clone();
    assert!(
        variant.chunks.len() >= 2,
        "the model should span several chunks"
    );

    // Fetch every chunk through the frame codec, as the QUIC service will.
    let request = frame::encode(
        &Request::GetChunks {
            ids: variant.chunks.iter().map(|c| c.id).collect(),
        },
        MAX_FRAME_BYTES,
    )
    .unwrap();
    let Request::GetChunks { ids } = frame::decode::<Request>(&request, MAX_FRAME_BYTES)
        .unwrap()
        .unwrap()
        .0
    else {
        panic!("not a GetChunks request");
    };
    let mut stream = Vec::new();
    for id in ids {
        let data = store[&id].clone();
        stream.extend(frame::encode(&Response::Chunk { id, data }, MAX_FRAME_BYTES).unwrap());
    }
    let mut assembled = Vec::new();
    let mut rest = &stream[..];
    while let Some((response, used)) = frame::decode::<Response>(rest, MAX_FRAME_BYTES).unwrap() {
        let Response::Chunk { id, data } = response else {
            panic!("unexpected {response:?}")
        };
        id.verify(&data).unwrap();
        assembled.extend(data);
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    variant.digest.verify(&assembled).unwrap();
    assert_eq!(assembled.len() as u64, variant.size);

    // The reassembled model runs in tract and agrees with the original.
    let run = |bytes: &[u8]| -> Vec<f32> {
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let user = Tensor::from_shape(&[2, 32], &[0.25f32; 64])
            .unwrap()
            .into_tvalue();
        let ids = Tensor::from_shape(&[2], &[3i64, 4]).unwrap().into_tvalue();
        plan.run(tvec!(user, ids)).unwrap()[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    };
    assert_eq!(run(&assembled), run(&model_bytes));

    // A chunk altered in transit is caught by its id.
    let first = &variant.chunks[0];
    let mut bad = store[&first.id].clone();
    bad[100] ^= 1;
    assert!(first.id.verify(&bad).is_err());

    // A manifest signed by another fleet changes nothing.
    let other = tempfile::tempdir().unwrap();
    let other_fleet = firmware_config::provision(&plan, other.path()).unwrap();
    let other_coordinator = CoordinatorConfig::load(&other_fleet.coordinator_config).unwrap();
    let other_pem = std::fs::read_to_string(&other_coordinator.fleet.unwrap().signing_key).unwrap();
    let other_signer =
        ManifestSigner::from_pkcs8(pem::parse(other_pem).unwrap().contents()).unwrap();
    let foreign = other_signer
        .sign(&Manifest {
            release: 2,
            ..manifest.clone()
        })
        .unwrap()
        .to_cbor()
        .unwrap();
    assert!(verifier.verify_cbor(&foreign, now()).is_err());
}
