//! The gate's generated inputs: drawn from the signature with a fixed seed, integer inputs that
//! index an embedding table within the table (see [`GraphFacts`]).

use outpost_shared::{DataType, Tensor, TensorSpec};

use super::GraphFacts;

/// Rows generated for the first dynamic dimension (the batch).
pub const SAMPLE_ROWS: u64 = 64;
/// Size generated for other dynamic dimensions (a sequence length, say).
pub const SAMPLE_WIDTH: u64 = 8;

/// Inputs for `specs`, drawn from a fixed seed (the same model gets the same samples).
pub fn generate_samples(
    specs: &[TensorSpec],
    facts: &GraphFacts,
    seed: u64,
) -> Result<Vec<Tensor>, String> {
    let mut rng = XorShift(seed | 1);
    specs
        .iter()
        .map(|s| {
            let shape = crate::engine::concrete_shape(s, SAMPLE_ROWS, SAMPLE_WIDTH);
            let n = outpost_shared::tensor::element_count(&shape)
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n <= 1 << 24)
                .ok_or_else(|| {
                    format!(
                        "input {:?} is too large to sample; give a sample file",
                        s.name
                    )
                })?;
            let bound = facts.index_bounds.get(&s.name).copied().unwrap_or(2).max(1);
            let mut ints = || (0..n).map(|_| rng.below(bound)).collect::<Vec<u64>>();
            let name = s.name.clone();
            let tensor = match s.datatype {
                DataType::Fp32 => {
                    let v: Vec<f32> = (0..n).map(|_| rng.unit() as f32).collect();
                    Tensor::from_values(name, shape, &v)
                }
                DataType::Fp64 => {
                    let v: Vec<f64> = (0..n).map(|_| rng.unit()).collect();
                    Tensor::from_values(name, shape, &v)
                }
                DataType::Int64 => {
                    let v: Vec<i64> = ints().into_iter().map(|i| i as i64).collect();
                    Tensor::from_values(name, shape, &v)
                }
                DataType::Int32 => {
                    let v: Vec<i32> = ints()
                        .into_iter()
                        .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
                        .collect();
                    Tensor::from_values(name, shape, &v)
                }
                DataType::Bool => {
                    let v: Vec<bool> = (0..n).map(|_| rng.below(2) == 1).collect();
                    Tensor::from_values(name, shape, &v)
                }
                other => {
                    return Err(format!(
                        "cannot generate {other} samples for input {:?}; give a sample file",
                        s.name
                    ));
                }
            };
            tensor.map_err(|e| e.to_string())
        })
        .collect()
}

/// xorshift64*: deterministic samples without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[-1, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// Uniform in `0..bound` (bound > 0).
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use outpost_shared::Dim;

    #[test]
    fn samples_follow_the_signature() {
        let specs = vec![
            TensorSpec {
                name: "ids".into(),
                datatype: DataType::Int64,
                shape: vec![Dim::Dynamic, Dim::Dynamic],
            },
            TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![Dim::Dynamic, Dim::Fixed(3)],
            },
        ];
        let facts = GraphFacts {
            index_bounds: HashMap::from([("ids".to_owned(), 10)]),
            ..GraphFacts::default()
        };
        let samples = generate_samples(&specs, &facts, 7).unwrap();
        assert_eq!(samples[0].shape(), &[SAMPLE_ROWS, SAMPLE_WIDTH]);
        let ids = samples[0].to_values::<i64>().unwrap();
        assert!(ids.iter().all(|&i| (0..10).contains(&i)));
        assert!(
            ids.iter().any(|&i| i > 1),
            "ids should spread over the table"
        );
        let x = samples[1].to_values::<f32>().unwrap();
        assert_eq!(x.len() as u64, SAMPLE_ROWS * 3);
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)));
        assert_eq!(samples, generate_samples(&specs, &facts, 7).unwrap());
    }
}
