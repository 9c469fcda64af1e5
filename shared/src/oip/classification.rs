//! The classification extension (as Triton serves it): an output asked for with
//! `parameters.classification: N` is answered as its top N classes per row, each the string
//! `"score:index:label"` (`"score:index"` when the model names no classes), best first, as a
//! BYTES tensor `[rows, N]` (`[N]` for an output with no batch dimension).

use crate::tensor::{DataType, Tensor, TensorError};

/// The name of the extension, as `GET /v2` lists it.
pub const EXTENSION: &str = "classification";

/// The elements of a numeric tensor as `f64`, in order; BYTES is [`TensorError::DatatypeMismatch`].
fn scores(t: &Tensor) -> Result<Vec<f64>, TensorError> {
    Ok(match t.datatype() {
        DataType::Bool => t.to_values::<bool>()?.into_iter().map(f64::from).collect(),
        DataType::Uint8 => t.to_values::<u8>()?.into_iter().map(f64::from).collect(),
        DataType::Int8 => t.to_values::<i8>()?.into_iter().map(f64::from).collect(),
        DataType::Int32 => t.to_values::<i32>()?.into_iter().map(f64::from).collect(),
        DataType::Int64 => t
            .to_values::<i64>()?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        DataType::Fp16 => t
            .to_values::<half::f16>()?
            .into_iter()
            .map(f64::from)
            .collect(),
        DataType::Fp32 => t.to_values::<f32>()?.into_iter().map(f64::from).collect(),
        DataType::Fp64 => t.to_values::<f64>()?,
        DataType::Bytes => {
            return Err(TensorError::DatatypeMismatch {
                tensor: t.name().to_owned(),
                expected: DataType::Fp32,
                actual: DataType::Bytes,
            });
        }
    })
}

/// A score as its own type writes it: an FP32 or FP16 score in the fewest digits that read back
/// as the same f32 (`0.7142215`, not the `0.7142214775085449` of its f64 widening).
fn written(score: f64, datatype: DataType) -> String {
    match datatype {
        DataType::Fp32 | DataType::Fp16 => (score as f32).to_string(),
        _ => score.to_string(),
    }
}

/// `t` as its `top` best classes per row (at most the classes there are), labelled from
/// `labels` when it names one per class.
pub fn classify(t: &Tensor, top: usize, labels: &[String]) -> Result<Tensor, TensorError> {
    let values = scores(t)?;
    let (rows, batched) = match t.shape() {
        [rows, _, ..] => (*rows as usize, true),
        _ => (1, false),
    };
    let width = values.len().checked_div(rows).unwrap_or(0);
    let top = top.min(width);
    let named = labels.len() == width;
    let mut classes = Vec::with_capacity(rows * top);
    for row in values.chunks(width.max(1)).take(rows) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        // Best first; ties by index, so the answer does not depend on the sort.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &i in order.iter().take(top) {
            let score = written(row[i], t.datatype());
            classes.push(match named {
                true => format!("{score}:{i}:{}", labels[i]),
                false => format!("{score}:{i}"),
            });
        }
    }
    let shape = match batched {
        true => vec![rows as u64, top as u64],
        false => vec![top as u64],
    };
    Tensor::from_byte_strings(t.name(), shape, &classes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_classes_come_first_with_their_labels() {
        let t = Tensor::from_values("p", vec![2, 3], &[0.1f32, 0.7, 0.2, 0.5, 0.25, 0.25]).unwrap();
        let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let top = classify(&t, 2, &labels).unwrap();
        assert_eq!(top.shape(), &[2, 2]);
        let got: Vec<String> = top
            .byte_strings()
            .unwrap()
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        assert_eq!(got, ["0.7:1:b", "0.2:2:c", "0.5:0:a", "0.25:1:b"]);
        // More than there are: all of them; labels that do not fit: indices only.
        let all = classify(&t, 10, &labels[..2]).unwrap();
        assert_eq!(all.shape(), &[2, 3]);
        assert!(!String::from_utf8_lossy(all.byte_strings().unwrap()[0]).contains('b'));
        let flat = Tensor::from_values("s", vec![3], &[1i64, 3, 2]).unwrap();
        let one = classify(&flat, 1, &[]).unwrap();
        assert_eq!(one.shape(), &[1]);
        assert_eq!(one.byte_strings().unwrap(), vec![&b"3:1"[..]]);
        let text = Tensor::from_byte_strings("t", vec![1], &["x"]).unwrap();
        assert!(classify(&text, 1, &[]).is_err());
    }
}
