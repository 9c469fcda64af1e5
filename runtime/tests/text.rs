//! Text in, on the model-zoo encoder and its HuggingFace tokenizer.json: texts become the
//! model's token-id inputs, padded to a bucket, and the encoder answers them as it answers the
//! same texts tokenized one by one; bad text is refused by name; truncation cuts and says so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use model_zoo::{DEFAULT_SEED, TextModel, vocab};
use outpost_runtime::text::{TextError, TextTokenizer};
use outpost_runtime::tract::TractModel;
use outpost_shared::release::{Blob, Dim, TextInput};
use outpost_shared::{DataType, Tensor, TensorSpec};

fn spec(max_tokens: u32, truncate: bool) -> TextInput {
    let json = vocab::tokenizer_json();
    TextInput {
        name: "text".into(),
        input_ids: "input_ids".into(),
        attention_mask: Some("attention_mask".into()),
        token_type_ids: Some("token_type_ids".into()),
        max_tokens,
        truncate,
        tokenizer: Blob::describe(json.as_bytes()),
    }
}

fn tokenizer(max_tokens: u32, truncate: bool) -> TextTokenizer {
    TextTokenizer::load(
        vocab::tokenizer_json().as_bytes(),
        &spec(max_tokens, truncate),
    )
    .unwrap()
}

fn ids_spec(sequence: Dim) -> TensorSpec {
    TensorSpec {
        name: "input_ids".into(),
        datatype: DataType::Int64,
        shape: vec![Dim::Dynamic, sequence],
    }
}

fn texts(items: &[&[u8]]) -> Tensor {
    Tensor::from_byte_strings("text", vec![items.len() as u64], items).unwrap()
}

#[test]
fn texts_become_padded_token_ids_and_the_encoder_answers_them_as_alone() {
    let t = tokenizer(512, false);
    assert_eq!(t.kind(), "WordPiece");
    let batch = texts(&[b"refund my order", b"play calm piano for study tonight"]);
    let encoded = t.encode(&batch, &ids_spec(Dim::Dynamic)).unwrap();
    assert_eq!(encoded.length, 16, "the smallest bucket holds 9 tokens");
    let names: Vec<&str> = encoded.inputs.iter().map(Tensor::name).collect();
    assert_eq!(names, ["input_ids", "attention_mask", "token_type_ids"]);
    let ids = encoded.inputs[0].to_values::<i64>().unwrap();
    let mask = encoded.inputs[1].to_values::<i64>().unwrap();
    assert_eq!(ids[0], i64::from(vocab::CLS.1));
    assert_eq!(&mask[..6], &[1, 1, 1, 1, 1, 0]);
    assert_eq!(ids[5], i64::from(vocab::PAD.1));
    assert!(encoded.truncated.is_empty());

    let model = TractModel::load(&TextModel::TextEncoder.bytes(DEFAULT_SEED).unwrap()).unwrap();
    let together = model.run(&encoded.inputs).unwrap();
    for (row, text) in ["refund my order", "play calm piano for study tonight"]
        .iter()
        .enumerate()
    {
        let alone = t
            .encode(&texts(&[text.as_bytes()]), &ids_spec(Dim::Dynamic))
            .unwrap();
        let out = model.run(&alone.inputs).unwrap();
        let a = out[1].to_values::<f32>().unwrap();
        let b = together[1].to_values::<f32>().unwrap();
        let worst = a
            .iter()
            .zip(&b[row * 128..(row + 1) * 128])
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "row {row} moved by {worst}");
    }
}

#[test]
fn a_fixed_sequence_is_padded_to_its_length() {
    let t = tokenizer(64, false);
    let encoded = t
        .encode(&texts(&[b"hello"]), &ids_spec(Dim::Fixed(40)))
        .unwrap();
    assert_eq!(encoded.inputs[0].shape(), &[1, 40]);
    let long = "piano ".repeat(50);
    let err = t
        .encode(&texts(&[long.as_bytes()]), &ids_spec(Dim::Fixed(40)))
        .unwrap_err();
    assert!(matches!(err, TextError::TooLong { .. }), "{err}");
}

#[test]
fn bad_text_is_refused_by_name_and_long_text_is_cut_when_asked() {
    let t = tokenizer(8, false);
    let ids = ids_spec(Dim::Dynamic);
    let cases: [(&[&[u8]], &str); 4] = [
        (&[b"fine", b"\xff\xfe"], "element 1 is not UTF-8"),
        (&[b"   "], "element 0 is empty"),
        (
            &[b"play stop start pause resume skip next"],
            "element 0 is 9 tokens, more than this model's 8",
        ),
        (&[&[b'a'; 600]], "over 600 bytes"),
    ];
    for (items, needle) in cases {
        let err = t.encode(&texts(items), &ids).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
        assert!(err.contains("\"text\""), "{err}");
    }
    let floats = Tensor::from_values("text", vec![1], &[1.0f32]).unwrap();
    assert!(matches!(
        t.encode(&floats, &ids).unwrap_err(),
        TextError::Shape { .. }
    ));

    let cutting = tokenizer(8, true);
    let long = "play stop start pause resume skip next";
    let huge = "piano ".repeat(10_000);
    let encoded = cutting
        .encode(&texts(&[b"short", long.as_bytes(), huge.as_bytes()]), &ids)
        .unwrap();
    assert_eq!(encoded.truncated, vec![1, 2]);
    assert_eq!(encoded.length, 8);
    let ids = encoded.inputs[0].to_values::<i64>().unwrap();
    // Cut texts keep their closing [SEP].
    assert_eq!(ids[15], i64::from(vocab::SEP.1));
    assert_eq!(ids[23], i64::from(vocab::SEP.1));
}

#[test]
fn a_file_that_is_not_a_tokenizer_is_refused() {
    let err = TextTokenizer::load(b"{\"model\": 3}", &spec(16, false)).unwrap_err();
    assert!(matches!(err, TextError::Tokenizer(_)), "{err}");
}

#[test]
fn sample_texts_are_deterministic_words_of_the_vocabulary() {
    let t = tokenizer(512, false);
    let a = t.sample_texts(8, 3);
    assert_eq!(a, t.sample_texts(8, 3));
    assert_eq!(a.len(), 8);
    assert!(a.iter().all(|s| (3..=24).contains(&s.split(' ').count())));
}
