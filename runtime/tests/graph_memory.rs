//! What a model's graph says before a call runs, on the model-zoo models: an encoder's working
//! memory grows with the square of the sequence (attention) and linearly with the rows, a
//! ranker's with its rows only; both can be cut into row parts; id inputs that index a table are
//! found and checked; and an engine refuses an id past its table as the caller's error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use model_zoo::{DEFAULT_SEED, DemoModel, TextModel};
use outpost_runtime::RunError;
use outpost_runtime::memory::CallCost;
use outpost_runtime::tract::TractModel;
use outpost_shared::Tensor;

fn encoder() -> TractModel {
    TractModel::load(&TextModel::TextEncoder.bytes(DEFAULT_SEED).unwrap()).unwrap()
}

#[test]
fn an_encoders_memory_grows_with_rows_and_the_square_of_the_sequence() {
    let model = encoder();
    let graph = model.memory.as_ref().unwrap();
    assert!(graph.splits());
    assert!(graph.answers_by_row());
    assert!(graph.has_sequence());
    let at = |n| graph.cost(n);
    let (short, long) = (at(64), at(512));
    assert!(short.per_row > 0, "{short:?}");
    // 8× the tokens: more than 8× the bytes per row (attention is s²), at most 64×.
    let ratio = long.per_row as f64 / short.per_row as f64;
    assert!(ratio > 8.5 && ratio <= 64.0, "{ratio}: {short:?} {long:?}");
    // The same answer again from the cache.
    assert_eq!(at(64), short);
    // Rows: the cost is linear in them.
    let ids = |rows: u64, len: u64| {
        let n = (rows * len) as usize;
        vec![
            Tensor::from_values("input_ids", vec![rows, len], &vec![5i64; n]).unwrap(),
            Tensor::from_values("attention_mask", vec![rows, len], &vec![1i64; n]).unwrap(),
            Tensor::from_values("token_type_ids", vec![rows, len], &vec![0i64; n]).unwrap(),
        ]
    };
    assert_eq!(graph.sequence_of(&ids(3, 64)), 64);
    assert_eq!(
        graph.bytes_for(&ids(3, 64)),
        short.fixed + 3 * short.per_row
    );
}

#[test]
fn a_rankers_memory_grows_with_its_rows_only() {
    let model = TractModel::load(&DemoModel::VideoRanker.bytes(DEFAULT_SEED)).unwrap();
    let graph = model.memory.as_ref().unwrap();
    assert!(graph.splits());
    assert!(!graph.has_sequence());
    let CallCost { per_row, .. } = graph.cost(1);
    // At least the row's own inputs and outputs, twice (the engine's copy and the server's).
    assert!(per_row >= 2 * 4 * 32, "{per_row}");
    assert_eq!(graph.cost(1), graph.cost(4096), "no sequence: one cost");
}

#[test]
fn an_id_past_the_table_is_the_callers_error_named_before_the_engine_runs() {
    let model = encoder();
    let graph = model.memory.as_ref().unwrap();
    let ranges = graph.id_ranges();
    let ids = ranges
        .iter()
        .find(|r| r.input == "input_ids")
        .unwrap_or_else(|| panic!("{ranges:?}"));
    let table = model_zoo::vocab::vocabulary().len();
    assert_eq!(ids.rows, table as u64);
    let inputs = |id: i64| {
        vec![
            Tensor::from_values("input_ids", vec![1, 2], &[1i64, id]).unwrap(),
            Tensor::from_values("attention_mask", vec![1, 2], &[1i64, 1]).unwrap(),
            Tensor::from_values("token_type_ids", vec![1, 2], &[0i64, 0]).unwrap(),
        ]
    };
    assert!(model.run(&inputs(7)).is_ok());
    for bad in [99_999_999, table as i64, -(table as i64) - 1] {
        match model.run(&inputs(bad)) {
            Err(RunError::Input(m)) => {
                assert!(
                    m.contains("input_ids") && m.contains(&bad.to_string()),
                    "{m}"
                );
                assert!(m.contains(&table.to_string()), "{m}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn inputs_with_different_rows_are_the_callers_error() {
    let model = encoder();
    let inputs = vec![
        Tensor::from_values("input_ids", vec![2, 2], &[1i64, 2, 3, 4]).unwrap(),
        Tensor::from_values("attention_mask", vec![3, 2], &[1i64; 6]).unwrap(),
        Tensor::from_values("token_type_ids", vec![2, 2], &[0i64; 4]).unwrap(),
    ];
    match model.run(&inputs) {
        Err(RunError::Input(m)) => assert!(m.contains("2 and 3 rows"), "{m}"),
        other => panic!("{other:?}"),
    }
}
