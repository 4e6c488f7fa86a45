//! Hostile jobs the soak mixes in: well-formed messages built to cost a worker too much or to
//! trip its decoders. Each must end with one final `failed` result and its message in the DLQ
//! (or, when no id can be read from it, the DLQ alone), while the good jobs around it succeed.

use base64::Engine as _;
use serde_json::{json, Value};

/// How many kinds [`job`] cycles through.
pub const KINDS: usize = 8;

/// The CRC-32 of PNG chunks (ISO-HDLC), bit by bit: a few hundred bytes at most.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A PNG whose header claims `side` × `side` RGB pixels over a few bytes of data: a decoder that
/// trusts the header allocates `3 × side²` bytes.
fn bomb_png(side: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    // An empty zlib stream (a stored final block of zero bytes).
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 1],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:{mime};base64,{b64}")
}

/// Hostile job `i` (kind `i % KINDS`); `s3_image` is a readable input for the caption ones.
pub fn job(i: usize, s3_image: &str) -> Vec<u8> {
    let id = format!("hostile-{i:05}");
    let gen = |params: Value| json!({"job_id": id, "task": "generate", "params": params});
    let j = match i % KINDS {
        0 => json!({"job_id": id, "task": "caption",
            "params": {"image": data_uri("image/png", &bomb_png(60_000)), "steps": 4}}),
        1 => json!({"job_id": id, "task": "vqa",
            "params": {"image": data_uri("image/png", &bomb_png(16_000)), "question": "what?", "steps": 4}}),
        2 => gen(json!({"prompt": "a red circle", "steps": 251, "seed": 1})),
        3 => gen(json!({"prompt": "a red circle", "steps": 4, "num_images": 5})),
        4 => gen(json!({"prompt": "a red circle", "steps": 4, "width": 2048, "height": 2048})),
        5 => gen(json!({"prompt": "a red circle ".repeat(80_000), "steps": 4})),
        6 => json!({"job_id": id, "task": "vqa", "params": {"image": s3_image,
            "question": "why?".repeat(2_000), "steps": 4}}),
        _ => {
            // Nesting past any JSON parser's depth limit: not even the id can be read.
            let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
            let body = format!(
                "{{\"job_id\": \"{id}\", \"task\": \"generate\", \"params\": {{\"prompt\": {deep}}}}}"
            );
            return body.into_bytes();
        }
    };
    serde_json::to_vec(&j).unwrap()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_crc_is_png_s() {
        // The CRC of an IEND chunk, as every PNG file ends.
        assert_eq!(super::crc32(b"IEND"), 0xae42_6082);
    }
}
