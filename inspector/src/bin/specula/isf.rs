//! `specula isf`: a Volatility 3 symbol table from the guest's own BTF and kallsyms.

use std::path::{Path, PathBuf};

use specula_api::{Reply, Request};

use crate::client::{ask, CliError};

/// Where `specula isf` writes by default, and where the Volatility layer looks.
fn isf_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("specula/volatility/linux")
}

/// Fetches the kernel's symbols, BTF and banner through the API and writes its ISF.
pub async fn write_isf(s: &Path, output: Option<PathBuf>, force: bool) -> Result<PathBuf, CliError> {
    use sha2::Digest;
    let Reply::Kernel(kernel) = ask(s, &Request::Kernel).await? else { unreachable!("kernel answers a kernel") };
    let Reply::Symbols(symbols) = ask(s, &Request::Symbols).await? else { unreachable!("symbols answer symbols") };
    let banner_at = symbols
        .iter()
        .find(|s| s.name == "linux_banner")
        .ok_or(CliError::Usage("no linux_banner in kallsyms".into()))?
        .address;
    let Reply::Bytes(text) = ask(s, &Request::Vread { pid: 0, va: banner_at, len: 512 }).await? else {
        unreachable!("vread answers bytes")
    };
    let banner: Vec<u8> = text.iter().copied().take_while(|&b| b != 0).collect();
    if !banner.starts_with(b"Linux version ") {
        return Err(CliError::Usage(format!("linux_banner reads {:?}", String::from_utf8_lossy(&banner))));
    }
    // The default name is unique to the kernel build (its banner): a table already
    // there describes this kernel and is kept.
    let path = match output {
        Some(p) => p,
        None => {
            let release = kernel.release.replace('/', "_");
            let digest = sha2::Sha256::digest(&banner);
            let path = isf_cache_dir().join(format!("{release}-{}.json", specula_common::hex::encode(&digest[..8])));
            if path.is_file() && !force {
                return Ok(path);
            }
            path
        }
    };
    let Reply::Bytes(blob) = ask(s, &Request::Btf).await? else { unreachable!("btf answers bytes") };
    let btf = specula_os::Btf::parse(blob).map_err(CliError::Btf)?;
    let isf = inspector::isf::generate(&inspector::isf::IsfInput {
        btf: &btf,
        symbols: &symbols,
        kaslr_offset: kernel.kaslr_offset,
        banner: &banner,
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| CliError::File { path: dir.to_path_buf(), source })?;
    }
    let text = serde_json::to_vec(&isf).map_err(|source| CliError::Reply { path: "the ISF".into(), source })?;
    // Written whole, then renamed: Volatility never sees half a table.
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, &text).map_err(|source| CliError::File { path: partial.clone(), source })?;
    std::fs::rename(&partial, &path).map_err(|source| CliError::File { path: path.clone(), source })?;
    Ok(path)
}
