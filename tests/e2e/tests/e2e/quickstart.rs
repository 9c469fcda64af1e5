//! `outpost up` in-process: two agents converge on every demo model and answer the printed curl
//! commands' requests.

use firmware_config::CoordinatorConfig;
use outpost::quickstart::{self, Options};
use outpost_runtime::http::Request;
use outpost_test_support::http::send;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_every_demo_model_on_every_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = CoordinatorConfig::default();
    coordinator.quic.listen = "127.0.0.1:0".parse().unwrap();
    coordinator.admin.listen = "127.0.0.1:0".parse().unwrap();
    coordinator.mqtt.listen = Some("127.0.0.1:0".parse().unwrap());
    let options = Options {
        agents: 2,
        first_port: 0,
        data_dir: dir.path().to_owned(),
        coordinator,
    };
    let mut lines = Vec::new();
    let running = quickstart::up(&options, |l| lines.push(l.to_owned()))
        .await
        .unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("2/2 agents serve every model")),
        "{lines:?}"
    );
    assert_eq!(running.agents.len(), 2);
    assert_ne!(
        running.agents[0].device_id, running.agents[1].device_id,
        "each agent has its own identity"
    );

    // Every curl command the quickstart prints works against the first agent.
    let examples = quickstart::curl_examples(running.agents[0].api_addr);
    for line in examples.lines() {
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap();
        let path = &url[url.find("/v").unwrap()..];
        let body = line
            .split_once(" -d '")
            .map(|(_, b)| b.trim_end_matches('\'').to_owned());
        let request = match body {
            Some(body) => Request::post(path, body),
            None => Request::get(path),
        };
        let answer = send(running.agents[0].api_addr, request).await;
        assert_eq!(answer.status, 200, "{line}\n{}", answer.text());
        // The text examples answer what their text asks.
        let top = |width: usize| {
            let reply: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
            let v: Vec<f64> = serde_json::from_value(reply["outputs"][0]["data"].clone()).unwrap();
            let first = &v[..width];
            (0..width)
                .max_by(|&a, &b| first[a].total_cmp(&first[b]))
                .unwrap()
        };
        if path.contains("intent-classifier-text") {
            // Asked for as its top 3 classes (the classification extension), best first.
            let reply: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
            let classes: Vec<String> =
                serde_json::from_value(reply["outputs"][0]["data"].clone()).unwrap();
            assert_eq!(
                reply["outputs"][0]["shape"],
                serde_json::json!([2, 3]),
                "{reply}"
            );
            assert!(classes[0].ends_with(":refund_request"), "{line}\n{reply}");
        }
        if path.contains("video-search") {
            assert_eq!(
                model_zoo::encoder::CATALOG_TITLES[top(48)],
                "calm piano for study",
                "{line}"
            );
        }
    }
    running.shutdown().await;
}
