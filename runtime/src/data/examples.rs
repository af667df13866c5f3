//! What the training loop asks of a dataset. It lives with the data, not the loop, so that
//! `data` stays below `train` in the module graph: readers implement it without knowing the
//! trainer.

use super::DataError;
use crate::backend::HostTensor;

/// A dataset the loop draws batches from: the training file, or the test file.
pub trait Examples {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Program inputs for these examples: the model's inputs (`input_ids`, ...) and `labels`,
    /// padded to the longest example of the batch.
    fn batch(&self, idx: &[usize]) -> Result<Vec<(String, HostTensor)>, DataError>;
    /// Data-to-text sets: every prompt's human references, for scoring generations.
    fn references(&self) -> Option<&super::References> {
        None
    }
    /// The class or tag names in id order, when the set knows them (read from the config or
    /// collected from the training file): evaluation names entities by them.
    fn label_names(&self) -> Option<&[String]> {
        None
    }
    /// Data-to-text sets: how generated ids become text.
    fn text_codec(&self) -> Option<&super::tokenize::TextCodec> {
        None
    }
    /// Causal-lm sets: example `i`'s prompt, the tokens before its first scored one (None
    /// when every token is scored).
    fn prompt(&self, _i: usize) -> Option<Vec<i64>> {
        None
    }
}
