//! Images in and out: guarded decoding (PNG, JPEG, WebP), D-DiT's preprocessing, PNG encoding.

use std::io::Cursor;

use image::{imageops::FilterType, DynamicImage, ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::{Result, WorkerError};
use crate::tensor::Tensor;

/// Decoding limits: a decompression bomb is refused before it is decoded.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
    pub max_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 << 20,
            max_pixels: 40_000_000,
            max_side: 16_384,
        }
    }
}

/// Decodes PNG, JPEG or WebP bytes into RGB, refusing anything over `limits`.
pub fn decode(bytes: &[u8], source: &str, limits: ImageLimits) -> Result<RgbImage> {
    check(bytes, source, limits)?;
    let bad = |m: String| WorkerError::InvalidInput {
        source_ref: source.to_string(),
        message: m,
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_pixels * 16);
    reader.limits(l);
    let img = reader
        .decode()
        .map_err(|e| bad(format!("cannot decode: {e}")))?;
    Ok(img.to_rgb8())
}

/// Checks what [`decode`] checks before decoding, without decoding: the size, a supported and
/// complete file, and its header's dimensions within `limits`. Cheap on any input.
pub fn check(bytes: &[u8], source: &str, limits: ImageLimits) -> Result<()> {
    let bad = |m: String| WorkerError::InvalidInput {
        source_ref: source.to_string(),
        message: m,
    };
    if bytes.len() > limits.max_bytes {
        return Err(bad(format!(
            "{} bytes exceeds the limit of {}",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => {
            if !complete(bytes, f) {
                return Err(bad(format!(
                    "truncated {f:?} file ({} bytes, no end marker)",
                    bytes.len()
                )));
            }
        }
        Some(f) => return Err(bad(format!("unsupported format {f:?} (PNG, JPEG or WebP)"))),
        None => return Err(bad("not a PNG, JPEG or WebP image".into())),
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| bad(format!("cannot read the header: {e}")))?;
    if w == 0
        || h == 0
        || w > limits.max_side
        || h > limits.max_side
        || u64::from(w) * u64::from(h) > limits.max_pixels
    {
        return Err(bad(format!(
            "{w}x{h} pixels exceeds the limits ({} pixels, {} per side)",
            limits.max_pixels, limits.max_side
        )));
    }
    Ok(())
}

/// Whether the file ends as its format says a whole file ends (decoders may fill in a truncated
/// image): PNG's `IEND` chunk, JPEG's end-of-image marker in the last KiB (cameras may append
/// bytes), WebP's RIFF length covered by the bytes.
fn complete(bytes: &[u8], format: ImageFormat) -> bool {
    match format {
        ImageFormat::Png => {
            bytes.len() >= 12 && &bytes[bytes.len() - 8..bytes.len() - 4] == b"IEND"
        }
        ImageFormat::Jpeg => bytes[bytes.len().saturating_sub(1024)..]
            .windows(2)
            .any(|w| w == [0xFF, 0xD9]),
        ImageFormat::WebP => bytes.get(4..8).is_some_and(|n| {
            let riff = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
            bytes.len() >= riff.saturating_add(8)
        }),
        _ => true,
    }
}

/// D-DiT's image transform: resize the shorter side to `size` (bicubic), centre-crop to
/// `size`×`size`, scale to [-1, 1]. Returns `[1, 3, size, size]`.
pub fn preprocess(img: &RgbImage, size: u32) -> Tensor {
    let (w, h) = img.dimensions();
    let scale = f64::from(size) / f64::from(w.min(h));
    let nw = ((f64::from(w) * scale).round() as u32).max(size);
    let nh = ((f64::from(h) * scale).round() as u32).max(size);
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, nw, nh, FilterType::CatmullRom)
    };
    let left = (nw - size) / 2;
    let top = (nh - size) / 2;
    let s = size as usize;
    let mut data = vec![0.0f32; 3 * s * s];
    for y in 0..s {
        for x in 0..s {
            let p = resized.get_pixel(left + x as u32, top + y as u32);
            for c in 0..3 {
                data[c * s * s + y * s + x] = f32::from(p[c]) / 127.5 - 1.0;
            }
        }
    }
    Tensor {
        shape: vec![1, 3, s, s],
        data,
    }
}

/// An image in [-1, 1] `[1, 3, H, W]` (one row of a batch) to RGB8, as diffusers does:
/// `(x / 2 + 0.5).clamp(0, 1) * 255`, rounded.
pub fn to_rgb(t: &Tensor) -> Result<RgbImage> {
    let (h, w) = (t.shape[2], t.shape[3]);
    let mut img = RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let mut px = [0u8; 3];
            for (c, v) in px.iter_mut().enumerate() {
                let f = (t.data[c * h * w + y * w + x] / 2.0 + 0.5).clamp(0.0, 1.0);
                *v = (f * 255.0).round() as u8;
            }
            img.put_pixel(x as u32, y as u32, image::Rgb(px));
        }
    }
    Ok(img)
}

pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|e| WorkerError::Internal(format!("png encode: {e}")))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        encode_png(&RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]))).unwrap_or_default()
    }

    #[test]
    fn decodes_and_round_trips() {
        let img =
            decode(&png(40, 20), "t", ImageLimits::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(img.dimensions(), (40, 20));
        let t = preprocess(&img, 16);
        assert_eq!(t.shape, vec![1, 3, 16, 16]);
        let back = to_rgb(&t).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.get_pixel(8, 8).0, [10, 200, 30]);
    }

    #[test]
    fn decodes_jpeg_and_webp() {
        let img = RgbImage::from_pixel(20, 12, image::Rgb([200, 30, 30]));
        for fmt in [ImageFormat::Jpeg, ImageFormat::WebP] {
            let mut buf = Cursor::new(Vec::new());
            DynamicImage::ImageRgb8(img.clone())
                .write_to(&mut buf, fmt)
                .unwrap_or_else(|e| panic!("{fmt:?}: {e}"));
            let back = decode(buf.get_ref(), "t", ImageLimits::default())
                .unwrap_or_else(|e| panic!("{fmt:?}: {e}"));
            assert_eq!(back.dimensions(), (20, 12), "{fmt:?}");
            let p = back.get_pixel(10, 6).0;
            assert!(
                (i32::from(p[0]) - 200).abs() < 12 && p[1] < 50,
                "{fmt:?}: {p:?}"
            );
        }
    }

    #[test]
    fn refuses_bombs_garbage_and_other_formats() {
        let limits = ImageLimits {
            max_bytes: 1 << 20,
            max_pixels: 1000,
            max_side: 100,
        };
        let err = decode(&png(64, 64), "big", limits)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("exceeds"), "{err}");
        assert!(decode(b"not an image", "g", limits).is_err());
        assert!(decode(b"GIF89a....", "gif", limits).is_err());
        let mut truncated = png(20, 20);
        truncated.truncate(truncated.len() / 2);
        assert!(decode(&truncated, "t", ImageLimits::default()).is_err());
    }

    /// A file cut short is refused in every format, whichever byte it ends at (some decoders fill
    /// the missing rows in); the whole file still decodes.
    #[test]
    fn refuses_truncated_files_in_every_format() {
        let img = RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (y * 13) as u8, (x * y) as u8])
        });
        for fmt in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
            let mut buf = Cursor::new(Vec::new());
            DynamicImage::ImageRgb8(img.clone())
                .write_to(&mut buf, fmt)
                .unwrap_or_else(|e| panic!("{fmt:?}: {e}"));
            let whole = buf.into_inner();
            assert!(
                decode(&whole, "t", ImageLimits::default()).is_ok(),
                "{fmt:?}"
            );
            for cut in [200, whole.len() / 2, whole.len() - 1] {
                let e = decode(&whole[..cut], "t", ImageLimits::default())
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                assert!(
                    !e.is_empty(),
                    "{fmt:?} cut at {cut} of {} decoded",
                    whole.len()
                );
            }
        }
    }
}
