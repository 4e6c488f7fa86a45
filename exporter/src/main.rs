//! `ddit-export convert|inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ddit_export::{
    convert, summary, verify, ExportOptions, LengthOverrides, Precision, StoreDtype, Target,
    DEFAULT_EXTERNAL_THRESHOLD, DEFAULT_MAX_FILE_BYTES,
};

#[derive(Parser)]
#[command(
    name = "ddit-export",
    version,
    about = "Convert a D-DiT checkpoint into an ONNX model package"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    /// f32, with the joint blocks' and T5's linear layers in int8 (`MatMulIntegerToFloat`,
    /// activations quantized per row).
    Int8,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    #[value(alias = "f32")]
    Fp32,
    /// The joint blocks, heads, embedders and VAE in fp16 (normalisation statistics and
    /// softmax in f32); T5 and the timestep embedding in fp32.
    #[value(alias = "f16")]
    Fp16,
    /// The same in bf16 (ONNX Runtime's CPU provider cannot run it: a GPU provider's).
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    /// ONNX Runtime's CPU and CUDA providers (opset 23, fused `Attention`).
    Cpu,
    /// TensorRT 10.13's ONNX parser: opset 22, only its operators, attention unfused.
    Tensorrt,
}

#[derive(Subcommand)]
enum Cmd {
    /// Export a diffusers D-DiT pipeline folder into a model package.
    Convert {
        /// The checkpoint folder (model_index.json, transformer/, text_encoder/, vae/, tokenizer/, scheduler/).
        #[arg(long, env = "DDIT_CHECKPOINT")]
        checkpoint: PathBuf,
        /// Output package folder.
        #[arg(long, env = "DDIT_OUT")]
        out: PathBuf,
        /// Weight storage of the fp32 segments (I/O stays f32). `int8`: the joint blocks' and
        /// T5's linear layers 8-bit quantized per output channel, the rest f32 (fp32 only).
        #[arg(
            long = "weights",
            alias = "dtype",
            value_enum,
            default_value = "f32",
            env = "DDIT_WEIGHTS"
        )]
        dtype: Dtype,
        /// What the segments compute in. Half-precision segments take and give f16/bf16
        /// tensors and keep their weights in that type; T5 and the timestep embedding stay fp32.
        #[arg(long, value_enum, default_value = "fp32", env = "DDIT_PRECISION")]
        precision: PrecisionArg,
        /// Joint blocks per ONNX file after block 0, which has a file of its own (the block
        /// cache runs it alone). Default: all the others in one file.
        #[arg(long, env = "DDIT_BLOCKS_PER_SEGMENT")]
        blocks_per_segment: Option<usize>,
        /// Segments whose weights exceed this many bytes are written with ONNX external data.
        #[arg(long, default_value_t = DEFAULT_EXTERNAL_THRESHOLD, env = "DDIT_EXTERNAL_DATA_THRESHOLD")]
        external_data_threshold: u64,
        /// Most bytes of one segment's files (`.onnx` and external data together): the joint
        /// blocks and T5 are split by layers to stay under it.
        #[arg(long, default_value_t = DEFAULT_MAX_FILE_BYTES, env = "DDIT_MAX_FILE_BYTES")]
        max_file_bytes: u64,
        /// The execution provider the graphs are written for.
        #[arg(long, value_enum, default_value = "cpu", env = "DDIT_TARGET")]
        target: TargetArg,
        /// Mask token (default: the tokenizer config's mask_token, else `<extra_id_0>`).
        #[arg(long, env = "DDIT_MASK_TOKEN")]
        mask_token: Option<String>,
        /// Model name recorded in the manifest (default: the checkpoint folder's name).
        #[arg(long, env = "DDIT_NAME")]
        name: Option<String>,
        /// Default prompt length for text-to-image, in tokens (default: the checkpoint's
        /// model_index.json `text_lengths.prompt`, else 256).
        #[arg(long, env = "DDIT_PROMPT_LEN")]
        prompt_len: Option<u64>,
        /// Default caption canvas length, in tokens (default: `text_lengths.caption`, else 128).
        #[arg(long, env = "DDIT_CAPTION_LEN")]
        caption_len: Option<u64>,
        /// Default VQA canvas length, in tokens (default: `text_lengths.vqa`, else 128).
        #[arg(long, env = "DDIT_VQA_LEN")]
        vqa_len: Option<u64>,
        /// Default caption prompt prefix recorded in the manifest (default: the checkpoint's
        /// model_index.json `caption_prompt`, if any; "" records none).
        #[arg(long, env = "DDIT_CAPTION_PROMPT")]
        caption_prompt: Option<String>,
        /// Replace a package already in --out.
        #[arg(long, env = "DDIT_FORCE")]
        force: bool,
    },
    /// Verify every hash of a package and print its summary.
    Inspect {
        /// The package folder (holding manifest.json).
        package: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Convert {
            checkpoint,
            out,
            dtype,
            precision,
            blocks_per_segment,
            external_data_threshold,
            max_file_bytes,
            target,
            mask_token,
            name,
            prompt_len,
            caption_len,
            vqa_len,
            caption_prompt,
            force,
        } => {
            let mut o = ExportOptions::new(checkpoint, out.clone());
            o.dtype = match dtype {
                Dtype::F32 => StoreDtype::F32,
                Dtype::F16 => StoreDtype::F16,
                Dtype::Int8 => StoreDtype::Int8,
            };
            o.precision = match precision {
                PrecisionArg::Fp32 => Precision::Fp32,
                PrecisionArg::Fp16 => Precision::Fp16,
                PrecisionArg::Bf16 => Precision::Bf16,
            };
            o.blocks_per_segment = blocks_per_segment;
            o.external_data_threshold = external_data_threshold;
            o.max_file_bytes = max_file_bytes;
            o.target = match target {
                TargetArg::Cpu => Target::Cpu,
                TargetArg::Tensorrt => Target::TensorRt,
            };
            o.mask_token = mask_token;
            o.name = name;
            o.text_lengths = LengthOverrides {
                prompt: prompt_len,
                caption: caption_len,
                vqa: vqa_len,
            };
            o.caption_prompt = caption_prompt;
            o.force = force;
            convert(&o).and_then(|_| verify(&out)).map(|m| {
                println!("wrote {}", out.display());
                print!("{}", summary(&m));
            })
        }
        Cmd::Inspect { package } => verify(&package).map(|m| print!("{}", summary(&m))),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
