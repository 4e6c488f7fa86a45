//! `manifest.json`: what the exporter promises and the worker checks before serving.

use serde::{Deserialize, Serialize};

/// Bumped whenever a field changes meaning. The worker refuses other versions.
pub const MANIFEST_FORMAT_VERSION: u32 = 2;

/// A model package's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub model: ModelInfo,
    pub values: ModelValues,
    pub tokenizer: FileEntry,
    pub segments: Vec<SegmentSpec>,
}

impl Manifest {
    /// The segments of one role, in manifest order (joint blocks come in block order).
    pub fn by_role(&self, role: Role) -> impl Iterator<Item = &SegmentSpec> {
        self.segments.iter().filter(move |s| s.role == role)
    }

    /// Every file of the package, tokenizer included.
    pub fn files(&self) -> impl Iterator<Item = &FileEntry> {
        std::iter::once(&self.tokenizer).chain(self.segments.iter().flat_map(|s| s.files.iter()))
    }
}

/// Where the package came from and its identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// Human name (defaults to the checkpoint folder's name).
    pub name: String,
    /// sha256 over the sorted `path sha256` lines of every file: the package's identity, used for
    /// results, S3 metadata and TensorRT cache keys.
    pub hash: String,
    /// `--weights`: `f32`, `f16` (stored f16, computed in f32) or `int8`. What each segment
    /// computes in is its [`SegmentSpec::precision`].
    pub weights_dtype: String,
    /// `ddit-export` version that wrote the package.
    pub exporter_version: String,
    /// ONNX opset of every segment.
    pub opset: u32,
}

/// Every model value the samplers need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelValues {
    pub hidden_size: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub patch_size: u64,
    pub latent_channels: u64,
    /// Largest latent grid (in patches) the position table covers, per side.
    pub pos_embed_max_size: u64,
    /// Latent side length the model was trained at (`sample_size`), the default image size / vae factor.
    pub sample_size: u64,
    pub vocab_size: u64,
    /// Width of the text encoder's hidden states (`joint_attention_dim`).
    pub text_hidden_size: u64,
    /// Number of tokens `null_image_embd` stands in with.
    pub null_image_tokens: u64,
    pub tokens: TokenIds,
    pub vae: VaeValues,
    pub scheduler: SchedulerValues,
    pub text_lengths: TextLengths,
    /// Prompt prefix a caption job gets when it names none (`params.prompt` absent): the text the model
    /// was trained to write its captions after. From the checkpoint's `model_index.json`
    /// (`caption_prompt`) or `ddit-export --caption-prompt`; absent for models that caption on a bare
    /// canvas, like the published D-DiT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_prompt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenIds {
    pub mask_id: u32,
    pub mask_token: String,
    pub pad_id: u32,
    pub eos_id: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeValues {
    pub scaling_factor: f64,
    pub shift_factor: f64,
    /// Pixels per latent cell along each side (2^(number of VAE blocks - 1)).
    pub downsample_factor: u64,
    pub image_channels: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerValues {
    pub shift: f64,
    pub num_train_timesteps: u64,
}

/// Default token lengths of the text canvases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextLengths {
    pub prompt: u64,
    pub caption: u64,
    pub vqa: u64,
}

/// One file of the package, relative to the package folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// The fixed vocabulary of segment roles. Each role has a documented I/O order (see README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// token ids `[batch, text_len]` -> T5 hidden states `[batch, text_len, text_hidden]`. A T5
    /// split by layers is several pieces in order (`blocks`: their layers); every piece after the
    /// first reads the previous one's hidden states.
    TextEncoder,
    /// T5 hidden states -> text stream `[batch, text_len, hidden]`.
    ContextEmbedder,
    /// timestep `[batch]` (0..num_train_timesteps scale) -> temb `[batch, hidden]`.
    TimestepEmbed,
    /// latents `[batch, C, h, w]` -> image stream `[batch, image_tokens, hidden]` (centre-cropped positions).
    PatchEmbed,
    /// temb `[batch, hidden]` -> `null_image_embd` repeated `[batch, 8, hidden]`.
    NullImage,
    /// (image stream, text stream, temb) -> (image stream, text stream), blocks `[start, end)`;
    /// every block but the last.
    JointBlocks,
    /// (image stream, text stream, temb) -> image stream: the last joint block, computing only
    /// the image stream's output (what generation reads).
    ImageTail,
    /// (image stream, text stream, temb) -> text stream: the last joint block, computing only
    /// the text stream's output (what captioning and VQA read).
    TextTail,
    /// (image stream, temb, latents `[batch, C, h, w]`, read only for their shape) -> velocity
    /// `[batch, C, h, w]`.
    ImageHead,
    /// text stream -> logits `[batch, text_len, vocab]`.
    TextHead,
    /// image in [-1, 1] `[batch, 3, H, W]` -> (posterior mean, posterior logvar) `[batch, C, H/f, W/f]`.
    VaeEncoder,
    /// latent in VAE space `[batch, C, h, w]` -> image in [-1, 1] `[batch, 3, h*f, w*f]`.
    VaeDecoder,
}

impl Role {
    pub const ALL: [Role; 12] = [
        Role::TextEncoder,
        Role::ContextEmbedder,
        Role::TimestepEmbed,
        Role::PatchEmbed,
        Role::NullImage,
        Role::JointBlocks,
        Role::ImageTail,
        Role::TextTail,
        Role::ImageHead,
        Role::TextHead,
        Role::VaeEncoder,
        Role::VaeDecoder,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::TextEncoder => "text_encoder",
            Role::ContextEmbedder => "context_embedder",
            Role::TimestepEmbed => "timestep_embed",
            Role::PatchEmbed => "patch_embed",
            Role::NullImage => "null_image",
            Role::JointBlocks => "joint_blocks",
            Role::ImageTail => "image_tail",
            Role::TextTail => "text_tail",
            Role::ImageHead => "image_head",
            Role::TextHead => "text_head",
            Role::VaeEncoder => "vae_encoder",
            Role::VaeDecoder => "vae_decoder",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One ONNX segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSpec {
    pub name: String,
    pub role: Role,
    /// For `joint_blocks`, `image_tail` and `text_tail`: the half-open range of block indices;
    /// for the pieces of a split `text_encoder`, of T5 layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<[u64; 2]>,
    /// The `.onnx` file first, then its external-data file if any.
    pub files: Vec<FileEntry>,
    pub parameters: u64,
    /// The element type the segment computes in; every floating-point input and output is of
    /// this type ([`Precision::dtype`]). Absent means fp32: packages written before it
    /// existed, and fp32 segments now, which leave it out so that a worker from before it
    /// (whose `SegmentSpec` denies unknown fields) still reads an fp32 package.
    #[serde(default, skip_serializing_if = "Precision::is_fp32")]
    pub precision: Precision,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// What a segment computes in. Half-precision segments keep the reductions that need it
/// (normalisation statistics, softmax) in fp32 inside the graph; their I/O is half precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }

    /// Whether this is fp32, the default, which a manifest leaves unwritten.
    pub fn is_fp32(&self) -> bool {
        *self == Precision::Fp32
    }

    /// The element type of the segment's floating-point inputs and outputs.
    pub fn dtype(self) -> TensorDtype {
        match self {
            Precision::Fp32 => TensorDtype::F32,
            Precision::Fp16 => TensorDtype::F16,
            Precision::Bf16 => TensorDtype::Bf16,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Name, element type and shape of one graph input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: TensorDtype,
    pub shape: Vec<Dim>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorDtype {
    F32,
    F16,
    Bf16,
    I64,
}

impl TensorDtype {
    /// f32, f16 or bf16.
    pub fn is_float(self) -> bool {
        self != TensorDtype::I64
    }
}

/// A dimension: a fixed size or a symbolic name such as `batch`, `text_len`, `image_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(u64),
    Sym(String),
}
