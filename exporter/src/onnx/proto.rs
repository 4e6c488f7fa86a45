//! A minimal protobuf writer for the subset of `onnx.proto` the exporter emits.
//!
//! Field numbers follow `onnx/onnx.proto` (IR version 8). Only encoding is needed: the
//! exporter writes models; ONNX Runtime reads them. Keeping this in-tree avoids a protoc
//! build step and a code generator in the dependency set.

/// Wire types used here.
const VARINT: u32 = 0;
const LEN: u32 = 2;

/// A protobuf message under construction.
#[derive(Default)]
pub struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u32) {
        self.varint(u64::from((field << 3) | wire));
    }

    pub fn int(&mut self, field: u32, v: i64) -> &mut Self {
        self.tag(field, VARINT);
        self.varint(v as u64);
        self
    }

    pub fn float(&mut self, field: u32, v: f32) -> &mut Self {
        self.tag(field, 5);
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, field: u32, v: &[u8]) -> &mut Self {
        self.tag(field, LEN);
        self.varint(v.len() as u64);
        self.buf.extend_from_slice(v);
        self
    }

    pub fn string(&mut self, field: u32, v: &str) -> &mut Self {
        self.bytes(field, v.as_bytes())
    }

    pub fn msg(&mut self, field: u32, m: Msg) -> &mut Self {
        self.bytes(field, &m.buf)
    }

    /// Packed repeated int64.
    pub fn packed_ints(&mut self, field: u32, vs: &[i64]) -> &mut Self {
        let mut inner = Msg::new();
        for &v in vs {
            inner.varint(v as u64);
        }
        self.bytes(field, &inner.buf)
    }

    /// Packed repeated float.
    pub fn packed_floats(&mut self, field: u32, vs: &[f32]) -> &mut Self {
        let mut inner = Vec::with_capacity(vs.len() * 4);
        for v in vs {
            inner.extend_from_slice(&v.to_le_bytes());
        }
        self.bytes(field, &inner)
    }
}

/// Field numbers of the ONNX messages written here.
pub mod field {
    pub mod model {
        pub const IR_VERSION: u32 = 1;
        pub const PRODUCER_NAME: u32 = 2;
        pub const PRODUCER_VERSION: u32 = 3;
        pub const DOC_STRING: u32 = 6;
        pub const GRAPH: u32 = 7;
        pub const OPSET_IMPORT: u32 = 8;
        pub const METADATA_PROPS: u32 = 14;
    }
    pub mod opset {
        pub const DOMAIN: u32 = 1;
        pub const VERSION: u32 = 2;
    }
    pub mod graph {
        pub const NODE: u32 = 1;
        pub const NAME: u32 = 2;
        pub const INITIALIZER: u32 = 5;
        pub const INPUT: u32 = 11;
        pub const OUTPUT: u32 = 12;
    }
    pub mod node {
        pub const INPUT: u32 = 1;
        pub const OUTPUT: u32 = 2;
        pub const NAME: u32 = 3;
        pub const OP_TYPE: u32 = 4;
        pub const ATTRIBUTE: u32 = 5;
        pub const DOMAIN: u32 = 7;
    }
    pub mod attr {
        pub const NAME: u32 = 1;
        pub const F: u32 = 2;
        pub const I: u32 = 3;
        pub const S: u32 = 4;
        pub const T: u32 = 5;
        pub const INTS: u32 = 8;
        pub const TYPE: u32 = 20;
        pub const TYPE_FLOAT: i64 = 1;
        pub const TYPE_INT: i64 = 2;
        pub const TYPE_STRING: i64 = 3;
        pub const TYPE_TENSOR: i64 = 4;
        pub const TYPE_INTS: i64 = 7;
    }
    pub mod tensor {
        pub const DIMS: u32 = 1;
        pub const DATA_TYPE: u32 = 2;
        pub const NAME: u32 = 8;
        pub const RAW_DATA: u32 = 9;
        pub const EXTERNAL_DATA: u32 = 13;
        pub const DATA_LOCATION: u32 = 14;
        pub const LOCATION_EXTERNAL: i64 = 1;
    }
    pub mod entry {
        pub const KEY: u32 = 1;
        pub const VALUE: u32 = 2;
    }
    pub mod value_info {
        pub const NAME: u32 = 1;
        pub const TYPE: u32 = 2;
    }
    pub mod type_proto {
        pub const TENSOR_TYPE: u32 = 1;
        pub const ELEM_TYPE: u32 = 1;
        pub const SHAPE: u32 = 2;
    }
    pub mod shape {
        pub const DIM: u32 = 1;
        pub const DIM_VALUE: u32 = 1;
        pub const DIM_PARAM: u32 = 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_encoding_matches_protobuf() {
        let mut m = Msg::new();
        m.int(1, 300);
        assert_eq!(m.into_bytes(), vec![0x08, 0xAC, 0x02]);
        let mut m = Msg::new();
        m.int(2, -1);
        // Negative int64 is a ten-byte varint.
        assert_eq!(m.into_bytes().len(), 11);
    }

    #[test]
    fn nested_message_is_length_prefixed() {
        let mut inner = Msg::new();
        inner.string(1, "ab");
        let mut outer = Msg::new();
        outer.msg(3, inner);
        assert_eq!(outer.into_bytes(), vec![0x1A, 4, 0x0A, 2, b'a', b'b']);
    }
}
