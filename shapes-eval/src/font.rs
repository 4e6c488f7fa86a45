//! A 5x7 bitmap font for lower-case letters, enough to print ShapesEval prompts on the contact
//! sheet without a font file. Any other character is drawn as a blank.

use image::{Rgb, RgbImage};

/// Rows top to bottom; bit 4 is the leftmost pixel.
const GLYPHS: [[u8; 7]; 26] = [
    [0, 0, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111], // a
    [
        0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110,
    ], // b
    [0, 0, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110], // c
    [
        0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111,
    ], // d
    [0, 0, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110], // e
    [
        0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000,
    ], // f
    [0, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // g
    [
        0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001,
    ], // h
    [0b00100, 0, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110], // i
    [0b00010, 0, 0b00110, 0b00010, 0b00010, 0b10010, 0b01100], // j
    [
        0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010,
    ], // k
    [
        0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
    ], // l
    [0, 0, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001], // m
    [0, 0, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001], // n
    [0, 0, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110], // o
    [0, 0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000], // p
    [0, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b00001], // q
    [0, 0, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000], // r
    [0, 0, 0b01111, 0b10000, 0b01110, 0b00001, 0b11110], // s
    [
        0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110,
    ], // t
    [0, 0, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101], // u
    [0, 0, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100], // v
    [0, 0, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010], // w
    [0, 0, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001], // x
    [0, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // y
    [0, 0, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111], // z
];

/// Advance per character and per line, in pixels.
pub const CHAR_W: u32 = 6;
pub const LINE_H: u32 = 9;

/// Draws `text` with its top-left corner at (x, y), clipped to the image.
pub fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, colour: Rgb<u8>) {
    for (k, ch) in text.chars().enumerate() {
        let lower = ch.to_ascii_lowercase();
        if !lower.is_ascii_lowercase() {
            continue;
        }
        let g = GLYPHS[usize::from(lower as u8 - b'a')];
        let x0 = x + k as u32 * CHAR_W;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5u32 {
                if bits & (0b10000 >> col) != 0 {
                    let (px, py) = (x0 + col, y + row as u32);
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, colour);
                    }
                }
            }
        }
    }
}

/// Splits `text` into lines of at most `width` characters at spaces (a longer word is cut).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_string();
        while word.len() > width {
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            let rest = word.split_off(width);
            lines.push(word);
            word = rest;
        }
        if cur.is_empty() {
            cur = word;
        } else if cur.len() + 1 + word.len() <= width {
            cur.push(' ');
            cur.push_str(&word);
        } else {
            lines.push(std::mem::replace(&mut cur, word));
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_spaces() {
        assert_eq!(
            wrap("a yellow triangle left of a purple circle", 21),
            ["a yellow triangle", "left of a purple", "circle"]
        );
        assert_eq!(wrap("abcdefgh", 3), ["abc", "def", "gh"]);
        assert!(wrap("", 5).is_empty());
    }

    #[test]
    fn draws_inside_the_image_only() {
        let mut img = RgbImage::from_pixel(20, 10, Rgb([255, 255, 255]));
        draw_text(&mut img, 0, 0, "ab c", Rgb([0, 0, 0]));
        let dark = img.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(dark > 20, "{dark}");
        // Clipped, not panicking, at the edge.
        draw_text(&mut img, 18, 8, "zzz", Rgb([0, 0, 0]));
        // Every glyph differs from every other.
        for (a, ga) in GLYPHS.iter().enumerate() {
            for (b, gb) in GLYPHS.iter().enumerate().skip(a + 1) {
                assert_ne!(ga, gb, "{a} {b}");
            }
        }
    }
}
