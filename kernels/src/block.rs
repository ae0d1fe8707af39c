//! Geometry of a block payload.
//!
//! A block holds the KV of `tokens` tokens for all layers, layer-major: for
//! each layer, each of its tensors (K then V, or the one MLA latent) as
//! `[token][kv_head][head_dim]` elements. A layer is one contiguous range,
//! so a client can load or store layer by layer.

/// Shape of one block, in elements and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGeometry {
    pub layers: u32,
    /// 2 for separate K and V, 1 for an MLA latent.
    pub tensors: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub dtype_bytes: u32,
    pub tokens: u32,
}

impl BlockGeometry {
    /// Bytes of one tensor of one layer.
    pub const fn tensor_bytes(&self) -> u64 {
        self.tokens as u64 * self.kv_heads as u64 * self.head_dim as u64 * self.dtype_bytes as u64
    }

    /// Bytes of one layer (all its tensors).
    pub const fn layer_bytes(&self) -> u64 {
        self.tensor_bytes() * self.tensors as u64
    }

    pub const fn total_bytes(&self) -> u64 {
        self.layer_bytes() * self.layers as u64
    }

    /// Byte range of `tensor` (0 = K, 1 = V) of `layer`.
    pub fn tensor_range(&self, layer: u32, tensor: u32) -> std::ops::Range<usize> {
        assert!(
            layer < self.layers && tensor < self.tensors,
            "layer {layer} tensor {tensor} out of range"
        );
        let start = layer as u64 * self.layer_bytes() + tensor as u64 * self.tensor_bytes();
        start as usize..(start + self.tensor_bytes()) as usize
    }

    /// Byte offset of element `(token, head, 0)` inside a tensor range.
    pub fn row_offset(&self, token: u32, head: u32) -> usize {
        ((token as u64 * self.kv_heads as u64 + head as u64)
            * self.head_dim as u64
            * self.dtype_bytes as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_tile_the_block() {
        let g = BlockGeometry {
            layers: 3,
            tensors: 2,
            kv_heads: 2,
            head_dim: 4,
            dtype_bytes: 2,
            tokens: 5,
        };
        let mut next = 0;
        for l in 0..3 {
            for t in 0..2 {
                let r = g.tensor_range(l, t);
                assert_eq!(r.start, next);
                next = r.end;
            }
        }
        assert_eq!(next as u64, g.total_bytes());
        assert_eq!(g.row_offset(1, 1), (2 + 1) * 4 * 2);
    }
}
