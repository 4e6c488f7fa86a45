//! What the soak test publishes, and what each message must end with.

use base64::Engine as _;
use ddit_e2e::*;
use serde_json::{json, Value};

/// What a message must end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A good job: `succeeded`, whatever breaks meanwhile.
    Succeeds,
    /// Its input read is a 403 on every attempt: `failed` (`unavailable`) after exactly the
    /// delivery limit's attempts, and its message in the DLQ.
    FailsForever,
    /// A fuzzed message: one result if it carries a usable id, else the DLQ with a reason.
    Fuzz,
    /// A hostile job (a decompression bomb, parameters over the caps, a text that is no image):
    /// a final `failed` result and its message in the DLQ, or, without a usable id, the DLQ.
    Refused,
}

#[derive(Clone, Debug)]
pub struct Msg {
    pub body: Vec<u8>,
    /// The job id the worker can use (the same rule as the worker's), if any.
    pub id: Option<String>,
    pub expect: Expect,
}

pub struct Plan {
    pub msgs: Vec<Msg>,
}

/// splitmix64: a seeded, reproducible plan.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The colour of the caption jobs' S3 image and of the VQA jobs' data URI.
pub const CAPTION_RGB: [u8; 3] = [200, 30, 30];
pub const VQA_RGB: [u8; 3] = [30, 30, 200];

pub fn png(rgb: [u8; 3]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(32, 32, image::Rgb(rgb))
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn data_uri(bytes: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:image/png;base64,{b64}")
}

/// The id the worker would use: a JSON object's `job_id` that passes its validation.
fn usable_id(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let id = v.get("job_id")?.as_str()?;
    ddit_worker::tasks::validate_job_id(id)
        .ok()
        .map(|()| id.to_string())
}

struct Inputs {
    s3: String,
    data: String,
    locked: String,
}

const PROMPTS: [&str; 4] = [
    "a red circle",
    "a blue square on the left",
    "two green triangles",
    "a small yellow circle at the top",
];

fn good(i: usize, id: &str, inputs: &Inputs) -> Value {
    match i % 3 {
        0 => json!({"job_id": id, "task": "generate",
            "params": {"prompt": PROMPTS[i % PROMPTS.len()], "steps": 4, "seed": i}}),
        1 => json!({"job_id": id, "task": "caption",
            "params": {"image": inputs.s3, "steps": 4, "seed": i}}),
        _ => json!({"job_id": id, "task": "vqa",
            "params": {"image": inputs.data, "question": "what shape is it?", "steps": 4, "seed": i}}),
    }
}

pub fn msg(body: Vec<u8>, expect: Expect) -> Msg {
    Msg {
        id: usable_id(&body),
        body,
        expect,
    }
}

/// A valid job, then one mutation: a missing, mistyped or invalid id, an unknown task, bad or
/// unknown parameters, an undecodable, truncated or forbidden image, a past deadline, or bytes
/// that are not (or no longer) JSON.
fn fuzzed(i: usize, rng: &mut Rng, inputs: &Inputs) -> Vec<u8> {
    let id = format!("fuzz-{i:05}");
    let mut j = good(rng.below(3), &id, inputs);
    let truncated_png = data_uri(&png([9, 9, 9])[..60]);
    match rng.below(18) {
        0 => drop(j.as_object_mut().unwrap().remove("job_id")),
        1 => j["job_id"] = json!(i),
        2 => j["job_id"] = json!(format!("fuzz {i}!")),
        3 => j["job_id"] = json!(""),
        4 => j["job_id"] = json!(format!("{}{i}", "f".repeat(200))),
        5 => j["task"] = json!("paint"),
        6 => j["params"] = Value::Null,
        7 => {
            j["params"]["steps"] =
                [json!(0), json!(-3), json!(1001), json!("four"), json!(2.5)][rng.below(5)].clone()
        }
        8 => j["params"]["seed"] = json!(-1),
        9 => j["params"]["bogus"] = json!(true),
        10 => j["params"]["image"] = json!("data:image/png;base64,!!!!"),
        11 => j["params"]["image"] = json!(truncated_png),
        12 => j["params"]["image"] = json!("s3://someone-else/x.png"),
        13 => j["params"]["image"] = json!("/etc/passwd"),
        14 => j["deadline"] = json!("2001-01-01T00:00:00Z"),
        15 => return (0..1 + rng.below(64)).map(|_| rng.next() as u8).collect(),
        16 => {
            let b = serde_json::to_vec(&j).unwrap();
            return b[..rng.below(b.len())].to_vec();
        }
        _ => {
            let mut b = serde_json::to_vec(&j).unwrap();
            let at = rng.below(b.len());
            b[at] ^= 1 << rng.below(8);
            return b;
        }
    }
    serde_json::to_vec(&j).unwrap()
}

async fn upload(names: &Names, bytes: Vec<u8>) -> String {
    let key = format!("{}/inputs/shape.png", names.s3_prefix);
    s3_client()
        .await
        .put_object()
        .bucket(bucket())
        .key(&key)
        .body(bytes.into())
        .send()
        .await
        .unwrap();
    format!("s3://{}/{key}", bucket())
}

impl Plan {
    /// `n` good jobs (every 50th published twice back to back), `fuzz` fuzzed messages and
    /// [`super::hostile::KINDS`] hostile jobs per 200 good ones (at least one of each), shuffled
    /// with a fixed seed, after `n / 100` (at least 2) that fail transiently forever: those come
    /// first, as their attempts take the longest.
    pub async fn build(names: &Names, n: usize, fuzz: usize) -> Self {
        let inputs = Inputs {
            s3: upload(names, png(CAPTION_RGB)).await,
            data: data_uri(&png(VQA_RGB)),
            locked: var("DDIT_TEST_S3_LOCKED_BUCKET", "ddit-test-locked"),
        };
        let mut rng = Rng::new(0x50a4);
        let mut forever = Vec::new();
        for k in 0..(n / 100).max(2) {
            let j = json!({"job_id": format!("forever-{k}"), "task": "caption",
                "params": {"image": format!("s3://{}/x.png", inputs.locked), "steps": 4}});
            forever.push(msg(serde_json::to_vec(&j).unwrap(), Expect::FailsForever));
        }
        let mut units: Vec<Vec<Msg>> = Vec::new();
        for i in 0..n {
            let body = serde_json::to_vec(&good(i, &format!("job-{i:05}"), &inputs)).unwrap();
            let copies = if i % 50 == 0 { 2 } else { 1 };
            units.push(vec![msg(body, Expect::Succeeds); copies]);
        }
        for i in 0..(n / 200).max(1) * super::hostile::KINDS {
            units.push(vec![msg(
                super::hostile::job(i, &inputs.s3),
                Expect::Refused,
            )]);
        }
        for i in 0..fuzz {
            let mut m = msg(fuzzed(i, &mut rng, &inputs), Expect::Fuzz);
            // A flipped byte may turn the id into another message's: keep ids unambiguous.
            if m.id
                .as_ref()
                .is_some_and(|id| *id != format!("fuzz-{i:05}"))
            {
                m = msg(format!("{{\"fuzz\": {i}}}").into_bytes(), Expect::Fuzz);
            }
            units.push(vec![m]);
        }
        for i in (1..units.len()).rev() {
            units.swap(i, rng.below(i + 1));
        }
        forever.extend(units.into_iter().flatten());
        Self { msgs: forever }
    }

    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// The bodies in `k` consecutive chunks.
    pub fn chunks(&self, k: usize) -> Vec<Vec<Vec<u8>>> {
        let size = self.msgs.len().div_ceil(k).max(1);
        self.msgs
            .chunks(size)
            .map(|c| c.iter().map(|m| m.body.clone()).collect())
            .collect()
    }

    /// The ids of the good jobs, once each: the `jobs=` of the soak's line.
    pub fn good_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = (self.msgs.iter())
            .filter(|m| m.expect == Expect::Succeeds)
            .filter_map(|m| m.id.as_deref())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Every usable id, once.
    pub fn result_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.msgs.iter().filter_map(|m| m.id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }
}
